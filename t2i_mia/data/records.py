"""Records, content hashes, stable ids and the ``Dataset`` protocol.

Content hash (docs/design.md: "SHA-256 of the decoded uint8 pixels and shape"), exactly::

    sha256( f"{H}x{W}x{C}".encode("ascii") + pixels.tobytes(order="C") ).hexdigest()

for ``pixels`` a ``uint8[H, W, C]`` array (C = 3 for every record). The caption is not part
of the hash: two examples with the same pixels are the same content whatever their captions.

Stable id: a non-negative integer fixed by the source (the synthetic index, the manifest's
``id`` or line number, the sorted-file index of a folder), never a position in some list.
Ids are < 2**32 because per-image RNG keys fold them in as uint32.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from t2i_mia.errors import DataError

MAX_ID = 2**32 - 1


def content_hash(image: np.ndarray) -> str:
    """Hex SHA-256 of ``f"{H}x{W}x{C}"`` followed by the C-order bytes of a uint8[H,W,C] image."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise DataError(f"content_hash: expected a uint8[H, W, C] image, got "
                        f"{image.dtype}{list(image.shape)}")
    h, w, c = image.shape
    digest = hashlib.sha256(f"{h}x{w}x{c}".encode("ascii"))
    digest.update(np.ascontiguousarray(image).tobytes(order="C"))
    return digest.hexdigest()


def validate_record(id: int, image: np.ndarray, caption: object, source: str = "record") -> None:
    """Raises DataError naming ``source`` (e.g. ``"data.jsonl:7"``) when a record is malformed.

    Checks: id a Python/numpy integer in [0, 2**32); image a uint8[H, W, 3] array with
    H, W >= 1; caption a ``str`` that is not empty or whitespace only.
    """
    if isinstance(id, (bool, np.bool_)) or not isinstance(id, (int, np.integer)):
        raise DataError(f"{source}: id must be an integer, got {type(id).__name__} {id!r}")
    if not 0 <= int(id) <= MAX_ID:
        raise DataError(f"{source}: id must be in [0, 2**32), got {int(id)}")
    if not isinstance(image, np.ndarray):
        raise DataError(f"{source}: image must be a numpy uint8[H, W, 3] array, got "
                        f"{type(image).__name__}")
    if image.dtype != np.uint8:
        raise DataError(f"{source}: image must be uint8[H, W, 3], got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise DataError(f"{source}: image must be uint8[H, W, 3] (HWC, RGB), got shape "
                        f"{list(image.shape)}")
    validate_caption(caption, source)


def validate_caption(caption: object, source: str = "record") -> None:
    """Raises DataError naming ``source`` unless ``caption`` is a non-blank ``str``."""
    if not isinstance(caption, str):
        raise DataError(f"{source}: caption must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise DataError(f"{source}: caption is empty (expected a non-empty text)")


@dataclass(frozen=True, eq=False)
class Record:
    """One example: stable id, uint8[H, W, 3] image (read-only), caption, content hash.

    ``sha256`` may be left empty: it is then computed from ``image``; when given it is
    checked. Two records are equal when id, caption and content hash are equal.
    """

    id: int
    image: np.ndarray
    caption: str
    sha256: str = ""

    def __post_init__(self):
        validate_record(self.id, self.image, self.caption, f"record {self.id!r}")
        object.__setattr__(self, "id", int(self.id))
        image = self.image
        if image.flags.writeable:
            # A record is immutable; copy so the caller's array stays writable and ours not.
            image = image.copy()
            image.flags.writeable = False
            object.__setattr__(self, "image", image)
        digest = content_hash(image)
        if self.sha256 and self.sha256 != digest:
            raise DataError(f"record {self.id}: sha256 {self.sha256} does not match the "
                            f"image's content hash {digest}")
        object.__setattr__(self, "sha256", digest)

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        return (self.id, self.caption, self.sha256) == (other.id, other.caption, other.sha256)

    def __hash__(self):
        return hash((self.id, self.caption, self.sha256))


@runtime_checkable
class Dataset(Protocol):
    """A source of records addressed by stable id.

    ``name``: a short description that identifies the source (goes into the split manifest).
    ``image_size``: every image is uint8[image_size, image_size, 3].
    """

    name: str
    image_size: int

    def __len__(self) -> int:
        """Number of records."""

    def ids(self) -> list[int]:
        """All stable ids, ascending."""

    def get(self, id: int) -> Record:
        """The record with this stable id; DataError if there is none or it is malformed."""

    def get_many(self, ids: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        """uint8[N, image_size, image_size, 3] and the N captions, in the order of ``ids``."""


def stack_records(records: Sequence[Record], image_size: int) -> tuple[np.ndarray, list[str]]:
    """uint8[N, S, S, 3] and captions from records (helper for ``Dataset.get_many``)."""
    out = np.empty((len(records), image_size, image_size, 3), np.uint8)
    for i, r in enumerate(records):
        out[i] = r.image
    return out, [r.caption for r in records]


class EntryIndex:
    """The id bookkeeping a Dataset over an ``id -> entry`` dict shares: ``_entries`` (set by
    the subclass) and ``name`` / ``image_size`` attributes."""
    _entries: dict
    name: str
    image_size: int

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, size={self.image_size}, n={len(self)})"

    def ids(self) -> list[int]:
        return sorted(self._entries)

    def _entry(self, id: int):
        try:
            return self._entries[int(id)]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{self.name}: no record with id {id!r}") from None
