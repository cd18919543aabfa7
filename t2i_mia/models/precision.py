"""The precision policy of every model: ``dtype`` computes, ``param_dtype`` stores.

``dtype`` is the dtype of the matmuls and convolutions (``bfloat16`` on accelerators, where
it doubles throughput and halves activation memory); ``param_dtype`` is the parameters'
(``float32`` master weights: the optimiser updates them in full precision). Norms, softmax,
the residual streams of the transformers and every model's output stay float32, and the
losses are computed in float32. The default, float32 throughout, is what the parity tests
against the reference implementations run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_mia.errors import ConfigError
from t2i_mia.models.norms import GroupNorm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str, where: str = "precision") -> Any:
    """``"bfloat16"`` -> ``jnp.bfloat16`` (ConfigError naming ``where`` otherwise)."""
    if name not in DTYPES:
        raise ConfigError(f"{where} = {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def policy_of(cfg) -> dict:
    """``{"dtype": ..., "param_dtype": ...}`` of a run config's ``precision`` section, the
    keyword arguments every model module takes."""
    return {"dtype": dtype_of(cfg.precision.dtype, "precision.dtype"),
            "param_dtype": dtype_of(cfg.precision.param_dtype, "precision.param_dtype")}


FLOAT32 = {"dtype": jnp.float32, "param_dtype": jnp.float32}


def module_policy(owner: nn.Module) -> dict:
    """``{"dtype": ..., "param_dtype": ...}`` of a module that has the two fields: what it
    passes on to its sub-layers."""
    return {"dtype": owner.dtype, "param_dtype": owner.param_dtype}


def policy_tag(policy: dict) -> tuple:
    """What a model cache key adds for ``policy``: nothing for float32 (keys made before
    the policy existed stay valid), else the two dtype names."""
    if policy == FLOAT32:
        return ()
    return ("precision", jnp.dtype(policy["dtype"]).name, jnp.dtype(policy["param_dtype"]).name)


def cast_params(params: Any, param_dtype: Any) -> Any:
    """The floating-point leaves of ``params`` in ``param_dtype`` (integer leaves as they
    are): how loaded or freshly initialised parameters take the policy's storage dtype."""
    def one(x):
        dt = getattr(x, "dtype", None)
        if dt is None or not jnp.issubdtype(dt, jnp.floating) or dt == param_dtype:
            return x  # float32 by default: the same arrays, no copy
        return x.astype(param_dtype)
    return jax.tree.map(one, params)


class Typed(nn.Module):
    """A layer with the precision policy (keyword-only fields, so subclasses keep their own
    positional fields): ``policy`` is passed on to its sub-layers."""
    dtype: Any = dataclasses.field(default=jnp.float32, kw_only=True)
    param_dtype: Any = dataclasses.field(default=jnp.float32, kw_only=True)

    @property
    def policy(self) -> dict:
        return module_policy(self)

    def dense(self, features: int, name: str | None = None, **kw) -> nn.Dense:
        return nn.Dense(features, name=name, **self.policy, **kw)

    def conv(self, features: int, kernel: tuple[int, int], name: str | None = None,
             **kw) -> nn.Conv:
        return nn.Conv(features, kernel, name=name, **self.policy, **kw)

    def layer_norm(self, name: str | None = None, epsilon: float = 1e-5, **kw) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=epsilon, name=name, dtype=jnp.float32,
                            param_dtype=self.param_dtype, **kw)

    def group_norm(self, groups: int, name: str | None = None, epsilon: float = 1e-5,
                   **kw) -> GroupNorm:
        return GroupNorm(num_groups=groups, epsilon=epsilon, name=name, dtype=jnp.float32,
                         param_dtype=self.param_dtype, **kw)
