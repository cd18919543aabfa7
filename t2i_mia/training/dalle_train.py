"""Training of the DALL-E mini target: the VQGAN (images -> tokens), then DalleBart (text ->
image tokens).

Both use the shared pure-step pattern (:mod:`t2i_mia.training.loop`): ``jax.jit`` over the
mesh with the state donated, batches that are a pure function of the step, orbax
checkpoints and resume.

A small VQGAN trained from scratch collapses onto a handful of codes when its codebook
starts at taming's uniform +-1/n (every encoder output is nearest to the same few entries
and the others never receive a gradient). :func:`train_vqgan` therefore keeps an EMA of
each code's usage inside the training state and, every ``restart_every`` steps, replaces
the codes whose usage fell below ``dead_threshold`` of the uniform rate by encoder outputs
drawn from the current batch. At step 0 every code counts as dead, so this is also the
codebook's initialisation from encoder outputs. Restarts stop after ``restart_until`` of
the run so the decoder settles on the final codebook. All of it is part of the jitted
step, a function of the state and the batch alone, so resume stays bitwise.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from t2i_mia.config import TrainConfig
from t2i_mia.errors import DataError
from t2i_mia.models import dallebart as db
from t2i_mia.models import vqgan as vq
from t2i_mia.models.precision import FLOAT32, cast_params
from t2i_mia.parallel.batching import batched_apply, round_batch
from t2i_mia.parallel.mesh import DEFAULT_RULES, Rules, batch_sharding, init_sharded, place_params
from t2i_mia.training.ldm_train import make_optimizer, to_unit_range
from t2i_mia.training.loop import (create_train_state, epoch_batches, jit_train_step,
                                   make_train_step, run_training, train_with_config)

log = logging.getLogger(__name__)
PyTree = Any


# ----------------------------------------------------------------------------- VQGAN

def vq_objective(cfg: vq.VQGANConfig, params: PyTree, pixel_values: jax.Array, *,
                 beta: float = 0.25, policy: dict = FLOAT32) -> tuple[jax.Array, dict, dict]:
    """:func:`t2i_mia.models.vqgan.vqgan_loss`'s objective (L1 + MSE + codebook + beta *
    commitment, straight-through) that also returns the forward's ``aux`` (``z_e``, ``z_q``,
    ``indices``), which the codebook restarts need. Returns ``(loss, metrics, aux)``; the
    model runs with the precision ``policy``, the loss is float32."""
    x_hat, aux = vq.VQModel(cfg, **policy).apply({"params": params}, pixel_values)
    x_hat = x_hat.astype(jnp.float32)
    aux = dict(aux, z_e=aux["z_e"].astype(jnp.float32), z_q=aux["z_q"].astype(jnp.float32))
    l1 = jnp.mean(jnp.abs(pixel_values - x_hat))
    mse = jnp.mean((pixel_values - x_hat) ** 2)
    codebook = jnp.mean((jax.lax.stop_gradient(aux["z_e"]) - aux["z_q"]) ** 2)
    commitment = jnp.mean((aux["z_e"] - jax.lax.stop_gradient(aux["z_q"])) ** 2)
    loss = l1 + mse + codebook + beta * commitment
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))  # images in [-1, 1]
    metrics = {"l1": l1, "mse": mse, "codebook": codebook, "commitment": commitment,
               "psnr": psnr}
    return loss, metrics, aux


def _restart_codes(table, usage, z_flat, key, do_restart, dead_threshold):
    """Replaces rows of ``table`` f32[n,E] whose ``usage`` f32[n] (1.0 = the uniform rate) is
    below ``dead_threshold`` by rows of ``z_flat`` f32[M,E] (distinct rows when M >= n), when
    ``do_restart``; restarted codes get usage 1."""
    n, m = table.shape[0], z_flat.shape[0]
    if m >= n:
        pick = jax.random.permutation(key, m)[:n]
    else:
        pick = jax.random.randint(key, (n,), 0, m)
    dead = jnp.logical_and(do_restart, usage < dead_threshold)
    table = jnp.where(dead[:, None], z_flat[pick].astype(table.dtype), table)
    usage = jnp.where(dead, 1.0, usage)
    return table, usage, jnp.sum(dead)


def train_vqgan(cfg: vq.VQGANConfig, images: np.ndarray, tc: TrainConfig, *, seed: int,
                mesh: Mesh, ckpt_dir: str | None, beta: float = 0.25,
                restart_every: int = 25, restart_until: float = 0.8,
                dead_threshold: float = 0.03, usage_decay: float = 0.95,
                rules: Rules = DEFAULT_RULES, policy: dict = FLOAT32) -> PyTree:
    """Trains a VQGAN on uint8[N,H,W,3] images (the ``pretrain`` split); returns its params.

    Args:
      restart_every, restart_until, dead_threshold, usage_decay: dead-code restarts (module
        docstring): every ``restart_every`` steps while ``step < restart_until * steps``,
        codes whose usage EMA (decay ``usage_decay``, 1.0 = uniform usage) is below
        ``dead_threshold`` are replaced by encoder outputs of the batch.
    Logs codebook usage and reconstruction PSNR at the end (see :func:`vqgan_stats`).
    """
    images = np.asarray(images)
    vq.check_image_size(cfg, images.shape, "train_vqgan: images")
    if images.dtype != np.uint8:
        raise DataError(f"train_vqgan: images are {images.dtype}, expected uint8 [N,H,W,3]")
    bs = round_batch(tc.batch_size, mesh)
    n_codes = cfg.n_embed
    tokens_per_image = (images.shape[1] // cfg.downsample_factor) ** 2
    m = bs * tokens_per_image
    until = int(restart_until * tc.steps)
    size = images.shape[1]
    pdt = policy["param_dtype"]
    params = {"vq": init_sharded(lambda k: cast_params(vq.init_vqgan(cfg, k, image_size=size),
                                                       pdt), mesh, rules,
                                 jax.random.PRNGKey(seed)),
              "usage": jnp.zeros((n_codes,), jnp.float32)}
    # The usage EMA rides in the params tree (so it is checkpointed) but is not optimised.
    tx = optax.multi_transform({"train": make_optimizer(tc), "frozen": optax.set_to_zero()},
                               {"vq": "train", "usage": "frozen"})
    state = create_train_state(params, tx, jax.random.PRNGKey(seed + 1), ema=False, mesh=mesh,
                               rules=rules)

    def loss_fn(p, batch, rng):
        loss, metrics, aux = vq_objective(cfg, p["vq"], to_unit_range(batch["image"]),
                                          beta=beta, policy=policy)
        metrics["_z"] = jax.lax.stop_gradient(aux["z_e"]).reshape(-1, cfg.embed_dim)
        metrics["_counts"] = jnp.bincount(aux["indices"].reshape(-1), length=n_codes)
        return loss, metrics

    base_step = make_train_step(loss_fn, tx)

    def train_step(st, batch):
        step = st.step
        st, metrics = base_step(st, batch)
        z, counts = metrics.pop("_z"), metrics.pop("_counts")
        rate = counts.astype(jnp.float32) * (n_codes / m)  # 1.0 = uniform usage
        usage = usage_decay * st.params["usage"] + (1.0 - usage_decay) * rate
        do = jnp.logical_and(step % restart_every == 0, step < until)
        key = jax.random.fold_in(jax.random.fold_in(st.rng, step), 1)
        table = st.params["vq"]["quantize"]["embedding"]["embedding"]
        table, usage, n_dead = _restart_codes(table, usage, z, key, do, dead_threshold)
        vq_p = dict(st.params["vq"])
        vq_p["quantize"] = {"embedding": {"embedding": table}}
        metrics["codes_restarted"] = n_dead
        metrics["codes_used"] = jnp.sum(counts > 0)
        return st.replace(params={"vq": vq_p, "usage": usage}), metrics

    index = epoch_batches(len(images), bs, seed)
    batch_fn = lambda step: {"image": images[index(step)]}  # noqa: E731
    step_fn = jit_train_step(train_step, mesh, state, batch_fn(0), rules)
    state, _ = run_training(state=state, train_step=step_fn, batch_fn=batch_fn,
                            num_steps=tc.steps, mesh=mesh, ckpt_dir=ckpt_dir,
                            checkpoint_every=tc.checkpoint_every, desc="vqgan")
    params = jax.device_get(state.params["vq"])
    stats = vqgan_stats(cfg, params, images[: min(len(images), 512)], mesh, rules, policy)
    log.info("vqgan: %d steps, reconstruction PSNR %.2f dB, %d/%d codes used (perplexity "
             "%.1f) on %d pretrain images", tc.steps, stats["psnr"], stats["codes_used"],
             n_codes, stats["perplexity"], stats["n"])
    return params


def _encode_decode_fn(cfg: vq.VQGANConfig, mesh: Mesh, param_sh: PyTree, policy: dict):
    model = vq.VQModel(cfg, **policy)

    def run(p, x_u8):
        x = to_unit_range(x_u8)
        z_q, idx = model.apply({"params": p}, x, method=vq.VQModel.encode)
        rec = model.apply({"params": p}, z_q, method=vq.VQModel.decode).astype(jnp.float32)
        return idx, jnp.mean((x - rec) ** 2, axis=(1, 2, 3))

    return jax.jit(run, in_shardings=(param_sh, batch_sharding(mesh, 4)),
                   out_shardings=(batch_sharding(mesh, 2), batch_sharding(mesh, 1)))


def _encode(cfg: vq.VQGANConfig, params: PyTree, images: np.ndarray, mesh: Mesh,
            batch_size: int, rules: Rules, policy: dict) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32[N,(H/f)^2], reconstruction MSE f32[N]) on the host."""
    images = np.asarray(images)
    vq.check_image_size(cfg, images.shape, "encode_tokens: images")
    p = place_params(cast_params(params, policy["param_dtype"]), mesh, rules)
    fn = _encode_decode_fn(cfg, mesh, jax.tree.map(lambda x: x.sharding, p), policy)
    bs = round_batch(batch_size, mesh)
    side = images.shape[1] // cfg.downsample_factor
    toks, mses = batched_apply(fn, p, (images,), bs, mesh,
                               empty=(np.zeros((0, side * side), np.int32),
                                      np.zeros((0,), np.float32)))
    return np.asarray(toks).astype(np.int32), np.asarray(mses)


def encode_tokens(cfg: vq.VQGANConfig, params: PyTree, images: np.ndarray, mesh: Mesh,
                  batch_size: int = 256, rules: Rules = DEFAULT_RULES,
                  policy: dict = FLOAT32) -> np.ndarray:
    """uint8[N,H,W,3] -> image tokens int32[N, (H/f)^2] (host), jitted and sharded over the
    mesh's data axis in fixed-size batches. DataError if the VQGAN cannot tokenise the size."""
    return _encode(cfg, params, images, mesh, batch_size, rules, policy)[0]


def vqgan_stats(cfg: vq.VQGANConfig, params: PyTree, images: np.ndarray, mesh: Mesh,
                rules: Rules = DEFAULT_RULES, policy: dict = FLOAT32) -> dict:
    """Reconstruction PSNR (dB, images in [-1,1], from the mean MSE), codes used and code
    perplexity over ``images`` uint8[N,H,W,3]."""
    tokens, mse = _encode(cfg, params, images, mesh, 256, rules, policy)
    counts = np.bincount(tokens.reshape(-1), minlength=cfg.n_embed)
    probs = counts / max(counts.sum(), 1)
    nz = probs[probs > 0]
    return {"n": int(len(images)),
            "psnr": float(10.0 * np.log10(4.0 / max(float(np.mean(mse)), 1e-12))),
            "codes_used": int(np.sum(counts > 0)),
            "perplexity": float(np.exp(-np.sum(nz * np.log(nz))))}


# ----------------------------------------------------------------------------- DalleBart

def token_nll(cfg: db.DalleBartConfig, params: PyTree, input_ids: jax.Array,
              attention_mask: jax.Array, image_tokens: jax.Array, *,
              dropout_rng: jax.Array | None = None, policy: dict = FLOAT32) -> jax.Array:
    """Teacher-forced negative log-likelihood per example, f32[B] (mean over the
    image_length positions) of image tokens int32[B,image_length] given text int32[B,S].

    The decoder reads ``decoder_start, t_0 .. t_{n-2}`` and predicts ``t_0 .. t_{n-1}`` (dalle-
    mini's shift-right). Dropout runs when ``dropout_rng`` is given. Used for training and as
    the white-box reference signal. ``policy``: the model's precision (the NLL is float32).
    """
    b = image_tokens.shape[0]
    start = jnp.full((b, 1), cfg.decoder_start_token_id, jnp.int32)
    dec_in = jnp.concatenate([start, image_tokens[:, :-1].astype(jnp.int32)], axis=1)
    det = dropout_rng is None
    rngs = {} if det else {"dropout": dropout_rng}
    logits = db.DalleBart(cfg, deterministic=det, **policy).apply(
        {"params": params}, input_ids, attention_mask, dec_in, rngs=rngs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, image_tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.mean(nll, axis=1)


def check_dalle_data(cfg: db.DalleBartConfig, text_ids: np.ndarray, text_mask: np.ndarray,
                     image_tokens: np.ndarray, where: str = "train_dallebart") -> None:
    """DataError unless text is int[N,S<=max_text_length] within the encoder vocabulary and
    tokens are int[N,image_length] within [0, image_vocab_size)."""
    text_ids, text_mask = np.asarray(text_ids), np.asarray(text_mask)
    image_tokens = np.asarray(image_tokens)
    if text_ids.ndim != 2 or text_ids.shape != text_mask.shape:
        raise DataError(f"{where}: text ids {text_ids.shape} and mask {text_mask.shape}, "
                        "expected two equal shapes [N, S]")
    if text_ids.shape[1] > cfg.max_text_length:
        raise DataError(f"{where}: {text_ids.shape[1]} text tokens per caption, expected at "
                        f"most max_text_length = {cfg.max_text_length}")
    if text_ids.size and (text_ids.min() < 0 or text_ids.max() >= cfg.encoder_vocab_size):
        raise DataError(f"{where}: text ids in [{text_ids.min()}, {text_ids.max()}], expected "
                        f"[0, encoder_vocab_size = {cfg.encoder_vocab_size})")
    if image_tokens.shape != (text_ids.shape[0], cfg.image_length):
        raise DataError(f"{where}: image tokens {image_tokens.shape}, expected "
                        f"({text_ids.shape[0]}, image_length = {cfg.image_length})")
    if image_tokens.size and (image_tokens.min() < 0 or
                              image_tokens.max() >= cfg.image_vocab_size):
        raise DataError(f"{where}: image tokens in [{image_tokens.min()}, "
                        f"{image_tokens.max()}], expected [0, image_vocab_size = "
                        f"{cfg.image_vocab_size})")


def train_dallebart(cfg: db.DalleBartConfig, text_ids: np.ndarray, text_mask: np.ndarray,
                    image_tokens: np.ndarray, uncond_ids: np.ndarray, uncond_mask: np.ndarray,
                    tc: TrainConfig, *, caption_dropout: float, seed: int, mesh: Mesh,
                    ckpt_dir: str | None, rules: Rules = DEFAULT_RULES,
                    policy: dict = FLOAT32) -> PyTree:
    """Trains DalleBart with teacher-forced cross-entropy on a model's members.

    Args:
      text_ids, text_mask: int32[N,S] caption tokens (S <= max_text_length).
      image_tokens: int32[N,image_length] VQGAN codes of the members' images.
      uncond_ids, uncond_mask: int32[S] the empty caption; each caption is replaced by it
        with probability ``caption_dropout``, which is what makes super-conditioning
        (guidance on logits against the empty caption) meaningful at sampling time.
    Returns the parameters (the EMA when ``tc.ema_decay > 0``).
    """
    check_dalle_data(cfg, text_ids, text_mask, image_tokens)
    if not 0.0 <= caption_dropout < 1.0:
        raise DataError(f"train_dallebart: caption_dropout = {caption_dropout}, expected [0, 1)")
    s = np.shape(text_ids)[1]
    u_ids = np.asarray(uncond_ids, np.int32).reshape(-1)
    u_mask = np.asarray(uncond_mask, np.int32).reshape(-1)
    if u_ids.shape != (s,) or u_mask.shape != (s,):
        raise DataError(f"train_dallebart: the empty caption has {u_ids.shape[0]} ids / "
                        f"{u_mask.shape[0]} mask values, expected {s} like the captions")
    text_ids = np.asarray(text_ids, np.int32)
    text_mask = np.asarray(text_mask, np.int32)
    image_tokens = np.asarray(image_tokens, np.int32)
    bs = round_batch(tc.batch_size, mesh)
    k0, k1 = jax.random.split(jax.random.PRNGKey(seed))
    pdt = policy["param_dtype"]
    params = init_sharded(lambda k: cast_params(db.init_dallebart(cfg, k), pdt), mesh, rules, k0)
    tx = make_optimizer(tc)
    u_ids_j, u_mask_j = jnp.asarray(u_ids), jnp.asarray(u_mask)
    use_dropout = cfg.dropout > 0 or cfg.attention_dropout > 0 or cfg.activation_dropout > 0

    def loss_fn(p, batch, rng):
        kd, kdrop = jax.random.split(rng)
        b = batch["ids"].shape[0]
        drop = jax.random.bernoulli(kd, caption_dropout, (b,))[:, None]
        ids = jnp.where(drop, u_ids_j[None], batch["ids"])
        mask = jnp.where(drop, u_mask_j[None], batch["mask"])
        nll = token_nll(cfg, p, ids, mask, batch["tokens"],
                        dropout_rng=kdrop if use_dropout else None, policy=policy)
        return jnp.mean(nll), {}

    index = epoch_batches(len(image_tokens), bs, seed)

    def batch_fn(step):
        idx = index(step)
        return {"ids": text_ids[idx], "mask": text_mask[idx], "tokens": image_tokens[idx]}

    out, history = train_with_config(loss_fn, tx, params, k1, batch_fn, tc, mesh,
                                     ckpt_dir=ckpt_dir, desc="dallebart", rules=rules)
    if history:
        log.info("dallebart: %d steps on %d captions, final loss %.4f", tc.steps,
                 len(image_tokens), history[-1]["loss"])
    return out
