"""Per-query scores: ``scores.csv`` and ``null_scores.csv``, and a report from them alone.

Every audit writes, beside report.json, one row per query it scored:

* ``scores.csv``: the attack-training queries (``set = attack_train``) and the evaluated
  queries (``set = eval``) on the model they were scored on;
* ``null_scores.csv``: the evaluated queries on the null model (``set = null``).

Columns: ``id``, ``label`` (1 = member), ``set``, every scalar feature (``pixel.mse.min``,
..., ``calibrated.pixel.mse.min``, ...), every attack MLP's logit (``mlp.<attack>``), the
shuffled-labels fits' logits (``shuffled.<r>``, evaluated rows only), the blind baseline's
score (``blind``, evaluated rows only) and, where the audit had white-box access,
``white_box.neg_loss``. With ``aux_mode`` none there are no attack-training rows and no
``mlp.*`` or ``shuffled.*`` columns. Floats are written with ``repr`` (full
precision), so the numbers read back are the numbers computed. The first line is a comment,
``# t2i-mia scores {json}``, with what the report needs besides the scores (target, data,
k, seeds, bootstrap settings, the reference and null models); ``pandas.read_csv(path,
comment="#")`` reads the rest.

``python -m t2i_mia.report --scores scores.csv [--null-scores null_scores.csv] --out DIR``
recomputes the metrics, the controls, ``roc.png`` and ``DIR/report.json`` from these files
alone (thresholds refitted on the attack-training rows; MLP decisions are logit > 0): the
score-level input that classifier-MIA tools offer. Given the same files and seed it gives
the audit's numbers exactly.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Mapping, Sequence

import numpy as np

import t2i_mia
from t2i_mia.adversary.evaluation import (
    ATTACKS,
    CALIBRATED,
    AuditScores,
    evaluate_scores,
    white_box_entry,
)
from t2i_mia.errors import DataError
from t2i_mia.parallel.distributed import is_primary
from t2i_mia.report.writer import SCHEMA_VERSION, write_text_atomic

SCORES_VERSION = 1
_HEADER = "# t2i-mia scores "
_SETS = ("attack_train", "eval", "null")


def _columns(sc: AuditScores, white_box: tuple | None) -> list[str]:
    cols = sorted(sc.features) + ([f"mlp.{a}" for a in ATTACKS] if sc.fitted else [])
    cols += [f"shuffled.{r}" for r in range(len(sc.shuffled))]
    if sc.blind is not None:
        cols.append("blind")
    if white_box is not None:
        cols.append("white_box.neg_loss")
    return cols


def _fmt(v) -> str:
    return repr(float(v))


def _csv_text(meta: Mapping, cols: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    buf.write(_HEADER + json.dumps(meta, sort_keys=True) + "\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label", "set"] + cols)
    w.writerows(rows)
    return buf.getvalue()


def write_scores(out_dir: str, sc: AuditScores, train_ids: Sequence[int],
                 eval_ids: Sequence[int], meta: Mapping,
                 white_box: tuple | None = None) -> dict[str, str]:
    """Writes ``scores.csv`` (and ``null_scores.csv`` when there are null scores), atomically.

    ``white_box``: None, or (train f[Nt], eval f[Ne]) of ``-loss``. ``meta``: the report
    fields that are not scores (see the module doc). Returns the written paths."""
    cols = _columns(sc, white_box)
    n_tr, n_ev = len(train_ids), len(eval_ids)
    if n_tr != len(sc.train_labels) or n_ev != len(sc.eval_labels):
        raise DataError(f"scores: {n_tr} / {n_ev} ids for {len(sc.train_labels)} / "
                        f"{len(sc.eval_labels)} labelled queries")

    def column(name: str, part: int, n: int) -> list[str]:
        if name.startswith("mlp."):
            v = sc.mlp[name[4:]][part]
        elif name.startswith("shuffled."):
            v = sc.shuffled[int(name.split(".")[1])] if part == 1 else None
        elif name == "blind":
            v = sc.blind if part == 1 else None
        elif name == "white_box.neg_loss":
            v = white_box[part] if part < 2 else None
        else:
            v = sc.features[name][part]
        if v is None:
            return [""] * n
        v = np.asarray(v)
        if v.shape != (n,):
            raise DataError(f"scores: column {name} has shape {v.shape}, expected ({n},)")
        return [_fmt(x) for x in v]

    def rows(ids, labels, set_name, part, names=cols):
        data = [column(c, part, len(ids)) for c in names]
        return [[str(int(i)), str(int(lab)), set_name] + [d[j] for d in data]
                for j, (i, lab) in enumerate(zip(ids, labels))]

    meta = {"version": SCORES_VERSION, **meta}
    paths = {"scores": os.path.join(out_dir, "scores.csv")}
    if not is_primary():
        return paths
    os.makedirs(out_dir, exist_ok=True)
    body = rows(train_ids, sc.train_labels, "attack_train", 0) + rows(eval_ids, sc.eval_labels,
                                                                       "eval", 1)
    write_text_atomic(paths["scores"], _csv_text(meta, cols, body))
    has_null = (sc.mlp[ATTACKS[0]][2] is not None if sc.fitted else
                all(v[2] is not None for v in sc.features.values()))
    if has_null:
        null_cols = [c for c in cols if not c.startswith(("shuffled.", "white_box.", "blind"))]
        paths["null_scores"] = os.path.join(out_dir, "null_scores.csv")
        write_text_atomic(paths["null_scores"], _csv_text(
            meta, null_cols, rows(eval_ids, sc.eval_labels, "null", 2, null_cols)))
    return paths


def _read(path: str) -> tuple[dict, list[str], list[list[str]]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            first = f.readline()
            if not first.startswith(_HEADER):
                raise DataError(f"{path}: line 1 must be '{_HEADER}{{json}}' (a t2i-mia "
                                "scores file)")
            try:
                meta = json.loads(first[len(_HEADER):])
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line 1: bad JSON ({e})") from None
            reader = csv.reader(f)
            header = next(reader, None)
            table = list(reader)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not header or header[:3] != ["id", "label", "set"]:
        raise DataError(f"{path}: line 2 must be the column names, starting id,label,set")
    if meta.get("version") != SCORES_VERSION:
        raise DataError(f"{path}: scores version {meta.get('version')!r}, expected "
                        f"{SCORES_VERSION}")
    for n, row in enumerate(table, start=3):
        if len(row) != len(header):
            raise DataError(f"{path}: line {n} has {len(row)} fields, expected {len(header)}")
    return meta, header, table


def _floats(path: str, table, header, col: str, rows: list[int]) -> np.ndarray | None:
    j = header.index(col)
    vals = [table[i][j] for i in rows]
    if all(v == "" for v in vals):
        return None
    out = np.empty(len(vals), np.float64)
    for k, (i, v) in enumerate(zip(rows, vals)):
        try:
            out[k] = float(v)
        except ValueError:
            raise DataError(f"{path}: line {i + 3}, column {col}: {v!r} is not a number") \
                from None
        if not np.isfinite(out[k]):
            raise DataError(f"{path}: line {i + 3}, column {col}: {v!r} is not finite")
    return out


def read_scores(path: str, null_path: str | None = None) -> tuple[AuditScores, dict, dict]:
    """``scores.csv`` (+ ``null_scores.csv``) -> (AuditScores, meta, {"attack_train": ids,
    "eval": ids}). DataError naming the file, line and column of anything malformed; the
    null file must score the same evaluated ids with the same labels."""
    meta, header, table = _read(path)
    sets = {s: [i for i, r in enumerate(table) if r[2] == s] for s in ("attack_train", "eval")}
    bad = [i for i, r in enumerate(table) if r[2] not in ("attack_train", "eval")]
    if bad:
        raise DataError(f"{path}: line {bad[0] + 3}: set {table[bad[0]][2]!r}, expected "
                        "attack_train or eval")
    ids, labels = {}, {}
    for s, rows in sets.items():
        try:
            ids[s] = [int(table[i][0]) for i in rows]
            labels[s] = np.array([int(table[i][1]) for i in rows], np.int64)
        except ValueError:
            raise DataError(f"{path}: an id or label of set {s} is not an integer") from None
        if not np.all((labels[s] == 0) | (labels[s] == 1)):
            raise DataError(f"{path}: labels of set {s} must be 0 or 1")
        if len(set(ids[s])) != len(ids[s]):
            raise DataError(f"{path}: duplicate ids in set {s}")
    null = None
    if null_path is not None:
        n_meta, n_header, n_table = _read(null_path)
        n_ids = [int(r[0]) for r in n_table]
        n_labels = np.array([int(r[1]) for r in n_table], np.int64)
        if n_ids != ids["eval"] or not np.array_equal(n_labels, labels["eval"]):
            raise DataError(f"{null_path}: must score the evaluated ids of {path} in the same "
                            "order with the same labels")
        null = (n_header, n_table)

    fitted = meta.get("aux_mode") != "none"

    def trio(col):
        tr = (_floats(path, table, header, col, sets["attack_train"]) if fitted
              else np.zeros(0))
        ev = _floats(path, table, header, col, sets["eval"])
        if tr is None or ev is None:
            raise DataError(f"{path}: column {col} is empty for the "
                            f"{'attack_train' if tr is None else 'eval'} rows")
        nu = None
        if null is not None:
            if col not in null[0]:
                raise DataError(f"{null_path}: column {col} is missing")
            nu = _floats(null_path, null[1], null[0], col, list(range(len(null[1]))))
        return tr, ev, nu

    missing = [f"mlp.{a}" for a in ATTACKS if f"mlp.{a}" not in header]
    if missing and fitted:
        raise DataError(f"{path}: column {missing[0]} is missing")
    if not fitted and sets["attack_train"]:
        raise DataError(f"{path}: aux_mode none has no attack_train rows (line "
                        f"{sets['attack_train'][0] + 3})")
    feats = [c for c in header[3:]
             if not c.startswith(("mlp.", "shuffled.", "white_box.")) and c != "blind"]
    shuffled_cols = sorted((c for c in header if c.startswith("shuffled.")),
                           key=lambda c: int(c.split(".")[1]))
    sc = AuditScores(
        train_labels=labels["attack_train"], eval_labels=labels["eval"],
        mlp={a: trio(f"mlp.{a}") for a in ATTACKS} if fitted else {},
        features={c: trio(c) for c in feats},
        shuffled=[_floats(path, table, header, c, sets["eval"]) for c in shuffled_cols],
        null_absent=meta.get("null_absent") if null is None and meta.get("null_absent") else
        None if null is not None else "no null-model scores given (--null-scores)",
        fitted=fitted,
        blind=_floats(path, table, header, "blind", sets["eval"]) if "blind" in header
        else None)
    if "white_box.neg_loss" in header:
        meta["_white_box"] = (_floats(path, table, header, "white_box.neg_loss",
                                      sets["attack_train"]),
                              _floats(path, table, header, "white_box.neg_loss", sets["eval"]))
    return sc, meta, ids


def report_from_scores(sc: AuditScores, meta: Mapping) -> tuple[dict, dict]:
    """(report dict, ROC curves) from scores alone, as the audit computes them."""
    n_boot, seed = int(meta["n_bootstrap"]), int(meta["attack_seed"])
    attacks, controls, curves = evaluate_scores(sc, n_boot, seed)
    if CALIBRATED in attacks:
        attacks[CALIBRATED]["reference_models"] = list(meta.get("reference_models") or [])
    if meta.get("null_model") and controls["null_target"].get("absent") is None:
        controls["null_target"]["model"] = meta["null_model"]
    y, yt = sc.eval_labels, sc.train_labels
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "t2i-mia", "version": t2i_mia.__version__},
        **{k: meta[k] for k in ("target", "data", "k", "caption_source", "aux_mode",
                                "manifest_sha256", "seeds")},
        "n_eval": {"members": int(y.sum()), "nonmembers": int(len(y) - y.sum())},
        "n_attack_train": {"members": int(yt.sum()), "nonmembers": int(len(yt) - yt.sum())},
        "config": {"source": "scores", "n_bootstrap": n_boot, "attack_seed": seed},
        "timings_s": {},
        "attacks": attacks,
        "controls": controls,
    }
    for key in ("query_sets", "models"):
        if meta.get(key):
            report[key] = meta[key]
    wb = meta.get("_white_box")
    if wb is not None:
        report["white_box_reference"] = {
            "note": meta.get("white_box_note", "white-box access: outside the black-box "
                                               "threat model; an upper-bound reference only"),
            "feature": "white_box.training_loss (negated: higher = member)",
            "threshold": white_box_entry(wb[0], yt, wb[1], y, n_boot, seed)}
    return report, curves
