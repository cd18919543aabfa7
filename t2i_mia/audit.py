"""The audit, end to end: data -> splits -> targets -> adversary -> report.

Phases (each timed in ``report.timings_s``):

1. ``data``: the data set and the split manifest (disjoint by content hash).
2. ``autoencoder`` / ``target`` / ``shadow`` (or ``null_model``): load or train (cached).
3. ``encoder``: the adversary's CLIP (loaded, or trained on ``auxiliary``).
4. ``captions``: ground truth, or the retrieval captioner over ``auxiliary`` captions.
5. ``generate``: k images per query through the target protocol only (black box).
6. ``features``: pixel / semantic / faithfulness features, jitted, on device.
7. ``attack``: thresholds and MLPs fitted on attack-training data only, applied once to the
   evaluation set (target_members vs target_nonmembers).
8. ``controls``: ``null_target`` (a model of the same kind trained on disjoint data; in shadow
   mode the shadow model, whose members are disjoint from the evaluated ones) and
   ``shuffled_labels``.
9. ``white_box``: the denoising-loss threshold, a labelled upper-bound reference outside the
   black-box threat model.
10. ``report``: report.json, report.md, roc.png, samples.png, manifest.json.

Attack-training data (``adversary.aux_mode``): ``shadow`` (default: a shadow model of the same
kind trained on ``shadow_members``, queried on shadow_members vs shadow_nonmembers: the
adversary needs no knowledge of the target's training set) or ``partial`` (the target's
known members/non-members, queried on the target itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import t2i_mia
from t2i_mia.adversary import features as F
from t2i_mia.adversary import metrics as M
from t2i_mia.adversary.classifiers import MLPAttack, ThresholdAttack
from t2i_mia.cli import RunPaths
from t2i_mia.config import Config
from t2i_mia.errors import ConfigError, DataError
from t2i_mia.parallel.mesh import make_mesh
from t2i_mia.targets.factory import ModelCache
from t2i_mia.targets.protocol import Models

log = logging.getLogger(__name__)

ATTACKS = ("pixel", "semantic", "faithfulness", "combined")


@dataclasses.dataclass
class QuerySet:
    """Queries with membership labels: uint8 images, ground-truth captions, stable ids."""
    name: str
    ids: np.ndarray  # int64[N]
    images: np.ndarray  # uint8[N,H,W,3]
    captions: list[str]
    labels: np.ndarray  # int32[N], 1 = member

    @staticmethod
    def of(name: str, dataset, member_ids, nonmember_ids) -> "QuerySet":
        ids = np.concatenate([np.asarray(member_ids, np.int64),
                              np.asarray(nonmember_ids, np.int64)])
        images, captions = dataset.get_many([int(i) for i in ids])
        labels = np.concatenate([np.ones(len(member_ids), np.int32),
                                 np.zeros(len(nonmember_ids), np.int32)])
        return QuerySet(name, ids, images, captions, labels)


class Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        log.info("phase %s ...", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + dt
            log.info("phase %s done in %.1f s", name, dt)


# ----------------------------------------------------------------------------- data

def build_dataset(cfg: Config, n_needed: int):
    """The configured data source as a Dataset."""
    from t2i_mia.data.sources import open_dataset
    return open_dataset(cfg, n_needed)


def build_splits(cfg: Config, dataset):
    from t2i_mia.data.splits import SplitSizes, make_splits
    sizes = SplitSizes(**dataclasses.asdict(cfg.data.splits))
    manifest = make_splits(dataset, sizes, seed=cfg.seed)
    manifest.check_disjoint()
    return manifest


# ----------------------------------------------------------------------------- features

def attack_features(encoder, query: QuerySet, gen: jax.Array, captions: list[str],
                    coarse_side: int = 8) -> dict[str, np.ndarray]:
    """All features of one query set; ``gen`` uint8[N,k,H,W,3] (on device)."""
    n, k = gen.shape[:2]
    q = jnp.asarray(query.images)
    feats = dict(F.pixel_features(F.to_unit_float(q), F.to_unit_float(gen),
                                  coarse_side=coarse_side))
    q_emb = encoder.embed_images(q)
    g_emb = encoder.embed_images(gen.reshape((n * k,) + gen.shape[2:])).reshape(n, k, -1)
    t_emb = encoder.embed_texts(captions)
    feats.update(F.semantic_features(q_emb, g_emb))
    feats.update(F.faithfulness_features(t_emb, g_emb))
    return {name: np.asarray(v) for name, v in feats.items()}


def balanced_shuffle(labels: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64[2m], shuffled labels int32[2m]) for one shuffled-labels fit: all rows of
    the smaller class and as many drawn from the larger one (m = the smaller class's size),
    their labels permuted.

    Balance is what makes the control's null value 0.5: a label vector with as many ones as
    zeros is as likely as its complement, and an MLP fitted to the complement (from the
    mirrored initialisation) is the negated function, so the mean AUC over shuffles is 0.5
    by symmetry whatever the features are. With unequal classes the fits learn the base
    rate, and on informative features their AUC drifts from 0.5 with no label leak."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    m = min(len(pos), len(neg))
    rows = np.concatenate([rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)])
    return rows, rng.permutation(np.asarray(labels, np.int32)[rows])


class FittedMLP:
    """An attack's MLP and the inputs it was fitted on (with or without vector features)."""

    def __init__(self, clf: MLPAttack, attack: str, vectors: bool):
        self.clf, self.attack, self.vectors = clf, attack, vectors

    def matrix(self, features: dict) -> np.ndarray:
        return F.feature_matrix(features, self.attack, vectors=self.vectors)

    def score(self, features: dict) -> np.ndarray:
        return self.clf.score(self.matrix(features))

    def predict(self, features: dict) -> np.ndarray:
        return self.clf.predict(self.matrix(features))


def fit_mlp(cfg: Config, features: dict, attack: str, y: np.ndarray, seed: int) -> FittedMLP:
    """The attack's MLP fitted on attack-training ``features``/``y``. With
    ``adversary.mlp.embeddings = "auto"`` and vector features present, it is fitted with and
    without them (same validation split) and the lower best validation loss wins (ties:
    without)."""
    mode = cfg.adversary.mlp.embeddings
    options = [mode == "always"] if mode != "auto" else [False, True]
    if not F.has_vector_features(features, attack):
        options = [False]
    best = None
    for vectors in options:
        clf = _mlp(cfg, seed).fit(F.feature_matrix(features, attack, vectors=vectors), y)
        val = clf.history_["val_loss"]
        loss = float(val[clf.best_epoch_]) if len(val) else float("inf")
        if best is None or loss < best[0]:
            best = (loss, FittedMLP(clf, attack, vectors))
    return best[1]


def _fit_attacks(cfg: Config, train_f: dict, train_y: np.ndarray, seed: int):
    """MLP per attack + threshold per scalar feature, fitted on attack-training data only."""
    mlps, thresholds = {}, {}
    for attack in ATTACKS:
        mlps[attack] = fit_mlp(cfg, train_f, attack, train_y, seed)
        log.info("attack %s: MLP on %s", attack,
                 "scalar features and embeddings" if mlps[attack].vectors
                 else "scalar features")
    for name in F.scalar_feature_names(train_f):
        thresholds[name] = ThresholdAttack().fit(train_f[name], train_y)
    return mlps, thresholds


def _mlp(cfg: Config, seed: int) -> MLPAttack:
    m = cfg.adversary.mlp
    return MLPAttack(hidden=tuple(m.hidden), lr=m.learning_rate, weight_decay=m.weight_decay,
                     batch_size=m.batch_size, max_epochs=m.max_epochs, patience=m.patience,
                     val_fraction=m.val_fraction, seed=seed)


# ----------------------------------------------------------------------------- models

def _build_ldm_models(cfg: Config, paths: RunPaths, dataset, manifest, cache: ModelCache,
                      mesh, timer: Timer, need_target: bool = True) -> Models:
    from t2i_mia.models.ldm import load_stable_diffusion
    from t2i_mia.targets import factory
    from t2i_mia.targets.ldm import LDMTarget

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
            target = LDMTarget(comps, sample, seed=cfg.seed, mesh=mesh, name="target")
    # One model trained on shadow_members: the shadow (shadow mode) and in every mode the
    # null target (its training data is disjoint from the evaluated members).
    with timer.phase("shadow" if cfg.adversary.aux_mode == "shadow" else "null_model"):
        s_comps = factory.ldm_for(cfg, "shadow", dataset, manifest, base, cache, mesh)
        shadow = LDMTarget(s_comps, sample, seed=cfg.seed + 1, mesh=mesh, name="shadow")
    if cfg.adversary.aux_mode == "shadow":
        return Models(target=target, attack_source=shadow, null=shadow, white_box=shadow)
    return Models(target=target, attack_source=target, null=shadow, white_box=target)


def _build_generations_models(cfg, paths, dataset, manifest, cache, mesh, timer) -> Models:
    from t2i_mia.targets.generations import GenerationsTarget
    target = GenerationsTarget(paths.target_dir, cfg.data.image_size)
    m = _build_ldm_models(cfg, paths, dataset, manifest, cache, mesh, timer, need_target=False)
    # The shadow LDM is the adversary's own model; the audited images come from the folder.
    src = m.attack_source if cfg.adversary.aux_mode == "shadow" else target
    return Models(target=target, attack_source=src, null=m.null, white_box=None)


# ----------------------------------------------------------------------------- the audit

def run_audit(cfg: Config, paths: RunPaths, progress: bool = True) -> dict:
    """Runs the whole audit and writes the report files; returns the report dict."""
    from t2i_mia.report.writer import format_table, write_report

    timer = Timer()
    t_start = time.perf_counter()
    a = cfg.adversary
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    cache = ModelCache(paths.work_dir)
    os.makedirs(paths.work_dir, exist_ok=True)

    with timer.phase("data"):
        s = cfg.data.splits
        n_needed = sum(dataclasses.asdict(s).values())
        dataset = build_dataset(cfg, n_needed)
        manifest = build_splits(cfg, dataset)
        manifest_sha = manifest.sha256()
        evalset = QuerySet.of("eval", dataset, manifest.ids("target_members"),
                              manifest.ids("target_nonmembers"))
        if a.aux_mode == "shadow":
            trainset = QuerySet.of("attack_train", dataset, manifest.ids("shadow_members"),
                                   manifest.ids("shadow_nonmembers"))
        else:
            trainset = QuerySet.of("attack_train", dataset, manifest.ids("target_known_members"),
                                   manifest.ids("target_known_nonmembers"))
        for qs in (evalset, trainset):
            n_pos = int(qs.labels.sum())
            if n_pos < M.MIN_PER_CLASS or len(qs.labels) - n_pos < M.MIN_PER_CLASS:
                raise DataError(f"{qs.name} set: {n_pos} members and {len(qs.labels) - n_pos} "
                                f"non-members; need at least {M.MIN_PER_CLASS} of each "
                                "(data.splits)")

    if cfg.target == "ldm":
        models = _build_ldm_models(cfg, paths, dataset, manifest, cache, mesh, timer)
    elif cfg.target == "generations":
        models = _build_generations_models(cfg, paths, dataset, manifest, cache, mesh, timer)
    else:
        from t2i_mia.targets.dalle_mini import build_dalle_models
        models = build_dalle_models(cfg, paths, dataset, manifest, cache, mesh, timer)

    with timer.phase("encoder"):
        from t2i_mia.adversary.encoder import load_encoder, train_or_load_encoder
        from t2i_mia.targets.factory import ids_hash
        if a.encoder.dir:
            encoder = load_encoder(a.encoder.dir, mesh)
        else:
            aux_images, aux_captions = dataset.get_many(manifest.ids("auxiliary"))
            encoder = train_or_load_encoder(a.encoder, aux_images, aux_captions,
                                            ids_hash(manifest.hashes("auxiliary")), cfg.seed,
                                            cache, mesh)

    with timer.phase("captions"):
        if a.caption_source == "ground_truth":
            eval_caps, train_caps = evalset.captions, trainset.captions
        else:
            from t2i_mia.adversary.captioner import RetrievalCaptioner
            pool = dataset.captions(manifest.ids("auxiliary"))
            captioner = RetrievalCaptioner(encoder, pool,
                                           exclude=evalset.captions + trainset.captions)
            eval_caps = captioner.caption(evalset.images)
            train_caps = captioner.caption(trainset.images)

    k = a.k
    with timer.phase("generate"):
        gen_train = models.attack_source.generate(train_caps, trainset.ids.tolist(), k)
        gen_eval = models.target.generate(eval_caps, evalset.ids.tolist(), k)
        gen_null = models.null.generate(eval_caps, evalset.ids.tolist(), k)
        expect = (k, cfg.data.image_size, cfg.data.image_size, 3)
        for nm, g, qs in (("attack-training", gen_train, trainset), ("evaluation", gen_eval,
                                                                   evalset),
                          ("null", gen_null, evalset)):
            if tuple(g.shape) != (len(qs.ids),) + expect:
                raise DataError(f"{nm} generations: shape {tuple(g.shape)}, expected "
                                f"{(len(qs.ids),) + expect}")

    with timer.phase("features"):
        cs = cfg.adversary.pixel_coarse_side
        f_train = attack_features(encoder, trainset, gen_train, train_caps, cs)
        f_eval = attack_features(encoder, evalset, gen_eval, eval_caps, cs)
        f_null = attack_features(encoder, evalset, gen_null, eval_caps, cs)

    seed = cfg.seed
    with timer.phase("attack"):
        mlps, thresholds = _fit_attacks(cfg, f_train, trainset.labels, seed)
        y = evalset.labels
        attacks_report, roc_curves = {}, {}
        for attack in ATTACKS:
            clf = mlps[attack]
            scores = clf.score(f_eval)
            block = {"mlp": M.evaluate(scores, clf.predict(f_eval), y, a.n_bootstrap, seed),
                     "threshold": {}}
            fpr, tpr, _ = M.roc_curve(scores, y)
            roc_curves[f"{attack} (MLP)"] = (fpr, tpr)
            for name in F.scalar_feature_names(f_eval, None if attack == "combined" else attack):
                th = thresholds[name]
                block["threshold"][name] = M.evaluate(th.score(f_eval[name]),
                                                      th.predict(f_eval[name]), y,
                                                      a.n_bootstrap, seed)
            attacks_report[attack] = block

    with timer.phase("controls"):
        null_scores = mlps["combined"].score(f_null)
        # An MLP fitted to shuffled labels is a random function of informative features: one
        # shuffle's AUC scatters away from 0.5 with no leak at all (its sign is arbitrary).
        # The control is the procedure "fit on shuffled labels": the mean AUC over
        # adversary.n_shuffles shuffles, with a CI of that mean (evaluation sampling and the
        # spread between shuffles). A leak pushes every shuffle the same way and excludes 0.5.
        shuf_scores = []
        for r in range(a.n_shuffles):
            rng = np.random.Generator(np.random.PCG64([seed, 7, r]))
            rows, labels = balanced_shuffle(trainset.labels, rng)
            shuf_scores.append(fit_mlp(cfg, {n: v[rows] for n, v in f_train.items()},
                                       "combined", labels, seed + r).score(f_eval))

        def auc_block(sc):
            ci = M.bootstrap_ci(M.roc_auc, sc, y, a.n_bootstrap, seed)
            return {"auc": M.roc_auc(sc, y), "auc_ci": list(ci) if ci is not None else None}

        shuf_auc, shuf_ci = M.replicate_bootstrap(M.roc_auc, shuf_scores, y, a.n_bootstrap,
                                                  seed)
        shuf_block = {"auc": shuf_auc, "auc_ci": list(shuf_ci)}
        log.info("shuffled_labels: AUC per shuffle %s",
                 ", ".join(f"{M.roc_auc(sc, y):.3f}" for sc in shuf_scores))
        controls = {"null_target": auc_block(null_scores),
                    "shuffled_labels": shuf_block}

    white_box = None
    if a.white_box and models.white_box is not None and hasattr(models.target,
                                                                 "white_box_loss"):
        with timer.phase("white_box"):
            l_train = models.white_box.white_box_loss(trainset.images, trainset.captions,
                                                      trainset.ids.tolist())
            l_eval = models.target.white_box_loss(evalset.images, evalset.captions,
                                                  evalset.ids.tolist())
            th = ThresholdAttack().fit(-l_train, trainset.labels)
            white_box = {
                "note": "outside the black-box threat model: uses the target's own training "
                        "loss on the query (white-box access; denoising loss for ldm, "
                        "image-token NLL for dalle-mini); an upper-bound reference only",
                "feature": "white_box.training_loss (negated: higher = member)",
                "threshold": M.evaluate(th.score(-l_eval), th.predict(-l_eval), y,
                                        a.n_bootstrap, seed),
            }

    timer.timings["total"] = time.perf_counter() - t_start
    report = {
        "schema_version": 1,
        "tool": {"name": "t2i-mia", "version": t2i_mia.__version__},
        "target": cfg.target if not paths.target_dir else f"{cfg.target}:{paths.target_dir}",
        "data": cfg.data.source,
        "n_eval": {"members": int(y.sum()), "nonmembers": int(len(y) - y.sum())},
        "n_attack_train": {"members": int(trainset.labels.sum()),
                           "nonmembers": int(len(trainset.labels) - trainset.labels.sum())},
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
    }
    if white_box is not None:
        report["white_box_reference"] = white_box
    n_show = min(4, len(y) // 2)
    pick = np.concatenate([np.arange(n_show), len(y) - 1 - np.arange(n_show)])
    sample_grid = {"queries": evalset.images[pick], "generated": np.asarray(gen_eval)[pick],
                   "labels": y[pick], "captions": [eval_caps[i] for i in pick]}
    os.makedirs(paths.out, exist_ok=True)
    manifest.save(os.path.join(paths.out, "manifest.json"))
    write_report(paths.out, report, roc_curves, sample_grid)
    print(format_table(report))
    return report
