"""The model axis in production: sharding rules from the config, training state born split,
a train step and a checkpoint across meshes, the CLIP encoder split, --dry-run's counts.

Eight fake CPU devices (conftest); the split mesh is data=4 x model=2."""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from t2i_mia.checkpoint import restore_checkpoint, save_checkpoint
from t2i_mia.config import TrainConfig, get_config, load_config
from t2i_mia.errors import ConfigError
from t2i_mia.models import schedulers, unet as unet_lib
from t2i_mia.models.clip import CLIPConfig, CLIPTextConfig, init_clip
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.parallel.mesh import (DEFAULT_RULES, config_rules, init_sharded, make_mesh,
                                   model_split, param_shardings, shard_batch)
from t2i_mia.training.ldm_train import init_text_encoder, ldm_loss, make_optimizer, train_ldm
from t2i_mia.training.loop import create_train_state, jit_train_step, make_train_step

# A U-Net small enough to compile in seconds, with kernels the model axis divides.
UNET = unet_lib.UNet2DConditionConfig(
    sample_size=4, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
    layers_per_block=1, attention_head_dim=4, cross_attention_dim=32)
TEXT = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=8, projection_dim=32)
SCHED = schedulers.SchedulerConfig()


def _mesh1():
    return make_mesh(devices=jax.devices()[:1])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_rules_are_config_data_and_validated():
    cfg = get_config("ci")
    assert config_rules(cfg) == DEFAULT_RULES
    assert load_config("ci", ["mesh.rules=[]"]).mesh.rules == ()
    custom = load_config("ci", ['mesh.rules=[["conv1/kernel$", null, null, "model", null]]'])
    rules = config_rules(custom)
    assert rules == (("conv1/kernel$", P(None, None, "model", None)),)
    sh = param_shardings({"conv1": {"kernel": np.zeros((3, 3, 8, 4))},
                          "conv2": {"kernel": np.zeros((3, 3, 8, 4))}},
                         make_mesh(data=4, model=2), rules)
    assert sh["conv1"]["kernel"].spec == P(None, None, "model", None)
    assert sh["conv2"]["kernel"].spec == P()
    for bad, words in ((['[["(kernel", null, "model"]]'], "not a valid regex"),
                       (['[["kernel$", null, "tensor"]]'], "axes must be"),
                       (['[["kernel$"]]'], "expected [regex, axis")):
        with pytest.raises(ConfigError, match=re.escape(words)) as e:
            load_config("ci", [f"mesh.rules={bad[0]}"])
        assert "mesh.rules[0]" in str(e.value)


def test_parameters_and_optimiser_state_are_born_split():
    """init_sharded gives the values of the plain init, already split; the train state built
    on the mesh has its Adam moments split like their parameter."""
    mesh = make_mesh(data=4, model=2)
    key = jax.random.PRNGKey(3)
    init = lambda k: unet_lib.init_params(UNET, k, 8)  # noqa: E731
    plain = init(key)
    split = init_sharded(init, mesh, DEFAULT_RULES, key)
    conv = split["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert conv.sharding.spec == P(None, None, None, "model")
    assert conv.addressable_shards[0].data.shape[-1] == conv.shape[-1] // 2
    for a, b in zip(_leaves(plain), _leaves(split)):
        np.testing.assert_array_equal(a, b)
    tx = make_optimizer(TrainConfig(steps=2, learning_rate=1e-3, warmup_steps=0))
    state = create_train_state(split, tx, 0, ema=True, mesh=mesh, rules=DEFAULT_RULES)
    mu = state.opt_state[-1][0].mu["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert mu.sharding.spec == P(None, None, None, "model")
    ema = state.ema_params["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert ema.sharding.spec == P(None, None, None, "model")
    n, total = model_split(split, mesh)
    assert 0.9 * total < n < total  # the biases and norms stay whole
    assert model_split(split, make_mesh())[0] == 0


@pytest.fixture(scope="module")
def ldm_data():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((16, 4, 4, 4)).astype(np.float32)
    ids = rng.integers(1, 60, (16, 8)).astype(np.int32)
    mask = np.ones((16, 8), np.int32)
    return latents, ids, mask, np.zeros(8, np.int32), np.r_[1, 1, np.zeros(6)].astype(np.int32)


def _sgd_steps(mesh, ldm_data, rules, steps=3):
    """``steps`` production LDM train steps (ldm_loss, make_train_step, jit_train_step with
    the rules, the state created on the mesh) with plain SGD."""
    latents, ids, mask, u_ids, u_mask = ldm_data
    loss_fn = functools.partial(ldm_loss, UNET, TEXT, SCHED, uncond_ids=jnp.asarray(u_ids),
                                uncond_mask=jnp.asarray(u_mask), caption_dropout=0.25)
    k = jax.random.PRNGKey(1)
    params = {"unet": init_sharded(lambda k: unet_lib.init_params(UNET, k, 8), mesh, rules, k),
              "text": init_sharded(lambda k: init_text_encoder(TEXT, k, 8), mesh, rules, k)}
    tx = optax.sgd(0.05)
    state = create_train_state(params, tx, 2, mesh=mesh, rules=rules)
    batch = {"latents": latents[:8], "ids": ids[:8], "mask": mask[:8]}
    step = jit_train_step(make_train_step(loss_fn, tx), mesh, state, batch, rules)
    losses = []
    for _ in range(steps):
        state, m = step(state, shard_batch(batch, mesh))
        losses.append(float(m["loss"]))
    return state, losses


def test_ldm_train_step_on_a_split_mesh_equals_one_device(ldm_data):
    """3 LDM train steps (U-Net + text encoder) on 4 x 2, kernels split over 'model', equal
    those on one device. With SGD the update is linear in the gradient, so float32
    reordering (per-device partial sums of the split matmuls and of the batch mean, then
    all-reduced: a few ulp each) stays at that scale: 1e-5 relative to the largest change
    of a parameter, which is itself asserted to be large."""
    mesh = make_mesh(data=4, model=2)
    ref, ref_losses = _sgd_steps(_mesh1(), ldm_data, ())
    got, losses = _sgd_steps(mesh, ldm_data, DEFAULT_RULES)
    conv = got.params["unet"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert conv.sharding.spec == P(None, None, None, "model")
    fc = got.params["text"]["encoder"]["layers"]["0"]["mlp"]["fc1"]["kernel"]
    assert fc.sharding.spec == P(None, "model")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    init, _ = _sgd_steps(_mesh1(), ldm_data, (), steps=0)
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(_leaves(ref.params), _leaves(init.params)))
    worst = max(float(np.max(np.abs(a - b))) for a, b in
                zip(_leaves(ref.params), _leaves(got.params)))
    assert moved > 1e-2 and worst < 1e-5 * moved, (worst, moved)


def test_train_ldm_runs_split_and_agrees_with_one_device(ldm_data):
    """train_ldm itself (Adam) on 4 x 2 vs one device. Adam divides each gradient entry by
    its own running scale, so entries whose true gradient is zero (the biases a GroupNorm
    cancels) take +-lr steps on float noise and may differ by up to 2 lr per step; every
    other entry agrees: 99% of all entries within 1e-5, none beyond 2 lr x 3 steps."""
    latents, ids, mask, u_ids, u_mask = ldm_data
    tc = TrainConfig(steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0)

    def train(mesh):
        return _leaves(train_ldm(UNET, TEXT, SCHED, latents, ids, mask, u_ids, u_mask, tc,
                                 caption_dropout=0.25, seed=1, mesh=mesh, ckpt_dir=None))

    ref, got = train(_mesh1()), train(make_mesh(data=4, model=2))
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(ref, got)])
    assert diffs.max() <= 2 * 1e-3 * 3 and np.mean(diffs <= 1e-5) > 0.99


def test_checkpoint_written_split_restores_on_other_meshes(tmp_path):
    """A train state saved from 4 x 2 restores onto 8 x 1 and onto one device, with the
    target meshes' shardings and equal values."""
    tx = make_optimizer(TrainConfig(steps=2, learning_rate=1e-3, warmup_steps=0))
    params = init_sharded(lambda k: unet_lib.init_params(UNET, k, 8), make_mesh(4, 2),
                          DEFAULT_RULES, jax.random.PRNGKey(5))
    state = create_train_state(params, tx, 7, ema=True, mesh=make_mesh(4, 2),
                               rules=DEFAULT_RULES)
    want = _leaves(state)
    save_checkpoint(str(tmp_path / "ck"), 1, state)
    for mesh in (make_mesh(8, 1), _mesh1()):
        template = create_train_state(jax.tree.map(np.zeros_like, jax.device_get(params)), tx,
                                      7, ema=True, mesh=mesh, rules=DEFAULT_RULES)
        restored, _ = restore_checkpoint(str(tmp_path / "ck"), template)
        conv = restored.params["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]
        assert conv.sharding.mesh.shape == mesh.shape
        assert conv.sharding.is_fully_replicated  # model == 1 on both targets
        for a, b in zip(want, _leaves(restored)):
            np.testing.assert_array_equal(a, b)


def test_clip_encoder_split_embeds_as_on_one_device():
    """The adversary's CLIP on 4 x 2: kernels split over 'model', embeddings equal to one
    device's (float32 reordering only)."""
    from t2i_mia.adversary.encoder import Encoder
    cfg = get_config("ci")
    clip_cfg = CLIPConfig.from_dict(cfg.adversary.encoder.clip)
    params = init_clip(clip_cfg, jax.random.key(0))
    caps = ["a red circle", "a blue square on the left", "a green ring"] * 3
    tok = TextTokenizer.train(caps, vocab_size=cfg.adversary.encoder.vocab_size,
                              max_length=cfg.adversary.encoder.max_text_length)
    images = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    one = Encoder(clip_cfg, params, tok, _mesh1(), batch_size=8)
    split = Encoder(clip_cfg, params, tok, make_mesh(4, 2), batch_size=8)
    fc = split.params["vision_model"]["encoder"]["layers"]["0"]["mlp"]["fc1"]["kernel"]
    assert fc.sharding.spec == P(None, "model")
    assert fc.addressable_shards[0].data.shape == (fc.shape[0], fc.shape[1] // 2)
    np.testing.assert_allclose(np.asarray(split.embed_images(images)),
                               np.asarray(one.embed_images(images)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(split.embed_texts(caps)),
                               np.asarray(one.embed_texts(caps)), atol=1e-5)


def _dry_run(*sets):
    args = [sys.executable, "-m", "t2i_mia.attack", "--config", "ci", "--dry-run"]
    for s in sets:
        args += ["--set", s]
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    r = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr
    return {m.group(1): (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
            for m in re.finditer(r"^  ([a-z ]+): sharded over model: ([\d,]+) of ([\d,]+) "
                                 r"parameters", r.stdout, re.M)}


def test_dry_run_prints_the_split_of_every_model():
    split = _dry_run("mesh.data=4", "mesh.model=2")
    assert set(split) == {"autoencoder", "unet", "text encoder", "clip encoder"}
    n, total = split["unet"]
    assert 0 < n < total and total == sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(unet_lib.param_shapes(
            unet_lib.UNet2DConditionConfig.from_dict(get_config("ci").ldm.unet))))
    assert all(n == 0 for n, _ in _dry_run().values())  # model = 1: nothing is split
    assert all(n == 0 for n, _ in _dry_run("mesh.data=4", "mesh.model=2",
                                           "mesh.rules=[]").values())
