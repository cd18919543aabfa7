"""Results tables in the docs, generated from report files (never typed by hand).

A generated table sits between two marker lines in a markdown file::

    <!-- t2i-mia:table NAME -->
    ...
    <!-- t2i-mia:end NAME -->

``python -m t2i_mia.report.tables FILE NAME=PATH [NAME=PATH ...]`` rewrites each named block
of FILE from PATH: a ``report.json`` (one audit: the attack MLPs, two calibrated scores,
the white-box reference and the controls; report.md has every row) or a ``summary.json``
(``--seeds``: mean ± sd over seeds). :func:`check_block` compares a committed block with a
fresh report (tests/test_audit.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from typing import Mapping

from t2i_mia.adversary.features import ATTACK_NAMES
from t2i_mia.errors import DataError
from t2i_mia.report.writer import markdown_table, write_text_atomic

_BEGIN = "<!-- t2i-mia:table {} -->"
_END = "<!-- t2i-mia:end {} -->"
_MLPS = ATTACK_NAMES


def _ci(v, ci) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def report_table(report: Mapping) -> str:
    """Attack MLPs (AUC, null-target AUC, ROC TPR@1%, held-out 1% TPR / FPR), the white-box
    reference and the controls of one report."""
    rows = []
    for name in _MLPS:
        m = report["attacks"][name]["mlp"]
        held = m["tpr_at_heldout_threshold_1e-2"]
        rows.append([name, _ci(m["auc"], m["auc_ci"]),
                     _ci(m["null_target"]["auc"], m["null_target"]["auc_ci"]),
                     _ci(m["tpr_at_fpr_1e-2"], m["tpr_at_fpr_1e-2_ci"]),
                     "n/a" if held is None else
                     f"{held:.3f} / {m['realised_fpr_at_heldout_threshold_1e-2']:.3f}"])
    cal = report["attacks"].get("calibrated")
    if cal:
        for feat in ("calibrated.pixel.mse.min", "calibrated.semantic.cosine.max"):
            if feat in cal["threshold"]:
                m = cal["threshold"][feat]
                held = m["tpr_at_heldout_threshold_1e-2"]
                rows.append([f"calibrated `{feat[len('calibrated.'):]}` (threshold)",
                             _ci(m["auc"], m["auc_ci"]),
                             _ci(m["null_target"]["auc"], m["null_target"]["auc_ci"]),
                             _ci(m["tpr_at_fpr_1e-2"], m["tpr_at_fpr_1e-2_ci"]),
                             "n/a" if held is None else
                             f"{held:.3f} / {m['realised_fpr_at_heldout_threshold_1e-2']:.3f}"])
    wb = report.get("white_box_reference")
    if wb:
        m = wb["threshold"]
        rows.append(["white-box loss (reference, outside the threat model)",
                     _ci(m["auc"], m["auc_ci"]), "", _ci(m["tpr_at_fpr_1e-2"], None), ""])
    c = report["controls"]
    rows.append([f"control `null_target` (alarm: {'YES' if c['null_target']['alarm'] else 'no'})",
                 _ci(c["null_target"]["auc"], c["null_target"]["auc_ci"]), "", "", ""])
    s = c["shuffled_labels"]
    rows.append([f"control `shuffled_labels` ({len(s['per_shuffle_auc'])} shuffles)",
                 _ci(s["auc"], s["auc_ci"]), "", "", ""])
    b = c.get("blind")
    if b and "absent" not in b:
        rows.append([f"control `blind`, query only (alarm: {'YES' if b['alarm'] else 'no'})",
                     _ci(b["auc"], b["auc_ci"]), "", "", ""])
    return markdown_table(["attack", "AUC [95% CI]", "null target AUC", "TPR@1%FPR, ROC",
                           "held-out 1%: TPR / FPR"], rows)


def summary_table(summary: Mapping) -> str:
    """Mean ± sd (min-max) over seeds of the attack MLPs' and controls' AUC and TPR@1%."""
    def cell(st):
        return "n/a" if st is None else f"{st['mean']:.3f} ± {st['sd']:.3f} " \
                                        f"({st['min']:.3f}-{st['max']:.3f})"
    rows = []
    for name, metrics in summary["rows"].items():
        if name in _MLPS or name.startswith("control.") or name == "white_box_reference" \
                or name in ("calibrated.pixel.mse.min", "calibrated.semantic.cosine.max"):
            rows.append([f"`{name}`", cell(metrics.get("auc")),
                         cell(metrics.get("tpr_at_fpr_1e-2")) if "tpr_at_fpr_1e-2" in metrics
                         else ""])
    seeds = ", ".join(map(str, summary["seeds"]))
    return (f"Seeds {seeds}; mean ± sd (min-max) over seeds.\n\n"
            + markdown_table(["row", "AUC", "TPR@1%FPR, ROC"], rows))


def render(doc: Mapping) -> str:
    """A block's text from a report.json or summary.json document."""
    if "rows" in doc and "seeds" in doc and "attacks" not in doc:
        return summary_table(doc)
    return report_table(doc)


def _span(text: str, name: str, where: str) -> tuple[int, int]:
    b, e = _BEGIN.format(name), _END.format(name)
    i, j = text.find(b), text.find(e)
    if i < 0 or j < i:
        raise DataError(f"{where}: no generated block '{name}' (expected the lines {b} ... {e})")
    return i + len(b), j


def read_block(text: str, name: str, where: str = "document") -> str:
    i, j = _span(text, name, where)
    return text[i:j].strip("\n")


def replace_block(text: str, name: str, body: str, where: str = "document") -> str:
    i, j = _span(text, name, where)
    return text[:i] + "\n" + body.strip("\n") + "\n" + text[j:]


_NUM = re.compile(r"-?\d+\.\d+")


def machine_tag() -> str:
    """The CPU a table was generated on, as far as XLA's CPU code generation cares: the model
    name and whether AVX-512 is there (XLA targets the host's vector units, so another
    instruction set can round differently)."""
    if not os.path.isfile("/proc/cpuinfo"):  # not Linux: the platform's processor string
        return f"{platform.processor() or platform.machine()}; avx512f=unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        lines = f.read().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 platform.machine())
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    return f"{model}; avx512f={'yes' if ' avx512f' in flags else 'no'}"


def read_machine(text: str, name: str) -> str | None:
    """The machine tag recorded next to a block: ``<!-- t2i-mia:machine NAME TAG -->``."""
    m = re.search(r"<!-- t2i-mia:machine " + re.escape(name) + r" (.*?) -->", text)
    return m.group(1) if m else None


def check_block(committed: str, fresh: str, tol: float | None) -> list[str]:
    """Differences between a committed block and a freshly rendered one: the text outside
    the numbers must be equal, and each number within ``tol`` (None: the numbers are not
    compared, only the rows and labels). Returns the differences, empty if they agree."""
    out = []
    a_lines, b_lines = committed.strip().splitlines(), fresh.strip().splitlines()
    if len(a_lines) != len(b_lines):
        return [f"{len(a_lines)} lines committed, {len(b_lines)} fresh"]
    for la, lb in zip(a_lines, b_lines):
        if _NUM.sub("#", la) != _NUM.sub("#", lb):
            out.append(f"committed: {la}\n    fresh: {lb}")
            continue
        for x, y in zip(_NUM.findall(la), _NUM.findall(lb)):
            if tol is not None and abs(float(x) - float(y)) > tol:
                out.append(f"{x} committed vs {y} fresh in: {lb}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m t2i_mia.report.tables",
        description="Regenerate the results tables of a markdown file from report.json / "
                    "summary.json files (the blocks between <!-- t2i-mia:table NAME --> and "
                    "<!-- t2i-mia:end NAME -->).")
    p.add_argument("file", help="the markdown file, e.g. README.md")
    p.add_argument("blocks", nargs="+", metavar="NAME=PATH",
                   help="a block name and the report.json or summary.json it shows")
    args = p.parse_args(argv)
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    for spec in args.blocks:
        name, sep, path = spec.partition("=")
        if not sep:
            raise DataError(f"{spec!r}: expected NAME=PATH")
        with open(path, encoding="utf-8") as f:
            text = replace_block(text, name, render(json.load(f)), args.file)
        # where it was generated (the test's tolerance depends on it)
        tag = f"<!-- t2i-mia:machine {name} {machine_tag()} -->"
        old = re.search(r"<!-- t2i-mia:machine " + re.escape(name) + r" .*? -->", text)
        text = text.replace(old.group(0), tag) if old else text.replace(
            _BEGIN.format(name), tag + "\n" + _BEGIN.format(name), 1)
    write_text_atomic(args.file, text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DataError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
