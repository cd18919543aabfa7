"""VQGAN: parity with vqgan-jax fixtures, input/checkpoint errors, training loss."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization, traverse_util

from conftest import REFERENCE, assert_parity, fixture_folders
from t2i_mia.errors import CheckpointError, ConfigError, DataError
from t2i_mia.models import vqgan

REF = REFERENCE / "vqgan"
VQ = vqgan.VQModel


@functools.lru_cache(maxsize=None)
def _load(folder):
    return vqgan.load_vqgan(folder)


@pytest.mark.parity
@pytest.mark.parametrize("folder", fixture_folders("vqgan"), ids=lambda p: p.name)
def test_parity(folder):
    cfg, params = _load(str(folder))
    io = np.load(folder / "io.npz")
    quant, indices = vqgan.encode(params, cfg, io["pixel_values"])
    assert indices.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(indices), io["indices"])
    assert_parity(quant, io["quant_states"], "quant_states")
    decoded = vqgan.decode_code(params, cfg, io["indices"])
    assert_parity(decoded, io["decoded"], "decode_code")
    # decode(quant) is decode_code's second half
    again = VQ(cfg).apply({"params": params}, quant, method=VQ.decode)
    assert_parity(again, io["decoded"], "decode(quant_states)")


def test_image_sizes_it_cannot_tokenise():
    cfg, params = _load(str(REF))
    f = cfg.downsample_factor
    odd = cfg.resolution + 1  # f >= 2 for every VQGAN with more than one level
    with pytest.raises(DataError, match=rf"{odd}x{odd}.*multiples of {f}"):
        vqgan.encode(params, cfg, np.zeros((1, odd, odd, 3), np.float32))
    with pytest.raises(DataError, match=rf"{2 * f}x{f}.*square"):
        vqgan.encode(params, cfg, np.zeros((1, 2 * f, f, 3), np.float32))
    with pytest.raises(DataError, match=r"\[B, H, W, 3\]"):
        vqgan.encode(params, cfg, np.zeros((1, 32, 32, 1), np.float32))
    with pytest.raises(DataError, match="square token grid"):
        vqgan.decode_code(params, cfg, np.zeros((1, 10), np.int32))
    with pytest.raises(DataError, match=rf"\[0, {cfg.n_embed}\)"):
        vqgan.decode_code(params, cfg, np.full((1, 4), cfg.n_embed, np.int32))
    # another square size the encoder can tokenise works (attention follows the config)
    q, idx = vqgan.encode(params, cfg, np.zeros((1, 2 * f, 2 * f, 3), np.float32))
    assert q.shape == (1, 2, 2, cfg.embed_dim) and idx.shape == (1, 4)


def _copy_with(tmp_path, edit_params=None, edit_config=None):
    dst = tmp_path / "vq"
    shutil.copytree(REF, dst)
    if edit_params:
        tree = serialization.msgpack_restore((dst / "flax_model.msgpack").read_bytes())
        flat = traverse_util.flatten_dict(tree, sep="/")
        edit_params(flat)
        (dst / "flax_model.msgpack").write_bytes(
            serialization.msgpack_serialize(traverse_util.unflatten_dict(flat, sep="/")))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_tensor(tmp_path):
    folder = _copy_with(tmp_path, edit_params=lambda f: f.pop("decoder/conv_out/bias"))
    with pytest.raises(CheckpointError, match="missing tensor 'decoder/conv_out/bias'"):
        vqgan.load_vqgan(folder)


def test_wrong_shape(tmp_path):
    def shrink(flat):
        flat["quantize/embedding/embedding"] = flat["quantize/embedding/embedding"][:32]
    folder = _copy_with(tmp_path, edit_params=shrink)
    with pytest.raises(CheckpointError,
                       match=r"'quantize/embedding/embedding' has shape \(32, 16\), expected \(64, 16\)"):
        vqgan.load_vqgan(folder)
    # a config that does not describe the tensors is named the same way
    folder2 = _copy_with(tmp_path / "b", edit_config=lambda c: c.update(z_channels=32))
    with pytest.raises(CheckpointError, match=r"tensor '\w+/conv_(in|out)/kernel' has shape"):
        vqgan.load_vqgan(folder2)


def test_config_validation():
    base = json.loads((REF / "config.json").read_text())
    cfg = vqgan.VQGANConfig.from_dict(base, "x.json")
    assert vqgan.VQGANConfig.from_dict(cfg.to_dict()) == cfg
    for key, value, pattern in [("give_pre_end", True, "give_pre_end"),
                                ("ch", 48, "'ch' = 48"),
                                ("num_resolutions", 3, "num_resolutions"),
                                ("colour", 1, "colour")]:
        with pytest.raises(ConfigError, match=pattern) as e:
            vqgan.VQGANConfig.from_dict({**base, key: value}, "x.json")
        assert "x.json" in str(e.value)


def test_save_load_roundtrip(tmp_path):
    cfg, params = _load(str(REF))
    vqgan.save_vqgan(tmp_path / "out", cfg, params)
    cfg2, params2 = vqgan.load_vqgan(tmp_path / "out")
    assert cfg2 == cfg
    for (k, a), b in zip(traverse_util.flatten_dict(params).items(),
                         traverse_util.flatten_dict(params2).values()):
        np.testing.assert_array_equal(a, b, err_msg=str(k))


@pytest.mark.slow  # ~20 s of compile on 2 cores
def test_training_loss_straight_through_and_descent():
    cfg = vqgan.VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=8,
                            attn_resolutions=(), z_channels=8, embed_dim=8, n_embed=16)
    params = vqgan.init_vqgan(cfg, jax.random.PRNGKey(0))
    xs = jnp.linspace(-1, 1, 8)
    x = jnp.stack([jnp.sin(3 * xs[:, None] * s + xs[None, :]) for s in (0.5, 1.0, 2.0, 3.0)])
    x = jnp.repeat(x[..., None], 3, axis=-1) * jnp.array([1.0, 0.5, -0.5])
    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, state):
        (_, m), g = jax.value_and_grad(lambda p: vqgan.vqgan_loss(p, cfg, x), has_aux=True)(
            params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, m, g

    new_params, state, m, g = step(params, opt.init(params))
    for k in ("loss", "l1", "mse", "codebook", "commitment", "psnr", "perplexity"):
        assert np.isfinite(float(m[k])), k
    assert float(m["loss"]) == pytest.approx(
        float(m["l1"] + m["mse"] + m["codebook"] + 0.25 * m["commitment"]), rel=1e-6)
    # the straight-through estimator carries reconstruction gradients into the encoder;
    # the codebook learns from the codebook loss
    assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).max()) > 0
    assert float(jnp.abs(g["quantize"]["embedding"]["embedding"]).max()) > 0
    # forward value is decode(quantised latents)
    recon, aux = jax.jit(lambda p: VQ(cfg).apply({"params": p}, x))(params)
    direct = jax.jit(lambda p, z: VQ(cfg).apply({"params": p}, z, method=VQ.decode))(
        params, aux["z_q"])
    np.testing.assert_allclose(recon, direct, rtol=1e-5, atol=1e-5)

    first_mse = float(m["mse"])
    for _ in range(10):
        new_params, state, m, _ = step(new_params, state)
    assert float(m["mse"]) < 0.5 * first_mse
