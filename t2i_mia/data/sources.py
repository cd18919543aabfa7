"""The configured data source as a Dataset (``data.source`` -> reader).

- ``synthetic``: the embedded captioned scenes (``data.synthetic``);
- ``folder``: images + ``.txt`` captions or a JSONL manifest (``data.folder``);
- ``coco``: a captioned TFDS set prepared as array_record, MS-COCO by default
  (``data.coco``; ``data.tfds_name``, ``data.tfds_split``, ``data.data_dir`` = TFDS data dir);
- ``cc3m``: webdataset ``.tar`` shards in img2dataset layout (``data.webdataset``;
  ``data.data_dir`` = shard paths / globs / brace patterns, comma-separated).

Nothing here downloads: coco needs data prepared beforehand, cc3m needs the shards.
"""

from __future__ import annotations

import logging

from t2i_mia.config import Config
from t2i_mia.data.coco import TfdsCaptions
from t2i_mia.data.folder import open_folder
from t2i_mia.data.synthetic import SyntheticCaptions
from t2i_mia.data.webdataset import WebDatasetShards
from t2i_mia.errors import ConfigError

log = logging.getLogger("t2i_mia")

# Webdataset sets are indexed only as far as the splits need; the slack covers samples that
# make_splits drops as exact duplicates (web crawls repeat images).
SHARD_SLACK = 0.05
SHARD_SLACK_MIN = 64


def shard_limit(n_needed: int) -> int:
    """How many good samples to index from webdataset shards for ``n_needed`` examples."""
    return int(n_needed * (1 + SHARD_SLACK)) + SHARD_SLACK_MIN


def open_dataset(cfg: Config, n_needed: int):
    """A Dataset (see ``records.Dataset``) for ``cfg.data.source``.

    ``n_needed``: how many examples the splits take (the synthetic set draws a little more;
    webdataset shards are indexed up to :func:`shard_limit` of it).
    """
    src = cfg.data.source
    if src == "synthetic":
        # A little slack: exact-duplicate scenes (rare) are dropped before split assignment.
        return SyntheticCaptions(seed=cfg.seed, size=cfg.data.image_size,
                                 n=int(n_needed * 1.02) + 16)
    if src == "folder":
        return open_folder(cfg.data.data_dir, cfg.data.image_size)
    if src == "coco":
        ds = TfdsCaptions(cfg.data.tfds_name, cfg.data.tfds_split, cfg.data.data_dir,
                          cfg.data.image_size)
        log.info("data: %s, %d records", ds.name, len(ds))
        return ds
    if src == "cc3m":
        if not cfg.data.data_dir:
            raise ConfigError("config key 'data.data_dir': --data cc3m needs --data-dir, the "
                              "webdataset .tar shards (paths, globs or {00000..00331} "
                              "patterns, comma-separated)")
        ds = WebDatasetShards(cfg.data.data_dir, cfg.data.image_size,
                              limit=shard_limit(n_needed))
        s = ds.skip_summary()
        log.info("data: %s, %d samples kept of %d seen in %d/%d shards; skipped: %s", ds.name,
                 s["kept"], s["samples_seen"], s["shards_read"], s["shards"],
                 s["skipped"] or "none")
        return ds
    raise ConfigError(f"config key 'data.source': expected one of synthetic, folder, coco, "
                      f"cc3m, got {src!r}")
