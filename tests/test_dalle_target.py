"""DALL-E mini target: training (VQGAN restarts, resume), sharded vs single-device
generation, batch/order independence, folders, bad input, the audit's model builder."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t2i_mia.config import DalleSampleConfig, TrainConfig, get_config
from t2i_mia.data.synthetic import SyntheticCaptions
from t2i_mia.errors import ConfigError, DataError
from t2i_mia.models import dallebart as db
from t2i_mia.models import vqgan as vq
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.parallel.mesh import make_mesh
from t2i_mia.targets import dalle_mini as dm
from t2i_mia.training import dalle_train as dt

SIZE = 16  # 16x16 images, f4 VQGAN -> 4x4 = 16 tokens
VQ = {"ch": 32, "out_ch": 3, "in_channels": 3, "num_res_blocks": 1, "attn_resolutions": [],
      "ch_mult": [1, 1, 1], "resolution": SIZE, "z_channels": 16, "double_z": False,
      "n_embed": 64, "embed_dim": 16, "dropout": 0.0}
BART = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
        "encoder_vocab_size": 320, "image_vocab_size": 64, "image_length": 16,
        "max_text_length": 12, "dropout": 0.0, "gradient_checkpointing": False}
SAMPLE = DalleSampleConfig(top_k=0, top_p=1.0, temperature=1.0, condition_scale=3.0,
                           batch_size=16)


def _mesh1():
    return make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def data():
    ds = SyntheticCaptions(seed=3, size=SIZE, n=200)
    images, captions = ds.get_many(list(range(96)))
    return ds, images, captions


@pytest.fixture(scope="session")
def model(data):
    """A tiny VQGAN + DalleBart, trained for a few dozen steps on one device."""
    _, images, captions = data
    mesh = _mesh1()
    vcfg = vq.VQGANConfig.from_dict(VQ)
    vparams = dt.train_vqgan(vcfg, images, TrainConfig(steps=24, batch_size=16,
                                                       learning_rate=2e-3, warmup_steps=4),
                             seed=0, mesh=mesh, ckpt_dir=None, restart_every=8)
    tok = TextTokenizer.train(captions, vocab_size=300, max_length=BART["max_text_length"])
    bcfg = db.DalleBartConfig.from_dict(BART)
    tokens = dt.encode_tokens(vcfg, vparams, images[:48], mesh)
    ids, mask = dm.tokenize_captions(captions[:48], tok, bcfg)
    u_ids, u_mask = dm.empty_caption(tok, bcfg)
    bparams = dt.train_dallebart(bcfg, ids, mask, tokens, u_ids, u_mask,
                                 TrainConfig(steps=30, batch_size=16, learning_rate=3e-3,
                                             warmup_steps=5),
                                 caption_dropout=0.2, seed=1, mesh=mesh, ckpt_dir=None)
    return dm.DalleMiniComponents(vcfg, vparams, bcfg, bparams, tok)


def _target(comps, mesh=None, **sample):
    return dm.DalleMiniTarget.from_components(
        comps, dataclasses.replace(SAMPLE, **sample), seed=5, mesh=mesh or _mesh1(),
        name="t")


# --------------------------------------------------------------------------- training

def test_vq_objective_is_vqgan_loss(data):
    """The training objective with aux outputs is exactly the model's vqgan_loss."""
    cfg = vq.VQGANConfig.from_dict(dict(VQ, ch_mult=[1, 1], resolution=8, n_embed=16,
                                        embed_dim=4, z_channels=8))
    params = vq.init_vqgan(cfg, jax.random.PRNGKey(0), image_size=8)
    x = jnp.asarray(data[1][:4, ::2, ::2], jnp.float32) / 127.5 - 1.0
    ref, ref_m = jax.jit(lambda p, x: vq.vqgan_loss(p, cfg, x))(params, x)
    loss, m, aux = jax.jit(lambda p, x: dt.vq_objective(cfg, p, x))(params, x)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert float(m["psnr"]) == pytest.approx(float(ref_m["psnr"]), rel=1e-6)
    assert aux["indices"].shape == (4, 16)  # 8x8 images, f2


def test_restart_codes_replaces_only_dead_codes():
    table = jnp.arange(12.0).reshape(6, 2)
    usage = jnp.asarray([1.0, 0.0, 2.0, 0.01, 0.5, 0.0])
    z = jnp.full((8, 2), -7.0) + jnp.arange(8.0)[:, None]
    key = jax.random.PRNGKey(0)
    new, new_usage, n = dt._restart_codes(table, usage, z, key, jnp.bool_(True), 0.03)
    dead = np.asarray(usage) < 0.03
    assert int(n) == dead.sum() == 3
    np.testing.assert_array_equal(np.asarray(new)[~dead], np.asarray(table)[~dead])
    rows = {tuple(r) for r in np.asarray(z).tolist()}
    assert all(tuple(r) in rows for r in np.asarray(new)[dead].tolist())
    assert len({tuple(r) for r in np.asarray(new)[dead].tolist()}) == 3  # distinct draws
    np.testing.assert_array_equal(np.asarray(new_usage)[dead], 1.0)
    same, same_usage, n0 = dt._restart_codes(table, usage, z, key, jnp.bool_(False), 0.03)
    assert int(n0) == 0
    np.testing.assert_array_equal(same, table)
    np.testing.assert_array_equal(same_usage, usage)


def test_vqgan_training_uses_the_codebook(model, data):
    """Restarts (from encoder outputs) keep most codes alive where taming's init collapses."""
    stats = dt.vqgan_stats(model.vqgan_cfg, model.vqgan_params, data[1], _mesh1())
    assert stats["codes_used"] >= 32, stats  # of 64
    assert np.isfinite(stats["psnr"])


@pytest.mark.slow
def test_vqgan_resume_is_bitwise(data, tmp_path):
    """The restarts' state (usage EMA, keys) is checkpointed: a run resumed from its step-4
    checkpoint ends bitwise equal to the uninterrupted 8-step run."""
    import shutil
    cfg = vq.VQGANConfig.from_dict(VQ)
    images = data[1][:32]
    tc = TrainConfig(steps=8, batch_size=8, learning_rate=2e-3, warmup_steps=2,
                     checkpoint_every=4)
    kw = dict(seed=2, mesh=_mesh1(), restart_every=3)
    full = dt.train_vqgan(cfg, images, tc, ckpt_dir=str(tmp_path / "a"), **kw)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "8")  # as if killed after the step-4 checkpoint
    resumed = dt.train_vqgan(cfg, images, tc, ckpt_dir=str(tmp_path / "b"), **kw)
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == ["4", "8"]
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_dallebart_rejects_bad_data(model):
    cfg = model.bart_cfg
    ids = np.zeros((4, 12), np.int32)
    with pytest.raises(DataError, match="image_length = 16"):
        dt.train_dallebart(cfg, ids, ids, np.zeros((4, 15), np.int32), ids[0], ids[0],
                           TrainConfig(steps=1), caption_dropout=0.1, seed=0, mesh=_mesh1(),
                           ckpt_dir=None)
    with pytest.raises(DataError, match="image_vocab_size = 64"):
        dt.train_dallebart(cfg, ids, ids, np.full((4, 16), 64, np.int32), ids[0], ids[0],
                           TrainConfig(steps=1), caption_dropout=0.1, seed=0, mesh=_mesh1(),
                           ckpt_dir=None)


# --------------------------------------------------------------------------- generation

CAPTIONS_IDS = [(7, 0), (3, 1), (40, 2), (11, 3), (25, 4)]  # (caption index, stable id)


def _queries(data):
    caps = [data[2][c] for c, _ in CAPTIONS_IDS]
    return caps, [i for _, i in CAPTIONS_IDS]


def test_generate_shape_dtype_and_sampling(model, data):
    t = _target(model)
    caps, ids = _queries(data)
    images, tokens = t.generate_with_tokens(caps, ids, 3, progress=False)
    assert images.shape == (5, 3, SIZE, SIZE, 3) and images.dtype == jnp.uint8
    assert tokens.shape == (5, 3, 16) and tokens.dtype == jnp.int32
    tokens = np.asarray(tokens)
    assert tokens.min() >= 0 and tokens.max() < 64
    assert len({tuple(r) for r in tokens.reshape(15, 16).tolist()}) > 1  # really sampled
    # images are exactly the VQGAN decoding of the tokens
    dec = vq.decode_code(model.vqgan_params, model.vqgan_cfg, tokens.reshape(15, 16))
    ref = np.clip(np.round((np.asarray(dec) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(images).reshape(15, SIZE, SIZE, 3), ref)
    assert t.image_size == SIZE


@pytest.mark.parametrize("shape", [(8, 1), (4, 2)])
def test_sharded_generation_equals_single_device(model, data, shape):
    """8 fake devices (8 x 1, or 4 x 2 with the DalleBart's kernels split over 'model') vs
    one: same per-row keys and per-row arithmetic, so the sampled tokens (and hence the
    decoded images) are exactly equal."""
    assert len(jax.devices()) == 8
    caps, ids = _queries(data)
    one = _target(model, _mesh1())
    eight = _target(model, make_mesh(*shape))
    assert eight.mesh.shape["data"] == shape[0]
    if shape[1] == 2:  # the large kernels are split over 'model': each device holds half
        layer = eight.params["bart"]["model"]["decoder"]["layers"]["FlaxBartDecoderLayer_0"]
        fc = layer["GLU_0"]["Dense_0"]["kernel"]  # (d_model, ffn)
        assert fc.sharding.spec == P(None, "model")
        assert fc.addressable_shards[0].data.shape == (fc.shape[0], fc.shape[1] // 2)
    im1, tk1 = one.generate_with_tokens(caps, ids, 2, progress=False)
    im8, tk8 = eight.generate_with_tokens(caps, ids, 2, progress=False)
    assert len(im8.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(tk8), np.asarray(tk1))
    np.testing.assert_array_equal(np.asarray(im8), np.asarray(im1))


def test_generation_independent_of_batch_size_and_order(model, data):
    caps, ids = _queries(data)
    t16 = _target(model, batch_size=16)
    _, ref = t16.generate_with_tokens(caps, ids, 2, progress=False)
    perm = [3, 0, 4, 2, 1]
    _, small = _target(model, batch_size=4).generate_with_tokens(
        [caps[i] for i in perm], [ids[i] for i in perm], 2, progress=False)
    np.testing.assert_array_equal(np.asarray(small), np.asarray(ref)[perm])
    # the j-th image of a query is the same whatever k is
    _, k1 = t16.generate_with_tokens(caps, ids, 1, progress=False)
    np.testing.assert_array_equal(np.asarray(k1)[:, 0], np.asarray(ref)[:, 0])
    # another stable id (same caption) gives other images
    _, other = t16.generate_with_tokens(caps, [i + 100 for i in ids], 2, progress=False)
    assert not np.array_equal(np.asarray(other), np.asarray(ref))


def test_white_box_loss(model, data):
    t = _target(model)
    _, images, captions = data
    loss = t.white_box_loss(images[:5], captions[:5], list(range(5)))
    assert loss.shape == (5,) and np.all(np.isfinite(loss))
    tokens = dt.encode_tokens(model.vqgan_cfg, model.vqgan_params, images[:5], _mesh1())
    ids, mask = dm.tokenize_captions(captions[:5], model.tokenizer, model.bart_cfg)
    ref = dt.token_nll(model.bart_cfg, model.bart_params, ids, mask, tokens)
    np.testing.assert_allclose(loss, np.asarray(ref), rtol=1e-5)
    # trained on images[:48]: members fit better than random tokens
    rnd = np.random.default_rng(0).integers(0, 64, tokens.shape)
    assert np.mean(loss) < float(np.mean(dt.token_nll(model.bart_cfg, model.bart_params, ids,
                                                      mask, rnd)))


# --------------------------------------------------------------------------- text

def test_long_caption_is_truncated_with_a_warning(model, caplog):
    cfg, tok = model.bart_cfg, model.tokenizer
    long = " ".join(["a small red circle on a gray background"] * 4)
    short = "a red circle"
    with caplog.at_level(logging.WARNING):
        ids, mask = dm.tokenize_captions([short, long], tok, cfg)
    assert ids.shape == mask.shape == (2, cfg.max_text_length)
    warnings = [r for r in caplog.records if "truncated to max_text_length = 12" in r.message]
    assert len(warnings) == 1 and "caption 1" in warnings[0].getMessage()
    assert mask[1].sum() == 12 and ids[1, -1] == tok.eos_id and ids[1, 0] == tok.bos_id
    full, _ = dm.with_max_length(tok, 64).encode([long])
    np.testing.assert_array_equal(ids[1, :11], full[0, :11])  # the caption's first tokens
    ref_ids, ref_mask = tok.encode([short])  # short captions: the tokenizer's own rows
    np.testing.assert_array_equal(ids[0], ref_ids[0])
    np.testing.assert_array_equal(mask[0], ref_mask[0])
    # a caption of exactly max_text_length tokens is kept whole, without a warning
    caplog.clear()
    wide = dm.with_max_length(tok, 64)
    exact = [long[:n] for n in range(1, len(long) + 1)
             if wide.encode([long[:n]])[1].sum() == 12]
    assert exact  # a prefix of the caption that is exactly 12 tokens long
    with caplog.at_level(logging.WARNING):
        e_ids, e_mask = dm.tokenize_captions([exact[0]], tok, cfg)
    assert e_mask[0].sum() == 12 and e_ids[0, -1] == tok.eos_id and not caplog.records
    # generation accepts the long caption (truncated) and is the same as its truncation's
    t = _target(model)
    _, a = t.generate_with_tokens([long], [9], 1, progress=False)
    text_trunc = tok.decode(ids[1])
    _, b = t.generate_with_tokens([text_trunc], [9], 1, progress=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_normalize_text_follows_the_config(model):
    cfg = dataclasses.replace(model.bart_cfg, normalize_text=True)
    tok = model.tokenizer
    raw = "A  Red&Blue CIRCLE!!"
    a = dm.tokenize_captions([raw], tok, cfg)[0]
    from t2i_mia.models.text_normalize import normalize_text
    b = dm.tokenize_captions([normalize_text(raw)], tok, model.bart_cfg)[0]
    np.testing.assert_array_equal(a, b)
    c = dm.tokenize_captions([raw], tok, model.bart_cfg)[0]
    assert not np.array_equal(a, c)
    # the unconditional input is "" without normalisation (as dalle-mini's processor)
    u_ids, u_mask = dm.empty_caption(tok, cfg)
    assert list(u_ids[:2]) == [tok.bos_id, tok.eos_id] and u_mask.sum() == 2


# --------------------------------------------------------------------------- bad input

def test_untokenisable_image_sizes_raise(model):
    cfg, params = model.vqgan_cfg, model.vqgan_params
    with pytest.raises(DataError, match=r"18x18 cannot be tokenised.*multiples of 4"):
        dt.encode_tokens(cfg, params, np.zeros((2, 18, 18, 3), np.uint8), _mesh1())
    with pytest.raises(DataError, match=r"16x32 cannot be tokenised.*square"):
        dt.encode_tokens(cfg, params, np.zeros((2, 16, 32, 3), np.uint8), _mesh1())
    with pytest.raises(DataError, match="cannot be tokenised"):
        dt.train_vqgan(cfg, np.zeros((4, 18, 18, 3), np.uint8), TrainConfig(steps=1),
                       seed=0, mesh=_mesh1(), ckpt_dir=None)
    t = _target(model)
    with pytest.raises(DataError, match=r"expected \[N, 16, 16, 3\]"):
        t.white_box_loss(np.zeros((1, 32, 32, 3), np.uint8), ["a"], [0])


def test_mismatched_parts_raise(model):
    bad = dataclasses.replace(model.bart_cfg, image_vocab_size=65)
    with pytest.raises(ConfigError, match="image_vocab_size = 65 exceeds"):
        dm.DalleMiniTarget(model.vqgan_cfg, model.vqgan_params, bad, model.bart_params,
                           model.tokenizer, SAMPLE, 0, _mesh1())
    bad = dataclasses.replace(model.bart_cfg, image_length=15, min_length=16, max_length=16)
    with pytest.raises(ConfigError, match="not a square"):
        dm.check_components(model.vqgan_cfg, bad, model.tokenizer)
    bad = dataclasses.replace(model.bart_cfg, encoder_vocab_size=100)
    with pytest.raises(ConfigError, match="encoder_vocab_size = 100"):
        dm.check_components(model.vqgan_cfg, bad, model.tokenizer)
    with pytest.raises(DataError, match="2 captions for 1 ids"):
        _target(model).generate(["a", "b"], [1], 1)


# --------------------------------------------------------------------------- folders

def test_save_load_round_trip(model, data, tmp_path):
    dm.save_dalle_mini(tmp_path / "m", model)
    for sub in ("vqgan", "dallebart", "tokenizer"):
        assert (tmp_path / "m" / sub).is_dir()
    got = dm.load_dalle_mini(tmp_path / "m")
    assert got.vqgan_cfg == model.vqgan_cfg and got.bart_cfg == model.bart_cfg
    for tree_a, tree_b in ((got.vqgan_params, model.vqgan_params),
                           (got.bart_params, model.bart_params)):
        la, lb = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
        assert len(la) == len(lb)
        for a, b in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    caps, ids = _queries(data)
    np.testing.assert_array_equal(got.tokenizer.encode(caps)[0], model.tokenizer.encode(caps)[0])
    _, a = _target(got).generate_with_tokens(caps, ids, 1, progress=False)
    _, b = _target(model).generate_with_tokens(caps, ids, 1, progress=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_errors_name_the_folder(model, tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        dm.load_dalle_mini(tmp_path / "missing")
    dm.save_dalle_mini(tmp_path / "m", model)
    import shutil
    shutil.rmtree(tmp_path / "m" / "tokenizer")
    with pytest.raises(ConfigError, match="no tokenizer/ sub-folder"):
        dm.load_dalle_mini(tmp_path / "m")


# --------------------------------------------------------------------------- audit models

@pytest.mark.slow
def test_build_dalle_models_trains_caches_and_loads(tmp_path):
    from t2i_mia.data.sources import open_dataset as build_dataset
    from t2i_mia.data.splits import build_splits
    from t2i_mia.targets.builders import build_models
    from t2i_mia.targets.protocol import Models
    from t2i_mia.timing import Timer
    from t2i_mia.pipeline.paths import RunPaths
    from t2i_mia.config import SplitsConfig
    from t2i_mia.targets.factory import ModelCache

    cfg = get_config("ci")
    cfg.target = "dalle-mini"
    cfg.data.image_size = SIZE
    cfg.data.splits = SplitsConfig(pretrain=48, target_members=16, target_nonmembers=16,
                                   target_known_members=0, target_known_nonmembers=0,
                                   shadow_members=16, shadow_nonmembers=16, auxiliary=16)
    cfg.dalle.vqgan = dict(VQ)
    cfg.dalle.bart = dict(BART)
    cfg.dalle.vocab_size = 300
    cfg.dalle.vqgan_train = TrainConfig(steps=4, batch_size=16, warmup_steps=1)
    cfg.dalle.train = TrainConfig(steps=4, batch_size=16, warmup_steps=1)
    cfg.dalle.sample = SAMPLE
    cfg.adversary.n_reference, cfg.adversary.base_reference = 1, False
    paths = RunPaths(work_dir=str(tmp_path / "work"), out=str(tmp_path / "out"),
                     target_dir=None, data_dir=None)
    dataset = build_dataset(cfg, 200)
    manifest = build_splits(cfg, dataset)
    cache = ModelCache(paths.work_dir)
    mesh = _mesh1()
    timer = Timer()
    models = build_models(cfg, paths, dataset, manifest, cache, mesh, timer)
    assert isinstance(models, Models)
    assert models.attack_source is models.null is models.white_box
    assert models.target.name == "target" and models.null.name == "shadow"
    assert {"autoencoder", "target", "shadow", "reference"} <= set(timer.timings)
    done = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "work" / "models").iterdir())
    assert done == ["dalle-reference_0", "dalle-shadow", "dalle-target", "dalle-tokenizer",
                    "vqgan"]
    # the calibrated attack's reference: trained on auxiliary, not on the null's members
    assert [r.name for r in models.references] == ["reference_0"]
    assert models.reference_info[0]["split"] == "auxiliary"
    assert models.reference_info[0]["members_sha256"] != models.null_info["members_sha256"]
    caps = dataset.captions(manifest.ids("target_members")[:2])
    ids = manifest.ids("target_members")[:2]
    g = models.target.generate(caps, ids, 2, progress=False)
    assert g.shape == (2, 2, SIZE, SIZE, 3) and g.dtype == jnp.uint8
    # second build: everything from the cache, same images
    cached = build_models(cfg, paths, dataset, manifest, cache, mesh, Timer())
    np.testing.assert_array_equal(np.asarray(cached.target.generate(caps, ids, 2,
                                                                    progress=False)),
                                  np.asarray(g))
    # --target-dir: a saved target folder is loaded; partial mode queries the target itself
    target_dir = [p for p in (tmp_path / "work" / "models").iterdir()
                  if p.name.startswith("dalle-target-")][0]
    cfg.adversary.aux_mode = "partial"
    loaded = build_models(cfg, dataclasses.replace(paths, target_dir=str(target_dir)),
                          dataset, manifest, cache, mesh, Timer())
    assert loaded.attack_source is loaded.target and loaded.null.name == "shadow"
    np.testing.assert_array_equal(np.asarray(loaded.target.generate(caps, ids, 2,
                                                                    progress=False)),
                                  np.asarray(g))
    cfg.data.image_size = 32
    with pytest.raises(ConfigError, match="makes 16px images"):
        build_models(cfg, dataclasses.replace(paths, target_dir=str(target_dir)),
                     dataset, manifest, cache, mesh, Timer())


# --------------------------------------------------------------------------- your own model

def test_dalle_folder_audited_on_explicit_sets_and_trained_on_members(model, data, tmp_path):
    """A DALL-E mini folder as --target-dir with --members/--nonmembers (none mode, k = 1),
    and train --members --base-dir on it (the VQGAN and tokenizer from the base): the image
    size comes from the folder, the trained model loads and lists its members."""
    import json
    import shutil

    from t2i_mia import attack, cli, train
    from t2i_mia.models.tokenizer import TextTokenizer
    from test_member_sets import write_manifest
    _, images, captions = data
    dm.save_dalle_mini(tmp_path / "m", model)
    members = write_manifest(tmp_path / "sm", images[:8], captions[:8], range(8))
    nonmembers = write_manifest(tmp_path / "sn", images[60:68], captions[60:68],
                                range(60, 68))
    enc = tmp_path / "enc"
    enc.mkdir()
    from conftest import REFERENCE
    for f in ("config.json", "flax_model.msgpack"):
        shutil.copy(REFERENCE / "clip" / f, enc / f)
    TextTokenizer.train(captions, vocab_size=600, max_length=16).save(str(enc))
    out = tmp_path / "out"
    common = ["--config", "ci", "--work-dir", str(tmp_path / "w"),
              "--set", f"dalle.bart={json.dumps(BART)}", "--set", "dalle.vocab_size=300",
              "--set", f"dalle.vqgan={json.dumps(VQ)}"]
    assert cli.run_main(attack.main, common + [
        "--target", "dalle-mini", "--target-dir", str(tmp_path / "m"), "--members", members,
        "--nonmembers", nonmembers, "--out", str(out), "--set", f"adversary.encoder.dir={enc}",
        "--set", "adversary.k=1", "--set", "adversary.aux_mode=none",
        "--set", "adversary.n_bootstrap=50"]) == 0
    with open(out / "report.json") as f:
        rep = json.load(f)
    assert rep["config"]["data"]["image_size"] == SIZE
    assert rep["n_eval"] == {"members": 8, "nonmembers": 8}
    assert "super-conditioned" in rep["models"]["sampler"]
    assert rep["white_box_reference"]["threshold"]["accuracy"] is None  # unfitted
    steps = ["dalle.train.steps=2", "dalle.train.batch_size=8", "dalle.train.warmup_steps=1"]
    trained = tmp_path / "trained"
    assert cli.run_main(train.main, common + sum((["--set", s] for s in steps), []) + [
        "--target", "dalle-mini", "--members", members, "--base-dir", str(tmp_path / "m"),
        "--out", str(trained)]) == 0
    got = dm.load_dalle_mini(trained)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(got.vqgan_params)[0]),
                                  np.asarray(jax.tree.leaves(model.vqgan_params)[0]))
    with open(trained / "members.json") as f:
        assert json.load(f)["ids"] == list(range(8))


def test_generate_writes_dalle_images_in_the_generations_layout(model, data, tmp_path):
    """python -m t2i_mia.generate --target dalle-mini --target-dir: <id>/<j>.png, the same
    images as the target's generate (per-image keys: independent of the batch)."""
    import json

    from PIL import Image

    from t2i_mia import cli, generate
    _, _, captions = data
    dm.save_dalle_mini(tmp_path / "m", model)
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": i, "caption": captions[i]}) + "\n"
                            for i in (3, 9)))
    out = tmp_path / "gens"
    assert cli.run_main(generate.main, [
        "--config", "ci", "--target", "dalle-mini", "--target-dir", str(tmp_path / "m"),
        "--captions", str(caps), "-k", "2", "--out", str(out),
        "--set", f"dalle.sample.condition_scale={SAMPLE.condition_scale}",
        "--set", "dalle.sample.top_k=0"]) == 0
    got = np.asarray(Image.open(out / "9" / "1.png"))
    from t2i_mia.parallel.mesh import make_mesh
    from t2i_mia.config import load_config
    cfg = load_config("ci", [f"dalle.sample.condition_scale={SAMPLE.condition_scale}",
                             "dalle.sample.top_k=0"])
    t = dm.DalleMiniTarget.from_components(model, cfg.dalle.sample, seed=0,
                                           mesh=make_mesh(cfg.mesh.data, cfg.mesh.model))
    want = np.asarray(t.generate([captions[9]], [9], 2))[0, 1]
    assert got.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(got, want)
