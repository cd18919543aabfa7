"""The audit's MLP input choice: with or without the embedding (vector) features."""

import numpy as np
import pytest

from t2i_mia.adversary import metrics as M
from t2i_mia.adversary.evaluation import fit_mlp
from t2i_mia.config import get_config, load_config
from t2i_mia.errors import ConfigError


def _features(rng, n, signal_in_vectors):
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    shift = 1.2 * (y - 0.5)
    scalar = rng.normal(size=n) + (0.0 if signal_in_vectors else shift)
    emb = rng.normal(size=(n, 96)).astype(np.float32)
    if signal_in_vectors:
        emb[:, 5] += 2.0 * shift
    return {"semantic.cosine.max": scalar.astype(np.float32), "semantic.emb_query": emb,
            "pixel.mse.min": rng.normal(size=n).astype(np.float32)}, y


@pytest.mark.parametrize("signal_in_vectors", [False, True])
def test_auto_keeps_the_inputs_that_validate_better(signal_in_vectors):
    cfg = get_config("ci")
    rng = np.random.default_rng(0)
    f_tr, y_tr = _features(rng, 600, signal_in_vectors)
    f_ev, y_ev = _features(rng, 600, signal_in_vectors)
    auto = fit_mlp(cfg, f_tr, "semantic", y_tr, seed=0)
    assert auto.vectors == signal_in_vectors
    aucs = {}
    for mode in ("never", "always"):
        cfg.adversary.mlp.embeddings = mode
        fitted = fit_mlp(cfg, f_tr, "semantic", y_tr, seed=0)
        assert fitted.vectors == (mode == "always")
        aucs[mode] = M.roc_auc(fitted.score(f_ev), y_ev)
    best = "always" if signal_in_vectors else "never"
    assert M.roc_auc(auto.score(f_ev), y_ev) == pytest.approx(aucs[best])
    assert aucs[best] > 0.7


def test_attack_without_vectors_fits_scalars_only():
    rng = np.random.default_rng(1)
    f, y = _features(rng, 200, False)
    fitted = fit_mlp(get_config("ci"), f, "pixel", y, seed=0)
    assert not fitted.vectors and fitted.matrix(f).shape == (200, 1)


def test_embeddings_mode_is_validated():
    with pytest.raises(ConfigError, match="adversary.mlp.embeddings"):
        load_config("ci", ["adversary.mlp.embeddings=sometimes"])


def test_balanced_shuffle_for_the_shuffled_labels_control():
    """Each shuffled-labels fit sees as many ones as zeros (the control's null value is 0.5
    only then): every row of the smaller class, as many distinct rows of the larger one,
    labels permuted; seeded."""
    from t2i_mia.adversary.evaluation import balanced_shuffle
    y = np.r_[np.ones(64), np.zeros(128)].astype(np.int32)
    rows, labels = balanced_shuffle(y, np.random.default_rng(3))
    assert len(rows) == 128 and len(set(rows.tolist())) == 128
    assert int(labels.sum()) == 64 and int((y[rows] == 1).sum()) == 64
    assert set(np.flatnonzero(y == 1)) <= set(rows.tolist())  # all of the smaller class
    assert not np.array_equal(labels, y[rows])  # permuted
    again = balanced_shuffle(y, np.random.default_rng(3))
    assert np.array_equal(again[0], rows) and np.array_equal(again[1], labels)
