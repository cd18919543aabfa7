"""Trains (and caches) the models of an audit from a config: the LDM's autoencoder,
tokenizer and U-Nets, DALL-E mini's VQGAN, tokenizer and DalleBarts.

A trained model is reused from ``--work-dir`` only when its cache key matches: the hash of
the resolved training config + the split-manifest hash of its training split + seed +
package version (docs/design.md: Caching). Trained LDMs are saved as Stable Diffusion Flax
folders, so ``--target-dir`` loads them like any public checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
from jax.sharding import Mesh

import t2i_mia
from t2i_mia.config import Config
from t2i_mia.errors import ConfigError
from t2i_mia.models import autoencoder_kl, formats, schedulers
from t2i_mia.models import dallebart as db
from t2i_mia.models import unet as unet_lib
from t2i_mia.models import vqgan as vq
from t2i_mia.models.clip import CLIPTextConfig
from t2i_mia.models.ldm import LDMComponents, load_stable_diffusion, save_stable_diffusion
from t2i_mia.models.precision import policy_of, policy_tag
from t2i_mia.models.text_normalize import normalize_text
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.parallel.mesh import config_rules
from t2i_mia.targets.public import components_for
from t2i_mia.targets.dalle_mini import (CAPTION_DROPOUT, DalleMiniComponents, empty_caption,
                                        load_dalle_mini, save_dalle_mini, tokenize_captions)
from t2i_mia.training.dalle_train import encode_tokens, train_dallebart, train_vqgan, vqgan_stats
from t2i_mia.training.ldm_train import encode_latents, train_autoencoder, train_ldm

log = logging.getLogger(__name__)
PyTree = Any


def cache_key(*parts: Any) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``parts`` + package version."""
    blob = json.dumps([t2i_mia.__version__, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ids_hash(hashes: list[str]) -> str:
    """Hash of a split's content hashes (order-independent)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


class ModelCache:
    """``<work_dir>/models/<name>-<key>/`` holds a finished model and ``cache.json``;
    ``<work_dir>/ckpt/<name>-<key>/`` holds its training checkpoints (resume)."""
    def __init__(self, work_dir: str):
        self.work_dir = work_dir

    def model_dir(self, name: str, key: str) -> str:
        return os.path.join(self.work_dir, "models", f"{name}-{key}")

    def ckpt_dir(self, name: str, key: str) -> str:
        return os.path.join(self.work_dir, "ckpt", f"{name}-{key}")

    def done(self, name: str, key: str) -> bool:
        return os.path.isfile(os.path.join(self.model_dir(name, key), "cache.json"))

    def mark_done(self, name: str, key: str, info: dict) -> None:
        formats.write_json(os.path.join(self.model_dir(name, key), "cache.json"),
                           {"key": key, "version": t2i_mia.__version__, **info})


# ----------------------------------------------------------------------------- LDM

def train_or_load_autoencoder(cfg: Config, pretrain_images: np.ndarray, pretrain_hash: str,
                              cache: ModelCache, mesh: Mesh):
    """The autoencoder shared by target and shadow, trained on ``pretrain``."""
    vae_cfg = autoencoder_kl.AutoencoderKLConfig.from_dict(cfg.ldm.vae, "config 'ldm.vae'")
    key = cache_key("vae", cfg.ldm.vae, cfg.ldm.vae_train.__dict__, cfg.ldm.vae_kl_weight,
                    pretrain_hash, cfg.seed, *policy_tag(policy_of(cfg)))
    folder = cache.model_dir("vae", key)
    if cache.done("vae", key):
        log.info("autoencoder: cached %s", folder)
        return autoencoder_kl.load_vae(folder)
    vae_cfg, params = train_autoencoder(
        vae_cfg, pretrain_images, cfg.ldm.vae_train, kl_weight=cfg.ldm.vae_kl_weight,
        seed=cfg.seed, mesh=mesh, ckpt_dir=cache.ckpt_dir("vae", key), rules=config_rules(cfg),
        policy=policy_of(cfg))
    autoencoder_kl.save_vae(folder, vae_cfg, params)
    cache.mark_done("vae", key, {"trained_on": "pretrain", "n": int(len(pretrain_images))})
    return vae_cfg, params


def train_or_load_tokenizer(cfg: Config, captions: list[str], captions_hash: str,
                            cache: ModelCache):
    """The LDM's caption tokenizer: a BPE trained on the ``pretrain`` captions (shared by
    target and shadow: it is part of the public, non-member-specific pipeline)."""
    key = cache_key("tokenizer", cfg.ldm.vocab_size, cfg.ldm.max_text_length, captions_hash)
    folder = cache.model_dir("tokenizer", key)
    if cache.done("tokenizer", key):
        return TextTokenizer.from_folder(folder)
    tok = TextTokenizer.train(captions, vocab_size=cfg.ldm.vocab_size,
                              max_length=cfg.ldm.max_text_length)
    os.makedirs(folder, exist_ok=True)
    tok.save(folder)
    cache.mark_done("tokenizer", key, {"trained_on": "pretrain captions"})
    return tok


def _ldm_key(cfg: Config, vae_cfg, members_hash: str, tc, init_key: str | None,
             public_digest: str | None = None) -> str:
    """The cache key of an LDM trained with ``tc`` on the members hashed ``members_hash``,
    from the base LDM keyed ``init_key`` (None: from random initialisation), over the public
    components of digest ``public_digest`` (None: parts trained on the audit's splits)."""
    section = {k: v for k, v in dataclasses.asdict(cfg.ldm).items()
               if k not in ("vae", "vae_train", "vae_kl_weight", "sample", "base_train")}
    if section.get("timestep_power") == 1.0:  # the default keeps earlier cache keys
        del section["timestep_power"]
    section["train"] = dataclasses.asdict(tc)
    parts = ["ldm", section, vae_cfg.to_dict(), members_hash, cfg.seed, cfg.data.image_size,
             *policy_tag(policy_of(cfg))]
    if init_key is not None:
        parts.append({"fine_tuned_from": init_key})
    if public_digest is not None:
        parts.append({"public_components": public_digest})
    return cache_key(*parts)


def train_or_load_ldm(cfg: Config, name: str, images: np.ndarray, captions: list[str],
                      members_hash: str, vae: tuple, tokenizer, cache: ModelCache, mesh: Mesh,
                      train_cfg=None, init: tuple[str, LDMComponents] | None = None,
                      public_digest: str | None = None):
    """An LDM (U-Net + text encoder) trained on ``images``/``captions`` (a model's members)
    with ``train_cfg`` (default ``ldm.train``), fine-tuned from ``init`` = (its cache key, its
    components) when given, over the autoencoder and tokenizer of the public components of
    digest ``public_digest`` when given; returns :class:`LDMComponents`. Cached as a Stable
    Diffusion folder."""
    vae_cfg, vae_params = vae
    tc = cfg.ldm.train if train_cfg is None else train_cfg
    key = _ldm_key(cfg, vae_cfg, members_hash, tc, None if init is None else init[0],
                   public_digest)
    folder = cache.model_dir(f"ldm-{name}", key)
    if cache.done(f"ldm-{name}", key):
        log.info("ldm %s: cached %s", name, folder)
        return load_stable_diffusion(folder)
    unet_cfg = unet_lib.UNet2DConditionConfig.from_dict(cfg.ldm.unet, "config 'ldm.unet'")
    text_cfg = CLIPTextConfig.from_dict(cfg.ldm.text_encoder, "config 'ldm.text_encoder'")
    sched_cfg = schedulers.SchedulerConfig.from_dict(cfg.ldm.scheduler, "config 'ldm.scheduler'")
    latents = encode_latents(vae_cfg, vae_params, images, mesh, rules=config_rules(cfg),
                             policy=policy_of(cfg))
    ids, mask = tokenizer.encode(captions)
    u_ids, u_mask = tokenizer.encode([""])
    # A different seed per model so target and shadow are independent draws.
    seed = cfg.seed * 1000 + (int(hashlib.sha256(name.encode()).hexdigest(), 16) % 997)
    start = {}
    if init is not None:
        text = init[1].text_params
        start = {"unet_params": init[1].unet_params,
                 "text_params": text["params"] if set(text) == {"params"} else text}
    params = train_ldm(unet_cfg, text_cfg, sched_cfg, latents, ids, mask, u_ids[0], u_mask[0],
                       tc, caption_dropout=cfg.ldm.caption_dropout, seed=seed,
                       timestep_power=cfg.ldm.timestep_power, **start,
                       mesh=mesh, ckpt_dir=cache.ckpt_dir(f"ldm-{name}", key),
                       rules=config_rules(cfg), policy=policy_of(cfg))
    comps = LDMComponents(vae_cfg=vae_cfg, vae_params=vae_params, unet_cfg=unet_cfg,
                          unet_params=params["unet"], text_cfg=text_cfg,
                          text_params=params["text"], tokenizer=tokenizer,
                          scheduler_cfg=sched_cfg)
    save_stable_diffusion(folder, comps)
    cache.mark_done(f"ldm-{name}", key, {"trained_on": name, "n": int(len(images)),
                                         **({} if init is None else
                                            {"fine_tuned_from": init[0] if public_digest
                                             else f"ldm-base-{init[0]}"}),
                                         **({} if public_digest is None else
                                            {"public_components": public_digest})})
    return comps


def ldm_base(cfg: Config, dataset, manifest, cache: ModelCache, mesh: Mesh):
    """The parts every LDM of an audit shares: the autoencoder and the caption tokenizer,
    from the public components (:func:`t2i_mia.targets.public.components_for`, checked
    disjoint from ``manifest`` and matched to ``cfg``) or trained on ``pretrain`` (cached).
    Returns ((vae_cfg, vae_params), tokenizer)."""
    public = components_for(cfg)
    if public is not None:
        public.check_disjoint(manifest)
        public.check_config(cfg)
        return public.vae(), public.tokenizer()
    images, captions = dataset.get_many(manifest.ids("pretrain"))
    h = ids_hash(manifest.hashes("pretrain"))
    vae = train_or_load_autoencoder(cfg, images, h, cache, mesh)
    tok = train_or_load_tokenizer(cfg, captions, h, cache)
    return vae, tok


def model_members(manifest, name: str) -> tuple[list[int], list[str]]:
    """(ids, content hashes) a model of the audit trains on: ``target`` on target_members +
    target_known_members (known members are members too), ``shadow`` on shadow_members,
    ``reference_<r>`` on the manifest's r-th draw from auxiliary, as many as the target's."""
    if name == "target":
        return (manifest.target_training_ids(),
                manifest.hashes("target_members") + manifest.hashes("target_known_members"))
    if name == "shadow":
        return manifest.ids("shadow_members"), manifest.hashes("shadow_members")
    if name.startswith("reference_") and name[len("reference_"):].isdigit():
        r, size = int(name[len("reference_"):]), len(manifest.target_training_ids())
        return manifest.reference_ids(r, size), manifest.reference_hashes(r, size)
    raise ValueError(f"unknown model '{name}' (target, shadow or reference_<r>)")


def model_info(manifest, name: str) -> dict:
    """What the report says of a model the audit trained: its name, training split, size
    and the SHA-256 of its members' content hashes."""
    ids, hashes = model_members(manifest, name)
    split = {"target": "target_members+target_known_members",
             "shadow": "shadow_members"}.get(name, "auxiliary")
    return {"name": name, "split": split, "n_members": len(ids),
            "members_sha256": ids_hash(hashes)}


def ldm_pretrained(cfg: Config, dataset, manifest, base, cache: ModelCache, mesh: Mesh
                   ) -> tuple[str, LDMComponents] | None:
    """(cache key, components) of the public base LDM: the public components' (with
    ``public.fine_tune``), else trained with ``ldm.base_train`` on ``pretrain`` (cached);
    None when there is none (no base in the components, or ``ldm.base_train.steps`` 0).
    ``base`` is :func:`ldm_base`'s result."""
    public = components_for(cfg)
    if public is not None:
        return public.base_ldm() if cfg.public.fine_tune and public.has("base") else None
    if cfg.ldm.base_train.steps == 0:
        return None
    vae, tok = base
    h = ids_hash(manifest.hashes("pretrain"))
    key = _ldm_key(cfg, vae[0], h, cfg.ldm.base_train, None)
    if cache.done("ldm-base", key):  # every audit LDM asks: skip rendering the pretrain split
        return key, load_stable_diffusion(cache.model_dir("ldm-base", key))
    images, captions = dataset.get_many(manifest.ids("pretrain"))
    return key, train_or_load_ldm(cfg, "base", images, captions, h, vae, tok, cache, mesh,
                                  train_cfg=cfg.ldm.base_train)


def base_info(cfg: Config, manifest) -> dict:
    """What the report says of the base LDM as a calibration reference: its training data
    (the public pool, or ``pretrain``), size and the SHA-256 of its content hashes."""
    public = components_for(cfg)
    if public is not None:
        pool = public.manifest.get("pool", {})
        return {"name": "base", "split": f"public pool ({public.name})",
                "n_members": int(pool.get("n", 0)), "members_sha256": str(pool.get("sha256"))}
    return {"name": "base", "split": "pretrain", "n_members": len(manifest.ids("pretrain")),
            "members_sha256": ids_hash(manifest.hashes("pretrain"))}


def ldm_for(cfg: Config, name: str, dataset, manifest, base, cache: ModelCache, mesh: Mesh):
    """The LDM called ``name`` trained on its members (cached): ``target`` on
    target_members + target_known_members (known members are members too), ``shadow`` on
    shadow_members; fine-tuned from the base LDM of :func:`ldm_pretrained` when there is
    one. ``base`` is :func:`ldm_base`'s result."""
    ids, hashes = model_members(manifest, name)
    images, captions = dataset.get_many(ids)
    vae, tok = base
    public = components_for(cfg)
    init = ldm_pretrained(cfg, dataset, manifest, base, cache, mesh)
    return train_or_load_ldm(cfg, name, images, captions, ids_hash(hashes), vae, tok, cache,
                             mesh, init=init,
                             public_digest=None if public is None else public.digest)


# ----------------------------------------------------------------------------- DALL-E mini

def _bart_config(cfg: Config, vqgan_cfg: vq.VQGANConfig, tokenizer: TextTokenizer
                 ) -> db.DalleBartConfig:
    """``dalle.bart`` checked against the VQGAN, the image size and the tokenizer."""
    bart = db.DalleBartConfig.from_dict(dict(cfg.dalle.bart), "config 'dalle.bart'")
    if bart.image_vocab_size != vqgan_cfg.n_embed:
        raise ConfigError(f"config 'dalle.bart.image_vocab_size' = {bart.image_vocab_size} must "
                          f"equal 'dalle.vqgan.n_embed' = {vqgan_cfg.n_embed}")
    side = cfg.data.image_size // vqgan_cfg.downsample_factor
    if bart.image_length != side * side:
        raise ConfigError(f"config 'dalle.bart.image_length' = {bart.image_length}: "
                          f"{cfg.data.image_size}px images make {side}x{side} = {side * side} "
                          f"tokens with the VQGAN's factor {vqgan_cfg.downsample_factor}")
    if tokenizer.vocab_size > bart.encoder_vocab_size:
        raise ConfigError(f"config 'dalle.bart.encoder_vocab_size' = {bart.encoder_vocab_size} "
                          f"is below the tokenizer's {tokenizer.vocab_size} ids "
                          "('dalle.vocab_size')")
    return bart


def train_or_load_vqgan(cfg: Config, images: np.ndarray, images_hash: str, cache, mesh: Mesh
                        ) -> tuple[vq.VQGANConfig, PyTree, str]:
    """The VQGAN shared by target and shadow, trained on ``pretrain``; returns (config,
    params, its cache key)."""
    vqgan_cfg = vq.VQGANConfig.from_dict(dict(cfg.dalle.vqgan), "config 'dalle.vqgan'")
    vq.check_image_size(vqgan_cfg, (1, cfg.data.image_size, cfg.data.image_size, 3),
                        f"data.image_size = {cfg.data.image_size}")
    key = cache_key("vqgan", cfg.dalle.vqgan, cfg.dalle.vqgan_train.__dict__, images_hash,
                    cfg.seed, cfg.data.image_size, *policy_tag(policy_of(cfg)))
    folder = cache.model_dir("vqgan", key)
    if cache.done("vqgan", key):
        log.info("vqgan: cached %s", folder)
        c, p = vq.load_vqgan(folder)
        return c, p, key
    params = train_vqgan(vqgan_cfg, images, cfg.dalle.vqgan_train, seed=cfg.seed, mesh=mesh,
                         ckpt_dir=cache.ckpt_dir("vqgan", key), rules=config_rules(cfg),
                         policy=policy_of(cfg))
    vq.save_vqgan(folder, vqgan_cfg, params)
    stats = vqgan_stats(vqgan_cfg, params, images[: min(len(images), 512)], mesh,
                        config_rules(cfg), policy_of(cfg))
    cache.mark_done("vqgan", key, {"trained_on": "pretrain", "n": int(len(images)), **stats})
    return vqgan_cfg, params, key


def train_or_load_dalle_tokenizer(cfg: Config, captions: list[str], captions_hash: str, cache
                                  ) -> TextTokenizer:
    """A BPE on the ``pretrain`` captions (shared by target and shadow), rows of
    ``dalle.bart.max_text_length``."""
    bart = db.DalleBartConfig.from_dict(dict(cfg.dalle.bart), "config 'dalle.bart'")
    key = cache_key("dalle-tokenizer", cfg.dalle.vocab_size, bart.max_text_length,
                    bart.normalize_text, captions_hash)
    folder = cache.model_dir("dalle-tokenizer", key)
    if cache.done("dalle-tokenizer", key):
        return TextTokenizer.from_folder(folder)
    if bart.normalize_text:
        captions = [normalize_text(c) for c in captions]
    tok = TextTokenizer.train(captions, vocab_size=cfg.dalle.vocab_size,
                              max_length=bart.max_text_length)
    tok.save(folder)
    cache.mark_done("dalle-tokenizer", key, {"trained_on": "pretrain captions"})
    return tok


def train_or_load_dalle(cfg: Config, name: str, images: np.ndarray, captions: list[str],
                        members_hash: str, vqgan: tuple, tokenizer: TextTokenizer, cache,
                        mesh: Mesh) -> DalleMiniComponents:
    """A DalleBart trained on ``images``/``captions`` (a model's members) over the shared
    VQGAN and tokenizer; cached as a DALL-E mini folder."""
    vqgan_cfg, vqgan_params, vqgan_key = vqgan
    bart = _bart_config(cfg, vqgan_cfg, tokenizer)
    dropout = getattr(cfg.dalle, "caption_dropout", CAPTION_DROPOUT)
    key = cache_key("dalle", cfg.dalle.bart, cfg.dalle.vocab_size, cfg.dalle.train.__dict__,
                    dropout, vqgan_key, members_hash, cfg.seed, cfg.data.image_size,
                    *policy_tag(policy_of(cfg)))
    folder = cache.model_dir(f"dalle-{name}", key)
    if cache.done(f"dalle-{name}", key):
        log.info("dalle-mini %s: cached %s", name, folder)
        return load_dalle_mini(folder)
    tokens = encode_tokens(vqgan_cfg, vqgan_params, images, mesh, rules=config_rules(cfg),
                           policy=policy_of(cfg))
    ids, mask = tokenize_captions(captions, tokenizer, bart)
    u_ids, u_mask = empty_caption(tokenizer, bart)
    # A different seed per model so target and shadow are independent draws.
    seed = cfg.seed * 1000 + (int(hashlib.sha256(name.encode()).hexdigest(), 16) % 997)
    params = train_dallebart(bart, ids, mask, tokens, u_ids, u_mask, cfg.dalle.train,
                             caption_dropout=dropout, seed=seed, mesh=mesh,
                             ckpt_dir=cache.ckpt_dir(f"dalle-{name}", key),
                             rules=config_rules(cfg), policy=policy_of(cfg))
    comps = DalleMiniComponents(vqgan_cfg, vqgan_params, bart, params, tokenizer)
    save_dalle_mini(folder, comps)
    cache.mark_done(f"dalle-{name}", key, {"trained_on": name, "n": int(len(images))})
    return comps
