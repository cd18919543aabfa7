"""Stable Diffusion in the PyTorch layout (diffusers/transformers ``save_pretrained`` with
safetensors): tokenizer ids, text encoder, VAE, U-Net and the whole guided DDIM pipeline
against the reference outputs of every ``sd_pt`` fixture folder, and clear errors for
folders we cannot read."""

import functools
import json
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_parity, fixture_folders

from t2i_mia.errors import CheckpointError, ConfigError
from t2i_mia.models import autoencoder_kl as vae_mod
from t2i_mia.models import schedulers as sch
from t2i_mia.models import unet as unet_mod
from t2i_mia.models.clip import CLIPTextModel
from t2i_mia.models.ldm import load_stable_diffusion
from t2i_mia.models.torch_format import read_safetensors

SD_PT = fixture_folders("sd_pt")
needs = pytest.mark.skipif(not SD_PT, reason="no sd_pt fixture folders")
ids = lambda p: p.name


def sd_pt_parity(test):
    """A parity test run once per sd_pt fixture folder (id: the folder's name)."""
    return pytest.mark.parity(needs(pytest.mark.parametrize("folder", SD_PT, ids=ids)(test)))


nchw = lambda x: np.transpose(np.asarray(x), (0, 3, 1, 2))
nhwc = lambda x: jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))


@functools.lru_cache(maxsize=None)
def _load(folder: str):
    return load_stable_diffusion(folder)


@sd_pt_parity
def test_sd_pt_tokenizer_ids(folder):
    io = np.load(folder / "io.npz")
    comps = _load(str(folder))
    got, mask = comps.tokenizer.encode([str(c) for c in io["captions"]])
    np.testing.assert_array_equal(got, io["input_ids"])
    np.testing.assert_array_equal(mask, io["attention_mask"])


@sd_pt_parity
def test_sd_pt_text_encoder(folder):
    io = np.load(folder / "io.npz")
    comps = _load(str(folder))
    hidden, pooled = jax.jit(CLIPTextModel(comps.text_cfg).apply)(
        comps.text_params, jnp.asarray(io["input_ids"], jnp.int32))
    assert_parity(hidden, io["text_hidden"], "text_hidden")
    assert_parity(pooled, io["text_pooled"], "text_pooled")


@sd_pt_parity
def test_sd_pt_vae(folder):
    io = np.load(folder / "io.npz")
    comps = _load(str(folder))
    model = vae_mod.AutoencoderKL(comps.vae_cfg)
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(
        comps.vae_params, nhwc(io["vae_in"]))
    assert_parity(nchw(mean), io["vae_mean"], "vae_mean")
    assert_parity(nchw(logvar), io["vae_logvar"], "vae_logvar")
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(
        comps.vae_params, nhwc(io["latents_in"]))
    assert_parity(nchw(dec), io["vae_decoded"], "vae_decoded")
    assert comps.vae_cfg.scaling_factor == pytest.approx(float(io["vae_scaling_factor"]))


@sd_pt_parity
def test_sd_pt_unet(folder):
    io = np.load(folder / "io.npz")
    comps = _load(str(folder))
    model = unet_mod.UNet2DConditionModel(comps.unet_cfg)
    out = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))(
        comps.unet_params, nhwc(io["unet_sample"]), jnp.asarray(io["unet_timesteps"]),
        jnp.asarray(io["unet_encoder_hidden"]))
    assert_parity(nchw(out), io["unet_out"], "unet_out")


@sd_pt_parity
def test_sd_pt_guided_ddim_pipeline(folder):
    """The whole pipeline from token ids: text encoder -> guided DDIM -> VAE decode."""
    io = np.load(folder / "io.npz")
    comps = _load(str(folder))
    sc = comps.scheduler_cfg
    n = int(io["pipe_num_inference_steps"])
    ts = sch.ddim_timesteps(sc, n)
    np.testing.assert_array_equal(ts, io["pipe_timesteps"])
    text = CLIPTextModel(comps.text_cfg)
    unet = unet_mod.UNet2DConditionModel(comps.unet_cfg)
    vae = vae_mod.AutoencoderKL(comps.vae_cfg)

    @jax.jit
    def run(tp, up, vp, ids_c, ids_u, lat, g, ts):
        cond = text.apply(tp, ids_c)[0]
        uncond = text.apply(tp, ids_u)[0]
        eps_fn = lambda x, t, c: unet.apply({"params": up}, x, t, c)
        final = sch.ddim_sample(eps_fn, sc, lat, cond, uncond, g, ts, eta=0.0)
        img = vae.apply({"params": vp}, final / comps.vae_cfg.scaling_factor, method="decode")
        return final, jnp.clip(img / 2 + 0.5, 0.0, 1.0)

    final, images = run(comps.text_params, comps.unet_params, comps.vae_params,
                        jnp.asarray(io["pipe_prompt_ids"], jnp.int32),
                        jnp.asarray(io["pipe_uncond_ids"], jnp.int32),
                        nhwc(io["pipe_latents"]), jnp.asarray(io["pipe_guidance_scale"]),
                        jnp.asarray(ts))
    assert_parity(nchw(final), io["pipe_final_latents"], "pipe_final_latents")
    assert_parity(images, io["pipe_images"], "pipe_images")


# --------------------------------------------------------------------------- bad folders


def _write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr, np.float32)
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [off, off + arr.nbytes]}
        blobs.append(arr.tobytes())
        off += arr.nbytes
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture
def sd_copy(tmp_path):
    if not SD_PT:
        pytest.skip("no sd_pt fixture folders")
    dst = tmp_path / "sd"
    shutil.copytree(SD_PT[0], dst)
    return dst


def _edit_unet(folder, edit):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = read_safetensors(str(path))
    edit(tensors)
    _write_safetensors(path, tensors)


def test_sd_pt_missing_extra_and_misshaped_tensors_are_named(sd_copy):
    _edit_unet(sd_copy, lambda t: t.pop("conv_in.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor for 'conv_in/bias'"):
        load_stable_diffusion(sd_copy)
    _edit_unet(sd_copy, lambda t: t.update({"conv_in.bias": np.zeros(32, np.float32),
                                            "extra_head.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'extra_head.weight'"):
        load_stable_diffusion(sd_copy)
    _edit_unet(sd_copy, lambda t: (t.pop("extra_head.weight"),
                                   t.update({"conv_in.bias": np.zeros(31, np.float32)})))
    with pytest.raises(CheckpointError, match=r"'conv_in.bias' has shape \(31,\)"):
        load_stable_diffusion(sd_copy)


def test_sd_pt_half_precision_tensors_load(sd_copy):
    """fp16 and bf16 safetensors (as most public checkpoints ship) upcast to float32."""
    path = sd_copy / "text_encoder" / "model.safetensors"
    tensors = read_safetensors(str(path))
    header, blobs, off = {}, [], 0
    for i, (name, arr) in enumerate(sorted(tensors.items())):
        if i % 2:
            raw = arr.astype(np.float16).tobytes()
            dt = "F16"
        else:
            raw = (arr.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            dt = "BF16"
        header[name] = {"dtype": dt, "shape": list(arr.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    path.unlink()
    with open(sd_copy / "text_encoder" / "model.fp16.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    comps = load_stable_diffusion(sd_copy)
    ref = _load(str(SD_PT[0])).text_params
    for a, b in zip(jax.tree.leaves(comps.text_params), jax.tree.leaves(ref)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-2)


def test_sd_pt_unsupported_unet_option_is_named(sd_copy):
    cfg_path = sd_copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["class_embed_type"] = "timestep"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="class_embed_type"):
        load_stable_diffusion(sd_copy)


def test_sd_pt_tokenizer_without_merges(sd_copy):
    (sd_copy / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="vocab.json \\+ merges.txt"):
        load_stable_diffusion(sd_copy)


def test_lora_only_and_single_file_checkpoints_say_what_to_convert(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    _write_safetensors(lora / "pytorch_lora_weights.safetensors",
                       {"unet.x.lora_A.weight": np.zeros((2, 2))})
    with pytest.raises(CheckpointError, match="LoRA weights only.*fuse_lora"):
        load_stable_diffusion(lora)
    single = tmp_path / "v1-5-pruned.safetensors"
    _write_safetensors(single, {"model.x": np.zeros(2)})
    with pytest.raises(CheckpointError, match="single-file checkpoint.*from_single_file"):
        load_stable_diffusion(single)
