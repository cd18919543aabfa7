"""The one batched-apply helper: fixed-size padded batches on the mesh, trimmed and joined."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_mia.parallel.batching import batched_apply
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
