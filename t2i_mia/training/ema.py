"""Exponential moving average of parameters (the weights diffusion models sample with)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def ema_update(ema: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """``decay * ema + (1 - decay) * params`` leaf by leaf, in each EMA leaf's dtype.

    ``ema`` and ``params`` must have the same tree structure; ``decay`` in [0, 1] (a Python
    float or a traced scalar, e.g. a warm-up schedule).
    """
    def one(e, p):
        d = jnp.asarray(decay, dtype=e.dtype)
        return (d * e + (1 - d) * p.astype(e.dtype)).astype(e.dtype)

    return jax.tree.map(one, ema, params)
