"""Shared test set-up: 8 fake CPU devices (before JAX is imported), fixture discovery."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite compiles hundreds of small programs: LLVM at -O1 compiles the ci train steps
# faster (process total, 2 CPU cores: VAE 43 -> 29 s, U-Net + text encoder 71 -> 57 s) with
# steady step times within ~10%. Only the machine code's optimisation level changes.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
# The 8 virtual devices share 2 cores with the other xdist worker and the quickstart
# notebook's kernel (kernels that train get one device: tests/test_notebooks.py): a sharded
# program's collective can wait far longer than XLA's default 40 s for its slowest device.
# Waiting is what is wanted.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=1800"
                                " --xla_cpu_collective_call_warn_stuck_timeout_seconds=600")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import tempfile  # noqa: E402

# XLA's persistent compilation cache, shared by the suite's processes (inherited by notebook
# kernels and multi-host workers, which compile the same ci-preset programs again) and by
# later runs on the same machine. Compiled programs are keyed by their HLO, flags and
# devices, so a hit runs exactly what a fresh compile would.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(tempfile.gettempdir()) / "t2i_mia_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "reference"


def fixture_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("T2I_MIA_FIXTURES", REFERENCE))


def fixture_folders(kind: str) -> list[pathlib.Path]:
    """Every fixture folder of a kind under $T2I_MIA_FIXTURES (default: our copy).

    A folder's kind is read from its files: ``clip``/``dallebart``/``vqgan`` from
    ``config.json`` (``model_type``, or vqgan's ``ch_mult``); ``sd_pt`` (a diffusers PyTorch
    layout Stable Diffusion pipeline) from ``model_index.json`` + ``*.safetensors`` weights;
    ``ldm`` (our Flax-layout LDM fixtures) from ``unet/``+``vae/`` without those.
    """
    import json
    out = []
    root = fixture_root()
    for d in sorted(p for p in root.rglob("*") if p.is_dir()) + [root]:
        if not (d / "io.npz").exists():
            continue
        sd_pt = (d / "model_index.json").exists() and any((d / "unet").glob("*.safetensors"))
        if kind in ("ldm", "sd_pt"):
            if (d / "unet" / "config.json").exists() and (d / "vae" / "config.json").exists() \
                    and sd_pt == (kind == "sd_pt"):
                out.append(d)
            continue
        cfg_path = d / "config.json"
        if not cfg_path.exists():
            continue
        cfg = json.loads(cfg_path.read_text())
        k = cfg.get("model_type") or ("vqgan" if "ch_mult" in cfg else None)
        if k == kind:
            out.append(d)
    return out


def assert_parity(actual, ref, name: str = ""):
    """The conventions' tolerance: rtol=1e-4, atol=1e-5 * max|ref|."""
    import numpy as np
    actual = np.asarray(actual, np.float64)
    ref = np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, f"{name}: shape {actual.shape} != {ref.shape}"
    np.testing.assert_allclose(actual, ref, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(ref))),
                               err_msg=name)


# One clean run's control is checked at the 99.9% level, not at its 95% CI: a 95% CI
# excludes 0.5 in one clean run in twenty by construction (the false-alarm rate itself is
# tested over repeated trials in test_metrics.py), and the trained models' numbers move with
# a machine's float rounding, so a suite of a dozen such checks would fail every few runs.
CHANCE_Z = 3.29  # two-sided 99.9%


def assert_reads_chance(block, what: str = ""):
    """A control block ``{auc, auc_ci[, p_value]}`` of a clean pipeline is consistent with AUC
    0.5 at the 99.9% level: |AUC - 0.5| within 3.29/1.96 of its 95% CI's half-width on the
    side facing 0.5 (bootstrap intervals are not symmetric), and its p-value, where it has
    one, >= 1e-3. A leak of the size the controls are built to flag still fails it."""
    auc, (lo, hi) = block["auc"], block["auc_ci"]
    half = (auc - lo) if auc < 0.5 else (hi - auc)
    assert abs(auc - 0.5) <= CHANCE_Z / 1.96 * half, (what, block)
    if block.get("p_value") is not None:
        assert block["p_value"] >= 1e-3, (what, block)


def assert_no_alarm(null, what: str = "null_target"):
    """The null-target control of a clean pipeline: no Holm-adjusted p-value below 1e-3 (the
    report's alarm uses alpha 0.05, which a clean run crosses one time in twenty)."""
    p = [v["p_holm"] for v in null["per_attack"].values()]
    assert p and min(p) >= 1e-3, (what, null)


@pytest.fixture
def tmp_workdir(tmp_path):
    return tmp_path


# Every test that reads the ci models trained by ``ci_audit`` carries this mark: under
# pytest-xdist (``--dist loadgroup``, set in pyproject.toml) they all run in one worker, so
# the models are trained once per test run.
CI_MODELS = pytest.mark.xdist_group("ci_models")


@pytest.fixture(scope="session")
def audit_dirs(tmp_path_factory):
    """(outputs folder, work dir) shared by every test that runs an audit at the ``ci``
    preset (tests/test_audit*.py, tests/test_notebooks.py), so the models one trains are
    reused by the others. Outputs go to a temporary folder; models to a temporary work dir,
    or to $T2I_MIA_TEST_WORK when set (a developer's cache: reruns skip the training)."""
    root = tmp_path_factory.mktemp("audit")
    return str(root), os.environ.get("T2I_MIA_TEST_WORK", str(root / "work"))


def run_ci_audit(tmp: str, work: str, name: str, overrides=(), target_dir=None, target=None):
    """One audit at the ``ci`` preset (+ ``overrides``) into ``tmp/name``; models from ``work``.
    Returns (report dict, output folder)."""
    from t2i_mia.pipeline.audit import run_audit
    from t2i_mia.pipeline.paths import RunPaths
    from t2i_mia.config import load_config
    cfg = load_config("ci", list(overrides) + ([f"target={target}"] if target else []))
    out = os.path.join(tmp, name)
    paths = RunPaths(work_dir=work, out=out, target_dir=target_dir, data_dir=None)
    return run_audit(cfg, paths, progress=False), out


@pytest.fixture(scope="session")
def ci_audit(audit_dirs):
    """The ``ci`` preset's LDM audit, run once per test session: it trains (or reuses) the
    autoencoder, tokenizer, target, shadow and encoder that the audit variants, the
    memorisation test and the notebooks then load from the shared work dir."""
    tmp, work = audit_dirs
    return run_ci_audit(tmp, work, "base")
