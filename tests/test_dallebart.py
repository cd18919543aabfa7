"""DalleBart: parity with dalle-mini fixtures, KV cache vs full prefix, batching, loading
(errors, use_scan stacks), training mode; dalle-mini text normalisation."""

import functools
import json
import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from conftest import REFERENCE, assert_parity, fixture_folders
from t2i_mia.errors import CheckpointError, ConfigError, DataError
from t2i_mia.models import dallebart as db
from t2i_mia.models.text_normalize import fit_token_ids, normalize_text

REF = REFERENCE / "dallebart"
MARGIN = 1e-5  # conventions: a reference token may differ only where its top-2 margin is below


@functools.lru_cache(maxsize=None)
def _load(folder):
    return db.load_dallebart(folder)


def _io(folder):
    return dict(np.load(folder / "io.npz"))


def _keys(n, seed=0):
    return jax.random.key_data(jax.random.split(jax.random.PRNGKey(seed), n))


def _check_tokens(ours, ref, path_logits, eos, name):
    """Tokens equal, except from the first position whose top-2 margin (of our logits
    teacher-forced along the reference path) is below MARGIN: a near-tie may go either way
    and everything after it legitimately differs."""
    lg = np.array(path_logits, np.float64)
    lg[..., eos] = -np.inf
    top2 = np.sort(lg, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]  # [B, T]: margin for token t + 1
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, name
    np.testing.assert_array_equal(ours[:, 0], ref[:, 0], err_msg=f"{name}: decoder start")
    # along the reference path our argmax is the reference token wherever the margin is clear
    clear = margin >= MARGIN
    np.testing.assert_array_equal(np.where(clear, lg.argmax(-1), -1),
                                  np.where(clear, ref[:, 1:], -1), err_msg=name)
    for b in range(ref.shape[0]):
        ties = np.flatnonzero(~clear[b])
        upto = 1 + (ties[0] if ties.size else ref.shape[1] - 1)
        np.testing.assert_array_equal(ours[b, :upto], ref[b, :upto], err_msg=f"{name} row {b}")


@pytest.mark.parity
@pytest.mark.parametrize("folder", fixture_folders("dallebart"), ids=lambda p: p.name)
def test_parity_teacher_forced_logits(folder):
    cfg, params = _load(str(folder))
    io = _io(folder)
    lg = db.logits(params, cfg, io["input_ids"], io["attention_mask"], io["decoder_input_ids"])
    assert lg.dtype == jnp.float32 and lg.shape[-1] == cfg.image_vocab_size + 1
    assert_parity(lg, io["logits"], "logits")


@pytest.mark.parity
@pytest.mark.parametrize("folder", fixture_folders("dallebart"), ids=lambda p: p.name)
def test_parity_greedy_tokens(folder):
    cfg, params = _load(str(folder))
    io = _io(folder)
    ref = io["greedy_tokens"]
    ours = db.generate(params, cfg, io["input_ids"], io["attention_mask"],
                       _keys(len(ref)), do_sample=False)
    assert ours.dtype == jnp.int32 and ours.shape == (len(ref), cfg.image_length + 1)
    path = db.logits(params, cfg, io["input_ids"], io["attention_mask"], ref[:, :-1])
    _check_tokens(ours, ref, path, cfg.eos_token_id, "greedy")


@pytest.mark.parity
@pytest.mark.parametrize("folder", fixture_folders("dallebart"), ids=lambda p: p.name)
def test_parity_top1_condition_scale_3(folder):
    cfg, params = _load(str(folder))
    io = _io(folder)
    ref = io["top1_tokens_condition_scale_3"]
    ours = db.generate(params, cfg, io["input_ids"], io["attention_mask"], _keys(len(ref)),
                       uncond_input_ids=io["uncond_input_ids"],
                       uncond_attention_mask=io["uncond_attention_mask"],
                       condition_scale=3.0, top_k=1)
    cond = db.logits(params, cfg, io["input_ids"], io["attention_mask"], ref[:, :-1])
    uncond = db.logits(params, cfg, io["uncond_input_ids"], io["uncond_attention_mask"],
                       ref[:, :-1])
    _check_tokens(ours, ref, uncond + 3.0 * (cond - uncond), cfg.eos_token_id, "cond_scale 3")


SAMPLING = dict(condition_scale=2.0, top_k=50, top_p=0.9, temperature=0.8)


def _sampling_inputs():
    io = _io(REF)
    return io, dict(uncond_input_ids=io["uncond_input_ids"],
                    uncond_attention_mask=io["uncond_attention_mask"], **SAMPLING)


def test_kv_cache_matches_full_prefix_recomputation():
    cfg, params = _load(str(REF))
    io, kw = _sampling_inputs()
    keys = _keys(2, seed=7)
    tok_c, lg_c = db.generate(params, cfg, io["input_ids"], io["attention_mask"], keys,
                              return_logits=True, **kw)
    tok_f, lg_f = db.generate_full_prefix(params, cfg, io["input_ids"], io["attention_mask"],
                                          keys, return_logits=True, **kw)
    np.testing.assert_array_equal(tok_c, tok_f)
    assert not np.all(np.asarray(tok_c)[:, 1:] == np.asarray(tok_c)[:, 1:2])  # really sampled
    # same arithmetic except the cached path also sums masked (zero) weights: ~1e-6
    lg_c, lg_f = np.asarray(lg_c), np.asarray(lg_f)
    finite = np.isfinite(lg_f)
    np.testing.assert_array_equal(finite, np.isfinite(lg_c))  # only eos is -inf
    assert finite.sum() == lg_f.size - lg_f.shape[0] * lg_f.shape[1]
    np.testing.assert_allclose(lg_c[finite], lg_f[finite], rtol=1e-5,
                               atol=1e-5 * np.abs(lg_f[finite]).max())
    # the returned logits are the guided ones: the teacher-forced model agrees
    cond = db.logits(params, cfg, io["input_ids"], io["attention_mask"], tok_c[:, :-1])
    unc = db.logits(params, cfg, io["uncond_input_ids"], io["uncond_attention_mask"],
                    tok_c[:, :-1])
    guided = np.asarray(unc + 2.0 * (cond - unc))
    np.testing.assert_allclose(lg_c[finite], guided[finite], rtol=1e-4,
                               atol=1e-5 * np.abs(guided).max())


def test_row_tokens_do_not_depend_on_batch():
    cfg, params = _load(str(REF))
    io, kw = _sampling_inputs()
    keys = _keys(2, seed=7)
    both = np.asarray(db.generate(params, cfg, io["input_ids"], io["attention_mask"], keys,
                                  **kw))
    for b in range(2):
        alone = db.generate(params, cfg, io["input_ids"][b:b + 1],
                            io["attention_mask"][b:b + 1], keys[b:b + 1],
                            **{**kw, "uncond_input_ids": io["uncond_input_ids"][:1],
                               "uncond_attention_mask": io["uncond_attention_mask"][:1]})
        np.testing.assert_array_equal(np.asarray(alone)[0], both[b], err_msg=f"row {b}")
    # other keys give other images
    other = np.asarray(db.generate(params, cfg, io["input_ids"], io["attention_mask"],
                                   _keys(2, seed=8), **kw))
    assert (other != both).any()


def test_generate_input_errors():
    cfg, params = _load(str(REF))
    io = _io(REF)
    ids, mask = io["input_ids"], io["attention_mask"]
    too_long = np.zeros((1, cfg.max_text_length + 1), np.int32)
    with pytest.raises(DataError, match=f"max_text_length = {cfg.max_text_length}"):
        db.generate(params, cfg, too_long, np.ones_like(too_long), _keys(1))
    with pytest.raises(DataError, match=r"uint32\[2, 2\]"):
        db.generate(params, cfg, ids, mask, _keys(3))
    with pytest.raises(DataError, match="uncond_input_ids"):
        db.generate(params, cfg, ids, mask, _keys(2), condition_scale=3.0)
    with pytest.raises(DataError, match="encoder_vocab_size"):
        db.generate(params, cfg, np.full_like(ids, cfg.encoder_vocab_size), mask, _keys(2))
    with pytest.raises(ConfigError, match="top_p"):
        db.generate(params, cfg, ids, mask, _keys(2), top_p=1.5)


def _copy_with(tmp_path, edit_params=None, edit_config=None):
    dst = tmp_path / "db"
    shutil.copytree(REF, dst)
    if edit_params:
        tree = serialization.msgpack_restore((dst / "flax_model.msgpack").read_bytes())
        tree = edit_params(tree)
        (dst / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_config_that_disagrees_with_tensors(tmp_path):
    folder = _copy_with(tmp_path, edit_config=lambda c: c.update(decoder_ffn_dim=96))
    with pytest.raises(CheckpointError,
                       match=r"'model/decoder/layers/FlaxBartDecoderLayer_0/GLU_0/\w+/\w+' "
                             r"has shape \(\d+(, \d+)?\), expected \(\d+(, \d+)?\)"):
        db.load_dallebart(folder)

    def drop(tree):
        flat = traverse_util.flatten_dict(tree, sep="/")
        del flat["lm_head/kernel"]
        return traverse_util.unflatten_dict(flat, sep="/")
    folder = _copy_with(tmp_path / "b", edit_params=drop)
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head/kernel'"):
        db.load_dallebart(folder)


@pytest.mark.parametrize("key,value", [
    ("use_glu", False), ("ln_positions", "swinv2"), ("use_bias", True),
    ("ln_type", "rmsnorm"), ("use_cosine_attention", True), ("sinkhorn_iters", 2),
    ("tie_word_embeddings", True), ("use_head_scale", True), ("activation_function", "smelu"),
    ("use_final_ln_decoder", False), ("min_length", 5), ("not_a_dallebart_key", 1)])
def test_unsupported_config_value(tmp_path, key, value):
    folder = _copy_with(tmp_path, edit_config=lambda c: c.update({key: value}))
    with pytest.raises(ConfigError, match=rf"'{key}' \(?= {re.escape(repr(value))}") as e:
        db.load_dallebart(folder)
    assert "config.json" in str(e.value)


def test_config_defaults_and_roundtrip():
    base = json.loads((REF / "config.json").read_text())
    cfg = db.DalleBartConfig.from_dict(base)
    assert db.DalleBartConfig.from_dict(cfg.to_dict()) == cfg
    small = db.DalleBartConfig(image_vocab_size=100, image_length=9)
    assert (small.bos_token_id, small.eos_token_id, small.pad_token_id,
            small.decoder_start_token_id) == (100,) * 4
    assert small.decoder_vocab_size == 101 and small.max_length == 10 and small.use_scan


def _stack_by_hand(params, cfg):
    """The use_scan layout, built independently of dallebart.stack_layers."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for part, single, n in (("encoder", "FlaxBartEncoderLayer", cfg.encoder_layers),
                            ("decoder", "FlaxBartDecoderLayer", cfg.decoder_layers)):
        rests = {k[4:] for k in flat if k[1] == part and k[2] == "layers"}
        for rest in rests:
            out[("model", part, "layers", single + "s") + rest] = np.stack(
                [flat[("model", part, "layers", f"{single}_{i}") + rest] for i in range(n)])
    for k, v in flat.items():
        if not (k[0] == "model" and k[2] == "layers"):
            out[k] = v
    return traverse_util.unflatten_dict(out)


def test_use_scan_checkpoints_are_unstacked(tmp_path):
    cfg, params = _load(str(REF))
    stacked = _stack_by_hand(params, cfg)
    assert stacked["model"]["encoder"]["layers"]["FlaxBartEncoderLayers"]["GLU_0"]["Dense_0"][
        "kernel"].shape == (cfg.encoder_layers, cfg.d_model, cfg.encoder_ffn_dim)
    folder = _copy_with(tmp_path, edit_params=lambda t: stacked,
                        edit_config=lambda c: c.update(use_scan=True))
    cfg2, params2 = db.load_dallebart(folder)
    assert cfg2.use_scan
    flat, flat2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], flat2[k], err_msg="/".join(k))

    # saving a use_scan config writes the stacked layout again, and it loads back
    db.save_dallebart(tmp_path / "saved", cfg2, params2)
    saved = serialization.msgpack_restore((tmp_path / "saved" / "flax_model.msgpack").read_bytes())
    assert set(saved["model"]["decoder"]["layers"]) == {"FlaxBartDecoderLayers"}
    _, params3 = db.load_dallebart(tmp_path / "saved")
    for k, v in traverse_util.flatten_dict(params3).items():
        np.testing.assert_array_equal(flat[k], v, err_msg="/".join(k))

    # a stack of the wrong depth is named
    def cut(tree):
        t = _stack_by_hand(params, cfg)
        layer = t["model"]["encoder"]["layers"]["FlaxBartEncoderLayers"]
        layer["LayerNorm_0"]["bias"] = layer["LayerNorm_0"]["bias"][:1]
        return t
    folder = _copy_with(tmp_path / "c", edit_params=cut,
                        edit_config=lambda c: c.update(use_scan=True))
    with pytest.raises(CheckpointError, match="FlaxBartEncoderLayers/LayerNorm_0/bias.*"
                                              "encoder_layers = 2"):
        db.load_dallebart(folder)


@pytest.mark.slow  # ~15-25 s of compile (remat + grad) on 2 cores
def test_training_mode_dropout_and_gradients():
    base = json.loads((REF / "config.json").read_text())
    cfg = db.DalleBartConfig.from_dict({**base, "dropout": 0.1, "attention_dropout": 0.1,
                                        "gradient_checkpointing": True})
    params = db.init_dallebart(cfg, jax.random.PRNGKey(1))
    _, ref_params = _load(str(REF))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref_params)
    io = _io(REF)
    train = db.DalleBart(cfg, deterministic=False)
    labels = jnp.asarray(io["decoder_input_ids"][:, 1:])

    @jax.jit
    def loss_grad(p, rng):
        def loss(p):
            lg = train.apply({"params": p}, io["input_ids"], io["attention_mask"],
                             io["decoder_input_ids"][:, :-1], rngs={"dropout": rng})
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), labels[..., None], -1))
        return jax.value_and_grad(loss)(p)

    l1, g = loss_grad(params, jax.random.PRNGKey(2))
    l2, _ = loss_grad(params, jax.random.PRNGKey(3))
    assert np.isfinite(float(l1)) and float(l1) != float(l2)  # dropout masks differ
    norms = [float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g)]
    assert all(np.isfinite(norms)) and min(norms) > 0  # every tensor receives gradient


# ----------------------------------------------------------------------------- text

@pytest.mark.parametrize("raw,expected", [
    ("Hello   World!!!", " hello world"),
    ("A café in Zürich — 3.5 km, 1,000,000 people &amp;amp; dogs",
     " a cafe in zurich, 3.5 km, 1000000 people & dogs"),
    ("don’t stop… I'm here 12/05/2021 http://x.com/a.jpg", " don't stop, i'm here 12/05/2021"),
    ("<person> and <person> at the park", " people at the park"),
    ("a photo of <person>", " a photo of a person"),
    ("cafÃ© “quoted” [12]", ' cafe " quoted "'),
    ("COOOOOL <b>bold</b> 50% off, well-known #SunsetBeach", " col bold 50 % off, well known sunsetbeach"),
    ("ＡＢＣ ﬁsh x² 😀", " abc fish x2, grinning face"),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_fit_token_ids_truncates_with_warning(caplog):
    ids, mask = fit_token_ids([0, 5, 6, 2], 6, eos_token_id=2, pad_token_id=1)
    assert ids.tolist() == [0, 5, 6, 2, 1, 1] and mask.tolist() == [1, 1, 1, 1, 0, 0]
    with caplog.at_level(logging.WARNING):
        ids, mask = fit_token_ids([0, 5, 6, 7, 8, 9, 2], 5, eos_token_id=2, pad_token_id=1,
                                  where="caption 17")
    assert ids.tolist() == [0, 5, 6, 7, 2] and mask.tolist() == [1] * 5
    assert "caption 17" in caplog.text and "truncated" in caplog.text
