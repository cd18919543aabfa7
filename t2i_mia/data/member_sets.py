"""Explicit member and non-member sets: a user's own lists of what a model was (not) trained on.

Roles (``ROLES``, in reading order): ``members`` and ``nonmembers`` (the sets under audit),
``shadow_members`` / ``shadow_nonmembers`` (a user's shadow model's sets, for
``adversary.aux_mode=shadow``) and ``aux`` (the adversary's own data: its encoder's
training set and the captioner's pool). Each is a ``--data folder`` source: a folder of
images with ``.txt`` captions, or a JSONL manifest (:mod:`t2i_mia.data.folder`).

Ids: a manifest's ids are its own (``"id"`` or the line number) and must be unique across
all the sets; a plain folder has no ids of its own, so its files are numbered in sorted
file-name order starting after the largest id of the sets read before it (so two folders
never collide). Use manifests when the ids must be fixed in advance (a ``generations``
folder is laid out by id).

Validation (:func:`read_member_sets`, before any model is loaded): every image is decoded
at the checkpoint's image size and content-hashed; members, non-members and the other sets
must be pairwise disjoint by content hash and no set may hold the same content twice (the
error names both files or manifest lines); ids must be unique across the sets.

:func:`explicit_manifest` turns the sets into the audit's :class:`SplitManifest`:
``aux_mode`` ``partial`` moves a stratified, seeded ``known_fraction`` of members and
non-members into ``target_known_*`` (the adversary's labelled knowledge, queried on the
target) and evaluates the rest; ``none`` and ``shadow`` evaluate all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from t2i_mia.data.folder import JsonlManifest, open_folder
from t2i_mia.data.records import MAX_ID, EntryIndex, Record, content_hash
from t2i_mia.data.splits import SPLIT_NAMES, Split, SplitManifest
from t2i_mia.errors import DataError

ROLES = ("members", "nonmembers", "shadow_members", "shadow_nonmembers", "aux")
FLAGS = {"members": "--members", "nonmembers": "--nonmembers",
         "shadow_members": "--shadow-members", "shadow_nonmembers": "--shadow-nonmembers",
         "aux": "--aux"}
# the manifest split each role fills (aux_mode none/shadow; partial splits members further)
_SPLIT_OF = {"members": "target_members", "nonmembers": "target_nonmembers",
             "shadow_members": "shadow_members", "shadow_nonmembers": "shadow_nonmembers",
             "aux": "auxiliary"}
_STREAM = 0x6B0E  # PCG64 stream word of the known-part draw


@dataclasses.dataclass(frozen=True)
class MemberSet:
    """One set as read: its path, the ids (ascending) and content hashes."""
    role: str
    path: str
    ids: tuple[int, ...]
    sha256: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


class MemberSetsDataset(EntryIndex):
    """The union of the sets as one Dataset (see ``records.Dataset``), addressed by the ids of
    :class:`MemberSet`; images decoded lazily at ``image_size``."""

    def __init__(self, sources: Mapping[str, tuple[object, int]], image_size: int):
        # role -> (opened folder/manifest, id offset added to its own ids)
        self._sources = dict(sources)
        self.image_size = int(image_size)
        self.name = "member-sets:" + ",".join(f"{r}={getattr(ds, 'name', '?')}"
                                              for r, (ds, _) in self._sources.items())
        # id -> (the set's dataset, its own id there)
        self._entries: dict[int, tuple[object, int]] = {}
        for ds, off in self._sources.values():
            for i in ds.ids():
                self._entries[int(i) + off] = (ds, int(i))

    def caption(self, id: int) -> str:
        ds, own = self._entry(id)
        return ds.caption(own)

    def captions(self, ids: Sequence[int]) -> list[str]:
        return [self.caption(i) for i in ids]

    def get(self, id: int) -> Record:
        ds, own = self._entry(id)
        image = ds.image(own)
        image.flags.writeable = False
        return Record(int(id), image, ds.caption(own))

    def get_many(self, ids: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        out = np.empty((len(ids), self.image_size, self.image_size, 3), np.uint8)
        caps = []
        for k, i in enumerate(ids):
            ds, own = self._entry(i)
            out[k] = ds.image(own)
            caps.append(ds.caption(own))
        return out, caps


@dataclasses.dataclass(frozen=True)
class MemberSets:
    """The validated sets (role -> :class:`MemberSet`, only the roles given) and their union."""
    sets: Mapping[str, MemberSet]
    dataset: MemberSetsDataset

    def has(self, role: str) -> bool:
        return role in self.sets

    def describe(self) -> dict:
        """For the report: each set's path and size."""
        return {r: {"path": s.path, "n": len(s)} for r, s in self.sets.items()}


def read_member_sets(paths: Mapping[str, str | None], image_size: int,
                     required: Sequence[str] = ("members", "nonmembers"),
                     flags: Mapping[str, str] | None = None) -> MemberSets:
    """Opens and validates the sets given in ``paths`` (role -> folder/manifest, None =
    absent); the ``required`` roles must be given. Decodes every image (a corrupt or
    missing one is an error naming it). DataError on an overlap or a duplicate id; errors
    name each set by its flag (``flags`` overrides ``FLAGS``)."""
    flag_of = {**FLAGS, **(flags or {})}
    unknown = sorted(set(paths) - set(ROLES))
    if unknown:
        raise ValueError(f"read_member_sets: unknown roles {unknown} (expected {ROLES})")
    for role in required:
        if not paths.get(role):
            raise DataError(f"{flag_of[role]}: missing (a folder of images with .txt captions "
                            f"or a JSONL manifest)")
    sources, sets = {}, {}
    id_owner: dict[int, tuple[str, str]] = {}  # id -> (role, where)
    hash_owner: dict[str, tuple[str, str]] = {}  # content hash -> (role, where)
    next_free = 0
    for role in ROLES:
        path = paths.get(role)
        if not path:
            continue
        ds = open_folder(path, image_size)
        # a plain folder's ids are positions: numbered after the sets read so far
        offset = 0 if isinstance(ds, JsonlManifest) else next_free
        own_ids = ds.ids()
        ids, hashes = [], []
        for own in own_ids:
            where = ds.where(own)
            image = ds.image(own)
            h = content_hash(image)
            id = int(own) + offset
            if id > MAX_ID:
                raise DataError(f"{where}: id {id} is too large (ids must be < 2**32)")
            if id in id_owner:
                other_role, other_where = id_owner[id]
                raise DataError(
                    f"{flag_of[role]} {where} and {flag_of[other_role]} {other_where}: both "
                    f"have id {id}; ids must be unique across the sets (give each "
                    f"manifest entry its own \"id\")")
            if h in hash_owner:
                other_role, other_where = hash_owner[h]
                what = ("holds the same image twice" if other_role == role
                        else f"overlaps {flag_of[other_role]}")
                raise DataError(
                    f"{flag_of[role]} {path} {what}: {where} (id {id}) and {other_where} "
                    f"have the same content (sha256 {h[:16]}...); the sets must be "
                    f"disjoint by content")
            id_owner[id] = (role, where)
            hash_owner[h] = (role, where)
            ids.append(id)
            hashes.append(h)
        sources[role] = (ds, offset)
        sets[role] = MemberSet(role, str(path), tuple(ids), tuple(hashes))
        next_free = max(next_free, max(ids) + 1)
    return MemberSets(sets, MemberSetsDataset(sources, image_size))


def known_part(n: int, fraction: float, seed: int, role: str) -> np.ndarray:
    """bool[n]: which of a set's n entries (in ascending id order) are the adversary's known
    part: round(fraction * n) of them, drawn with PCG64([seed, stream, role])."""
    k = int(round(fraction * n))
    salt = ROLES.index(role)
    rng = np.random.Generator(np.random.PCG64([int(seed), _STREAM, salt]))
    mask = np.zeros(n, bool)
    mask[rng.choice(n, k, replace=False)] = True
    return mask


def explicit_manifest(ms: MemberSets, aux_mode: str, known_fraction: float, seed: int,
                      min_per_class: int = 2) -> SplitManifest:
    """The audit's split manifest from explicit sets (see the module docstring).

    ``partial``: ``target_known_members`` / ``target_known_nonmembers`` are a seeded
    ``known_fraction`` of each set (stratified: the same fraction of both); DataError when
    either part would hold fewer than ``min_per_class`` of a class."""
    splits = {name: ([], []) for name in SPLIT_NAMES}
    for role, s in ms.sets.items():
        ids, hashes = list(s.ids), list(s.sha256)
        if aux_mode == "partial" and role in ("members", "nonmembers"):
            mask = known_part(len(ids), known_fraction, seed, role)
            known = "target_known_" + role
            for name, keep in ((known, mask), (_SPLIT_OF[role], ~mask)):
                part = np.flatnonzero(keep)
                if len(part) < min_per_class:
                    raise DataError(
                        f"{FLAGS[role]} {s.path}: {len(ids)} entries leave {len(part)} for "
                        f"{'the known part' if name == known else 'evaluation'} at "
                        f"adversary.known_fraction={known_fraction}; need at least "
                        f"{min_per_class}")
                splits[name] = ([ids[i] for i in part], [hashes[i] for i in part])
            continue
        splits[_SPLIT_OF[role]] = (ids, hashes)
    manifest = SplitManifest(ms.dataset.name, ms.dataset.image_size, int(seed),
                             {n: Split(tuple(i), tuple(h)) for n, (i, h) in splits.items()})
    manifest.check_disjoint()
    return manifest
