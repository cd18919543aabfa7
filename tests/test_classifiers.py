"""Attack models: threshold direction/placement; the jitted MLP learns, stops early, is seeded."""

import numpy as np
import pytest

from t2i_mia.adversary import metrics as M
from t2i_mia.adversary.classifiers import MLPAttack, ThresholdAttack
from t2i_mia.errors import ConfigError, DataError


def test_threshold_larger_is_member():
    x = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    t = ThresholdAttack().fit(x, [0, 0, 1, 1])
    assert (t.sign, t.threshold, t.train_accuracy) == (1.0, 1.5, 1.0)  # midpoint of 1 and 2
    np.testing.assert_array_equal(t.score(x), x)
    np.testing.assert_array_equal(t.predict([1.4, 1.6, 10.0]), [0, 1, 1])


def test_threshold_smaller_is_member():
    # a distance: members are closer
    x = np.array([0.1, 0.2, 0.9, 1.3, 0.25], np.float32)
    y = np.array([1, 1, 0, 0, 1])
    t = ThresholdAttack().fit(x, y)
    assert t.sign == -1.0 and t.train_accuracy == 1.0
    assert t.threshold == pytest.approx(-(0.25 + 0.9) / 2)
    np.testing.assert_array_equal(t.predict(x), y)
    assert M.roc_auc(t.score(x), y) == 1.0


def test_threshold_maximises_training_accuracy_with_overlap():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(300), np.zeros(300)].astype(int)
    x = rng.normal(size=600) - 1.0 * y  # members lower
    t = ThresholdAttack().fit(x, y)
    brute = max(max(np.mean((s * x > c) == y) for c in np.r_[s * x, -1e9]) for s in (1, -1))
    assert t.sign == -1.0
    assert t.train_accuracy == pytest.approx(brute)
    assert np.mean(t.predict(x) == y) == pytest.approx(t.train_accuracy)
    # a constant feature: the majority class
    t2 = ThresholdAttack().fit(np.zeros(5), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(t2.predict(np.zeros(3)), [1, 1, 1])
    with pytest.raises(DataError, match="both classes"):
        ThresholdAttack().fit(np.zeros(4), [1, 1, 1, 1])
    with pytest.raises(DataError, match="call fit first"):
        ThresholdAttack().score(np.zeros(3))


def _xor(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    return x, (x[:, 0] * x[:, 1] > 0).astype(int)


@pytest.fixture(scope="module")
def xor_mlp():
    x, y = _xor(600, seed=1)
    return MLPAttack(lr=1e-2, max_epochs=200, patience=20, seed=0).fit(x, y)


def test_mlp_learns_xor(xor_mlp):
    xt, yt = _xor(400, seed=2)
    assert M.roc_auc(xor_mlp.score(xt), yt) > 0.95
    assert np.mean(xor_mlp.predict(xt) == yt) > 0.9
    p = xor_mlp.predict_proba(xt)
    assert p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
    np.testing.assert_array_equal(xor_mlp.predict(xt), (p > 0.5).astype(int))
    # early stopping kept the best-validation parameters
    h = xor_mlp.history_["val_loss"]
    assert len(h) == xor_mlp.epochs_run_
    assert xor_mlp.best_epoch_ == int(np.argmin(h))


def test_mlp_same_seed_identical(xor_mlp):
    x, y = _xor(600, seed=1)
    xt, _ = _xor(100, seed=3)
    again = MLPAttack(lr=1e-2, max_epochs=200, patience=20, seed=0).fit(x, y)
    np.testing.assert_array_equal(again.score(xt), xor_mlp.score(xt))
    other = MLPAttack(lr=1e-2, max_epochs=200, patience=20, seed=1).fit(x, y)
    assert not np.array_equal(other.score(xt), xor_mlp.score(xt))


def test_mlp_standardises_and_runs_without_validation():
    x, y = _xor(600, seed=1)
    x = x * np.array([1000.0, 0.001], np.float32) + np.array([5e3, -2.0], np.float32)
    x[:, 1] = x[:, 1] * 0 + 7.0  # a constant column: std 1, not 0
    m = MLPAttack(lr=1e-2, max_epochs=3, patience=1, val_fraction=0.0, seed=0).fit(x, y)
    np.testing.assert_allclose(m.mean_, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.std_, [x[:, 0].std(), 1.0], rtol=1e-4)
    # no validation split: all max_epochs run, the last parameters are kept
    assert m.epochs_run_ == 3 and not m.stopped_early_ and m.best_epoch_ == 2
    assert np.all(np.isnan(m.history_["val_loss"]))
    assert np.all(np.isfinite(m.score(x)))


def test_mlp_on_noise_stops_early_and_is_chance():
    """Shuffled (here: feature-independent) labels: held-out AUC ~ 0.5, early stop."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = rng.permutation(np.r_[np.ones(200), np.zeros(200)]).astype(int)
    m = MLPAttack(lr=1e-2, max_epochs=200, patience=10, seed=0).fit(x, y)
    assert m.stopped_early_ and m.epochs_run_ < 200
    xt = rng.normal(size=(2000, 5)).astype(np.float32)
    yt = rng.integers(0, 2, 2000)
    # 2000 held-out points: the AUC's standard error is ~0.013
    assert abs(M.roc_auc(m.score(xt), yt) - 0.5) < 0.06


def test_mlp_stratified_validation_split():
    y = np.r_[np.ones(30), np.zeros(70)].astype(int)
    tr, va = MLPAttack(val_fraction=0.2)._split(y)
    assert np.sum(y[va] == 1) == 6 and np.sum(y[va] == 0) == 14
    assert not set(tr) & set(va) and len(tr) + len(va) == 100
    with pytest.raises(DataError, match="class 1 has 1 example"):
        MLPAttack()._split(np.r_[1, np.zeros(10)].astype(int))


def test_mlp_errors():
    with pytest.raises(ConfigError, match="val_fraction"):
        MLPAttack(val_fraction=1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        MLPAttack(batch_size=0)
    with pytest.raises(DataError, match="non-finite"):
        MLPAttack().fit(np.array([[0.0], [np.inf], [1.0], [2.0]]), [0, 1, 0, 1])
    with pytest.raises(DataError, match=r"x must be \[N, F\]"):
        MLPAttack().fit(np.zeros(4), [0, 1, 0, 1])
