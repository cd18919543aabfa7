"""bench/credibility.py: the caption parser, the probe's figures, and the command on the ci
models (a probe that reads real images, chance against the wrong caption)."""

import json
import pathlib
import sys

import numpy as np
import pytest

from conftest import CI_MODELS

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import credibility as C  # noqa: E402  (bench/credibility.py)

RED_CIRCLE, BLUE_SQUARE = 0 * 6 + 0, 5 * 6 + 1


def test_named_objects_reads_colour_shape_pairs():
    assert C.named_objects("a small red circle left of a blue square on a gray background") \
        == [RED_CIRCLE, BLUE_SQUARE]
    assert C.named_objects("a red circle above a red circle on a navy background") \
        == [RED_CIRCLE]
    with pytest.raises(ValueError, match="names no"):
        C.named_objects("a gray background")


def test_found_rates_counts_named_objects_in_the_top_n():
    caps = ["a red circle left of a blue square on a gray background",
            "a large blue square at the top on a white background"]
    probs = np.zeros((2, 48), np.float32)
    probs[0, [RED_CIRCLE, BLUE_SQUARE]] = 0.9
    probs[1, RED_CIRCLE] = 0.9  # wrong object ranked first
    probs[1, BLUE_SQUARE] = 0.5
    r = C.found_rates(probs, caps)
    assert r["found"] == pytest.approx(2 / 3)
    assert r["colour"] == pytest.approx(2 / 3) and r["shape"] == pytest.approx(2 / 3)


def test_diversity_ratio_separates_noise_from_caption():
    rng = np.random.default_rng(0)
    same = np.repeat(rng.integers(0, 256, (8, 1, 4, 4, 3)), 3, axis=1).astype(np.uint8)
    assert C.diversity(same)["ratio"] == 0.0
    iid = rng.integers(0, 256, (8, 3, 4, 4, 3)).astype(np.uint8)
    assert 0.8 < C.diversity(iid)["ratio"] < 1.2


@pytest.mark.slow
@CI_MODELS
def test_command_on_the_ci_models(ci_audit, audit_dirs, tmp_path):
    """On the ci audit's cached models, with a short-trained probe: it names the colours of
    held-out real images (>= 90%) and finds their objects far above chance (2/48 = 4%),
    reads chance against the wrong caption, the autoencoder keeps the images (PSNR) and the
    figures are well-formed; trained on real images or on reconstructions (``--probe-on
    autoencoder``), it reads the colours of the autoencoder's reconstructions."""
    _, work = audit_dirs
    out = tmp_path / "cred.json"
    probe = ["--probe-train", "3000", "--probe-steps", "600", "--probe-test", "400",
             "--probe-file", str(tmp_path / "probe.msgpack")]
    assert C.main(["--config", "ci", "--work-dir", work, "--n", "48", "--k", "2", *probe,
                   "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["n_captions"] == 48 and doc["k"] == 2
    real = doc["probe"]["real_held_out"]
    assert real["colour"] >= 0.9 and real["found"] >= 0.15, real
    assert doc["probe"]["real_nonmembers"]["colour"] >= 0.85, doc["probe"]
    wrong = doc["generations_wrong_caption"]
    assert wrong["found"] <= 0.15 and wrong["colour"] <= 0.5, wrong
    assert doc["autoencoder"]["psnr_db"] >= 18.0, doc["autoencoder"]
    assert 0.0 <= doc["diversity"]["ratio"] <= 1.5
    for key in ("found", "colour", "shape"):
        assert 0.0 <= doc["generations"][key] <= 1.0
    assert doc["probe"]["trained_on"] == "real"

    # the members' captions, with the same (reused) probe: other captions, other images
    out_m = tmp_path / "cred_members.json"
    assert C.main(["--config", "ci", "--work-dir", work, "--n", "48", "--k", "2", *probe,
                   "--captions", "members", "--out", str(out_m)]) == 0
    mem = json.loads(out_m.read_text())
    assert (mem["captions"], doc["captions"]) == ("members", "nonmembers")
    assert mem["probe"]["real_held_out"] == real  # the probe file was reused
    assert mem["probe"]["real_members"]["colour"] >= 0.85
    assert mem["diversity"] != doc["diversity"]

    # a probe trained on the autoencoder's reconstructions reads reconstructions better
    # than the one trained on real images: the training images went through the decoder
    out_ae = tmp_path / "cred_ae.json"
    assert C.main(["--config", "ci", "--work-dir", work, "--n", "48", "--k", "2",
                   "--probe-train", "3000", "--probe-steps", "600", "--probe-test", "400",
                   "--probe-on", "autoencoder", "--out", str(out_ae)]) == 0
    ae = json.loads(out_ae.read_text())
    assert ae["probe"]["trained_on"] == "autoencoder"
    # the shipped 8-channel autoencoder keeps the colours: both probes read them in its
    # reconstructions (the earlier 4-channel one lost most: 0.44 for the real-image probe)
    on_recon = (ae["probe"]["reconstructed_held_out"]["colour"],
                doc["probe"]["reconstructed_held_out"]["colour"])
    assert min(on_recon) >= 0.9, on_recon
    assert ae["diversity"] == doc["diversity"]  # the same generations
