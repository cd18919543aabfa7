"""Attacks and controls on feature arrays (t2i_mia.adversary.evaluation): a positive control
that reads AUC ~1, controls that read chance without a leak and fire on deliberately leaking
pipelines, the calibrated attack, and the entries' schema-2 keys."""

import numpy as np
import pytest

from t2i_mia.adversary import evaluation as E
from t2i_mia.adversary import features as F
from t2i_mia.adversary import metrics as M
from conftest import assert_no_alarm, assert_reads_chance
from t2i_mia.config import load_config

N_TRAIN, N_EVAL = 120, 120  # per class


def _cfg(n_shuffles=10):
    return load_config("ci", [f"adversary.n_shuffles={n_shuffles}", "adversary.n_bootstrap=200"])


def _features(rng, labels, signal, difficulty=None):
    """Scalar features of every family (names as the audit's) with a membership shift of
    ``signal`` standard deviations in the pixel and semantic families; ``difficulty`` adds a
    per-query offset shared by every model (what calibration removes)."""
    n = len(labels)
    d = np.zeros(n) if difficulty is None else difficulty
    shift = signal * labels
    f = {}
    for name in ("pixel.mse.min", "pixel.mse.mean", "pixel.ssim.max"):
        sign = -1.0 if "mse" in name else 1.0  # smaller distance = member
        f[name] = (d + rng.normal(size=n) + sign * shift).astype(np.float32)
    f["semantic.cosine.max"] = (d + rng.normal(size=n) + shift).astype(np.float32)
    f["faithfulness.clip.max"] = rng.normal(size=n).astype(np.float32)
    return f


def _labels(n):
    return np.r_[np.ones(n), np.zeros(n)].astype(np.int32)


def _sets(rng, signal=1.5, null_signal=0.0):
    y_tr, y_ev = _labels(N_TRAIN), _labels(N_EVAL)
    return E.FeatureSets(train=_features(rng, y_tr, signal), train_labels=y_tr,
                         eval=_features(rng, y_ev, signal), eval_labels=y_ev,
                         null=_features(rng, y_ev, null_signal))


@pytest.fixture(scope="module")
def clean():
    fs = _sets(np.random.default_rng(0))
    return fs, E.evaluate_attacks(_cfg(), fs, seed=0)


def test_entries_carry_null_and_heldout_points(clean):
    _, (attacks, controls, curves) = clean
    assert set(attacks) == set(E.ATTACKS) and set(curves) == {f"{a} (MLP)" for a in E.ATTACKS}
    for a in E.ATTACKS:
        entries = [attacks[a]["mlp"]] + list(attacks[a]["threshold"].values())
        for e in entries:
            assert set(M.METRIC_KEYS) | {"null_target"} == set(e)
            assert set(e["null_target"]) == {"auc", "auc_ci", "p_value"}
            assert e["tpr_at_heldout_threshold_1e-2"] is not None  # 120 >= 100 non-members
            assert e["tpr_at_heldout_threshold_1e-3"] is None  # < 1000: cannot be set
    assert set(attacks["combined"]["threshold"]) == set(F.scalar_feature_names(clean[0].eval))


def test_controls_read_chance_without_a_leak(clean):
    _, (attacks, controls, _) = clean
    assert attacks["pixel"]["mlp"]["auc"] > 0.8 and attacks["combined"]["mlp"]["auc_ci"][0] > 0.5
    null = controls["null_target"]
    assert_reads_chance(null, "null_target")
    assert_no_alarm(null)
    assert set(null["per_attack"]) == set(E.ATTACKS)
    for a in E.ATTACKS:
        assert null["per_attack"][a]["p_holm"] >= null["per_attack"][a]["p_value"]
    shuf = controls["shuffled_labels"]
    assert_reads_chance(shuf, "shuffled_labels")
    assert len(shuf["per_shuffle_auc"]) == 10
    assert shuf["auc"] == pytest.approx(np.mean(shuf["per_shuffle_auc"]))


def test_positive_control_near_copies_read_auc_one():
    """A target whose member generations are near-copies of the member images (and whose
    non-member generations are other images): the real pixel features and the fitted attacks
    read AUC ~1. Non-member generations are other queries' images, so only membership
    separates the two."""
    from t2i_mia.data.synthetic import SyntheticCaptions
    ds = SyntheticCaptions(seed=0, size=32, n=4 * (N_TRAIN + N_EVAL))
    images, _ = ds.get_many(list(range(4 * (N_TRAIN + N_EVAL))))
    rng = np.random.default_rng(1)

    def query_set(offset, n):
        q = images[offset:offset + 2 * n]
        y = _labels(n)
        others = images[offset + 2 * n:offset + 4 * n]
        noisy = np.clip(q.astype(np.int16) + rng.integers(-6, 7, q.shape), 0, 255)
        gen = np.where(y[:, None, None, None] == 1, noisy, others).astype(np.uint8)[:, None]
        f = dict(F.pixel_features(F.to_unit_float(q), F.to_unit_float(gen)))
        # a fixed stand-in image encoder (4x4 block means) and random caption embeddings
        emb = lambda x: x.reshape(x.shape[:-3] + (8, 4, 8, 4, 3)).mean(axis=(-4, -2)).reshape(
            x.shape[:-3] + (-1,)).astype(np.float32)
        f.update(F.semantic_features(emb(q), emb(gen)))
        f.update(F.faithfulness_features(rng.normal(size=(2 * n, 192)).astype(np.float32),
                                         emb(gen)))
        return {k: np.asarray(v) for k, v in f.items()}, y

    f_tr, y_tr = query_set(0, N_TRAIN)
    f_ev, y_ev = query_set(4 * N_TRAIN, N_EVAL)
    fs = E.FeatureSets(train=f_tr, train_labels=y_tr, eval=f_ev, eval_labels=y_ev, null=f_ev)
    attacks, _, _ = E.evaluate_attacks(_cfg(n_shuffles=2), fs, seed=0)
    assert attacks["pixel"]["mlp"]["auc"] >= 0.99
    assert attacks["pixel"]["threshold"]["pixel.mse.min"]["auc"] >= 0.99
    assert attacks["pixel"]["mlp"]["tpr_at_heldout_threshold_1e-2"] >= 0.9


def test_null_control_fires_when_the_label_leaks_into_the_query_features():
    """A pipeline that lets the label into a feature of the queries (here: the member
    images were stored differently, which every model's features inherit): the null model's
    generations of the same queries carry it, so the null_target control fires."""
    rng = np.random.default_rng(2)
    fs = _sets(rng, signal=0.0)
    for f, y in ((fs.train, fs.train_labels), (fs.eval, fs.eval_labels),
                 (fs.null, fs.eval_labels)):
        f["pixel.mse.min"] = f["pixel.mse.min"] - 1.5 * y
    attacks, controls, _ = E.evaluate_attacks(_cfg(), fs, seed=0)
    null = controls["null_target"]
    assert null["alarm"] and null["auc_ci"][0] > 0.5
    assert min(v["p_holm"] for v in null["per_attack"].values()) < 0.05
    assert attacks["pixel"]["threshold"]["pixel.mse.min"]["null_target"]["auc_ci"][0] > 0.5


def test_shuffled_labels_control_fires_when_fitting_sees_the_evaluation_labels():
    """A deliberately leaking fit (a test double of ``fit``): it lets the evaluation labels
    into what it scores, as a pipeline that tuned on the evaluation set would. Shuffling the
    attack-training labels cannot remove that, so the shuffled_labels mean moves above 0.5
    and its CI excludes it; with the honest fit the same data read chance (above)."""
    rng = np.random.default_rng(3)
    fs = _sets(rng, signal=0.0)
    fs.eval["faithfulness.leak.value"] = fs.eval_labels.astype(np.float32)
    fs.train["faithfulness.leak.value"] = np.zeros(len(fs.train_labels), np.float32)
    fs.null["faithfulness.leak.value"] = np.zeros(len(fs.eval_labels), np.float32)

    class Leaky:
        def __init__(self, fitted):
            self.fitted, self.vectors = fitted, fitted.vectors

        def score(self, f):
            return self.fitted.score(f) + 0.5 * f["faithfulness.leak.value"]

        def predict(self, f):
            return (self.score(f) > 0).astype(np.int64)

    def leaky_fit(cfg, features, attack, y, seed):
        return Leaky(E.fit_mlp(cfg, features, attack, y, seed))

    honest = E.evaluate_attacks(_cfg(), fs, seed=0)[1]["shuffled_labels"]
    assert_reads_chance(honest, "shuffled_labels, honest fit")
    shuf = E.evaluate_attacks(_cfg(), fs, seed=0, fit=leaky_fit)[1]["shuffled_labels"]
    assert shuf["auc_ci"][0] > 0.5, shuf


def test_calibration_removes_per_query_difficulty():
    """Each query has a difficulty shared by every model (some images are easy to reproduce
    whether or not they were trained on): raw distances mostly measure it; the difference
    with a reference model that never saw the query removes it."""
    rng = np.random.default_rng(4)
    y_tr, y_ev = _labels(N_TRAIN), _labels(N_EVAL)
    d_tr, d_ev = 5.0 * rng.normal(size=2 * N_TRAIN), 5.0 * rng.normal(size=2 * N_EVAL)
    # expected AUCs: raw Phi(1.5 / sqrt(26)) = 0.62, calibrated Phi(1.5 / sqrt(2)) = 0.86
    fs = E.FeatureSets(train=_features(rng, y_tr, 1.5, d_tr), train_labels=y_tr,
                       eval=_features(rng, y_ev, 1.5, d_ev), eval_labels=y_ev,
                       null=_features(rng, y_ev, 0.0, d_ev))
    ref_tr, ref_ev = _features(rng, y_tr, 0.0, d_tr), _features(rng, y_ev, 0.0, d_ev)
    cal = E.FeatureSets(train=E.calibrate(fs.train, [ref_tr]), train_labels=y_tr,
                        eval=E.calibrate(fs.eval, [ref_ev]), eval_labels=y_ev,
                        null=E.calibrate(fs.null, [ref_ev]))
    assert sorted(cal.eval) == sorted(f"calibrated.{n}" for n in F.scalar_feature_names(fs.eval))
    np.testing.assert_allclose(cal.eval["calibrated.pixel.mse.min"],
                               fs.eval["pixel.mse.min"] - ref_ev["pixel.mse.min"], rtol=1e-6)
    attacks, _, _ = E.evaluate_attacks(_cfg(n_shuffles=2), fs, seed=0, calibrated=cal)
    raw = attacks["pixel"]["threshold"]["pixel.mse.min"]["auc"]
    calibrated = attacks["calibrated"]["threshold"]["calibrated.pixel.mse.min"]
    assert raw < 0.7 and calibrated["auc"] > max(0.68, raw + 0.1), (raw, calibrated["auc"])
    lo, hi = calibrated["null_target"]["auc_ci"]
    assert lo <= 0.5 <= hi
    assert "mlp" not in attacks["calibrated"]


def test_unfitted_mode_uses_the_intuitions_signs_and_holm_over_features():
    """aux_mode none: no MLP, every feature scored with its fixed sign (distances negated),
    the null alarm over every feature; a null model that memorised fires it."""
    rng = np.random.default_rng(3)
    y = _labels(N_EVAL)
    fs = E.FeatureSets(train=None, train_labels=None, eval=_features(rng, y, 1.5),
                       eval_labels=y, null=_features(rng, y, 0.0))
    attacks, controls, _ = E.evaluate_attacks(_cfg(), fs, seed=0)
    for a in E.ATTACKS:
        assert attacks[a]["mlp"] is None and "aux_mode=none" in attacks[a]["mlp_absent"]
    for name in ("pixel.mse.min", "pixel.ssim.max", "semantic.cosine.max"):
        e = attacks["combined"]["threshold"][name]
        assert e["auc"] > 0.8 and e["accuracy"] is None  # the sign is right without fitting
        assert e["tpr_at_heldout_threshold_1e-2"] is None
    assert set(controls["null_target"]["per_attack"]) == set(attacks["combined"]["threshold"])
    assert controls["null_target"]["alarm"] is False
    assert "absent" in controls["shuffled_labels"]
    leaky = E.FeatureSets(train=None, train_labels=None, eval=fs.eval, eval_labels=y,
                          null=_features(rng, y, 1.0))
    _, controls, _ = E.evaluate_attacks(_cfg(), leaky, seed=0)
    assert controls["null_target"]["alarm"] is True


def test_member_sign_of_every_feature_and_unknown_metrics():
    assert F.member_sign("pixel.mse.min") == -1 and F.member_sign("pixel.ssim.mean") == 1
    assert F.member_sign("calibrated.semantic.l2.mean") == -1
    assert F.member_sign("faithfulness.clip.max") == 1
    with pytest.raises(Exception, match="no member sign"):
        F.member_sign("pixel.lpips.min")


@pytest.mark.parametrize("fitted", [True, False])
def test_blind_baseline_reads_chance_on_one_distribution_and_fires_on_two(fitted):
    rng = np.random.default_rng(4)
    y_tr, y_ev = _labels(80), _labels(80)
    caps = ["a red circle on a blue ground"] * 160

    def x(labels, shift):
        emb = rng.normal(size=(len(labels), 16)) + shift * labels[:, None]
        return E.query_features(emb, caps[:len(labels)])

    cfg = _cfg()
    for shift, alarm in ((0.0, False), (1.0, True)):
        tr = x(y_tr, shift) if fitted else None
        s = E.blind_scores(cfg, tr, y_tr if fitted else None, x(y_ev, shift), y_ev, seed=0)
        block = E.blind_block(s, y_ev, 200, 0)
        if alarm:
            assert block["alarm"] is True, (shift, block)
        else:
            assert_reads_chance(block, "blind, one distribution")
