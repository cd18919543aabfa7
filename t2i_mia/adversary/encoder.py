"""The adversary's CLIP two-tower encoder: image and caption embeddings, jitted, on device.

From a local Hugging Face Flax CLIP checkpoint (``adversary.encoder.dir``), or trained
contrastively on the ``auxiliary`` split (the default: the adversary's own data, disjoint
from every target and shadow split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from t2i_mia.errors import CheckpointError, ConfigError
from t2i_mia.models.clip import CLIP_MEAN, CLIP_STD, CLIPConfig, CLIPModel, load_clip, save_clip
from t2i_mia.models.precision import FLOAT32, cast_params, policy_tag
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.parallel.batching import batched_apply, round_batch
from t2i_mia.parallel.mesh import DEFAULT_RULES, Rules, batch_sharding, place_params
from t2i_mia.targets.factory import cache_key
from t2i_mia.training.clip_train import train_clip

log = logging.getLogger(__name__)
PyTree = Any


def device_preprocess(images: jax.Array, size: int) -> jax.Array:
    """uint8[B,H,W,3] -> f32[B,size,size,3] CLIP-normalised, on device (jittable).

    Square inputs of another size are resized bicubically (jax.image.resize); this is the
    on-device twin of :func:`t2i_mia.models.clip.preprocess_images` for square images.
    """
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bicubic")
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


class Encoder:
    """``embed_images(uint8[N,H,W,3]) -> f32[N,P]`` and ``embed_texts(list[str]) ->
    f32[N,P]``, both L2-normalised, computed in fixed-size jitted batches over the mesh
    (the batch over its data axis, the parameters split over its model axis by ``rules``),
    with the precision ``policy`` (:mod:`t2i_mia.models.precision`)."""
    def __init__(self, cfg: CLIPConfig, params: PyTree, tokenizer: TextTokenizer, mesh: Mesh,
                 batch_size: int = 256, rules: Rules = DEFAULT_RULES, policy: dict = FLOAT32):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.batch_size = round_batch(batch_size, mesh)
        if isinstance(params, dict) and set(params) == {"params"}:
            params = params["params"]  # accept variables as well as the bare tree
        self.params = place_params(cast_params(params, policy["param_dtype"]), mesh, rules)
        model = CLIPModel(cfg, **policy)
        size = cfg.vision_config.image_size

        def img(p, x):
            e = model.apply({"params": p}, device_preprocess(x, size),
                            method=CLIPModel.get_image_features)
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-12)

        def txt(p, ids, mask):
            e = model.apply({"params": p}, ids, mask, method=CLIPModel.get_text_features)
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-12)

        self._img = jax.jit(img, out_shardings=batch_sharding(mesh, 2))
        self._txt = jax.jit(txt, out_shardings=batch_sharding(mesh, 2))

    def _batched(self, fn, *arrays):
        width = self.cfg.projection_dim
        return batched_apply(fn, self.params, arrays, self.batch_size, self.mesh,
                             to_host=False, empty=jnp.zeros((0, width), jnp.float32))

    def embed_images(self, images) -> jax.Array:
        """uint8[N,H,W,3] (numpy or on device) -> f32[N,P] on device."""
        return self._batched(self._img, jnp.asarray(images))

    def embed_texts(self, captions: Sequence[str]) -> jax.Array:
        ids, mask = self.tokenizer.encode(list(captions))
        return self._batched(self._txt, jnp.asarray(ids), jnp.asarray(mask))


def load_encoder(folder: str, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                 policy: dict = FLOAT32) -> Encoder:
    """A local HF Flax CLIP checkpoint: config.json + flax_model.msgpack + tokenizer files
    (tokenizer.json, or vocab.json + merges.txt)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: encoder folder not found (expected a Hugging Face "
                              "Flax CLIP checkpoint: config.json, flax_model.msgpack, tokenizer)")
    cfg, params = load_clip(folder)
    tok = TextTokenizer.from_folder(folder)
    return Encoder(cfg, params, tok, mesh, rules=rules, policy=policy)


def train_or_load_encoder(enc_cfg, images: np.ndarray, captions: list[str], aux_hash: str,
                          seed: int, cache, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                          policy: dict = FLOAT32, views: np.ndarray | None = None,
                          negatives: np.ndarray | None = None) -> Encoder:
    """CLIP trained contrastively on ``images`` uint8[N,H,W,3] and their captions (the
    auxiliary split, or the public pool), cached like every model. ``views`` uint8[N,H,W,3]:
    the image-image term's second views, required with ``ssl_views`` "autoencoder" (the
    images' reconstructions through the public autoencoder); ``negatives`` uint8[N,H,W,3]:
    its hard negatives, required with ``hard_negatives`` "base" (the public base LDM's
    generations of the captions, :func:`t2i_mia.targets.public.base_generations`). Their
    content enters the key."""
    section = dataclasses.asdict(enc_cfg)
    if section.get("augmentation") == "mild":  # the defaults keep earlier cache keys
        del section["augmentation"]
    if section.get("hard_negatives") == "none":
        del section["hard_negatives"], section["hard_negative_weight"]
        negatives = None
    elif negatives is None:
        raise ConfigError(f"adversary.encoder.hard_negatives = {enc_cfg.hard_negatives!r}: the "
                          "encoder's training needs the public base LDM's generations of its "
                          "captions (public.components with a base, or python -m "
                          "t2i_mia.pretrain)")
    if section.get("image_ssl_weight") == 0.0:  # the defaults keep earlier cache keys
        del section["image_ssl_weight"]
    if section.get("ssl_views") == "augment":
        del section["ssl_views"]
        views = None  # the image term pairs two augmentations of each image
    elif views is None:
        raise ConfigError(f"adversary.encoder.ssl_views = {enc_cfg.ssl_views!r}: the encoder's "
                          "training needs the images' reconstructions through the public "
                          "autoencoder (public.components, or python -m t2i_mia.pretrain)")
    extra = [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
             for a in (views, negatives) if a is not None]
    # "loop": trained on the shared loop, honouring every encoder.train key
    key = cache_key("clip", "loop", section, aux_hash, seed, *policy_tag(policy), *extra)
    folder = cache.model_dir("encoder", key)
    if cache.done("encoder", key):
        log.info("encoder: cached %s", folder)
        return load_encoder(folder, mesh, rules, policy)
    cfg = CLIPConfig.from_dict(enc_cfg.clip, "config 'adversary.encoder.clip'")
    tok = TextTokenizer.train(captions, vocab_size=enc_cfg.vocab_size,
                              max_length=enc_cfg.max_text_length)
    params = train_clip(images, captions, tok, cfg, enc_cfg.train, seed,
                        image_ssl_weight=enc_cfg.image_ssl_weight,
                        views=views, negatives=negatives,
                        hard_negative_weight=enc_cfg.hard_negative_weight,
                        augmentation=enc_cfg.augmentation, mesh=mesh,
                        ckpt_dir=cache.ckpt_dir("encoder", key), rules=rules, policy=policy)
    os.makedirs(folder, exist_ok=True)
    save_clip(folder, cfg, params)
    tok.save(folder)
    cache.mark_done("encoder", key, {"trained_on": "auxiliary", "n": int(len(images))})
    return Encoder(cfg, params, tok, mesh, rules=rules, policy=policy)
