"""The one schema of a prediction row: every output that reports a prediction writes these columns.

``xraydx predict`` (CSV and JSON), ``evaluate``'s and ``crossval``'s ``predictions.csv``, ``explain``'s
``explain.csv``, the server's JSON (``row`` of each ``/api/predict`` result, and of each error of
``/api/predict/batch``) and the DICOM results log (``results.csv`` / ``results.jsonl``) all build their
rows with :func:`make_row` and order them with :func:`columns`. The JSON Schema
(``xraydx/schemas/prediction.schema.json``, shipped with the package) is written from
:func:`json_schema`, and a test checks that the two agree and validates every output kind against it.

Columns, in this order (the README has the table):

=============  ===================================================================================
``path``       the input as the entry point names it: the path given (predict, explain, evaluate),
               the upload's file name (serve), the SOP Instance UID (DICOM log)
``prediction`` the class with the highest probability; null where nothing was predicted
``prob_<c>``   one per class, in the model's class order: calibrated probability in [0, 1], or null
``status``     ``ok``; ``not_cxr`` (not a frontal chest X-ray: the OOD guard, or a lateral/one-sided
               DICOM view); ``error: <reason>`` (not predicted); ``skipped: <reason>`` (DICOM node only:
               an instance it does not classify)
``flag``       null, or ``not a frontal chest X-ray`` (status ``not_cxr``, or a DICOM instance skipped
               for its view; it replaces every other flag), or one or both of
               ``uncertain: refer to a radiologist`` (the abstention rule) and ``unlike the training
               sources`` (:mod:`xraydx.shift`), joined by ``; ``. A row whose flag is null and status
               ``ok`` is the only one to act on.
``ood_score``  the OOD guard's score (a number; > 1 is out of distribution), null without a check
``ood_reason`` why the row is flagged ``not a frontal chest X-ray``; null otherwise
``shift_score`` the source-shift score (:mod:`xraydx.shift`), null where the checkpoint has none
``model_id``   ``<architecture>-<sha256 of the checkpoint file, 12 hex digits>`` (:func:`model_id`)
=============  ===================================================================================

Then the columns of the output kind (:data:`EXTRA_COLUMNS`), in that order. Every row, an error row
too, carries every key. CSV encoding: an empty cell is null, numbers are decimals (probabilities with
6 places, ``ood_score`` with 4); :func:`from_csv` reads a row back into the JSON types.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xraydx.constants import NOT_FRONTAL_FLAG, PACKAGE_DIR, SHIFT_FLAG, UNCERTAIN_FLAG

__all__ = [
    "EXTRA_COLUMNS",
    "FLAGS",
    "NOT_FRONTAL_FLAG",
    "SCHEMA_FILE",
    "SHIFT_FLAG",
    "UNCERTAIN_FLAG",
    "columns",
    "csv_cells",
    "error_row",
    "from_csv",
    "json_schema",
    "make_row",
    "model_id",
]

SCHEMA_FILE = PACKAGE_DIR / "schemas" / "prediction.schema.json"
SCHEMA_VERSION = 1
FLAGS: tuple[str, ...] = (NOT_FRONTAL_FLAG, UNCERTAIN_FLAG, SHIFT_FLAG)
#: the flags a predicted frontal image may carry, in this order, joined by "; "
_CASE_FLAGS: tuple[str, ...] = (UNCERTAIN_FLAG, SHIFT_FLAG)
CORE_BEFORE = ("path", "prediction")  # then prob_<class>...
CORE_AFTER = ("status", "flag", "ood_score", "ood_reason", "shift_score", "model_id")

#: the columns each output kind adds after the core ones, in order
EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {
    "predict": (),
    "predict-heatmaps": ("heatmap",),
    "explain": ("overlay",),
    "evaluate": ("label", "source"),
    "crossval": ("label", "source", "group", "fold"),
    "serve": (),
    "dicom": (
        "time", "event", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "sop_class_uid",
        "modality", "calling_ae", "dimse_status", "results", "send", "elapsed_ms",
    ),
}  # fmt: skip

_NUMBER_COLUMNS = frozenset({"ood_score", "shift_score", "elapsed_ms"})
_EXTRA_DOC: dict[str, str] = {
    "heatmap": "predict --heatmaps: the Grad-CAM overlay's file name, or error: <reason>",
    "overlay": "explain: the Grad-CAM overlay's file name",
    "label": "evaluate, crossval: the true class",
    "source": "evaluate, crossval: the image's source (dataset)",
    "group": "crossval: the patient/group id",
    "fold": "crossval: the fold that held the image out",
    "time": "DICOM log: when the record was written (UTC, ISO 8601)",
    "event": "DICOM log: received | pulled | resend",
    "dimse_status": "DICOM log: the C-STORE response status sent back, 0xNNNN",
    "results": "DICOM log: SOP Instance UIDs of the SR (and Secondary Capture), space separated",
    "send": "DICOM log: sent to <dest> | failed: <reason> | empty",
    "elapsed_ms": "DICOM log: milliseconds spent on the instance",
}


def columns(classes: Sequence[str], kind: str = "predict") -> list[str]:
    """The columns of a prediction row for ``classes``, in order, with those of output ``kind``."""
    if kind not in EXTRA_COLUMNS:
        raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(EXTRA_COLUMNS)}")
    return [*CORE_BEFORE, *[f"prob_{c}" for c in classes], *CORE_AFTER, *EXTRA_COLUMNS[kind]]


def model_id(checkpoint: str | Path, meta: Mapping[str, Any], sha256: str | None = None) -> str:
    """``<architecture>-<sha256[:12]>`` of a checkpoint file (``sha256``: its digest where known)."""
    from xraydx.fsutil import file_sha256

    arch = meta.get("architecture")
    name = str(arch.get("name", "unknown")) if isinstance(arch, Mapping) else "unknown"
    return f"{name}-{(sha256 or file_sha256(Path(checkpoint)))[:12]}"


def _number(v: Any) -> float | None:
    if v is None or v == "":
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def make_row(
    path: str,
    classes: Sequence[str],
    probs: Sequence[float] | None,
    status: str,
    *,
    model: str,
    flag: str | None = None,
    uncertain: bool | None = None,
    ood_score: float | str | None = None,
    ood_reason: str | None = None,
    shift_score: float | str | None = None,
    kind: str = "predict",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One prediction row (JSON types), every column of ``kind`` present, in order.

    The flag rule lives here: status ``not_cxr`` -> ``not a frontal chest X-ray`` (whatever the
    probabilities, replacing the others); else the case flags of ``flag`` (the predictor's, "; "-joined)
    and the abstention flag where ``uncertain``, in :data:`_CASE_FLAGS` order, on predicted rows only;
    else null. A ``skipped`` row with an ``ood_reason`` (the DICOM node's non-frontal views) is flagged
    not frontal too. An unknown flag text is a ValueError."""
    row: dict[str, Any] = dict.fromkeys(columns(classes, kind))
    row["path"] = str(path)
    if probs is not None:
        vals = [float(v) for v in probs]
        if len(vals) != len(classes):
            raise ValueError(f"{len(vals)} probabilities for {len(classes)} classes")
        row["prediction"] = classes[max(range(len(vals)), key=vals.__getitem__)]
        for c, v in zip(classes, vals, strict=True):
            row[f"prob_{c}"] = round(v, 6)
    row["status"] = status
    not_frontal = status == "not_cxr" or (status.startswith("skipped: ") and bool(ood_reason))
    if not_frontal:
        row["flag"] = NOT_FRONTAL_FLAG
        row["ood_reason"] = ood_reason or "does not look like a frontal chest X-ray"
    elif probs is not None:
        given = {f.strip() for f in (flag or "").split(";") if f.strip()} | (
            {UNCERTAIN_FLAG} if uncertain else set()
        )
        unknown = given - set(_CASE_FLAGS)
        if unknown:
            raise ValueError(f"unknown flag {sorted(unknown)[0]!r}; flags are {', '.join(FLAGS)}")
        row["flag"] = "; ".join(f for f in _CASE_FLAGS if f in given) or None
    score, shift = _number(ood_score), _number(shift_score)
    row["ood_score"] = None if score is None else round(score, 4)
    row["shift_score"] = None if shift is None else round(shift, 4)
    row["model_id"] = model
    for k, v in (extra or {}).items():
        if k in row and k not in ("path", "status", "model_id") and not k.startswith("prob_"):
            row[k] = None if v == "" else v
    return row


def error_row(path: str, classes: Sequence[str], reason: str, *, model: str, kind: str = "predict",
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The row of an input that could not be predicted: status ``error: <reason>``, every key present."""
    return make_row(path, classes, None, f"error: {reason}", model=model, kind=kind, extra=extra)


def csv_cells(row: Mapping[str, Any], cols: Sequence[str]) -> list[str]:
    """``row`` as CSV cells in ``cols`` order: null -> "", probabilities with 6 decimals, ood_score 4."""
    out = []
    for c in cols:
        v = row.get(c)
        if v is None:
            out.append("")
        elif c.startswith("prob_") and isinstance(v, (int, float)):
            out.append(f"{float(v):.6f}")
        elif c in ("ood_score", "shift_score") and isinstance(v, (int, float)):
            out.append(f"{float(v):.4f}")
        else:
            out.append(str(v))
    return out


def from_csv(row: Mapping[str, str]) -> dict[str, Any]:
    """A CSV row read back into the JSON types (empty -> null, numbers -> float)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v == "" or v is None:
            out[k] = None
        elif k.startswith("prob_") or k in _NUMBER_COLUMNS:
            out[k] = float(v)
        else:
            out[k] = v
    return out


# ---- the JSON Schema -----------------------------------------------------------------------------


def _nullable(t: str, **more: Any) -> dict[str, Any]:
    return {"type": [t, "null"], **more}


def _flag_pattern() -> str:
    case = "|".join(_CASE_FLAGS)
    return f"^({NOT_FRONTAL_FLAG}|({case})(; ({case}))*)$"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one prediction row, any model's classes, any output kind."""
    extras = sorted({c for cols in EXTRA_COLUMNS.values() for c in cols})
    props: dict[str, Any] = {
        "path": {"type": "string", "description": "the input as the entry point names it"},
        "prediction": _nullable("string", description="the class with the highest probability"),
        "status": {
            "type": "string", "pattern": "^(ok|not_cxr|error: .+|skipped: .+)$",
            "description": "ok | not_cxr | error: <reason> | skipped: <reason> (DICOM node)",
        },
        "flag": {
            "type": ["string", "null"], "pattern": _flag_pattern(),
            "description": "null, or why not to act on the prediction (not frontal; or uncertain and/or shifted)",
        },
        "ood_score": _nullable("number", description="the OOD guard's score (> 1: out of distribution)"),
        "ood_reason": _nullable("string", minLength=1, description="why the row is flagged not frontal"),
        "shift_score": _nullable("number", description="the source-shift score (xraydx.shift)"),
        "model_id": {"type": "string", "pattern": "^.+-[0-9a-f]{12}$", "description": "<arch>-<sha256[:12]>"},
    }  # fmt: skip
    for c in extras:
        kinds = [k for k, cols in EXTRA_COLUMNS.items() if c in cols]
        t = "number" if c in _NUMBER_COLUMNS else "string"
        props[c] = _nullable(t, description=_EXTRA_DOC.get(c, ", ".join(kinds)))
    prob = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
    predicted = {
        "properties": {"prediction": {"type": "string"}},
        "patternProperties": {"^prob_": {"type": "number"}},
    }
    nothing = {
        "properties": {"prediction": {"type": "null"}, "flag": {"enum": [None, NOT_FRONTAL_FLAG]}},
        "patternProperties": {"^prob_": {"type": "null"}},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "xraydx/prediction.schema.json",
        "title": "xraydx prediction row",
        "description": (
            "One row of every xraydx output that reports a prediction (predict CSV/JSON, evaluate, crossval,"
            " explain, serve's row, the DICOM results log). Column order: path, prediction, prob_<class> in"
            " the model's class order, status, flag, ood_score, ood_reason, shift_score, model_id, then the output"
            " kind's"
            " columns (x-extra-columns). Generated by xraydx.schema.json_schema()."
        ),
        "x-schema-version": SCHEMA_VERSION,
        "x-core-columns": [*CORE_BEFORE, "prob_<class>...", *CORE_AFTER],
        "x-extra-columns": {k: list(v) for k, v in EXTRA_COLUMNS.items()},
        "type": "object",
        "required": [*CORE_BEFORE, *CORE_AFTER],
        "properties": props,
        "patternProperties": {"^prob_.+$": prob},
        "additionalProperties": False,
        "minProperties": len(CORE_BEFORE) + len(CORE_AFTER) + 1,
        "allOf": [
            {  # a prediction (a DICOM log's resend record is about a result file, not an image)
                "if": {
                    "properties": {
                        "status": {"enum": ["ok", "not_cxr"]},
                        "event": {"not": {"const": "resend"}},
                    }
                },
                "then": predicted,
            },
            {"if": {"properties": {"status": {"pattern": "^(error|skipped): "}}}, "then": nothing},
            {
                "if": {"properties": {"status": {"const": "not_cxr"}}},
                "then": {
                    "properties": {"flag": {"const": NOT_FRONTAL_FLAG}, "ood_reason": {"type": "string"}}
                },
            },
            {
                "if": {"properties": {"flag": {"const": NOT_FRONTAL_FLAG}}},
                "then": {"properties": {"ood_reason": {"type": "string"}}},
                "else": {"properties": {"ood_reason": {"type": "null"}}},
            },
        ],
    }


def schema_text() -> str:
    """The JSON Schema as the shipped file holds it."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=True) + "\n"


if __name__ == "__main__":  # python -m xraydx.schema > src/xraydx/schemas/prediction.schema.json
    print(schema_text(), end="")
