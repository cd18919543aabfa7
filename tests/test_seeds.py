"""``--seeds``: independent audits (new splits, models, shadows, references) into
OUT/seed_<s>/ and their summary. Plumbing only: a shrunken ci audit (small splits, a few
training steps), so the numbers are not the point; the files and their consistency are."""

import json
import subprocess
import sys

import numpy as np
import pytest

from t2i_mia import cli
from t2i_mia.errors import ConfigError
from t2i_mia.report.summary import summarise

SHRINK = ["data.splits.pretrain=64", "data.splits.target_members=16",
          "data.splits.target_nonmembers=32", "data.splits.shadow_members=16",
          "data.splits.shadow_nonmembers=32", "data.splits.auxiliary=64",
          "ldm.vae_train.steps=20", "ldm.train.steps=20", "adversary.encoder.train.steps=20",
          "adversary.white_box=false", "adversary.n_shuffles=2", "adversary.n_bootstrap=100",
          # a reference trained per seed (the ci preset's, the shared base, is one model)
          "adversary.n_reference=1", "adversary.base_reference=false"]


@pytest.mark.slow
def test_two_seeds_and_their_summary(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "t2i_mia.attack", "--config", "ci", "--seeds", "1,2",
           "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    for kv in SHRINK:
        cmd += ["--set", kv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((out / f"seed_{s}" / "report.json").read_text()) for s in (1, 2)]
    assert [rep["seeds"]["root"] for rep in reports] == [1, 2]
    # independent audits: other splits, so other members (and other reference models)
    assert reports[0]["manifest_sha256"] != reports[1]["manifest_sha256"]
    refs = [rep["attacks"]["calibrated"]["reference_models"][0]["members_sha256"]
            for rep in reports]
    assert refs[0] != refs[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1, 2]
    assert summary["reports"] == ["seed_1/report.json", "seed_2/report.json"]
    for attack in ("pixel", "semantic", "faithfulness", "combined"):
        aucs = [rep["attacks"][attack]["mlp"]["auc"] for rep in reports]
        st = summary["rows"][attack]["auc"]
        assert st["values"] == aucs
        assert st["mean"] == pytest.approx(np.mean(aucs))
        assert st["sd"] == pytest.approx(np.std(aucs, ddof=1))
        assert st["min"] == min(aucs) and st["max"] == max(aucs)
    assert "control.shuffled_labels" in summary["rows"]
    assert any(k.startswith("calibrated.") for k in summary["rows"])
    md = (out / "summary.md").read_text()
    assert "over 2 seeds" in md and "`combined`" in md


def test_seeds_flag_is_validated():
    assert cli.parse_seeds(None, None) is None
    assert cli.parse_seeds("0,1, 2", None) == [0, 1, 2]
    for bad in ("1,1", "a,b", "", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            cli.parse_seeds(bad, None)
    with pytest.raises(ConfigError, match="--seeds and --seed"):
        cli.parse_seeds("1,2", 3)


def test_summary_refuses_reports_of_different_configs():
    from test_report import _report
    a, _ = _report()
    b, _ = _report()
    del b["attacks"]["calibrated"]
    with pytest.raises(Exception, match="seed 2"):
        summarise([a, b], [1, 2], ["x", "y"])
    s = summarise([a, a], [1, 2], ["x", "y"])
    assert s["rows"]["pixel"]["auc"]["sd"] == 0.0
    assert s["rows"]["control.null_target"]["auc"]["mean"] == pytest.approx(
        a["controls"]["null_target"]["auc"])
