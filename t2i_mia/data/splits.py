"""The split manifest: which stable ids (and content hashes) each role of the audit uses.

Splits (docs/design.md, "Data and splits"), filled in this order from one seeded permutation:

- ``pretrain``: autoencoder/VQGAN training, shared by target and shadow models;
- ``target_members`` / ``target_nonmembers``: the evaluated members and non-members;
- ``target_known_members`` / ``target_known_nonmembers``: partial-knowledge mode, what the
  adversary knows of the target. Known members are trained on by the target (see
  ``SplitManifest.target_training_ids``) but are disjoint from the evaluated splits;
- ``shadow_members`` / ``shadow_nonmembers``: the shadow model's training set and held-out;
- ``auxiliary``: the adversary's caption pool and encoder training data.

Every pair of splits is disjoint by content hash, and no split holds the same content twice:
``make_splits`` walks the permutation and skips (records) any example whose content hash it
has already seen, and ``check_disjoint`` refuses a manifest that breaks this.

JSON form (``to_json``; canonical: sorted keys, no spaces, ASCII)::

    {"schema_version": 1, "dataset": NAME, "image_size": S, "seed": SEED,
     "sizes": {SPLIT: N, ...},
     "splits": {SPLIT: {"ids": [...], "sha256": [...]}, ...},
     "dropped_duplicates": [[ID, KEPT_ID], ...]}

``sha256()`` is the SHA-256 of that canonical text, which is exactly what ``save`` writes,
so ``sha256sum manifest.json`` gives the same digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from t2i_mia.config import Config
from t2i_mia.data.records import MAX_ID, Dataset, content_hash
from t2i_mia.errors import DataError

SCHEMA_VERSION = 1
SPLIT_NAMES = ("pretrain", "target_members", "target_nonmembers", "target_known_members",
               "target_known_nonmembers", "shadow_members", "shadow_nonmembers", "auxiliary")
MANIFEST_KEYS = ("schema_version", "dataset", "image_size", "seed", "sizes", "splits",
                 "dropped_duplicates")
_SPLIT_STREAM = 0x5B117  # second PCG64 seed word: the split permutation's own stream
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 256  # examples decoded per get_many call while hashing


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass(frozen=True)
class SplitSizes:
    """Number of examples per split; field names are SPLIT_NAMES (same as config's splits)."""

    pretrain: int = 0
    target_members: int = 0
    target_nonmembers: int = 0
    target_known_members: int = 0
    target_known_nonmembers: int = 0
    shadow_members: int = 0
    shadow_nonmembers: int = 0
    auxiliary: int = 0

    def __post_init__(self):
        for name in SPLIT_NAMES:
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise DataError(f"split sizes: {name} must be an integer >= 0, got {v!r}")
            object.__setattr__(self, name, int(v))

    @property
    def total(self) -> int:
        return sum(self.to_dict().values())

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "sizes") -> "SplitSizes":
        """From a mapping (or a dataclass such as ``config.SplitsConfig``); unknown keys or
        non-integer values raise DataError naming ``where.key``."""
        if dataclasses.is_dataclass(d) and not isinstance(d, type):
            d = dataclasses.asdict(d)
        if not isinstance(d, Mapping):
            raise DataError(f"{where}: expected an object of split sizes, got "
                            f"{type(d).__name__}")
        for k, v in d.items():
            if k not in SPLIT_NAMES:
                raise DataError(f"{where}.{k}: unknown split (expected one of "
                                f"{list(SPLIT_NAMES)})")
            if not _is_int(v) or v < 0:
                raise DataError(f"{where}.{k}: expected an integer >= 0, got {v!r}")
        return cls(**{k: int(v) for k, v in d.items()})


@dataclass(frozen=True)
class Split:
    """One split: stable ids and their content hashes, in assignment order."""
    ids: tuple[int, ...]
    sha256: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SplitManifest:
    """Ids and content hashes per split, with the data set, image size and seed used."""
    dataset: str
    image_size: int
    seed: int
    splits: Mapping[str, Split]
    dropped_duplicates: tuple[tuple[int, int], ...] = ()  # (dropped id, id kept instead)

    def __post_init__(self):
        if set(self.splits) != set(SPLIT_NAMES):
            raise DataError(f"split manifest: splits must be exactly {list(SPLIT_NAMES)}, got "
                            f"{sorted(self.splits)}")
        for name in SPLIT_NAMES:
            s = self.splits[name]
            if not isinstance(s, Split) or len(s.ids) != len(s.sha256):
                raise DataError(f"split manifest: splits.{name} must be a Split with as many "
                                f"hashes as ids")
        object.__setattr__(self, "splits", {name: self.splits[name] for name in SPLIT_NAMES})

    @property
    def sizes(self) -> SplitSizes:
        return SplitSizes(**{name: len(self.splits[name]) for name in SPLIT_NAMES})

    def ids(self, name: str) -> list[int]:
        return list(self._split(name).ids)

    def hashes(self, name: str) -> list[str]:
        return list(self._split(name).sha256)

    def _split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise DataError(f"split manifest: unknown split {name!r} (expected one of "
                            f"{list(SPLIT_NAMES)})")
        return self.splits[name]

    def target_training_ids(self) -> list[int]:
        """What the target trains on: ``target_members`` then ``target_known_members``."""
        return self.ids("target_members") + self.ids("target_known_members")

    def reference_ids(self, index: int, size: int) -> list[int]:
        """The members of the calibrated attack's reference model ``index``: a seeded draw
        (manifest seed, index) of ``size`` ids from ``auxiliary``, the adversary's own data,
        which no queried split shares. DataError if ``auxiliary`` is smaller than ``size``."""
        aux = self.ids("auxiliary")
        if size > len(aux):
            raise DataError(f"split manifest: a reference model needs {size} members but "
                            f"'auxiliary' has {len(aux)} (data.splits.auxiliary)")
        rng = np.random.Generator(np.random.PCG64([self.seed, 0x7ef, index]))
        pick = np.sort(rng.choice(len(aux), size, replace=False))
        return [aux[i] for i in pick]

    def reference_hashes(self, index: int, size: int) -> list[str]:
        by_id = dict(zip(self.ids("auxiliary"), self.hashes("auxiliary")))
        return [by_id[i] for i in self.reference_ids(index, size)]

    def check_disjoint(self) -> None:
        """DataError naming both splits and an offending id and hash when two splits share
        content (or an id), or naming the split when one holds the same content twice."""
        by_hash: dict[str, tuple[str, int]] = {}
        by_id: dict[int, tuple[str, str]] = {}
        for name in SPLIT_NAMES:
            split = self.splits[name]
            for id, h in zip(split.ids, split.sha256):
                if h in by_hash:
                    other, other_id = by_hash[h]
                    if other == name:
                        raise DataError(f"split manifest: split {name!r} holds the same content "
                                        f"twice: ids {other_id} and {id} (sha256 {h})")
                    raise DataError(f"split manifest: splits {other!r} and {name!r} overlap: "
                                    f"id {other_id} ({other}) and id {id} ({name}) have the "
                                    f"same content (sha256 {h})")
                if id in by_id:
                    other, other_h = by_id[id]
                    raise DataError(f"split manifest: id {id} is in splits {other!r} and "
                                    f"{name!r} with different hashes ({other_h} / {h})")
                by_hash[h] = (name, id)
                by_id[id] = (name, h)

    def verify(self, dataset: Dataset) -> None:
        """DataError unless ``dataset`` still has every id of the manifest with the same
        content hash (and the same name and image size): a manifest reused with its data."""
        if dataset.name != self.dataset or dataset.image_size != self.image_size:
            raise DataError(f"split manifest: made for {self.dataset!r} at size "
                            f"{self.image_size}, not {dataset.name!r} at size "
                            f"{dataset.image_size}")
        for name in SPLIT_NAMES:
            split = self.splits[name]
            for start in range(0, len(split), _CHUNK):
                ids = list(split.ids[start:start + _CHUNK])
                images, _ = dataset.get_many(ids)
                for id, image, want in zip(ids, images, split.sha256[start:start + _CHUNK]):
                    got = content_hash(image)
                    if got != want:
                        raise DataError(f"split manifest: {dataset.name} id {id} ({name}) has "
                                        f"content sha256 {got}, the manifest says {want}")

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "image_size": self.image_size,
            "seed": self.seed,
            "sizes": self.sizes.to_dict(),
            "splits": {name: {"ids": list(self.splits[name].ids),
                              "sha256": list(self.splits[name].sha256)}
                       for name in SPLIT_NAMES},
            "dropped_duplicates": [list(p) for p in self.dropped_duplicates],
        }

    def to_json(self) -> str:
        """The canonical JSON text (sorted keys, no whitespace, ASCII)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True)

    def sha256(self) -> str:
        """Hex SHA-256 of ``to_json()`` (the split-manifest hash of the cache key)."""
        return hashlib.sha256(self.to_json().encode("ascii")).hexdigest()

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "split manifest") -> "SplitManifest":
        try:
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: not valid JSON ({e})") from e
        return cls.from_dict(obj, where)

    @classmethod
    def from_dict(cls, obj: Mapping, where: str = "split manifest") -> "SplitManifest":
        """Validates every key and type (DataError naming ``where`` and the key), then
        checks disjointness."""
        if not isinstance(obj, Mapping):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for k in obj:
            if k not in MANIFEST_KEYS:
                raise DataError(f"{where}: unknown key {k!r} (expected {list(MANIFEST_KEYS)})")
        for k in MANIFEST_KEYS:
            if k not in obj:
                raise DataError(f"{where}: missing key {k!r}")
        if obj["schema_version"] != SCHEMA_VERSION:
            raise DataError(f"{where}: schema_version {obj['schema_version']!r} is not "
                            f"supported (expected {SCHEMA_VERSION})")
        if not isinstance(obj["dataset"], str):
            raise DataError(f"{where}: 'dataset' must be a string, got {obj['dataset']!r}")
        for k in ("image_size", "seed"):
            if not _is_int(obj[k]) or obj[k] < 0:
                raise DataError(f"{where}: {k!r} must be an integer >= 0, got {obj[k]!r}")
        sizes = SplitSizes.from_dict(obj["sizes"], f"{where}: sizes")
        raw = obj["splits"]
        if not isinstance(raw, Mapping):
            raise DataError(f"{where}: 'splits' must be an object, got {type(raw).__name__}")
        for name in raw:
            if name not in SPLIT_NAMES:
                raise DataError(f"{where}: splits.{name}: unknown split (expected one of "
                                f"{list(SPLIT_NAMES)})")
        splits = {}
        for name in SPLIT_NAMES:
            key = f"{where}: splits.{name}"
            s = raw.get(name)
            if not isinstance(s, Mapping) or set(s) != {"ids", "sha256"}:
                raise DataError(f"{key}: expected an object with exactly 'ids' and 'sha256', "
                                f"got {s!r:.100}")
            ids, hashes = s["ids"], s["sha256"]
            if not isinstance(ids, list) or not all(_is_int(i) and 0 <= i <= MAX_ID
                                                    for i in ids):
                raise DataError(f"{key}.ids: expected a list of integers in [0, 2**32)")
            if not isinstance(hashes, list) or not all(isinstance(h, str) and _HASH_RE.match(h)
                                                       for h in hashes):
                raise DataError(f"{key}.sha256: expected a list of 64-digit lower-case hex "
                                f"strings")
            if len(ids) != len(hashes):
                raise DataError(f"{key}: {len(ids)} ids but {len(hashes)} hashes")
            if len(ids) != getattr(sizes, name):
                raise DataError(f"{key}: {len(ids)} ids but sizes.{name} says "
                                f"{getattr(sizes, name)}")
            splits[name] = Split(tuple(int(i) for i in ids), tuple(hashes))
        dropped = obj["dropped_duplicates"]
        if not isinstance(dropped, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(_is_int(i) for i in p)
                for p in dropped):
            raise DataError(f"{where}: 'dropped_duplicates' must be a list of [id, kept_id] "
                            f"pairs")
        m = cls(obj["dataset"], int(obj["image_size"]), int(obj["seed"]), splits,
                tuple((int(a), int(b)) for a, b in dropped))
        m.check_disjoint()
        return m

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``to_json()`` atomically (temporary file + os.replace)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SplitManifest":
        """Reads and validates a saved manifest; errors name the file and key."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (expected a split manifest JSON)")
        with open(path, "rb") as f:
            return cls.from_json(f.read(), path)


def make_splits(dataset: Dataset, sizes: SplitSizes, seed: int) -> SplitManifest:
    """Assigns the dataset's ids to splits by one permutation seeded with ``seed``.

    The sorted ids are permuted with ``Generator(PCG64([seed, 0x5B117]))``; the permutation
    is walked in order, each example's content hash computed, and an example whose content
    was already taken is skipped and recorded in ``dropped_duplicates`` (so the first one in
    permutation order is kept). Splits are filled in SPLIT_NAMES order. Deterministic: the
    same data, sizes and seed give the same manifest. Only as many examples as needed are
    decoded. DataError when there are fewer distinct examples than ``sizes.total``.
    """
    if not _is_int(seed) or seed < 0:
        raise DataError(f"make_splits: seed must be an integer >= 0, got {seed!r}")
    if not isinstance(sizes, SplitSizes):
        sizes = SplitSizes.from_dict(sizes)
    need = sizes.total
    all_ids = sorted(int(i) for i in dataset.ids())
    if len(all_ids) < need:
        raise DataError(f"{dataset.name}: the split sizes need {need} examples "
                        f"({_describe(sizes)}) but only {len(all_ids)} are available")
    rng = np.random.Generator(np.random.PCG64([int(seed), _SPLIT_STREAM]))
    order = [all_ids[i] for i in rng.permutation(len(all_ids))]
    taken_ids: list[int] = []
    taken_hashes: list[str] = []
    first: dict[str, int] = {}
    dropped: list[tuple[int, int]] = []
    pos = 0
    while len(taken_ids) < need and pos < len(order):
        # Decode only what is still needed (duplicates make us read further).
        chunk = order[pos:pos + min(_CHUNK, need - len(taken_ids))]
        pos += len(chunk)
        images, _ = dataset.get_many(chunk)
        for id, image in zip(chunk, images):
            h = content_hash(image)
            if h in first:
                dropped.append((id, first[h]))
                continue
            first[h] = id
            taken_ids.append(id)
            taken_hashes.append(h)
    if len(taken_ids) < need:
        raise DataError(f"{dataset.name}: the split sizes need {need} distinct examples "
                        f"({_describe(sizes)}) but only {len(taken_ids)} are available "
                        f"({len(all_ids)} ids, {len(dropped)} duplicates by content hash "
                        f"dropped)")
    splits, start = {}, 0
    for name in SPLIT_NAMES:
        n = getattr(sizes, name)
        splits[name] = Split(tuple(taken_ids[start:start + n]),
                             tuple(taken_hashes[start:start + n]))
        start += n
    manifest = SplitManifest(dataset.name, int(dataset.image_size), int(seed), splits,
                             tuple(dropped))
    manifest.check_disjoint()
    return manifest


def _describe(sizes: SplitSizes) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.to_dict().items() if v)


def build_splits(cfg: Config, dataset: Dataset) -> SplitManifest:
    """The manifest of ``cfg.data.splits`` drawn from ``dataset`` with ``cfg.seed``, checked
    disjoint by content hash."""
    sizes = SplitSizes(**dataclasses.asdict(cfg.data.splits))
    manifest = make_splits(dataset, sizes, seed=cfg.seed)
    manifest.check_disjoint()
    return manifest
