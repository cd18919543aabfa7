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

Works unchanged on several hosts: :func:`shard_batch` takes each process's local slice of
the global batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t2i_mia.errors import ConfigError

PyTree = Any
P = PartitionSpec

AXES = ("data", "model")

# Rank-2 kernels (Dense layers, 1x1 projections): output features over 'model'. Rank-4 conv
# kernels (H, W, in, out): output channels over 'model'. Both are no-ops when model == 1, and
# a kernel whose output size the model axis does not divide stays replicated.
DEFAULT_RULES: tuple[tuple[str, PartitionSpec], ...] = (
    (r"(^|/)kernel$", P(None, "model")),
    (r"(^|/)kernel$", P(None, None, None, "model")),
)


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


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Places a pytree of host arrays (this process's slice of the global batch) on the mesh,
    leading axis split over ``'data'``. Every leaf's leading dim must divide by the number of
    data shards this process holds (the data-axis size on one host)."""
    n_shards = _local_data_shards(mesh)

    def one(path, x):
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"shard_batch: batch leaf '{path_str(path)}' is a scalar; "
                             f"every batch leaf needs a leading batch axis")
        if x.shape[0] % n_shards:
            raise ConfigError(
                f"shard_batch: batch leaf '{path_str(path)}' has leading dim {x.shape[0]}, "
                f"which does not divide by the {n_shards} data shards of the mesh "
                f"(mesh.data); choose a batch_size that is a multiple of it, or pad_batch()")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree_util.tree_map_with_path(one, batch)


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pads the leading axis of ``x`` up to a multiple of ``multiple``.

    Returns ``(padded, n_valid)`` with ``n_valid = len(x)``. Padding rows are copies of the
    last row (numerically benign for any model, unlike zeros that can hit a 0/0 in a
    normalisation); callers keep ``outputs[:n_valid]``. An empty ``x`` is returned as is.
    """
    if multiple < 1:
        raise ValueError(f"pad_batch: multiple must be >= 1, got {multiple}")
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError("pad_batch: expected an array with a leading batch axis, got a scalar")
    n = x.shape[0]
    pad = (-n) % multiple
    if n == 0 or pad == 0:
        return x, n
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0), n
