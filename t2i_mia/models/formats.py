"""Public checkpoint formats: ``config.json`` + a flax msgpack parameter file.

Hugging Face Flax checkpoints (CLIP, DalleBart, vqgan-jax) store ``flax_model.msgpack``;
diffusers Flax checkpoints store ``diffusion_flax_model.msgpack``.  Both are
``flax.serialization.msgpack_serialize`` of a nested dict of arrays.  Our modules are built
so that their linen parameter trees match those files key for key; :func:`match_tree` checks
that and names the first tensor that is missing, extra or of the wrong shape.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from flax import serialization, traverse_util

from t2i_mia.errors import CheckpointError, ConfigError

PyTree = Any


def read_json(path: str | os.PathLike) -> dict:
    """Reads a JSON object; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (expected a JSON config file)")
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_msgpack(path: str | os.PathLike) -> dict:
    """Reads a flax msgpack parameter file to a nested dict of numpy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (expected flax msgpack parameters)")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise CheckpointError(f"{path}: zero-byte file (expected flax msgpack parameters)")
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types
        raise CheckpointError(f"{path}: not a flax msgpack file ({e})") from e
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a dict of parameters, got {type(tree).__name__}")
    return tree


def write_msgpack(path: str | os.PathLike, params: PyTree) -> None:
    """Writes parameters as flax msgpack, atomically."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    state = serialization.to_state_dict(params)
    state = traverse_util.unflatten_dict(
        {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state).items()})
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(state))
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Mapping) -> None:
    """Writes a JSON file atomically."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def match_tree(loaded: PyTree, expected: PyTree, where: str) -> PyTree:
    """Checks a loaded parameter tree against the tree our module expects.

    Args:
      loaded: nested dict read from a checkpoint.
      expected: nested dict of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape(module.init, ...)``).
      where: the file, for error messages.
    Returns:
      ``loaded`` with every leaf cast to the expected dtype (numpy arrays).
    Raises:
      CheckpointError naming the first missing, unexpected or wrongly shaped tensor.
    """
    flat_l = traverse_util.flatten_dict(serialization.to_state_dict(loaded), sep="/")
    flat_e = traverse_util.flatten_dict(serialization.to_state_dict(expected), sep="/")
    missing = sorted(set(flat_e) - set(flat_l))
    if missing:
        raise CheckpointError(
            f"{where}: missing tensor '{missing[0]}' (expected shape {tuple(flat_e[missing[0]].shape)})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(set(flat_l) - set(flat_e))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor '{extra[0]}' (shape {tuple(np.shape(flat_l[extra[0]]))}); "
            "the config does not describe this checkpoint"
            + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))
    out = {}
    for k, e in flat_e.items():
        v = np.asarray(flat_l[k])
        if tuple(v.shape) != tuple(e.shape):
            raise CheckpointError(
                f"{where}: tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(e.shape)}")
        out[k] = v.astype(e.dtype)
    return traverse_util.unflatten_dict(out, sep="/")


def check_config_keys(cfg: Mapping[str, Any], supported: Mapping[str, Any], where: str,
                      ignored: frozenset[str] = frozenset()) -> dict:
    """Validates a checkpoint ``config.json`` against what we implement.

    Args:
      cfg: the loaded config.
      supported: key -> either a tuple of allowed values, a type (any value of it), or a
        callable returning True when the value is supported.
      where: the file, for error messages.
      ignored: keys that carry no meaning for the computation (e.g. ``transformers_version``).
    Returns: ``cfg`` as a dict.
    Raises: ConfigError naming the key and value that we do not implement.
    """
    for key, value in cfg.items():
        if key in ignored or key.startswith("_"):
            continue
        if key not in supported:
            raise ConfigError(f"{where}: key '{key}' (= {value!r}) is not implemented")
        rule = supported[key]
        ok = (value in rule) if isinstance(rule, tuple) else (
            isinstance(value, rule) if isinstance(rule, type) else bool(rule(value)))
        if not ok:
            raise ConfigError(f"{where}: '{key}' = {value!r} is not implemented"
                              + (f" (supported: {list(rule)})" if isinstance(rule, tuple) else ""))
    return dict(cfg)


def load_config_and_params(folder: str | os.PathLike, config_cls, weights_name: str,
                           shapes_fn, config_name: str = "config.json"):
    """``folder/config.json`` (validated by ``config_cls.from_dict``) + the msgpack weights
    checked against ``shapes_fn(cfg)``. Returns (cfg, params); errors name file and tensor."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, config_name)
    cfg = config_cls.from_dict(read_json(cfg_path), cfg_path)
    w_path = os.path.join(folder, weights_name)
    return cfg, match_tree(read_msgpack(w_path), shapes_fn(cfg), w_path)


def save_config_and_params(folder: str | os.PathLike, cfg, params: PyTree, weights_name: str,
                           shapes_fn, class_name: str, config_name: str = "config.json") -> None:
    """Writes the weights (shape-checked) and ``config.json`` with ``_class_name``, atomically."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    w_path = os.path.join(folder, weights_name)
    match_tree(params, shapes_fn(cfg), w_path)
    write_msgpack(w_path, params)
    write_json(os.path.join(folder, config_name), {"_class_name": class_name, **cfg.to_dict()})
