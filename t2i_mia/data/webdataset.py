"""CC3M and other web-scale sets as webdataset ``.tar`` shards (img2dataset layout).

Layout: uncompressed tar shards whose members are grouped into samples by key, as
img2dataset writes them::

    00000.tar: 000000000.jpg 000000000.txt 000000000.json 000000001.jpg 000000001.txt ...

A member's key is its path up to the first dot of its file name, its extension the rest,
lower-cased (webdataset's rule). A sample uses one image member (``jpg jpeg png webp``) and
the ``txt`` caption (UTF-8, stripped; a BOM is dropped). Other members (``json``, ...) are
not needed and are ignored; how many is reported.

Shard list (``data.data_dir``): one or more comma-separated entries, each a ``.tar`` path, a
glob (``shards/*.tar``), a brace pattern (``shards/{00000..00099}.tar``, ``{a,b}``) or a
folder (all its ``*.tar``). Globs and folders are sorted; entries keep the given order;
a shard listed twice is read once. A literal path that does not exist, or a pattern that
matches nothing, is a DataError naming it.

Random access. The audit addresses records by integer id (``records.Dataset``), so opening
the set walks the shards in order, reads tar headers (seeking over member data) and the
small caption members, fully decodes every candidate image once to check it, and keeps
``(shard, offset, size)`` of each good image. ``get``/``get_many`` later seek straight to
those bytes and decode again, so nothing is held in memory but the index. Opening stops once
``limit`` good samples are indexed (``open_dataset`` asks for what the splits need plus
slack), so a 3M-sample set is not decoded in full for a 100k-sample audit; the summary says
how many shards were read.

Stable ids: when every kept sample's key is a decimal number < 2**32 (img2dataset's
``000000123`` keys, the row of the source table), the id is that number, whatever shards are
listed or in which order. Otherwise the id is the sample's 0-based position in the stream
over the listed shards, counting skipped samples too, so a bad sample never renumbers the
ones after it (but adding or reordering shards does).

Bad samples are counted, skipped and reported, never silently dropped. ``skip_summary()``
gives ``{"samples_seen", "kept", "skipped": {reason: count}, "examples": {reason: [first
keys]}, "shards", "shards_read", "complete", "ignored_members", "id_rule"}``
(``complete``: indexing went through every listed shard, not stopped by ``limit``;
``id_rule``: ``key`` or ``position``). Skip reasons: ``missing_image``,
``multiple_images``, ``undecodable_image``, ``missing_caption``, ``empty_caption``,
``caption_not_utf8``, ``duplicate_member``, ``duplicate_key``, ``truncated_member`` (data
past the end of the file), ``unreadable_shard`` (a shard that is not a tar),
``unreadable_tail`` (a shard whose tar stream breaks off part-way: the samples before the
break are kept, the break is counted once). A gzip-compressed shard is a DataError (tar
members cannot be addressed by offset inside gzip).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from t2i_mia.data.records import MAX_ID, EntryIndex, Record
from t2i_mia.data.images import fit_square
from t2i_mia.errors import DataError

log = logging.getLogger("t2i_mia")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
SKIP_REASONS = ("missing_image", "multiple_images", "undecodable_image", "missing_caption",
                "empty_caption", "caption_not_utf8", "duplicate_member", "duplicate_key",
                "truncated_member", "unreadable_shard", "unreadable_tail")
N_EXAMPLES = 5  # keys kept per skip reason in the summary

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                  Image.DecompressionBombError)
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ----------------------------------------------------------------------------- images

def _open_image(data: bytes, where: str) -> Image.Image:
    """Fully decoded PIL image (EXIF orientation applied); DataError naming ``where``."""
    if not data:
        raise DataError(f"{where}: zero-byte image (expected an encoded image)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except _DECODE_ERRORS as e:
        # Pillow reports corrupt or truncated data with several unrelated exception types.
        raise DataError(f"{where}: not a decodable image (expected JPEG/PNG/WebP; {e})") from e


def decode_image_bytes(data: bytes, size: int, where: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8[size, size, 3] (see :func:`fit_square`)."""
    if size < 1:
        raise DataError(f"{where}: image size must be >= 1, got {size}")
    return fit_square(_open_image(data, where), size)


# ----------------------------------------------------------------------------- shard lists

def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` -> a1b a2b a3b (zero padding kept: ``{00..02}``); ``{x,y}`` -> x, y.

    The first brace group is expanded, then the rest recursively; a ``{`` without a
    matching ``}`` is a DataError.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise DataError(f"shard pattern {pattern!r}: '}}' without '{{'")
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise DataError(f"shard pattern {pattern!r}: '{{' without a closing '}}'")
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        width = len(a) if a.lstrip("-").startswith("0") and len(a) > 1 else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"shard pattern {pattern!r}: '{{{body}}}' is neither a range "
                        f"{{A..B}} nor a list {{x,y}}")
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def _split_entries(spec: str) -> list[str]:
    """Splits on commas outside braces (``a.tar,{b,c}.tar`` -> two entries)."""
    out, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [e.strip() for e in out if e.strip()]


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from paths / globs / brace patterns / folders (see the module docstring)."""
    entries = _split_entries(spec) if isinstance(spec, str) else [os.fspath(s) for s in spec]
    if not entries:
        raise DataError("webdataset: no shards given (expected .tar paths, globs or a folder "
                        "in data.data_dir / --data-dir)")
    shards: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        for pat in expand_braces(os.path.expanduser(entry)):
            if os.path.isdir(pat):
                found = sorted(glob.glob(os.path.join(glob.escape(pat), "*.tar")))
                if not found:
                    raise DataError(f"{pat}: folder holds no .tar shards")
            elif glob.has_magic(pat):
                found = sorted(p for p in glob.glob(pat) if os.path.isfile(p))
                if not found:
                    raise DataError(f"shard glob {pat!r} matched no files")
            elif os.path.isfile(pat):
                found = [pat]
            else:
                raise DataError(f"{pat}: shard not found (expected a .tar file, a glob or a "
                                f"folder of .tar shards)")
            for p in found:
                real = os.path.realpath(p)
                if real not in seen:
                    seen.add(real)
                    shards.append(os.path.abspath(p))
    return shards


# ----------------------------------------------------------------------------- index

@dataclass(frozen=True)
class _Entry:
    shard: int  # index into WebDatasetShards.shards
    offset: int  # byte offset of the image member's data in the shard
    size: int
    caption: str
    key: str


class _Skips:
    def __init__(self):
        self.counts = {r: 0 for r in SKIP_REASONS}
        self.examples: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < N_EXAMPLES:
            self.examples[reason].append(where)


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _members(f, file_size: int, skips: _Skips, shown: str):
    """Ordered {key: {ext: (offset, size) | None(duplicate)}} and the ignored-member count."""
    samples: dict[str, dict[str, tuple[int, int] | None]] = {}
    ignored = 0
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except (tarfile.TarError, EOFError, OSError) as e:
        skips.add("unreadable_shard", f"{shown} ({e})")
        return samples, ignored
    try:
        while True:
            try:
                m = tar.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                skips.add("unreadable_tail", f"{shown}@{tar.offset} ({e})")
                break
            if m is None:
                # tarfile stops quietly at a truncated or invalid header after the first
                # one, so check that the archive really ends here: an end-of-archive zero
                # block, then nothing but zero padding.
                if not _ends_cleanly(f, tar.offset, file_size):
                    skips.add("unreadable_tail", f"{shown}@{tar.offset} (no tar header or "
                              f"end-of-archive block: truncated or corrupt)")
                break
            if not m.isfile():
                continue
            folder, base = os.path.split(m.name)
            if "." not in base:
                ignored += 1
                continue
            stem, ext = base.split(".", 1)
            ext = ext.lower()
            if ext not in IMAGE_EXTS and ext != CAPTION_EXT:
                ignored += 1
                continue
            key = f"{folder}/{stem}" if folder else stem
            entry = samples.setdefault(key, {})
            entry[ext] = None if ext in entry else (m.offset_data, m.size)
    finally:
        tar.close()
    return samples, ignored


def _ends_cleanly(f, offset: int, file_size: int) -> bool:
    if file_size - offset < tarfile.BLOCKSIZE:
        return False
    f.seek(offset)
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False


class WebDatasetShards(EntryIndex):
    """Records from webdataset ``.tar`` shards, indexed for random access (see module doc).

    ``shards``: paths / globs / brace patterns / folders, or a comma-separated string of
    them. ``size``: images are uint8[size, size, 3]. ``limit``: stop indexing after this many
    good samples (None: read every shard).
    """

    def __init__(self, shards: str | Sequence[str], size: int = 32, limit: int | None = None):
        if limit is not None and limit < 1:
            raise DataError(f"webdataset: limit must be >= 1 or None, got {limit}")
        self.shards = resolve_shards(shards)
        self.image_size = int(size)
        first, last = (os.path.basename(self.shards[i]) for i in (0, -1))
        self.name = (f"webdataset:{first}" if len(self.shards) == 1 else
                     f"webdataset:{first}..{last} ({len(self.shards)} shards)")
        self._index(limit)

    # -- opening

    def _index(self, limit: int | None) -> None:
        skips = _Skips()
        kept: list[tuple[int, str, _Entry]] = []  # (stream position, key, entry)
        seen = ignored = shards_read = 0
        complete = True
        for si, path in enumerate(self.shards):
            if limit is not None and len(kept) >= limit:
                complete = False  # shards left unread
                break
            shards_read += 1
            shown = os.path.basename(path)
            file_size = os.path.getsize(path)
            with open(path, "rb") as f:
                if f.read(2) == b"\x1f\x8b":
                    raise DataError(f"{path}: gzip-compressed shard; random access needs "
                                    f"uncompressed .tar shards (img2dataset's default)")
                f.seek(0)
                samples, n_ignored = _members(f, file_size, skips, shown)
                ignored += n_ignored
                for key, exts in samples.items():
                    if limit is not None and len(kept) >= limit:
                        complete = False  # samples left unread in this shard
                        break
                    pos, seen = seen, seen + 1
                    entry = self._check(si, f, file_size, key, exts, skips, f"{shown}:{key}")
                    if entry is not None:
                        kept.append((pos, key, entry))
        self._shards_read, self._complete = shards_read, complete
        self._seen, self._ignored = seen, ignored
        self._skips = skips
        self._assign_ids(kept, skips)
        if not self._entries:
            raise DataError(f"{self.name}: no usable samples (expected KEY.jpg + KEY.txt "
                            f"members); {self._describe_skips()}")
        if any(self.skipped.values()):
            log.warning("%s: skipped %s", self.name, self._describe_skips())

    def _check(self, si, f, file_size, key, exts, skips, where) -> _Entry | None:
        if any(v is None for v in exts.values()):
            skips.add("duplicate_member", where)
            return None
        if any(off + size > file_size for off, size in exts.values()):
            skips.add("truncated_member", where)
            return None
        images = [e for e in IMAGE_EXTS if e in exts]
        if not images:
            skips.add("missing_image", where)
            return None
        if len(images) > 1:
            skips.add("multiple_images", where)
            return None
        if CAPTION_EXT not in exts:
            skips.add("missing_caption", where)
            return None
        (img_off, img_size), (cap_off, cap_size) = exts[images[0]], exts[CAPTION_EXT]
        raw = _read(f, cap_off, cap_size)
        try:
            caption = raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            skips.add("caption_not_utf8", where)
            return None
        if not caption:
            skips.add("empty_caption", where)
            return None
        try:
            _open_image(_read(f, img_off, img_size), where)
        except DataError:
            skips.add("undecodable_image", where)
            return None
        return _Entry(si, img_off, img_size, caption, key)

    def _assign_ids(self, kept, skips: _Skips) -> None:
        numeric = bool(kept) and all(k.isdigit() and int(k) <= MAX_ID for _, k, _ in kept)
        self.id_rule = "key" if numeric else "position"
        self._entries: dict[int, _Entry] = {}
        for pos, key, entry in kept:
            id = int(key) if numeric else pos
            if id in self._entries:
                first = self._entries[id]
                skips.add("duplicate_key", f"{os.path.basename(self.shards[entry.shard])}:"
                          f"{key} (also in {os.path.basename(self.shards[first.shard])})")
                continue
            if id > MAX_ID:
                raise DataError(f"{self.name}: more than 2**32 samples")
            self._entries[id] = entry

    # -- reporting

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples per reason (reasons with a zero count left out)."""
        return {r: n for r, n in self._skips.counts.items() if n}

    def skip_summary(self) -> dict:
        """What was read, kept and skipped (JSON-ready; for logs and the run's report)."""
        return {
            "samples_seen": self._seen, "kept": len(self._entries),
            "skipped": self.skipped,
            "examples": {r: list(v) for r, v in self._skips.examples.items() if v},
            "shards": len(self.shards), "shards_read": self._shards_read,
            "complete": self._complete,
            "ignored_members": self._ignored, "id_rule": self.id_rule,
        }

    def _describe_skips(self) -> str:
        s = self.skipped
        if not s:
            return "nothing skipped"
        return ", ".join(f"{n} {r} (e.g. {', '.join(self._skips.examples[r][:3])})"
                         for r, n in s.items())

    # -- Dataset protocol

    def key(self, id: int) -> str:
        """``shard.tar:KEY`` of record ``id``."""
        e = self._entry(id)
        return f"{os.path.basename(self.shards[e.shard])}:{e.key}"

    def caption(self, id: int) -> str:
        return self._entry(id).caption

    def _decode(self, f, e: _Entry) -> np.ndarray:
        where = f"{self.shards[e.shard]}:{e.key}"
        data = _read(f, e.offset, e.size)
        if len(data) != e.size:
            raise DataError(f"{where}: shard changed since it was indexed (expected "
                            f"{e.size} image bytes at offset {e.offset})")
        return decode_image_bytes(data, self.image_size, where)

    def get(self, id: int) -> Record:
        e = self._entry(id)
        with open(self.shards[e.shard], "rb") as f:
            image = self._decode(f, e)
        image.flags.writeable = False  # fresh array: the Record keeps it without a copy
        return Record(int(id), image, e.caption)

    def get_many(self, ids: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        entries = [self._entry(i) for i in ids]
        out = np.empty((len(entries), self.image_size, self.image_size, 3), np.uint8)
        # Read shard by shard in file order, one open file each.
        order = sorted(range(len(entries)), key=lambda k: (entries[k].shard, entries[k].offset))
        f, current = None, -1
        try:
            for k in order:
                e = entries[k]
                if e.shard != current:
                    if f is not None:
                        f.close()
                    f, current = open(self.shards[e.shard], "rb"), e.shard
                out[k] = self._decode(f, e)
        finally:
            if f is not None:
                f.close()
        return out, [e.caption for e in entries]
