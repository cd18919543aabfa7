"""One batched-apply helper: fixed-size batches through a jitted function, on the mesh.

Every per-example computation over a set larger than one batch (embeddings, latents,
image tokens, per-query losses) goes through :func:`batched_apply`: pad the last batch to
the fixed size (copies of its last row, so one compiled program serves every batch and no
normalisation sees an all-zero row), place each batch's leading axis on the mesh's
``data`` axis, call, trim the padding, concatenate.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from t2i_mia.parallel.mesh import batch_sharding, pad_batch, shard_batch

PyTree = Any


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded down to a multiple of the mesh's ``data`` axis (at least one
    row per data device), so every global batch divides over it."""
    n = mesh.shape["data"]
    return max(n, (batch_size // n) * n)


def batched_apply(fn: Callable[..., PyTree], params: PyTree, arrays: Sequence[Any],
                  batch_size: int, mesh: Mesh | None = None, *, to_host: bool = True,
                  empty: PyTree | None = None, desc: str | None = None) -> PyTree:
    """``fn(params, *batches)`` over ``arrays`` (each with the same leading axis N) in
    batches of ``batch_size``; returns its outputs (a pytree of arrays with a leading batch
    axis) for all N rows, as numpy (``to_host``) or device arrays.

    ``mesh``: each batch is placed with its leading axis on ``data`` (``batch_size`` must
    divide over it; host arrays go through :func:`shard_batch`, so with several processes
    each copies only its own rows); None leaves placement to ``fn``. N = 0 returns ``empty``
    (a ValueError when it is None: the output shapes of an empty set are the caller's to
    say). ``desc``: show a progress bar over the batches with this label.
    """
    if batch_size < 1:
        raise ValueError(f"batched_apply: batch_size must be >= 1, got {batch_size}")
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"batched_apply: leading axes differ: {[a.shape[0] for a in arrays]}")
    if n == 0:
        if empty is None:
            raise ValueError("batched_apply: no rows (and no empty result given)")
        return empty
    outs = []
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=desc is None, leave=False,
                  dynamic_ncols=True):
        chunk = [a[i:i + batch_size] for a in arrays]
        m = chunk[0].shape[0]
        chunk = [pad_batch(c, batch_size)[0] for c in chunk]
        if mesh is not None:
            chunk = [jax.device_put(c, batch_sharding(mesh, c.ndim)) if isinstance(c, jax.Array)
                     else shard_batch(c, mesh) for c in chunk]
        outs.append(jax.tree.map(lambda y, m=m: y[:m], fn(params, *chunk)))
    if to_host:  # one fetch at the end: the batches' calls are dispatched without waiting
        outs = jax.device_get(outs)
    cat = np.concatenate if to_host else jnp.concatenate
    return jax.tree.map(lambda *ys: cat(ys), *outs)
