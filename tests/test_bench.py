"""The benchmark suite (bench/): FLOP counting, the peak-rate table, and the JSON that
``bench/run.py --quick`` writes (structure and validity only: no timing assertions)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import flops as flops_lib  # noqa: E402  (bench/flops.py)

BENCHMARKS = {"ldm_train", "ddim", "dallebart_decode", "features", "mlp_vs_sklearn", "audit"}


def _bench_env() -> dict:
    """One CPU device, as a user would run the suite (the test session forces 8)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(args, timeout):
    return subprocess.run([sys.executable, str(BENCH / "run.py"), *args], cwd=ROOT,
                          env=_bench_env(), capture_output=True, text=True, timeout=timeout)


def _load_strict(path) -> dict:
    def no_constants(name):
        raise AssertionError(f"{path}: non-finite number {name} in the JSON")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=no_constants)


def _check_numbers(obj, where="$"):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), f"{where}: {obj}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_numbers(v, f"{where}[{i}]")
    else:
        raise AssertionError(f"{where}: unexpected JSON value {obj!r}")


def _check_doc(doc: dict, names: set[str]):
    for key in ("schema_version", "created_utc", "options", "machine", "backend",
                "device_count", "device_kind", "jax_version", "jaxlib_version", "benchmarks"):
        assert key in doc, f"missing top-level key {key}"
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["platform"]
    assert doc["device_count"] >= 1
    assert set(doc["benchmarks"]) == names
    _check_numbers(doc)
    for name, b in doc["benchmarks"].items():
        assert b["status"] in ("ok", "skipped"), f"{name}: {b['status']}: {b.get('reason')}"
        if b["status"] != "ok":
            assert isinstance(b.get("reason"), str) and b["reason"], name
        assert isinstance(b["config"], dict) and isinstance(b["figures"], dict)
        assert b["figures"], f"{name}: no figures"
        for fig_name, fig in b["figures"].items():
            assert isinstance(fig["unit"], str), f"{name}.{fig_name}"
            if fig["value"] is None:
                assert isinstance(fig.get("reason"), str) and fig["reason"], \
                    f"{name}.{fig_name}: null without a reason"
            else:
                assert isinstance(fig["value"], (int, float)), f"{name}.{fig_name}"


def _value(doc, bench, fig):
    return doc["benchmarks"][bench]["figures"][fig]["value"]


# ----------------------------------------------------------------------------- flops.py

def test_xla_counts_a_loop_body_once_and_loop_flops_corrects_it():
    import jax
    import jax.numpy as jnp

    x = jnp.ones((32, 32), jnp.float32)
    matmul = 2 * 32 ** 3
    body = flops_lib.jit_flops(lambda a: a @ a, x)
    assert body == pytest.approx(matmul, rel=1e-6)

    n = 7
    loop = jax.jit(lambda a: jax.lax.fori_loop(0, n, lambda i, y: y @ a, a))
    program = flops_lib.flops_of(loop.lower(x).compile())
    # XLA's count holds one body, not n: the reason loop_flops exists.
    assert program == pytest.approx(matmul, rel=0.01)
    assert flops_lib.program_with_loop_flops(program, body, n) == pytest.approx(n * matmul,
                                                                                rel=0.01)
    assert flops_lib.loop_flops(body, n, outside_flops=5.0) == n * matmul + 5.0
    with pytest.raises(ValueError):
        flops_lib.loop_flops(body, -1)


def test_peak_table_and_utilization():
    assert flops_lib.peak_tflops("gpu", "NVIDIA H100 80GB HBM3", "bfloat16") == (989.4, None)
    assert flops_lib.peak_tflops("gpu", "NVIDIA H200", "float32") == (66.9, None)
    assert flops_lib.peak_tflops("gpu", "NVIDIA A100-SXM4-40GB", "bfloat16")[0] == 312.0
    for kind, bf16 in (("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5p", 459.0),
                       ("TPU v6 lite", 918.0)):
        assert flops_lib.peak_tflops("tpu", kind, "bfloat16") == (bf16, None)
        value, reason = flops_lib.peak_tflops("tpu", kind, "float32")
        assert value is None and "fp32" in reason
    assert flops_lib.lookup("NVIDIA H100 PCIe") == "NVIDIA H100 PCIe"
    assert flops_lib.lookup("NVIDIA H100 SXM5 94GB") == "NVIDIA H100 80GB HBM3"
    assert flops_lib.peak_tflops("gpu", "Some Future GPU", "bfloat16")[0] is None

    u = flops_lib.utilization(2e12, 2.0, "gpu", "NVIDIA H100 80GB HBM3", "bfloat16")
    assert u["tflops_per_s"] == (1.0, None)
    assert u["mfu"][0] == pytest.approx(1.0 / 989.4)
    cpu = flops_lib.utilization(2e12, 2.0, "cpu", "cpu", "float32")
    assert cpu["tflops_per_s"] == (1.0, None)
    peak, why = flops_lib.cpu_peak_tflops("float32")
    assert (cpu["mfu"][0] == pytest.approx(1.0 / peak)) if peak else cpu["mfu"] == (None, why)
    # 2 vCPUs x 2 FMA x 8 lanes x 2 x 2.5 GHz = 0.16 TFLOP/s
    info = "processor\t: 0\nflags\t\t: sse avx avx2 fma\ncpu MHz\t\t: 2500.000\n"
    # max_khz=0: no cpufreq maximum known, so cpuinfo's "cpu MHz" is the clock
    assert flops_lib.cpu_peak_tflops("float32", info, 2, 0)[0] == pytest.approx(0.16)
    assert flops_lib.cpu_peak_tflops("float32", info, 2, 3.0e6)[0] == pytest.approx(0.192)
    assert flops_lib.cpu_peak_tflops("float32", info.replace(" avx2", ""), 2, 3e6)[0] is None
    assert flops_lib.cpu_peak_tflops("bfloat16", info, 2, 3e6)[0] is None
    assert flops_lib.utilization(None, 1.0, "cpu", "cpu", "float32")["mfu"][0] is None
    with pytest.raises(ValueError):
        flops_lib.peak_tflops("gpu", "NVIDIA H200", "int8")


# ----------------------------------------------------------------------------- run.py

def test_unknown_benchmark_is_a_usage_error():
    proc = _run(["--only", "ldm_train,nope"], timeout=120)
    assert proc.returncode == 2
    assert "nope" in proc.stderr


def test_audit_figures_from_a_report(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"config": {"preset": "tiny"}, "target": "ldm", "k": 4,
                                  "timings_s": {"data": 1.5, "generate": 12.25,
                                                "total": 20.0}}))
    out = tmp_path / "bench.json"
    proc = _run(["--quick", "--only", "audit", "--audit-report", str(report), "--json",
                 str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = _load_strict(out)
    _check_doc(doc, {"audit"})
    b = doc["benchmarks"]["audit"]
    assert b["status"] == "ok" and b["config"]["preset"] == "tiny"
    assert {k: f["value"] for k, f in b["figures"].items()} == {
        "data_s": 1.5, "generate_s": 12.25, "total_s": 20.0}


@pytest.mark.slow
def test_quick_suite_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["--quick", "--json", str(out)], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = _load_strict(out)
    _check_doc(doc, BENCHMARKS)
    assert doc["options"]["quick"] is True and doc["options"]["scale"] == "ci"
    assert "# summary" in proc.stdout  # the table

    for bench, figs in {
        "ldm_train": ("compile_s", "first_call_s", "steady_s", "examples_per_s",
                      "flops_per_step", "achieved_tflops_per_s", "mfu"),
        "ddim": ("one_jit_images_per_s", "python_loop_images_per_s",
                 "speedup_one_jit_vs_python_loop", "one_jit_compile_s",
                 "python_loop_first_call_s", "flops_per_image", "one_jit_mfu"),
        "dallebart_decode": ("kv_cache_64_tokens_per_s", "full_prefix_64_tokens_per_s",
                             "speedup_kv_cache_64", "flops_per_token_kv_cache_64",
                             "flop_ratio_full_prefix_vs_kv_cache_64"),
        "features": ("all_queries_per_s", "all_first_call_s", "pixel_only_queries_per_s"),
        "mlp_vs_sklearn": ("ours_fit_first_s", "ours_fit_s", "sklearn_fit_s", "ours_auc",
                           "sklearn_auc", "speedup_vs_sklearn_no_compile"),
    }.items():
        assert doc["benchmarks"][bench]["status"] == "ok"
        for fig in figs:
            assert fig in doc["benchmarks"][bench]["figures"], f"{bench}.{fig}"
        assert doc["benchmarks"][bench]["config"], bench

    if doc["backend"] == "cpu":  # on CPU the denominator is the nominal AVX2 fp32 peak
        fig = doc["benchmarks"]["ldm_train"]["figures"]["mfu"]
        peak, why = flops_lib.cpu_peak_tflops("float32")
        if peak is None:
            assert fig["value"] is None and fig["reason"] == why
        else:
            assert 0.0 < fig["value"] < 1.0, fig  # a fraction of what the CPU can do
    # the same work on both sides of each comparison
    m = doc["benchmarks"]["mlp_vs_sklearn"]
    assert _value(doc, "mlp_vs_sklearn", "ours_epochs_run") == m["config"]["epochs"]
    assert _value(doc, "mlp_vs_sklearn", "sklearn_epochs_run") == m["config"]["epochs"]
    for fig in ("ours_auc", "sklearn_auc"):
        assert 0.5 < _value(doc, "mlp_vs_sklearn", fig) <= 1.0  # the signal is learnable
    assert _value(doc, "ddim", "images_std_uint8") > 1.0  # not two blank images compared
    # the full-prefix decoder recomputes ~image_length tokens per step
    assert _value(doc, "dallebart_decode", "flop_ratio_full_prefix_vs_kv_cache_64") > 8
    audit = doc["benchmarks"]["audit"]
    assert audit["status"] == "skipped" and "--audit-report" in audit["reason"]
