"""PyTorch-layout checkpoints (diffusers / transformers ``save_pretrained`` with
safetensors): read with the ``safetensors`` package's numpy API, mapped onto our Flax trees.

A torch state dict names tensors after its modules (``down_blocks.0.resnets.1.conv1.weight``)
and stores them in torch layouts; our Flax trees (diffusers' and transformers' Flax layouts)
name them ``down_blocks_0/resnets_1/conv1/kernel`` (transformers: ``layers/0``). The mapping
is decided per tensor against the tree our module expects, never guessed:

* the path: numeric segments joined to the previous one (``blocks.0`` -> ``blocks_0``) or
  kept as their own (``layers.0`` -> ``layers/0``), whichever the expected tree has; the VAE's
  attention names in either generation (``to_q/to_k/to_v/to_out.0`` and the older
  ``query/key/value/proj_attn``);
* the leaf: ``weight`` -> ``kernel`` (conv OIHW -> HWIO; linear (out, in) -> (in, out); a
  1x1 conv to a dense kernel and back), ``scale`` (norms) or ``embedding``; ``bias`` stays;
* every tensor's shape checked against the expected one; a tensor with no place in the
  tree, or a place in the tree with no tensor, is a CheckpointError naming it.

float16 / bfloat16 tensors are upcast to float32 (the parity tolerance is float32's).
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

from t2i_mia.errors import CheckpointError

PyTree = Any

# old <-> new attention names (diffusers renamed the VAE's attention projections in 0.x)
_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn",
            "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


def safetensors_files(folder: str, stem: str) -> list[str]:
    """The weights of one component: ``<stem>.safetensors``, else its ``.fp16`` variant, else
    the shards of ``<stem>.safetensors.index.json``. [] when there are none."""
    plain = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(plain):
        return [plain]
    for variant in ("fp16", "bf16"):
        p = os.path.join(folder, f"{stem}.{variant}.safetensors")
        if os.path.isfile(p):
            return [p]
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return [os.path.join(folder, s) for s in shards]
    return []


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as float32 numpy arrays (ints kept).

    bfloat16, which numpy has no dtype for, is read from the raw little-endian bytes."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing weights file")
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            base = 8 + n
            out = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
                f.seek(base + lo)
                raw = f.read(hi - lo)
                if dtype == "BF16":
                    bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
                    arr = bits.view(np.float32)
                else:
                    np_dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8",
                                "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
                                "BOOL": "?"}.get(dtype)
                    if np_dtype is None:
                        raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype}, "
                                              "which is not supported")
                    arr = np.frombuffer(raw, np_dtype)
                arr = arr.reshape(shape)
                if arr.dtype.kind == "f":
                    arr = arr.astype(np.float32)
                out[name] = arr
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def read_component(folder: str, stem: str) -> dict[str, np.ndarray]:
    files = safetensors_files(folder, stem)
    if not files:
        raise CheckpointError(f"{folder}: no {stem}.safetensors (nor an fp16 variant or a "
                              "sharded index)")
    out: dict[str, np.ndarray] = {}
    for path in files:
        out.update(read_safetensors(path))
    return out


def _path_candidates(parts: list[str]) -> Iterable[str]:
    joined, kept = [], []
    for p in parts:
        if p.isdigit() and joined:
            joined[-1] = f"{joined[-1]}_{p}"
        else:
            joined.append(p)
        kept.append(p)
    for base in (joined, kept):
        yield "/".join(base)
        aliased = [_ALIASES.get(p, p) for p in base]
        if aliased != base:
            yield "/".join(aliased)


def _to_kernel(arr: np.ndarray, shape: tuple) -> np.ndarray | None:
    """A torch weight in the layout of a Flax kernel of ``shape``, or None if none fits."""
    if arr.ndim == 4:
        hwio = arr.transpose(2, 3, 1, 0)
        if hwio.shape == shape:
            return hwio
        if len(shape) == 2 and arr.shape[2:] == (1, 1):  # 1x1 conv -> dense
            dense = arr[:, :, 0, 0].T
            return dense if dense.shape == shape else None
        return None
    if arr.ndim == 2:
        if len(shape) == 4 and shape[:2] == (1, 1):  # dense -> 1x1 conv
            k = arr.T[None, None]
            return k if k.shape == shape else None
        return arr.T if arr.T.shape == shape else None
    return None


def torch_to_flax(state: Mapping[str, np.ndarray], expected: PyTree, where: str,
                  strip_prefix: str = "", ignore: Iterable[str] = ()) -> PyTree:
    """Maps a torch state dict onto the expected Flax tree (see the module docstring).

    Args:
      state: name -> array, as read from the safetensors files.
      expected: the Flax tree of arrays or ``jax.ShapeDtypeStruct`` our module needs.
      where: the file or folder, for error messages.
      strip_prefix: a prefix every torch name has and the tree has not (``text_model.``).
      ignore: torch names that are buffers, not parameters (``...position_ids``).
    Returns: the nested parameter dict (numpy, the expected dtypes).
    Raises: CheckpointError naming a tensor that has no place, a wrongly shaped tensor, or
      a parameter no tensor provides.
    """
    flat_e = traverse_util.flatten_dict(expected, sep="/")
    ignore = set(ignore)
    out: dict[str, np.ndarray] = {}
    for name in sorted(state):
        if name in ignore or any(name.endswith("." + i) for i in ignore):
            continue
        arr = np.asarray(state[name])
        key = name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) \
            else name
        parts = key.split(".")
        leaf, path = parts[-1], parts[:-1]
        leaves = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",)}.get(leaf)
        if leaves is None:
            raise CheckpointError(f"{where}: unexpected tensor '{name}' (shape "
                                  f"{tuple(arr.shape)}): a '{leaf}' is not a parameter we map")
        target = None
        for cand in _path_candidates(path):
            for lf in leaves:
                if f"{cand}/{lf}" in flat_e:
                    target = (f"{cand}/{lf}", lf)
                    break
            if target:
                break
        if target is None:
            raise CheckpointError(f"{where}: unexpected tensor '{name}' (shape "
                                  f"{tuple(arr.shape)}): the config does not describe it")
        fkey, lf = target
        shape = tuple(flat_e[fkey].shape)
        value = _to_kernel(arr, shape) if lf == "kernel" else (
            arr if tuple(arr.shape) == shape else None)
        if value is None:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {tuple(arr.shape)}, "
                                  f"which does not fit '{fkey}' of shape {shape}")
        if fkey in out:
            raise CheckpointError(f"{where}: tensors map twice onto '{fkey}' (second: "
                                  f"'{name}')")
        out[fkey] = value.astype(flat_e[fkey].dtype)
    missing = sorted(set(flat_e) - set(out))
    if missing:
        raise CheckpointError(f"{where}: missing tensor for '{missing[0]}' (shape "
                              f"{tuple(flat_e[missing[0]].shape)})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return traverse_util.unflatten_dict(out, sep="/")


def is_torch_sd_folder(folder: str) -> bool:
    """A diffusers PyTorch-layout Stable Diffusion folder: model_index.json and safetensors
    weights for the U-Net."""
    return (os.path.isfile(os.path.join(folder, "model_index.json"))
            and bool(glob.glob(os.path.join(folder, "unet", "*.safetensors"))))
