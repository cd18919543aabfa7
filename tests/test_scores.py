"""scores.csv / null_scores.csv: written with full precision, read back with clear errors,
and ``python -m t2i_mia.report`` recomputes the report from them alone."""

import json
import subprocess
import sys

import numpy as np
import pytest

from t2i_mia.adversary import evaluation as E
from t2i_mia.errors import DataError
from t2i_mia.report.scores import read_scores, report_from_scores, write_scores
from t2i_mia.report.writer import validate_report
from test_evaluation import _cfg, _sets

META = {"target": "ldm", "data": "synthetic", "k": 2, "caption_source": "ground_truth",
        "aux_mode": "shadow", "manifest_sha256": "ab" * 32, "seeds": {"root": 0, "attack": 0},
        "n_bootstrap": 200, "attack_seed": 0,
        "reference_models": [{"name": "reference_0", "split": "auxiliary", "n_members": 64,
                              "members_sha256": "cd" * 32}],
        "null_model": {"name": "shadow", "split": "shadow_members", "n_members": 64,
                       "members_sha256": "ef" * 32}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(5)
    fs = _sets(rng)
    ref = _sets(rng, signal=0.0)
    cal = E.FeatureSets(train=E.calibrate(fs.train, [ref.train]), train_labels=fs.train_labels,
                        eval=E.calibrate(fs.eval, [ref.eval]), eval_labels=fs.eval_labels,
                        null=E.calibrate(fs.null, [ref.eval]))
    sc = E.score_attacks(_cfg(n_shuffles=3), fs, seed=0, calibrated=cal)
    wb = (rng.normal(size=len(fs.train_labels)) + fs.train_labels,
          rng.normal(size=len(fs.eval_labels)) + fs.eval_labels)
    out = tmp_path_factory.mktemp("scores")
    ids_tr = list(range(1000, 1000 + len(fs.train_labels)))
    ids_ev = list(range(len(fs.eval_labels)))
    paths = write_scores(str(out), sc, ids_tr, ids_ev, META, white_box=wb)
    return sc, wb, out, paths


def test_round_trip_is_exact(written):
    sc, wb, out, paths = written
    assert set(paths) == {"scores", "null_scores"}
    back, meta, ids = read_scores(paths["scores"], paths["null_scores"])
    assert ids["attack_train"][0] == 1000 and ids["eval"][:3] == [0, 1, 2]
    for a in E.ATTACKS:
        for x, y in zip(sc.mlp[a], back.mlp[a]):
            np.testing.assert_array_equal(np.asarray(x, np.float64), y)
    assert sorted(back.features) == sorted(sc.features)
    np.testing.assert_array_equal(back.shuffled[2], np.asarray(sc.shuffled[2], np.float64))
    direct = E.evaluate_scores(sc, 200, 0)
    again = E.evaluate_scores(back, 200, 0)
    assert direct[0] == again[0] and direct[1] == again[1]
    report, curves = report_from_scores(back, meta)
    validate_report(report)
    assert report["attacks"]["calibrated"]["reference_models"] == META["reference_models"]
    assert report["white_box_reference"]["threshold"] == E.white_box_entry(
        wb[0], sc.train_labels, wb[1], sc.eval_labels, 200, 0)


def test_report_cli_from_scores_alone(written, tmp_path):
    sc, _, out, paths = written
    r = subprocess.run([sys.executable, "-m", "t2i_mia.report", "--scores", paths["scores"],
                        "--null-scores", paths["null_scores"], "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    attacks, controls, _ = E.evaluate_scores(sc, 200, 0)
    assert report["attacks"]["combined"]["mlp"]["auc"] == attacks["combined"]["mlp"]["auc"]
    assert report["controls"]["shuffled_labels"]["per_shuffle_auc"] == \
        controls["shuffled_labels"]["per_shuffle_auc"]
    assert (tmp_path / "r" / "roc.png").is_file()
    # without the null model's scores: every null block is absent, with its reason
    r = subprocess.run([sys.executable, "-m", "t2i_mia.report", "--scores", paths["scores"],
                        "--out", str(tmp_path / "r2")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert "--null-scores" in report["controls"]["null_target"]["absent"]
    assert report["attacks"]["pixel"]["mlp"]["null_target"]["auc"] is None
    assert "absent" in (tmp_path / "r2" / "report.md").read_text()


def test_bad_scores_files_are_clear_errors(written, tmp_path):
    _, _, out, paths = written
    text = open(paths["scores"]).read().splitlines()
    cases = {
        "no_header.csv": (text[1:], "line 1 must be"),
        "bad_number.csv": (text[:3] + [text[3].replace(text[3].split(",")[3], "abc", 1)]
                           + text[4:], r"line 4, column .*'abc' is not a number"),
        "short_row.csv": (text[:5] + [",".join(text[5].split(",")[:-1])] + text[6:],
                          "line 6 has"),
        "bad_set.csv": (text[:4] + [text[4].replace("attack_train", "holdout", 1)] + text[5:],
                        "set 'holdout'"),
    }
    for name, (lines, match) in cases.items():
        p = tmp_path / name
        p.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=match):
            read_scores(str(p))
    null = open(paths["null_scores"]).read().splitlines()
    p = tmp_path / "null_short.csv"
    p.write_text("\n".join(null[:-1]) + "\n")
    with pytest.raises(DataError, match="must score the evaluated ids"):
        read_scores(paths["scores"], str(p))
    r = subprocess.run([sys.executable, "-m", "t2i_mia.report", "--scores",
                        str(tmp_path / "no_header.csv"), "--out", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "line 1 must be" in r.stderr
    assert not (tmp_path / "none").exists()
