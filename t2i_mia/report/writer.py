"""The audit report: ``report.json`` (schema_version 2), ``report.md``, ``roc.png``, ``samples.png``.

Schema 2 (documented for users in docs/report.md)::

    target, data, n_eval: {members, nonmembers}, k, caption_source, aux_mode, seeds, config,
    manifest_sha256, timings_s: {<phase>: s},
    attacks: {<pixel|semantic|faithfulness|combined>: {mlp: ENTRY, threshold: {<feature>: ENTRY}},
              calibrated?: {threshold: {calibrated.<feature>: ENTRY}, reference_models: [MODEL]}},
    controls: {null_target: {auc, auc_ci, p_value, alpha, alarm, per_attack, model?},
               shuffled_labels: {auc, auc_ci, per_shuffle_auc, n_shuffles},
               blind: {auc, auc_ci, p_value, alpha, alarm, verdict}}

    With adversary.aux_mode=none: ``mlp`` is null with ``mlp_absent`` (the reason) beside
    it, and the threshold entries' accuracies and held-out points are null (nothing fitted).
    A control may be ``{..., absent: reason}`` with null values.

    ENTRY = {<METRIC_KEYS>, null_target: {auc, auc_ci, p_value}}
    MODEL = {name, split, n_members, members_sha256}

:func:`validate_report` checks it; top-level keys beyond these are allowed (e.g. a white-box
reference block) and written unchanged. ``manifest.json`` is written by the audit pipeline.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from typing import Any, Mapping

import numpy as np

from t2i_mia.adversary.features import ALL_ATTACKS, CALIBRATED, FAMILIES
from t2i_mia.adversary.metrics import METRIC_KEYS
from t2i_mia.errors import DataError
from t2i_mia.parallel.distributed import is_primary
from t2i_mia.report import plots

SCHEMA_VERSION = 2
ATTACK_NAMES = ALL_ATTACKS  # pixel, semantic, faithfulness, combined, calibrated
CONTROL_NAMES = ("null_target", "shuffled_labels", "blind")
_FAMILIES = FAMILIES
_FEATURE_RE = re.compile(rf"^({'|'.join(FAMILIES)})\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")
_NULL_KEYS = ("auc", "auc_ci", "p_value")
_MODEL_KEYS = ("name", "split", "n_members", "members_sha256")
_KNOWN_KEYS = {"schema_version", "target", "data", "n_eval", "k", "caption_source", "aux_mode",
               "seeds", "config", "manifest_sha256", "timings_s", "attacks", "controls",
               "query_sets", "models"}
# unmeasurable below 1/n_nonmembers (of the evaluation or of the attack-training set)
_NULLABLE = {"tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3", "accuracy", "balanced_accuracy"} | {
    k for k in METRIC_KEYS if "heldout" in k and not k.endswith("_ci")}


# ----------------------------------------------------------------------------- JSON values

def _jsonable(x: Any, where: str) -> Any:
    """numpy / tuples -> plain JSON values; NaN or inf is an error naming the key path."""
    if x is None or isinstance(x, (bool, np.bool_)):
        return None if x is None else bool(x)
    if isinstance(x, (numbers.Integral, np.integer)):
        return int(x)
    if isinstance(x, (numbers.Real, np.floating)):
        v = float(x)
        if not math.isfinite(v):
            raise DataError(f"report: {where} = {v} (NaN/inf is not valid in report.json)")
        return v
    if isinstance(x, str):
        return x
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist(), where)
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise DataError(f"report: {where} has a non-string key {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}" if where else k)
        return out
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    raise DataError(f"report: {where} has a value of type {type(x).__name__} that JSON "
                    "cannot hold")


# ----------------------------------------------------------------------------- validation

def _is_num(v) -> bool:
    return isinstance(v, (numbers.Real, np.floating, np.integer)) and \
        not isinstance(v, (bool, np.bool_)) and math.isfinite(float(v))


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def _need(d: Mapping, key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise DataError(f"report: {where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise DataError(f"report: missing key '{where}.{key}'" if where
                        else f"report: missing key '{key}'")
    return d[key]


def _rate(v, where: str, nullable: bool) -> None:
    if v is None and nullable:
        return
    if not _is_num(v) or not 0.0 <= float(v) <= 1.0:
        raise DataError(f"report: '{where}' must be a number in [0, 1]"
                        + (" or null" if nullable else "") + f", got {v!r}")


def _ci(v, where: str) -> None:
    if v is None:
        return
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_num(b) for b in v) \
            or not 0.0 <= float(v[0]) <= float(v[1]) <= 1.0:
        raise DataError(f"report: '{where}' must be [lo, hi] with 0 <= lo <= hi <= 1, or null; "
                        f"got {v!r}")


def _metrics(block, where: str, required=METRIC_KEYS, extra=()) -> None:
    if not isinstance(block, Mapping):
        raise DataError(f"report: '{where}' must be an object of metrics, got "
                        f"{type(block).__name__}")
    for key in required:
        _need(block, key, where)
    for key, v in block.items():
        w = f"{where}.{key}"
        if key in extra:
            continue
        if key not in METRIC_KEYS and key != "p_value":
            raise DataError(f"report: unknown key '{w}' (metric keys: {list(METRIC_KEYS)})")
        if key.endswith("_ci"):
            _ci(v, w)
        elif key == "min_resolvable_fpr":
            if not _is_num(v) or not 0.0 < float(v) <= 1.0:
                raise DataError(f"report: '{w}' must be a number in (0, 1], got {v!r}")
        else:
            _rate(v, w, nullable=key in _NULLABLE)


def _absent(block, where: str) -> bool:
    """A block reported as absent: ``absent`` names the reason, the values are null."""
    if "absent" not in block:
        return False
    if not isinstance(block["absent"], str) or not block["absent"]:
        raise DataError(f"report: '{where}.absent' must be the reason, a non-empty string")
    return True


def _entry(block, where: str) -> None:
    """An attack entry: the metrics and its null_target block."""
    _metrics(block, where, extra=("null_target",))
    null = _need(block, "null_target", where)
    if not _absent(null, f"{where}.null_target"):
        _metrics(null, f"{where}.null_target", required=_NULL_KEYS)


def _model(m, where: str) -> None:
    for key in _MODEL_KEYS:
        _need(m, key, where)
    if not re.fullmatch(r"[0-9a-f]{64}", str(m["members_sha256"])):
        raise DataError(f"report: '{where}.members_sha256' must be 64 lowercase hex digits")
    if not _is_int(m["n_members"]) or m["n_members"] < 1:
        raise DataError(f"report: '{where}.n_members' must be a positive integer")


def validate_report(report: Mapping) -> None:
    """Checks a report against schema_version 1; raises DataError naming the bad key."""
    if not isinstance(report, Mapping):
        raise DataError(f"report: must be an object, got {type(report).__name__}")
    if _need(report, "schema_version", "") != SCHEMA_VERSION:
        raise DataError(f"report: 'schema_version' must be {SCHEMA_VERSION}, got "
                        f"{report['schema_version']!r}")
    for key in ("target", "data", "caption_source", "aux_mode", "manifest_sha256"):
        v = _need(report, key, "")
        if not isinstance(v, str) or not v:
            raise DataError(f"report: '{key}' must be a non-empty string, got {v!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", report["manifest_sha256"]):
        raise DataError(f"report: 'manifest_sha256' must be 64 lowercase hex digits, got "
                        f"{report['manifest_sha256']!r}")
    n_eval = _need(report, "n_eval", "")
    for key in ("members", "nonmembers"):
        v = _need(n_eval, key, "n_eval")
        if not _is_int(v) or v < 0:
            raise DataError(f"report: 'n_eval.{key}' must be a non-negative integer, got {v!r}")
    k = _need(report, "k", "")
    if not _is_int(k) or k < 1:
        raise DataError(f"report: 'k' must be a positive integer, got {k!r}")
    seeds = _need(report, "seeds", "")
    if not isinstance(seeds, Mapping) or not seeds:
        raise DataError(f"report: 'seeds' must be a non-empty object name -> int, got {seeds!r}")
    for name, v in seeds.items():
        if not _is_int(v):
            raise DataError(f"report: 'seeds.{name}' must be an integer, got {v!r}")
    if not isinstance(_need(report, "config", ""), Mapping):
        raise DataError("report: 'config' must be an object (the resolved config)")
    timings = _need(report, "timings_s", "")
    if not isinstance(timings, Mapping):
        raise DataError("report: 'timings_s' must be an object phase -> seconds")
    for phase, v in timings.items():
        if not _is_num(v) or v < 0:
            raise DataError(f"report: 'timings_s.{phase}' must be seconds >= 0, got {v!r}")

    attacks = _need(report, "attacks", "")
    if not isinstance(attacks, Mapping) or not attacks:
        raise DataError(f"report: 'attacks' must be a non-empty object, got {attacks!r}")
    for name, block in attacks.items():
        if name not in ATTACK_NAMES:
            raise DataError(f"report: unknown attack 'attacks.{name}' (expected {ATTACK_NAMES})")
        allowed = {"threshold", "reference_models"} if name == CALIBRATED else {
            "mlp", "mlp_absent", "threshold"}
        extra = set(block) - allowed
        if extra:
            raise DataError(f"report: unknown key 'attacks.{name}.{sorted(extra)[0]}'")
        if name != CALIBRATED:
            mlp = _need(block, "mlp", f"attacks.{name}")
            if mlp is None:
                if not isinstance(block.get("mlp_absent"), str) or not block["mlp_absent"]:
                    raise DataError(f"report: 'attacks.{name}.mlp' is null without its reason "
                                    f"('attacks.{name}.mlp_absent')")
            else:
                _entry(mlp, f"attacks.{name}.mlp")
        else:
            refs = _need(block, "reference_models", f"attacks.{name}")
            if not isinstance(refs, list) or not refs:
                raise DataError(f"report: 'attacks.{name}.reference_models' must be a "
                                "non-empty list of models")
            for i, m in enumerate(refs):
                _model(m, f"attacks.{name}.reference_models[{i}]")
        thresholds = _need(block, "threshold", f"attacks.{name}")
        if not isinstance(thresholds, Mapping) or not thresholds:
            raise DataError(f"report: 'attacks.{name}.threshold' must be a non-empty object "
                            "feature -> metrics")
        for feat, m in thresholds.items():
            base = feat[len(CALIBRATED) + 1:] if name == CALIBRATED else feat
            fam = _FEATURE_RE.match(base)
            if name == CALIBRATED and not feat.startswith(CALIBRATED + "."):
                fam = None
            if not fam or (name not in ("combined", CALIBRATED) and fam.group(1) != name):
                raise DataError(f"report: 'attacks.{name}.threshold.{feat}': feature names are "
                                f"'{'calibrated.' if name == CALIBRATED else ''}"
                                f"<attack>.<metric>.<agg>' of attack "
                                f"{name if name in _FAMILIES else 'pixel|semantic|faithfulness'}")
            _entry(m, f"attacks.{name}.threshold.{feat}")

    controls = _need(report, "controls", "")
    null = _need(controls, "null_target", "controls")
    if not _absent(null, "controls.null_target"):
        _metrics(null, "controls.null_target", required=_NULL_KEYS + ("alpha", "alarm",
                                                                      "per_attack"),
                 extra=("alpha", "alarm", "per_attack", "model", "feature"))
        if not isinstance(null["alarm"], bool):
            raise DataError("report: 'controls.null_target.alarm' must be true or false")
        for attack, m in _need(null, "per_attack", "controls.null_target").items():
            _metrics(m, f"controls.null_target.per_attack.{attack}",
                     required=_NULL_KEYS + ("p_holm",), extra=("p_holm",))
        if "model" in null:
            _model(null["model"], "controls.null_target.model")
    shuf = _need(controls, "shuffled_labels", "controls")
    if not _absent(shuf, "controls.shuffled_labels"):
        _metrics(shuf, "controls.shuffled_labels",
                 required=("auc", "auc_ci", "per_shuffle_auc"),
                 extra=("per_shuffle_auc", "n_shuffles"))
        per = shuf["per_shuffle_auc"]
        if not isinstance(per, list) or len(per) < 2:
            raise DataError("report: 'controls.shuffled_labels.per_shuffle_auc' must list >= 2 "
                            "AUCs")
        for i, v in enumerate(per):
            _rate(v, f"controls.shuffled_labels.per_shuffle_auc[{i}]", nullable=False)
    blind = controls.get("blind")
    if blind is not None and not _absent(blind, "controls.blind"):
        _metrics(blind, "controls.blind", required=_NULL_KEYS + ("alpha", "alarm", "verdict"),
                 extra=("alpha", "alarm", "verdict"))
        if not isinstance(blind["alarm"], bool):
            raise DataError("report: 'controls.blind.alarm' must be true or false")
    extra = set(controls) - set(CONTROL_NAMES)
    if extra:
        raise DataError(f"report: unknown key 'controls.{sorted(extra)[0]}'")


# ----------------------------------------------------------------------------- markdown

def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def _with_ci(v, ci) -> str:
    if v is None:
        return "n/a"
    return f"{_num(v)} [{_num(ci[0])}, {_num(ci[1])}]" if ci is not None else _num(v)


def _metric_cells(m: Mapping) -> list[str]:
    null = m.get("null_target")
    held = ("n/a" if m.get("tpr_at_heldout_threshold_1e-2") is None else
            f"{_num(m['tpr_at_heldout_threshold_1e-2'])} / "
            f"{_num(m['realised_fpr_at_heldout_threshold_1e-2'])}")
    return [_with_ci(m["auc"], m["auc_ci"]),
            "n/a" if null is None or "absent" in null else _with_ci(null["auc"], null["auc_ci"]),
            _num(m["accuracy"]), _num(m["balanced_accuracy"]),
            _with_ci(m["tpr_at_fpr_1e-2"], m["tpr_at_fpr_1e-2_ci"]),
            _num(m["tpr_at_fpr_1e-3"]), held]


_HEADER = ["AUC [95% CI]", "null target AUC [95% CI]", "accuracy", "balanced acc.",
           "TPR@1%FPR, ROC [95% CI]", "TPR@0.1%FPR, ROC", "held-out 1% threshold: TPR / FPR"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _attack_order(attacks: Mapping) -> list[str]:
    return [a for a in ATTACK_NAMES if a in attacks]


def _mlp_attacks(attacks: Mapping) -> list[str]:
    return [a for a in _attack_order(attacks) if attacks[a].get("mlp")]


def _contains_half(ci) -> str:
    return "n/a" if ci is None else ("yes" if ci[0] <= 0.5 <= ci[1] else "NO")


def _controls_table(report: Mapping) -> str:
    null = report["controls"]["null_target"]
    shuf = report["controls"]["shuffled_labels"]
    rows = []
    if "absent" in null:
        rows.append(["null_target", "absent", "", null["absent"]])
    else:
        what = (f"feature {null['feature']}" if "feature" in null else "combined MLP")
        over = "the features" if "feature" in null else "the attack MLPs"
        rows.append([f"null_target ({what})", _with_ci(null["auc"], null["auc_ci"]),
                     _contains_half(null["auc_ci"]),
                     f"alarm: {'YES' if null['alarm'] else 'no'} (Holm over {over}, "
                     f"alpha {null['alpha']})"])
    if "absent" in shuf:
        rows.append(["shuffled_labels", "absent", "", shuf["absent"]])
    else:
        per = shuf["per_shuffle_auc"]
        rows.append(["shuffled_labels", _with_ci(shuf["auc"], shuf["auc_ci"]),
                     _contains_half(shuf["auc_ci"]),
                     f"mean of {len(per)} shuffles (range {_num(min(per))}-{_num(max(per))})"])
    blind = report["controls"].get("blind")
    if blind is not None:
        if "absent" in blind:
            rows.append(["blind (query only)", "absent", "", blind["absent"]])
        else:
            rows.append(["blind (query only)", _with_ci(blind["auc"], blind["auc_ci"]),
                         _contains_half(blind["auc_ci"]),
                         ("ALARM: " if blind["alarm"] else "") + blind["verdict"]])
    return markdown_table(["control", "AUC [95% CI]", "CI contains 0.5", ""], rows)


def _holm_table(report: Mapping) -> str:
    per = report["controls"]["null_target"].get("per_attack", {})
    rows = [[a, _with_ci(per[a]["auc"], per[a]["auc_ci"]), f"{per[a]['p_value']:.3g}",
             f"{per[a]['p_holm']:.3g}"] for a in sorted(per, key=_attack_rank)]
    return markdown_table(["scored on the null target", "AUC [95% CI]", "p (AUC = 0.5)",
                   "p, Holm-adjusted"], rows)


def _attack_rank(name: str) -> tuple:
    return (ATTACK_NAMES.index(name), "") if name in ATTACK_NAMES else (len(ATTACK_NAMES), name)


def _blind_warning(report: Mapping) -> list[str]:
    blind = report["controls"].get("blind") or {}
    if not blind.get("alarm"):
        return []
    return [f"**Warning: {blind['verdict']}** (blind AUC {_num(blind['auc'])}).", ""]


def format_table(report: Mapping) -> str:
    """The headline table (attack-model rows, then the controls), as markdown text."""
    n = report["n_eval"]
    warning = "\n".join(_blind_warning(report))
    mlps = _mlp_attacks(report["attacks"])
    if mlps:
        rows = [[a] + _metric_cells(report["attacks"][a]["mlp"]) for a in mlps]
        head = (f"Attack models (MLP), {n['members']} members vs {n['nonmembers']} "
                f"non-members, k = {report['k']}:\n\n")
    else:  # nothing fitted: the single features
        rows = [[f"{a} `{f}`"] + _metric_cells(report["attacks"][a]["threshold"][f])
                for a in _attack_order(report["attacks"]) if a != "combined"
                for f in sorted(report["attacks"][a]["threshold"])]
        head = (f"Single features, unfitted (aux_mode none), {n['members']} members vs "
                f"{n['nonmembers']} non-members, k = {report['k']}:\n\n")
    return (warning + ("\n" if warning else "") + head
            + markdown_table(["attack"] + _HEADER, rows)
            + "\n\nControls:\n\n" + _controls_table(report) + "\n")


def format_markdown(report: Mapping) -> str:
    """The whole report.md."""
    n = report["n_eval"]
    seeds = ", ".join(f"{k} = {v}" for k, v in report["seeds"].items())
    meta = markdown_table(["", ""], [
        ["target", str(report["target"])], ["data", str(report["data"])],
        ["n_eval", f"{n['members']} members, {n['nonmembers']} non-members"],
        ["k (generations per query)", str(report["k"])],
        ["caption source", str(report["caption_source"])],
        ["aux mode", str(report["aux_mode"])], ["seeds", seeds],
        ["manifest sha256", f"`{report['manifest_sha256']}`"]])
    thr_rows = []
    for a in _attack_order(report["attacks"]):
        for feat in sorted(report["attacks"][a]["threshold"]):
            thr_rows.append([a, f"`{feat}`"]
                            + _metric_cells(report["attacks"][a]["threshold"][feat]))
    mlp_rows = [[a] + _metric_cells(report["attacks"][a]["mlp"])
                for a in _mlp_attacks(report["attacks"])]
    refs = report["attacks"].get(CALIBRATED, {}).get("reference_models", [])
    ref_lines = [] if not refs else [
        "## Calibrated attack: reference models", "",
        "`calibrated.<feature>` = the feature on the target minus its mean over reference "
        "models that never saw the query (offline LiRA with a global variance); thresholds "
        "above, attack `calibrated`.", "",
        markdown_table(["model", "trained on", "members", "members sha256"],
               [[m["name"], m["split"], str(m["n_members"]), f"`{m['members_sha256'][:16]}`"]
                for m in refs]), ""]
    null_model = report["controls"]["null_target"].get("model")
    timings = markdown_table(["phase", "seconds"],
                     [[p, f"{float(s):.2f}"] for p, s in report["timings_s"].items()])
    extra_rows, notes = [], []
    for key in sorted(report):  # e.g. a white-box reference block (outside the threat model)
        block = report[key]
        if key in _KNOWN_KEYS or not isinstance(block, Mapping):
            continue
        for kind in ("mlp", "threshold"):
            m = block.get(kind)
            if isinstance(m, Mapping) and all(k in m for k in METRIC_KEYS):
                extra_rows.append([f"{key} ({kind})"] + _metric_cells(m))
                if isinstance(block.get("note"), str):
                    notes.append(f"{key}: {block['note']}")
    extra = [] if not extra_rows else [
        "## Other results", "", markdown_table(["result"] + _HEADER, extra_rows), "", *notes, ""]
    mlps = _mlp_attacks(report["attacks"])
    first = report["attacks"][_attack_order(report["attacks"])[0]]
    floor = (first["mlp"] if mlps else next(iter(first["threshold"].values())))[
        "min_resolvable_fpr"]
    mlp_section = (markdown_table(["attack"] + _HEADER, mlp_rows) if mlps else
                   "None: " + str(first.get("mlp_absent", "no attack models")) + ".")
    sets = report.get("query_sets")
    set_lines = [] if not sets else [
        "## Query sets", "",
        markdown_table(["set", "path", "entries", "known to the adversary", "evaluated"],
                       [[r, f"`{v['path']}`", str(v["n"]), str(v.get("n_known", 0)),
                         str(v.get("n_evaluated", "")) or "-"] for r, v in sets.items()]), ""]
    return "\n".join([
        f"# Membership inference audit: {report['target']} on {report['data']}", "",
        meta, "",
        *_blind_warning(report),
        *set_lines,
        "## Attack models (MLP)", "",
        mlp_section, "",
        "## Threshold attacks (one feature each)", "",
        markdown_table(["attack", "feature"] + _HEADER, thr_rows), "",
        f"CIs: 95% stratified bootstrap over the evaluation set. n/a: not measurable; a TPR "
        f"at an FPR below 1/n_nonmembers = {_num(floor, 5)} cannot be resolved on this "
        "evaluation set. Thresholds and attack models were fitted on attack-training data "
        "only. `TPR@1%FPR, ROC` is read off the evaluation ROC (its threshold chosen with the "
        "evaluation labels: an oracle operating point). `held-out 1% threshold` is what an "
        "auditor can deploy: the threshold that lets 1% of the attack-training non-members "
        "through, applied once to the evaluation set; it gives that TPR and that realised FPR "
        "(report.json: with Wilson CIs, and the same at 0.1%). `null target AUC` is the same "
        "fitted attack on the null model's generations of the same queries.", "",
        *ref_lines,
        *extra,
        "## Controls", "",
        _controls_table(report), "",
        _holm_table(report), "",
        "A control whose CI excludes 0.5, or a null-target alarm, needs investigation (a "
        "label leak, or member and non-member sets that differ in distribution, are the "
        "first suspects); at 95%, a clean control excludes 0.5 in about one run in twenty, "
        "so one that does so again on other seeds (`--seeds`) is the finding. The null "
        "target is a model of the target's kind that never saw "
        "the evaluated members"
        + (f" (`{null_model['name']}`, trained on {null_model['split']})" if null_model
           else "") + "; its alarm tests AUC = 0.5 for each attack MLP (two-sided "
        "Mann-Whitney) with Holm's correction over them. `shuffled_labels` is the mean AUC "
        "of attacks fitted to independent class-balanced label shuffles; its CI (Student t) "
        "covers evaluation sampling and the spread between shuffles. Every other CI covers "
        "evaluation sampling only, not the randomness of the attack's or the target's "
        "training: run several seeds (`--seeds`) for that.", "",
        "## Timings", "",
        timings, "",
        "Figures: `roc.png` (log-log ROC), `samples.png` (query | generations).", ""])


# ----------------------------------------------------------------------------- writing

def write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_report(out_dir: str | os.PathLike, report: Mapping, roc_curves: Mapping,
                 sample_grid: Mapping | None = None) -> dict[str, str]:
    """Validates and writes the report files.

    Args:
      out_dir: the ``--out`` folder (created if missing).
      report: the report dict (schema above); ``schema_version`` is added if absent. numpy
        values are converted; NaN/inf anywhere is a DataError naming the key.
      roc_curves: name -> (fpr, tpr) for ``roc.png``.
      sample_grid: None, or {"queries": uint8[M,H,W,3], "generated": uint8[M,k,H,W,3],
        "labels": {0,1}[M], "captions": list[str]} for ``samples.png``.
    Returns: {"json", "md", "roc", "samples"?} -> written paths. Nothing is written when the
      report is invalid; every file is replaced atomically (tmp file + os.replace).

    Several processes (multi-host): every process validates (so a bad report fails
    everywhere alike) and gets the paths, but only the primary process writes the files.
    """
    report = dict(report)
    report.setdefault("schema_version", SCHEMA_VERSION)
    clean = _jsonable(report, "")
    validate_report(clean)
    text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n"
    md = format_markdown(clean)
    if sample_grid is not None:
        missing = {"queries", "generated", "labels", "captions"} - set(sample_grid)
        if missing:
            raise DataError(f"write_report: sample_grid misses {sorted(missing)}")
    out_dir = os.fspath(out_dir)
    paths = {"json": os.path.join(out_dir, "report.json"),
             "md": os.path.join(out_dir, "report.md"),
             "roc": os.path.join(out_dir, "roc.png")}
    if sample_grid is not None:
        paths["samples"] = os.path.join(out_dir, "samples.png")
    if not is_primary():
        return paths
    os.makedirs(out_dir, exist_ok=True)
    plots.plot_roc(paths["roc"], roc_curves)
    if sample_grid is not None:
        plots.plot_samples(paths["samples"], sample_grid["queries"], sample_grid["generated"],
                           sample_grid["labels"], sample_grid["captions"])
    write_text_atomic(paths["md"], md)
    write_text_atomic(paths["json"], text)  # last: its presence means the report is complete
    return paths
