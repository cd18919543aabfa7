"""The pure train-step pattern every model's training reuses.

* :class:`TrainState`: a plain pytree (step, params, opt_state, ema_params, rng); nothing
  static in it, so orbax saves and restores it whole.
* :func:`make_train_step`: ``train_step(state, batch) -> (state, metrics)``, a pure function.
  The step's randomness is ``fold_in(state.rng, state.step)``: a function of the state alone,
  so a resumed run draws the same numbers as an uninterrupted one.
* :func:`jit_train_step`: ``jax.jit`` with ``in_shardings``/``out_shardings`` from the
  sharding rules (:mod:`t2i_mia.parallel.mesh`) and the state donated.
* :func:`run_training`: the loop: resume, step, log, checkpoint, save on SIGTERM/Ctrl-C.
* :func:`train_with_config`: the three above for one model's ``TrainConfig`` (steps, EMA,
  checkpoint interval); every model's training calls it.

Data position: ``batch_fn(step)`` must be a pure function of the step (e.g. via
:func:`epoch_batches`), so the iterator position *is* ``state.step`` and is checkpointed
with it; resuming after a crash replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec
from tqdm.auto import tqdm

from t2i_mia.checkpoint import latest_step, restore_checkpoint, save_checkpoint
from t2i_mia.config import TrainConfig
from t2i_mia.errors import ConfigError
from t2i_mia.parallel.mesh import (DEFAULT_RULES, Rules, batch_sharding, param_shardings,
                                   replicated, shard_batch)
from t2i_mia.training.ema import ema_update

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict]]

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue bit for bit.

    step: int32 scalar, number of completed steps. params / ema_params (None without EMA):
    parameter pytrees. opt_state: the optax state. rng: uint32[2] raw PRNG key, fixed for the
    run (each step uses ``fold_in(rng, step)``).
    """
    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree | None
    rng: jax.Array


def _raw_key(rng: int | jax.Array) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.PRNGKey(int(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(f"TrainState.rng: expected a uint32[2] PRNG key, got "
                         f"{rng.dtype}{list(rng.shape)}")
    return rng


def create_train_state(params: PyTree, tx: optax.GradientTransformation,
                       rng: int | jax.Array, ema: bool = False, *, mesh: Mesh | None = None,
                       rules: Rules = ()) -> TrainState:
    """A fresh state at step 0 (``rng``: a seed, a uint32[2] key or a typed key).

    With ``mesh``, the whole state is created on it, split by ``rules`` (optimiser moments
    and EMA follow their parameter): the optimiser state is born sharded, and ``params``
    are placed shard by shard (no device holds a whole split parameter)."""
    key = _raw_key(rng)

    def init(p):
        # The EMA is a copy, so donating the state does not donate one buffer twice.
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          ema_params=jax.tree.map(jnp.copy, p) if ema else None, rng=key)

    if mesh is None:
        # One compiled program instead of one eager dispatch (and compile) per leaf.
        return jax.jit(init)(params)
    params = jax.device_put(params, param_shardings(params, mesh, rules))
    shardings = param_shardings(jax.eval_shape(init, params), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(params)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    ema_decay: float | None = None
                    ) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)`` for ``loss_fn(params, batch, rng) ->
    (loss, metrics)``; ``metrics`` gains ``loss`` and ``grad_norm`` (global L2 norm of the
    gradients, before the optimiser). ``ema_decay`` None or 0 disables the EMA update."""
    use_ema = ema_decay is not None and ema_decay != 0

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if use_ema:
            if ema is None:
                raise ConfigError("make_train_step: ema_decay is set but the state has no "
                                  "ema_params (create_train_state(..., ema=True))")
            ema = ema_update(ema, params, ema_decay)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                           for g in jax.tree.leaves(grads)))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema_params=ema), metrics

    return train_step


class ShardedStep:
    """A jitted train step bound to a mesh; call it like the step. ``state_shardings`` and
    ``batch_shardings`` are what it expects; :meth:`place` puts a state onto them."""

    def __init__(self, jitted, mesh: Mesh, state_shardings: PyTree, batch_shardings: PyTree):
        self.jitted = jitted
        self.mesh = mesh
        self.state_shardings = state_shardings
        self.batch_shardings = batch_shardings

    def __call__(self, state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        return self.jitted(state, batch)

    def place(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.state_shardings)

    def lower(self, state: TrainState, batch: PyTree):
        return self.jitted.lower(state, batch)


def jit_train_step(train_step: Callable, mesh: Mesh, state: TrainState, batch_example: PyTree,
                   rules: Sequence[tuple[str, PartitionSpec]] = ()) -> ShardedStep:
    """``jax.jit(train_step)`` with the state sharded by ``rules`` (applied to the whole
    state, so optimiser moments and EMA follow their parameter), the batch's leading axis on
    'data', metrics replicated, and the input state donated (its buffers are reused: do not
    touch the state passed in after the call). ``batch_example`` gives each batch leaf's
    rank (arrays or ShapeDtypeStructs)."""
    state_sh = param_shardings(state, mesh, rules)
    batch_sh = jax.tree.map(lambda x: batch_sharding(mesh, len(np.shape(x))), batch_example)
    jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))
    return ShardedStep(jitted, mesh, state_sh, batch_sh)


def epoch_batches(n_examples: int, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
    """``indices(step) -> int64[batch_size]``: the step-th slice of the concatenation of one
    permutation of ``range(n_examples)`` per epoch, epoch e's from
    ``np.random.Generator(PCG64([seed, e]))``. Pure in ``step`` (a batch may span two epochs),
    so the data position is the step."""
    if n_examples < 1:
        raise ValueError(f"epoch_batches: n_examples must be >= 1, got {n_examples}")
    if batch_size < 1:
        raise ValueError(f"epoch_batches: batch_size must be >= 1, got {batch_size}")
    cache: dict[int, np.ndarray] = {}  # a memo of pure values: the last few epochs

    def perm(epoch: int) -> np.ndarray:
        if epoch not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            rng = np.random.Generator(np.random.PCG64([int(seed), int(epoch)]))
            cache[epoch] = rng.permutation(n_examples)
        return cache[epoch]

    def indices(step: int) -> np.ndarray:
        if step < 0:
            raise ValueError(f"epoch_batches: step must be >= 0, got {step}")
        pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(pos, n_examples)
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = perm(int(e))[offsets[sel]]
        return out

    return indices


@contextlib.contextmanager
def _stop_requests():
    """SIGTERM and the first Ctrl-C set a flag (the loop finishes its step, saves, re-raises)
    instead of interrupting mid-step, where the donated state may already be gone. A second
    Ctrl-C interrupts at once. Only the main thread can own signal handlers; elsewhere the
    process's own handlers stay and the loop saves what it can."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if signum == signal.SIGINT and flag["signal"] == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signum
        log.warning("signal %d: stopping after this step and saving a checkpoint", signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _alive(state: PyTree) -> bool:
    return not any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state))


def run_training(*, state: TrainState, train_step: Callable, batch_fn: Callable[[int], PyTree],
                 num_steps: int, mesh: Mesh, ckpt_dir: str | None = None,
                 checkpoint_every: int | None = None, desc: str = "train", log_every: int = 50,
                 progress: bool = True) -> tuple[TrainState, list[dict]]:
    """Trains ``state`` up to ``num_steps`` completed steps and returns ``(state, history)``.

    ``train_step``: a :class:`ShardedStep` from :func:`jit_train_step` (or any
    ``(state, sharded batch) -> (state, metrics)``). ``batch_fn(step)``: the host batch
    (pytree of np.ndarray, global batch on one host / this process's slice on several) for the
    0-based step; it must be pure in ``step``: that is what makes the data position part of
    the checkpoint. If ``ckpt_dir`` holds a checkpoint, training resumes from its latest step
    (params, opt_state, ema, rng, step; ``state`` then only serves as the template);
    checkpoints are written every ``checkpoint_every`` steps (None/0: only at the end), at the
    end, and before re-raising on SIGTERM (as ``SystemExit(128 + 15)``) or Ctrl-C (as
    ``KeyboardInterrupt``). ``history``: one dict per step run by this call, ``{"step": n
    (completed steps), **metrics}`` (floats); metrics are fetched every ``log_every`` steps,
    so the loop does not wait on the device in between. ``progress``: show the bar (on the
    first process only).
    """
    if num_steps < 0:
        raise ConfigError(f"run_training({desc}): num_steps must be >= 0, got {num_steps}")
    if log_every < 1:
        raise ConfigError(f"run_training({desc}): log_every must be >= 1, got {log_every}")
    shardings = getattr(train_step, "state_shardings", None)
    if shardings is None:
        shardings = param_shardings(state, mesh)

    resumed_from = latest_step(ckpt_dir) if ckpt_dir else None
    if resumed_from is not None:
        template = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=s),
            state, shardings)
        state, _ = restore_checkpoint(ckpt_dir, template, resumed_from)
        log.info("%s: resumed from %s at step %d", desc, ckpt_dir, resumed_from)
    else:
        state = jax.device_put(state, shardings)
    step = int(jax.device_get(state.step))
    last_saved = resumed_from

    def save() -> None:
        nonlocal last_saved
        if not ckpt_dir:
            return
        done = int(jax.device_get(state.step))  # the state's own count is the truth
        if last_saved != done:
            save_checkpoint(ckpt_dir, done, state, {"desc": desc, "data_position": done})
            last_saved = done

    history: list[dict] = []
    pending: list[tuple[int, dict]] = []
    pbar = tqdm(total=num_steps, initial=min(step, num_steps), desc=desc, dynamic_ncols=True,
                disable=not progress or jax.process_index() != 0)
    t0 = time.perf_counter()

    def flush() -> None:
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            history.append({"step": s, **{k: float(np.asarray(v)) for k, v in m.items()}})
        pending.clear()
        last = history[-1]
        pbar.set_postfix(loss=f"{last.get('loss', float('nan')):.4g}", refresh=False)
        log.info("%s step %d/%d loss %.6g (%.1f steps/s)", desc, last["step"], num_steps,
                 last.get("loss", float("nan")), len(history) / (time.perf_counter() - t0))

    try:
        with _stop_requests() as stop:
            while step < num_steps:
                batch = shard_batch(batch_fn(step), mesh)
                state, metrics = train_step(state, batch)
                step += 1
                pending.append((step, metrics))
                pbar.update(1)
                if step % log_every == 0 or step == num_steps:
                    flush()
                if checkpoint_every and step % checkpoint_every == 0:
                    save()
                if stop["signal"] is not None:
                    flush()
                    save()
                    if stop["signal"] == signal.SIGTERM:
                        raise SystemExit(128 + signal.SIGTERM)
                    raise KeyboardInterrupt
            flush()
            save()
    except (KeyboardInterrupt, SystemExit):
        # Interrupted outside the flag path (e.g. not the main thread): save if the state
        # survived (a step interrupted mid-call may have donated it already).
        if _alive(state):
            save()
        raise
    finally:
        pbar.close()
    return state, history


def train_with_config(loss_fn: LossFn, tx: optax.GradientTransformation, params: PyTree,
                      rng: int | jax.Array, batch_fn: Callable[[int], PyTree], tc: TrainConfig,
                      mesh: Mesh, *, ckpt_dir: str | None, desc: str, progress: bool = True,
                      rules: Rules = DEFAULT_RULES
                      ) -> tuple[PyTree, list[dict]]:
    """Trains ``params`` for ``tc.steps`` steps of ``loss_fn`` (see :func:`make_train_step`)
    on ``batch_fn``'s batches, with an EMA of decay ``tc.ema_decay`` when it is > 0 and a
    checkpoint every ``tc.checkpoint_every`` steps in ``ckpt_dir`` (resumed from when it
    holds one). Returns (the final parameters on the host, the EMA's with EMA; history)."""
    use_ema = tc.ema_decay > 0
    state = create_train_state(params, tx, rng, ema=use_ema, mesh=mesh, rules=rules)
    step = jit_train_step(make_train_step(loss_fn, tx, tc.ema_decay if use_ema else None),
                          mesh, state, batch_fn(0), rules)
    state, history = run_training(state=state, train_step=step, batch_fn=batch_fn,
                                  num_steps=tc.steps, mesh=mesh, ckpt_dir=ckpt_dir,
                                  checkpoint_every=tc.checkpoint_every, desc=desc,
                                  progress=progress)
    return jax.device_get(state.ema_params if use_ema else state.params), history
