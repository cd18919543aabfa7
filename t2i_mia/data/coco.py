"""MS-COCO (and other captioned TFDS sets) through tensorflow-datasets, by random access.

Reader: ``tfds`` ``DatasetBuilder.as_data_source`` (what ``tfds.data_source`` calls) over
data prepared as **array_record**. Why this and not tf.data or grain:

- The audit addresses records by stable integer id (``records.Dataset``: ``get(id)``,
  ``get_many(ids)``) and touches a seeded subset of them; array_record is the TFDS format
  with O(1) random access by record index, so ``get(i)`` reads one record. tf.data over
  TFRecord only streams: random access would mean scanning or caching the whole set.
- TensorFlow does no work while reading: TFDS decodes the JPEG with PIL (or OpenCV) and
  array_record reads the bytes. TF is still installed with the ``coco`` extra because
  TFDS's coco builder code imports it, and ``tfds build`` needs it to prepare the data.
  (Checked: tensorflow-cpu 2.21 and tensorflow-datasets 4.9.10 install next to jax 0.10.2
  and numpy 2.4 without changing either, and both frameworks run in one process.)
- grain would add a loader (shuffling, batching, worker processes) on top of the same
  ``ArrayRecordDataSource``; the audit's splits, batching and sharding are its own, so the
  data source alone is enough and grain is not a dependency.

Preparing (once, with network; the audit never downloads)::

    pip install 't2i-mia[coco]'
    tfds build coco_captions --data_dir DIR --file_format=array_record

then ``--data coco --data-dir DIR`` (``data.data_dir`` is the TFDS data dir; unset: TFDS's
default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Data prepared as TFRecord (TFDS's
default file format) is a DataError that says how to rebuild or convert it.

Records:

- ``data.tfds_name`` (default ``coco_captions``: MS-COCO 2014 with the Karpathy splits) may
  carry a config and version (``coco_captions/2014:1.1.0``); any TFDS set whose features
  hold ``image`` and ``captions`` (a sequence with ``text``) works. An unknown name is a
  ConfigError naming the key and the closest registered names.
- ``data.tfds_split`` (default ``train+restval+val+test``: all 123,287 images, since the
  audit draws its own members and non-members) takes TFDS split syntax (``train[:50%]``).
- Stable id = the record's index in that split (TFDS fixes the order of a prepared dataset
  version), so ids change only with the name, version or split string, all of which go into
  the data set's ``name`` (and so into the split manifest).
- Caption: the first caption, in stored order, that is valid UTF-8 and not blank after
  stripping (TFDS keeps the order of the annotation file; for coco_captions the Karpathy
  ``sentences`` order, i.e. ascending sentence id). The same record always gets the same
  caption. A record with no such caption is a DataError naming it.
- Image: converted to RGB, shorter side resized to ``data.image_size`` (BICUBIC) and the
  centre square cropped, with the same rule as the folder reader
  (``images.fit_square``).
"""

from __future__ import annotations

import difflib
import os
from typing import Sequence

import numpy as np
from PIL import Image

from t2i_mia.data.records import Record
from t2i_mia.data.images import fit_square
from t2i_mia.errors import ConfigError, DataError

DEFAULT_NAME = "coco_captions"
DEFAULT_SPLIT = "train+restval+val+test"
INSTALL_HINT = "pip install 't2i-mia[coco]'"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"--data coco reads TFDS data and needs tensorflow-datasets and "
                        f"array-record ({INSTALL_HINT}); import failed: {e}") from e
    return tfds


def _root(data_dir: str | None) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def _builder(tfds, name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises ValueError/AssertionError/... here
        base = name.split("/")[0].split(":")[0]
        near = difflib.get_close_matches(base, tfds.list_builders(), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config key 'data.tfds_name': TFDS has no dataset {name!r}{hint}; "
                          f"{first}") from e


def _check_features(builder, name: str) -> None:
    features = builder.info.features
    keys = sorted(features.keys()) if hasattr(features, "keys") else []
    ok = "image" in keys and "captions" in keys
    if ok:
        caps = features["captions"]
        inner = getattr(caps, "feature", caps)
        ok = hasattr(inner, "keys") and "text" in inner.keys()
    if not ok:
        raise DataError(f"TFDS dataset {name!r}: expected features 'image' and 'captions' "
                        f"(a sequence with 'text'), as in coco_captions; it has {keys}")


def _data_source(builder, name: str, split: str, data_dir: str | None):
    try:
        return builder.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001 - diagnosed below, re-raised as a DataError
        err = e
    root = _root(data_dir)
    build = f"tfds build {name} --data_dir {root} --file_format=array_record"
    if not builder.is_prepared():
        raise DataError(f"TFDS dataset {name!r} is not prepared in {root} (looked for "
                        f"{builder.data_dir}); the audit never downloads. Prepare it once "
                        f"with network access ({INSTALL_HINT}): {build}") from err
    formats = {getattr(f, "value", str(f)) for f in builder.info.available_file_formats()}
    if not formats & {"array_record", "parquet"}:
        raise DataError(
            f"TFDS dataset {name!r} at {builder.data_dir} is prepared as "
            f"{', '.join(sorted(formats)) or 'an unknown format'}, which has no random "
            f"access; rebuild it with --file_format=array_record ({build}) or convert it in "
            f"place (tfds convert_format --dataset_version_dir {builder.data_dir} "
            f"--out_file_format array_record)") from err
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise DataError(f"TFDS dataset {name!r}, config key 'data.tfds_split' = {split!r}: "
                    f"{first}") from err


def _text(value) -> str | None:
    """A caption value from TFDS (bytes, str or numpy str) -> stripped str, or None."""
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    elif isinstance(value, (str, np.str_)):
        value = str(value)
    else:
        return None
    value = value.strip()
    return value or None


def first_caption(texts, where: str) -> str:
    """The first caption in ``texts`` that is valid UTF-8 and not blank (stripped)."""
    for t in np.asarray(texts, dtype=object).reshape(-1).tolist():
        text = _text(t)
        if text is not None:
            return text
    raise DataError(f"{where}: no usable caption (every caption is missing, blank or not "
                    f"UTF-8)")


def _to_rgb(image, where: str) -> Image.Image:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
        raise DataError(f"{where}: expected a uint8[H, W, C] image, got "
                        f"{arr.dtype}{list(arr.shape)}")
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        elif arr.shape[2] not in (3, 4):
            raise DataError(f"{where}: expected 1, 3 or 4 channels, got {arr.shape[2]}")
    return Image.fromarray(np.ascontiguousarray(arr))


class TfdsCaptions:
    """A captioned TFDS set (MS-COCO by default) as a ``records.Dataset`` (see module doc).

    ``name``/``split``: TFDS dataset name and split; ``data_dir``: the TFDS data dir (None:
    TFDS's default); ``size``: images are uint8[size, size, 3].
    """

    def __init__(self, name: str = DEFAULT_NAME, split: str = DEFAULT_SPLIT,
                 data_dir: str | os.PathLike | None = None, size: int = 32):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"config key 'data.tfds_name': expected a TFDS name, got {name!r}")
        if not isinstance(split, str) or not split.strip():
            raise ConfigError(f"config key 'data.tfds_split': expected a TFDS split, got "
                              f"{split!r}")
        data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
        tfds = _import_tfds()
        builder = _builder(tfds, name, data_dir)
        _check_features(builder, name)
        self._source = _data_source(builder, name, split, data_dir)
        self._n = len(self._source)
        self.tfds_name, self.split, self.data_dir = name, split, data_dir
        self.image_size = int(size)
        self.name = f"tfds:{builder.info.full_name}/{split}"
        if self._n == 0:
            raise DataError(f"{self.name}: the split is empty")

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"TfdsCaptions({self.name!r}, size={self.image_size}, n={len(self)})"

    def ids(self) -> list[int]:
        return list(range(self._n))

    def _example(self, id: int) -> tuple[np.ndarray, str]:
        try:
            i = int(id)
        except (TypeError, ValueError):
            raise DataError(f"{self.name}: no record with id {id!r}") from None
        if not 0 <= i < self._n or isinstance(id, bool):
            raise DataError(f"{self.name}: no record with id {id!r} (ids are 0..{self._n - 1})")
        where = f"{self.name}[{i}]"
        try:
            ex = self._source[i]
        except Exception as e:  # noqa: BLE001 - a corrupt record, whatever TFDS raises
            raise DataError(f"{where}: could not be read ({type(e).__name__}: {e})") from e
        try:
            texts = ex["captions"]["text"]
            image = ex["image"]
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: missing feature {e} (expected 'image' and "
                            f"'captions/text')") from e
        caption = first_caption(texts, where)
        return fit_square(_to_rgb(image, where), self.image_size), caption

    def caption(self, id: int) -> str:
        return self._example(id)[1]

    def get(self, id: int) -> Record:
        image, caption = self._example(id)
        image.flags.writeable = False  # fresh array: the Record keeps it without a copy
        return Record(int(id), image, caption)

    def get_many(self, ids: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        out = np.empty((len(ids), self.image_size, self.image_size, 3), np.uint8)
        captions = []
        for k, i in enumerate(ids):
            out[k], caption = self._example(i)
            captions.append(caption)
        return out, captions
