"""Mesh, sharding rules, batch placement, and sharded == single-device training steps.

Uses the 8 fake CPU devices that conftest.py sets up.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from t2i_mia.errors import ConfigError
from t2i_mia.parallel.mesh import (DEFAULT_RULES, batch_sharding, make_mesh, pad_batch,
                                   param_shardings, replicated, shard_batch)
from t2i_mia.training.loop import create_train_state, jit_train_step, make_train_step

N_DEV = 8


def test_eight_fake_devices():
    assert len(jax.devices()) == N_DEV


def test_make_mesh_shapes():
    m = make_mesh()
    assert m.axis_names == ("data", "model") and dict(m.shape) == {"data": 8, "model": 1}
    m = make_mesh(model=2)
    assert dict(m.shape) == {"data": 4, "model": 2}
    m = make_mesh(data=2, model=4)
    assert dict(m.shape) == {"data": 2, "model": 4}
    one = make_mesh(devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "model": 1}
    assert sorted(d.id for d in make_mesh().devices.flat) == list(range(N_DEV))


@pytest.mark.parametrize("data,model,key", [(-1, 3, "mesh.model"), (3, 1, "mesh.data"),
                                            (2, 2, "mesh.data"), (0, 1, "mesh.data"),
                                            (-1, 0, "mesh.model")])
def test_make_mesh_bad_shape(data, model, key):
    with pytest.raises(ConfigError) as e:
        make_mesh(data=data, model=model)
    assert key in str(e.value)
    if data != 0 and model != 0:
        assert "device count 8" in str(e.value)


def test_param_shardings_rules():
    mesh = make_mesh(model=2)
    params = {
        "dense": {"kernel": np.zeros((8, 6)), "bias": np.zeros(6)},
        "odd": {"kernel": np.zeros((8, 3))},           # 3 % 2 != 0 -> replicated
        "conv": {"kernel": np.zeros((3, 3, 4, 8))},     # rank-4 rule
        "embedding": np.zeros((10, 4)),
    }
    sh = param_shardings(params, mesh, DEFAULT_RULES)
    assert sh["dense"]["kernel"].spec == P(None, "model")
    assert sh["dense"]["bias"].spec == P()
    assert sh["odd"]["kernel"].spec == P(None, None)
    assert sh["conv"]["kernel"].spec == P(None, None, None, "model")
    assert sh["embedding"].spec == P()
    # first matching rule (of the leaf's rank) wins; paths are '/'-joined
    rules = [(r"^embedding$", P("model", None)), (r"dense/kernel", P("model", None)),
             (r"kernel", P(None, "model"))]
    sh = param_shardings(params, mesh, rules)
    assert sh["embedding"].spec == P("model", None)
    assert sh["dense"]["kernel"].spec == P("model", None)
    assert sh["odd"]["kernel"].spec == P(None, None)
    # min_size keeps small tensors replicated
    sh = param_shardings(params, mesh, DEFAULT_RULES, min_size=49)
    assert sh["dense"]["kernel"].spec == P() and sh["conv"]["kernel"].spec != P()
    # model == 1: the default rules are no-ops in effect (axis of size 1)
    sh1 = param_shardings(params, make_mesh(), DEFAULT_RULES)
    assert sh1["dense"]["kernel"].is_fully_replicated
    with pytest.raises(ConfigError, match="'tensor' is not a mesh axis"):
        param_shardings(params, mesh, [("kernel", P(None, "tensor"))])


def test_shard_batch_places_slices():
    mesh = make_mesh()
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    y = np.arange(16, dtype=np.int32)
    out = shard_batch({"x": x, "y": y}, mesh)
    assert out["x"].sharding == batch_sharding(mesh, 2)
    np.testing.assert_array_equal(np.asarray(out["x"]), x)
    for shard in out["x"].addressable_shards:
        assert shard.data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])


def test_shard_batch_not_divisible():
    mesh = make_mesh()
    with pytest.raises(ConfigError) as e:
        shard_batch({"x": np.zeros((12, 3))}, mesh)
    assert "12" in str(e.value) and "8 data shards" in str(e.value) and "'x'" in str(e.value)
    with pytest.raises(ValueError, match="scalar"):
        shard_batch({"t": np.float32(1.0)}, mesh)
    # a 4x2 mesh has 4 data shards: 12 divides
    assert shard_batch({"x": np.zeros((12, 3))}, make_mesh(model=2))["x"].shape == (12, 3)


def test_pad_batch():
    x = np.arange(10).reshape(5, 2)
    p, n = pad_batch(x, 4)
    assert n == 5 and p.shape == (8, 2)
    np.testing.assert_array_equal(p[:5], x)
    np.testing.assert_array_equal(p[5:], np.repeat(x[-1:], 3, axis=0))
    p, n = pad_batch(x[:4], 4)
    assert n == 4 and p.shape == (4, 2)
    with pytest.raises(ValueError):
        pad_batch(x, 0)


# ------------------------------------------------------------- sharded vs single-device step

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, rng):
        h = nn.gelu(nn.Dense(32)(x))
        h = nn.Dropout(0.2, deterministic=False)(h, rng=rng)
        return nn.Dense(4)(h)


def _run(mesh, rules, steps=3):
    model = MLP()
    data = np.random.default_rng(0)
    xs = data.standard_normal((steps, 32, 16)).astype(np.float32)
    ys = data.standard_normal((steps, 32, 4)).astype(np.float32)

    def loss_fn(params, batch, rng):
        pred = model.apply({"params": params}, batch["x"], rng)
        return jnp.mean((pred - batch["y"]) ** 2), {}

    params = jax.jit(model.init)(jax.random.PRNGKey(0), xs[0], jax.random.PRNGKey(1))["params"]
    tx = optax.adam(1e-2)
    init = jax.device_get(params)
    state = create_train_state(params, tx, rng=5, ema=True)
    step = jit_train_step(make_train_step(loss_fn, tx, ema_decay=0.5), mesh, state,
                          {"x": xs[0], "y": ys[0]}, rules=rules)
    state = step.place(state)
    losses = []
    for s in range(steps):
        state, m = step(state, shard_batch({"x": xs[s], "y": ys[s]}, mesh))
        losses.append(float(m["loss"]))
    return state, np.array(losses), init


@pytest.fixture(scope="module")
def single_device_run():
    return _run(make_mesh(devices=jax.devices()[:1]), ())


@pytest.mark.parametrize("shape", [(8, 1), (4, 2)])
def test_sharded_step_matches_single_device(single_device_run, shape):
    """3 Adam steps of a dropout MLP on a data mesh (8x1) and a data x model mesh (4x2, both
    kernels' output dim on 'model') equal the single-device run.

    Tolerance rtol=1e-5, atol=1e-6: the programs differ only in float32 reduction order (the
    batch mean is summed per shard then all-reduced; the model-sharded matmul is not even
    reduced differently). Each reduction's rounding is ~ a few ulp (eps=6e-8); Adam's
    normalisation keeps updates O(lr), so after 3 steps parameters can differ by a few 1e-7
    relative; 1e-5 leaves margin and is still 100x below one Adam step's relative size
    (lr=1e-2). Dropout masks are identical because jax_threefry_partitionable makes random
    bits independent of sharding."""
    ref, ref_losses, init = single_device_run
    mesh = make_mesh(data=shape[0], model=shape[1])
    state, losses, _ = _run(mesh, DEFAULT_RULES)
    if shape[1] == 2:
        assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "model")
        assert state.opt_state[0].mu["Dense_0"]["kernel"].sharding.spec == P(None, "model")
        assert state.ema_params["Dense_1"]["kernel"].sharding.spec == P(None, "model")
        shard = state.params["Dense_0"]["kernel"].addressable_shards[0]
        assert shard.data.shape == (16, 16)
    else:
        assert state.params["Dense_0"]["kernel"].sharding.is_fully_replicated
    assert int(state.step) == 3
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    flat_ref = jax.tree_util.tree_leaves_with_path(jax.device_get(ref))
    flat = jax.tree_util.tree_leaves(jax.device_get(state))
    assert len(flat) == len(flat_ref)
    worst = 0.0
    for (path, r), a in zip(flat_ref, flat):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
        worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(r)))))
    print(f"mesh {shape}: max |sharded - single| over the state = {worst:.3g}")
    # training moved the parameters far beyond the tolerance, so the comparison has teeth
    moved = np.max(np.abs(np.asarray(ref.params["Dense_0"]["kernel"])
                          - init["Dense_0"]["kernel"]))
    assert moved > 1e-2


def test_replicated_sharding():
    mesh = make_mesh(model=2)
    assert replicated(mesh).spec == P()
    assert batch_sharding(mesh, 3).spec == P("data", None, None)
