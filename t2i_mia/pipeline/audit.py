"""The audit, end to end: data -> splits -> targets -> adversary -> report, as one function
(:func:`run_audit`) over the layers below it.

Phases (each timed in ``report.timings_s``):

1. ``data``: the data set and the split manifest (disjoint by content hash).
2. ``autoencoder`` / ``target`` / ``shadow`` (or ``null_model``) / ``reference``: load or
   train (cached).
3. ``encoder``: the adversary's CLIP (loaded, or trained on ``auxiliary``).
4. ``captions``: ground truth, or the retrieval captioner over ``auxiliary`` captions.
5. ``generate``: k images per query through the target protocol only (black box).
6. ``features``: pixel / semantic / faithfulness features, jitted, on device;
   ``reference_queries``: the same for the calibrated attack's reference models.
7. ``attack`` (:mod:`t2i_mia.adversary.evaluation`): thresholds and MLPs fitted on
   attack-training data only, applied once to the evaluation set (target_members vs
   target_nonmembers) and to the null model; the controls ``null_target`` (a model of the
   same kind trained on disjoint data: the shadow model, whose members are disjoint from the
   evaluated ones) and ``shuffled_labels``.
8. ``white_box``: the denoising-loss threshold, a labelled upper-bound reference outside the
   black-box threat model.
9. ``report``: report.json, report.md, roc.png, samples.png, manifest.json, and the
   per-query scores.csv / null_scores.csv (``python -m t2i_mia.report`` recomputes the
   report from them).

Attack-training data (``adversary.aux_mode``): ``shadow`` (default: a shadow model of the same
kind trained on ``shadow_members``, queried on shadow_members vs shadow_nonmembers: the
adversary needs no knowledge of the target's training set), ``partial`` (the target's
known members/non-members, queried on the target itself) or ``none`` (nothing fitted).

Explicit sets (``data.sets``: ``--members``/``--nonmembers`` with ``--target-dir``): the
sets are read and validated (:mod:`t2i_mia.data.member_sets`) at the checkpoint's image size
before any model is loaded; the models are the user's (:mod:`t2i_mia.targets.external`):
the target, a shadow (``--shadow-dir``) and a null target (``--null-target-dir``; without
one the null_target control is absent with its reason). Nothing of the target's kind is
trained, there are no reference models (no calibrated attack), and the adversary's encoder
is ``adversary.encoder.dir`` or trained on ``--aux``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Any

import jax
import numpy as np

import t2i_mia
from t2i_mia.adversary import metrics as M
from t2i_mia.adversary.captioner import RetrievalCaptioner
from t2i_mia.adversary.encoder import load_encoder, train_or_load_encoder
from t2i_mia.adversary.evaluation import (FeatureSets, blind_scores, calibrate, evaluate_scores,
                                          query_features, score_attacks, white_box_entry)
from t2i_mia.adversary.features import attack_features
from t2i_mia.config import Config
from t2i_mia.data.member_sets import explicit_manifest, read_member_sets
from t2i_mia.data.sources import open_dataset
from t2i_mia.data.splits import build_splits
from t2i_mia.errors import ConfigError, DataError
from t2i_mia.models.configs import check_model_configs
from t2i_mia.models.precision import policy_of
from t2i_mia.parallel.mesh import config_rules, make_mesh
from t2i_mia.pipeline.paths import RunPaths
from t2i_mia.report.result import AuditReport
from t2i_mia.report.scores import write_scores
from t2i_mia.report.writer import SCHEMA_VERSION, format_table, write_report
from t2i_mia.targets.builders import build_models
from t2i_mia.targets.external import checkpoint_image_size, sampler_note
from t2i_mia.targets.factory import ModelCache, ids_hash
from t2i_mia.targets.public import base_generations, components_for, reconstruct
from t2i_mia.timing import Timer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class QuerySet:
    """Queries with membership labels: uint8 images, ground-truth captions, stable ids."""
    name: str
    ids: np.ndarray  # int64[N]
    images: np.ndarray  # uint8[N,H,W,3]
    captions: list[str]
    labels: np.ndarray  # int32[N], 1 = member

    @staticmethod
    def of(name: str, dataset, member_ids, nonmember_ids, seed: int) -> "QuerySet":
        """Members and non-members in a seeded random order (nothing downstream may rely
        on where the members are)."""
        ids = np.concatenate([np.asarray(member_ids, np.int64),
                              np.asarray(nonmember_ids, np.int64)])
        labels = np.concatenate([np.ones(len(member_ids), np.int32),
                                 np.zeros(len(nonmember_ids), np.int32)])
        salt = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
        order = np.random.Generator(np.random.PCG64([seed, salt])).permutation(len(ids))
        ids, labels = ids[order], labels[order]
        images, captions = dataset.get_many([int(i) for i in ids])
        return QuerySet(name, ids, images, captions, labels)


# ----------------------------------------------------------------------------- data

def build_member_sets(cfg: Config, paths: RunPaths):
    """Explicit sets: (dataset, manifest, MemberSets, image size), validated at the size of
    the checkpoint in ``paths.target_dir`` (read from its config files only)."""
    if not paths.target_dir:
        raise ConfigError("--members/--nonmembers audit a given model: give its checkpoint "
                          "with --target-dir")
    size = checkpoint_image_size(cfg.target, paths.target_dir)
    ms = read_member_sets(dataclasses.asdict(cfg.data.sets), size)
    manifest = explicit_manifest(ms, cfg.adversary.aux_mode, cfg.adversary.known_fraction,
                                 cfg.seed, M.MIN_PER_CLASS)
    return ms.dataset, manifest, ms, size


def query_sets_info(ms, manifest) -> dict:
    """The report's ``query_sets``: each given set's path and size and, for members and
    non-members, the ids known to the adversary and the ids evaluated."""
    out = {}
    for role, s in ms.sets.items():
        entry = {"path": s.path, "n": len(s)}
        if role in ("members", "nonmembers"):
            known = manifest.ids("target_known_" + role)
            evaluated = manifest.ids("target_" + role)
            entry.update(n_known=len(known), n_evaluated=len(evaluated), known_ids=known,
                         evaluated_ids=evaluated)
        out[role] = entry
    return out


# ----------------------------------------------------------------------------- the audit

@dataclasses.dataclass
class AuditResult:
    """What an audit computed: the typed report, the ROC curves and sample grid of its
    figures, the split manifest, and the per-query scores (train/eval ids in query order)
    with the metadata scores.csv records."""
    report: AuditReport
    roc_curves: dict
    sample_grid: dict
    manifest: Any
    scores: Any  # t2i_mia.adversary.evaluation.AuditScores
    train_ids: np.ndarray  # int64[N_train]
    eval_ids: np.ndarray  # int64[N_eval]
    score_meta: dict
    white_box_scores: tuple | None = None


def audit(cfg: Config, paths: RunPaths, progress: bool = True) -> AuditResult:
    """Runs the whole audit (nothing written but the model cache in ``paths.work_dir``);
    :func:`write_audit` writes its files."""
    check_model_configs(cfg)
    timer = Timer()
    t_start = time.perf_counter()
    a = cfg.adversary
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = ModelCache(paths.work_dir)
    os.makedirs(paths.work_dir, exist_ok=True)

    explicit = cfg.data.sets.explicit
    member_sets = None
    with timer.phase("data"):
        if explicit:  # validated before any model is loaded
            dataset, manifest, member_sets, size = build_member_sets(cfg, paths)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
        else:
            s = cfg.data.splits
            n_needed = sum(dataclasses.asdict(s).values())
            dataset = open_dataset(cfg, n_needed)
            manifest = build_splits(cfg, dataset)
        manifest_sha = manifest.sha256()
        evalset = QuerySet.of("eval", dataset, manifest.ids("target_members"),
                              manifest.ids("target_nonmembers"), cfg.seed)
        trainset = None
        if a.aux_mode == "shadow":
            trainset = QuerySet.of("attack_train", dataset, manifest.ids("shadow_members"),
                                   manifest.ids("shadow_nonmembers"), cfg.seed)
        elif a.aux_mode == "partial":
            trainset = QuerySet.of("attack_train", dataset, manifest.ids("target_known_members"),
                                   manifest.ids("target_known_nonmembers"), cfg.seed)
        for qs in (evalset, trainset):
            if qs is None:
                continue
            n_pos = int(qs.labels.sum())
            if n_pos < M.MIN_PER_CLASS or len(qs.labels) - n_pos < M.MIN_PER_CLASS:
                raise DataError(f"{qs.name} set: {n_pos} members and {len(qs.labels) - n_pos} "
                                f"non-members; need at least {M.MIN_PER_CLASS} of each "
                                "(data.splits)")

        # verified file by file, never on other data; the pool holds no queried image
        public = components_for(cfg)
        if public is not None:
            public.check_disjoint(manifest)
        elif cfg.public.components:
            log.warning("public.components=%s ignored: the public components belong to the "
                        "synthetic data set (data.source=synthetic, no explicit sets)",
                        cfg.public.components)

    models = build_models(cfg, paths, dataset, manifest, cache, mesh, timer)

    with timer.phase("encoder"):
        if a.encoder.dir:
            encoder = load_encoder(a.encoder.dir, mesh, config_rules(cfg), policy_of(cfg))
            encoder_info = {"source": a.encoder.dir}
        elif public is not None and public.has("encoder"):
            encoder = load_encoder(public.path("encoder"), mesh, config_rules(cfg),
                                   policy_of(cfg))
            encoder_info = {"source": f"public components {public.name}",
                            "n_members": public.manifest.get("pool", {}).get("n"),
                            "members_sha256": public.manifest.get("pool", {}).get("sha256")}
        else:
            # the adversary's own data only: auxiliary is disjoint from every queried set
            aux_images, aux_captions = dataset.get_many(manifest.ids("auxiliary"))
            aux_sha = ids_hash(manifest.hashes("auxiliary"))
            views = None
            if a.encoder.ssl_views == "autoencoder" and public is not None:
                views = reconstruct(*public.vae(), aux_images, mesh)
            negatives = None
            if a.encoder.hard_negatives == "base" and public is not None and public.has("base"):
                negatives = base_generations(public.base_ldm()[1], aux_captions, cfg.ldm.sample,
                                             cfg.seed, mesh)
            encoder = train_or_load_encoder(a.encoder, aux_images, aux_captions, aux_sha,
                                            cfg.seed, cache, mesh, config_rules(cfg),
                                            policy_of(cfg), views=views, negatives=negatives)
            encoder_info = {"source": "trained on auxiliary" + (" (--aux)" if explicit else ""),
                            "n_members": len(aux_images), "members_sha256": aux_sha}

    with timer.phase("captions"):
        train_caps = None
        if a.caption_source == "ground_truth":
            eval_caps = evalset.captions
            train_caps = trainset.captions if trainset is not None else None
        else:
            pool = dataset.captions(manifest.ids("auxiliary"))
            captioner = RetrievalCaptioner(
                encoder, pool,
                exclude=evalset.captions + (trainset.captions if trainset is not None else []))
            eval_caps = captioner.caption(evalset.images)
            if trainset is not None:
                train_caps = captioner.caption(trainset.images)

    k = a.k
    expect = (k, cfg.data.image_size, cfg.data.image_size, 3)

    def generate(model, caps, qs, what):
        # generation is dispatched asynchronously: wait, so its time is counted in its own
        # phase and not in the phase that first reads the images
        g = jax.block_until_ready(model.generate(caps, qs.ids.tolist(), k))
        if tuple(g.shape) != (len(qs.ids),) + expect:
            raise DataError(f"{what} generations: shape {tuple(g.shape)}, expected "
                            f"{(len(qs.ids),) + expect}")
        return g

    cs = cfg.adversary.pixel_coarse_side
    with timer.phase("generate"):
        gen_train = (generate(models.attack_source, train_caps, trainset, "attack-training")
                     if trainset is not None else None)
        gen_eval = generate(models.target, eval_caps, evalset, "evaluation")
        gen_null = (generate(models.null, eval_caps, evalset, "null")
                    if models.null is not None else None)
    with timer.phase("features"):
        f_train = (attack_features(encoder, trainset.images, gen_train, train_caps, cs)
                   if trainset is not None else None)
        f_eval = attack_features(encoder, evalset.images, gen_eval, eval_caps, cs)
        fs = FeatureSets(train=f_train,
                         train_labels=trainset.labels if trainset is not None else None,
                         eval=f_eval, eval_labels=evalset.labels,
                         null=(attack_features(encoder, evalset.images, gen_null, eval_caps, cs)
                               if gen_null is not None else None))
        # the blind baseline sees the query alone: its image embedding and its caption
        blind_train = (query_features(f_train["semantic.emb_query"], trainset.captions)
                       if trainset is not None else None)
        blind_eval = query_features(f_eval["semantic.emb_query"], evalset.captions)
    calibrated = None
    if models.references:
        # each reference queried on both sets: the calibrated score of a query compares the
        # model it is scored on (target, attack source or null) with models that never saw it
        with timer.phase("reference_queries"):
            ref_train, ref_eval = [], []
            for ref in models.references:
                if trainset is not None:
                    g = generate(ref, train_caps, trainset, f"{ref.name} attack-training")
                    ref_train.append(attack_features(encoder, trainset.images, g, train_caps, cs))
                g = generate(ref, eval_caps, evalset, f"{ref.name} evaluation")
                ref_eval.append(attack_features(encoder, evalset.images, g, eval_caps, cs))
            calibrated = FeatureSets(train=calibrate(fs.train, ref_train) if ref_train else None,
                                     train_labels=fs.train_labels,
                                     eval=calibrate(fs.eval, ref_eval),
                                     eval_labels=fs.eval_labels,
                                     null=calibrate(fs.null, ref_eval)
                                     if fs.null is not None else None)

    seed = cfg.seed
    y = evalset.labels
    with timer.phase("attack"):
        scores = score_attacks(cfg, fs, seed, calibrated=calibrated)
        if models.null is None:
            scores.null_absent = (
                "no null target given (--null-target-dir: a model of the target's kind that "
                "never saw the members, e.g. the base model of a fine-tune)")
        scores.blind = blind_scores(cfg, blind_train, fs.train_labels, blind_eval,
                                    evalset.labels, seed)
        attacks_report, controls, roc_curves = evaluate_scores(scores, a.n_bootstrap, seed)
    if calibrated is not None:
        attacks_report["calibrated"]["reference_models"] = models.reference_info
    if models.null_info is not None:
        controls["null_target"]["model"] = models.null_info

    white_box, wb_scores = None, None
    if a.white_box and models.white_box is not None and hasattr(models.target,
                                                                "white_box_loss"):
        with timer.phase("white_box"):
            wb_train = np.zeros(0)
            if trainset is not None:
                wb_train = -np.asarray(models.white_box.white_box_loss(
                    trainset.images, trainset.captions, trainset.ids.tolist()), np.float64)
            wb_eval = -np.asarray(models.target.white_box_loss(
                evalset.images, evalset.captions, evalset.ids.tolist()), np.float64)
            white_box = {
                "note": "outside the black-box threat model: uses the target's own training "
                        "loss on the query (white-box access; denoising loss for ldm, "
                        "image-token NLL for dalle-mini); an upper-bound reference only",
                "feature": "white_box.training_loss (negated: higher = member)",
                "threshold": white_box_entry(wb_train, scores.train_labels, wb_eval, y,
                                             a.n_bootstrap, seed),
            }
            wb_scores = (wb_train, wb_eval)

    timer.timings["total"] = time.perf_counter() - t_start
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "t2i-mia", "version": t2i_mia.__version__},
        "target": cfg.target if not paths.target_dir else f"{cfg.target}:{paths.target_dir}",
        "data": "member-sets" if explicit else cfg.data.source,
        "n_eval": {"members": int(y.sum()), "nonmembers": int(len(y) - y.sum())},
        "n_attack_train": {"members": int(scores.train_labels.sum()),
                           "nonmembers": int(len(scores.train_labels)
                                             - scores.train_labels.sum())},
        "k": k,
        "caption_source": a.caption_source,
        "aux_mode": a.aux_mode,
        "seeds": {"root": cfg.seed, "splits": cfg.seed, "generation_target": cfg.seed,
                  "generation_shadow": cfg.seed + 1, "attack": seed},
        "config": cfg.to_dict(),
        "manifest_sha256": manifest_sha,
        "timings_s": {p: round(t, 3) for p, t in timer.timings.items()},
        "attacks": attacks_report,
        "controls": controls,
        "models": {"target": paths.target_dir or "trained here",
                   "attack_source": getattr(models.attack_source, "name", None),
                   "null_target": (paths.null_target_dir if explicit else
                                   getattr(models.null, "name", None)),
                   "shadow": paths.shadow_dir if explicit else None,
                   "encoder": encoder_info,
                   "references": len(models.references),
                   "sampler": sampler_note(cfg.target, paths.target_dir, cfg)},
    }
    if public is not None:
        report["models"]["public_components"] = public.info()
    if member_sets is not None:
        report["query_sets"] = query_sets_info(member_sets, manifest)
    if white_box is not None:
        report["white_box_reference"] = white_box
    n_show = min(4, int(y.sum()), int(len(y) - y.sum()))
    pick = np.concatenate([np.flatnonzero(y == 1)[:n_show], np.flatnonzero(y == 0)[:n_show]])
    sample_grid = {"queries": evalset.images[pick], "generated": np.asarray(gen_eval)[pick],
                   "labels": y[pick], "captions": [eval_caps[i] for i in pick]}
    score_meta = {
        **{key: report[key] for key in ("target", "data", "k", "caption_source", "aux_mode",
                                        "manifest_sha256", "seeds")},
        "null_absent": scores.null_absent, "query_sets": report.get("query_sets"),
        "models": report["models"],
        "n_bootstrap": a.n_bootstrap, "attack_seed": seed,
        "reference_models": models.reference_info, "null_model": models.null_info,
        "white_box_note": white_box["note"] if white_box else None}
    return AuditResult(report=AuditReport.from_dict(report), roc_curves=roc_curves,
                       sample_grid=sample_grid, manifest=manifest, scores=scores,
                       train_ids=trainset.ids if trainset is not None else np.zeros(0, np.int64),
                       eval_ids=evalset.ids, score_meta=score_meta, white_box_scores=wb_scores)


def write_audit(result: AuditResult, out: str) -> None:
    """Writes an audit's files into ``out``: manifest.json, scores.csv / null_scores.csv
    (every per-query score the numbers come from, enough for ``python -m t2i_mia.report``
    to recompute them), then report.json, report.md, roc.png and samples.png (report.json
    last: a folder that has it is complete)."""
    os.makedirs(out, exist_ok=True)
    result.manifest.save(os.path.join(out, "manifest.json"))
    write_scores(out, result.scores, result.train_ids, result.eval_ids, result.score_meta,
                 white_box=result.white_box_scores)
    write_report(out, result.report.to_dict(), result.roc_curves, result.sample_grid)


def run_audit(cfg: Config, paths: RunPaths, progress: bool = True) -> dict:
    """:func:`audit`, its files written to ``paths.out`` and its table printed; returns the
    report as the JSON object written to report.json."""
    result = audit(cfg, paths, progress)
    write_audit(result, paths.out)
    report = result.report.to_dict()
    print(format_table(report))
    return report
