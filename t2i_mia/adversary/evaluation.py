"""Fitting the attacks and evaluating them with their controls (host-side, on feature arrays).

Inputs are the feature dicts of :mod:`t2i_mia.adversary.features` (name -> f32[N] or
f32[N, D]) for three query sets: attack-training (with labels: the adversary's knowledge),
evaluation (labels used only to score) and the null target's generations for the evaluation
queries. Everything is fitted on attack-training data only and applied once.

Per attack (pixel, semantic, faithfulness, combined) an MLP, and per scalar feature a
threshold; every entry carries its metrics (``metrics.evaluate``: ROC figures, held-out
operating points) and ``null_target`` (the same fitted attack on the null model's
generations). Controls:

* ``null_target``: the four attack MLPs on the null model; each gets a two-sided
  Mann-Whitney p-value of AUC = 0.5, Holm-adjusted over the four; the alarm ("the pipeline
  may leak") is raised when any adjusted p-value is below ``alpha``.
* ``shuffled_labels``: the combined attack fitted to ``n_shuffles`` class-balanced label
  shuffles; the mean AUC and a CI of that mean (``metrics.replicate_bootstrap``).

With ``adversary.aux_mode=none`` nothing is fitted (``FeatureSets.train`` is None): each
scalar feature is a score with the sign the intuitions fix (:func:`features.member_sign`),
its AUC and ROC TPRs need no fitting; MLP entries are absent with their reason, the
null-target alarm is Holm's over every feature, and shuffled_labels is absent (nothing is
fitted to labels).

``controls.blind`` (:func:`blind_scores`, Das et al. 2024): an MLP on the query alone (its
image embedding and caption statistics; no generations), fitted on the attack-training
queries (with no attack training: 2-fold cross-fitted on the evaluated queries). It reads
0.5 when members and non-members come from one distribution; when it separates them, the
attacks' AUCs cannot be read as membership leakage.

The calibrated attack (beyond the paper) scores each query by how much closer the target's
generations are to it than a reference model's that never saw it: ``calibrated.<feature> =
feature(target) - mean_r feature(reference_r)``. This is offline LiRA (Carlini et al. 2022)
with a global variance, the variant they recommend for few reference models: dividing by a
global standard deviation does not change a threshold's ranking, so the score is the
difference with the references' mean. Thresholds only (their sign fitted, as every other).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

from t2i_mia.adversary import features as F
from t2i_mia.adversary import metrics as M
from t2i_mia.adversary.classifiers import MLPAttack, ThresholdAttack

log = logging.getLogger(__name__)

ATTACKS: tuple[str, ...] = F.ATTACK_NAMES  # pixel, semantic, faithfulness, combined
CALIBRATED = F.CALIBRATED
ALL_ATTACKS: tuple[str, ...] = F.ALL_ATTACKS
NULL_ALARM_ALPHA = 0.05


NO_FIT = ("adversary.aux_mode=none: no attack training, so no MLP; each scalar feature is "
          "scored with the sign the intuitions fix (see attacks.<attack>.threshold)")


@dataclasses.dataclass
class FeatureSets:
    """The features one audit evaluates.

    train / train_labels: attack-training queries ({0,1}[N_train]), both None when nothing
    is fitted (aux_mode none); eval / eval_labels: the evaluated queries on the target;
    null: the same evaluated queries on the null model (None: no null model).
    """
    train: dict | None
    train_labels: np.ndarray | None
    eval: dict
    eval_labels: np.ndarray
    null: dict | None


def calibrate(target: dict, references: Sequence[dict]) -> dict:
    """``calibrated.<name>`` = target feature - mean over references, for every scalar
    feature (f64[N]); ``references`` are the same queries' features on reference models."""
    if not references:
        raise ValueError("calibrate: needs at least one reference model's features")
    if target is None:
        return None
    out = {}
    for name in F.scalar_feature_names(target):
        ref = np.mean([np.asarray(r[name], np.float64) for r in references], axis=0)
        out[f"{CALIBRATED}.{name}"] = np.asarray(target[name], np.float64) - ref
    return out


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


def _mlp(cfg, seed: int) -> MLPAttack:
    m = cfg.adversary.mlp
    return MLPAttack(hidden=tuple(m.hidden), lr=m.learning_rate, weight_decay=m.weight_decay,
                     batch_size=m.batch_size, max_epochs=m.max_epochs, patience=m.patience,
                     val_fraction=m.val_fraction, seed=seed)


def fit_mlp(cfg, features: dict, attack: str, y: np.ndarray, seed: int) -> FittedMLP:
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


# The fitting function of an attack's MLP: (cfg, features, attack, labels, seed) -> an object
# with score(features) -> f[N] and predict(features) -> {0,1}[N]. A parameter so that the
# controls can be shown to fire on a deliberately leaking pipeline (tests).
FitFn = Callable[..., FittedMLP]


@dataclasses.dataclass
class AuditScores:
    """Every per-query score an audit's numbers are computed from (what ``scores.csv`` and
    ``null_scores.csv`` hold): given these, :func:`evaluate_scores` is deterministic.

    train_labels {0,1}[Nt] (attack-training queries), eval_labels {0,1}[Ne];
    ``mlp[<attack>]`` and ``features[<name>]`` = (train f[Nt], eval f[Ne], null f[Ne] or
    None): the attack MLPs' logits and the scalar features (raw, and ``calibrated.*``) on
    which the threshold attacks are fitted; ``shuffled``: the shuffled-labels fits' scores on
    the evaluation queries (R arrays f[Ne]); ``null``: the reason when there are no
    null-model scores, else None.
    """
    train_labels: np.ndarray
    eval_labels: np.ndarray
    mlp: dict
    features: dict
    shuffled: list
    null_absent: str | None = None
    fitted: bool = True  # False: aux_mode none (train_labels empty, mlp {}, no shuffles)
    blind: np.ndarray | None = None  # the blind baseline's scores on the evaluated queries


def score_attacks(cfg, fs: FeatureSets, seed: int, fit: FitFn = fit_mlp,
                  calibrated: FeatureSets | None = None) -> AuditScores:
    """Fits the attack MLPs (and the shuffled-labels fits) on ``fs.train`` and scores the
    three query sets; collects the scalar features the threshold attacks use. With
    ``fs.train`` None (aux_mode none) nothing is fitted: the features only."""
    null = fs.null if fs.null is not None else {}
    if fs.train is None:
        feats = {n: (np.zeros(0), fs.eval[n], null.get(n))
                 for n in F.scalar_feature_names(fs.eval)}
        if calibrated is not None:
            cnull = calibrated.null or {}
            feats.update({n: (np.zeros(0), calibrated.eval[n], cnull.get(n))
                          for n in sorted(calibrated.eval)})
        return AuditScores(train_labels=np.zeros(0, np.int32),
                           eval_labels=np.asarray(fs.eval_labels), mlp={}, features=feats,
                           shuffled=[], fitted=False,
                           null_absent=None if fs.null is not None else "no null model")
    mlp = {}
    for attack in ATTACKS:
        clf = fit(cfg, fs.train, attack, fs.train_labels, seed)
        log.info("attack %s: MLP on %s", attack,
                 "scalar features and embeddings" if getattr(clf, "vectors", False)
                 else "scalar features")
        mlp[attack] = (clf.score(fs.train), clf.score(fs.eval),
                       clf.score(fs.null) if fs.null is not None else None)
    feats = {n: (fs.train[n], fs.eval[n], null.get(n)) for n in F.scalar_feature_names(fs.eval)}
    if calibrated is not None:
        cnull = calibrated.null or {}
        feats.update({n: (calibrated.train[n], calibrated.eval[n], cnull.get(n))
                      for n in sorted(calibrated.eval)})
    # An MLP fitted to shuffled labels is a random function of informative features: one
    # shuffle's AUC scatters away from 0.5 with no leak at all (its sign is arbitrary). The
    # control is the procedure "fit on shuffled labels": the mean AUC over n_shuffles
    # shuffles, with a CI of that mean (evaluation sampling and the spread between shuffles).
    # A leak pushes every shuffle the same way and excludes 0.5.
    shuffled = []
    for r in range(cfg.adversary.n_shuffles):
        rng = np.random.Generator(np.random.PCG64([seed, 7, r]))
        rows, labels = balanced_shuffle(fs.train_labels, rng)
        sub = {n: np.asarray(v)[rows] for n, v in fs.train.items()}
        shuffled.append(fit(cfg, sub, "combined", labels, seed + r).score(fs.eval))
    return AuditScores(train_labels=np.asarray(fs.train_labels),
                       eval_labels=np.asarray(fs.eval_labels), mlp=mlp, features=feats,
                       shuffled=shuffled,
                       null_absent=None if fs.null is not None else "no null model")


def _entry(scores: tuple, preds: tuple, sc: AuditScores, n_boot: int, seed: int) -> dict:
    """An attack entry from its (train, eval, null) scores and eval decisions."""
    s_tr, s_ev, s_null = scores
    y = sc.eval_labels
    m = M.evaluate(s_ev, preds, y, n_boot, seed,
                   train_scores=s_tr if sc.fitted else None, train_labels=sc.train_labels)
    m["null_target"] = (M.auc_block(s_null, y, n_boot, seed) if s_null is not None else
                        {"auc": None, "auc_ci": None, "p_value": None,
                         "absent": sc.null_absent or "no null-model scores"})
    return m


def evaluate_scores(sc: AuditScores, n_boot: int, seed: int) -> tuple[dict, dict, dict]:
    """The report's ``attacks`` and ``controls`` (and ROC curves) from per-query scores:
    MLP entries from their logits (decision: logit > 0), a threshold refitted on the
    attack-training rows of each scalar feature. Same scores and seed, same numbers."""
    attacks, curves = {}, {}
    raw = {n: v for n, v in sc.features.items() if not n.startswith(CALIBRATED + ".")}
    cal = {n: v for n, v in sc.features.items() if n.startswith(CALIBRATED + ".")}

    def threshold_entry(name, trio):
        if not sc.fitted:  # the intuitions' sign, nothing fitted
            sign = F.member_sign(name)
            scores = tuple(None if v is None else sign * np.asarray(v, np.float64)
                           for v in trio)
            return _entry(scores, None, sc, n_boot, seed)
        th = ThresholdAttack().fit(trio[0], sc.train_labels)
        scores = tuple(None if v is None else th.score(v) for v in trio)
        return _entry(scores, th.predict(trio[1]), sc, n_boot, seed)

    for attack in ATTACKS:
        if sc.fitted:
            trio = sc.mlp[attack]
            block = {"mlp": _entry(trio, (np.asarray(trio[1]) > 0).astype(np.int64), sc,
                                   n_boot, seed), "threshold": {}}
            fpr, tpr, _ = M.roc_curve(trio[1], sc.eval_labels)
            curves[f"{attack} (MLP)"] = (fpr, tpr)
        else:
            block = {"mlp": None, "mlp_absent": NO_FIT, "threshold": {}}
        eval_raw = {n: v[1] for n, v in raw.items()}
        for name in F.scalar_feature_names(eval_raw, None if attack == "combined" else attack):
            block["threshold"][name] = threshold_entry(name, raw[name])
        attacks[attack] = block
    if not sc.fitted:  # ROC curves of the best-known single features
        for name in ("pixel.mse.min", "semantic.cosine.max", "faithfulness.clip.max"):
            if name in raw:
                fpr, tpr, _ = M.roc_curve(F.member_sign(name) * np.asarray(raw[name][1]),
                                          sc.eval_labels)
                curves[f"{name} (unfitted)"] = (fpr, tpr)
    if cal:
        attacks[CALIBRATED] = {"threshold": {n: threshold_entry(n, cal[n])
                                             for n in sorted(cal)}}
    return attacks, _controls(sc, attacks, n_boot, seed), curves


def evaluate_attacks(cfg, fs: FeatureSets, seed: int, fit: FitFn = fit_mlp,
                     calibrated: FeatureSets | None = None) -> tuple[dict, dict, dict]:
    """Fits every attack on ``fs.train`` and evaluates it on ``fs.eval`` and ``fs.null``.

    Args:
      cfg: the Config (``adversary.*``: MLP settings, n_bootstrap, n_shuffles).
      fs: the audit's features. seed: the attack seed (MLP inits, bootstrap, shuffles).
      fit: the MLP fitting function (see ``FitFn``).
      calibrated: the calibrated features of the same three query sets (:func:`calibrate`),
        or None for no calibrated attack.
    Returns:
      (attacks, controls, roc_curves): ``attacks[<attack>] = {"mlp": entry, "threshold":
      {<feature>: entry}}`` (``calibrated``: thresholds only), ``controls`` =
      ``{null_target, shuffled_labels}``, ``roc_curves[<label>] = (fpr, tpr)``.
    """
    sc = score_attacks(cfg, fs, seed, fit, calibrated)
    return evaluate_scores(sc, cfg.adversary.n_bootstrap, seed)


def white_box_entry(train_x, train_labels, eval_x, eval_labels, n_boot: int, seed: int) -> dict:
    """The white-box reference: a threshold on ``-loss`` (higher = member) fitted on the
    attack-training queries, evaluated once (no null block: it is not an attack of the
    threat model). With no attack-training queries (aux_mode none) ``-loss`` is the score
    as it is: its AUC and ROC TPRs, no decisions."""
    if len(train_x) == 0:
        return M.evaluate(np.asarray(eval_x, np.float64), None, eval_labels, n_boot, seed,
                          train_scores=None, train_labels=None)
    th = ThresholdAttack().fit(train_x, train_labels)
    return M.evaluate(th.score(eval_x), th.predict(eval_x), eval_labels, n_boot, seed,
                      train_scores=th.score(train_x), train_labels=train_labels)


def _null_blocks(attacks: dict) -> dict:
    """name -> null_target block the alarm is over: the four attack MLPs, or (nothing
    fitted) every scalar feature of the combined attack."""
    if all(attacks[name].get("mlp") for name in ATTACKS):
        return {name: attacks[name]["mlp"]["null_target"] for name in ATTACKS}
    return {name: e["null_target"] for name, e in attacks["combined"]["threshold"].items()}


def null_alarm(attacks: dict, alpha: float = NULL_ALARM_ALPHA) -> dict:
    """Holm's correction over the attack MLPs' null_target p-values (without MLPs, over
    every scalar feature's): ``{alpha, alarm, per_attack: {<name>: {auc, auc_ci, p_value,
    p_holm}}}``."""
    blocks = _null_blocks(attacks)
    adj = M.holm_adjust({name: b["p_value"] for name, b in blocks.items()})
    per = {name: {**b, "p_holm": adj[name]} for name, b in blocks.items()}
    return {"alpha": alpha, "alarm": bool(min(adj.values()) < alpha), "per_attack": per}


def _controls(sc: AuditScores, attacks: dict, n_boot: int, seed: int) -> dict:
    y = sc.eval_labels
    has_null = (sc.mlp["combined"][2] is not None if sc.fitted else
                all(v[2] is not None for v in sc.features.values()))
    if not has_null:
        null = {"auc": None, "auc_ci": None, "p_value": None, "alpha": NULL_ALARM_ALPHA,
                "alarm": None, "per_attack": {},
                "absent": sc.null_absent or "no null-model scores"}
    else:
        null = null_alarm(attacks)
        if sc.fitted:
            top = dict(attacks["combined"]["mlp"]["null_target"])
        else:  # the most alarming feature (smallest Holm-adjusted p-value)
            name = min(null["per_attack"], key=lambda n: null["per_attack"][n]["p_holm"])
            top = {k: null["per_attack"][name][k] for k in ("auc", "auc_ci", "p_value")}
            top["feature"] = name
        null = {**top, **null}
    controls = {"null_target": null,
                "shuffled_labels": {"auc": None, "auc_ci": None, "per_shuffle_auc": [],
                                    "n_shuffles": 0,
                                    "absent": "no shuffled-labels scores" if sc.fitted else
                                    "adversary.aux_mode=none: nothing is fitted to labels"},
                "blind": blind_block(sc.blind, y, n_boot, seed)}
    if len(sc.shuffled) >= 2:
        per = [M.roc_auc(s, y) for s in sc.shuffled]
        mean, ci = M.replicate_bootstrap(M.roc_auc, sc.shuffled, y, n_boot, seed)
        log.info("shuffled_labels: AUC per shuffle %s", ", ".join(f"{v:.3f}" for v in per))
        controls["shuffled_labels"] = {"auc": mean, "auc_ci": list(ci), "per_shuffle_auc": per,
                                       "n_shuffles": len(sc.shuffled)}
    return controls


# ----------------------------------------------------------------------------- blind baseline

def query_features(embeddings: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """The blind baseline's input: f32[N, 3 + D], caption statistics (characters, words,
    mean word length) then the query image's embedding (f[N, D]). Nothing from a model
    under audit."""
    stats = np.array([[len(c), len(c.split()), len(c) / max(1, len(c.split()))]
                      for c in captions], np.float32)
    return np.concatenate([stats, np.asarray(embeddings, np.float32)], axis=1)


def blind_scores(cfg, train_x: np.ndarray | None, train_labels: np.ndarray | None,
                 eval_x: np.ndarray, eval_labels: np.ndarray, seed: int) -> np.ndarray:
    """f[N_eval]: the blind baseline's scores of the evaluated queries (higher = member).

    An MLP (the attacks' settings) on :func:`query_features`, fitted on the attack-training
    queries; with none (aux_mode none) 2-fold cross-fitted on the evaluated queries (each
    half scored by the MLP fitted on the other, folds stratified and seeded), which is
    legitimate for a control: it asks whether the sets are separable without the model."""
    if train_x is not None:
        return _mlp(cfg, seed).fit(train_x, np.asarray(train_labels)).score(eval_x)
    y = np.asarray(eval_labels)
    rng = np.random.Generator(np.random.PCG64([seed, 0xb1d]))
    fold = np.zeros(len(y), np.int64)
    for c in (0, 1):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold[rows[1::2]] = 1
    out = np.zeros(len(y), np.float64)
    for f in (0, 1):
        fit_rows, score_rows = fold != f, fold == f
        clf = _mlp(cfg, seed + f).fit(eval_x[fit_rows], y[fit_rows])
        out[score_rows] = clf.score(eval_x[score_rows])
    return out


BLIND_WARNING = ("the member and non-member sets differ in distribution: a classifier that "
                 "never queries the model separates them (controls.blind), so the attacks' "
                 "AUCs cannot be read as membership leakage")


def blind_block(scores, labels, n_boot: int, seed: int,
                alpha: float = NULL_ALARM_ALPHA) -> dict:
    """``controls.blind``: ``{auc, auc_ci, p_value, alpha, alarm, verdict}``; the alarm
    fires when the AUC is above 0.5 with a two-sided Mann-Whitney p-value below alpha."""
    if scores is None:
        return {"auc": None, "auc_ci": None, "p_value": None, "alpha": alpha, "alarm": None,
                "absent": "no blind-baseline scores"}
    block = M.auc_block(scores, labels, n_boot, seed)
    alarm = bool(block["auc"] > 0.5 and block["p_value"] < alpha)
    return {**block, "alpha": alpha, "alarm": alarm,
            "verdict": BLIND_WARNING if alarm else
            "the blind baseline does not separate the sets: no sign of a distribution shift"}
