"""The ``generations`` target: images made elsewhere, audited as they are.

Layout: ``<dir>/<id>/<j>.png`` for query stable id ``id`` and image ``j`` in ``0..k-1`` (any
format Pillow reads is accepted with extensions .png/.jpg/.jpeg/.webp). Captions are ignored:
the images were generated from them elsewhere. Every image must be ``H x W x 3`` with the
configured size; a missing folder, a missing image or a wrongly sized one is an error naming
the path.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from t2i_mia.errors import DataError

_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class GenerationsTarget:
    """Reads ``<dir>/<id>/<j>.<ext>``; implements the target protocol."""

    def __init__(self, root: str, image_size: int):
        if not os.path.isdir(root):
            raise DataError(f"{root}: generations folder not found (expected <id>/<j>.png)")
        self.root = root
        self.image_size = image_size
        self.name = f"generations:{root}"

    def _path(self, i: int, j: int) -> str:
        base = os.path.join(self.root, str(int(i)))
        if not os.path.isdir(base):
            raise DataError(f"{base}: missing folder of generated images for query id {i}")
        for ext in _EXTS:
            p = os.path.join(base, f"{j}{ext}")
            if os.path.isfile(p):
                return p
        raise DataError(f"{base}/{j}.png: missing generated image {j} for query id {i}")

    def _load(self, path: str) -> np.ndarray:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: zero-byte image file")
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: cannot decode image ({e})") from e
        s = self.image_size
        if arr.shape != (s, s, 3):
            raise DataError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected "
                            f"{s}x{s} (set data.image_size or resize the generations)")
        return arr

    def generate(self, captions: Sequence[str], ids: Sequence[int], k: int) -> np.ndarray:
        if len(captions) != len(ids):
            raise DataError(f"generate: {len(captions)} captions for {len(ids)} ids")
        out = np.zeros((len(ids), k, self.image_size, self.image_size, 3), np.uint8)
        for n, i in enumerate(ids):
            for j in range(k):
                out[n, j] = self._load(self._path(i, j))
        return out


def first_image_size(root: str) -> int:
    """The side of the first image (sorted ``<id>/<j>.<ext>``) under ``root``: the size the
    generations were made at. DataError when there is none or it is not square."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: generations folder not found (expected <id>/<j>.png)")
    for sub in sorted(os.listdir(root)):
        base = os.path.join(root, sub)
        if not (sub.isdigit() and os.path.isdir(base)):
            continue
        for f in sorted(os.listdir(base)):
            if f.lower().endswith(_EXTS):
                path = os.path.join(base, f)
                try:
                    with Image.open(path) as im:
                        w, h = im.size
                except (UnidentifiedImageError, OSError) as e:
                    raise DataError(f"{path}: cannot decode image ({e})") from e
                if w != h:
                    raise DataError(f"{path}: generated image is {w}x{h}, expected a square")
                return w
    raise DataError(f"{root}: no generated images (expected <id>/<j>.png)")
