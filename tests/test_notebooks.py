"""The notebooks in notebooks/ run top to bottom at the ``ci`` preset (nbclient + ipykernel).

Parameters are injected by replacing the source of the cell tagged ``parameters`` with
assignments of every name that cell defines. The notebooks share the audit tests'
session work dir (``audit_dirs`` in conftest.py), so the quick start, which runs exactly
the ``ci`` preset, reuses the models tests/test_audit.py trained, and the other two reuse
the autoencoder, tokenizer and encoder (their split sizes keep ``pretrain`` and
``auxiliary`` at the ``ci`` preset's). The repository copies must have no outputs.
"""

import ast
import json
import os
import pathlib
import re
import time

import nbformat
import pytest

from t2i_mia.config import load_config
from t2i_mia.report.writer import validate_report
from conftest import CI_MODELS

NB_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("01_quickstart.ipynb", "02_audit_your_checkpoint.ipynb", "03_ablations.ipynb")
PNG = b"\x89PNG\r\n\x1a\n"

# The ablation notebook at ci: 32 members vs 32 non-members, 20 training steps at batch 16,
# 2-value grids. The splits sum to the ci preset's (896: the data set is the same) and
# `pretrain` and `auxiliary` keep their sizes, so they are the ci preset's splits and their
# models come from the cache.
ABLATION_CI = {
    "BASE_OVERRIDES": {
        "data.splits.target_members": 32, "data.splits.target_nonmembers": 32,
        "data.splits.target_known_members": 0, "data.splits.target_known_nonmembers": 256,
        "data.splits.shadow_members": 32, "data.splits.shadow_nonmembers": 32,
        "ldm.train.steps": 20, "ldm.train.batch_size": 16, "ldm.train.warmup_steps": 5,
        "adversary.white_box": False, "adversary.n_bootstrap": 50,
        "adversary.n_shuffles": 2, "adversary.n_reference": 0,
        "adversary.base_reference": False,
    },
    "TRAIN_SIZES": [16, 32],
    "TRAIN_STEPS": [10, 20],
    "KS": [1, 2],
    "AUX_SIZES": [16, 32],
    "CAPTION_SOURCES": ["ground_truth", "captioner"],
    "PLOT_ATTACKS": ["pixel", "semantic", "combined"],
}


def _parameters_cell(nb) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert tagged[0] is first_code, "the parameters cell must be the first code cell"
    return tagged[0]


def _assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def kernel_env(environ=None) -> dict:
    """The environment of a kernel that trains: this process's (JAX_PLATFORMS, the
    compilation cache), with one CPU device in place of conftest's 8 virtual ones, as on a
    Colab CPU runtime. With 8 devices on 2 shared cores, a kernel's sharded train step
    deadlocked in XLA's CPU runtime: 7 devices waited in the step's all-reduce while the
    8th's launch waited for a free slot behind them (no thread busy; the kernel died when
    the collective timeout fired). Sharded == unsharded is tested in the pytest process."""
    env = dict(os.environ if environ is None else environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join(flags.split() + ["--xla_force_host_platform_device_count=1"])
    return env


def test_kernel_env_has_one_device():
    env = kernel_env({"XLA_FLAGS": " --xla_force_host_platform_device_count=8 --xla_foo=1",
                      "JAX_PLATFORMS": "cpu"})
    assert env == {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=1",
                   "JAX_PLATFORMS": "cpu"}
    assert kernel_env({})["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"


def _execute(name: str, params: dict, cwd: pathlib.Path,
             one_device: bool = True) -> nbformat.NotebookNode:
    """Runs the notebook with ``params`` replacing its parameters cell; returns it executed
    (a failing cell raises nbclient's CellExecutionError with the cell's traceback).
    ``one_device`` False: the kernel keeps this process's 8 devices (:func:`kernel_env`)."""
    from nbclient import NotebookClient
    nb = nbformat.read(NB_DIR / name, as_version=4)
    cell = _parameters_cell(nb)
    # The injected cell replaces the notebook's: it must set every parameter, and only those.
    assert set(params) == _assigned_names(cell.source), (name, sorted(params))
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=3600, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute(
        env=kernel_env() if one_device else dict(os.environ))
    print(f"{name}: executed in {time.perf_counter() - t0:.0f} s")
    return nb


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _n_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb))


def _model_dirs(work: str) -> set[str]:
    d = os.path.join(work, "models")
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def _read_report(path) -> dict:
    with open(path) as f:
        report = json.load(f)
    validate_report(report)
    return report


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped_and_parameterised(name):
    """Committed without outputs; one tagged parameters cell selecting the preset and the
    folders; a Colab install cell that only runs on Colab."""
    nb = nbformat.read(NB_DIR / name, as_version=4)
    nbformat.validate(nb)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: cell {i} has outputs"
    params = _assigned_names(_parameters_cell(nb).source)
    assert {"PRESET", "WORK_DIR", "OUT_DIR"} <= params
    assert 'PRESET = "tiny"' in _parameters_cell(nb).source  # the users' default
    install = [c for c in nb.cells if c.cell_type == "code" and "pip install" in c.source]
    assert len(install) == 1 and '"google.colab" in sys.modules' in install[0].source


@pytest.mark.slow
@CI_MODELS
def test_quickstart_notebook(audit_dirs, ci_audit, tmp_path):
    """Runs the ci preset in a fresh kernel on the models the session's ci audit trained:
    the same config and seed give the same report numbers in another process."""
    tmp, work = audit_dirs
    before = _model_dirs(work)
    out = tmp_path / "out"
    # the same devices as this process, so that its report can equal the session audit's
    # bit for bit; it trains nothing (the models are cached), where 8 devices deadlocked
    nb = _execute("01_quickstart.ipynb", {"PRESET": "ci", "OVERRIDES": [], "WORK_DIR": work,
                                          "OUT_DIR": str(out)}, tmp_path, one_device=False)
    report = _read_report(out / "report.json")
    assert report["config"] == load_config("ci").to_dict()
    assert report["n_eval"] == {"members": 64, "nonmembers": 128}
    for f in ("report.md", "roc.png", "samples.png", "manifest.json"):
        assert (out / f).is_file(), f
    assert (out / "roc.png").read_bytes()[:8] == PNG
    base = _read_report(pathlib.Path(ci_audit[1]) / "report.json")
    assert report["manifest_sha256"] == base["manifest_sha256"]
    for key in ("attacks", "controls", "white_box_reference"):
        assert report[key] == base[key], key
    # shown in the notebook: the report table and both figures
    assert _n_images(nb) >= 2
    assert any("combined" in o.get("data", {}).get("text/markdown", "") for o in _outputs(nb))
    # With the ci models already cached (tests/test_audit.py ran first in this session, or a
    # warm $T2I_MIA_TEST_WORK), the quick start trains nothing new.
    kinds = ("ldm-target-", "ldm-shadow-") + (
        () if load_config("ci").public.components else ("vae-", "tokenizer-", "encoder-"))
    if all(any(d.startswith(k) for d in before) for k in kinds):
        assert _model_dirs(work) == before, sorted(_model_dirs(work) - before)


@pytest.mark.slow
@CI_MODELS
def test_audit_your_checkpoint_notebook(audit_dirs, tmp_path):
    """The walk-through with the new flags: demo member / non-member / aux manifests from the
    ci data, a checkpoint trained with train --members on a base model, a null target, and
    the partial-mode audit with --target-dir --members --nonmembers --aux --null-target-dir
    (the ci models come from the shared work dir)."""
    tmp, work = audit_dirs
    out = tmp_path / "out"
    nb = _execute("02_audit_your_checkpoint.ipynb",
                  {"PRESET": "ci", "OVERRIDES": ["adversary.white_box=false"], "WORK_DIR": work,
                   "OUT_DIR": str(out), "MEMBERS": None, "NONMEMBERS": None, "AUX": None,
                   "TARGET_DIR": None, "NULL_TARGET_DIR": None, "AUX_MODE": "partial"},
                  tmp_path)
    ckpt = out / "checkpoint"
    assert (ckpt / "model_index.json").is_file() and (ckpt / "members.json").is_file()
    report = _read_report(out / "report" / "report.json")
    assert report["target"] == f"ldm:{ckpt}"
    assert report["aux_mode"] == "partial"
    qs = report["query_sets"]
    assert qs["members"]["n"] == 64 and qs["nonmembers"]["n"] == 128
    assert report["n_eval"] == {"members": qs["members"]["n_evaluated"],
                                "nonmembers": qs["nonmembers"]["n_evaluated"]}
    assert report["models"]["null_target"] == str(out / "null")
    assert report["attacks"]["pixel"]["threshold"]["pixel.mse.min"]["auc"] > 0.5
    assert "blind baseline" in "".join(o.get("text", "") for o in _outputs(nb))
    for f in ("roc.png", "samples.png", "report.md", "scores.csv", "null_scores.csv"):
        assert (out / "report" / f).is_file(), f
    assert _n_images(nb) >= 3


@pytest.mark.slow
@CI_MODELS
def test_ablations_notebook(audit_dirs, tmp_path):
    tmp, work = audit_dirs
    before = _model_dirs(work)
    out = tmp_path / "out"
    nb = _execute("03_ablations.ipynb", {"PRESET": "ci", "WORK_DIR": work,
                                         "OUT_DIR": str(out), **ABLATION_CI}, tmp_path)
    assert (out / "ablations.png").read_bytes()[:8] == PNG
    assert _n_images(nb) >= 1
    with open(out / "ablations.json") as f:
        summary = json.load(f)
    grids = {"training-set size": "TRAIN_SIZES", "training steps": "TRAIN_STEPS",
             "generated images k": "KS", "auxiliary size": "AUX_SIZES",
             "caption source": "CAPTION_SOURCES"}
    assert set(summary["ablations"]) == set(grids)
    runs = set()
    for name, param in grids.items():
        abl = summary["ablations"][name]
        assert abl["values"] == ABLATION_CI[param]
        assert [r["value"] for r in abl["runs"]] == ABLATION_CI[param]
        for r in abl["runs"]:
            report = _read_report(r["report"])
            assert r["combined_auc"] == report["attacks"]["combined"]["mlp"]["auc"]
            runs.add(r["run"])
            cfg = report["config"]
            if name == "training-set size":
                assert cfg["data"]["splits"]["target_members"] == r["value"]
            elif name == "training steps":
                assert cfg["ldm"]["train"]["steps"] == r["value"]
            elif name == "generated images k":
                assert report["k"] == r["value"]
            elif name == "auxiliary size":
                assert report["n_attack_train"] == {"members": r["value"],
                                                    "nonmembers": r["value"]}
            else:
                assert report["caption_source"] == r["value"]
    # Every grid holds the base point, which ran once: 1 base + 1 other value per ablation.
    assert len(runs) == 6
    # New models: targets (16 members; 10 steps; base) and shadows (16; 10 steps; base).
    # The autoencoder, tokenizer and encoder are the ci preset's (cached by the quick start).
    new = _model_dirs(work) - before
    assert sum(d.startswith("ldm-target-") for d in new) <= 3
    assert sum(d.startswith("ldm-shadow-") for d in new) <= 3
    # (the public parts come from the shipped components, or from the cache when trained)
    if load_config("ci").public.components or any(d.startswith("encoder-") for d in before):
        assert not [d for d in new if not d.startswith(("ldm-target-", "ldm-shadow-"))], new
