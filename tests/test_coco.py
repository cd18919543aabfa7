"""MS-COCO through TFDS: mocked coco_captions (no download) and a tiny prepared TFDS set.

``tfds.testing.mock_data`` stands in for coco_captions itself (its real feature spec, random
examples). A tiny builder with coco_captions's features, prepared in the test as
array_record and as TFRecord, checks the real read path, the caption rule, split syntax and
the TFRecord error.
"""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds  # in [test]: a missing install fails here, not a skip
from PIL import Image

from t2i_mia.config import load_config
from t2i_mia.data.coco import DEFAULT_SPLIT, TfdsCaptions, first_caption
from t2i_mia.data.records import Dataset, content_hash
from t2i_mia.data.sources import open_dataset
from t2i_mia.data.webdataset import decode_image_bytes
from t2i_mia.errors import ConfigError, DataError

S = 16


def _raw_caption(ex) -> str:
    for t in np.asarray(ex["captions"]["text"], dtype=object).reshape(-1).tolist():
        t = t.decode() if isinstance(t, bytes) else str(t)
        if t.strip():
            return t.strip()
    raise AssertionError("no caption")


def test_mock_coco_captions_without_download():
    with tfds.testing.mock_data(num_examples=6):
        ds = TfdsCaptions("coco_captions", "train", data_dir=None, size=S)
        raw = tfds.data_source("coco_captions", split="train", download=False)
        assert isinstance(ds, Dataset)
        assert ds.name == "tfds:coco_captions/2014/1.1.0/train"
        assert len(ds) == 6 and ds.ids() == list(range(6))
        images, captions = ds.get_many([4, 0, 4])
        assert images.shape == (3, S, S, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[0], images[2])
        assert captions == [_raw_caption(raw[4]), _raw_caption(raw[0]), _raw_caption(raw[4])]
        # The mock's random image sizes exercise resize + crop.
        assert any(raw[i]["image"].shape != (S, S, 3) for i in range(6))
        for i in range(6):
            r = ds.get(i)
            src = raw[i]["image"]
            png = io.BytesIO()
            Image.fromarray(src).save(png, format="PNG")
            np.testing.assert_array_equal(r.image, decode_image_bytes(png.getvalue(), S))
            assert r.caption == _raw_caption(raw[i])
        assert ds.get(4).sha256 == content_hash(images[0])  # the same pixels every read
        # open_dataset routes --data coco here, with the default split.
        cfg = load_config("ci", ["data.source=coco", "data.image_size=16"])
        assert cfg.data.tfds_split == DEFAULT_SPLIT
        via = open_dataset(cfg, n_needed=6)
        assert isinstance(via, TfdsCaptions) and len(via) == 6
        assert via.get(2) == ds.get(2)
        with pytest.raises(DataError, match=r"no record with id 6 \(ids are 0\.\.5\)"):
            ds.get(6)


def test_unknown_tfds_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.tfds_name.*'coco_captionz'.*did you mean "
                                          r"coco_captions"):
        TfdsCaptions("coco_captionz", "train")
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ConfigError, match="data.tfds_name"):
            TfdsCaptions("no_such_dataset_anywhere", "train")


def test_dataset_without_captions_is_refused(tmp_path):
    # mnist's builder is code only here: nothing is read or downloaded before the check.
    with pytest.raises(DataError, match=r"'mnist'.*'image' and 'captions'.*\['image', "
                                        r"'label'\]"):
        TfdsCaptions("mnist", "train", data_dir=str(tmp_path))


def test_first_caption_rule():
    assert first_caption([b"  ", b"\xff\xfe", b" a dog \n", b"a cat"], "x") == "a dog"
    assert first_caption(np.array(["", "b", "a"]), "x") == "b"
    with pytest.raises(DataError, match="x: no usable caption"):
        first_caption([b" ", b"\xe9"], "x")
    with pytest.raises(DataError, match="no usable caption"):
        first_caption([], "x")


# ----------------------------------------------------------------------------- prepared

def _image(i: int) -> np.ndarray:
    h, w = (S, S) if i % 3 == 0 else (S + 3 * i, S + 5)
    return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _captions(i: int) -> list[dict]:
    if i == 8:
        return [{"text": " ", "id": 80}, {"text": "", "id": 81}]  # no usable caption
    return [{"text": "   ", "id": 10 * i}, {"text": f" photo {i} ", "id": 10 * i + 1},
            {"text": f"other {i}", "id": 10 * i + 2}]


class T2iMiaTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """coco_captions's features (image, image/id, image/filename, captions{text, id})."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"),
            "image/id": np.int64,
            "image/filename": tfds.features.Text(),
            "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(0, 6)),
                "restval": self._generate_examples(range(6, 9))}

    def _generate_examples(self, ids):
        for i in ids:
            yield i, {"image": _image(i), "image/id": 1000 + i,
                      "image/filename": f"COCO_{i:012d}.jpg", "captions": _captions(i)}


NAME = "t2i_mia_tiny_captions"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{file format: TFDS data dir} with the tiny set prepared in each format."""
    dirs = {}
    for fmt in ("array_record", "tfrecord"):
        d = str(tmp_path_factory.mktemp(fmt))
        T2iMiaTinyCaptions(data_dir=d, file_format=fmt).download_and_prepare()
        dirs[fmt] = d
    return dirs


def test_reads_prepared_array_record(prepared):
    d = prepared["array_record"]
    raw = tfds.data_source(NAME, split="train+restval", data_dir=d, download=False)
    ds = TfdsCaptions(NAME, "train+restval", data_dir=d, size=S)
    assert ds.name == f"tfds:{NAME}/1.0.0/train+restval" and len(ds) == 9
    seen = set()
    for idx in ds.ids():
        i = int(raw[idx]["image/id"]) - 1000
        seen.add(i)
        if i == 8:
            with pytest.raises(DataError, match=rf"\[{idx}\]: no usable caption"):
                ds.get(idx)
            continue
        r = ds.get(idx)
        assert r.caption == f"photo {i}"  # first non-blank caption, stripped
        if i % 3 == 0:
            np.testing.assert_array_equal(r.image, _image(i))  # S x S: exact pixels
        else:
            png = io.BytesIO()
            Image.fromarray(_image(i)).save(png, format="PNG")
            np.testing.assert_array_equal(r.image, decode_image_bytes(png.getvalue(), S))
    assert seen == set(range(9))
    ok = [k for k in ds.ids() if int(raw[k]["image/id"]) != 1008]
    images, captions = ds.get_many(ok[::-1])
    assert images.shape == (8, S, S, 3) and captions == [ds.caption(k) for k in ok[::-1]]
    # Split syntax and ids: the index within the split string's records.
    assert len(TfdsCaptions(NAME, "train[:50%]", data_dir=d, size=S)) == 3
    with pytest.raises(DataError, match=r"data\.tfds_split.*'nope'.*Unknown split"):
        TfdsCaptions(NAME, "nope", data_dir=d, size=S)


def test_tfrecord_data_says_how_to_rebuild(prepared):
    d = prepared["tfrecord"]
    with pytest.raises(DataError, match=r"prepared as tfrecord.*--file_format=array_record"
                                        r".*tfds convert_format"):
        TfdsCaptions(NAME, "train", data_dir=d, size=S)


def test_unprepared_data_is_not_downloaded(tmp_path):
    with pytest.raises(DataError, match=r"not prepared in .*never downloads.*tfds build "
                                        r"coco_captions --data_dir .* "
                                        r"--file_format=array_record"):
        TfdsCaptions("coco_captions", "train", data_dir=str(tmp_path), size=S)
    assert list(tmp_path.iterdir()) == []
