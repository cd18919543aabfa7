"""Contrastive training of :class:`t2i_mia.models.clip.CLIPModel` on (image, caption) pairs.

The adversary uses it to train its own image/text encoders (semantic and faithfulness
attacks) when no pretrained CLIP is given.  Self-contained: single device, AdamW with linear
warm-up then cosine decay, the symmetric InfoNCE loss of
:func:`t2i_mia.models.clip.clip_contrastive_loss`.

Optionally (``image_ssl_weight`` > 0) an image-image InfoNCE term as in SLIP (Mu et al.
2022): two mildly augmented views of each image (a shift of up to 2 pixels, a random blur,
pixel noise) must find each other among the batch. Captions only name coarse content, so
caption-image training alone gives embeddings that ignore the per-image detail (exact
layout, texture) a memorised generation reproduces; the image term makes the image
embedding instance-specific while staying robust to the blur and noise of generation.

Determinism: for a seed, the initial parameters come from ``fold_in(key(seed), 0)`` and the
batch order of epoch ``e`` from ``permutation(fold_in(fold_in(key(seed), 1), e), N)``
(drop-last batches), so a run repeats exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from t2i_mia.errors import ConfigError, DataError
from t2i_mia.models.clip import (CLIPConfig, CLIPModel, clip_contrastive_loss, init_clip,
                                 preprocess_images)
from t2i_mia.models.tokenizer import TextTokenizer

PyTree = Any


class ClipTrainState(struct.PyTreeNode):
    """step int32[], variables {"params": ...}, optimiser state; model and tx are static."""
    step: jax.Array
    params: PyTree
    opt_state: PyTree
    model: CLIPModel = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


@functools.lru_cache(maxsize=16)
def make_optimizer(lr: float, steps: int, warmup_steps: int | None = None,
                   weight_decay: float = 0.1) -> optax.GradientTransformation:
    """AdamW (b2 = 0.98 as CLIP) on a warm-up (default 10% of steps) + cosine schedule.

    Cached: the same settings give the same object, so :func:`train_step` (for which the
    optimiser is static) is not recompiled by a repeated run.
    """
    if warmup_steps is None:
        warmup_steps = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(steps, warmup_steps + 1), end_value=0.0)
    # Adam moments on one flat vector: the same arithmetic, far fewer kernels to compile.
    # Decoupled weight decay on matrices only (not on biases, norm gains, the class token
    # or logit_scale), as CLIP training does.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.flatten(optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-6)),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule))


def create_state(model: CLIPModel, params: PyTree,
                 tx: optax.GradientTransformation) -> ClipTrainState:
    return ClipTrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model=model, tx=tx)


SSL_TEMPERATURE = 0.1  # SimCLR's temperature for the image-image term
MAX_SHIFT = 2  # pixels


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """f32[B,S,S,3] -> the same shape: per image a shift of up to MAX_SHIFT pixels (edge
    padded), a blend with its 3x3 box blur (weight ~ U[0,1)) and Gaussian noise
    (sd ~ U[0, 0.1) in normalised units)."""
    b, s = x.shape[0], x.shape[1]
    ks, kb, kn, ke = jax.random.split(key, 4)
    pad = jnp.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)),
                  mode="edge")
    off = jax.random.randint(ks, (b, 2), 0, 2 * MAX_SHIFT + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (s, s, 3)))(pad, off)
    blur = jax.lax.reduce_window(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"),
                                 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "VALID") / 9.0
    a = jax.random.uniform(kb, (b, 1, 1, 1))
    x = (1.0 - a) * x + a * blur
    sd = 0.1 * jax.random.uniform(kn, (b, 1, 1, 1))
    return x + sd * jax.random.normal(ke, x.shape)


def image_ssl_loss(params: PyTree, model: CLIPModel, view1: jax.Array,
                   view2: jax.Array) -> jax.Array:
    """Symmetric InfoNCE between the L2-normalised image embeddings of two views f32[B,...]
    (view i of one matches view i of the other)."""
    z = model.apply(params, jnp.concatenate([view1, view2]), method="get_image_features")
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    b = view1.shape[0]
    logits = z[:b] @ z[b:].T / SSL_TEMPERATURE
    labels = jnp.arange(b)
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


@functools.partial(jax.jit, static_argnames=("ssl_weight",))
def train_step(state: ClipTrainState, batch: dict, key: jax.Array | None = None,
               ssl_weight: float = 0.0) -> tuple[ClipTrainState, jax.Array]:
    """One optimiser step on a batch of matching pairs.

    batch: pixel_values f32[B,S,S,3] (CLIP-normalised NHWC), input_ids int32[B,L],
    attention_mask int32[B,L]. ``key`` (needed when ``ssl_weight`` > 0) draws the two
    augmented views of the image-image term. Returns (new state, loss before the step f32[]).
    """
    def loss_fn(params):
        loss = clip_contrastive_loss(params, state.model, batch["pixel_values"],
                                     batch["input_ids"], batch["attention_mask"])
        if ssl_weight > 0:
            k1, k2 = jax.random.split(key)
            x = batch["pixel_values"]
            loss = loss + ssl_weight * image_ssl_loss(params, state.model, augment(k1, x),
                                                      augment(k2, x))
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss


def train_clip(images: np.ndarray, captions: Sequence[str], tokenizer: TextTokenizer,
               cfg: CLIPConfig, steps: int, batch_size: int, lr: float, seed: int, *,
               warmup_steps: int | None = None, weight_decay: float = 0.1,
               image_ssl_weight: float = 0.0, progress: bool = True,
               return_losses: bool = False):
    """Trains CLIPModel(cfg) from scratch on pairs (images[i], captions[i]), plus
    ``image_ssl_weight`` times the image-image term (see the module docstring).

    images: uint8[N,H,W,3] (resized to the vision tower's image_size if needed);
    captions: N str.  Returns variables {"params": ...} (numpy), or
    (variables, losses f32[steps]) with ``return_losses``.
    """
    images = np.asarray(images)
    captions = list(captions)
    n = len(captions)
    if images.ndim != 4 or images.shape[0] != n:
        raise DataError(f"train_clip: {images.shape[0] if images.ndim else 0} images "
                        f"(shape {images.shape}) for {n} captions; need uint8[N,H,W,3]")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"train_clip: {name} = {v!r}; need a positive int")
    if not image_ssl_weight >= 0:
        raise ConfigError(f"train_clip: image_ssl_weight = {image_ssl_weight!r}; need >= 0")
    if batch_size > n:
        raise ConfigError(f"train_clip: batch_size = {batch_size} exceeds the {n} pairs")
    tc = cfg.text_config
    if tokenizer.vocab_size > tc.vocab_size:
        raise ConfigError(f"train_clip: tokenizer has {tokenizer.vocab_size} ids but "
                          f"text_config.vocab_size = {tc.vocab_size}")
    if tokenizer.max_length > tc.max_position_embeddings:
        raise ConfigError(f"train_clip: tokenizer max_length = {tokenizer.max_length} exceeds "
                          f"text_config.max_position_embeddings = {tc.max_position_embeddings}")
    if not tokenizer.eos_is_highest_id:
        raise ConfigError("train_clip: the tokenizer's eos is not its highest id; CLIP's "
                          "argmax pooling needs it (use TextTokenizer.train or a CLIP vocab)")

    pixels = preprocess_images(images, cfg.vision_config.image_size)
    ids, mask = tokenizer.encode(captions)

    root = jax.random.key(seed)
    model = CLIPModel(cfg)
    params = init_clip(cfg, jax.random.fold_in(root, 0))
    state = create_state(model, params, make_optimizer(lr, steps, warmup_steps, weight_decay))
    order_key = jax.random.fold_in(root, 1)
    aug_key = jax.random.fold_in(root, 2)

    per_epoch = n // batch_size
    losses = []
    bar = tqdm(range(steps), desc="clip", disable=not progress, leave=False)
    perm = None
    for step in bar:
        epoch, j = divmod(step, per_epoch)
        if j == 0:
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(order_key, epoch), n))
        idx = perm[j * batch_size:(j + 1) * batch_size]
        batch = {"pixel_values": pixels[idx], "input_ids": ids[idx], "attention_mask": mask[idx]}
        if image_ssl_weight > 0:
            state, loss = train_step(state, batch, jax.random.fold_in(aug_key, step),
                                     ssl_weight=float(image_ssl_weight))
        else:
            state, loss = train_step(state, batch)
        losses.append(loss)
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{float(loss):.4f}")
    out = jax.device_get(state.params)
    if return_losses:
        return out, np.asarray(jax.device_get(jnp.stack(losses)), np.float32)
    return out
