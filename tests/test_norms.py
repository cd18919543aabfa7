"""models/norms.GroupNorm: flax's GroupNorm, parameters and numbers, reduced another way."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_mia.models.norms import GroupNorm


@pytest.mark.parametrize("shape, groups, eps", [
    ((3, 8, 8, 64), 32, 1e-5),   # U-Net
    ((2, 16, 16, 32), 8, 1e-6),  # VAE (eps 1e-6), fewer groups
    ((2, 10, 48), 4, 1e-5),      # rank 3 (tokens x channels)
    ((4, 6), 2, 1e-5),           # no spatial axes
])
def test_equals_flax_group_norm(shape, groups, eps):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = 3.0 * jax.random.normal(k1, shape) + 1.5  # a mean far from 0: tests the variance
    ref = nn.GroupNorm(num_groups=groups, epsilon=eps)
    ours = GroupNorm(num_groups=groups, epsilon=eps)
    p = ours.init(k2, x)
    p_ref = ref.init(k2, x)
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(p_ref)
    assert jax.tree_util.tree_map(jnp.shape, p) == jax.tree_util.tree_map(jnp.shape, p_ref)
    c = shape[-1]
    trained = {"params": {"scale": 1 + 0.1 * jax.random.normal(k3, (c,)),
                          "bias": 0.1 * jnp.arange(c, dtype=jnp.float32)}}
    y, y_ref = ours.apply(trained, x), ref.apply(trained, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y).max()) > 1.0  # normalised output, not zeros


def test_bf16_input_keeps_float32_statistics_and_the_requested_output_dtype():
    x = (jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 32)) * 4 + 2).astype(jnp.bfloat16)
    for dtype in (jnp.float32, jnp.bfloat16):
        ours = GroupNorm(num_groups=8, dtype=dtype)
        ref = nn.GroupNorm(num_groups=8, dtype=dtype)
        p = ours.init(jax.random.PRNGKey(2), x)
        y, y_ref = ours.apply(p, x), ref.apply(p, x)
        assert y.dtype == dtype
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                                   rtol=2e-2, atol=2e-2)


def test_channels_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="30 channels do not split into 8 groups"):
        GroupNorm(num_groups=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 30)))
