"""Latent diffusion parts: KL autoencoder, U-Net, DDIM, Stable Diffusion folders."""

import dataclasses
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_parity, fixture_folders

from t2i_mia.errors import CheckpointError, ConfigError
from t2i_mia.models import autoencoder_kl as vae_mod
from t2i_mia.models import schedulers as sch
from t2i_mia.models import unet as unet_mod
from t2i_mia.models.formats import read_json, read_msgpack, write_msgpack

LDM_FOLDERS = fixture_folders("ldm")
REF_LDM = pathlib.Path(__file__).parent / "fixtures" / "reference" / "ldm"
needs_ldm = pytest.mark.skipif(not LDM_FOLDERS, reason="no ldm fixture folders")

nchw = lambda x: np.transpose(np.asarray(x), (0, 3, 1, 2))
nhwc = lambda x: jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))


@functools.lru_cache(maxsize=None)
def _unet(folder: str):
    cfg, params = unet_mod.load_unet(pathlib.Path(folder) / "unet")
    model = unet_mod.UNet2DConditionModel(cfg)
    return cfg, params, jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))


def _scheduler_cfg(folder: pathlib.Path) -> sch.SchedulerConfig:
    path = folder / "scheduler.json"
    if not path.exists():
        path = folder / "scheduler" / sch.SCHEDULER_CONFIG
    return sch.load_scheduler_config(path)


# --------------------------------------------------------------------------- parity


@pytest.mark.parity
@needs_ldm
@pytest.mark.parametrize("folder", LDM_FOLDERS, ids=str)
def test_unet_parity(folder):
    io = np.load(folder / "io.npz")
    _, params, apply = _unet(str(folder))
    out = apply(params, nhwc(io["unet_sample"]), jnp.asarray(io["unet_timesteps"]),
                jnp.asarray(io["encoder_hidden_states"]))
    err = float(np.max(np.abs(nchw(out) - io["unet_out"])))
    print(f"unet_out max abs err {err:.3g} (max |ref| {np.abs(io['unet_out']).max():.3g})")
    assert_parity(nchw(out), io["unet_out"], "unet_out")


@pytest.mark.parity
@needs_ldm
@pytest.mark.parametrize("folder", LDM_FOLDERS, ids=str)
def test_vae_parity(folder):
    io = np.load(folder / "io.npz")
    cfg, params = vae_mod.load_vae(folder / "vae")
    model = vae_mod.AutoencoderKL(cfg)
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(
        params, nhwc(io["vae_images_nchw"]))
    decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, mean)
    for name, got in (("vae_latent_mean", mean), ("vae_latent_logvar", logvar)):
        print(f"{name} max abs err {float(np.max(np.abs(np.asarray(got) - io[name]))):.3g}")
        assert_parity(got, io[name], name)
    print(f"vae_decoded max abs err {float(np.max(np.abs(nchw(decoded) - io['vae_decoded_nchw']))):.3g}")
    assert_parity(nchw(decoded), io["vae_decoded_nchw"], "vae_decoded_nchw")


@pytest.mark.parity
@needs_ldm
@pytest.mark.parametrize("folder", LDM_FOLDERS, ids=str)
def test_ddim_guided_parity(folder):
    io = np.load(folder / "io.npz")
    sc = _scheduler_cfg(folder)
    ref_ts = io["ddim_timesteps"]
    np.testing.assert_array_equal(sch.ddim_timesteps(sc, len(ref_ts)), ref_ts)
    cfg, params, _ = _unet(str(folder))
    model = unet_mod.UNet2DConditionModel(cfg)

    @jax.jit
    def run(p, lat, cond, uncond, g, ts):
        eps_fn = lambda x, t, c: model.apply({"params": p}, x, t, c)
        return sch.ddim_sample(eps_fn, sc, lat, cond, uncond, g, ts, eta=0.0)

    out = run(params, nhwc(io["unet_sample"]), jnp.asarray(io["encoder_hidden_states"]),
              jnp.asarray(io["uncond_hidden_states"]), jnp.asarray(io["ddim_guidance"]),
              jnp.asarray(ref_ts))
    ref = io["ddim_final_latents"]
    print(f"ddim_final_latents max abs err {float(np.max(np.abs(nchw(out) - ref))):.3g} "
          f"(max |ref| {np.abs(ref).max():.3g})")
    assert_parity(nchw(out), ref, "ddim_final_latents")


# --------------------------------------------------------------------------- configs


SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = dict(SD15_UNET, _diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20],
                 cross_attention_dim=1024, dual_cross_attention=False, num_class_embeds=None,
                 only_cross_attention=False, sample_size=96, upcast_attention=True,
                 use_linear_projection=True)
SD_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


def _n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_stable_diffusion_configs_load_with_public_parameter_counts():
    # published sizes: SD 1.x U-Net 859,520,964; SD 2.x U-Net 865,910,724; SD VAE 83,653,863
    sd15 = unet_mod.UNet2DConditionConfig.from_dict(SD15_UNET)
    sd21 = unet_mod.UNet2DConditionConfig.from_dict(SD21_UNET)
    assert sd15.heads == (8, 8, 8, 8) and sd21.heads == (5, 10, 20, 20)
    s15, s21 = unet_mod.param_shapes(sd15), unet_mod.param_shapes(sd21)
    assert _n_params(s15) == 859_520_964
    assert _n_params(s21) == 865_910_724
    assert s15["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (1, 1, 320, 320)
    assert s21["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (320, 320)
    assert s21["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (1024, 1280)
    assert _n_params(vae_mod.param_shapes(vae_mod.AutoencoderKLConfig.from_dict(SD_VAE))) == 83_653_863
    sc = sch.SchedulerConfig.from_dict(SD21_SCHEDULER)
    assert sc.prediction_type == "v_prediction"
    np.testing.assert_array_equal(sch.ddim_timesteps(sc, 4), [751, 501, 251, 1])


def test_num_attention_heads_sets_heads():
    cfg = unet_mod.UNet2DConditionConfig.from_dict(dict(SD15_UNET, num_attention_heads=[5, 10, 20, 20]))
    assert cfg.heads == (5, 10, 20, 20)


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["FooBlock", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("addition_embed_type", "text"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("only_cross_attention", True),
    ("norm_num_groups", 16),
    ("resnet_time_scale_shift", "scale_shift"),
    ("attention_head_dim", 7),
    ("some_new_key", 1),
])
def test_unet_config_rejects_what_we_do_not_implement(key, value):
    with pytest.raises(ConfigError, match=key) as e:
        unet_mod.UNet2DConditionConfig.from_dict(dict(SD15_UNET, **{key: value}), "unet/config.json")
    assert "unet/config.json" in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"] * 3),
    ("act_fn", "relu"),
    ("use_quant_conv", False),
    ("block_out_channels", [128, 256, 512, 500]),
])
def test_vae_config_rejects_what_we_do_not_implement(key, value):
    with pytest.raises(ConfigError, match=key):
        vae_mod.AutoencoderKLConfig.from_dict(dict(SD_VAE, **{key: value}), "vae/config.json")


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "sigmoid"), ("prediction_type", "flow"), ("timestep_spacing", "karras"),
    ("thresholding", True), ("trained_betas", [0.1, 0.2]), ("rescale_betas_zero_snr", True),
])
def test_scheduler_config_rejects_what_we_do_not_implement(key, value):
    with pytest.raises(ConfigError, match=key):
        sch.SchedulerConfig.from_dict(dict(SD21_SCHEDULER, **{key: value}))


def test_config_round_trip():
    for cls, d in ((unet_mod.UNet2DConditionConfig, SD21_UNET), (vae_mod.AutoencoderKLConfig, SD_VAE),
                   (sch.SchedulerConfig, SD21_SCHEDULER)):
        cfg = cls.from_dict(d)
        assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def unet_copy(tmp_path):
    dst = tmp_path / "unet"
    shutil.copytree(REF_LDM / "unet", dst)
    return dst


def test_unet_missing_tensor_is_named(unet_copy):
    path = unet_copy / unet_mod.UNET_WEIGHTS
    tree = read_msgpack(path)
    del tree["down_blocks_0"]["attentions_0"]["proj_in"]["bias"]
    write_msgpack(path, tree)
    with pytest.raises(CheckpointError, match="down_blocks_0/attentions_0/proj_in/bias") as e:
        unet_mod.load_unet(unet_copy)
    assert unet_mod.UNET_WEIGHTS in str(e.value) and "missing" in str(e.value)


def test_unet_wrong_shape_is_named(unet_copy):
    path = unet_copy / unet_mod.UNET_WEIGHTS
    tree = read_msgpack(path)
    tree["conv_out"]["kernel"] = np.zeros((3, 3, 32, 5), np.float32)
    write_msgpack(path, tree)
    with pytest.raises(CheckpointError, match=r"conv_out/kernel.*\(3, 3, 32, 5\)"):
        unet_mod.load_unet(unet_copy)


def test_unet_missing_file_is_named(unet_copy):
    (unet_copy / unet_mod.UNET_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="diffusion_flax_model.msgpack"):
        unet_mod.load_unet(unet_copy)


@pytest.mark.parametrize("key,value", [("down_block_types", ["FooBlock", "DownBlock2D"]),
                                       ("addition_embed_type", "text")])
def test_unet_folder_with_unsupported_config_value(unet_copy, key, value):
    cfg = read_json(unet_copy / "config.json")
    cfg[key] = value
    (unet_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"'{key}' = ") as e:
        unet_mod.load_unet(unet_copy)
    assert "config.json" in str(e.value) and repr(value) in str(e.value)


def test_vae_missing_tensor_is_named(tmp_path):
    dst = tmp_path / "vae"
    shutil.copytree(REF_LDM / "vae", dst)
    tree = read_msgpack(dst / vae_mod.VAE_WEIGHTS)
    del tree["decoder"]["mid_block"]["attentions_0"]["query"]
    write_msgpack(dst / vae_mod.VAE_WEIGHTS, tree)
    with pytest.raises(CheckpointError, match="decoder/mid_block/attentions_0/query/bias"):
        vae_mod.load_vae(dst)


# --------------------------------------------------------------------------- schedules


def test_ddim_timesteps_spacings():
    base = sch.SchedulerConfig(num_train_timesteps=1000)
    np.testing.assert_array_equal(sch.ddim_timesteps(base, 10), np.arange(900, -1, -100))
    trailing = sch.SchedulerConfig(timestep_spacing="trailing")
    np.testing.assert_array_equal(sch.ddim_timesteps(trailing, 10), np.arange(999, 0, -100))
    lin = sch.SchedulerConfig(timestep_spacing="linspace")
    np.testing.assert_array_equal(sch.ddim_timesteps(lin, 10), np.arange(999, -1, -111))
    assert sch.ddim_timesteps(base, 3).dtype == np.int32
    with pytest.raises(ConfigError, match="num_inference_steps"):
        sch.ddim_timesteps(base, 1001)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_matches_float64(schedule):
    cfg = sch.SchedulerConfig(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    T = cfg.num_train_timesteps
    if schedule == "linear":
        b = np.linspace(0.00085, 0.012, T)
    elif schedule == "scaled_linear":
        b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2
    else:
        ab = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        i = np.arange(T)
        b = np.minimum(1 - ab((i + 1) / T) / ab(i / T), 0.999)
    acp = np.asarray(sch.alphas_cumprod(cfg))
    assert acp.dtype == np.float32 and acp.shape == (T,)
    np.testing.assert_allclose(acp, np.cumprod(1 - b), rtol=2e-5, atol=1e-7)


def test_add_noise_and_velocity():
    acp = jnp.asarray([0.9, 0.5, 0.1], jnp.float32)
    x0 = jnp.ones((2, 2, 2, 1))
    noise = 2 * jnp.ones((2, 2, 2, 1))
    t = jnp.asarray([0, 2])
    xt = sch.add_noise(acp, x0, noise, t)
    np.testing.assert_allclose(xt[0], np.sqrt(0.9) + 2 * np.sqrt(0.1), rtol=1e-6)
    np.testing.assert_allclose(xt[1], np.sqrt(0.1) + 2 * np.sqrt(0.9), rtol=1e-6)
    v = sch.velocity(acp, x0, noise, t)
    np.testing.assert_allclose(v[1], np.sqrt(0.1) * 2 - np.sqrt(0.9), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_with_oracle_model_recovers_x0(prediction_type):
    # A model that knows x0 exactly makes deterministic DDIM land on x0 whatever the path.
    cfg = sch.SchedulerConfig(prediction_type=prediction_type, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=True)
    acp = sch.alphas_cumprod(cfg)
    x0 = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    ts = sch.ddim_timesteps(cfg, 8)
    xT = sch.add_noise(acp, x0, noise, jnp.full((2,), ts[0]))

    def oracle(x, t, ctx):
        a = acp[t][:, None, None, None]
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return sch.training_target(cfg, acp, x0, eps, t)

    ctx = jnp.zeros((2, 1, 1))
    out = sch.ddim_sample(oracle, cfg, xT, ctx, None, 1.0, ts)
    np.testing.assert_allclose(out, x0, atol=2e-4)


def test_guidance_combines_uncond_and_cond():
    # eps_fn returns the context's value everywhere: uncond 1, cond 3 -> guided eps 1 + g*2
    cfg = sch.SchedulerConfig(clip_sample=False, set_alpha_to_one=True)
    acp = sch.alphas_cumprod(cfg)
    ts = jnp.asarray([500], jnp.int32)  # one step: from t=500 straight to alpha 1
    eps_fn = lambda x, t, c: jnp.broadcast_to(c[:, :1, :1, None], x.shape)
    x = jnp.zeros((1, 2, 2, 1))
    out = sch.ddim_sample(eps_fn, cfg, x, jnp.full((1, 1, 1), 3.0), jnp.full((1, 1, 1), 1.0), 2.5, ts)
    a = float(acp[500])
    np.testing.assert_allclose(out, -np.sqrt(1 - a) * (1 + 2.5 * 2) / np.sqrt(a), rtol=1e-5)


# --------------------------------------------------------------------------- jit / randomness

TINY_UNET = unet_mod.UNet2DConditionConfig(
    sample_size=4, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 32), layers_per_block=1,
    attention_head_dim=2, cross_attention_dim=16)
TINY_VAE = vae_mod.AutoencoderKLConfig(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                       latent_channels=4, sample_size=8)


@pytest.fixture(scope="module")
def tiny_unet_params():
    return unet_mod.init_params(TINY_UNET, jax.random.key(0))


@pytest.fixture(scope="module")
def tiny_vae_params():
    return vae_mod.init_params(TINY_VAE, jax.random.key(0))


@pytest.fixture(scope="module")
def tiny_sampler(tiny_unet_params):
    params = tiny_unet_params
    model = unet_mod.UNet2DConditionModel(TINY_UNET)
    cfg = sch.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    traces = []

    @jax.jit
    def sample(params, latents, cond, uncond, g, ts, eta, keys):
        traces.append(1)  # runs only while tracing
        eps_fn = lambda x, t, c: model.apply({"params": params}, x, t, c)
        return sch.ddim_sample(eps_fn, cfg, latents, cond, uncond, g, ts, eta, keys)

    return params, cfg, sample, traces


def _inputs(seed, b):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (b, 4, 4, 4)), jax.random.normal(k[1], (b, 3, 16)),
            jax.random.normal(k[2], (b, 3, 16)))


def test_ddim_sampler_compiles_once(tiny_sampler):
    params, cfg, sample, traces = tiny_sampler
    ts = jnp.asarray(sch.ddim_timesteps(cfg, 4))
    n0 = len(traces)
    outs = []
    for seed in (1, 2):
        lat, cond, unc = _inputs(seed, 2)
        keys = jax.random.split(jax.random.key(seed + 10), 2)
        outs.append(sample(params, lat, cond, unc, jnp.float32(3.0 + seed), ts, jnp.float32(0.5), keys))
    assert len(traces) - n0 == 1
    assert sample._cache_size() == 1
    assert np.all(np.isfinite(outs[0])) and not np.allclose(outs[0], outs[1])


def test_ddim_eta_noise_does_not_depend_on_batch(tiny_sampler):
    params, cfg, sample, _ = tiny_sampler
    ts = jnp.asarray(sch.ddim_timesteps(cfg, 4))
    lat, cond, unc = _inputs(7, 3)
    keys = jax.random.split(jax.random.key(99), 3)
    g, eta = jnp.float32(2.0), jnp.float32(1.0)
    first = sample(params, lat[:2], cond[:2], unc[:2], g, ts, eta, keys[:2])
    # image 1 alone, and image 1 first in a batch with another image
    alone = sample(params, lat[1:2], cond[1:2], unc[1:2], g, ts, eta, keys[1:2])
    second = sample(params, lat[1:], cond[1:], unc[1:], g, ts, eta, keys[1:])
    np.testing.assert_allclose(alone[0], first[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second[0], first[1], rtol=1e-5, atol=1e-5)
    # the noise is really used: another key or eta 0 changes the image
    other = sample(params, lat[1:2], cond[1:2], unc[1:2], g, ts, eta, jax.random.split(jax.random.key(5), 1))
    det = sample(params, lat[1:2], cond[1:2], unc[1:2], g, ts, jnp.float32(0.0), keys[1:2])
    assert np.max(np.abs(other[0] - alone[0])) > 1e-2
    assert np.max(np.abs(det[0] - alone[0])) > 1e-2


def test_ddim_steps_in_a_python_loop_equal_the_fori_loop(tiny_sampler):
    # ddim_step is the sampler's loop body: bench/ and callers that step by hand use it
    params, cfg, sample, _ = tiny_sampler
    model = unet_mod.UNet2DConditionModel(TINY_UNET)
    eps_fn = lambda x, t, c: model.apply({"params": params}, x, t, c)
    ts = jnp.asarray(sch.ddim_timesteps(cfg, 4))
    lat, cond, unc = _inputs(3, 2)
    keys = jax.random.split(jax.random.key(4), 2)
    g, eta = jnp.float32(2.5), jnp.float32(0.7)
    want = sample(params, lat, cond, unc, g, ts, eta, keys)
    step = jax.jit(lambda x, i: sch.ddim_step(eps_fn, cfg, x, i, jnp.concatenate([unc, cond]),
                                              True, g, ts, eta, keys))
    x = lat
    for i in range(4):
        x = step(x, jnp.int32(i))
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(x) - np.asarray(lat))) > 1e-2  # the steps moved x


def test_ddim_requires_keys_when_eta_nonzero():
    cfg = sch.SchedulerConfig()
    x = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ConfigError, match="noise_keys"):
        sch.ddim_sample(lambda x, t, c: x, cfg, x, jnp.zeros((1, 1, 1)), None, 1.0,
                        jnp.asarray([1]), eta=0.5)


def test_unet_train_mode_uses_dropout(tiny_unet_params):
    cfg = dataclasses.replace(TINY_UNET, dropout=0.5)  # dropout has no parameters
    params = tiny_unet_params
    model = unet_mod.UNet2DConditionModel(cfg)
    x, c, _ = _inputs(3, 1)
    t = jnp.asarray([10])
    apply = jax.jit(lambda p, key, train: model.apply({"params": p}, x, t, c, train=train,
                                                     rngs={"dropout": key}), static_argnums=2)
    ev1 = apply(params, jax.random.key(1), False)
    ev2 = apply(params, jax.random.key(2), False)
    tr = apply(params, jax.random.key(1), True)
    np.testing.assert_array_equal(ev1, ev2)
    assert ev1.shape == x.shape and np.max(np.abs(tr - ev1)) > 1e-3


# --------------------------------------------------------------------------- VAE training loss



def test_vae_shapes_and_loss(tiny_vae_params):
    params = tiny_vae_params
    model = vae_mod.AutoencoderKL(TINY_VAE)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
    mean, logvar = jax.eval_shape(lambda p: model.apply({"params": p}, x, method="encode"), params)
    assert mean.shape == logvar.shape == (2, 4, 4, 4)
    decoded = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method="decode"), params, mean)
    assert decoded.shape == x.shape

    def loss_fn(p, kind, w):
        return vae_mod.vae_loss(TINY_VAE, p, x, jax.random.key(2), recon_loss=kind, kl_weight=w)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1)
    (l1, m1), grads = grad_fn(params, "l1", 0.1)
    np.testing.assert_allclose(l1, m1["recon"] + 0.1 * m1["kl"], rtol=1e-6)
    assert m1["kl"] > 0 and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    (_, m2), _ = grad_fn(params, "mse", 0.1)
    assert not np.isclose(m2["recon"], m1["recon"])
    # the reconstruction term is a plain L1 of the posterior-sample reconstruction
    recon, _, _ = jax.jit(lambda p: model.apply({"params": p}, x, jax.random.key(2)))(params)
    np.testing.assert_allclose(m1["recon"], jnp.mean(jnp.abs(recon - x)), rtol=1e-5)
    with pytest.raises(ConfigError, match="recon_loss"):
        loss_fn(params, "huber", 0.1)


def test_unet_and_vae_save_load_round_trip(tmp_path, tiny_unet_params, tiny_vae_params):
    up = tiny_unet_params
    unet_mod.save_unet(tmp_path / "unet", TINY_UNET, up)
    cfg, loaded = unet_mod.load_unet(tmp_path / "unet")
    assert cfg == TINY_UNET
    jax.tree.map(np.testing.assert_array_equal, up, loaded)
    vp = tiny_vae_params
    vae_mod.save_vae(tmp_path / "vae", TINY_VAE, vp)
    cfg, loaded = vae_mod.load_vae(tmp_path / "vae")
    assert cfg == TINY_VAE
    jax.tree.map(np.testing.assert_array_equal, vp, loaded)


# --------------------------------------------------------------------------- SD folders


@pytest.fixture(scope="module")
def tiny_components(tiny_unet_params, tiny_vae_params):
    from t2i_mia.models.clip import CLIPTextConfig, init_clip_text
    from t2i_mia.models.ldm import LDMComponents
    from t2i_mia.models.tokenizer import TextTokenizer

    tok = TextTokenizer.train(["a red square", "a blue circle on grass", "two dogs"], 300, 8)
    text_cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                              projection_dim=16, num_hidden_layers=1, num_attention_heads=2,
                              max_position_embeddings=8)
    sched = sch.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return LDMComponents(TINY_VAE, tiny_vae_params, TINY_UNET, tiny_unet_params, text_cfg,
                         init_clip_text(text_cfg, jax.random.key(5)), tok, sched)


def _assert_trees_equal(a, b):
    fa = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(a)[0]}
    fb = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(b)[0]}
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_stable_diffusion_folder_round_trip(tmp_path, tiny_components):
    from t2i_mia.models.ldm import load_stable_diffusion, save_stable_diffusion

    c = tiny_components
    save_stable_diffusion(tmp_path / "sd", c)
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_flax_model.msgpack",
                "vae/config.json", "vae/diffusion_flax_model.msgpack", "text_encoder/config.json",
                "text_encoder/flax_model.msgpack", "scheduler/scheduler_config.json"):
        assert (tmp_path / "sd" / rel).is_file(), rel
    assert not list((tmp_path / "sd").rglob("*.tmp"))
    back = load_stable_diffusion(tmp_path / "sd")
    assert (back.vae_cfg, back.unet_cfg, back.text_cfg, back.scheduler_cfg) == (
        c.vae_cfg, c.unet_cfg, c.text_cfg, c.scheduler_cfg)
    _assert_trees_equal(back.vae_params, c.vae_params)
    _assert_trees_equal(back.unet_params, c.unet_params)
    _assert_trees_equal(back.text_params, c.text_params)
    caps = ["a red dog", ""]
    for got, want in zip(back.tokenizer.encode(caps), c.tokenizer.encode(caps)):
        np.testing.assert_array_equal(got, want)


def test_stable_diffusion_folder_errors_name_the_file(tmp_path, tiny_components):
    from t2i_mia.models.ldm import load_stable_diffusion, save_stable_diffusion

    root = tmp_path / "sd"
    save_stable_diffusion(root, tiny_components)
    (root / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        load_stable_diffusion(root)
    save_stable_diffusion(root, tiny_components)
    index = read_json(root / "model_index.json")
    del index["unet"]
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model_index.json: no 'unet' entry"):
        load_stable_diffusion(root)
    save_stable_diffusion(root, tiny_components)
    tree = read_msgpack(root / "vae" / vae_mod.VAE_WEIGHTS)
    tree["post_quant_conv"]["kernel"] = np.zeros((1, 1, 4, 8), np.float32)
    write_msgpack(root / "vae" / vae_mod.VAE_WEIGHTS, tree)
    with pytest.raises(CheckpointError, match=r"vae/diffusion_flax_model.msgpack: tensor 'post_quant_conv/kernel'"):
        load_stable_diffusion(root)


def test_stable_diffusion_parts_must_fit(tmp_path, tiny_components):
    from t2i_mia.models.ldm import save_stable_diffusion

    wide = dataclasses.replace(tiny_components.text_cfg, hidden_size=32, num_attention_heads=2)
    bad = dataclasses.replace(tiny_components, text_cfg=wide)
    with pytest.raises(CheckpointError, match="cross_attention_dim = 16.*hidden_size = 32"):
        save_stable_diffusion(tmp_path / "sd", bad)


def test_attention_head_groups_rule(monkeypatch):
    monkeypatch.setattr(unet_mod, "_usable_cores", lambda: 2)
    big = unet_mod.CPU_SPLIT_MIN_PAIRS
    assert unet_mod.attention_groups(8, big, "cpu") == 2
    assert unet_mod.attention_groups(8, big - 1, "cpu") == 1   # short sequences: one block
    assert unet_mod.attention_groups(8, big, "gpu") == 1       # accelerators fuse it whole
    assert unet_mod.attention_groups(5, big, "cpu") == 1       # groups divide the heads
    monkeypatch.setattr(unet_mod, "_usable_cores", lambda: 16)
    assert unet_mod.attention_groups(12, big, "cpu") == 12


def test_attention_in_head_groups_equals_one_block(monkeypatch):
    """Splitting the heads across cores changes the schedule, not the numbers: a U-Net at
    32x32 latents (1024 tokens) is the same function, forward and gradient."""
    cfg = unet_mod.UNet2DConditionConfig.from_dict(dict(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
        attention_head_dim=4, cross_attention_dim=16))
    model = unet_mod.UNet2DConditionModel(cfg)
    params = unet_mod.init_params(cfg, jax.random.PRNGKey(0), context_len=5)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 4))
    t = jnp.array([10, 700])
    ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 16))

    traced = []  # attention blocks traced: one per group
    one_block = unet_mod._softmax_attend
    monkeypatch.setattr(unet_mod, "_softmax_attend",
                        lambda *a: traced.append(a[0].shape) or one_block(*a))

    def run(cores):
        monkeypatch.setattr(unet_mod, "_usable_cores", lambda: cores)
        traced.clear()
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, ctx) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params), list(traced)

    ((l1, g1), blocks1), ((l4, g4), blocks4) = run(1), run(4)
    if jax.default_backend() == "cpu":  # the 1024-token self-attentions ran in 4 head groups
        assert (2, 1, 1024, 8) in blocks4 and (2, 1, 1024, 8) not in blocks1
        assert len(blocks4) > len(blocks1)
    np.testing.assert_allclose(float(l4), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g4), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
