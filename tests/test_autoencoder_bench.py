"""bench/autoencoder.py: PSNR and the colour-and-shape probe on an autoencoder's
reconstructions, for the shipped set's autoencoder and for one trained by the command."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import autoencoder as A  # noqa: E402  (bench/autoencoder.py)

PROBE = ["--probe-train", "256", "--probe-steps", "5", "--probe-test", "64"]


def test_the_shipped_autoencoder_reads_as_its_components_json_says(tmp_path):
    from t2i_mia.targets import public as pub
    out = tmp_path / "ae.json"
    assert A.main(["--components", "package", "--work-dir", str(tmp_path / "w"),
                   "--out", str(out)] + PROBE) == 0
    doc = json.loads(out.read_text())
    shipped = pub.load_components(pub.PACKAGE).manifest["measured_on_heldout"]
    # the same held-out pool images through the same decoder as the pretrain command's
    assert doc["heldout_psnr_db"] == pytest.approx(shipped["autoencoder_psnr_db"], abs=0.05)
    assert doc["latent_shape"] == [8, 8, 8] and doc["n_heldout"] == 512
    r = doc["reconstructions"]
    assert set(r) >= {"found", "colour", "shape"} and all(0 <= r[k] <= 1 for k in r
                                                           if k in ("found", "colour", "shape"))


def test_trains_the_pretrain_commands_autoencoder_and_caches_it(tmp_path):
    argv = ["--config", "ci", "--work-dir", str(tmp_path / "w"), "--out",
            str(tmp_path / "ae.json"), "--set", "public.pool=64", "--set", "public.heldout=16",
            "--set", "ldm.vae.block_out_channels=[8,8,8]", "--set", "ldm.vae.latent_channels=2",
            "--set", "ldm.unet.in_channels=2", "--set", "ldm.unet.out_channels=2",
            "--set", "ldm.vae_train.steps=2", "--set", "ldm.vae_train.batch_size=8"] + PROBE
    assert A.main(argv) == 0
    doc = json.loads((tmp_path / "ae.json").read_text())
    assert doc["latent_shape"] == [8, 8, 2] and doc["n_heldout"] == 16
    assert doc["autoencoder"]["vae_train"]["steps"] == 2
    assert 0 < doc["heldout_psnr_db"] < 40
    # a second run loads the cached autoencoder: the same reconstructions, the same PSNR
    assert A.main(argv) == 0
    again = json.loads((tmp_path / "ae.json").read_text())
    assert again["heldout_psnr_db"] == doc["heldout_psnr_db"]
