"""Split manifest: seeded assignment, content-hash disjointness, dedupe, JSON round trip."""

import hashlib
import json

import numpy as np
import pytest

from t2i_mia.data.records import Record, content_hash
from t2i_mia.data.splits import SPLIT_NAMES, Split, SplitManifest, SplitSizes, make_splits
from t2i_mia.data.synthetic import SyntheticCaptions
from t2i_mia.errors import DataError

SIZES = SplitSizes(pretrain=40, target_members=10, target_nonmembers=10,
                   target_known_members=4, target_known_nonmembers=4, shadow_members=10,
                   shadow_nonmembers=10, auxiliary=20)  # 108 in all
# Pinned: make_splits(SyntheticCaptions(0, 32, n=150), SIZES, seed=3).sha256()
PINNED_MANIFEST_SHA256 = "64f0bf922f657ac021204dced540b80ec3ca305b459db6e8719124bab24349ab"


class ListDataset:
    """A Dataset over given images; ids need not be contiguous."""

    def __init__(self, images: dict[int, np.ndarray], name="list"):
        self.images, self.name, self.image_size = images, name, 4

    def __len__(self):
        return len(self.images)

    def ids(self):
        return sorted(self.images)

    def get(self, id):
        return Record(id, self.images[id], f"caption {id}")

    def get_many(self, ids):
        return np.stack([self.images[i] for i in ids]), [f"caption {i}" for i in ids]


def _distinct(ids):
    rng = np.random.default_rng(0)
    return {i: rng.integers(0, 256, (4, 4, 3)).astype(np.uint8) for i in ids}


@pytest.fixture(scope="module")
def synth():
    return SyntheticCaptions(0, 32, n=150)


@pytest.fixture(scope="module")
def manifest(synth):
    return make_splits(synth, SIZES, seed=3)


def test_make_splits_sizes_disjoint_and_hashes(synth, manifest):
    assert manifest.sizes == SIZES and manifest.sizes.total == 108
    all_ids = [i for n in SPLIT_NAMES for i in manifest.ids(n)]
    assert len(set(all_ids)) == 108 and set(all_ids) <= set(range(150))
    hashes = [h for n in SPLIT_NAMES for h in manifest.hashes(n)]
    assert len(set(hashes)) == 108
    for name in SPLIT_NAMES:
        for i, h in zip(manifest.ids(name), manifest.hashes(name)):
            assert synth.get(i).sha256 == h
    # Known splits are disjoint from the evaluated ones; known members train the target.
    evaluated = set(manifest.ids("target_members")) | set(manifest.ids("target_nonmembers"))
    known = set(manifest.ids("target_known_members")) | set(
        manifest.ids("target_known_nonmembers"))
    assert not evaluated & known
    assert manifest.target_training_ids() == (manifest.ids("target_members")
                                              + manifest.ids("target_known_members"))
    assert manifest.dropped_duplicates == () and manifest.dataset == synth.name
    manifest.check_disjoint()
    manifest.verify(synth)


def test_make_splits_deterministic_and_seeded(synth, manifest):
    again = make_splits(SyntheticCaptions(0, 32, n=150), SIZES, seed=3)
    assert again == manifest and again.sha256() == manifest.sha256()
    assert manifest.sha256() == PINNED_MANIFEST_SHA256
    other = make_splits(synth, SIZES, seed=4)
    assert other.ids("target_members") != manifest.ids("target_members")
    # Ids are the source's, not list positions: a sparse id set keeps its ids.
    ds = ListDataset(_distinct([5, 900, 77, 12, 40000]))
    m = make_splits(ds, SplitSizes(target_members=2, target_nonmembers=3), seed=0)
    assert sorted(m.ids("target_members") + m.ids("target_nonmembers")) == [5, 12, 77, 900,
                                                                               40000]


def test_injected_overlap_is_an_error(manifest):
    splits = dict(manifest.splits)
    a = splits["target_members"]
    s = splits["shadow_nonmembers"]
    # A different id with the same content as target_members[0] placed in shadow_nonmembers.
    splits["shadow_nonmembers"] = Split(s.ids[:-1] + (9999,), s.sha256[:-1] + (a.sha256[0],))
    bad = SplitManifest(manifest.dataset, 32, 3, splits)
    with pytest.raises(DataError) as e:
        bad.check_disjoint()
    msg = str(e.value)
    assert "'target_members'" in msg and "'shadow_nonmembers'" in msg
    assert str(a.ids[0]) in msg and "9999" in msg and a.sha256[0] in msg
    with pytest.raises(DataError, match="'target_members' and 'shadow_nonmembers' overlap"):
        SplitManifest.from_json(bad.to_json())  # loading refuses it too
    # Within one split.
    splits = dict(manifest.splits)
    splits["auxiliary"] = Split(a.ids[:1] + (8888,), a.sha256[:1] * 2)
    splits["target_members"] = Split(a.ids[1:], a.sha256[1:])
    with pytest.raises(DataError, match="split 'auxiliary' holds the same content twice"):
        SplitManifest(manifest.dataset, 32, 3, splits).check_disjoint()


def test_identical_pixels_under_two_ids_are_deduplicated():
    images = _distinct(range(12))
    images[100] = images[3].copy()  # two ids, identical pixels
    images[101] = images[7].copy()
    ds = ListDataset(images)
    sizes = SplitSizes(target_members=6, target_nonmembers=6)  # needs all 12 distinct
    m = make_splits(ds, sizes, seed=1)
    m.check_disjoint()
    # Only the duplicates met while filling the splits are recorded (the walk stops once
    # 12 distinct examples are taken): here at least one of the two pairs.
    assert 1 <= len(m.dropped_duplicates) <= 2
    taken = [i for n in SPLIT_NAMES for i in m.ids(n)]
    assert len({content_hash(images[i]) for i in taken}) == 12
    for dropped, kept in m.dropped_duplicates:
        assert {dropped, kept} in ({3, 100}, {7, 101})
        assert content_hash(images[dropped]) == content_hash(images[kept])
    assert m == make_splits(ds, sizes, seed=1)
    with pytest.raises(DataError, match=r"need 13 distinct examples .* only 12 are "
                                        r"available \(14 ids, 2 duplicates"):
        make_splits(ds, SplitSizes(target_members=7, target_nonmembers=6), seed=1)


def test_too_few_examples(synth):
    with pytest.raises(DataError, match=r"need 200 examples .* only 150 are available"):
        make_splits(synth, SplitSizes(pretrain=100, auxiliary=100), seed=0)
    with pytest.raises(DataError, match="seed must be an integer"):
        make_splits(synth, SIZES, seed=-1)


def test_manifest_round_trip_and_sha256(tmp_path, manifest):
    path = tmp_path / "manifest.json"
    manifest.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.sha256()
    loaded = SplitManifest.load(path)
    assert loaded == manifest and loaded.sha256() == manifest.sha256()
    assert json.loads(path.read_text())["schema_version"] == 1


def test_manifest_load_validation(tmp_path, manifest):
    def load(obj):
        path = tmp_path / "m.json"
        path.write_text(json.dumps(obj))
        return SplitManifest.load(path)

    base = manifest.to_dict()
    cases = []
    d = json.loads(json.dumps(base))
    d["splits"]["holdout"] = {"ids": [], "sha256": []}
    cases.append((d, "splits.holdout: unknown split"))
    d = json.loads(json.dumps(base))
    d["splits"]["auxiliary"]["ids"][0] = "12"
    cases.append((d, r"splits.auxiliary.ids: expected a list of integers"))
    d = json.loads(json.dumps(base))
    d["splits"]["pretrain"]["sha256"][0] = "xyz"
    cases.append((d, r"splits.pretrain.sha256: expected a list of 64-digit"))
    d = json.loads(json.dumps(base))
    d["sizes"]["target_members"] = 11
    cases.append((d, r"splits.target_members: 10 ids but sizes.target_members says 11"))
    d = json.loads(json.dumps(base))
    d["sizes"]["shadow"] = 1
    cases.append((d, r"sizes.shadow: unknown split"))
    d = json.loads(json.dumps(base))
    d["seed"] = "3"
    cases.append((d, r"'seed' must be an integer"))
    d = json.loads(json.dumps(base))
    d["extra"] = 1
    cases.append((d, r"unknown key 'extra'"))
    d = json.loads(json.dumps(base))
    del d["splits"]["auxiliary"]
    cases.append((d, r"splits.auxiliary: expected an object"))
    d = json.loads(json.dumps(base))
    d["schema_version"] = 2
    cases.append((d, r"schema_version 2 is not supported"))
    for obj, msg in cases:
        with pytest.raises(DataError, match=msg) as e:
            load(obj)
        assert "m.json" in str(e.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not valid JSON"):
        SplitManifest.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="missing"):
        SplitManifest.load(tmp_path / "absent.json")


def test_verify_detects_changed_data(manifest):
    with pytest.raises(DataError, match="made for"):
        manifest.verify(SyntheticCaptions(1, 32, n=150))
    splits = dict(manifest.splits)
    s = splits["pretrain"]
    splits["pretrain"] = Split(s.ids, ("0" * 64,) + s.sha256[1:])
    with pytest.raises(DataError, match=rf"id {s.ids[0]} \(pretrain\) has content sha256"):
        SplitManifest(manifest.dataset, 32, 3, splits).verify(SyntheticCaptions(0, 32, n=150))


def test_split_sizes_from_config():
    from t2i_mia.config import SplitsConfig
    sizes = SplitSizes.from_dict(SplitsConfig())
    assert sizes.to_dict() == {n: getattr(SplitsConfig(), n) for n in SPLIT_NAMES}
    with pytest.raises(DataError, match=r"sizes.members: unknown split"):
        SplitSizes.from_dict({"members": 3})
    with pytest.raises(DataError, match=r"sizes.auxiliary: expected an integer >= 0"):
        SplitSizes.from_dict({"auxiliary": -1})
