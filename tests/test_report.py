"""Report writer: schema validation, atomic files, markdown numbers, PNG figures."""

import copy
import json

import numpy as np
import pytest

from t2i_mia.adversary import metrics as M
from t2i_mia.adversary.evaluation import null_alarm
from t2i_mia.errors import DataError
from t2i_mia.report import plots
from t2i_mia.report.writer import format_table, validate_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _block(shift, seed, n=120, n_boot=50):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    s = rng.normal(size=2 * n) + shift * y
    s_tr = rng.normal(size=2 * n) + shift * y
    block = M.evaluate(s, (s > shift / 2).astype(int), y, n_boot=n_boot, seed=0,
                       train_scores=s_tr, train_labels=y)
    block["null_target"] = M.auc_block(rng.normal(size=2 * n), y, n_boot, 0)
    return block, (s, y)


def _report():
    attacks, curves = {}, {}
    for i, (name, feats) in enumerate([("pixel", ["pixel.mse.min", "pixel.ssim.max"]),
                                       ("semantic", ["semantic.cosine.max"]),
                                       ("faithfulness", ["faithfulness.clip.mean"]),
                                       ("combined", ["pixel.mse.min", "semantic.l2.mean"])]):
        mlp, (s, y) = _block(0.5 + i, seed=i)
        attacks[name] = {"mlp": mlp,
                         "threshold": {f: _block(0.3, seed=10 + j)[0] for j, f in enumerate(feats)}}
        fpr, tpr, _ = M.roc_curve(s, y)
        curves[name] = (fpr, tpr)
    attacks["calibrated"] = {
        "threshold": {"calibrated.pixel.mse.min": _block(0.8, seed=40)[0]},
        "reference_models": [{"name": "reference_0", "split": "auxiliary", "n_members": 64,
                              "members_sha256": "cd" * 32}]}
    null = {**attacks["combined"]["mlp"]["null_target"], **null_alarm(attacks),
            "model": {"name": "shadow", "split": "shadow_members", "n_members": 64,
                      "members_sha256": "ef" * 32}}
    shuf, _ = _block(0.0, seed=21)
    return {
        "target": "ldm", "data": "synthetic", "n_eval": {"members": 120, "nonmembers": 120},
        "k": 4, "caption_source": "ground_truth", "aux_mode": "shadow",
        "seeds": {"root": 0, "bootstrap": 0}, "config": {"preset": "ci", "adversary": {"k": 4}},
        "manifest_sha256": "ab" * 32, "timings_s": {"train_target": 12.5, "attack": np.float32(3.25)},
        "attacks": attacks,
        "controls": {"null_target": null,
                     "shuffled_labels": {"auc": shuf["auc"], "auc_ci": shuf["auc_ci"],
                                         "per_shuffle_auc": [0.45, 0.52, 0.55],
                                         "n_shuffles": 3}},
    }, curves


def _grid(m=3, k=2):
    rng = np.random.default_rng(0)
    return {"queries": rng.integers(0, 256, (m, 8, 8, 3), dtype=np.uint8),
            "generated": rng.integers(0, 256, (m, k, 8, 8, 3), dtype=np.uint8),
            "labels": np.array([1, 0, 1][:m]), "captions": ["a red square", "a blue circle " * 8,
                                                             "two dots"][:m]}


def test_write_report_files(tmp_path):
    report, curves = _report()
    wb = _block(2.0, seed=30)[0]
    report["white_box_reference"] = {"note": "uses the target's loss: outside the threat model",
                                     "threshold": wb}
    paths = write_report(tmp_path / "out", report, curves, _grid())
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "roc.png",
                                                     "samples.png"]
    assert paths["json"] == str(out / "report.json")
    loaded = json.loads((out / "report.json").read_text())
    validate_report(loaded)
    assert loaded["schema_version"] == 2
    assert loaded["timings_s"]["attack"] == 3.25  # numpy scalars became JSON numbers
    assert loaded["attacks"]["pixel"]["mlp"]["tpr_at_fpr_1e-3"] is None  # JSON null
    assert loaded["attacks"]["pixel"]["mlp"]["auc"] == report["attacks"]["pixel"]["mlp"]["auc"]
    for name in ("roc.png", "samples.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000

    md = (out / "report.md").read_text()
    sem = report["attacks"]["semantic"]["mlp"]
    assert f"{sem['auc']:.3f} [{sem['auc_ci'][0]:.3f}, {sem['auc_ci'][1]:.3f}]" in md
    assert f"{sem['balanced_accuracy']:.3f}" in md
    t = report["attacks"]["pixel"]["threshold"]["pixel.ssim.max"]
    tpr_cell = f"{t['tpr_at_fpr_1e-2']:.3f} [{t['tpr_at_fpr_1e-2_ci'][0]:.3f}, " \
               f"{t['tpr_at_fpr_1e-2_ci'][1]:.3f}]"
    assert f"| pixel | `pixel.ssim.max` | {t['auc']:.3f} [" in md and tpr_cell in md
    for text in ("ground_truth", "shadow", "120 members, 120 non-members", "root = 0",
                 "null_target", "shuffled_labels", "train_target", "12.50", "3.25", "n/a"):
        assert text in md, text

    # an extra top-level block with metrics is rendered, with its note
    assert f"| white_box_reference (threshold) | {wb['auc']:.3f} [" in md
    assert "outside the threat model" in md

    table = format_table(loaded)
    assert f"| combined | {report['attacks']['combined']['mlp']['auc']:.3f} [" in table
    assert "shuffled_labels" in table

    # rewriting replaces the files and leaves no temporary files
    write_report(out, report, curves, None)
    assert not list(out.glob("*.tmp"))


def test_invalid_report_writes_nothing(tmp_path):
    report, curves = _report()
    bad = copy.deepcopy(report)
    bad["attacks"]["pixel"]["mlp"]["auc"] = float("nan")
    with pytest.raises(DataError, match=r"attacks\.pixel\.mlp\.auc = nan"):
        write_report(tmp_path, bad, curves, None)
    assert list(tmp_path.iterdir()) == []

    # an existing complete report survives a failed rewrite untouched
    write_report(tmp_path, report, curves, None)
    before = (tmp_path / "report.json").read_bytes()
    bad_curves = {"pixel": (np.array([0.0, 0.5]), np.array([0.0]))}
    with pytest.raises(DataError, match="curve 'pixel'"):
        write_report(tmp_path, report, bad_curves, None)
    bad = copy.deepcopy(report)
    bad["timings_s"]["attack"] = np.inf
    with pytest.raises(DataError, match=r"timings_s\.attack = inf"):
        write_report(tmp_path, bad, curves, None)
    assert (tmp_path / "report.json").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_png_writer_failure_leaves_no_file(tmp_path, monkeypatch):
    report, curves = _report()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plots.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, report, curves, None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("manifest_sha256"), "missing key 'manifest_sha256'"),
    (lambda r: r["n_eval"].pop("nonmembers"), "missing key 'n_eval.nonmembers'"),
    (lambda r: r["attacks"]["semantic"]["mlp"].pop("tpr_at_fpr_1e-2_ci"),
     "missing key 'attacks.semantic.mlp.tpr_at_fpr_1e-2_ci'"),
    (lambda r: r["attacks"]["pixel"]["mlp"].update(auc_ci=[0.4]),
     r"'attacks.pixel.mlp.auc_ci' must be \[lo, hi\]"),
    (lambda r: r["attacks"]["pixel"]["mlp"].update(auc_ci=[0.9, 0.4]),
     r"'attacks.pixel.mlp.auc_ci' must be \[lo, hi\]"),
    (lambda r: r["attacks"]["pixel"]["mlp"].update(auc=None), "'attacks.pixel.mlp.auc' must be"),
    (lambda r: r["attacks"]["pixel"]["mlp"].update(acc=0.5), "unknown key 'attacks.pixel.mlp.acc'"),
    (lambda r: r["attacks"].update(texture=r["attacks"]["pixel"]), "unknown attack 'attacks.texture'"),
    (lambda r: r["attacks"]["pixel"]["threshold"].update(
        {"semantic.cosine.max": r["attacks"]["pixel"]["mlp"]}),
     "'attacks.pixel.threshold.semantic.cosine.max': feature names"),
    (lambda r: r["controls"].pop("null_target"), "missing key 'controls.null_target'"),
    (lambda r: r["controls"]["shuffled_labels"].pop("auc_ci"),
     "missing key 'controls.shuffled_labels.auc_ci'"),
    (lambda r: r.update(k=0), "'k' must be a positive integer"),
    (lambda r: r.update(seeds={"root": 1.5}), "'seeds.root' must be an integer"),
    (lambda r: r.update(schema_version=1), "'schema_version' must be 2"),
    (lambda r: r["attacks"]["pixel"]["mlp"].pop("null_target"),
     "missing key 'attacks.pixel.mlp.null_target'"),
    (lambda r: r["attacks"]["pixel"]["threshold"]["pixel.mse.min"].pop(
        "realised_fpr_at_heldout_threshold_1e-2"),
     "missing key 'attacks.pixel.threshold.pixel.mse.min.realised_fpr_at_heldout_threshold_1e-2'"),
    (lambda r: r["attacks"]["calibrated"]["threshold"].update(
        {"pixel.mse.min": r["attacks"]["pixel"]["mlp"]}),
     "'attacks.calibrated.threshold.pixel.mse.min': feature names"),
    (lambda r: r["attacks"]["calibrated"].pop("reference_models"),
     "missing key 'attacks.calibrated.reference_models'"),
    (lambda r: r["attacks"]["calibrated"].update(mlp={}), "unknown key 'attacks.calibrated.mlp'"),
    (lambda r: r["controls"]["null_target"].update(alarm="no"),
     "'controls.null_target.alarm' must be true or false"),
    (lambda r: r["controls"]["shuffled_labels"].update(per_shuffle_auc=[0.5]),
     "per_shuffle_auc' must list >= 2"),
    (lambda r: r.update(manifest_sha256="xyz"), "'manifest_sha256' must be 64"),
])
def test_validate_report_names_the_key(mutate, message):
    report, _ = _report()
    report["schema_version"] = 2
    validate_report(report)
    mutate(report)
    with pytest.raises(DataError, match=message):
        validate_report(report)


def test_plot_roc_handles_zero_rates(tmp_path):
    path = tmp_path / "roc.png"
    plots.plot_roc(path, {"perfect": ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0]),
                          "chance": ([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])})
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(DataError, match="outside"):
        plots.plot_roc(path, {"x": ([0.0, 2.0], [0.0, 1.0])})
    with pytest.raises(DataError, match="uint8"):
        g = _grid()
        plots.plot_samples(path, g["queries"].astype(np.float32), g["generated"], g["labels"],
                           g["captions"])


def test_typed_report_round_trips_and_validates():
    """report dict -> AuditReport (typed, validated) -> the same JSON object; a bad report is
    refused with the key named; absent blocks and extra top-level keys survive."""
    from t2i_mia.report.result import AuditReport, Entry
    report, _ = _report()
    report["schema_version"] = 2
    report["white_box_reference"] = {"note": "n", "feature": "f", "threshold": {"auc": 0.9}}
    report["custom"] = {"kept": True}
    clean = json.loads(json.dumps(report, default=float))
    typed = AuditReport.from_dict(report)  # numpy values are converted
    assert isinstance(typed.attacks["pixel"].mlp, Entry)
    assert typed.auc("pixel") == pytest.approx(clean["attacks"]["pixel"]["mlp"]["auc"])
    assert typed.attacks["pixel"].mlp.tpr_at_fpr_1e_2 == \
        clean["attacks"]["pixel"]["mlp"]["tpr_at_fpr_1e-2"]
    assert typed.attacks["calibrated"].reference_models[0].n_members == 64
    assert typed.controls.null_target.model.name == "shadow"
    assert typed.to_dict() == clean
    # nothing fitted: null MLP with its reason; an absent control keeps its null values
    none = copy.deepcopy(clean)
    none["attacks"]["pixel"] = {"mlp": None, "mlp_absent": "aux_mode none",
                                "threshold": none["attacks"]["pixel"]["threshold"]}
    none["controls"]["shuffled_labels"] = {"auc": None, "auc_ci": None, "per_shuffle_auc": [],
                                           "n_shuffles": 0, "absent": "nothing fitted"}
    back = AuditReport.from_dict(none)
    assert back.attacks["pixel"].mlp is None and back.auc("pixel") is None
    assert back.to_dict() == none
    bad = copy.deepcopy(clean)
    bad["attacks"]["pixel"]["mlp"].pop("auc_ci")
    with pytest.raises(DataError, match="attacks.pixel.mlp.auc_ci"):
        AuditReport.from_dict(bad)
