"""Image files: decode + resize/centre-crop to a square, and atomic PNG writes."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from t2i_mia.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def fit_square(im: Image.Image, size: int) -> np.ndarray:
    """uint8[size, size, 3]: RGB, shorter side resized to ``size`` (BICUBIC), centre crop
    (offsets rounded down). A ``size`` x ``size`` image keeps its exact pixels. The one
    resize rule of every reader (files, shards, TFDS records)."""
    im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
        if w <= h:
            nw, nh = size, max(size, (h * size + w // 2) // w)
        else:
            nw, nh = max(size, (w * size + h // 2) // h), size
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decodes an image file to uint8[size, size, 3].

    Pillow decodes it; EXIF orientation is applied, then it is converted to RGB (alpha is
    dropped, palettes expanded). The shorter side is resized to ``size`` with BICUBIC and the
    centre ``size`` x ``size`` square is cropped (offsets rounded down). An image that is
    already ``size`` x ``size`` keeps its exact pixels. A missing, zero-byte or undecodable
    file raises DataError naming the path.
    """
    path = os.fspath(path)
    if size < 1:
        raise DataError(f"{path}: image size must be >= 1, got {size}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing (expected an image file)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: zero-byte file (expected an image)")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        # Pillow reports corrupt or truncated files with several unrelated exception types.
        raise DataError(f"{path}: not a decodable image (expected PNG/JPEG/...; {e})") from e
    out = fit_square(im, size)
    if out.shape != (size, size, 3):
        raise DataError(f"{path}: decoded to shape {list(out.shape)}, expected "
                        f"[{size}, {size}, 3]")
    return np.ascontiguousarray(out)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes a uint8[H, W, 3] image as PNG atomically (temporary file + os.replace).

    On any failure the temporary file is removed and an existing file at ``path`` is left
    untouched.
    """
    path = os.fspath(path)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{path}: save_png expects a uint8[H, W, 3] image, got "
                        f"{image.dtype}{list(image.shape)}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
