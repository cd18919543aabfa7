"""FLOP counts from XLA's cost analysis, and peak dense rates per accelerator (for MFU).

Counting: ``jax.jit(f).lower(*args).compile().cost_analysis()["flops"]`` is XLA's count for
one call of the compiled program (``Lowered.cost_analysis()`` gives the same count before
optimisation, without compiling). XLA counts the body of a ``while`` loop (``lax.fori_loop``,
``lax.scan``, ``lax.while_loop``) ONCE, whatever its trip count, so a program holding an
S-step loop is under-counted by (S - 1) bodies. :func:`loop_flops` and
:func:`program_with_loop_flops` fix that up from the body's cost measured separately (jit the
body alone and count it).

The counts are what XLA executes (rematerialisation included, fused elementwise work
included), so "MFU" here is a hardware-FLOPs utilisation; for these models matmuls and
convolutions dominate and the difference is small.

Peak rates: dense (no 2:4 sparsity) bf16 and fp32 TFLOP/s per chip (one JAX device), from
the vendors' data sheets, keyed by ``jax.Device.device_kind``. fp32 on NVIDIA is the CUDA
core FP32 rate; note that XLA may run f32 matmuls as TF32 on Ampere and later (JAX's default
matmul precision), so an f32 "MFU" against it can exceed 1. TPUs publish no fp32 rate (the
MXU runs f32 matmuls as several bf16 passes): their fp32 entry is None.

CPU: a nominal fp32 peak from /proc/cpuinfo, :func:`cpu_peak_tflops`: usable vCPUs x 2 FMA
units x 8 fp32 lanes (256-bit AVX2) x 2 FLOP per FMA x the clock (cpufreq's maximum, else
cpuinfo's "cpu MHz"). It is a yardstick, not a guarantee: two vCPUs that are hyperthreads of
one core share its FMA units (the real peak is then half), and a CPU with two 512-bit FMA
units running AVX-512 code can do twice as much.
"""

from __future__ import annotations

import math
import re
from typing import Any

# device_kind -> (bf16 dense TFLOP/s, fp32 dense TFLOP/s or None)
PEAK_TFLOPS: dict[str, tuple[float, float | None]] = {
    # NVIDIA H100 SXM5 (device_kind of the 80 GB SXM part) and PCIe
    "NVIDIA H100 80GB HBM3": (989.4, 66.9),
    "NVIDIA H100 PCIe": (756.5, 51.2),
    "NVIDIA H100 NVL": (835.0, 60.0),
    # NVIDIA H200 SXM (same compute as H100 SXM) and NVL
    "NVIDIA H200": (989.4, 66.9),
    "NVIDIA H200 NVL": (835.0, 60.0),
    # NVIDIA A100 (SXM4 and PCIe have the same peak rates)
    "NVIDIA A100-SXM4-80GB": (312.0, 19.5),
    "NVIDIA A100-SXM4-40GB": (312.0, 19.5),
    "NVIDIA A100-PCIE-40GB": (312.0, 19.5),
    "NVIDIA A100 80GB PCIe": (312.0, 19.5),
    # Google TPUs, per chip (device_kind strings as JAX reports them)
    "TPU v4": (275.0, None),
    "TPU v5 lite": (197.0, None),   # v5e
    "TPU v5e": (197.0, None),
    "TPU v5": (459.0, None),        # v5p
    "TPU v5p": (459.0, None),
    "TPU v6 lite": (918.0, None),   # v6e (Trillium)
    "TPU v6e": (918.0, None),
}

# Fallbacks for device_kind spellings not in the table (first match wins).
_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"H200.*NVL", "NVIDIA H200 NVL"),
    (r"H200", "NVIDIA H200"),
    (r"H100.*NVL", "NVIDIA H100 NVL"),
    (r"H100.*(PCIe|PCIE)", "NVIDIA H100 PCIe"),
    (r"H100", "NVIDIA H100 80GB HBM3"),
    (r"A100", "NVIDIA A100-SXM4-80GB"),
    (r"TPU v6", "TPU v6 lite"),
    (r"TPU v5 ?(lite|e)", "TPU v5 lite"),
    (r"TPU v5", "TPU v5"),
    (r"TPU v4$", "TPU v4"),
)

_DTYPES = {"bfloat16": 0, "bf16": 0, "float32": 1, "fp32": 1, "f32": 1}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def cpu_peak_tflops(dtype: Any = "float32", cpuinfo: str | None = None,
                    n_cpus: int | None = None, max_khz: float | None = None
                    ) -> tuple[float | None, str | None]:
    """(nominal AVX2 fp32 peak TFLOP/s of this machine's usable vCPUs, None) or (None,
    reason). ``cpuinfo``/``n_cpus``/``max_khz`` default to /proc/cpuinfo, the affinity
    mask and cpufreq's ``cpuinfo_max_freq`` (given: for tests; ``max_khz=0``: unknown, use
    cpuinfo's "cpu MHz")."""
    if _dtype_index(dtype) != 1:
        return None, "no bf16 peak for CPU (no native bf16 FMA assumed)"
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    if not text:
        return None, "no /proc/cpuinfo to read the CPU's vector units and clock from"
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) \
        if re.search(r"^flags\s*:", text, re.M) else set()
    if not {"avx2", "fma"} <= flags:
        return None, "CPU without AVX2 + FMA: no nominal peak"
    if n_cpus is None:
        import os
        n_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    if max_khz is None:
        raw = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        max_khz = float(raw) if raw and raw.strip().isdigit() else None
    if max_khz:
        hz = max_khz * 1e3
    else:
        mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
        if not mhz:
            return None, "no clock in /proc/cpuinfo (cpu MHz) or cpufreq"
        hz = float(mhz.group(1)) * 1e6
    return n_cpus * 2 * 8 * 2 * hz / 1e12, None


def cost(obj: Any) -> dict[str, float]:
    """XLA's cost analysis of a ``jax.stages.Compiled`` or ``jax.stages.Lowered`` as one
    flat dict (``flops``, ``bytes accessed``, ...). Older JAX returned a list of one dict per
    program; it is merged here."""
    ca = obj.cost_analysis()
    if ca is None:
        return {}
    if isinstance(ca, (list, tuple)):
        merged: dict[str, float] = {}
        for d in ca:
            for k, v in (d or {}).items():
                merged[k] = merged.get(k, 0.0) + float(v)
        return merged
    return {k: float(v) for k, v in ca.items()}


def flops_of(obj: Any) -> float | None:
    """FLOPs of one call of a Compiled/Lowered program (a loop body counted once); None when
    the backend gives no count."""
    f = cost(obj).get("flops")
    return None if f is None or not math.isfinite(f) or f < 0 else float(f)


def jit_flops(fn, *args, compile: bool = False, **kwargs) -> float | None:
    """FLOPs of one call of ``jax.jit(fn)(*args, **kwargs)`` (args may be
    ``jax.ShapeDtypeStruct``). ``compile=False`` counts the lowered HLO (no compilation);
    ``compile=True`` the optimised program."""
    import jax
    lowered = jax.jit(fn).lower(*args, **kwargs)
    return flops_of(lowered.compile() if compile else lowered)


def loop_flops(body_flops: float, n_steps: int, outside_flops: float = 0.0) -> float:
    """FLOPs of a loop of ``n_steps`` bodies plus the work outside it."""
    if n_steps < 0:
        raise ValueError(f"loop_flops: n_steps must be >= 0, got {n_steps}")
    return float(outside_flops) + float(n_steps) * float(body_flops)


def program_with_loop_flops(program_flops: float, body_flops: float, n_steps: int) -> float:
    """True FLOPs of a program whose XLA count ``program_flops`` includes one ``n_steps``-trip
    loop counted once: add the ``n_steps - 1`` bodies XLA left out."""
    if n_steps < 1:
        raise ValueError(f"program_with_loop_flops: n_steps must be >= 1, got {n_steps}")
    return float(program_flops) + (n_steps - 1) * float(body_flops)


def _dtype_index(dtype: Any) -> int:
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    import numpy as np
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"peak rate: dtype {dtype!r} is not one of bfloat16/float32")
    return _DTYPES[name]


def lookup(device_kind: str) -> str | None:
    """The PEAK_TFLOPS key for a device_kind (exact, then by pattern), or None."""
    if device_kind in PEAK_TFLOPS:
        return device_kind
    for pattern, key in _PATTERNS:
        if re.search(pattern, device_kind):
            return key
    return None


def peak_tflops(platform: str, device_kind: str, dtype: Any) -> tuple[float | None, str | None]:
    """(peak dense TFLOP/s of one device, None) or (None, reason)."""
    if platform == "cpu":
        return cpu_peak_tflops(dtype)
    key = lookup(device_kind)
    if key is None:
        return None, f"no peak rate for device_kind {device_kind!r} in bench/flops.py"
    value = PEAK_TFLOPS[key][_dtype_index(dtype)]
    if value is None:
        return None, f"{key} publishes no fp32 peak (f32 matmuls run as bf16 passes)"
    return value, None


def utilization(flops: float | None, seconds: float | None, platform: str, device_kind: str,
                dtype: Any, n_devices: int = 1) -> dict[str, tuple[float | None, str | None]]:
    """``{"tflops_per_s": (v, reason), "mfu": (v, reason)}`` for ``flops`` done in
    ``seconds`` on ``n_devices`` devices of one kind."""
    if flops is None:
        why = "XLA gave no FLOP count on this backend"
        return {"tflops_per_s": (None, why), "mfu": (None, why)}
    if not seconds or seconds <= 0:
        why = "no steady-state time measured"
        return {"tflops_per_s": (None, why), "mfu": (None, why)}
    achieved = flops / seconds / 1e12
    peak, why = peak_tflops(platform, device_kind, dtype)
    mfu = (achieved / (peak * n_devices), None) if peak else (None, why)
    return {"tflops_per_s": (achieved, None), "mfu": mfu}
