"""The DALL-E mini audit end to end at the ``ci`` preset (``--target dalle-mini``): the same
pipeline, report schema and controls as the LDM audit, through the target protocol only.

Shares the session work dir with tests/test_audit.py, so the adversary's CLIP (trained on
the same auxiliary split) is reused.
"""

import json
import os

import pytest

from t2i_mia.cli import RunPaths
from t2i_mia.config import load_config
from t2i_mia.report.writer import validate_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dalle_report(audit_dirs):
    from t2i_mia.adversary.audit import run_audit
    tmp, work = audit_dirs
    cfg = load_config("ci", ["target=\"dalle-mini\""])
    out = os.path.join(tmp, "dalle")
    paths = RunPaths(work_dir=work, out=out, target_dir=None, data_dir=None)
    return run_audit(cfg, paths, progress=False), out


def test_dalle_audit_report_and_controls(dalle_report):
    report, out = dalle_report
    with open(os.path.join(out, "report.json")) as fh:
        on_disk = json.load(fh)
    validate_report(on_disk)
    assert on_disk["target"] == "dalle-mini"
    assert on_disk["n_eval"] == {"members": 128, "nonmembers": 128}
    assert set(on_disk["attacks"]) == {"pixel", "semantic", "faithfulness", "combined"}
    # the white-box reference for a seq2seq target is the image-token NLL
    assert "image-token NLL" in on_disk["white_box_reference"]["note"]
    for name in ("null_target", "shuffled_labels"):
        lo, hi = on_disk["controls"][name]["auc_ci"]
        assert lo <= 0.5 <= hi, (name, on_disk["controls"][name])
    for f in ("report.md", "roc.png", "samples.png", "manifest.json"):
        assert os.path.isfile(os.path.join(out, f)), f


def test_dalle_pixel_attack_detects_members(dalle_report):
    """DalleBart memorises its members' image tokens at ci size: the pixel attack's AUC CI
    lies above chance while the null target's contains it (controls above)."""
    report, _ = dalle_report
    lo, _ = report["attacks"]["pixel"]["mlp"]["auc_ci"]
    assert lo > 0.5, report["attacks"]["pixel"]["mlp"]
