"""Training of the latent diffusion target: the autoencoder, then U-Net + text encoder.

Both use the shared pure-step pattern (:mod:`t2i_mia.training.loop`): a pure
``loss_fn(params, batch, rng)``, ``jax.jit`` over the mesh with the state donated, batches
that are a pure function of the step (so a checkpoint holds the data position), orbax
checkpoints and resume.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from t2i_mia.config import TrainConfig
from t2i_mia.models import autoencoder_kl, schedulers
from t2i_mia.models import unet as unet_lib
from t2i_mia.models.clip import CLIPTextConfig, CLIPTextModel
from t2i_mia.models.precision import FLOAT32, cast_params
from t2i_mia.parallel.batching import batched_apply, round_batch
from t2i_mia.parallel.mesh import DEFAULT_RULES, Rules, init_sharded, place_params
from t2i_mia.training.loop import (create_train_state, epoch_batches, jit_train_step,
                                   make_train_step, run_training, train_with_config)

log = logging.getLogger(__name__)
PyTree = Any


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """adamw with linear warm-up then cosine decay to 10%, global-norm clipping."""
    decay_steps = max(tc.steps, tc.warmup_steps + 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps,
                                               decay_steps, end_value=0.1 * tc.learning_rate)
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
    parts.append(optax.adamw(sched, weight_decay=tc.weight_decay))
    return optax.chain(*parts)


def to_unit_range(images_u8: jax.Array) -> jax.Array:
    """uint8[..., 3] -> f32 in [-1, 1]."""
    return images_u8.astype(jnp.float32) / 127.5 - 1.0


def train_autoencoder(cfg: autoencoder_kl.AutoencoderKLConfig, images: np.ndarray,
                      tc: TrainConfig, *, kl_weight: float, seed: int, mesh: Mesh,
                      ckpt_dir: str | None, rules: Rules = DEFAULT_RULES,
                      policy: dict = FLOAT32
                      ) -> tuple[autoencoder_kl.AutoencoderKLConfig, PyTree]:
    """Trains the KL autoencoder on uint8[N,H,W,3] images (the ``pretrain`` split).

    Returns the config with ``scaling_factor`` set to 1/std of the trained latents (as Stable
    Diffusion chose its 0.18215) and the parameters (in ``policy``'s ``param_dtype``).
    """
    bs = round_batch(tc.batch_size, mesh)
    tx = make_optimizer(tc)
    pdt = policy["param_dtype"]
    params = init_sharded(lambda k: cast_params(autoencoder_kl.init_params(cfg, k), pdt), mesh,
                          rules, jax.random.PRNGKey(seed))
    state = create_train_state(params, tx, jax.random.PRNGKey(seed + 1), ema=False, mesh=mesh,
                               rules=rules)

    def loss_fn(p, batch, rng):
        return autoencoder_kl.vae_loss(cfg, p, to_unit_range(batch["image"]), rng,
                                       recon_loss="l1", kl_weight=kl_weight, policy=policy)

    index = epoch_batches(len(images), bs, seed)
    batch_fn = lambda step: {"image": images[index(step)]}  # noqa: E731
    step = jit_train_step(make_train_step(loss_fn, tx), mesh, state, batch_fn(0), rules)
    state, _ = run_training(state=state, train_step=step, batch_fn=batch_fn, num_steps=tc.steps,
                            mesh=mesh, ckpt_dir=ckpt_dir, checkpoint_every=tc.checkpoint_every,
                            desc="autoencoder")
    params = jax.device_get(state.params)
    lat = encode_latents(cfg, params, images[: min(len(images), 512)], mesh, scale=1.0,
                         rules=rules, policy=policy)
    std = float(np.std(lat))
    cfg = dataclasses.replace(cfg, scaling_factor=float(1.0 / max(std, 1e-6)))
    log.info("autoencoder: latent std %.4f -> scaling_factor %.4f", std, cfg.scaling_factor)
    return cfg, params


def encode_latents(cfg: autoencoder_kl.AutoencoderKLConfig, params: PyTree, images: np.ndarray,
                   mesh: Mesh, scale: float | None = None, batch_size: int = 256,
                   rules: Rules = DEFAULT_RULES, policy: dict = FLOAT32) -> np.ndarray:
    """uint8[N,H,W,3] -> posterior means * scaling_factor, f32[N,h,w,C] (host); the
    parameters split over the mesh by ``rules``, computed with the precision ``policy``."""
    scale = cfg.scaling_factor if scale is None else scale
    model = autoencoder_kl.AutoencoderKL(cfg, **policy)
    bs = round_batch(batch_size, mesh)

    @jax.jit
    def enc(p, x):
        mean, _ = model.apply({"params": p}, to_unit_range(x), method="encode")
        return mean * scale

    params = place_params(cast_params(params, policy["param_dtype"]), mesh, rules)
    return batched_apply(enc, params, (np.asarray(images),), bs, mesh)


def init_text_encoder(cfg: CLIPTextConfig, seed: int | jax.Array, max_length: int) -> PyTree:
    """Fresh text-encoder parameters (``seed``: an int or a PRNG key)."""
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    ids = jnp.zeros((1, max_length), jnp.int32)
    return CLIPTextModel(cfg).init(key, ids, jnp.ones_like(ids))["params"]


def diffusion_loss(unet_cfg: unet_lib.UNet2DConditionConfig, text_cfg: CLIPTextConfig,
                   sched_cfg: schedulers.SchedulerConfig, params: PyTree, latents: jax.Array,
                   ids: jax.Array, mask: jax.Array, t: jax.Array, noise: jax.Array,
                   policy: dict = FLOAT32) -> jax.Array:
    """Per-example DDPM loss f32[B]: || eps_theta(x_t, t, c) - target ||^2 averaged.

    ``target`` is the noise (epsilon prediction) or the velocity (v-prediction), per the
    scheduler config. Used for training and as the white-box reference signal. ``policy``:
    the models' precision (the loss itself is float32).
    """
    ac = schedulers.alphas_cumprod(sched_cfg)
    noisy = schedulers.add_noise(ac, latents, noise, t)
    ctx, _ = CLIPTextModel(text_cfg, **policy).apply({"params": params["text"]}, ids, mask)
    pred = unet_lib.UNet2DConditionModel(unet_cfg, **policy).apply(
        {"params": params["unet"]}, noisy, t, ctx)
    target = schedulers.training_target(sched_cfg, ac, latents, noise, t)
    return jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))


def sample_timesteps(key: jax.Array, n: int, num_train_timesteps: int,
                     power: float = 1.0) -> jax.Array:
    """int32[n] training timesteps ``floor(T * u**(1/power))``, u ~ U[0, 1).

    ``power`` 1 is DDPM's uniform sampling; ``power`` p > 1 has density ~ t**(p-1), i.e. more
    training at high noise (p = 3: 27% of the steps at t > 0.9 T instead of 10%).
    """
    if power == 1.0:
        return jax.random.randint(key, (n,), 0, num_train_timesteps)
    u = jax.random.uniform(key, (n,))
    t = jnp.floor(num_train_timesteps * u ** (1.0 / power)).astype(jnp.int32)
    return jnp.clip(t, 0, num_train_timesteps - 1)


def ldm_loss(unet_cfg: unet_lib.UNet2DConditionConfig, text_cfg: CLIPTextConfig,
             sched_cfg: schedulers.SchedulerConfig, params: PyTree, batch: dict,
             rng: jax.Array, *, uncond_ids: jax.Array, uncond_mask: jax.Array,
             caption_dropout: float, timestep_power: float = 1.0,
             policy: dict = FLOAT32) -> tuple[jax.Array, dict]:
    """The LDM training loss (scalar f32, no metrics): :func:`diffusion_loss` at timesteps
    from :func:`sample_timesteps`, with each caption replaced by the empty one
    (``uncond_ids``/``uncond_mask`` int32[L]) with probability ``caption_dropout``.

    ``batch``: ``latents`` f32[B,h,w,C], ``ids``/``mask`` int32[B,L]. A ``loss_fn`` for
    :func:`t2i_mia.training.loop.make_train_step` once the configs and keywords are bound.
    """
    kt, kn, kd = jax.random.split(rng, 3)
    b = batch["latents"].shape[0]
    t = sample_timesteps(kt, b, sched_cfg.num_train_timesteps, timestep_power)
    noise = jax.random.normal(kn, batch["latents"].shape)
    drop = jax.random.bernoulli(kd, caption_dropout, (b,))[:, None]
    cids = jnp.where(drop, uncond_ids[None], batch["ids"])
    cmask = jnp.where(drop, uncond_mask[None], batch["mask"])
    per_ex = diffusion_loss(unet_cfg, text_cfg, sched_cfg, params, batch["latents"], cids,
                            cmask, t, noise, policy)
    return jnp.mean(per_ex.astype(jnp.float32)), {}


def train_ldm(unet_cfg: unet_lib.UNet2DConditionConfig, text_cfg: CLIPTextConfig,
              sched_cfg: schedulers.SchedulerConfig, latents: np.ndarray, ids: np.ndarray,
              mask: np.ndarray, uncond_ids: np.ndarray, uncond_mask: np.ndarray,
              tc: TrainConfig, *, caption_dropout: float, seed: int, mesh: Mesh,
              ckpt_dir: str | None, text_params: PyTree | None = None,
              unet_params: PyTree | None = None,
              train_text: bool = True, timestep_power: float = 1.0,
              rules: Rules = DEFAULT_RULES, policy: dict = FLOAT32) -> PyTree:
    """Trains U-Net (+ text encoder) on a model's members.

    Args:
      latents: f32[N,h,w,C] scaled latents of the members' images.
      ids, mask: int32[N,L] caption tokens; uncond_ids/mask int32[L]: the empty caption.
      caption_dropout: probability of replacing a caption by the empty one (enables
        classifier-free guidance at sampling time).
      text_params: a pretrained text encoder (kept frozen unless ``train_text``).
      unet_params: a pretrained U-Net to fine-tune (None: random initialisation).
      timestep_power: p of :func:`sample_timesteps` (1 = uniform).
      rules: how the ``model`` axis splits the parameters (and so the training state).
      policy: the precision (``dtype``, ``param_dtype``; :mod:`t2i_mia.models.precision`).
    Returns: ``{"unet": ..., "text": ...}`` (the EMA parameters when EMA is on).
    """
    bs = round_batch(tc.batch_size, mesh)
    k0, k1 = jax.random.split(jax.random.PRNGKey(seed))
    length = ids.shape[1]
    pdt = policy["param_dtype"]
    params = {"unet": place_params(cast_params(unet_params, pdt), mesh, rules)
              if unet_params is not None else
              init_sharded(lambda k: cast_params(unet_lib.init_params(unet_cfg, k, length),
                                                 pdt), mesh, rules, k0),
              "text": cast_params(text_params, pdt) if text_params is not None else init_sharded(
                  lambda k: cast_params(init_text_encoder(text_cfg, k, length), pdt), mesh,
                  rules, jax.random.PRNGKey(seed + 7))}
    tx = make_optimizer(tc)
    if not train_text:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   {"unet": "train", "text": "frozen"})
    loss_fn = functools.partial(ldm_loss, unet_cfg, text_cfg, sched_cfg,
                                uncond_ids=jnp.asarray(uncond_ids),
                                uncond_mask=jnp.asarray(uncond_mask),
                                caption_dropout=caption_dropout, timestep_power=timestep_power,
                                policy=policy)
    index = epoch_batches(len(latents), bs, seed)

    def batch_fn(step):
        idx = index(step)
        return {"latents": latents[idx], "ids": ids[idx], "mask": mask[idx]}

    out, _ = train_with_config(loss_fn, tx, params, k1, batch_fn, tc, mesh, ckpt_dir=ckpt_dir,
                               desc="ldm", rules=rules)
    return out
