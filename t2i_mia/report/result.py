"""The audit's result as typed dataclasses, with a JSON round trip.

:class:`AuditReport` is ``report.json`` (schema in :mod:`t2i_mia.report.writer`, for users
in docs/report.md) as a tree of dataclasses: :class:`AttackBlock` per attack, an
:class:`Entry` per MLP or threshold feature (one field per metric of
:data:`t2i_mia.adversary.metrics.METRIC_KEYS`), :class:`Controls`, :class:`ModelInfo`.

* ``AuditReport.from_dict(d)`` validates ``d`` against the schema first
  (:func:`t2i_mia.report.writer.validate_report`; a DataError names the bad key) and then
  builds the tree; ``to_dict()`` gives the same JSON object back (``from_dict(d).to_dict()
  == d`` for every valid report, tested).
* Metric names with characters a field name cannot hold (``tpr_at_fpr_1e-2``) become
  ``tpr_at_fpr_1e_2``; the JSON keys stay the schema's.
* Blocks a run can leave out (a control with ``absent``, no MLP without attack training)
  keep their reason in ``absent`` / ``mlp_absent``; optional keys missing from the JSON are
  None here and stay missing in ``to_dict()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from t2i_mia.adversary.metrics import METRIC_KEYS
from t2i_mia.report.writer import SCHEMA_VERSION, _jsonable, validate_report

Interval = list  # [lo, hi] in [0, 1], or None where unmeasurable


def _field(key: str) -> str:
    return key.replace("-", "_")


# omit: the key is left out of the JSON when the value is None (optional keys); other
# None values are written as null (an unmeasurable number)
def _opt(default=None):
    return dataclasses.field(default=default, metadata={"omit_none": True})


def _to_json(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "extra":
                out.update(v or {})
                continue
            if v is None and f.metadata.get("omit_none"):
                continue
            out[f.metadata.get("json", f.name)] = _to_json(v)
        return out
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


@dataclasses.dataclass(frozen=True)
class NullComparison:
    """The same attack applied unchanged to the null target: its AUC, CI and the p-value of
    target vs null (or ``absent`` with the reason, no null target)."""
    auc: float | None = None
    auc_ci: Interval | None = None
    p_value: float | None = None
    absent: str | None = _opt()

    @classmethod
    def from_json(cls, d: Mapping) -> "NullComparison":
        return cls(**{k: d.get(k) for k in ("auc", "auc_ci", "p_value", "absent")})

    def to_dict(self) -> dict:
        if self.absent is not None:
            return {"absent": self.absent, "auc": self.auc, "auc_ci": self.auc_ci,
                    "p_value": self.p_value}
        return {"auc": self.auc, "auc_ci": self.auc_ci, "p_value": self.p_value}


def _entry_fields():
    fields = [(_field(k), Any, dataclasses.field(default=None, metadata={"json": k}))
              for k in METRIC_KEYS]
    fields.append(("null_target", NullComparison,
                   dataclasses.field(default_factory=NullComparison)))
    return fields


# One attack's numbers (an MLP or one threshold feature): a field per METRIC_KEYS entry
# (auc, auc_ci, accuracy, ..., the held-out operating points) and its null comparison.
Entry = dataclasses.make_dataclass("Entry", _entry_fields(), frozen=True, namespace={
    "__doc__": "An attack's metrics (one field per METRIC_KEYS entry; None = null) and its "
               "null-target comparison.",
    "from_json": classmethod(lambda cls, d: cls(
        **{_field(k): d.get(k) for k in METRIC_KEYS},
        null_target=NullComparison.from_json(d["null_target"]))),
    "to_dict": lambda self: {**{k: getattr(self, _field(k)) for k in METRIC_KEYS},
                             "null_target": self.null_target.to_dict()},
})


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A model the audit trained: its name, training split, size and members' hash."""
    name: str
    split: str
    n_members: int
    members_sha256: str

    @classmethod
    def from_json(cls, d: Mapping) -> "ModelInfo":
        return cls(d["name"], d["split"], d["n_members"], d["members_sha256"])


@dataclasses.dataclass(frozen=True)
class AttackBlock:
    """One attack: its MLP (None with ``mlp_absent`` when nothing is fitted; the calibrated
    attack has none), its threshold features and, for the calibrated attack, the
    reference models."""
    threshold: dict[str, Any]  # feature name -> Entry
    mlp: Any = None  # Entry | None
    mlp_absent: str | None = None
    reference_models: list[ModelInfo] | None = None
    calibrated: bool = False

    @classmethod
    def from_json(cls, name: str, d: Mapping) -> "AttackBlock":
        refs = d.get("reference_models")
        return cls(threshold={f: Entry.from_json(e) for f, e in d["threshold"].items()},
                   mlp=Entry.from_json(d["mlp"]) if d.get("mlp") is not None else None,
                   mlp_absent=d.get("mlp_absent"),
                   reference_models=[ModelInfo.from_json(m) for m in refs]
                   if refs is not None else None,
                   calibrated="mlp" not in d)

    def to_dict(self) -> dict:
        out = {"threshold": {f: e.to_dict() for f, e in self.threshold.items()}}
        if not self.calibrated:
            out["mlp"] = self.mlp.to_dict() if self.mlp is not None else None
        if self.mlp_absent is not None:
            out["mlp_absent"] = self.mlp_absent
        if self.reference_models is not None:
            out["reference_models"] = [_to_json(m) for m in self.reference_models]
        return out


@dataclasses.dataclass(frozen=True)
class Control:
    """A control's reading: AUC and CI (None when ``absent``), and the keys of its kind:
    ``p_value``, ``alpha``, ``alarm`` (null target, blind), ``per_attack`` and ``model``
    (null target), ``per_shuffle_auc`` and ``n_shuffles`` (shuffled labels), ``verdict``
    (blind), ``feature`` (null target without MLPs)."""
    auc: float | None = None
    auc_ci: Interval | None = None
    p_value: float | None = _opt()
    alpha: float | None = _opt()
    alarm: bool | None = _opt()
    per_attack: dict | None = _opt()
    model: ModelInfo | None = _opt()
    feature: str | None = _opt()
    per_shuffle_auc: list | None = _opt()
    n_shuffles: int | None = _opt()
    verdict: str | None = _opt()
    absent: str | None = _opt()
    extra: dict = dataclasses.field(default_factory=dict)
    # the JSON keys read (from_json): written back exactly, nulls included
    keys: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @classmethod
    def from_json(cls, d: Mapping) -> "Control":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "keys"}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("model") is not None:
            kw["model"] = ModelInfo.from_json(kw["model"])
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names},
                   keys=tuple(d))

    def to_dict(self) -> dict:
        if not self.keys:  # built here: the set fields, auc and auc_ci always
            out = {k: v for k, v in _to_json(self).items() if k != "keys"}
            out.setdefault("auc", None)
            out.setdefault("auc_ci", None)
            return out
        return {k: _to_json(self.extra[k] if k in self.extra else getattr(self, k))
                for k in self.keys}


@dataclasses.dataclass(frozen=True)
class Controls:
    null_target: Control
    shuffled_labels: Control
    blind: Control | None = None

    @classmethod
    def from_json(cls, d: Mapping) -> "Controls":
        return cls(Control.from_json(d["null_target"]), Control.from_json(d["shuffled_labels"]),
                   Control.from_json(d["blind"]) if d.get("blind") is not None else None)

    def to_dict(self) -> dict:
        out = {"null_target": self.null_target.to_dict(),
               "shuffled_labels": self.shuffled_labels.to_dict()}
        if self.blind is not None:
            out["blind"] = self.blind.to_dict()
        return out


@dataclasses.dataclass(frozen=True)
class Counts:
    members: int
    nonmembers: int


_TOP = ("schema_version", "tool", "target", "data", "n_eval", "n_attack_train", "k",
        "caption_source", "aux_mode", "seeds", "config", "manifest_sha256", "timings_s",
        "attacks", "controls", "models", "query_sets", "white_box_reference")


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """report.json, typed. ``attacks``: name -> :class:`AttackBlock` in the schema's order;
    ``extra``: top-level keys beyond the schema's, kept unchanged."""
    target: str
    data: str
    n_eval: Counts
    k: int
    caption_source: str
    aux_mode: str
    seeds: dict[str, int]
    config: dict
    manifest_sha256: str
    timings_s: dict[str, float]
    attacks: dict[str, AttackBlock]
    controls: Controls
    schema_version: int = SCHEMA_VERSION
    tool: dict | None = None
    n_attack_train: Counts | None = None
    models: dict | None = None
    query_sets: dict | None = None
    white_box_reference: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping) -> "AuditReport":
        """Validates ``d`` (numpy values allowed) and builds the typed report."""
        d = _jsonable(dict(d), "")
        validate_report(d)
        counts = lambda c: Counts(c["members"], c["nonmembers"]) if c is not None else None  # noqa: E731
        return cls(
            target=d["target"], data=d["data"], n_eval=counts(d["n_eval"]), k=d["k"],
            caption_source=d["caption_source"], aux_mode=d["aux_mode"], seeds=d["seeds"],
            config=d["config"], manifest_sha256=d["manifest_sha256"],
            timings_s=d["timings_s"],
            attacks={n: AttackBlock.from_json(n, b) for n, b in d["attacks"].items()},
            controls=Controls.from_json(d["controls"]), schema_version=d["schema_version"],
            tool=d.get("tool"), n_attack_train=counts(d.get("n_attack_train")),
            models=d.get("models"), query_sets=d.get("query_sets"),
            white_box_reference=d.get("white_box_reference"),
            extra={k: v for k, v in d.items() if k not in _TOP})

    def to_dict(self) -> dict:
        """The JSON object of report.json (plain values)."""
        out = {"schema_version": self.schema_version, "target": self.target,
               "data": self.data, "n_eval": _to_json(self.n_eval), "k": self.k,
               "caption_source": self.caption_source, "aux_mode": self.aux_mode,
               "seeds": dict(self.seeds), "config": self.config,
               "manifest_sha256": self.manifest_sha256, "timings_s": dict(self.timings_s),
               "attacks": {n: b.to_dict() for n, b in self.attacks.items()},
               "controls": self.controls.to_dict()}
        for key in ("tool", "n_attack_train", "models", "query_sets", "white_box_reference"):
            v = getattr(self, key)
            if v is not None:
                out[key] = _to_json(v)
        out.update(self.extra)
        return out

    # convenience readers for the numbers people quote
    def auc(self, attack: str) -> float | None:
        """The MLP AUC of ``attack`` (None without an MLP)."""
        mlp = self.attacks[attack].mlp
        return None if mlp is None else mlp.auc
