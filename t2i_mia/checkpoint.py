"""Training checkpoints with orbax: the whole train state (params, optimiser state, EMA, RNG,
step) plus a small JSON ``extra`` dict, one folder per step.

Layout: ``<dir>/<step>/state`` (orbax ``PyTreeCheckpointHandler``, OCDBT/zarr arrays, each
process writing its own shards) and ``<dir>/<step>/extra`` (JSON). The data-iterator position
needs no separate entry: the training loop's batches are a pure function of the step
(:func:`t2i_mia.training.loop.run_training`), so restoring ``step`` restores it.

Atomicity: orbax writes a step into ``<dir>/<step>.orbax-checkpoint-tmp-<n>`` and, once every
array and the metadata are written and ``commit_success.txt`` is in place, renames it to
``<dir>/<step>`` (``AtomicRenameTemporaryPath``; on object stores without an atomic rename
orbax uses the commit file instead). A process killed mid-save leaves only a ``*-tmp-*``
folder, which :func:`latest_step` ignores and the next save's manager deletes. Saves here are
synchronous (``enable_async_checkpointing=False``): when ``save_checkpoint`` returns the step
is on disk, so a SIGKILL right after it cannot lose it.

All functions must be called by every process of a multi-host job (orbax coordinates them:
each process writes its own shards, the primary the metadata and the commit). The folder
must therefore be one that every process sees at the same path (one machine, NFS, a FUSE
mounted bucket); on per-host local disks a step would be split across machines.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from t2i_mia.errors import CheckpointError
from t2i_mia.parallel.mesh import path_str

PyTree = Any

log = logging.getLogger(__name__)

MAX_TO_KEEP = 3


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's pytree handler with a registry of our own (no global registration).

    orbax's default "replica-parallel" save slices every replicated array on device, one small
    compiled program per shape and sharding: seconds of compilation per process on CPU for no
    gain. It pays off with many accelerator replicas, so it stays on there.
    """
    th = ocp.type_handlers
    scalar = th.ScalarHandler()
    registry = th.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
        (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
        (jax.Array, th.ArrayHandler(use_replica_parallel=jax.default_backend() != "cpu")))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _manager(directory: str, *, create: bool, max_to_keep: int = MAX_TO_KEEP
             ) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=create,
        enable_async_checkpointing=False,
        # Removes *-tmp-* folders of saves that a killed process left half written.
        cleanup_tmp_directories=create,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={"state": _state_handler(),
                       "extra": ocp.JsonCheckpointHandler()})


def save_checkpoint(directory: str | os.PathLike, step: int, state: PyTree,
                    extra: dict | None = None, *, max_to_keep: int = MAX_TO_KEEP) -> None:
    """Writes ``state`` (a pytree of jax/numpy arrays, any sharding) as step ``step``.

    ``extra``: JSON-serialisable metadata stored beside it (returned by restore). Keeps the
    newest ``max_to_keep`` steps. A step not above the latest saved one is an error (orbax
    would skip it silently).
    """
    directory = os.fspath(directory)
    step = int(step)
    extra = {} if extra is None else dict(extra)
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}: checkpoint extra is not JSON-serialisable ({e})"
                              ) from e
    mgr = _manager(directory, create=True, max_to_keep=max_to_keep)
    try:
        latest = mgr.latest_step()
        if latest is not None and step <= latest:
            raise CheckpointError(f"{directory}: cannot save step {step}: step {latest} is "
                                  f"already saved there (steps must increase)")
        try:
            saved = mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), extra=ocp.args.JsonSave(extra)))
            mgr.wait_until_finished()
        except CheckpointError:
            raise
        except Exception as e:  # orbax/tensorstore raise many unrelated types
            raise CheckpointError(f"{directory}: saving step {step} failed: {e}") from e
        if not saved:
            raise CheckpointError(f"{directory}: orbax declined to save step {step}")
    finally:
        mgr.close()
    log.info("saved checkpoint %s/%d", directory, step)


def latest_step(directory: str | os.PathLike) -> int | None:
    """Newest complete step in ``directory``; None if the folder is missing or holds none.

    Half-written ``*.orbax-checkpoint-tmp-*`` folders are not steps.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    mgr = _manager(directory, create=False)
    try:
        return mgr.latest_step()
    finally:
        mgr.close()


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """Restore target of one leaf: its shape, dtype and sharding."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
        return leaf
    arr = leaf if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(leaf)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype,
                                sharding=SingleDeviceSharding(jax.local_devices()[0]))


def _check_dtypes(where: str, template: PyTree, metadata: PyTree) -> None:
    """orbax casts to the template's dtype silently; a resume must not change dtypes."""
    stored = {path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
    for p, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        name = path_str(p)
        m = stored.get(name)
        dtype = getattr(m, "dtype", None)
        if dtype is not None and np.dtype(dtype) != np.dtype(leaf.dtype):
            raise CheckpointError(f"{where}: tensor '{name}' is stored as {np.dtype(dtype)} but "
                                  f"the state expects {np.dtype(leaf.dtype)}")


def restore_checkpoint(directory: str | os.PathLike, state_template: PyTree,
                       step: int | None = None) -> tuple[PyTree, dict]:
    """Reads step ``step`` (default: the latest) into the structure of ``state_template``.

    Each array is restored with the template leaf's sharding (jax.Array or ShapeDtypeStruct
    with a sharding; numpy leaves go to the first local device), so a state saved on one mesh
    restores onto another. Returns ``(state, extra)``. A missing folder, a missing step, a
    corrupt or incomplete step, or a tree/shape/dtype mismatch -> CheckpointError naming the
    folder.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: checkpoint folder is missing")
    mgr = _manager(directory, create=False)
    try:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise CheckpointError(f"{directory}: no complete checkpoint in this folder")
        if step is None:
            step = steps[-1]
        elif int(step) not in steps:
            raise CheckpointError(f"{directory}: no checkpoint for step {step} "
                                  f"(available: {steps})")
        step = int(step)
        where = os.path.join(directory, str(step))
        abstract = jax.tree.map(_abstract, state_template)
        try:
            meta = mgr.item_metadata(step)
            state_meta = meta["state"] if meta is not None else None
            if state_meta is None:
                raise CheckpointError(f"{where}: the 'state' item is missing or unreadable")
            _check_dtypes(where, abstract, state_meta)
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
            restored = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args),
                extra=ocp.args.JsonRestore()))
        except CheckpointError:
            raise
        except Exception as e:  # orbax/tensorstore/json raise many unrelated types
            raise CheckpointError(f"{where}: cannot restore the checkpoint (corrupt, incomplete "
                                  f"or not matching the state): {e}") from e
    finally:
        mgr.close()
    extra = restored["extra"] if restored["extra"] is not None else {}
    log.info("restored checkpoint %s", where)
    return restored["state"], extra
