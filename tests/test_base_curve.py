"""bench/base_curve.py: the shipped base LDM trained further in cached rounds, each round
fine-tuned from the one before and measured with the credibility probe."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import base_curve as B  # noqa: E402  (bench/base_curve.py)

SMALL = ["--steps", "2", "--batch", "4", "--n", "4", "--k", "2", "--probe-train", "64",
         "--probe-steps", "5", "--probe-test", "16"]


def test_rounds_chain_from_the_shipped_base_and_resume_from_the_cache(tmp_path):
    from t2i_mia.targets import public as pub
    work, out = tmp_path / "w", tmp_path / "curve.json"
    argv = ["--work-dir", str(work), "--chunks", "2", "--out", str(out)] + SMALL
    assert B.main(argv) == 0
    doc = json.loads(out.read_text())
    shipped = pub.load_components(pub.PACKAGE)
    start = shipped.manifest["recipe"]["ldm"]["base_train"]["steps"]
    assert [r["base_steps"] for r in doc["rows"]] == [start, start + 2, start + 4]
    for row in doc["rows"]:
        for split in ("heldout", "train"):
            for probe in ("real", "autoencoder"):
                assert all(0.0 <= v <= 1.0 for v in row[split][probe].values())
        assert row["diversity"] > 0
    # round 1 starts from the shipped base, round 2 from round 1
    meta = {json.loads(p.read_text())["trained_on"]: json.loads(p.read_text())
            for p in (work / "models").glob("*/cache.json")}
    assert set(meta) == {"base-round1", "base-round2"}
    assert meta["base-round1"]["fine_tuned_from"] == f"public-{shipped.digest[:16]}"
    assert meta["base-round2"]["fine_tuned_from"] == meta["base-round1"]["key"]
    # a second run trains nothing and measures the same models the same way
    assert B.main(argv) == 0
    again = json.loads(out.read_text())
    assert [r["heldout"] for r in again["rows"]] == [r["heldout"] for r in doc["rows"]]
    assert [r["train"] for r in again["rows"]] == [r["train"] for r in doc["rows"]]


def test_more_captions_than_held_out_images_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--work-dir", str(tmp_path), "--n", "100000", "--chunks", "0"])
    assert e.value.code == 2
    assert "held-out pool images" in capsys.readouterr().err
