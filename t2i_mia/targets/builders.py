"""One builder per target kind, behind one interface: :func:`build_models` returns the
:class:`~t2i_mia.targets.protocol.Models` an audit needs (target, attack source, null target,
white-box reference, calibration references).

* ``ldm``: an autoencoder and tokenizer trained on ``pretrain`` (or those of the public
  components, ``public.components``, whose base LDM the audit's LDMs then fine-tune from);
  the target trained on its members (or loaded from ``paths.target_dir``); one model on
  ``shadow_members`` that is the shadow (aux_mode shadow) and in every mode the null
  target; ``adversary.n_reference`` reference models on draws from ``auxiliary`` and, with
  ``adversary.base_reference``, the base LDM the others were fine-tuned from.
* ``dalle-mini``: the same with a VQGAN, a BPE tokenizer and DalleBarts.
* ``generations``: the audited images come from a folder; the shadow is the adversary's own
  LDM.
* explicit sets (``data.sets``): every model is the user's, loaded
  (:func:`t2i_mia.targets.external.load_model`); nothing of the target's kind is trained.

``paths`` is the run's :class:`t2i_mia.pipeline.paths.RunPaths` (only its ``target_dir``,
``shadow_dir`` and ``null_target_dir`` are read); ``timer`` a :class:`t2i_mia.timing.Timer`.
Trained models are cached in ``cache`` (:class:`t2i_mia.targets.factory.ModelCache`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from jax.sharding import Mesh

from t2i_mia.config import Config
from t2i_mia.errors import ConfigError
from t2i_mia.models.ldm import load_stable_diffusion
from t2i_mia.models.precision import policy_of
from t2i_mia.parallel.mesh import config_rules
from t2i_mia.targets import factory
from t2i_mia.targets.dalle_mini import DalleMiniTarget, check_components, load_dalle_mini
from t2i_mia.targets.external import load_model
from t2i_mia.targets.factory import ModelCache, ids_hash, model_info, model_members
from t2i_mia.targets.generations import GenerationsTarget
from t2i_mia.targets.ldm import LDMTarget
from t2i_mia.targets.protocol import Models
from t2i_mia.timing import Timer

log = logging.getLogger(__name__)


def _roles(cfg: Config, manifest, target, shadow, refs: list, ref_info: list) -> Models:
    """The roles of the models an audit trained: the model on ``shadow_members`` is the
    null target in every mode (its members are disjoint from the evaluated ones) and, in
    shadow mode, the attack source and white-box reference too; otherwise the target is."""
    source = shadow if cfg.adversary.aux_mode == "shadow" else target
    return Models(target=target, attack_source=source, null=shadow, white_box=source,
                  references=refs, null_info=model_info(manifest, "shadow"),
                  reference_info=ref_info)


def _build_ldm_models(cfg: Config, paths, dataset, manifest, cache: ModelCache,
                      mesh: Mesh, timer: Timer, need_target: bool = True) -> Models:
    with timer.phase("autoencoder"):
        base = factory.ldm_base(cfg, dataset, manifest, cache, mesh)
    sample = cfg.ldm.sample
    target = None
    if need_target:
        with timer.phase("target"):
            if paths.target_dir:
                comps = load_stable_diffusion(paths.target_dir)
                if comps.vae_cfg.sample_size != cfg.data.image_size:
                    raise ConfigError(
                        f"{paths.target_dir}: the model makes {comps.vae_cfg.sample_size}px "
                        f"images but data.image_size is {cfg.data.image_size}")
            else:
                comps = factory.ldm_for(cfg, "target", dataset, manifest, base, cache, mesh)
            target = LDMTarget(comps, sample, seed=cfg.seed, mesh=mesh, name="target",
                               rules=config_rules(cfg), policy=policy_of(cfg))
    # One model trained on shadow_members: the shadow (shadow mode) and in every mode the
    # null target (its training data is disjoint from the evaluated members).
    with timer.phase("shadow" if cfg.adversary.aux_mode == "shadow" else "null_model"):
        s_comps = factory.ldm_for(cfg, "shadow", dataset, manifest, base, cache, mesh)
        shadow = LDMTarget(s_comps, sample, seed=cfg.seed + 1, mesh=mesh, name="shadow",
                           rules=config_rules(cfg), policy=policy_of(cfg))
    refs, ref_info = [], []
    with timer.phase("reference"):
        for r in range(cfg.adversary.n_reference):
            name = f"reference_{r}"
            r_comps = factory.ldm_for(cfg, name, dataset, manifest, base, cache, mesh)
            refs.append(LDMTarget(r_comps, sample, seed=cfg.seed + 2 + r, mesh=mesh,
                                  name=name, rules=config_rules(cfg), policy=policy_of(cfg)))
            ref_info.append(model_info(manifest, name))
        if cfg.adversary.base_reference:
            init = factory.ldm_pretrained(cfg, dataset, manifest, base, cache, mesh)
            if init is None:
                log.warning("adversary.base_reference ignored: the audit's LDMs have no base "
                            "(no public.components base, ldm.base_train.steps = 0)")
            else:
                refs.append(LDMTarget(init[1], sample, seed=cfg.seed + 2 + len(refs), mesh=mesh,
                                      name="base", rules=config_rules(cfg),
                                      policy=policy_of(cfg)))
                ref_info.append(factory.base_info(cfg, manifest))
    return _roles(cfg, manifest, target, shadow, refs, ref_info)


def _build_generations_models(cfg: Config, paths, dataset, manifest, cache: ModelCache, mesh: Mesh,
                              timer: Timer) -> Models:
    target = GenerationsTarget(paths.target_dir, cfg.data.image_size)
    m = _build_ldm_models(cfg, paths, dataset, manifest, cache, mesh, timer, need_target=False)
    # The shadow LDM is the adversary's own model; the audited images come from the folder.
    src = m.attack_source if cfg.adversary.aux_mode == "shadow" else target
    return dataclasses.replace(m, target=target, attack_source=src, white_box=None)


def _build_external_models(cfg: Config, paths, image_size: int, mesh: Mesh,
                           timer: Timer) -> Models:
    """The user's models: target, shadow (aux_mode shadow) and null target, loaded."""
    kind = cfg.target
    with timer.phase("target"):
        target = load_model(kind, paths.target_dir, cfg, image_size, cfg.seed, mesh, "target")
    shadow = null = None
    if cfg.adversary.aux_mode == "shadow":
        with timer.phase("shadow"):
            shadow = load_model(kind, paths.shadow_dir, cfg, image_size, cfg.seed + 1, mesh,
                                "shadow")
    if paths.null_target_dir:
        with timer.phase("null_model"):
            null = load_model(kind, paths.null_target_dir, cfg, image_size, cfg.seed + 1,
                              mesh, "null")
    source = {"shadow": shadow, "partial": target}.get(cfg.adversary.aux_mode)
    white_box = None
    if hasattr(target, "white_box_loss"):
        white_box = shadow if cfg.adversary.aux_mode == "shadow" else target
    return Models(target=target, attack_source=source, null=null, white_box=white_box)


def _build_dalle_models(cfg: Config, paths, dataset, manifest, cache: ModelCache, mesh: Mesh,
                        timer: Timer) -> Models:
    """The audit's models for ``--target dalle-mini`` (mirrors the LDM's): a VQGAN and a BPE
    tokenizer trained on ``pretrain``; the target trained on
    ``manifest.target_training_ids()`` (or loaded from ``paths.target_dir``, whose image
    size is checked against ``data.image_size`` before anything trains); one model on
    ``shadow_members`` that is the shadow (aux_mode shadow) and in every mode the null
    target. """
    def split(name):
        ids = manifest.ids(name)
        images, captions = dataset.get_many(ids)
        return images, captions, ids_hash(manifest.hashes(name))

    loaded = None
    if paths.target_dir:  # checked before anything is trained
        with timer.phase("target"):
            loaded = load_dalle_mini(paths.target_dir)
            size = check_components(loaded.vqgan_cfg, loaded.bart_cfg, loaded.tokenizer,
                                    paths.target_dir)
            if size != cfg.data.image_size:
                raise ConfigError(f"{paths.target_dir}: the model makes {size}px images but "
                                  f"data.image_size is {cfg.data.image_size}")
    pre_images, pre_captions, pre_hash = split("pretrain")
    with timer.phase("autoencoder"):
        vqgan = factory.train_or_load_vqgan(cfg, pre_images, pre_hash, cache, mesh)
        tok = factory.train_or_load_dalle_tokenizer(cfg, pre_captions, pre_hash, cache)
    sample = cfg.dalle.sample
    with timer.phase("target"):
        if loaded is not None:
            comps = loaded
        else:
            # Known members (partial-knowledge mode) are members too: the target trains on them.
            ids = manifest.target_training_ids()
            im, cap = dataset.get_many(ids)
            h = ids_hash(manifest.hashes("target_members")
                                 + manifest.hashes("target_known_members"))
            comps = factory.train_or_load_dalle(cfg, "target", im, cap, h, vqgan, tok, cache, mesh)
        target = DalleMiniTarget.from_components(comps, sample, seed=cfg.seed, mesh=mesh,
                                                 name="target", rules=config_rules(cfg),
                                                 policy=policy_of(cfg))
    with timer.phase("shadow" if cfg.adversary.aux_mode == "shadow" else "null_model"):
        im, cap, h = split("shadow_members")
        s_comps = factory.train_or_load_dalle(cfg, "shadow", im, cap, h, vqgan, tok, cache, mesh)
        shadow = DalleMiniTarget.from_components(s_comps, sample, seed=cfg.seed + 1, mesh=mesh,
                                                 name="shadow", rules=config_rules(cfg),
                                                 policy=policy_of(cfg))
    refs, ref_info = [], []
    with timer.phase("reference"):
        for r in range(cfg.adversary.n_reference):
            name = f"reference_{r}"
            ids, hashes = model_members(manifest, name)
            im, cap = dataset.get_many(ids)
            comps_r = factory.train_or_load_dalle(cfg, name, im, cap, ids_hash(hashes), vqgan,
                                                  tok, cache, mesh)
            refs.append(DalleMiniTarget.from_components(comps_r, sample, seed=cfg.seed + 2 + r,
                                                        mesh=mesh, name=name,
                                                        rules=config_rules(cfg),
                                                        policy=policy_of(cfg)))
            ref_info.append(model_info(manifest, name))
    if cfg.adversary.base_reference:
        log.warning("adversary.base_reference ignored: the DalleBarts are trained from scratch "
                    "(no base model)")
    return _roles(cfg, manifest, target, shadow, refs, ref_info)


Builder = Callable[..., Models]
BUILDERS: dict[str, Builder] = {"ldm": _build_ldm_models, "dalle-mini": _build_dalle_models,
                                "generations": _build_generations_models}


def build_models(cfg: Config, paths, dataset, manifest, cache: ModelCache, mesh: Mesh,
                 timer: Timer) -> Models:
    """The audit's models for ``cfg.target``: the user's (explicit sets) or trained/loaded
    here by the kind's builder, the LDMs over the public components of ``public.components``
    when set (dalle-mini's VQGAN and tokenizer are always trained on ``pretrain``); each
    phase timed in ``timer``."""
    if cfg.data.sets.explicit:
        return _build_external_models(cfg, paths, cfg.data.image_size, mesh, timer)
    if cfg.target not in BUILDERS:
        raise ConfigError(f"target '{cfg.target}': no builder (one of {sorted(BUILDERS)})")
    return BUILDERS[cfg.target](cfg, paths, dataset, manifest, cache, mesh, timer)
