"""Attack models: a threshold on one feature, and an MLP on an attack's feature matrix.

Both are fitted on attack-training data only (shadow model outputs or the partially known
members / non-members) and then applied once to the evaluation set. Both expose
``fit(x, y) -> self``, ``score(x)`` (higher = more member-like: what the ROC is computed on)
and ``predict(x)`` ({0,1}).

MLP training loop design: the whole fit is ONE jitted call. Epochs run in a
``lax.while_loop`` whose condition is the early-stopping rule (epoch < max_epochs and
epochs-since-best-validation-loss < patience), so stopping early actually saves the compute
(a ``lax.scan`` over max_epochs would have to run every epoch and mask). Inside an epoch a
``lax.scan`` walks the minibatches of a fresh permutation (``fold_in(key, epoch)``); the last
partial batch is padded with repeated indices and masked out of the loss. The best-validation
parameters are carried in the loop state. Data stays on device for the whole fit; the only
host transfers are the inputs once and the final parameters / loss history once.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t2i_mia.errors import ConfigError, DataError


def _check_xy(x: np.ndarray, y, fn: str, want_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    if x.ndim != want_ndim:
        raise DataError(f"{fn}: x must be {'[N]' if want_ndim == 1 else '[N, F]'}, got shape "
                        f"{x.shape}")
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise DataError(f"{fn}: labels must be [{x.shape[0]}], got shape {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise DataError(f"{fn}: labels must be 0 (non-member) or 1 (member)")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{fn}: {int(np.sum(~np.isfinite(x)))} non-finite feature values")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise DataError(f"{fn}: attack-training data needs both classes, got {n_pos} members "
                        f"and {y.size - n_pos} non-members")
    return x, y.astype(np.int64)


# ----------------------------------------------------------------------------- threshold

class ThresholdAttack:
    """Member iff ``sign * x > threshold``, both fitted for training accuracy.

    Attributes after fit: ``sign`` (+1: larger x = member; -1: smaller x = member, e.g. a
    distance), ``threshold`` (in sign * x units), ``train_accuracy``.
    """

    def __init__(self):
        self.sign: float | None = None
        self.threshold: float | None = None
        self.train_accuracy: float | None = None

    def fit(self, x, y) -> "ThresholdAttack":
        """x f[N] one feature, y {0,1}[N]. Candidate thresholds are the midpoints between
        consecutive distinct values (plus one below the minimum and one above the maximum);
        the (sign, threshold) of highest training accuracy wins, ties broken by sign +1
        first, then the lowest threshold."""
        x, y = _check_xy(x, y, "ThresholdAttack.fit", 1)
        x = x.astype(np.float64)
        best = None
        for sign in (1.0, -1.0):
            acc, thr = self._sweep(sign * x, y)
            i = int(np.argmax(acc))  # first maximum = lowest threshold
            if best is None or acc[i] > best[0]:
                best = (float(acc[i]), sign, float(thr[i]))
        self.train_accuracy, self.sign, self.threshold = best
        return self

    @staticmethod
    def _sweep(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training accuracy of "member iff s > t" for every candidate t (ascending)."""
        order = np.argsort(s, kind="mergesort")
        s, y = s[order], y[order]
        last = np.r_[np.where(np.diff(s))[0], s.size - 1]  # last index of each value group
        vals = s[last]
        pos_le = np.r_[0, np.cumsum(y)[last]]  # members with s <= t_i (predicted non-member)
        neg_le = np.r_[0, last + 1 - np.cumsum(y)[last]]
        n_pos = y.sum()
        acc = (neg_le + (n_pos - pos_le)) / y.size
        margin = max(1.0, float(vals[-1] - vals[0]))
        thr = np.r_[vals[0] - margin, (vals[:-1] + vals[1:]) / 2.0, vals[-1] + margin]
        return acc, thr

    def _check_fitted(self, x, fn: str) -> np.ndarray:
        if self.sign is None:
            raise DataError(f"ThresholdAttack.{fn}: call fit first")
        x = np.asarray(x, np.float64)
        if x.ndim != 1:
            raise DataError(f"ThresholdAttack.{fn}: x must be [N], got shape {x.shape}")
        return x

    def score(self, x) -> np.ndarray:
        """f64[N] = sign * x: higher = more member-like."""
        return self.sign * self._check_fitted(x, "score")

    def predict(self, x) -> np.ndarray:
        """{0,1}[N]: 1 where sign * x > threshold."""
        return (self.score(x) > self.threshold).astype(np.int64)


# ----------------------------------------------------------------------------- MLP

class _MLP(nn.Module):
    """ReLU MLP -> one logit per row."""
    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x):  # f32[B, F] -> f32[B]
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(1)(x)[..., 0]


def _bce(logits: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """Weighted mean binary cross-entropy on logits (optax's stable log-sigmoid form)."""
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y) * w) / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("hidden", "lr", "weight_decay", "batch_size",
                                             "max_epochs", "patience"))
def _fit_mlp(key, x_tr, y_tr, x_va, y_va, *, hidden, lr, weight_decay, batch_size,
             max_epochs, patience):
    """The whole training run. x_* f32[n, F] standardised, y_* f32[n]; x_va may have 0 rows
    (no validation: train max_epochs, keep the last parameters).

    Returns (params, epochs_run, best_epoch, train_loss f32[max_epochs], val_loss f32[...]),
    histories NaN after the last epoch run.
    """
    model = _MLP(hidden)
    k_init, k_perm = jax.random.split(key)
    params = model.init(k_init, x_tr[:1])["params"]
    tx = optax.adamw(lr, weight_decay=weight_decay)
    opt = tx.init(params)
    n = x_tr.shape[0]
    bs = min(batch_size, n)
    n_batches = -(-n // bs)
    pad = n_batches * bs - n
    mask = jnp.r_[jnp.ones(n), jnp.zeros(pad)].reshape(n_batches, bs)
    has_val = x_va.shape[0] > 0

    def loss_fn(p, x, y, w):
        return _bce(model.apply({"params": p}, x), y, w)

    def step(carry, batch):
        p, o = carry
        idx, w = batch
        loss, g = jax.value_and_grad(loss_fn)(p, x_tr[idx], y_tr[idx], w)
        updates, o = tx.update(g, o, p)
        return (optax.apply_updates(p, updates), o), loss * jnp.sum(w)

    def cond(state):
        epoch, since_best = state[0], state[5]
        return (epoch < max_epochs) & (since_best < patience)

    def body(state):
        epoch, p, o, best_p, best_val, since_best, best_epoch, hist_tr, hist_va = state
        perm = jax.random.permutation(jax.random.fold_in(k_perm, epoch), n)
        idx = jnp.r_[perm, perm[:pad]].reshape(n_batches, bs)
        (p, o), losses = jax.lax.scan(step, (p, o), (idx, mask))
        train_loss = jnp.sum(losses) / n
        if has_val:
            val_loss = loss_fn(p, x_va, y_va, jnp.ones(x_va.shape[0]))
            improved = val_loss < best_val
        else:
            val_loss = jnp.float32(jnp.nan)
            improved = jnp.bool_(True)
        best_p = jax.tree_util.tree_map(lambda a, b: jnp.where(improved, a, b), p, best_p)
        return (epoch + 1, p, o, best_p,
                jnp.where(improved, val_loss, best_val) if has_val else best_val,
                jnp.where(improved, 0, since_best + 1),
                jnp.where(improved, epoch, best_epoch),
                hist_tr.at[epoch].set(train_loss), hist_va.at[epoch].set(val_loss))

    nan_hist = jnp.full((max_epochs,), jnp.nan, jnp.float32)
    init = (jnp.int32(0), params, opt, params, jnp.float32(jnp.inf), jnp.int32(0),
            jnp.int32(-1), nan_hist, nan_hist)
    state = jax.lax.while_loop(cond, body, init)
    epoch, _, _, best_p, _, _, best_epoch, hist_tr, hist_va = state
    return best_p, epoch, best_epoch, hist_tr, hist_va


@functools.partial(jax.jit, static_argnames=("hidden",))
def _logits(params, x, mean, std, *, hidden):
    return _MLP(hidden).apply({"params": params}, (x - mean) / std)


class MLPAttack:
    """MLP attack model (flax.linen + optax.adamw), trained in one jitted call.

    Args:
      hidden: widths of the ReLU hidden layers.
      lr, weight_decay: AdamW.
      batch_size: minibatch size (capped at the training-split size).
      max_epochs, patience: early stopping on validation BCE (stop after ``patience`` epochs
        without improvement; the best-validation parameters are kept).
      val_fraction: share of each class held out (stratified) of the attack-training data
        for early stopping; 0 = no validation, train ``max_epochs`` and keep the last params.
      seed: PRNG seed of init, validation split and minibatch order (same seed, same data ->
        identical predictions).

    Attributes after fit: ``params``, ``mean_``/``std_`` f32[F] (of the training split),
    ``epochs_run_``, ``best_epoch_`` (0-based), ``stopped_early_``, ``history_``
    ({"train_loss", "val_loss"} f32[epochs_run_]).
    """

    def __init__(self, hidden=(64, 64), lr: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size: int = 64, max_epochs: int = 200, patience: int = 20,
                 val_fraction: float = 0.2, seed: int = 0):
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ConfigError(f"MLPAttack: hidden widths must be >= 1, got {hidden}")
        for name, v in (("batch_size", batch_size), ("max_epochs", max_epochs),
                        ("patience", patience)):
            if int(v) != v or v < 1:
                raise ConfigError(f"MLPAttack: {name} must be a positive integer, got {v}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"MLPAttack: lr must be > 0, got {lr}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ConfigError(f"MLPAttack: weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"MLPAttack: val_fraction must be in [0, 1), got {val_fraction}")
        self.hidden = hidden
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.max_epochs = int(max_epochs)
        self.patience = int(patience)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.params = None

    def _split(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stratified (train, val) indices: round(val_fraction * n_c) of each class, >= 1."""
        if self.val_fraction == 0.0:
            return np.arange(y.size), np.arange(0)
        rng = np.random.default_rng(self.seed)
        tr, va = [], []
        for c in (0, 1):
            idx = rng.permutation(np.where(y == c)[0])
            if idx.size < 2:
                raise DataError(f"MLPAttack.fit: class {c} has {idx.size} example(s); a "
                                "validation split needs at least 2 per class")
            n_va = min(idx.size - 1, max(1, int(round(self.val_fraction * idx.size))))
            va.append(idx[:n_va])
            tr.append(idx[n_va:])
        return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))

    def fit(self, x, y) -> "MLPAttack":
        """x f[N, F] attack-training features, y {0,1}[N] membership."""
        x, y = _check_xy(x, y, "MLPAttack.fit", 2)
        x = x.astype(np.float32)
        tr, va = self._split(y)
        self.mean_ = x[tr].mean(axis=0)
        std = x[tr].std(axis=0)
        self.std_ = np.where(std > 1e-12, std, 1.0).astype(np.float32)  # constant columns
        xs = (x - self.mean_) / self.std_
        params, epochs, best, h_tr, h_va = _fit_mlp(
            jax.random.PRNGKey(self.seed), jnp.asarray(xs[tr]), jnp.asarray(y[tr], jnp.float32),
            jnp.asarray(xs[va]), jnp.asarray(y[va], jnp.float32), hidden=self.hidden,
            lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
            max_epochs=self.max_epochs, patience=self.patience)
        self.params = jax.device_get(params)
        self.n_features_ = x.shape[1]
        self.epochs_run_ = int(epochs)
        self.best_epoch_ = int(best)
        self.stopped_early_ = self.epochs_run_ < self.max_epochs
        self.history_ = {"train_loss": np.asarray(h_tr)[:self.epochs_run_],
                         "val_loss": np.asarray(h_va)[:self.epochs_run_]}
        return self

    def score(self, x) -> np.ndarray:
        """f32[N] logits: higher = member. Use these for the ROC (the sigmoid saturates to
        exactly 0 or 1 in float32, which would create artificial ties)."""
        if self.params is None:
            raise DataError("MLPAttack: call fit first")
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features_:
            raise DataError(f"MLPAttack: x must be [N, {self.n_features_}] (as in fit), got "
                            f"shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise DataError(f"MLPAttack: {int(np.sum(~np.isfinite(x)))} non-finite features")
        return np.asarray(_logits(self.params, jnp.asarray(x), self.mean_, self.std_,
                                  hidden=self.hidden))

    def predict_proba(self, x) -> np.ndarray:
        """f32[N] member probability."""
        return np.asarray(jax.nn.sigmoid(self.score(x)), np.float32)

    def predict(self, x) -> np.ndarray:
        """{0,1}[N]: member iff probability > 0.5 (logit > 0)."""
        return (self.score(x) > 0).astype(np.int64)
