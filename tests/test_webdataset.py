"""Webdataset shards (img2dataset layout): shard lists, random access, counted skips."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from t2i_mia.config import load_config
from t2i_mia.data.images import load_image
from t2i_mia.data.records import Dataset, content_hash
from t2i_mia.data.sources import open_dataset, shard_limit
from t2i_mia.data.webdataset import (WebDatasetShards, decode_image_bytes, expand_braces,
                                     resolve_shards)
from t2i_mia.errors import ConfigError, DataError

S = 16


def _image(seed: int, h: int = S, w: int = S) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write_shard(path, samples):
    """samples: [(key, {ext: bytes})], written in order as img2dataset does."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(i: int, caption: str | None = None):
    key = f"{i:09d}"
    return key, {"png": _encode(_image(i)), "txt": (caption or f"caption {i}").encode(),
                 "json": json.dumps({"key": key, "status": "success"}).encode()}


@pytest.fixture
def two_shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _write_shard(d / "00000.tar", [_good(i) for i in range(0, 4)])
    _write_shard(d / "00001.tar", [_good(i) for i in range(4, 7)])
    return d


def test_expand_braces_and_shard_lists(two_shards):
    assert expand_braces("a{00..02}b") == ["a00b", "a01b", "a02b"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("s{9..10}") == ["s9", "s10"]
    with pytest.raises(DataError, match="closing"):
        expand_braces("a{1..2")
    d = str(two_shards)
    want = [os.path.join(d, "00000.tar"), os.path.join(d, "00001.tar")]
    assert resolve_shards(f"{d}/*.tar") == want
    assert resolve_shards(f"{d}/{{00000..00001}}.tar") == want
    assert resolve_shards(d) == want
    # Comma list, the same shard twice is read once, order as given.
    assert resolve_shards(f"{want[1]}, {want[0]},{d}/*.tar") == want[::-1]
    with pytest.raises(DataError, match="matched no files"):
        resolve_shards(f"{d}/*.tgz")
    with pytest.raises(DataError, match="nope.tar: shard not found"):
        resolve_shards(f"{want[0]},{d}/nope.tar")


def test_reads_shards_with_key_ids(two_shards):
    ds = WebDatasetShards(f"{two_shards}/{{00000..00001}}.tar", size=S)
    assert isinstance(ds, Dataset)
    assert len(ds) == 7 and ds.ids() == list(range(7))
    assert ds.name == "webdataset:00000.tar..00001.tar (2 shards)"
    images, captions = ds.get_many([5, 0, 3])
    assert images.shape == (3, S, S, 3) and images.dtype == np.uint8
    for k, i in enumerate([5, 0, 3]):
        np.testing.assert_array_equal(images[k], _image(i))  # S x S PNG: exact pixels
    assert captions == ["caption 5", "caption 0", "caption 3"]
    r = ds.get(4)
    assert r.id == 4 and r.caption == "caption 4" and r.sha256 == content_hash(_image(4))
    assert ds.key(4) == "00001.tar:000000004"
    s = ds.skip_summary()
    assert s == {"samples_seen": 7, "kept": 7, "skipped": {}, "examples": {}, "shards": 2,
                 "shards_read": 2, "complete": True, "ignored_members": 7, "id_rule": "key"}
    # Ids are the keys: listing the shards the other way round changes nothing.
    rev = WebDatasetShards([str(two_shards / "00001.tar"), str(two_shards / "00000.tar")], S)
    assert rev.ids() == ds.ids() and rev.get(2) == ds.get(2)
    with pytest.raises(DataError, match="no record with id 7"):
        ds.get(7)


def test_bad_samples_are_counted_and_skipped(tmp_path, caplog):
    good = [_good(i) for i in range(6)]
    bad = [
        ("000000100", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"corrupt image"}),
        ("000000101", {"jpg": _encode(_image(101), "JPEG"), "json": b"{}"}),  # no caption
        ("000000102", {"png": _encode(_image(102)), "txt": b"  \n\t"}),
        ("000000103", {"png": _encode(_image(103)), "txt": b"caf\xe9 au lait"}),  # latin-1
        ("000000104", {"txt": b"a caption without its image"}),
        ("000000105", {"png": _encode(_image(105)), "jpg": _encode(_image(105), "JPEG"),
                       "txt": b"two images"}),
        ("000000106", {"png": b"", "txt": b"zero-byte image"}),
    ]
    path = tmp_path / "mixed.tar"
    _write_shard(path, good[:3] + bad + good[3:])
    with caplog.at_level("WARNING", logger="t2i_mia"):
        ds = WebDatasetShards(str(path), size=S)
    assert ds.ids() == list(range(6))
    s = ds.skip_summary()
    assert s["skipped"] == {"undecodable_image": 2, "missing_caption": 1, "empty_caption": 1,
                            "caption_not_utf8": 1, "missing_image": 1, "multiple_images": 1}
    assert s["samples_seen"] == 13 and s["kept"] == 6 and s["complete"]
    assert s["examples"]["undecodable_image"] == ["mixed.tar:000000100", "mixed.tar:000000106"]
    assert s["examples"]["missing_caption"] == ["mixed.tar:000000101"]
    assert ds.skipped == s["skipped"]
    assert "skipped" in caplog.text and "missing_caption" in caplog.text
    for i in (100, 101, 102):
        with pytest.raises(DataError, match=f"no record with id {i}"):
            ds.get(i)
    images, _ = ds.get_many(ds.ids())
    for i in range(6):
        np.testing.assert_array_equal(images[i], _image(i))


def test_non_numeric_keys_use_stream_position(tmp_path):
    _write_shard(tmp_path / "a.tar", [("x/cat", {"png": _encode(_image(0)), "txt": b"cat"}),
                                      ("x/bad", {"png": b"junk", "txt": b"bad"}),
                                      ("x/dog", {"png": _encode(_image(2)), "txt": b"dog"})])
    ds = WebDatasetShards(str(tmp_path / "a.tar"), size=S)
    # The skipped sample keeps its position: dog stays id 2.
    assert ds.ids() == [0, 2] and ds.skip_summary()["id_rule"] == "position"
    assert ds.get(2).caption == "dog" and ds.key(2) == "a.tar:x/dog"


def test_duplicate_keys_across_shards(tmp_path):
    _write_shard(tmp_path / "a.tar", [_good(0), _good(1)])
    _write_shard(tmp_path / "b.tar", [_good(1, "again"), _good(2)])
    ds = WebDatasetShards(f"{tmp_path}/*.tar", size=S)
    assert ds.ids() == [0, 1, 2] and ds.caption(1) == "caption 1"
    assert ds.skipped == {"duplicate_key": 1}
    assert "b.tar:000000001" in ds.skip_summary()["examples"]["duplicate_key"][0]


def test_truncated_and_unreadable_shards(tmp_path):
    _write_shard(tmp_path / "00000.tar", [_good(i) for i in range(4)])
    data = (tmp_path / "00000.tar").read_bytes()
    # Cut inside the last sample's image data: its image runs past the end of the file.
    ds_full = WebDatasetShards(str(tmp_path / "00000.tar"), S)
    cut = ds_full._entries[3].offset + 10
    (tmp_path / "00001.tar").write_bytes(data[:cut])
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar file at all" * 40)
    (tmp_path / "00003.tar").write_bytes(b"")
    # Garbage after the first sample's members: the stream breaks off there.
    first_end = ds_full._entries[1].offset - 1024  # the header block before sample 1's png
    (tmp_path / "00004.tar").write_bytes(data[:first_end] + b"\x07" * 2048)
    ds = WebDatasetShards(f"{tmp_path}/00001.tar,{tmp_path}/0000[234].tar", S)
    s = ds.skip_summary()
    assert s["skipped"]["truncated_member"] == 1
    assert s["skipped"]["unreadable_shard"] == 2
    assert s["skipped"]["unreadable_tail"] == 2  # the cut shard and the garbage shard
    assert any(e.startswith("00004.tar@") for e in s["examples"]["unreadable_tail"])
    assert ds.ids() == [0, 1, 2]  # shard 1's first three samples; shard 4's sample 0 is a dup
    assert s["skipped"]["duplicate_key"] == 1
    # Cut at a header boundary after sample 1: no end-of-archive block.
    (tmp_path / "00005.tar").write_bytes(data[:ds_full._entries[2].offset - 512])
    cut_clean = WebDatasetShards(str(tmp_path / "00005.tar"), S)
    assert cut_clean.ids() == [0, 1] and cut_clean.skipped == {"unreadable_tail": 1}
    gz = tmp_path / "z.tar"
    gz.write_bytes(b"\x1f\x8b\x08" + b"\x00" * 100)
    with pytest.raises(DataError, match="gzip"):
        WebDatasetShards(str(gz), S)
    with pytest.raises(DataError, match="no usable samples.*unreadable_shard"):
        WebDatasetShards(str(tmp_path / "00002.tar"), S)


def test_limit_stops_indexing(two_shards):
    ds = WebDatasetShards(str(two_shards), S, limit=3)
    s = ds.skip_summary()
    assert ds.ids() == [0, 1, 2] and s["shards_read"] == 1 and not s["complete"]
    assert WebDatasetShards(str(two_shards), S, limit=4).skip_summary()["shards_read"] == 1
    assert WebDatasetShards(str(two_shards), S, limit=5).skip_summary()["shards_read"] == 2


def test_decode_matches_folder_reader(tmp_path):
    """Resize + centre crop of bytes is the folder reader's, pixel for pixel."""
    for shape, fmt in (((23, 41, 3), "JPEG"), ((50, 19, 3), "PNG"), ((S, S, 3), "PNG")):
        data = _encode(_image(7, *shape[:2]), fmt)
        f = tmp_path / f"x.{fmt.lower()}"
        f.write_bytes(data)
        np.testing.assert_array_equal(decode_image_bytes(data, S, "x"), load_image(f, S))
    with pytest.raises(DataError, match="where: not a decodable image"):
        decode_image_bytes(b"garbage", S, "where")


def test_open_dataset_cc3m(two_shards):
    cfg = load_config("ci", ["data.source=cc3m", f"data.data_dir={two_shards}/*.tar",
                             "data.image_size=16"])
    ds = open_dataset(cfg, n_needed=2)
    assert len(ds) == 7 and ds.get(0).image.shape == (16, 16, 3)  # limit 66 > 7
    assert shard_limit(100_000) == 105_064
    cfg.data.data_dir = None
    with pytest.raises(ConfigError, match="--data-dir"):
        open_dataset(cfg, n_needed=2)
