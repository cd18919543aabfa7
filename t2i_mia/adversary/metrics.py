"""Membership-inference metrics: ROC, AUC, TPR at low FPR, accuracy, bootstrap CIs (numpy).

Conventions: ``labels`` 1 = member, 0 = non-member; a higher ``score`` is more member-like;
``pred`` is 0/1. Every metric needs at least 2 members and 2 non-members (DataError
otherwise). A TPR at an FPR below ``1 / n_nonmembers`` cannot be measured and is ``None``
(Carlini et al. 2022, "Membership Inference Attacks From First Principles").

These run on small host vectors (one score per evaluated query), so they are numpy; the
bootstrap of AUC and TPR@FPR is vectorised over resamples (resample -> per-point multiplicity
weights), other metrics are looped over the same resamples.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, Sequence

import numpy as np

from t2i_mia.errors import ConfigError, DataError

MIN_PER_CLASS = 2
_FPR_SLACK = 1e-9  # float slack when turning an FPR target into a count of false positives


# ----------------------------------------------------------------------------- validation

def _check(scores, labels, fn: str, scores_name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise DataError(f"{fn}: {scores_name} and labels must be 1-D, got shapes {s.shape} "
                        f"and {y.shape}")
    if s.shape != y.shape:
        raise DataError(f"{fn}: {s.shape[0]} {scores_name} but {y.shape[0]} labels")
    if y.size and not np.all((y == 0) | (y == 1)):
        raise DataError(f"{fn}: labels must be 0 (non-member) or 1 (member), got values "
                        f"{sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    if s.size and not (np.issubdtype(s.dtype, np.number) or s.dtype == bool):
        raise DataError(f"{fn}: {scores_name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise DataError(f"{fn}: {int(np.sum(~np.isfinite(s)))} non-finite {scores_name}")
    y = y.astype(np.int64)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos < MIN_PER_CLASS or n_neg < MIN_PER_CLASS:
        raise DataError(f"{fn}: needs at least {MIN_PER_CLASS} members and {MIN_PER_CLASS} "
                        f"non-members, got {n_pos} members and {n_neg} non-members")
    return s, y


def _check_preds(pred, labels, fn: str) -> tuple[np.ndarray, np.ndarray]:
    p, y = _check(pred, labels, fn, "predictions")
    if not np.all((p == 0) | (p == 1)):
        raise DataError(f"{fn}: predictions must be 0 or 1")
    return p.astype(np.int64), y


# ----------------------------------------------------------------------------- ROC, AUC

def roc_curve(scores, labels, drop_intermediate: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, as ``sklearn.metrics.roc_curve`` (same points, same tie handling).

    Args:
      scores: f[N], higher = more member-like. labels: {0,1}[N].
      drop_intermediate: drop collinear points (sklearn's default); the curve is unchanged.
    Returns:
      (fpr f64[M], tpr f64[M], thresholds f64[M]): point i predicts "member" for
      ``score >= thresholds[i]``; thresholds[0] = +inf (nothing predicted member). Tied
      scores form one point (no interpolation inside a tie group).
    """
    s, y = _check(scores, labels, "roc_curve")
    fps, tps, thr = _roc_counts(s, y)
    if drop_intermediate and fps.size > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    thr = np.r_[np.inf, thr]
    return fps / fps[-1], tps / tps[-1], thr


def _roc_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives, threshold) at each distinct score."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.where(np.diff(s))[0], s.size - 1]  # last index of each tie group
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return fps.astype(np.float64), tps.astype(np.float64), s[last]


def roc_auc(scores, labels) -> float:
    """Area under the ROC: the Mann-Whitney U / (n_pos n_neg), a tie counting 1/2.

    Equals ``sklearn.metrics.roc_auc_score(labels, scores)``.
    """
    s, y = _check(scores, labels, "roc_auc")
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    below = np.searchsorted(neg, pos, side="left")
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (pos.size * neg.size))


def min_resolvable_fpr(labels) -> float:
    """The smallest non-zero FPR the evaluation set can show: 1 / n_nonmembers."""
    y = np.asarray(labels)
    _check(np.zeros(y.shape), y, "min_resolvable_fpr", "labels")
    return 1.0 / float(np.sum(y == 0))


def _max_false_positives(fpr: float, n_neg: int) -> int | None:
    """How many false positives an FPR target allows; None below 1 / n_neg."""
    if not (0.0 <= fpr <= 1.0) or math.isnan(fpr):
        raise ConfigError(f"tpr_at_fpr: fpr must be in [0, 1], got {fpr}")
    if fpr * n_neg < 1.0 - _FPR_SLACK:
        return None
    return int(math.floor(fpr * n_neg + _FPR_SLACK))


def tpr_at_fpr(scores, labels, fpr: float) -> float | None:
    """The largest TPR of an ROC point with FPR <= ``fpr`` (no interpolation).

    Returns None when ``fpr < 1 / n_nonmembers``: the set has too few non-members to tell.
    """
    s, y = _check(scores, labels, "tpr_at_fpr")
    n_neg = int(np.sum(y == 0))
    m = _max_false_positives(fpr, n_neg)
    if m is None:
        return None
    fps, tps, _ = _roc_counts(s, y)
    ok = fps <= m
    return float(tps[ok].max() / y.sum()) if ok.any() else 0.0


def accuracy(pred, labels) -> float:
    """Fraction of correct 0/1 predictions."""
    p, y = _check_preds(pred, labels, "accuracy")
    return float(np.mean(p == y))


def balanced_accuracy(pred, labels) -> float:
    """Mean of TPR and TNR (= accuracy on a balanced set)."""
    p, y = _check_preds(pred, labels, "balanced_accuracy")
    return float(0.5 * (np.mean(p[y == 1] == 1) + np.mean(p[y == 0] == 0)))


# ----------------------------------------------------------------------------- bootstrap

def _weighted_auc(pos: np.ndarray, neg: np.ndarray, wp: np.ndarray, wn: np.ndarray
                  ) -> np.ndarray:
    """AUC of B weighted resamples. pos f[P], neg f[Q]; wp i[B, P], wn i[B, Q] multiplicities."""
    order = np.argsort(neg, kind="mergesort")
    neg_s = neg[order]
    cn = np.concatenate([np.zeros((wn.shape[0], 1)), np.cumsum(wn[:, order], axis=1)], axis=1)
    lo = np.searchsorted(neg_s, pos, side="left")
    hi = np.searchsorted(neg_s, pos, side="right")
    below = cn[:, lo]
    tied = cn[:, hi] - below
    return np.sum(wp * (below + 0.5 * tied), axis=1) / (pos.size * neg.size)


def _weighted_tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, wp: np.ndarray, wn: np.ndarray,
                         fpr: float) -> np.ndarray | None:
    """TPR@FPR of B weighted resamples (resamples keep n_pos and n_neg)."""
    m = _max_false_positives(fpr, neg.size)
    if m is None:
        return None
    # Feasible thresholds lie above v*, the highest negative score at which the cumulative
    # (descending) negative count first exceeds m; the best TPR counts positives > v*.
    order = np.argsort(-neg, kind="mergesort")
    neg_d = neg[order]
    cum = np.cumsum(wn[:, order], axis=1)
    over = cum > m
    has = over.any(axis=1)
    v_star = np.where(has, neg_d[np.argmax(over, axis=1)], -np.inf)
    porder = np.argsort(pos, kind="mergesort")
    pos_a = pos[porder]
    cp = np.concatenate([np.zeros((wp.shape[0], 1)), np.cumsum(wp[:, porder], axis=1)], axis=1)
    idx = np.searchsorted(pos_a, v_star, side="right")
    tp = pos.size - cp[np.arange(wp.shape[0]), idx]
    return tp / pos.size


def _vectorised(metric_fn: Callable) -> Callable | None:
    """The weighted (vectorised) form of a known metric, else None."""
    if metric_fn is roc_auc:
        return _weighted_auc
    if isinstance(metric_fn, functools.partial) and metric_fn.func is tpr_at_fpr \
            and not metric_fn.args and set(metric_fn.keywords) == {"fpr"}:
        return functools.partial(_weighted_tpr_at_fpr, fpr=metric_fn.keywords["fpr"])
    return None


def _resamples(n_pos: int, n_neg: int, n: int, seed: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stratified bootstrap indices, in chunks of resamples (bounded memory).

    Yields (idx_pos i[b, n_pos], idx_neg i[b, n_neg]); the same sequence for a given
    (n_pos, n_neg, n, seed) whichever metric consumes it.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n, 4_000_000 // (n_pos + n_neg)))
    done = 0
    while done < n:
        b = min(chunk, n - done)
        yield rng.integers(0, n_pos, (b, n_pos)), rng.integers(0, n_neg, (b, n_neg))
        done += b


def _counts(idx: np.ndarray, size: int) -> np.ndarray:
    """Row-wise bincount: i[b, m] indices in [0, size) -> multiplicities i[b, size]."""
    b = idx.shape[0]
    flat = (idx + size * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * size).reshape(b, size)


def bootstrap_values(metric_fn: Callable, scores, labels, n: int = 1000, seed: int = 0,
                     vectorise: bool = True) -> np.ndarray | None:
    """The metric on n stratified bootstrap resamples: f64[n], or None if unmeasurable.

    Members and non-members are resampled separately (with replacement, same sizes), so
    every resample has the evaluation set's class balance. ``roc_auc`` and
    ``functools.partial(tpr_at_fpr, fpr=x)`` are computed for all resamples at once
    (``vectorise=False`` forces the per-resample loop, for testing); any other
    ``metric_fn(scores, labels) -> float | None`` is called per resample. A resample whose
    metric is None or NaN makes the whole result None: a percentile over the measurable
    resamples only would not be a 95% interval.
    """
    s, y = _check(scores, labels, "bootstrap_ci")
    if int(n) != n or n < 1:
        raise ConfigError(f"bootstrap_ci: n must be a positive integer, got {n}")
    pos, neg = s[y == 1], s[y == 0]
    fast = _vectorised(metric_fn) if vectorise else None
    labels_b = np.r_[np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)]
    out = []
    for ip, ineg in _resamples(pos.size, neg.size, int(n), seed):
        if fast is not None:
            v = fast(pos, neg, _counts(ip, pos.size), _counts(ineg, neg.size))
            if v is None:
                return None
            out.append(np.asarray(v, np.float64))
            continue
        for b in range(ip.shape[0]):
            v = metric_fn(np.r_[pos[ip[b]], neg[ineg[b]]], labels_b)
            if v is None or not np.isfinite(v):
                return None
            out.append(np.asarray([v], np.float64))
    return np.concatenate(out)


def bootstrap_ci(metric_fn: Callable, scores, labels, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile bootstrap (1 - alpha) interval of a metric, stratified by class.

    Args:
      metric_fn: ``(scores, labels) -> float | None``; ``roc_auc`` and
        ``functools.partial(tpr_at_fpr, fpr=x)`` are vectorised.
      n: resamples. seed: numpy seed (same seed -> same resamples for every metric).
    Returns: (lo, hi), or None if the metric cannot be measured on this set.
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    vals = bootstrap_values(metric_fn, scores, labels, n, seed)
    if vals is None:
        return None
    lo, hi = np.percentile(vals, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(lo), float(hi)


def replicate_bootstrap(metric_fn: Callable, score_sets: Sequence, labels, n: int = 1000,
                        seed: int = 0, alpha: float = 0.05
                        ) -> tuple[float, tuple[float, float]] | None:
    """Mean metric over R replicate scorings of one evaluation set, and a (1 - alpha)
    confidence interval *of that mean*.

    For randomised procedures (e.g. R attacks fitted to R independent label shuffles) the
    quantity of interest is the procedure's expected metric, estimated by the mean over the
    R replicates. Two sources of variance enter that estimate: the sampling of the
    evaluation set (the variance, over stratified bootstrap resamples as in
    ``bootstrap_ci``, of the R replicates' mean metric) and the finite number of replicates
    (their sample variance / R). The interval is mean +/- t(R-1) * sqrt(sum of the two): a
    leak that moves every replicate the same way, by a few of the mean's standard errors,
    excludes 0.5, while the scatter of single replicates around 0.5 does not. With R = 1 it
    is the plain percentile bootstrap.

    Args:
      score_sets: R >= 1 arrays f[N], each a scoring of the same N queries.
      labels: {0,1}[N]. n, seed, alpha: as ``bootstrap_ci``.
    Returns: (mean over replicates, (lo, hi)), or None if the metric cannot be measured.
    """
    sets = [np.asarray(sc, np.float64) for sc in score_sets]
    if not sets:
        raise ConfigError("replicate_bootstrap: needs at least one replicate scoring")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"replicate_bootstrap: alpha must be in (0, 1), got {alpha}")
    point, vals = [], []
    for sc in sets:
        p = metric_fn(sc, labels)
        v = bootstrap_values(metric_fn, sc, labels, n, seed)  # same resamples for each r
        if p is None or v is None:
            return None
        point.append(float(p))
        vals.append(v)
    vals = np.stack(vals)  # f64[R, n]
    r = vals.shape[0]
    mean = float(np.mean(point))
    if r == 1:
        lo, hi = np.percentile(vals[0], [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
        return mean, (float(lo), float(hi))
    # Var(mean) = Var_eval(mean of the R scorings' metrics) + Var_between / R.
    var_eval = float(np.var(vals.mean(axis=0), ddof=1))
    var_between = float(np.var(point, ddof=1)) / r
    half = student_t_quantile(1.0 - alpha / 2.0, r - 1) * math.sqrt(var_eval + var_between)
    # metrics here are rates: the interval is clipped to [0, 1]
    return mean, (max(0.0, mean - half), min(1.0, mean + half))


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 <= p < 1) of Student's t with ``df`` >= 1 degrees of freedom
    (numerical inversion of its CDF; accurate to ~1e-9)."""
    if not 0.5 <= p < 1.0 or df < 1:
        raise ConfigError(f"student_t_quantile: need 0.5 <= p < 1 and df >= 1, got {p}, {df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t: float) -> float:  # Simpson's rule on the density over [0, t]
        x = np.linspace(0.0, t, 2001)
        f = c * (1.0 + x * x / df) ** (-(df + 1) / 2)
        h = t / 2000
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- tests, intervals

def mann_whitney_p(scores, labels) -> float:
    """Two-sided p-value of "members' and non-members' scores have one distribution" (the
    Mann-Whitney U test, i.e. AUC = 0.5): normal approximation with the tie correction of
    the variance and a continuity correction of 1/2. Exact enough from ~10 per class."""
    s, y = _check(scores, labels, "mann_whitney_p")
    n1, n0 = int(y.sum()), int(y.size - y.sum())
    u = roc_auc(s, y) * n1 * n0
    _, counts = np.unique(s, return_counts=True)
    n = n1 + n0
    ties = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    var = n1 * n0 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0.0:  # every score tied: no evidence either way
        return 1.0
    z = max(0.0, abs(u - n1 * n0 / 2.0) - 0.5) / math.sqrt(var)
    return float(math.erfc(z / math.sqrt(2.0)))


def holm_adjust(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error control over the family):
    sorted p_(1) <= ... <= p_(m), adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Reject the hypotheses whose adjusted p-value is below alpha."""
    names = sorted(p_values, key=lambda n: (p_values[n], n))
    m, running, out = len(names), 0.0, {}
    for i, name in enumerate(names):
        running = max(running, min(1.0, (m - i) * float(p_values[name])))
        out[name] = running
    return out


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score (1 - alpha) interval of a binomial proportion (good coverage near 0 and
    1, unlike the normal interval). Used for rates at a threshold fixed beforehand, where the
    count is binomial given the threshold."""
    if n < 1 or not 0 <= successes <= n:
        raise ConfigError(f"wilson_interval: need 0 <= successes <= n and n >= 1, got "
                          f"{successes}, {n}")
    z = _normal_quantile(1.0 - alpha / 2.0)
    p = successes / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _normal_quantile(p: float) -> float:
    """Standard normal p-quantile (bisection on erfc; 1e-12)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p else (lo, mid)
    return 0.5 * (lo + hi)


def heldout_threshold(train_scores, train_labels, fpr: float) -> float | None:
    """A decision threshold fixed on attack-training data: "member iff score > t" with at
    most ``floor(fpr * n)`` of the n attack-training non-members above t (t is the
    (m+1)-th highest non-member score). None when fpr < 1 / n: the attack-training set has
    too few non-members to set it."""
    s, y = _check(train_scores, train_labels, "heldout_threshold")
    neg = np.sort(s[y == 0])[::-1]
    m = _max_false_positives(fpr, neg.size)
    if m is None:
        return None
    return float(neg[m]) if m < neg.size else float(neg[-1]) - 1.0


HELDOUT_FPRS = {"1e-2": 1e-2, "1e-3": 1e-3}
HELDOUT_KEYS = tuple(k for tag in HELDOUT_FPRS for k in (
    f"tpr_at_heldout_threshold_{tag}", f"tpr_at_heldout_threshold_{tag}_ci",
    f"realised_fpr_at_heldout_threshold_{tag}", f"realised_fpr_at_heldout_threshold_{tag}_ci"))


def heldout_points(scores, labels, train_scores, train_labels) -> dict:
    """The deployable operating points: for each FPR target in ``HELDOUT_FPRS``, the
    threshold of :func:`heldout_threshold` on attack-training scores, applied once to the
    evaluation scores: its TPR and realised FPR there, each with a 95% Wilson interval
    (given the threshold the counts are binomial; the threshold's own sampling is not in
    the interval). Unsettable targets give None values."""
    s, y = _check(scores, labels, "heldout_points")
    out = {}
    pos, neg = s[y == 1], s[y == 0]
    for tag, fpr in HELDOUT_FPRS.items():
        t = heldout_threshold(train_scores, train_labels, fpr)
        tk, fk = f"tpr_at_heldout_threshold_{tag}", f"realised_fpr_at_heldout_threshold_{tag}"
        if t is None:
            out.update({tk: None, tk + "_ci": None, fk: None, fk + "_ci": None})
            continue
        tp, fp = int(np.sum(pos > t)), int(np.sum(neg > t))
        out[tk], out[tk + "_ci"] = tp / pos.size, list(wilson_interval(tp, pos.size))
        out[fk], out[fk + "_ci"] = fp / neg.size, list(wilson_interval(fp, neg.size))
    return out


# ----------------------------------------------------------------------------- report block

METRIC_KEYS = ("auc", "auc_ci", "accuracy", "balanced_accuracy", "tpr_at_fpr_1e-2",
               "tpr_at_fpr_1e-2_ci", "tpr_at_fpr_1e-3", "min_resolvable_fpr") + HELDOUT_KEYS


def evaluate(scores, preds, labels, n_boot: int = 1000, seed: int = 0, *,
             train_scores, train_labels) -> dict:
    """One attack's block of the report.

    Args:
      scores: f[N], higher = member (e.g. an MLP logit or a signed threshold feature).
      preds: {0,1}[N], the attack's decisions (its threshold fitted on attack-training data).
      labels: {0,1}[N], evaluation membership.
      n_boot, seed: bootstrap resamples and seed (shared by both CIs: paired resamples).
      train_scores, train_labels: the same attack's scores on its attack-training data, for
        the held-out operating points (:func:`heldout_points`).
      ``preds`` None (nothing fitted: no decision threshold) gives null accuracies;
      ``train_scores`` None (no attack-training data) gives null held-out points.
    Returns: ``METRIC_KEYS`` -> values. ``tpr_at_fpr_*`` are read off the evaluation ROC
      (the threshold chosen with the evaluation labels: an oracle operating point, as in
      LiRA's tables); ``*_at_heldout_threshold_*`` use a threshold fixed on attack-training
      data (what an auditor can deploy). CIs are [lo, hi] lists; unmeasurable values None.
    """
    _check(scores, labels, "evaluate")
    tpr2 = functools.partial(tpr_at_fpr, fpr=1e-2)
    auc_ci = bootstrap_ci(roc_auc, scores, labels, n_boot, seed)
    tpr2_ci = bootstrap_ci(tpr2, scores, labels, n_boot, seed)
    return {
        "auc": roc_auc(scores, labels),
        "auc_ci": list(auc_ci) if auc_ci is not None else None,
        "accuracy": accuracy(preds, labels) if preds is not None else None,
        "balanced_accuracy": balanced_accuracy(preds, labels) if preds is not None else None,
        "tpr_at_fpr_1e-2": tpr2(scores, labels),
        "tpr_at_fpr_1e-2_ci": list(tpr2_ci) if tpr2_ci is not None else None,
        "tpr_at_fpr_1e-3": tpr_at_fpr(scores, labels, 1e-3),
        "min_resolvable_fpr": min_resolvable_fpr(labels),
        **(heldout_points(scores, labels, train_scores, train_labels)
           if train_scores is not None else dict.fromkeys(HELDOUT_KEYS)),
    }


def auc_block(scores, labels, n_boot: int = 1000, seed: int = 0) -> dict:
    """``{auc, auc_ci, p_value}``: a control's AUC, its bootstrap CI and the two-sided
    Mann-Whitney p-value of AUC = 0.5."""
    ci = bootstrap_ci(roc_auc, scores, labels, n_boot, seed)
    return {"auc": roc_auc(scores, labels), "auc_ci": list(ci) if ci is not None else None,
            "p_value": mann_whitney_p(scores, labels)}
