"""Metrics: hand-computed ROC/AUC/TPR@FPR, agreement with scikit-learn, bootstrap CIs."""

import functools

import numpy as np
import pytest

from t2i_mia.adversary import metrics as M
from t2i_mia.errors import ConfigError, DataError

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_auc_hand_cases():
    y = np.array([0, 0, 1, 1])
    assert M.roc_auc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert M.roc_auc([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert M.roc_auc([0.5, 0.5, 0.5, 0.5], y) == 0.5
    # 4 pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4
    assert M.roc_auc([0.1, 0.4, 0.35, 0.8], y) == 0.75
    # a tie counts 1/2: pos {0.5, 0.9} vs neg {0.5, 0.1}: 0.5 + 1 + 1 + 1 = 3.5 / 4
    assert M.roc_auc([0.5, 0.1, 0.5, 0.9], y) == 0.875


def test_roc_curve_hand_case():
    fpr, tpr, thr = M.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])


@pytest.mark.parametrize("drop", [True, False])
def test_agrees_with_sklearn_on_random_data_with_ties(drop):
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(4, 80))
        y = rng.integers(0, 2, n)
        y[:2], y[2:4] = 1, 0
        s = rng.integers(0, 6, n) * 0.25  # many ties
        assert M.roc_auc(s, y) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
        ours = M.roc_curve(s, y, drop_intermediate=drop)
        ref = sklearn_metrics.roc_curve(y, s, drop_intermediate=drop)
        for a, b, name in zip(ours, ref, ("fpr", "tpr", "thresholds")):
            np.testing.assert_allclose(a, b, err_msg=name)


def test_tpr_at_fpr_hand_example():
    members = [0.9, 0.8, 0.7, 0.3]
    nonmembers = [0.85, 0.6, 0.5, 0.4, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2]
    s = np.array(members + nonmembers)
    y = np.array([1] * 4 + [0] * 10)
    # FPR <= 0.1 allows one false positive (0.85): thresholds down to 0.7 -> 3/4 members.
    assert M.tpr_at_fpr(s, y, 0.1) == 0.75
    assert M.tpr_at_fpr(s, y, 0.3) == 0.75  # 3 FPs at t = 0.5, the next member is at 0.3
    assert M.tpr_at_fpr(s, y, 0.5) == 1.0  # 5 FPs at t = 0.2 include the member at 0.3
    assert M.tpr_at_fpr(s, y, 1.0) == 1.0
    # Below 1 / n_nonmembers = 0.1 the set cannot tell: None.
    assert M.tpr_at_fpr(s, y, 0.05) is None
    assert M.tpr_at_fpr(s, y, 0.0) is None
    assert M.min_resolvable_fpr(y) == 0.1


def test_tpr_at_fpr_does_not_split_tie_groups():
    # pos {0.9, 0.5}, neg {0.5, 0.5, 0, 0}: one FP allowed, but the 0.5 group brings two.
    s = np.array([0.9, 0.5, 0.5, 0.5, 0.0, 0.0])
    y = np.array([1, 1, 0, 0, 0, 0])
    assert M.tpr_at_fpr(s, y, 0.25) == 0.5
    assert M.tpr_at_fpr(s, y, 0.5) == 1.0
    # When even the top score group exceeds the allowance, only "nothing is member" fits.
    s2 = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.0])
    assert M.tpr_at_fpr(s2, y, 0.25) == 0.0


def test_accuracy_and_balanced_accuracy():
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([1, 1, 1, 0, 1, 0])
    assert M.accuracy(p, y) == pytest.approx(4 / 6)
    assert M.balanced_accuracy(p, y) == pytest.approx(0.5 * (3 / 4 + 1 / 2))
    assert M.balanced_accuracy(p, y) == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(y, p))
    with pytest.raises(DataError, match="0 or 1"):
        M.accuracy(np.array([0.3, 1, 1, 0, 1, 0]), y)


def test_too_small_or_bad_sets_error():
    with pytest.raises(DataError, match="got 0 members and 0 non-members"):
        M.roc_auc([], [])
    with pytest.raises(DataError, match="at least 2 members and 2 non-members, got 1 members "
                                        "and 3 non-members"):
        M.roc_auc([0.1, 0.2, 0.3, 0.4], [1, 0, 0, 0])
    for fn in (M.roc_curve, functools.partial(M.tpr_at_fpr, fpr=0.5)):
        with pytest.raises(DataError, match="got 2 members and 1 non-members"):
            fn([0.1, 0.2, 0.3], [1, 1, 0])
    with pytest.raises(DataError, match="non-finite"):
        M.roc_auc([0.1, np.nan, 0.3, 0.4], [1, 1, 0, 0])
    with pytest.raises(DataError, match="labels must be 0"):
        M.roc_auc([0.1, 0.2, 0.3, 0.4], [1, 2, 0, 0])
    with pytest.raises(DataError, match="3 scores but 4 labels"):
        M.roc_auc([0.1, 0.2, 0.3], [1, 1, 0, 0])


def _gauss(n, shift, seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    return rng.normal(size=2 * n) + shift * y, y


def test_bootstrap_contains_estimate_and_shrinks():
    widths = []
    for n in (50, 2000):
        s, y = _gauss(n, 1.0, seed=n)
        lo, hi = M.bootstrap_ci(M.roc_auc, s, y, n=500, seed=1)
        assert lo <= M.roc_auc(s, y) <= hi
        widths.append(hi - lo)
    # The CI width scales like 1/sqrt(n): 40x the data, ~6x narrower.
    assert widths[1] < widths[0] / 4


def test_bootstrap_vectorised_equals_loop():
    s, y = _gauss(60, 0.7, seed=3)
    s = np.round(s, 1)  # ties
    for metric in (M.roc_auc, functools.partial(M.tpr_at_fpr, fpr=0.05),
                   functools.partial(M.tpr_at_fpr, fpr=0.2)):
        fast = M.bootstrap_values(metric, s, y, n=200, seed=7)
        slow = M.bootstrap_values(metric, s, y, n=200, seed=7, vectorise=False)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    # a generic metric goes through the loop with the same resamples
    generic = M.bootstrap_values(lambda a, b: M.roc_auc(a, b), s, y, n=200, seed=7)
    np.testing.assert_allclose(generic, M.bootstrap_values(M.roc_auc, s, y, n=200, seed=7),
                               atol=1e-12)


def test_bootstrap_unmeasurable_is_none_and_seeded():
    s, y = _gauss(50, 1.0, seed=0)  # 50 non-members: FPR 1e-3 is unmeasurable
    assert M.bootstrap_ci(functools.partial(M.tpr_at_fpr, fpr=1e-3), s, y, n=100) is None
    assert M.bootstrap_ci(lambda a, b: None, s, y, n=20) is None
    a = M.bootstrap_ci(M.roc_auc, s, y, n=100, seed=5)
    assert a == M.bootstrap_ci(M.roc_auc, s, y, n=100, seed=5)
    assert a != M.bootstrap_ci(M.roc_auc, s, y, n=100, seed=6)


def test_bootstrap_is_stratified():
    # Every resample keeps 3 members and 40 non-members: the metric never sees a set
    # without members (plain resampling would draw one with probability ~(40/43)^43 ~ 4%
    # per resample and roc_auc would raise).
    s, y = _gauss(40, 1.0, seed=2)
    s, y = np.r_[s[:3], s[40:]], np.r_[y[:3], y[40:]]
    vals = M.bootstrap_values(lambda a, b: float(np.sum(b)), s, y, n=300, seed=0)
    assert np.all(vals == 3)


def test_evaluate_report_block():
    s, y = _gauss(150, 1.5, seed=4)
    p = (s > 0.75).astype(int)
    s_tr, y_tr = _gauss(150, 1.5, seed=5)
    out = M.evaluate(s, p, y, n_boot=200, seed=0, train_scores=s_tr, train_labels=y_tr)
    assert tuple(out) == M.METRIC_KEYS
    assert out["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, s))
    assert out["accuracy"] == pytest.approx(np.mean(p == y))
    assert out["tpr_at_fpr_1e-2"] == M.tpr_at_fpr(s, y, 0.01)
    assert isinstance(out["auc_ci"], list) and len(out["auc_ci"]) == 2
    assert out["auc_ci"][0] <= out["auc"] <= out["auc_ci"][1]
    assert isinstance(out["tpr_at_fpr_1e-2_ci"], list)
    assert out["tpr_at_fpr_1e-3"] is None  # 150 non-members < 1000
    assert out["min_resolvable_fpr"] == pytest.approx(1 / 150)
    # 50 non-members: TPR@1% is unmeasurable too, with its CI
    s2, y2 = _gauss(50, 1.5, seed=4)
    out2 = M.evaluate(s2, (s2 > 0.75).astype(int), y2, n_boot=50, seed=0,
                      train_scores=s_tr, train_labels=y_tr)
    assert out2["tpr_at_fpr_1e-2"] is None and out2["tpr_at_fpr_1e-2_ci"] is None


def test_replicate_bootstrap_one_replicate_is_the_plain_bootstrap():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(60), np.zeros(60)].astype(int)
    s = rng.normal(size=120) + 0.8 * y
    auc, ci = M.replicate_bootstrap(M.roc_auc, [s], y, n=300, seed=5)
    assert auc == pytest.approx(M.roc_auc(s, y))
    assert ci == pytest.approx(M.bootstrap_ci(M.roc_auc, s, y, n=300, seed=5))


def test_replicate_bootstrap_covers_the_spread_between_replicates():
    # Two replicate scorings with opposite directions (AUC ~0.85 and ~0.15): each alone has
    # a CI far from 0.5, the procedure's mean is ~0.5 and its interval spans both.
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200), np.zeros(200)].astype(int)
    s = rng.normal(size=400) + 1.5 * y
    auc, (lo, hi) = M.replicate_bootstrap(M.roc_auc, [s, -s], y, n=500, seed=1)
    assert auc == pytest.approx(0.5)
    lo1, hi1 = M.bootstrap_ci(M.roc_auc, s, y, n=500, seed=1)
    assert lo1 > 0.75 and hi1 < 0.95
    assert lo < 0.25 and hi > 0.75 and lo >= 0.0 and hi <= 1.0
    # A leak moves every replicate the same way: the interval then excludes 0.5.
    auc, (lo, hi) = M.replicate_bootstrap(M.roc_auc, [s, s + 0.1 * rng.normal(size=400)], y,
                                          n=500, seed=1)
    assert lo > 0.5 and auc > 0.75
    # Same seed, same interval; no replicates is an error.
    assert M.replicate_bootstrap(M.roc_auc, [s, -s], y, n=200, seed=4) == \
        M.replicate_bootstrap(M.roc_auc, [s, -s], y, n=200, seed=4)
    with pytest.raises(Exception, match="at least one"):
        M.replicate_bootstrap(M.roc_auc, [], y)


def _shuffled_control_trial(seed: int, leak: float, r: int = 30, n: int = 150):
    """R replicate scorings of one evaluation set (n members + n non-members), as the
    shuffled_labels control makes them: each a random function of informative features
    (its AUC scatters around 0.5 in either direction, sd ~0.1), plus ``leak`` * label (an
    injected leak that moves every replicate the same way)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    x = rng.normal(size=(2 * n, 8)) + 0.5 * y[:, None] * rng.normal(size=8)
    sets = [np.tanh(x @ rng.normal(size=8) / 3) + 0.3 * rng.normal(size=2 * n) + leak * y
            for _ in range(r)]
    return sets, y


def test_replicate_bootstrap_is_a_ci_of_the_mean_that_fires_on_a_leak():
    """The shuffled_labels control's interval: a CI of the mean over replicates. Without a
    leak it contains 0.5 about 95% of the time although single replicates stray far from
    it; an injected leak that moves the mean to ~0.58 (single replicates still scatter with sd
    ~0.1) is flagged in >= 20 of 24 trials (an interval that draws one replicate per
    resample is as wide as a single replicate's scatter, half-width ~0.2: it flagged none)."""
    trials = 24
    null_hits, leak_hits, single_far = 0, 0, 0
    for t in range(trials):
        sets, y = _shuffled_control_trial(t, 0.0)
        auc, (lo, hi) = M.replicate_bootstrap(M.roc_auc, sets, y, n=100, seed=t)
        null_hits += not (lo <= 0.5 <= hi)
        single_far += sum(abs(M.roc_auc(s, y) - 0.5) > 0.1 for s in sets)
        sets, y = _shuffled_control_trial(t, 0.2)
        auc, (lo, hi) = M.replicate_bootstrap(M.roc_auc, sets, y, n=100, seed=t)
        assert 0.52 < auc < 0.64, auc
        leak_hits += lo > 0.5
    assert single_far / (trials * 30) > 0.2  # single shuffles often stray beyond 0.5 +/- 0.1
    assert null_hits <= 3, null_hits  # ~5% expected: 1.2 of 24
    assert leak_hits >= 20, leak_hits


def test_student_t_quantile():
    assert M.student_t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert M.student_t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-4)
    assert M.student_t_quantile(0.975, 1000) == pytest.approx(1.9623, abs=1e-4)
    assert M.student_t_quantile(0.5, 5) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(Exception, match="student_t_quantile"):
        M.student_t_quantile(0.2, 3)


def test_heldout_threshold_and_operating_points():
    # 200 attack-training non-members: at 1% FPR at most 2 of them lie above the threshold
    y_tr = np.r_[np.ones(50), np.zeros(200)].astype(int)
    s_tr = np.r_[np.full(50, 10.0), np.arange(200, dtype=float)]
    t = M.heldout_threshold(s_tr, y_tr, 1e-2)
    assert t == 197.0 and np.sum(s_tr[y_tr == 0] > t) == 2
    assert M.heldout_threshold(s_tr, y_tr, 1e-3) is None  # 200 < 1000 non-members
    # applied once to an evaluation set: TPR and realised FPR are counts above t
    y = np.r_[np.ones(10), np.zeros(100)].astype(int)
    s = np.r_[np.linspace(150, 250, 10), np.linspace(0, 198.5, 100)]
    out = M.heldout_points(s, y, s_tr, y_tr)
    assert out["tpr_at_heldout_threshold_1e-2"] == np.mean(s[:10] > 197.0)
    assert out["realised_fpr_at_heldout_threshold_1e-2"] == np.mean(s[10:] > 197.0) == 0.01
    lo, hi = out["realised_fpr_at_heldout_threshold_1e-2_ci"]
    assert lo < 0.01 < hi
    assert out["tpr_at_heldout_threshold_1e-3"] is None


def test_heldout_fpr_is_honest_where_the_roc_figure_is_an_oracle():
    """On a null attack (no signal) the ROC's TPR@1% picks its threshold with the labels;
    the held-out threshold's realised FPR stays near its 1% target on average."""
    rng = np.random.default_rng(0)
    fprs = []
    for _ in range(40):
        y = np.r_[np.ones(300), np.zeros(300)].astype(int)
        fprs.append(M.heldout_points(rng.normal(size=600), y, rng.normal(size=600),
                                     y)["realised_fpr_at_heldout_threshold_1e-2"])
    assert 0.005 < np.mean(fprs) < 0.02


def test_wilson_interval_against_known_values():
    lo, hi = M.wilson_interval(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0370, abs=2e-4)
    lo, hi = M.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=2e-4)
    with pytest.raises(ConfigError, match="wilson_interval"):
        M.wilson_interval(5, 3)


def test_mann_whitney_p_against_scipy():
    from scipy.stats import mannwhitneyu
    rng = np.random.default_rng(2)
    for shift in (0.0, 0.3, 1.0):
        s = np.round(rng.normal(size=120) + shift * np.r_[np.ones(40), np.zeros(80)], 1)
        y = np.r_[np.ones(40), np.zeros(80)].astype(int)
        ref = mannwhitneyu(s[y == 1], s[y == 0], alternative="two-sided",
                           method="asymptotic", use_continuity=True).pvalue
        assert M.mann_whitney_p(s, y) == pytest.approx(ref, rel=1e-6)


def test_holm_adjust():
    adj = M.holm_adjust({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adj == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})


def test_shuffled_control_flags_a_leak_of_auc_056():
    """The size the control is built for: 500 + 500 evaluation queries, 20 shuffles. An
    injected leak that moves the mean shuffled AUC to ~0.56 is flagged (CI above 0.5) in
    most trials; without it the CI contains 0.5 in nearly all."""
    trials, flagged, false_alarms, means = 20, 0, 0, []
    for t in range(trials):
        sets, y = _shuffled_control_trial(100 + t, 0.15, r=20, n=500)
        auc, (lo, hi) = M.replicate_bootstrap(M.roc_auc, sets, y, n=100, seed=t)
        means.append(auc)
        flagged += lo > 0.5
        sets, y = _shuffled_control_trial(200 + t, 0.0, r=20, n=500)
        _, (lo, hi) = M.replicate_bootstrap(M.roc_auc, sets, y, n=100, seed=t)
        false_alarms += not (lo <= 0.5 <= hi)
    assert 0.55 < np.mean(means) < 0.57, np.mean(means)
    assert flagged >= 14, flagged
    assert false_alarms <= 3, false_alarms
