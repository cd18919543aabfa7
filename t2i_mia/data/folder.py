"""Users' own data: a folder of images with one ``.txt`` caption each, or a JSONL manifest.

Folder (``ImageFolder``): every image file directly in the folder (``.png .jpg .jpeg .bmp
.gif .webp .tif .tiff``, any case; hidden files skipped) with a caption file of the same
stem: ``cat.png`` + ``cat.txt`` (UTF-8; the whole file, stripped, is the caption). Ids are
the 0-based index in sorted file-name order, so adding or removing a file changes the ids of
the files after it: use a manifest when ids must stay fixed.

Manifest (``JsonlManifest``): a UTF-8 file, one JSON object per line::

    {"image": "images/cat.png", "caption": "a cat on a mat", "id": 17}

``image`` is a path relative to the manifest's folder (absolute paths are kept); ``id`` is
optional and defaults to the 0-based line number. Blank lines are skipped (they still count
as lines). Other keys are errors (a misspelt ``"id"`` would otherwise silently renumber).

Captions and paths are checked when the data set is opened; images are decoded lazily by
``get``/``get_many`` and resized (shorter side) + centre-cropped to ``size``. Every error is
a DataError naming the file (and ``FILE:LINE`` for manifests) and what was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from t2i_mia.data.images import IMAGE_EXTENSIONS, load_image
from t2i_mia.data.records import MAX_ID, EntryIndex, Record, validate_caption
from t2i_mia.errors import DataError

MANIFEST_KEYS = ("image", "caption", "id")
DEFAULT_MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class _Entry:
    path: str  # the image file
    caption: str
    source: str  # where the entry is defined, for errors: "x.jsonl:7" or the image path


def _check_image_file(path: str, source: str, shown: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{source}: image file {shown!r} not found (looked for {path})")
    if os.path.getsize(path) == 0:
        raise DataError(f"{source}: image file {path} is a zero-byte file (expected an image)")


class _LazyImages(EntryIndex):
    """Shared Dataset behaviour over ``self._entries: dict[int, _Entry]``."""

    name: str
    image_size: int
    _entries: dict[int, _Entry]

    def path(self, id: int) -> str:
        """The image file of record ``id``."""
        return self._entry(id).path

    def where(self, id: int) -> str:
        """Where record ``id`` is defined, for errors: ``FILE:LINE`` or the image path."""
        return self._entry(id).source

    def caption(self, id: int) -> str:
        return self._entry(id).caption

    def captions(self, ids: Sequence[int]) -> list[str]:
        return [self.caption(i) for i in ids]

    def image(self, id: int) -> np.ndarray:
        """uint8[size, size, 3] of record ``id``, decoded now."""
        e = self._entry(id)
        try:
            return load_image(e.path, self.image_size)
        except DataError as err:
            if e.source == e.path:
                raise
            raise DataError(f"{e.source}: {err}") from err

    def get(self, id: int) -> Record:
        e = self._entry(id)
        image = self.image(id)
        image.flags.writeable = False  # fresh array: the Record keeps it without a copy
        return Record(int(id), image, e.caption)

    def get_many(self, ids: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        out = np.empty((len(ids), self.image_size, self.image_size, 3), np.uint8)
        for k, i in enumerate(ids):
            out[k] = self.image(i)
        return out, self.captions(ids)


class ImageFolder(_LazyImages):
    """A folder of ``NAME.<image ext>`` + ``NAME.txt`` pairs; ids = sorted-name index."""

    def __init__(self, root: str | os.PathLike, size: int = 32):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"{root}: not a folder (expected images with .txt captions)")
        self.root, self.image_size = root, int(size)
        self.name = f"folder:{os.path.basename(os.path.abspath(root))}"
        images = sorted(f for f in os.listdir(root)
                        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
                        and os.path.isfile(os.path.join(root, f)))
        if not images:
            raise DataError(f"{root}: no image files (expected names ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}, each with a .txt caption)")
        stems: dict[str, str] = {}
        self._entries = {}
        for i, fname in enumerate(images):
            stem = os.path.splitext(fname)[0]
            img_path = os.path.join(root, fname)
            if stem in stems:
                raise DataError(f"{img_path}: shares the caption file {stem}.txt with "
                                f"{os.path.join(root, stems[stem])} (expected one image per "
                                f"caption file)")
            stems[stem] = fname
            _check_image_file(img_path, img_path, fname)
            caption = _read_caption(os.path.join(root, stem + ".txt"), img_path)
            validate_caption(caption, os.path.join(root, stem + ".txt"))
            self._entries[i] = _Entry(img_path, caption, img_path)


def _read_caption(txt: str, img_path: str) -> str:
    if not os.path.isfile(txt):
        raise DataError(f"{img_path}: caption file {txt} is missing (expected a UTF-8 text "
                        f"file of the same name)")
    with open(txt, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{txt}: not valid UTF-8 ({e.reason} at byte {e.start}); expected "
                        f"a UTF-8 caption") from e
    return text.strip()


class JsonlManifest(_LazyImages):
    """A JSONL manifest of ``{"image", "caption", "id"?}`` lines; ids default to line numbers."""

    def __init__(self, path: str | os.PathLike, size: int = 32):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (expected a JSONL manifest)")
        self.manifest, self.image_size = path, int(size)
        self.name = f"manifest:{os.path.basename(path)}"
        base = os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:
            data = f.read()
        self._entries = {}
        first_line: dict[int, int] = {}
        for lineno0, raw in enumerate(data.split(b"\n")):
            where = f"{path}:{lineno0 + 1}"
            if lineno0 == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                f"expected a UTF-8 JSON object") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                                f'expected {{"image": PATH, "caption": TEXT}}') from e
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object "
                                f'{{"image": PATH, "caption": TEXT}}, got '
                                f"{type(obj).__name__}")
            unknown = sorted(set(obj) - set(MANIFEST_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown key(s) {unknown} (expected only "
                                f"{list(MANIFEST_KEYS)})")
            for key, what in (("image", "an image path relative to the manifest's folder"),
                              ("caption", "a non-empty caption")):
                if key not in obj:
                    raise DataError(f"{where}: missing key {key!r} (expected {what})")
            image = obj["image"]
            if not isinstance(image, str) or not image.strip():
                raise DataError(f"{where}: 'image' must be a non-empty path string, got "
                                f"{image!r}")
            id = obj.get("id", lineno0)
            if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id <= MAX_ID:
                raise DataError(f"{where}: 'id' must be an integer in [0, 2**32), got {id!r}")
            caption = obj["caption"]
            if isinstance(caption, str):
                caption = caption.strip()
            validate_caption(caption, where)
            if id in first_line:
                raise DataError(f"{where}: duplicate id {id} (already used on line "
                                f"{first_line[id]}); expected unique ids")
            first_line[id] = lineno0 + 1
            img_path = os.path.normpath(os.path.join(base, image))
            _check_image_file(img_path, where, image)
            self._entries[id] = _Entry(img_path, caption, where)
        if not self._entries:
            raise DataError(f"{path}: no entries (expected one JSON object per line)")


def open_folder(path: str | os.PathLike, size: int = 32) -> ImageFolder | JsonlManifest:
    """``--data folder --data-dir PATH``: a manifest file, a folder holding
    ``manifest.jsonl``, or else a folder of images + ``.txt`` captions."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return JsonlManifest(path, size)
    manifest = os.path.join(path, DEFAULT_MANIFEST_NAME)
    if os.path.isfile(manifest):
        return JsonlManifest(manifest, size)
    return ImageFolder(path, size)
