"""The configured data source as a Dataset (``data.source`` -> reader)."""

from __future__ import annotations

from t2i_mia.config import Config
from t2i_mia.errors import ConfigError


def open_dataset(cfg: Config, n_needed: int):
    """A Dataset (see ``records.Dataset``) for ``cfg.data.source``.

    ``n_needed``: how many examples the splits take (the synthetic set draws a little more).
    """
    src = cfg.data.source
    if src == "synthetic":
        from t2i_mia.data.synthetic import SyntheticCaptions
        # A little slack: exact-duplicate scenes (rare) are dropped before split assignment.
        return SyntheticCaptions(seed=cfg.seed, size=cfg.data.image_size,
                                 n=int(n_needed * 1.02) + 16)
    if src == "folder":
        from t2i_mia.data.folder import open_folder
        return open_folder(cfg.data.data_dir, cfg.data.image_size)
    raise ConfigError(f"config key 'data.source': '{src}' (MS-COCO / CC3M readers) is not "
                      "built in this version; use synthetic or folder")
