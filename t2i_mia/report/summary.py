"""Across seeds: ``summary.json`` and ``summary.md`` from the reports of independent audits.

``python -m t2i_mia.attack --seeds 0,1,2`` runs one audit per seed (new splits, models,
shadows, references and attack fits) into ``OUT/seed_<s>/`` and summarises them here. A
report's CIs cover the sampling of its evaluation set; the spread over seeds adds the
randomness of the splits and of every training run, which is what a reader needs to judge
whether a difference between two attacks or two models is real.

summary.json::

    {schema_version: 1, seeds: [s, ...], reports: ["seed_<s>/report.json", ...],
     rows: {<row>: {<metric>: {mean, sd, min, max, values: [...]}}}}

Rows: every attack MLP (``pixel``, ..., ``combined``), every calibrated score
(``calibrated.<feature>``), the white-box reference if present, and the controls
(``control.null_target``, ``control.shuffled_labels``). Metrics: ``auc`` and
``tpr_at_fpr_1e-2`` (and, for attacks, the held-out 1% threshold's TPR and realised FPR).
A metric that is unmeasurable in any seed is ``null``. ``sd`` is the sample standard deviation
(ddof 1).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from t2i_mia.errors import DataError
from t2i_mia.report.writer import markdown_table, write_text_atomic

SUMMARY_SCHEMA_VERSION = 1
_ATTACK_METRICS = ("auc", "tpr_at_fpr_1e-2", "tpr_at_heldout_threshold_1e-2",
                   "realised_fpr_at_heldout_threshold_1e-2")


def _rows(report: Mapping) -> dict[str, Mapping]:
    rows = {}
    for name, block in report["attacks"].items():
        if "mlp" in block:
            rows[name] = block["mlp"]
        else:
            rows.update(block["threshold"])
    wb = report.get("white_box_reference")
    if isinstance(wb, Mapping) and isinstance(wb.get("threshold"), Mapping):
        rows["white_box_reference"] = wb["threshold"]
    for name, c in report["controls"].items():
        rows[f"control.{name}"] = c
    return rows


def _stats(values: list) -> dict | None:
    if any(v is None for v in values):
        return None
    v = np.asarray(values, np.float64)
    sd = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "min": float(v.min()), "max": float(v.max()),
            "values": [float(x) for x in v]}


def summarise(reports: Sequence[Mapping], seeds: Sequence[int],
              paths: Sequence[str]) -> dict:
    """The summary dict of one report per seed (same config apart from the seed)."""
    if len(reports) != len(seeds) or not reports:
        raise DataError(f"summary: {len(reports)} reports for {len(seeds)} seeds")
    per = [_rows(r) for r in reports]
    names = list(per[0])
    for s, rows in zip(seeds, per):
        if list(rows) != names:
            raise DataError(f"summary: the report of seed {s} has rows {sorted(rows)}, the "
                            f"first has {sorted(names)}; summarise audits of one config only")
    out = {}
    for name in names:
        metrics = ("auc",) if name.startswith("control.") else _ATTACK_METRICS
        out[name] = {m: _stats([rows[name].get(m) for rows in per]) for m in metrics
                     if m in per[0][name]}
    return {"schema_version": SUMMARY_SCHEMA_VERSION, "seeds": [int(s) for s in seeds],
            "reports": list(paths), "rows": out}


def _cell(st: Mapping | None) -> str:
    if st is None:
        return "n/a"
    return f"{st['mean']:.3f} ± {st['sd']:.3f} ({st['min']:.3f}-{st['max']:.3f})"


def format_summary(summary: Mapping, first: Mapping) -> str:
    """summary.md: mean ± sd (min-max) over seeds per row."""
    n = first["n_eval"]
    rows = []
    for name, metrics in summary["rows"].items():
        rows.append([f"`{name}`", _cell(metrics.get("auc")),
                     _cell(metrics.get("tpr_at_fpr_1e-2")) if not name.startswith("control.")
                     else "", _cell(metrics.get("tpr_at_heldout_threshold_1e-2")),
                     _cell(metrics.get("realised_fpr_at_heldout_threshold_1e-2"))])
    seeds = ", ".join(str(s) for s in summary["seeds"])
    return "\n".join([
        f"# Membership inference audit over {len(summary['seeds'])} seeds: "
        f"{first['target']} on {first['data']}", "",
        f"Seeds {seeds}: each an independent audit (its own splits, target, shadow, "
        f"reference and null models, attack fits) of {n['members']} members vs "
        f"{n['nonmembers']} non-members, k = {first['k']}; reports in "
        + ", ".join(f"`{p}`" for p in summary["reports"]) + ".", "",
        markdown_table(["row", "AUC", "TPR@1%FPR, ROC", "held-out 1%: TPR", "held-out 1%: FPR"], rows),
        "",
        "Each cell: mean ± sample sd over seeds (min-max). The spread covers the randomness "
        "of the splits and of every model's training as well as evaluation sampling; a "
        "single report's CIs cover evaluation sampling only.", ""])


def write_summary(out_dir: str, reports: Sequence[Mapping], seeds: Sequence[int]) -> dict:
    """Writes ``summary.json`` and ``summary.md`` into ``out_dir`` (atomic); returns the dict."""
    paths = [f"seed_{s}/report.json" for s in seeds]
    summary = summarise(reports, seeds, paths)
    text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if not all(math.isfinite(v) for row in summary["rows"].values() for st in row.values()
               if st for v in st["values"]):
        raise DataError("summary: a non-finite value")
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(os.path.join(out_dir, "summary.md"), format_summary(summary, reports[0]))
    write_text_atomic(os.path.join(out_dir, "summary.json"), text)
    return summary
