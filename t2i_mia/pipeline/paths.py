"""Where a run reads and writes: the entry points fill it from their flags."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RunPaths:
    """work_dir: the model cache (trained models, checkpoints); out: the results folder;
    target_dir: a checkpoint to audit (None = train one); data_dir: the data source's folder."""
    work_dir: str
    out: str
    target_dir: str | None
    data_dir: str | None
    shadow_dir: str | None = None  # explicit sets, aux_mode shadow: the user's shadow model
    null_target_dir: str | None = None  # explicit sets: a model that never saw the members
