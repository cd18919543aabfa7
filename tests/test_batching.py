"""The one batched-apply helper: fixed-size padded batches on the mesh, trimmed and joined."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_mia.parallel.batching import batched_apply, round_batch
from t2i_mia.parallel.mesh import make_mesh


@pytest.mark.parametrize("n_dev", [1, 4])
def test_batched_apply_equals_one_call_and_pads_with_real_rows(n_dev):
    mesh = make_mesh(devices=jax.devices()[:n_dev])
    x = np.arange(1, 11, dtype=np.float32)  # no zero row: 1/x stays finite
    y = np.arange(20, dtype=np.float32).reshape(10, 2)
    calls = []

    @jax.jit
    def fn(p, a, b):
        return {"inv": p / a, "s": b.sum(-1)}

    def counted(p, a, b):
        calls.append(a.shape)
        return fn(p, a, b)

    out = batched_apply(counted, 2.0, (x, y), 4, mesh)
    assert calls == [(4,), (4,), (4,)]  # one batch shape: one compiled program
    np.testing.assert_allclose(out["inv"], 2.0 / x, rtol=1e-6)
    np.testing.assert_array_equal(out["s"], y.sum(-1))
    assert isinstance(out["inv"], np.ndarray) and np.all(np.isfinite(out["inv"]))
    dev = batched_apply(fn, 2.0, (jnp.asarray(x), jnp.asarray(y)), 4, mesh, to_host=False)
    assert isinstance(dev["s"], jax.Array)
    np.testing.assert_array_equal(np.asarray(dev["s"]), out["s"])


def test_batched_apply_empty_and_bad_input():
    fn = jax.jit(lambda p, a: a * p)
    empty = np.zeros((0,), np.float32)
    assert batched_apply(fn, 1.0, (empty,), 4, empty=empty) is empty
    with pytest.raises(ValueError, match="no rows"):
        batched_apply(fn, 1.0, (empty,), 4)
    with pytest.raises(ValueError, match="leading axes"):
        batched_apply(lambda p, a, b: a, 1.0, (np.ones(3), np.ones(4)), 2)
    with pytest.raises(ValueError, match="batch_size"):
        batched_apply(fn, 1.0, (np.ones(3),), 0)


@pytest.mark.parametrize("n_dev", [1, 4])
def test_round_batch_divides_over_the_data_axis(n_dev):
    mesh = make_mesh(devices=jax.devices()[:n_dev])
    for bs in (1, 3, 4, 9, 64):
        got = round_batch(bs, mesh)
        assert got % n_dev == 0 and got >= n_dev and got <= max(bs, n_dev)


def test_batched_apply_places_batches_on_the_data_axis_and_shows_progress(capsys):
    mesh = make_mesh(devices=jax.devices()[:4])
    seen = []

    def fn(p, a):
        seen.append(a.sharding.spec)
        return a + p

    out = batched_apply(fn, 1.0, (np.arange(6, dtype=np.float32),), 4, mesh, desc="demo")
    np.testing.assert_array_equal(out, np.arange(1, 7, dtype=np.float32))
    assert [tuple(s) for s in seen] == [("data",), ("data",)]
    assert "demo" in capsys.readouterr().err
