"""Checkpoints: bitwise resume after SIGKILL / SIGTERM, errors, atomicity, EMA, data order."""

import gc
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t2i_mia.checkpoint import latest_step, restore_checkpoint, save_checkpoint
from t2i_mia.errors import CheckpointError
from t2i_mia.parallel.mesh import make_mesh
from t2i_mia.training.ema import ema_update
from t2i_mia.training.loop import (TrainState, create_train_state, epoch_batches,
                                   run_training)

WORKER = pathlib.Path(__file__).parent / "_resume_worker.py"
STEPS, EVERY = 12, 4


def _worker(ckpt, out, *extra):
    cmd = [sys.executable, str(WORKER), "--ckpt", str(ckpt), "--out", str(out),
           "--steps", str(STEPS), "--every", str(EVERY), *extra]
    # inherits XLA_FLAGS (8 fake devices, set by conftest): the worker trains on a 4x2 mesh
    return subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_resume_after_sigkill_is_bitwise(tmp_path):
    """SIGKILL right after step 6 (last checkpoint: step 4), then restart to step 12: the
    final params, opt_state, EMA, rng and step equal an uninterrupted run's bit for bit, and
    so do the losses of the steps re-run (same batches, same dropout masks)."""
    t0 = time.perf_counter()
    ref = _worker(tmp_path / "ref_ckpt", tmp_path / "ref.npz")  # runs beside the chain
    ck = tmp_path / "ckpt"
    rc, out = _finish(_worker(ck, tmp_path / "a.npz", "--sigkill-at", "6"))
    assert rc == -signal.SIGKILL, out
    assert latest_step(ck) == 4 and not (tmp_path / "a.npz").exists()
    rc, out = _finish(_worker(ck, tmp_path / "b.npz"))
    assert rc == 0, out
    rc, out = _finish(ref)
    assert rc == 0, out
    print(f"3 worker processes: {time.perf_counter() - t0:.1f} s")

    got, want = np.load(tmp_path / "b.npz"), np.load(tmp_path / "ref.npz")
    assert sorted(got.files) == sorted(want.files)
    assert str(want["__kernel_spec__"]) == "P(None, 'model')"  # restored onto a sharded mesh
    state_keys = [k for k in want.files if not k.startswith("__")]
    assert {k.split("/")[0] for k in state_keys} == {"step", "params", "opt_state",
                                                    "ema_params", "rng"}
    for k in state_keys:
        assert got[k].dtype == want[k].dtype, k
        assert np.array_equal(got[k], want[k]), f"{k} differs after resume"
    assert int(want["step"]) == STEPS
    # the resumed process ran steps 5..12; the reference ran 1..12
    np.testing.assert_array_equal(got["__steps__"], np.arange(5, STEPS + 1))
    assert np.array_equal(got["__losses__"], want["__losses__"][4:])
    # the comparison has teeth: training changed the parameters
    assert not np.array_equal(want["params/Dense_0/kernel"], want["ema_params/Dense_0/kernel"])


def _counting_run(tmp_path, num_steps, signal_at=None, sig=None):
    """run_training on a toy step whose state is an exact function of the batches seen."""
    mesh = make_mesh(devices=jax.devices()[:1])

    def step_fn(state, batch):
        return state.replace(step=state.step + 1, params=state.params * 0.5 + batch["x"].sum()
                             ), {"loss": batch["x"].sum()}

    def batch_fn(step):
        if step == signal_at:
            os.kill(os.getpid(), sig)
        return {"x": np.full((2,), step + 1, np.float32)}

    fresh = TrainState(step=jnp.int32(0), params=jnp.float32(0), opt_state=(),
                       ema_params=None, rng=jax.random.PRNGKey(0))
    return run_training(state=fresh, train_step=step_fn, batch_fn=batch_fn,
                        num_steps=num_steps, mesh=mesh, ckpt_dir=str(tmp_path),
                        checkpoint_every=2, log_every=1)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
@pytest.mark.parametrize("sig,exc", [(signal.SIGTERM, SystemExit),
                                     (signal.SIGINT, KeyboardInterrupt)])
def test_signal_saves_then_reraises(tmp_path, sig, exc):
    """SIGTERM / Ctrl-C during step 3: the loop finishes that step, saves step 3 (off the
    every-2 schedule) and re-raises; resuming gives the uninterrupted result exactly."""
    before = signal.getsignal(sig)
    with pytest.raises(exc) as e:
        _counting_run(tmp_path / "a", 6, signal_at=2, sig=sig)
    if exc is SystemExit:
        assert e.value.code == 128 + signal.SIGTERM
    assert latest_step(tmp_path / "a") == 3
    assert signal.getsignal(sig) is before  # the loop's handler is gone again
    resumed, hist = _counting_run(tmp_path / "a", 6)
    assert [h["step"] for h in hist] == [4, 5, 6]
    ref, _ = _counting_run(tmp_path / "b", 6)
    assert float(resumed.params) == float(ref.params) and int(resumed.step) == 6


# ------------------------------------------------------------------- errors and atomicity

def _tiny_state():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}
    return create_train_state(params, optax.sgd(0.1, momentum=0.9), rng=3, ema=True)


def test_save_restore_roundtrip_and_retention(tmp_path):
    st = _tiny_state()
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, st.replace(step=jnp.int32(s)), {"note": s})
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3, 4]
    assert latest_step(tmp_path) == 4
    mesh = make_mesh(model=2)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model", None))
    template = st.replace(params={"w": jax.device_put(st.params["w"], sh),
                                  "b": st.params["b"]})
    got, extra = restore_checkpoint(tmp_path, template, step=3)
    assert extra == {"note": 3} and int(got.step) == 3
    assert got.params["w"].sharding == sh  # the template's sharding
    for a, b in zip(jax.tree.leaves(got.replace(step=st.step)), jax.tree.leaves(st)):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.dtype == b.dtype
    with pytest.raises(CheckpointError, match="steps must increase"):
        save_checkpoint(tmp_path, 4, st)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 1 \(available"):
        restore_checkpoint(tmp_path, st, step=1)


def test_restore_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=str(missing)):
        restore_checkpoint(missing, _tiny_state())
    assert latest_step(missing) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{empty}: no complete checkpoint"):
        restore_checkpoint(empty, _tiny_state())


# orbax leaves its failed read coroutines un-awaited; that is its noise, not ours
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_corrupt_checkpoint(tmp_path):
    st = _tiny_state()
    save_checkpoint(tmp_path, 5, st)
    step_dir = tmp_path / "5"
    # overwrite every array data file with garbage
    data_files = [p for p in (step_dir / "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(CheckpointError, match=str(step_dir)):
        restore_checkpoint(tmp_path, st)
    # metadata gone
    (step_dir / "state" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match=str(step_dir)):
        restore_checkpoint(tmp_path, st)
    gc.collect()  # collect orbax's abandoned coroutines here, under the filter above


def test_restore_mismatch_names_tensor(tmp_path):
    st = _tiny_state()
    save_checkpoint(tmp_path, 1, st)
    bf16 = st.replace(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), st.params))
    with pytest.raises(CheckpointError, match="params/b' is stored as float32"):
        restore_checkpoint(tmp_path, bf16)
    with pytest.raises(CheckpointError, match=str(tmp_path / "1")):
        restore_checkpoint(tmp_path, st.replace(ema_params=None))
    wider = st.replace(params={"w": jnp.zeros((2, 4)), "b": jnp.zeros(3)})
    with pytest.raises(CheckpointError, match="not compatible with the stored shape"):
        restore_checkpoint(tmp_path, wider)


def test_half_written_step_is_ignored(tmp_path):
    """orbax writes into '<step>.orbax-checkpoint-tmp-<n>' and renames when complete; such a
    leftover (a save killed midway) is not a step, and the next save removes it."""
    st = _tiny_state()
    save_checkpoint(tmp_path, 2, st)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    leftover = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    (leftover / "state").mkdir(parents=True)
    assert latest_step(tmp_path) == 2
    _, extra = restore_checkpoint(tmp_path, st)
    assert extra == {}
    save_checkpoint(tmp_path, 3, st)
    assert not leftover.exists()
    assert (tmp_path / "3" / "commit_success.txt").exists() or \
        (tmp_path / "3" / "state" / "commit_success.txt").exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies after writing every array but before orbax's final rename leaves only
    a '*.orbax-checkpoint-tmp-*' folder: the previous step stays the latest and restores."""
    from orbax.checkpoint._src.path import async_path

    st = _tiny_state()
    save_checkpoint(tmp_path, 1, st, {"n": 1})

    async def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(async_path, "rename", crash)
    with pytest.raises(CheckpointError, match="saving step 2 failed"):
        save_checkpoint(tmp_path, 2, st.replace(step=jnp.int32(2)), {"n": 2})
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "2" not in names and any(n.startswith("2.orbax-checkpoint-tmp") for n in names)
    assert latest_step(tmp_path) == 1
    got, extra = restore_checkpoint(tmp_path, st)
    assert extra == {"n": 1} and int(got.step) == 0


def test_run_training_resumes_and_skips_finished(tmp_path):
    """In-process: a run of 3 steps then a call for 5 resumes at 3 (ignoring the fresh state
    it is given); a call for 5 again does nothing."""
    mesh = make_mesh(devices=jax.devices()[:1])

    def step_fn(state, batch):
        return state.replace(step=state.step + 1,
                             params=state.params + batch["x"].sum()), {"loss": batch["x"].sum()}

    def batch_fn(step):
        return {"x": np.full((2,), step, np.float32)}

    fresh = TrainState(step=jnp.int32(0), params=jnp.float32(0), opt_state=(),
                       ema_params=None, rng=jax.random.PRNGKey(0))
    s3, h3 = run_training(state=fresh, train_step=step_fn, batch_fn=batch_fn, num_steps=3,
                          mesh=mesh, ckpt_dir=str(tmp_path), checkpoint_every=2, log_every=1)
    assert [h["step"] for h in h3] == [1, 2, 3] and [h["loss"] for h in h3] == [0, 2, 4]
    assert latest_step(tmp_path) == 3
    s5, h5 = run_training(state=fresh, train_step=step_fn, batch_fn=batch_fn, num_steps=5,
                          mesh=mesh, ckpt_dir=str(tmp_path), checkpoint_every=2, log_every=1)
    assert [h["step"] for h in h5] == [4, 5] and int(s5.step) == 5
    assert float(s5.params) == 2 * (0 + 1 + 2 + 3 + 4)
    assert latest_step(tmp_path) == 5
    _, h = run_training(state=fresh, train_step=step_fn, batch_fn=batch_fn, num_steps=5,
                        mesh=mesh, ckpt_dir=str(tmp_path), checkpoint_every=2)
    assert h == []


# ------------------------------------------------------------------------- EMA and data order

def test_ema_update_math():
    ema = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([4.0], jnp.bfloat16)}
    params = {"a": jnp.array([3.0, -2.0]), "b": jnp.array([0.0], jnp.bfloat16)}
    out = ema_update(ema, params, 0.75)
    np.testing.assert_allclose(np.asarray(out["a"]), [0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2])
    assert out["b"].dtype == jnp.bfloat16 and float(out["b"][0]) == 3.0
    # decay 1 keeps the average, decay 0 copies the parameters
    assert np.array_equal(np.asarray(ema_update(ema, params, 1.0)["a"]), [1.0, 2.0])
    assert np.array_equal(np.asarray(ema_update(ema, params, 0.0)["a"]), [3.0, -2.0])
    # n updates towards a constant: ema_n - p = decay^n (ema_0 - p)
    e = {"a": jnp.zeros(1)}
    for _ in range(10):
        e = ema_update(e, {"a": jnp.ones(1)}, 0.9)
    np.testing.assert_allclose(np.asarray(e["a"]), 1 - 0.9 ** 10, rtol=1e-6)


def test_epoch_batches_pure_and_permutation():
    idx = epoch_batches(10, 4, seed=1)
    seq = np.concatenate([idx(s) for s in range(5)])  # 20 indices = 2 epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    assert not np.array_equal(seq[:10], seq[10:])  # a new permutation per epoch
    # pure: any order of calls, any fresh function, same answer; step 2 spans epochs 0 and 1
    again = epoch_batches(10, 4, seed=1)
    assert np.array_equal(again(2), seq[8:12]) and np.array_equal(idx(2), seq[8:12])
    perm1 = np.random.Generator(np.random.PCG64([1, 1])).permutation(10)
    assert np.array_equal(seq[10:], perm1)
    assert not np.array_equal(epoch_batches(10, 4, seed=2)(0), idx(0))
    assert idx(0).dtype == np.int64 and idx(0).shape == (4,)
    big = epoch_batches(3, 7, seed=0)(0)  # batch larger than the data set
    assert sorted(big[:3]) == [0, 1, 2] and sorted(big[3:6]) == [0, 1, 2]
