"""Public components: ``python -m t2i_mia.pretrain`` at ci size, then an audit built on its
components; the checks that guard them (file hashes, pool disjointness, config match); and
the set shipped in the package (pinned hashes and recipe, inside the wheel)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from t2i_mia import pretrain
from t2i_mia.adversary.encoder import train_or_load_encoder
from t2i_mia.config import load_config
from t2i_mia.data.splits import SplitSizes, make_splits
from t2i_mia.errors import CheckpointError, ConfigError, DataError
from t2i_mia.models.ldm import load_stable_diffusion
from t2i_mia.pipeline.audit import run_audit
from t2i_mia.parallel.mesh import make_mesh
from t2i_mia.pipeline.paths import RunPaths
from t2i_mia.targets import factory as factory_mod
from t2i_mia.targets import public as pub
from t2i_mia.targets.factory import ModelCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small models: compiling them is most of the test's time
MODELS = ["ldm.vae.block_out_channels=[8,8,8]", "ldm.unet.block_out_channels=[32,32]",
          "ldm.text_encoder.num_hidden_layers=1"]
PRETRAIN = MODELS + [
    "public.pool=64", "public.heldout=16",
    "ldm.vae_train.steps=2", "ldm.vae_train.batch_size=8",
    "ldm.base_train.steps=3", "ldm.base_train.batch_size=8", "ldm.base_train.warmup_steps=1",
    "adversary.encoder.train.steps=2", "adversary.encoder.train.batch_size=8",
    "adversary.encoder.train.warmup_steps=1", "adversary.encoder.ssl_views=autoencoder",
    "adversary.encoder.hard_negatives=base", "adversary.encoder.augmentation=coarse"]
AUDIT = MODELS + [
    "data.splits.pretrain=0", "data.splits.target_members=8",
    "data.splits.target_nonmembers=8", "data.splits.shadow_members=8",
    "data.splits.shadow_nonmembers=8", "data.splits.auxiliary=16",
    "ldm.train.steps=3", "ldm.train.batch_size=8", "ldm.train.warmup_steps=1",
    "ldm.sample.num_inference_steps=2", "ldm.sample.batch_size=16",
    "adversary.k=1", "adversary.n_reference=0", "adversary.n_bootstrap=50",
    "adversary.n_shuffles=2", "adversary.mlp.max_epochs=5"]

# The shipped set (t2i_mia/assets/public): the digest of its files and the command that
# made it. A change to any shipped file, or to what the recipe resolves to, fails here.
SHIPPED_SHA256 = "c4904f4a9b6a468e7aa6264e40c39561f334abdc9d9c08cd11cbaefa520b75fc"
SHIPPED_RECIPE = ["ldm.vae_train.steps=2400", "ldm.base_train.steps=2500",
                  "ldm.base_train.batch_size=64", "adversary.encoder.train.steps=8000"]


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    out = root / "components"
    argv = ["--config", "ci", "--work-dir", str(root / "work"), "--out", str(out)]
    for o in PRETRAIN:
        argv += ["--set", o]
    assert pretrain.main(argv) == 0
    return out


@pytest.mark.slow
def test_pretrain_then_an_audit_on_its_components(components, tmp_path):
    m = json.loads((components / pub.MANIFEST).read_text())
    assert m["contents"] == {"vae": True, "tokenizer": True, "encoder": True, "base": True}
    assert m["recipe"]["overrides"] == PRETRAIN and m["recipe"]["preset"] == "ci"
    assert m["files"] == pub.folder_files(str(components))
    assert m["sha256"] == pub.files_digest(m["files"])
    # the pool's hashes: the trained pool and the held-out images, all distinct scenes
    assert len(pub.read_pool_hashes(str(components / pub.POOL_HASHES))) == 64 + 16
    assert m["pool"]["seed"] == pub.POOL_SEED and m["pool"]["n"] == 64
    r = m["measured_on_heldout"]
    assert np.isfinite(r["autoencoder_psnr_db"]) and r["encoder_retrieval"]["n"] == 16
    assert r["encoder_reconstruction_retrieval"]["n"] == 16

    work = tmp_path / "work"
    # the base as the calibration reference (adversary.base_reference): nothing trained for it
    cfg = load_config("ci", AUDIT + [f"public.components={json.dumps(str(components))}",
                                     "adversary.base_reference=true"])
    rep = run_audit(cfg, RunPaths(work_dir=str(work), out=str(tmp_path / "out"),
                                  target_dir=None, data_dir=None), progress=False)
    assert rep["models"]["public_components"]["sha256"] == m["sha256"]
    assert rep["models"]["encoder"]["source"].startswith("public components")
    # nothing public was trained by the audit: only its own LDMs are in the cache
    made = sorted(d.split("-")[1] for d in os.listdir(work / "models"))
    assert made == ["shadow", "target"], made
    info = json.loads(next((work / "models").glob("ldm-target-*/cache.json")).read_text())
    assert info["fine_tuned_from"] == f"public-{m['sha256'][:16]}"
    assert info["public_components"] == m["sha256"]
    cal = rep["attacks"]["calibrated"]
    assert cal["reference_models"] == [{"name": "base", "split": f"public pool ({m['name']})",
                                        "n_members": 64, "members_sha256": m["pool"]["sha256"]}]
    assert "calibrated.pixel.mse.min" in cal["threshold"]
    # the target was built on the public autoencoder, bit for bit, and started from the base
    target = load_stable_diffusion(next((work / "models").glob("ldm-target-*")))
    vae_cfg, vae_params = pub.load_components(str(components)).vae()
    for a, b in zip(jax.tree.leaves(target.vae_params), jax.tree.leaves(vae_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    base = load_stable_diffusion(components / "base")
    gap = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
              zip(jax.tree.leaves(target.unet_params), jax.tree.leaves(base.unet_params)))
    assert 0.0 < gap < 0.05  # 3 Adam steps of lr <= 1e-3 from the base


def test_a_second_pretrain_reuses_every_part_and_writes_the_same_set(components, tmp_path,
                                                                      monkeypatch):
    """The work dir caches every part, the base's hard negatives included: a rerun (a resumed
    pretrain) generates and trains nothing and writes byte-identical components."""
    def refuse(*a, **k):
        raise AssertionError("the hard negatives were generated again")
    monkeypatch.setattr(pub, "base_generations", refuse)
    monkeypatch.setattr(factory_mod, "train_ldm", refuse)
    out = tmp_path / "again"
    argv = ["--config", "ci", "--work-dir", str(components.parent / "work"), "--out", str(out)]
    for o in PRETRAIN:
        argv += ["--set", o]
    assert pretrain.main(argv) == 0
    first = json.loads((components / pub.MANIFEST).read_text())
    again = json.loads((out / pub.MANIFEST).read_text())
    assert again["files"] == first["files"] and again["sha256"] == first["sha256"]


def test_an_encoder_on_reconstructions_needs_the_public_autoencoder(tmp_path):
    """ssl_views=autoencoder without the images' reconstructions (an audit training its own
    encoder with no public components) is an error that says what is missing."""
    cfg = load_config("ci", ["adversary.encoder.ssl_views=autoencoder"])
    images, captions = pub.public_pool(32, 8).get_many(list(range(8)))
    with pytest.raises(ConfigError, match="reconstructions through the public autoencoder"):
        train_or_load_encoder(cfg.adversary.encoder, images, captions, "h", 0,
                              ModelCache(str(tmp_path)), make_mesh(-1, 1))


def test_an_encoder_with_hard_negatives_needs_the_public_base(tmp_path):
    """hard_negatives=base without the base LDM's generations is an error that says what is
    missing, in the encoder's training and in pretrain without a base."""
    cfg = load_config("ci", ["adversary.encoder.hard_negatives=base"])
    images, captions = pub.public_pool(32, 8).get_many(list(range(8)))
    with pytest.raises(ConfigError, match="public base LDM's generations"):
        train_or_load_encoder(cfg.adversary.encoder, images, captions, "h", 0,
                              ModelCache(str(tmp_path)), make_mesh(-1, 1))
    argv = ["--config", "ci", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    for o in PRETRAIN[:-2] + ["ldm.base_train.steps=0", "adversary.encoder.hard_negatives=base"]:
        argv += ["--set", o]
    with pytest.raises(ConfigError, match="needs the base LDM"):
        pretrain.main(argv)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="hard_negatives"):
        load_config("ci", ["adversary.encoder.hard_negatives=generated"])
    with pytest.raises(ConfigError, match="augmentation"):
        load_config("ci", ["adversary.encoder.augmentation=strong"])


@pytest.mark.slow
def test_a_changed_or_missing_file_is_refused(components, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(components, bad)
    weights = bad / "encoder" / "flax_model.msgpack"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="encoder/flax_model.msgpack: SHA-256"):
        pub.load_components(str(bad))
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    pub.load_components(str(bad))  # restored
    (bad / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        pub.load_components(str(bad))
    with pytest.raises(CheckpointError, match="not a folder"):
        pub.load_components(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_config_must_match_the_components(components):
    c = pub.load_components(str(components))
    c.check_config(load_config("ci", MODELS))
    with pytest.raises(ConfigError, match="ldm.vae.*block_out_channels"):
        c.check_config(load_config("ci", MODELS[1:]))  # the ci autoencoder's own widths
    with pytest.raises(ConfigError, match="ldm.unet"):
        c.check_config(load_config("ci", [MODELS[0], MODELS[2]]))
    # without fine-tuning the base's shapes do not matter
    c.check_config(load_config("ci", [MODELS[0], MODELS[2], "public.fine_tune=false"]))


def test_an_audit_drawing_from_the_public_pool_is_refused():
    shipped = pub.load_components(pub.PACKAGE)
    sizes = SplitSizes(pretrain=0, target_members=4, target_nonmembers=4,
                       target_known_members=0, target_known_nonmembers=0, shadow_members=4,
                       shadow_nonmembers=4, auxiliary=4)
    clash = make_splits(pub.public_pool(32, 64), sizes, seed=0)
    with pytest.raises(DataError, match=r"20 examples are in the public pool .*target_members: 4"):
        shipped.check_disjoint(clash)
    from t2i_mia.data.synthetic import SyntheticCaptions
    shipped.check_disjoint(make_splits(SyntheticCaptions(seed=0, n=64), sizes, seed=0))


def test_the_shipped_components_are_pinned_and_fit_the_presets():
    c = pub.load_components(pub.PACKAGE)  # every file checked against components.json
    m = c.manifest
    assert m["recipe"]["preset"] == "tiny" and m["recipe"]["overrides"] == SHIPPED_RECIPE
    # the recipe is what the documented command resolves to today
    assert m["recipe"] == pretrain.recipe(load_config("tiny", SHIPPED_RECIPE), SHIPPED_RECIPE)
    assert c.digest == m["sha256"] == pub.files_digest(m["files"]) == SHIPPED_SHA256
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(c.folder)
               for f in fs)
    assert size <= 20 * 2 ** 20, size
    assert m["contents"] == {"vae": True, "tokenizer": True, "encoder": True, "base": True}
    assert m["pool"]["n"] == 8000 and len(c.pool_hashes) == 8000 + 512
    r = m["measured_on_heldout"]
    assert r["autoencoder_psnr_db"] >= 20.0, r
    assert r["encoder_retrieval"]["caption_match_at_1"] > 0.2, r
    # trained with the autoencoder's reconstructions as views, the encoder finds a held-out
    # image from its reconstruction (the plain image-image term's encoder: 0.28 among 256)
    assert r["encoder_reconstruction_retrieval"]["r_at_1"] >= 0.5, r
    assert m["recipe"]["encoder"]["ssl_views"] == "autoencoder"
    assert m["recipe"]["encoder"]["hard_negatives"] == "base"
    assert m["recipe"]["encoder"]["augmentation"] == "coarse"
    assert "hard_negatives" in m["timings_s"]
    for preset in ("ci", "tiny"):
        c.check_config(load_config(preset, ["public.components=package"]))


@pytest.mark.slow
def test_the_wheel_carries_the_shipped_components(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), ROOT], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("t2i_mia-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    files = json.loads(open(os.path.join(pub.PACKAGE_COMPONENTS, pub.MANIFEST)).read())["files"]
    for rel in list(files) + [pub.MANIFEST]:
        assert f"t2i_mia/assets/public/{rel}" in names, rel
