"""Captioners for the image-only adversary (caption source ``captioner``).

The adversary who holds only the query image captions it, then queries the target with that
caption. :class:`RetrievalCaptioner` returns, for each image, the ``auxiliary`` caption whose
text embedding is nearest to the image embedding under the adversary's encoder. The pool is
the auxiliary split alone (docs/design.md: the captioner's pool is ``auxiliary``); captions whose
text equals an evaluated query's caption are removed from it, so the captioner can never hand
back a ground-truth caption it should not know.

Any object with ``caption(images uint8[N,H,W,3]) -> list[str]`` is a captioner.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2i_mia.errors import DataError

log = logging.getLogger(__name__)


class Captioner(Protocol):
    def caption(self, images) -> list[str]:
        """uint8[N,H,W,3] -> one caption per image."""


class RetrievalCaptioner:
    """Nearest auxiliary caption by encoder cosine similarity.

    Args:
      encoder: :class:`t2i_mia.adversary.encoder.Encoder`.
      pool: auxiliary captions.
      exclude: captions that must not be returned (the evaluated queries' ground truth).
    """

    def __init__(self, encoder, pool: Sequence[str], exclude: Sequence[str] = ()):
        excluded = set(exclude)
        uniq = sorted(set(pool) - excluded)
        self.n_removed = len(set(pool) & excluded)
        if not uniq:
            raise DataError("captioner: the auxiliary caption pool is empty after removing "
                            "evaluated captions; increase data.splits.auxiliary")
        if self.n_removed:
            log.info("captioner: removed %d pool captions equal to evaluated captions",
                     self.n_removed)
        self.pool = uniq
        self.encoder = encoder
        self.pool_emb = encoder.embed_texts(uniq)  # f32[P, D], normalised, on device

        @jax.jit
        def nearest(img_emb, pool_emb):
            return jnp.argmax(img_emb @ pool_emb.T, axis=-1)

        self._nearest = nearest

    def caption(self, images) -> list[str]:
        emb = self.encoder.embed_images(images)
        idx = np.asarray(self._nearest(emb, self.pool_emb))
        return [self.pool[i] for i in idx]
