"""Data layer: records and content hashes, the synthetic data set, images, folders, manifests."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from t2i_mia.data import images as images_mod
from t2i_mia.data import synthetic
from t2i_mia.data.folder import ImageFolder, JsonlManifest, open_folder
from t2i_mia.data.images import load_image, save_png
from t2i_mia.data.records import Dataset, Record, content_hash, validate_record
from t2i_mia.data.synthetic import OBJECT_COLOURS, SHAPES, SyntheticCaptions
from t2i_mia.errors import DataError

# Pinned outputs of the generator: a change of a pixel anywhere (another machine, numpy or
# an edit of synthetic.py) changes these. Bump synthetic.GENERATOR_VERSION when intended.
PINNED = [
    (0, 32, 0, "7f05dd2adbb1b123e8f1447f9375422a60116d01453763b3706af1cd620620ee",
     "a small yellow circle above a large purple circle on a gray background"),
    (0, 32, 1, "d15ee0ace0d76e2da8141c4065425d22cf04c6cb833903a4da5784cf5a4f6814",
     "a large cyan cross below a large orange cross on a gray background"),
    (7, 32, 123, "78e797db38395da4fa48fa3f742cab4c81fb2fca8239c5815e9fdf881c466db5",
     "a purple square at the bottom right on a black background"),
    (0, 64, 0, "53179129e02811153cc17707d1a2eb65526973a1525424e2455f828128e15021",
     "a small yellow circle above a large purple circle on a gray background"),
]


# ----------------------------------------------------------------------------- records

def test_content_hash_definition():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    want = hashlib.sha256(b"2x3x3" + img.tobytes()).hexdigest()
    assert content_hash(img) == want
    # Shape is part of the hash: same bytes, other shape -> other hash.
    assert content_hash(img.reshape(3, 2, 3)) != want
    # Memory layout is not: a non-contiguous view hashes as its C-order copy.
    big = np.zeros((4, 3, 3), np.uint8)
    big[::2] = img
    assert content_hash(big[::2]) == want


def test_record_validation_and_immutability():
    img = np.zeros((4, 4, 3), np.uint8)
    r = Record(5, img, "a cat")
    assert r.sha256 == content_hash(img) and r.id == 5
    assert not r.image.flags.writeable and img.flags.writeable
    assert r == Record(5, img.copy(), "a cat", sha256=r.sha256)
    with pytest.raises(DataError, match="does not match"):
        Record(5, img, "a cat", sha256="0" * 64)
    bad = [
        (dict(id=1, image=img.astype(np.float32), caption="x"), "dtype float32"),
        (dict(id=1, image=img[:, :, 0], caption="x"), r"shape \[4, 4\]"),
        (dict(id=1, image=np.zeros((4, 4, 4), np.uint8), caption="x"), r"\[H, W, 3\]"),
        (dict(id=1, image=img, caption="   "), "caption is empty"),
        (dict(id=1, image=img, caption=3), "caption must be a string"),
        (dict(id=True, image=img, caption="x"), "id must be an integer"),
        (dict(id=-1, image=img, caption="x"), r"id must be in \[0, 2\*\*32\)"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(DataError, match=msg):
            validate_record(**kwargs, source="src.jsonl:3")
        with pytest.raises(DataError, match="src.jsonl:3"):
            validate_record(**kwargs, source="src.jsonl:3")


# ----------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("seed,size,i,digest,caption", PINNED)
def test_synthetic_pinned_hashes(seed, size, i, digest, caption):
    r = SyntheticCaptions(seed, size, n=1000).get(i)
    assert r.image.shape == (size, size, 3) and r.image.dtype == np.uint8
    assert r.caption == caption
    assert r.sha256 == digest


def test_synthetic_pinned_batch_digest():
    # Ids 0..63 cover every shape, colour, background and texture of the generator.
    d = SyntheticCaptions(0, 32, n=64)
    scenes = [synthetic._sample_scene(0, i) for i in range(64)]
    assert {o.shape for s in scenes for o in s.objects} == set(range(len(SHAPES)))
    assert {s.texture for s in scenes} == set(range(len(synthetic.TEXTURES)))
    digest = hashlib.sha256("".join(r.sha256 for r in d.records(range(64))).encode())
    assert digest.hexdigest() == \
        "d48097b904c2e6b9441cb15a6d8bfacbc55b043884ce188e2613cd2675874539"


def test_synthetic_deterministic_and_independent_of_n_and_order():
    a, b = SyntheticCaptions(3, n=50), SyntheticCaptions(3, n=4000)
    assert isinstance(a, Dataset) and len(a) == 50 and a.ids() == list(range(50))
    ids = [9, 2, 41, 0]
    imgs_a, caps_a = a.get_many(ids)
    imgs_b, caps_b = b.get_many(ids[::-1])
    np.testing.assert_array_equal(imgs_a, imgs_b[::-1])
    assert caps_a == caps_b[::-1]
    for k, i in enumerate(ids):
        r = b.get(i)
        np.testing.assert_array_equal(r.image, imgs_a[k])
        assert (r.caption, r.sha256) == (caps_a[k], content_hash(imgs_a[k]))
        assert a.caption(i) == caps_a[k]
    assert [r.sha256 for r in a.records(ids)] == [content_hash(x) for x in imgs_a]
    other, _ = SyntheticCaptions(4, n=50).get_many(ids)
    assert all(not np.array_equal(x, y) for x, y in zip(imgs_a, other))
    with pytest.raises(DataError, match="no record with id 50"):
        a.get(50)
    with pytest.raises(DataError, match="n must be an integer"):
        SyntheticCaptions(0, 32, n=-1)


def test_synthetic_captions_mostly_unique():
    caps = SyntheticCaptions(0, n=2000).captions(range(2000))
    assert len(set(caps)) / len(caps) >= 0.97
    assert all(c.endswith(" background") and c.split()[0] in ("a", "an") for c in caps)


def test_synthetic_same_caption_different_pixels():
    d = SyntheticCaptions(0, n=2000)
    first, pairs = {}, []
    for i, c in enumerate(d.captions(range(2000))):
        if c in first:
            pairs.append((first[c], i))
        first.setdefault(c, i)
    assert len(pairs) >= 3
    for i, j in pairs[:3]:
        x, y = d.get(i).image.astype(int), d.get(j).image.astype(int)
        assert np.abs(x - y).mean() > 5.0  # per-sample detail: positions, shades, texture


def test_synthetic_images_have_texture_and_named_colours():
    d = SyntheticCaptions(1, n=300)
    for i in range(300):
        scene = synthetic._sample_scene(1, i)
        img = d.image(i).astype(int)
        # Background texture: far more than one background colour in every image.
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 30
        for o in scene.objects:
            base = np.array(OBJECT_COLOURS[o.colour][1])
            if SHAPES[o.shape] != "ring":  # a ring's centre is background
                px = img[int(o.cy * 32), int(o.cx * 32)]
                # jitter <= 22, shading <= 20, plus anti-aliasing at a thin cross's edge
                assert np.abs(px - base).max() <= 50, (i, scene)
        if len(scene.objects) == 2:
            a, b = scene.objects
            dx, dy = a.cx - b.cx, a.cy - b.cy
            want = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else \
                ("above" if dy < 0 else "below")
            assert scene.relation == want and f" {want} " in d.caption(i)


def test_synthetic_larger_size_is_same_scene():
    small, large = SyntheticCaptions(2, 32, n=20), SyntheticCaptions(2, 64, n=20)
    for i in range(5):
        a, b = small.get(i), large.get(i)
        assert a.caption == b.caption and b.image.shape == (64, 64, 3)
        pooled = b.image.astype(float).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        assert np.abs(pooled - a.image).mean() < 6.0


# ----------------------------------------------------------------------------- images

def _png(path, arr):
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def test_load_image_resize_crop_and_modes(tmp_path):
    # 40 wide x 20 high: left quarter red, the rest blue. Shorter side -> 16, centre crop.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    out = load_image(_png(tmp_path / "wide.png", arr), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # After resizing to 32x16 the red quarter is columns 0..7; the crop starts at column 8.
    assert (out[:, 2:, 2] > 200).all() and (out[:, 2:, 0] < 30).all()
    same = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    np.testing.assert_array_equal(load_image(_png(tmp_path / "same.png", same), 16), same)
    Image.fromarray(np.full((8, 8), 77, np.uint8), mode="L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png", 8), np.full((8, 8, 3), 77))
    Image.fromarray(np.full((8, 8, 4), 9, np.uint8)).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png", 8), np.full((8, 8, 3), 9))


def test_load_image_bad_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    good = _png(tmp_path / "good.png", np.zeros((32, 32, 3)))
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name, msg in (("missing.png", "missing"), ("empty.png", "zero-byte"),
                      ("junk.png", "not a decodable image"), ("cut.png", "not a decodable")):
        with pytest.raises(DataError, match=msg) as e:
            load_image(tmp_path / name, 8)
        assert name in str(e.value)


def test_save_png_roundtrip_and_atomic(tmp_path, monkeypatch):
    img = np.random.default_rng(1).integers(0, 256, (8, 6, 3)).astype(np.uint8)
    path = tmp_path / "x.png"
    save_png(path, img)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    before = path.read_bytes()
    with pytest.raises(DataError, match="x.png"):
        save_png(path, img.astype(np.float32))

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(images_mod.Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(path, 255 - img)
    with pytest.raises(OSError, match="disk full"):
        save_png(tmp_path / "new.png", img)
    assert path.read_bytes() == before  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["x.png"]  # no temporary or half-written file


# ----------------------------------------------------------------------------- folders

def _folder(tmp_path, names=("b", "a", "c")):
    root = tmp_path / "imgs"
    root.mkdir()
    for k, n in enumerate(names):
        _png(root / f"{n}.png", np.full((20, 24, 3), 40 * k, np.uint8))
        (root / f"{n}.txt").write_text(f"  caption {n}\n", encoding="utf-8")
    return root


def test_image_folder_loads_sorted_ids(tmp_path):
    root = _folder(tmp_path)
    (root / "notes.md").write_text("ignored")
    d = ImageFolder(root, size=16)
    assert isinstance(d, Dataset) and len(d) == 3 and d.ids() == [0, 1, 2]
    assert d.captions([0, 1, 2]) == ["caption a", "caption b", "caption c"]
    imgs, caps = d.get_many([2, 0])
    assert imgs.shape == (2, 16, 16, 3) and caps == ["caption c", "caption a"]
    assert (imgs[0] == 80).all() and (imgs[1] == 40).all()  # c was drawn with 80, a with 40
    r = d.get(1)
    assert r.caption == "caption b" and r.sha256 == content_hash(r.image)
    assert d.name == "folder:imgs" and open_folder(root, 16).ids() == [0, 1, 2]


def test_image_folder_errors(tmp_path):
    root = _folder(tmp_path)
    (root / "a.txt").unlink()
    with pytest.raises(DataError, match=r"a\.png.*a\.txt is missing"):
        ImageFolder(root)
    (root / "a.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match=r"a\.txt: not valid UTF-8"):
        ImageFolder(root)
    (root / "a.txt").write_text(" \n ")
    with pytest.raises(DataError, match=r"a\.txt: caption is empty"):
        ImageFolder(root)
    (root / "a.txt").write_text("fine")
    (root / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"b\.png is a zero-byte file"):
        ImageFolder(root)
    (root / "b.png").write_bytes(b"garbage")
    d = ImageFolder(root)  # images are decoded lazily
    with pytest.raises(DataError, match=r"b\.png: not a decodable image"):
        d.get(1)
    _png(root / "a.jpg", np.zeros((4, 4, 3)))
    with pytest.raises(DataError, match=r"a\.(png|jpg).*a\.txt"):
        ImageFolder(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        ImageFolder(empty)
    with pytest.raises(DataError, match="not a folder"):
        ImageFolder(tmp_path / "nope")


def _manifest(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    return path


def test_manifest_loads_with_stable_ids(tmp_path):
    sub = tmp_path / "pics"
    sub.mkdir()
    for k in range(3):
        _png(sub / f"{k}.png", np.full((16, 16, 3), 10 * k, np.uint8))
    path = _manifest(tmp_path, [
        json.dumps({"image": "pics/0.png", "caption": "zero"}),
        "",
        json.dumps({"image": "pics/1.png", "caption": " one ", "id": 70}),
        json.dumps({"image": str(sub / "2.png"), "caption": "two"}),  # absolute path
        "",
    ])
    d = JsonlManifest(path, size=8)
    assert isinstance(d, Dataset) and d.ids() == [0, 3, 70]  # line numbers, explicit id
    assert d.captions([70, 3, 0]) == ["one", "two", "zero"]
    imgs, _ = d.get_many([3, 70])
    assert imgs.shape == (2, 8, 8, 3) and (imgs[0] == 20).all() and (imgs[1] == 10).all()
    assert d.get(0).caption == "zero" and d.name == "manifest:data.jsonl"
    assert open_folder(path, 8).ids() == [0, 3, 70]
    os.rename(path, tmp_path / "manifest.jsonl")
    assert open_folder(tmp_path, 8).ids() == [0, 3, 70]


def test_manifest_errors_name_file_and_line(tmp_path):
    _png(tmp_path / "ok.png", np.zeros((8, 8, 3)))
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    good = json.dumps({"image": "ok.png", "caption": "fine"})
    cases = [
        (b'{"image": "ok.png", "caption": "caf\xe9"}', "not valid UTF-8"),
        ('{"image": "ok.png", "caption": ', "invalid JSON"),
        ('["ok.png", "x"]', "expected a JSON object"),
        ('{"caption": "x"}', "missing key 'image'"),
        ('{"image": "ok.png"}', "missing key 'caption'"),
        ('{"image": "ok.png", "caption": "  "}', "caption is empty"),
        ('{"image": "ok.png", "caption": 5}', "caption must be a string"),
        ('{"image": "gone.png", "caption": "x"}', "'gone.png' not found"),
        ('{"image": "zero.png", "caption": "x"}', "zero-byte file"),
        ('{"image": "ok.png", "caption": "x", "id": 0}', r"duplicate id 0 \(already used "
                                                         r"on line 1\)"),
        ('{"image": "ok.png", "caption": "x", "Id": 4}', r"unknown key\(s\) \['Id'\]"),
        ('{"image": "ok.png", "caption": "x", "id": true}', "'id' must be an integer"),
        ('{"image": "ok.png", "caption": "x", "id": 1.5}', "'id' must be an integer"),
    ]
    for line, msg in cases:
        path = _manifest(tmp_path, [good, line])
        with pytest.raises(DataError, match=msg) as e:
            JsonlManifest(path)
        assert f"{path}:2" in str(e.value), str(e.value)
    # A corrupt image is found when it is decoded; the error still names FILE:LINE.
    d = JsonlManifest(_manifest(tmp_path, [good, '{"image": "junk.png", "caption": "x"}']))
    with pytest.raises(DataError) as e:
        d.get_many([0, 1])
    assert f"{tmp_path / 'data.jsonl'}:2" in str(e.value) and "junk.png" in str(e.value)
    assert "not a decodable image" in str(e.value)
    with pytest.raises(DataError, match="no entries"):
        JsonlManifest(_manifest(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="missing"):
        JsonlManifest(tmp_path / "absent.jsonl")
