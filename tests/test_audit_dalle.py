"""The DALL-E mini audit end to end at the ``ci`` preset (``--target dalle-mini``): the same
pipeline, report schema and controls as the LDM audit, through the target protocol only.

Shares the session work dir with tests/test_audit.py, so the adversary's CLIP (trained on
the same auxiliary split) is reused.
"""

import json
import os

import pytest

from t2i_mia.report.writer import validate_report
from conftest import CI_MODELS, assert_no_alarm, assert_reads_chance, run_ci_audit

pytestmark = [pytest.mark.slow, CI_MODELS]


@pytest.fixture(scope="module")
def dalle_report(audit_dirs):
    tmp, work = audit_dirs
    # DalleBarts have no base: the calibrated attack needs a trained reference model
    return run_ci_audit(tmp, work, "dalle", ["adversary.n_reference=1",
                                             "adversary.base_reference=false"],
                        target='"dalle-mini"')


def test_dalle_audit_report_and_controls(dalle_report):
    report, out = dalle_report
    with open(os.path.join(out, "report.json")) as fh:
        on_disk = json.load(fh)
    validate_report(on_disk)
    assert on_disk["target"] == "dalle-mini"
    assert on_disk["n_eval"] == {"members": 64, "nonmembers": 128}
    assert set(on_disk["attacks"]) == {"pixel", "semantic", "faithfulness", "combined",
                                       "calibrated"}
    # the white-box reference for a seq2seq target is the image-token NLL
    assert "image-token NLL" in on_disk["white_box_reference"]["note"]
    for name in ("null_target", "shuffled_labels"):
        assert_reads_chance(on_disk["controls"][name], name)
    assert_no_alarm(on_disk["controls"]["null_target"])
    for f in ("report.md", "roc.png", "samples.png", "manifest.json"):
        assert os.path.isfile(os.path.join(out, f)), f


def test_dalle_pixel_attack_detects_members(dalle_report):
    """DalleBart memorises its members' image tokens at ci size: the pixel attack's AUC CI
    lies above chance while the null target's contains it (controls above)."""
    report, _ = dalle_report
    lo, _ = report["attacks"]["pixel"]["mlp"]["auc_ci"]
    assert lo > 0.5, report["attacks"]["pixel"]["mlp"]
