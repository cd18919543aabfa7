"""Contrastive training of :class:`t2i_mia.models.clip.CLIPModel` on (image, caption) pairs.

The adversary uses it to train its own image/text encoders (semantic and faithfulness
attacks) when no pretrained CLIP is given. It runs on the loop every model shares
(:mod:`t2i_mia.training.loop`: mesh, checkpoints, resume, EMA), with AdamW on a linear
warm-up then cosine decay and the symmetric InfoNCE loss of
:func:`t2i_mia.models.clip.clip_contrastive_loss`; every ``encoder.train.*`` key is used.

Optionally (``image_ssl_weight`` > 0) an image-image InfoNCE term as in SLIP (Mu et al.
2022): two mildly augmented views of each image (a shift of up to 2 pixels, a random blur,
pixel noise) must find each other among the batch. Given ``views`` (one per image), the
second view comes from the image's view instead: with the public autoencoder's
reconstructions as views, the embedding learns to recognise an image through the decoder,
which is what every generation passes through. Captions only name coarse content, so
caption-image training alone gives embeddings that ignore the per-image detail (exact
layout, texture) a memorised generation reproduces; the image term makes the image
embedding instance-specific while staying robust to the blur and noise of generation.

Given ``negatives`` (one per image), each image's hard negative joins the candidates of
both directions of the image-image term, and a pair term (weight ``hard_negative_weight``)
asks that the image's view be closer to it than its own hard negative. With the public base
model's generation of the image's own caption as its negative, the negative shows the same
named content without the image's own detail: what a non-member's generations are. Random
in-batch negatives rarely share a caption, so without them the embedding can tell images
apart by their named content alone, and the semantic attack needs it to weigh the rest.
With ``augmentation="coarse"`` (:func:`coarse_augment`) most views are downsampled first,
so images meet at their layout and colours.

Determinism: for a seed, the initial parameters come from ``fold_in(key(seed), 0)``, the
augmentations of step ``s`` from ``fold_in(fold_in(key(seed), 2), s)`` and the batches from
:func:`t2i_mia.training.loop.epoch_batches` (seed), so a run (and a resumed run) repeats
exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from t2i_mia.config import TrainConfig
from t2i_mia.errors import ConfigError, DataError
from t2i_mia.models.clip import (CLIPConfig, CLIPModel, clip_contrastive_loss, init_clip,
                                 preprocess_images)
from t2i_mia.models.precision import FLOAT32, cast_params
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.parallel.mesh import DEFAULT_RULES, Rules, init_sharded, make_mesh
from t2i_mia.training.loop import epoch_batches, train_with_config

PyTree = Any


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW (b2 = 0.98 as CLIP) on a linear warm-up (``tc.warmup_steps``) + cosine decay to
    0 over ``tc.steps``, global-norm clipping at ``tc.grad_clip`` (0 = none).

    Adam moments live on one flat vector: the same arithmetic, far fewer kernels to compile.
    Decoupled weight decay (``tc.weight_decay``) applies to matrices only (not to biases,
    norm gains, the class token or logit_scale), as CLIP training does.
    """
    warmup = max(1, tc.warmup_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.learning_rate, warmup_steps=warmup,
        decay_steps=max(tc.steps, warmup + 1), end_value=0.0)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
    parts += [optax.flatten(optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-6)),
              optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
              optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)


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


AUGMENTATIONS = ("mild", "coarse")
COARSE_FACTORS = (8, 4, 2)  # the downsamples of coarse_augment: side / 8, / 4, / 2


def coarse_augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """f32[B,S,S,3] -> the same shape: per image, with probability 3/4 one of the antialiased
    downsamples to S/8, S/4 or S/2 (each 1/4) upsampled back bilinearly, then
    :func:`augment`. An image and its view then meet at the layout and colours alone, the
    part of an image that a partly memorised generation keeps first."""
    b, s = x.shape[0], x.shape[1]
    kp, ka = jax.random.split(key)
    options = [jax.image.resize(jax.image.resize(x, (b, max(1, s // f), max(1, s // f), 3),
                                                 "linear", antialias=True), x.shape, "linear")
               for f in COARSE_FACTORS] + [x]
    pick = jax.random.randint(kp, (b,), 0, len(options))
    return augment(ka, jnp.stack(options)[pick, jnp.arange(b)])


def image_ssl_loss(params: PyTree, model: CLIPModel, view1: jax.Array, view2: jax.Array,
                   negatives: jax.Array | None = None, pair_weight: float = 0.0) -> jax.Array:
    """Symmetric InfoNCE between the L2-normalised image embeddings of two views f32[B,...]
    (view i of one matches view i of the other).

    negatives: None or f32[B,...], row i's hard negative; all B join the candidates of both
    directions (B + B logits per row), and ``pair_weight`` times a two-way softmax asks that
    row i's view2 be closer to its view1 than its own negative is.
    """
    parts = [view1, view2] + ([negatives] if negatives is not None else [])
    z = model.apply(params, jnp.concatenate(parts), method="get_image_features")
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    b = view1.shape[0]
    z1, z2 = z[:b], z[b:2 * b]
    logits = z1 @ z2.T / SSL_TEMPERATURE
    back = logits.T
    labels = jnp.arange(b)
    if negatives is not None:
        zn = z[2 * b:]
        logits = jnp.concatenate([logits, z1 @ zn.T / SSL_TEMPERATURE], axis=1)
        back = jnp.concatenate([back, z2 @ zn.T / SSL_TEMPERATURE], axis=1)
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(back, labels).mean())
    if negatives is not None and pair_weight > 0:
        pair = jnp.stack([jnp.sum(z1 * z2, -1), jnp.sum(z1 * zn, -1)], -1) / SSL_TEMPERATURE
        loss = loss + pair_weight * optax.softmax_cross_entropy_with_integer_labels(
            pair, jnp.zeros(b, jnp.int32)).mean()
    return loss


def clip_loss(model: CLIPModel, params: PyTree, batch: dict, rng: jax.Array,
              ssl_weight: float = 0.0, pair_weight: float = 0.0,
              augmentation: str = "mild") -> jax.Array:
    """The training objective f32[]: symmetric image-caption InfoNCE plus ``ssl_weight``
    times the image-image term on two augmented views drawn from ``rng``.

    batch: pixel_values f32[B,S,S,3] (CLIP-normalised NHWC), input_ids int32[B,L],
    attention_mask int32[B,L]; optional view_values f32[B,S,S,3]: the second view's source
    (default: pixel_values); optional negative_values f32[B,S,S,3]: each row's hard negative
    (augmented too), with ``pair_weight`` for its pair term (:func:`image_ssl_loss`).
    ``augmentation``: "mild" (:func:`augment`) or "coarse" (:func:`coarse_augment`).
    """
    aug = coarse_augment if augmentation == "coarse" else augment
    loss = clip_contrastive_loss(params, model, batch["pixel_values"], batch["input_ids"],
                                 batch["attention_mask"])
    if ssl_weight > 0:
        k1, k2 = jax.random.split(rng)
        x = batch["pixel_values"]
        # the second view: the image again, or its given counterpart (e.g. the autoencoder's
        # reconstruction, the kind of image a generation is)
        y = batch.get("view_values", x)
        neg = batch.get("negative_values")
        if neg is not None:
            k2, k3 = jax.random.split(k2)
            neg = aug(k3, neg)
        loss = loss + ssl_weight * image_ssl_loss(params, model, aug(k1, x), aug(k2, y), neg,
                                                  pair_weight)
    return loss


def _one_per_image(a, name: str, need: str, images: np.ndarray,
                   ssl_weight: float) -> np.ndarray | None:
    """``a`` (None or uint8[N,H,W,3], an image-image term input) as an array, checked to
    match ``images`` and to have an image term to feed."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.shape != images.shape:
        raise DataError(f"train_clip: {name} of shape {a.shape} for images of shape "
                        f"{images.shape}; need {need}, the same shape")
    if not ssl_weight > 0:
        raise ConfigError(f"train_clip: {name} are the image-image term's; they need "
                          "image_ssl_weight > 0")
    return a


def train_clip(images: np.ndarray, captions: Sequence[str], tokenizer: TextTokenizer,
               cfg: CLIPConfig, tc: TrainConfig, seed: int, *, image_ssl_weight: float = 0.0,
               views: np.ndarray | None = None, negatives: np.ndarray | None = None,
               hard_negative_weight: float = 1.0, augmentation: str = "mild",
               mesh: Mesh | None = None,
               ckpt_dir: str | None = None, progress: bool = True,
               return_losses: bool = False, rules: Rules = DEFAULT_RULES,
               policy: dict = FLOAT32):
    """Trains CLIPModel(cfg) from scratch on pairs (images[i], captions[i]), plus
    ``image_ssl_weight`` times the image-image term (see the module docstring), on the
    shared loop (:mod:`t2i_mia.training.loop`): batches sharded over ``mesh``'s data axis
    (default: one device), parameters and optimiser state split over its model axis by
    ``rules``, the precision ``policy`` (:mod:`t2i_mia.models.precision`), checkpoints every ``tc.checkpoint_every`` steps in ``ckpt_dir``
    (resumed from when it holds one), EMA when ``tc.ema_decay`` > 0.

    images: uint8[N,H,W,3] (resized to the vision tower's image_size if needed);
    captions: N str; views: None or uint8[N,H,W,3], the image-image term's second view of
    each image (e.g. its reconstruction through a public autoencoder) in place of the image
    itself; negatives: None or uint8[N,H,W,3], each image's hard negative for that term (e.g.
    the public base model's generation of its caption), with ``hard_negative_weight`` for
    its pair term (see the module docstring); augmentation: the image-image term's views,
    "mild" or "coarse" (:func:`coarse_augment`). Returns variables {"params": ...} (numpy;
    the EMA's with EMA), or (variables, losses f32[steps run]) with ``return_losses``.
    """
    images = np.asarray(images)
    captions = list(captions)
    n = len(captions)
    if images.ndim != 4 or images.shape[0] != n:
        raise DataError(f"train_clip: {images.shape[0] if images.ndim else 0} images "
                        f"(shape {images.shape}) for {n} captions; need uint8[N,H,W,3]")
    for name, v in (("steps", tc.steps), ("batch_size", tc.batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"train_clip: {name} = {v!r}; need a positive int")
    if not image_ssl_weight >= 0:
        raise ConfigError(f"train_clip: image_ssl_weight = {image_ssl_weight!r}; need >= 0")
    views = _one_per_image(views, "views", "one view per image", images, image_ssl_weight)
    negatives = _one_per_image(negatives, "negatives", "one hard negative per image", images,
                               image_ssl_weight)
    if augmentation not in AUGMENTATIONS:
        raise ConfigError(f"train_clip: augmentation = {augmentation!r}; expected one of "
                          f"{AUGMENTATIONS}")
    if not hard_negative_weight >= 0:
        raise ConfigError(f"train_clip: hard_negative_weight = {hard_negative_weight!r}; "
                          "need >= 0")
    if tc.batch_size > n:
        raise ConfigError(f"train_clip: batch_size = {tc.batch_size} exceeds the {n} pairs")
    text_cfg = cfg.text_config
    if tokenizer.vocab_size > text_cfg.vocab_size:
        raise ConfigError(f"train_clip: tokenizer has {tokenizer.vocab_size} ids but "
                          f"text_config.vocab_size = {text_cfg.vocab_size}")
    if tokenizer.max_length > text_cfg.max_position_embeddings:
        raise ConfigError(f"train_clip: tokenizer max_length = {tokenizer.max_length} exceeds "
                          f"text_config.max_position_embeddings = "
                          f"{text_cfg.max_position_embeddings}")
    if not tokenizer.eos_is_highest_id:
        raise ConfigError("train_clip: the tokenizer's eos is not its highest id; CLIP's "
                          "argmax pooling needs it (use TextTokenizer.train or a CLIP vocab)")
    mesh = mesh if mesh is not None else make_mesh(devices=jax.devices()[:1])
    d = mesh.shape["data"]
    if tc.batch_size % d:
        raise ConfigError(f"train_clip: batch_size = {tc.batch_size} does not divide over the "
                          f"mesh's {d} data devices")

    pixels = preprocess_images(images, cfg.vision_config.image_size)
    view_pixels = (preprocess_images(views, cfg.vision_config.image_size)
                   if views is not None else None)
    neg_pixels = (preprocess_images(negatives, cfg.vision_config.image_size)
                  if negatives is not None else None)
    ids, mask = tokenizer.encode(captions)

    root = jax.random.key(seed)
    model = CLIPModel(cfg, **policy)
    pdt = policy["param_dtype"]
    params = init_sharded(lambda k: cast_params(init_clip(cfg, k), pdt), mesh, rules,
                          jax.random.fold_in(root, 0))
    tx = make_optimizer(tc)
    ssl, pair = float(image_ssl_weight), float(hard_negative_weight)

    def loss_fn(p, batch, rng):
        return clip_loss(model, p, batch, rng, ssl, pair, augmentation), {}

    index = epoch_batches(n, tc.batch_size, seed)

    def batch_fn(step):
        idx = index(step)
        batch = {"pixel_values": pixels[idx], "input_ids": ids[idx], "attention_mask": mask[idx]}
        if view_pixels is not None:
            batch["view_values"] = view_pixels[idx]
        if neg_pixels is not None:
            batch["negative_values"] = neg_pixels[idx]
        return batch

    # the state's rng is the augmentation stream: step s draws fold_in(rng, s)
    out, history = train_with_config(loss_fn, tx, params, jax.random.fold_in(root, 2),
                                     batch_fn, tc, mesh, ckpt_dir=ckpt_dir, desc="clip",
                                     progress=progress, rules=rules)
    if return_losses:
        return out, np.asarray([h["loss"] for h in history], np.float32)
    return out
