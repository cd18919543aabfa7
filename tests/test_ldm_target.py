"""The LDM target: sharded sampling == single-device sampling, batch-size invariance,
the generations target, and the train/generate entry points' layout round trip."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t2i_mia.config import DiffusionSampleConfig, get_config
from t2i_mia.errors import DataError
from t2i_mia.models import autoencoder_kl, schedulers, unet as unet_lib
from t2i_mia.models.clip import CLIPTextConfig
from t2i_mia.models.ldm import LDMComponents
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.parallel.mesh import make_mesh
from t2i_mia.targets.generations import GenerationsTarget
from t2i_mia.targets.ldm import LDMTarget
from t2i_mia.training.ldm_train import init_text_encoder

CAPTIONS = ["a red circle on a gray background", "a small blue square left of a green ring",
            "a large yellow cross on a black background", "a purple triangle at the top left",
            "an orange diamond above a cyan circle"]


@pytest.fixture(scope="module")
def comps():
    """A randomly initialised LDM of the ci preset's architecture (sampling needs no training
    to test sharding and key handling)."""
    cfg = get_config("ci")
    vae_cfg = autoencoder_kl.AutoencoderKLConfig.from_dict(cfg.ldm.vae)
    unet_cfg = unet_lib.UNet2DConditionConfig.from_dict(cfg.ldm.unet)
    text_cfg = CLIPTextConfig.from_dict(cfg.ldm.text_encoder)
    tok = TextTokenizer.train(CAPTIONS * 4, vocab_size=cfg.ldm.vocab_size,
                              max_length=cfg.ldm.max_text_length)
    return LDMComponents(
        vae_cfg=vae_cfg, vae_params=autoencoder_kl.init_params(vae_cfg, jax.random.PRNGKey(0)),
        unet_cfg=unet_cfg,
        unet_params=unet_lib.init_params(unet_cfg, jax.random.PRNGKey(1),
                                         context_len=cfg.ldm.max_text_length),
        text_cfg=text_cfg,
        text_params=init_text_encoder(text_cfg, 2, cfg.ldm.max_text_length),
        tokenizer=tok,
        scheduler_cfg=schedulers.SchedulerConfig.from_dict(cfg.ldm.scheduler))


SAMPLE = DiffusionSampleConfig(num_inference_steps=4, guidance_scale=3.0, eta=0.5, batch_size=8)


def test_sharded_sampling_equals_single_device(comps):
    ids = [11, 3, 250, 7, 42]
    one = LDMTarget(comps, SAMPLE, seed=5, mesh=make_mesh(devices=jax.devices()[:1]))
    eight = LDMTarget(comps, SAMPLE, seed=5, mesh=make_mesh())
    assert len(jax.devices()) == 8
    a = np.asarray(one.generate(CAPTIONS, ids, 2, progress=False))
    b = np.asarray(eight.generate(CAPTIONS, ids, 2, progress=False))
    assert a.shape == (5, 2, 32, 32, 3) and a.dtype == np.uint8
    # Tolerance: the same float32 program partitioned over 8 devices may reduce in another
    # order (ulp-level differences); after rounding to uint8 a pixel can only flip by one
    # level at a .5 boundary, and almost none do.
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_model_axis_splits_the_unet_and_sampling_still_matches(comps):
    """On a 4 x 2 mesh the U-Net's large kernels are split over 'model' (each device holds
    half of every output-channel axis) and the images equal the single-device ones. The
    model-split convolutions sum their input channels per device then all-reduce: another
    float32 order, so the same one-level uint8 tolerance as for the data split holds."""
    ids = [11, 3, 250, 7, 42]
    one = LDMTarget(comps, SAMPLE, seed=5, mesh=make_mesh(devices=jax.devices()[:1]))
    split = LDMTarget(comps, SAMPLE, seed=5, mesh=make_mesh(data=4, model=2))
    conv = split.params["unet"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]  # 3x3x256x128
    assert conv.sharding.spec == P(None, None, None, "model")
    assert conv.addressable_shards[0].data.shape == conv.shape[:3] + (conv.shape[3] // 2,)
    assert split.param_shardings["unet"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"] == \
        conv.sharding
    a = np.asarray(one.generate(CAPTIONS, ids, 2, progress=False))
    b = np.asarray(split.generate(CAPTIONS, ids, 2, progress=False))
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert a.std() > 5  # not two blank images


def test_images_do_not_depend_on_batch_size_or_order(comps):
    mesh = make_mesh(devices=jax.devices()[:1])
    small = LDMTarget(comps, dataclasses.replace(SAMPLE, batch_size=2), seed=5, mesh=mesh)
    big = LDMTarget(comps, dataclasses.replace(SAMPLE, batch_size=16), seed=5, mesh=mesh)
    ids = [11, 3, 250, 7, 42]
    a = np.asarray(small.generate(CAPTIONS, ids, 3, progress=False))
    b = np.asarray(big.generate(CAPTIONS[::-1], ids[::-1], 3, progress=False))[::-1]
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    # ... but do depend on the id, the image index and the seed.
    assert not np.array_equal(a[0, 0], a[0, 1])
    other = LDMTarget(comps, SAMPLE, seed=6, mesh=mesh)
    c = np.asarray(other.generate(CAPTIONS[:1], ids[:1], 1, progress=False))
    assert not np.array_equal(a[0, 0], c[0, 0])


def test_sampler_compiles_once(comps):
    mesh = make_mesh(devices=jax.devices()[:1])
    t = LDMTarget(comps, dataclasses.replace(SAMPLE, batch_size=4), seed=0, mesh=mesh)
    t.generate(CAPTIONS, [1, 2, 3, 4, 5], 1, progress=False)
    t.generate(CAPTIONS[:3], [6, 7, 8], 2, progress=False)
    assert t._sample._cache_size() == 1


def test_white_box_loss_shape_and_determinism(comps):
    mesh = make_mesh(devices=jax.devices()[:1])
    t = LDMTarget(comps, SAMPLE, seed=0, mesh=mesh)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    a = t.white_box_loss(images, CAPTIONS[:3], [1, 2, 3], n_timesteps=3)
    b = t.white_box_loss(images, CAPTIONS[:3], [1, 2, 3], n_timesteps=3)
    assert a.shape == (3,) and np.all(np.isfinite(a)) and np.array_equal(a, b)


def _write_generations(root, ids, k, size):
    from t2i_mia.data.images import save_png
    rng = np.random.default_rng(0)
    for i in ids:
        (root / str(i)).mkdir(parents=True, exist_ok=True)
        for j in range(k):
            save_png(root / str(i) / f"{j}.png", rng.integers(0, 255, (size, size, 3),
                                                               dtype=np.uint8))


def test_generations_target(tmp_path):
    _write_generations(tmp_path, [4, 9], 2, 32)
    t = GenerationsTarget(str(tmp_path), 32)
    out = t.generate(["x", "y"], [4, 9], 2)
    assert out.shape == (2, 2, 32, 32, 3) and out.dtype == np.uint8
    with pytest.raises(DataError, match=r"9/2\.png"):
        t.generate(["y"], [9], 3)
    with pytest.raises(DataError, match=r"/5"):
        t.generate(["z"], [5], 1)
    with pytest.raises(DataError, match="expected 16x16"):
        GenerationsTarget(str(tmp_path), 16).generate(["x"], [4], 1)
    (tmp_path / "4" / "0.png").write_bytes(b"")
    with pytest.raises(DataError, match="zero-byte"):
        t.generate(["x"], [4], 1)
    (tmp_path / "4" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode"):
        t.generate(["x"], [4], 1)
    with pytest.raises(DataError, match="not found"):
        GenerationsTarget(str(tmp_path / "missing"), 32)


def test_timestep_sampling_power():
    from t2i_mia.training.ldm_train import sample_timesteps
    key = jax.random.PRNGKey(0)
    for power, high_share, mean in ((1.0, 0.10, 0.5), (3.0, 1 - 0.9 ** 3, 0.75)):
        t = np.asarray(sample_timesteps(key, 100_000, 1000, power))
        assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
        assert np.mean(t >= 900) == pytest.approx(high_share, abs=0.01)
        assert np.mean(t) / 1000 == pytest.approx(mean, abs=0.01)
