"""The retrieval captioner: nearest auxiliary caption, never an evaluated caption."""

import jax.numpy as jnp
import numpy as np
import pytest

from t2i_mia.adversary.captioner import RetrievalCaptioner
from t2i_mia.errors import DataError


class BagOfColours:
    """A stand-in encoder: texts and images embedded by which colour they show/name."""
    COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}

    def embed_texts(self, captions):
        e = np.array([[c in t for c in self.COLOURS] for t in captions], np.float32) + 1e-3
        return jnp.asarray(e / np.linalg.norm(e, axis=1, keepdims=True))

    def embed_images(self, images):
        mean = np.asarray(images, np.float32).mean(axis=(1, 2))  # [N, 3] RGB
        e = mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(1e-6)
        return jnp.asarray(e)


def _img(rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), (8, 8, 3))


def test_retrieves_nearest_pool_caption_and_never_an_evaluated_one():
    pool = ["a red square", "a green circle", "a blue ring", "a red circle"]
    evaluated = ["a red circle", "a blue cross"]
    cap = RetrievalCaptioner(BagOfColours(), pool, exclude=evaluated)
    assert "a red circle" not in cap.pool and cap.n_removed == 1
    out = cap.caption(np.stack([_img((250, 5, 5)), _img((5, 5, 250)), _img((5, 250, 5))]))
    assert out == ["a red square", "a blue ring", "a green circle"]
    assert not set(out) & set(evaluated)


def test_empty_pool_is_an_error():
    with pytest.raises(DataError, match="pool is empty"):
        RetrievalCaptioner(BagOfColours(), ["a red square"], exclude=["a red square"])
