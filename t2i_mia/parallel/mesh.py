"""Device mesh, sharding rules and batch placement (the one place that knows about devices).

The mesh has two axes, ``('data', 'model')``:

* ``data``: the batch is split over it (data parallelism); gradients are summed across it by
  XLA's all-reduce, inserted automatically because the loss is a mean over the global batch.
* ``model``: parameters matched by a sharding rule are split over it (tensor parallelism);
  with ``model == 1`` (the default) every parameter is replicated.

Sharding rules are data, as in big_vision: a sequence of ``(regex, PartitionSpec)``. The
regex is matched with ``re.search`` against the ``/``-joined path of a leaf (e.g.
``params/down_blocks_0/resnets_0/conv1/kernel``, or for an Adam moment
``opt_state/0/mu/down_blocks_0/...``, so optimiser state follows its parameter). The first
rule whose regex matches *and whose spec has exactly the leaf's rank* wins; a leaf no rule
matches is replicated. A mesh axis named on a dimension it does not divide is dropped for
that dimension (that dimension is replicated), so one rule set works for every mesh shape.

Several processes (multi-host; :mod:`t2i_mia.parallel.distributed`): the mesh spans every
process's devices and each process holds the rows of the global batch that its own devices
hold, :func:`process_rows`. :func:`shard_batch` builds the global array either from the
global host batch (the same on every process; each process copies only its rows) or, with
``process_local=True``, from just this process's rows, as a loader that reads only its share
produces. Outputs come back with :func:`t2i_mia.parallel.distributed.gather_to_host`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t2i_mia.config import DEFAULT_SHARDING_RULES
from t2i_mia.errors import ConfigError

PyTree = Any
P = PartitionSpec
Rules = Sequence[tuple[str, PartitionSpec]]

AXES = ("data", "model")


def rules_from_config(rows: Sequence[Sequence[str | None]],
                      where: str = "mesh.rules") -> tuple[tuple[str, PartitionSpec], ...]:
    """Config rows ``[regex, axis of dim 0, ...]`` (``mesh.rules``) -> ``(regex, spec)``."""
    out = []
    for i, row in enumerate(rows):
        if len(row) < 2 or not isinstance(row[0], str):
            raise ConfigError(f"{where}[{i}]: expected [regex, axis, ...], got {list(row)}")
        out.append((row[0], P(*row[1:])))
    return tuple(out)


def config_rules(cfg) -> tuple[tuple[str, PartitionSpec], ...]:
    """The sharding rules of a :class:`t2i_mia.config.Config` (its ``mesh.rules``)."""
    return rules_from_config(cfg.mesh.rules)


# Rank-2 kernels (Dense layers, 1x1 projections): output features over 'model'. Rank-4 conv
# kernels (H, W, in, out): output channels over 'model'. Both are no-ops when model == 1, and
# a kernel whose output size the model axis does not divide stays replicated.
DEFAULT_RULES: tuple[tuple[str, PartitionSpec], ...] = rules_from_config(DEFAULT_SHARDING_RULES)


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``('data', 'model')`` mesh over ``devices`` (default: all of ``jax.devices()``).

    ``data=-1`` takes all devices left after ``model``. The mesh must use every given device:
    ``data * model`` must equal the device count (pass ``devices=jax.devices()[:n]`` to use a
    subset; "single device" is ``make_mesh(devices=jax.devices()[:1])``).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ConfigError("make_mesh: no devices given")
    if not isinstance(model, (int, np.integer)) or model < 1:
        raise ConfigError(f"mesh.model must be an integer >= 1, got {model!r}")
    if not isinstance(data, (int, np.integer)) or (data != -1 and data < 1):
        raise ConfigError(f"mesh.data must be -1 or an integer >= 1, got {data!r}")
    if data == -1:
        if n % model:
            raise ConfigError(f"mesh.model={model} does not divide the device count {n} "
                              f"(mesh.data=-1 takes the remaining devices)")
        data = n // model
    if data * model != n:
        raise ConfigError(f"mesh.data={data} x mesh.model={model} = {data * model} does not "
                          f"match the device count {n} (use mesh.data=-1 to take all "
                          f"remaining devices)")
    try:
        # Topology-aware device order on TPU/GPU; plain reshape where it has no opinion.
        grid = mesh_utils.create_device_mesh((data, model), devices=devices)
    except (ValueError, NotImplementedError, AssertionError, AttributeError):
        grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``, other ``ndim - 1`` axes whole."""
    if ndim < 1:
        raise ValueError(f"batch_sharding: a batch array needs ndim >= 1, got {ndim}")
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def path_str(path: tuple) -> str:
    """``/``-joined key path of a pytree leaf (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in names]))


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those dimensions replicate)."""
    out = []
    for dim, axis in zip(shape, tuple(spec)):
        if axis is None or dim % _axis_size(mesh, axis) == 0:
            out.append(axis)
        else:
            out.append(None)
    return P(*out)


def param_shardings(params: PyTree, mesh: Mesh,
                    rules: Sequence[tuple[str, PartitionSpec]] = (),
                    min_size: int = 0) -> PyTree:
    """A pytree of ``NamedSharding`` with the structure of ``params`` (any pytree of arrays).

    For each leaf the first rule ``(regex, spec)`` with ``re.search(regex, path)`` and
    ``len(spec) == leaf.ndim`` gives its spec; no match -> replicated. A mesh axis in the spec
    that does not divide the dimension it names is dropped (that dimension is replicated).
    Leaves with fewer than ``min_size`` elements stay replicated (sharding tiny tensors costs
    more in communication than it saves). Axis names must be mesh axes (ConfigError if not).
    """
    compiled = []
    for regex, spec in rules:
        if not isinstance(spec, PartitionSpec):
            raise ConfigError(f"sharding rule {regex!r}: expected a PartitionSpec, got {spec!r}")
        for axis in tuple(spec):
            for a in (axis if isinstance(axis, tuple) else (axis,)):
                if a is not None and a not in mesh.axis_names:
                    raise ConfigError(f"sharding rule {regex!r}: axis {a!r} is not a mesh axis "
                                      f"{tuple(mesh.axis_names)}")
        try:
            compiled.append((re.compile(regex), spec))
        except re.error as e:
            raise ConfigError(f"sharding rule {regex!r}: not a valid regex ({e})") from e

    def one(path, leaf):
        shape = tuple(np.shape(leaf))
        name = path_str(path)
        if int(np.prod(shape, dtype=np.int64)) >= min_size:
            for pattern, spec in compiled:
                if len(spec) == len(shape) and pattern.search(name):
                    return NamedSharding(mesh, _fit_spec(spec, shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, params)


def place_params(params: PyTree, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PyTree:
    """``params`` (host or device arrays) on the mesh, split by ``rules``: each device
    receives only its own shard."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def init_sharded(init_fn: Callable[..., PyTree], mesh: Mesh, rules: Rules, *args) -> PyTree:
    """``init_fn(*args)`` run as one program whose outputs are born split by ``rules``
    (``jax.jit`` with ``out_shardings``): no device ever holds a whole sharded parameter.
    The values equal ``init_fn(*args)``'s (random bits do not depend on the sharding)."""
    shapes = jax.eval_shape(init_fn, *args)
    return jax.jit(init_fn, out_shardings=param_shardings(shapes, mesh, rules))(*args)


def model_split(params: PyTree, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[int, int]:
    """(parameters split over a ``model`` axis of size > 1, all parameters) of ``params``
    (arrays or ShapeDtypeStructs); the first is 0 on a mesh with ``model == 1``."""
    shardings = param_shardings(params, mesh, rules)
    split = total = 0
    for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        n = int(np.prod(np.shape(leaf), dtype=np.int64))
        total += n
        axes = [a for ax in tuple(sh.spec) if ax is not None
                for a in (ax if isinstance(ax, tuple) else (ax,))]
        if "model" in axes and mesh.shape["model"] > 1:
            split += n
    return split, total


def _local_data_shards(mesh: Mesh) -> int:
    """Number of distinct 'data' coordinates whose devices belong to this process."""
    me = jax.process_index()
    grid = np.asarray(mesh.devices)
    axis = mesh.axis_names.index("data")
    rows = set()
    for idx, d in np.ndenumerate(grid):
        if d.process_index == me:
            rows.add(idx[axis])
    return len(rows)


def process_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
    """int64[n_local]: the rows of a global batch of ``global_batch_size`` that this process's
    devices hold, ascending (the order ``jax.make_array_from_process_local_data`` maps
    process-local rows to). One process: ``arange(global_batch_size)``.

    A loader that reads only its share reads these rows (by stable position in the global
    batch) and passes them to ``shard_batch(..., process_local=True)``. The rows are whole
    per-device blocks; on a mesh whose 'data' order interleaves processes they need not be
    contiguous. ``global_batch_size`` must divide by the 'data' axis size (ConfigError).
    """
    n_data = mesh.shape["data"]
    if global_batch_size < 1 or global_batch_size % n_data:
        raise ConfigError(f"global batch size {global_batch_size} does not divide by the "
                          f"{n_data} data shards of the mesh (mesh.data); choose a batch_size "
                          f"that is a multiple of it, or pad_batch()")
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,))
    rows = set()
    for (sl,) in index_map.values():
        rows.update(range(*sl.indices(global_batch_size)))
    return np.asarray(sorted(rows), dtype=np.int64)


def shard_batch(batch: PyTree, mesh: Mesh, *, process_local: bool = False) -> PyTree:
    """Places a pytree of host arrays on the mesh, leading (batch) axis split over ``'data'``.

    ``process_local=False`` (default): ``batch`` is the global batch, identical on every
    process (one process: simply the batch); each process copies only the rows its devices
    hold. Every leaf's leading dim must divide by the 'data' axis size.

    ``process_local=True``: ``batch`` holds only this process's rows of the global batch,
    ``global[process_rows(mesh, G)]``; the global size ``G`` is ``n_local`` x (data-axis size
    / data shards on this process). Every leaf's leading dim must divide by the number of data
    shards this process holds. With one process both modes are the same.
    """
    n_data = mesh.shape["data"]
    n_local_shards = _local_data_shards(mesh)

    def one(path, x):
        x = np.asarray(x)
        name = path_str(path)
        if x.ndim < 1:
            raise ValueError(f"shard_batch: batch leaf '{name}' is a scalar; "
                             f"every batch leaf needs a leading batch axis")
        sharding = batch_sharding(mesh, x.ndim)
        if not process_local:
            if x.shape[0] % n_data:
                raise ConfigError(
                    f"shard_batch: batch leaf '{name}' has leading dim {x.shape[0]}, which "
                    f"does not divide by the {n_data} data shards of the mesh (mesh.data); "
                    f"choose a batch_size that is a multiple of it, or pad_batch()")
            # Each process's callback is asked only for its own devices' blocks.
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        if x.shape[0] % n_local_shards:
            raise ConfigError(
                f"shard_batch: process-local batch leaf '{name}' has leading dim "
                f"{x.shape[0]}, which does not divide by the {n_local_shards} data shards "
                f"this process holds")
        global_shape = (x.shape[0] // n_local_shards * n_data,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(one, batch)


def pad_batch(x, multiple: int) -> tuple[np.ndarray | jax.Array, int]:
    """Pads the leading axis of ``x`` up to a multiple of ``multiple``.

    Returns ``(padded, n_valid)`` with ``n_valid = len(x)``. Padding rows are copies of the
    last row (numerically benign for any model, unlike zeros that can hit a 0/0 in a
    normalisation); callers keep ``outputs[:n_valid]``. An empty ``x`` is returned as is.
    """
    if multiple < 1:
        raise ValueError(f"pad_batch: multiple must be >= 1, got {multiple}")
    # a device array is padded on its device (no round trip through the host)
    xp = jnp if isinstance(x, jax.Array) else np
    x = x if xp is jnp else np.asarray(x)
    if x.ndim < 1:
        raise ValueError("pad_batch: expected an array with a leading batch axis, got a scalar")
    n = x.shape[0]
    pad = (-n) % multiple
    if n == 0 or pad == 0:
        return x, n
    return xp.concatenate([x, xp.repeat(x[-1:], pad, axis=0)], axis=0), n
