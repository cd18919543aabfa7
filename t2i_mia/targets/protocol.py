"""The black-box boundary: attacks see a target only through ``generate``.

``generate(captions, ids, k) -> uint8[N, k, H, W, 3]``: k images per caption; the j-th image
of query ``ids[i]`` uses the key ``fold_in(fold_in(root_key, ids[i]), j)``, so images do not
depend on order, batch size or device count. The result may be a ``jax.Array`` left on
device (features are computed there) or a numpy array.

White-box signals (a denoising loss) are offered separately by ``WhiteBoxTarget`` and are
labelled as outside the threat model wherever they are reported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import jax
import numpy as np


@runtime_checkable
class Target(Protocol):
    name: str
    image_size: int

    def generate(self, captions: Sequence[str], ids: Sequence[int], k: int):
        """Returns uint8[N, k, H, W, 3] (numpy or jax.Array)."""


@runtime_checkable
class WhiteBoxTarget(Protocol):
    def white_box_loss(self, images: np.ndarray, captions: Sequence[str],
                       ids: Sequence[int]) -> np.ndarray:
        """f32[N]: the model's own training loss on each (image, caption); lower = member."""


def image_keys(root_key: jax.Array, ids: Sequence[int], k: int) -> jax.Array:
    """uint32[N, k, 2]: ``fold_in(fold_in(root_key, id), j)`` for each query and image."""
    ids = jax.numpy.asarray(np.asarray(ids, dtype=np.uint32))
    js = jax.numpy.arange(k, dtype=np.uint32)
    per_id = jax.vmap(lambda i: jax.random.fold_in(root_key, i))(ids)
    return jax.vmap(lambda kk: jax.vmap(lambda j: jax.random.fold_in(kk, j))(js))(per_id)


@dataclasses.dataclass
class Models:
    """The models one audit queries, as built by a target kind's builder."""
    target: Any
    attack_source: Any  # the model queried for attack-training data (shadow or target)
    null: Any  # the null_target control
    white_box: Any | None  # model queried for white-box training losses (or None)
    # reference models of the calibrated attack (never trained on a queried image)
    references: list = dataclasses.field(default_factory=list)
    # the report's description of the null model and of each reference (model_info)
    null_info: dict | None = None
    reference_info: list = dataclasses.field(default_factory=list)
