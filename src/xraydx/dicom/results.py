"""The results log of the DICOM node and the DICOMweb pull: one record per instance, JSONL and CSV.

Rules:

* **No PHI.** A record holds UIDs, the calling AE title, codes and numbers, never a patient's name, ID,
  birth date or any free text taken from the dataset. UIDs are checked against the DICOM UID grammar
  (digits and dots, at most 64 characters) and replaced by ``invalid`` otherwise, so a malformed UID
  element cannot smuggle text into the log; short codes (Modality, ViewPosition) go through
  :func:`clean_code`.
* **Atomic records.** Each record is one line, written with a single ``write`` on a file opened with
  ``O_APPEND`` and fsynced, to ``results.jsonl`` and ``results.csv``. A reader ignores a last line
  without its line end (a kill mid-write), so a log is always a list of complete records.
* **Stable columns.** A record is a row of the one prediction schema (:mod:`xraydx.schema`, kind
  ``dicom``: the prediction columns first, ``path`` being the SOP Instance UID, then the log's own);
  the CSV header is fixed by the model's classes; appending to a log written with other columns is
  refused (:class:`ResultsLogError`) rather than mixing two layouts.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xraydx import schema
from xraydx.errors import XraydxError
from xraydx.fsutil import csv_writer

__all__ = ["Record", "ResultsLog", "ResultsLogError", "clean_code", "clean_uid", "read_records"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CODE = re.compile(r"[^A-Za-z0-9_ .\-]")
JSONL, CSV = "results.jsonl", "results.csv"


class ResultsLogError(XraydxError, ValueError):
    """A results log that cannot be used (other columns, not a log folder)."""


def clean_uid(value: Any) -> str:
    """A UID as text when it follows the UID grammar, "" when absent, else "invalid"."""
    if value is None:
        return ""
    text = str(value).strip().rstrip("\x00")
    if not text:
        return ""
    return text if len(text) <= 64 and _UID.match(text) else "invalid"


def clean_code(value: Any, limit: int = 16) -> str:
    """A short code string (Modality, ViewPosition, AE title): printable ASCII letters/digits only."""
    if value is None:
        return ""
    text = value[0] if isinstance(value, (list, tuple)) and value else value
    return _CODE.sub("?", str(text).strip())[:limit]


@dataclass
class Record:
    """What the log keeps about one instance (or one re-send)."""

    event: str  # received (listen) | pulled (pull) | resend
    sop_instance_uid: str
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    calling_ae: str = ""
    status: str = "ok"  # ok | skipped: <reason> | error: <reason>
    dimse_status: str = ""  # the C-STORE response status sent back (listen), as 0xNNNN
    probs: Sequence[float] | None = None
    flag: str = ""  # the predictor's flags (uncertain, source shift); the schema adds "not frontal"
    ood_score: float | None = None
    model_id: str = ""
    ood_reason: str = ""  # why the instance is not a frontal chest X-ray (view rule or OOD guard)
    shift_score: float | None = None  # the source-shift score (xraydx.shift), where the model has one
    results: list[str] = field(default_factory=list)  # SOP Instance UIDs of the SR (and Secondary Capture)
    send: str = ""  # sent to <dest> | failed: <reason> (pending) | "" (no destination)
    elapsed_ms: str = ""
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def prediction_index(self) -> int | None:
        if self.probs is None:
            return None
        return max(range(len(self.probs)), key=lambda i: self.probs[i])  # type: ignore[index]


def _columns(classes: Sequence[str]) -> list[str]:
    return schema.columns(classes, "dicom")


def _elapsed(v: str) -> float | None:
    try:
        return float(v) if v != "" else None
    except ValueError:
        return None


def _row(rec: Record, classes: Sequence[str], default_model: str = "") -> dict[str, Any]:
    """The record as one row of the prediction schema (JSON types)."""
    extra = {
        "time": rec.time,
        "event": rec.event,
        "sop_instance_uid": clean_uid(rec.sop_instance_uid),
        "study_instance_uid": clean_uid(rec.study_instance_uid),
        "series_instance_uid": clean_uid(rec.series_instance_uid),
        "sop_class_uid": clean_uid(rec.sop_class_uid),
        "modality": clean_code(rec.modality),
        "calling_ae": clean_code(rec.calling_ae),
        "dimse_status": rec.dimse_status,
        "results": " ".join(clean_uid(u) for u in rec.results),
        "send": rec.send,
        "elapsed_ms": _elapsed(rec.elapsed_ms),
    }
    return schema.make_row(
        clean_uid(rec.sop_instance_uid), classes, rec.probs, rec.status, model=rec.model_id or default_model,
        flag=rec.flag, ood_score=rec.ood_score, ood_reason=rec.ood_reason or None,
        shift_score=rec.shift_score, kind="dicom", extra=extra,
    )  # fmt: skip


class ResultsLog:
    """``results.jsonl`` + ``results.csv`` in ``folder``; thread-safe appends (see the module rules)."""

    def __init__(self, folder: Path, classes: Sequence[str], model_id: str = "") -> None:
        self.folder = Path(folder)
        self.model_id = model_id  # for records that carry none (resend)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.classes = list(classes)
        self.columns = _columns(self.classes)
        self._lock = threading.Lock()
        self.jsonl = self.folder / JSONL
        self.csv = self.folder / CSV
        header = _csv_header(self.csv)
        if header is not None and header != self.columns:
            raise ResultsLogError(
                f"{self.csv}: has the columns {','.join(header)}, not {','.join(self.columns)} (another"
                " model's classes?); choose another --out"
            )
        if header is None:
            _append_line(self.csv, _csv_line(self.columns), truncate_torn=True)

    @classmethod
    def open_existing(cls, folder: Path) -> ResultsLog:
        """The log already in ``folder`` (its classes read from the CSV header), for ``resend``."""
        header = _csv_header(Path(folder) / CSV)
        if header is None or "prob_" not in ",".join(header):
            raise ResultsLogError(
                f"{folder}: no results log here (not an output folder of xraydx dicom listen/pull)"
            )
        last = next((r.get("model_id") for r in reversed(read_records(folder)) if r.get("model_id")), "")
        return cls(
            folder, [c.removeprefix("prob_") for c in header if c.startswith("prob_")], str(last or "")
        )

    def write(self, rec: Record) -> dict[str, Any]:
        row = _row(rec, self.classes, self.model_id)
        with self._lock:
            _append_line(self.jsonl, json.dumps(row, ensure_ascii=True) + "\n")
            _append_line(self.csv, _csv_line(schema.csv_cells(row, self.columns)))
        return row

    def rows(self) -> list[dict[str, Any]]:
        return read_records(self.folder)

    def done_instances(self) -> set[str]:
        """SOP Instance UIDs with a final record (ok or skipped): pull does not fetch them again."""
        return {
            r["sop_instance_uid"]
            for r in self.rows()
            if r.get("event") in ("received", "pulled") and not str(r.get("status", "")).startswith("error")
        }


def _csv_line(values: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv_writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _csv_header(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8", newline="") as fh:
        first = fh.readline()
    if not first.endswith("\n"):
        return None
    return next(csv.reader([first]))


def _append_line(path: Path, line: str, truncate_torn: bool = False) -> None:
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and truncate_torn:
            os.ftruncate(fd, 0)  # a header torn by a kill: start the file again
        elif size:
            _seal_torn_line(fd, path)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal_torn_line(fd: int, path: Path) -> None:
    """If a kill left a last line without its line end, end it, so the next record starts on its own line
    (the torn line stays unparsable and is skipped by readers)."""
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            os.write(fd, b"\n")


def _lines(path: Path) -> Iterator[str]:
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    yield from text.splitlines()


def read_records(folder: Path) -> list[dict[str, Any]]:
    """The complete records of ``folder/results.jsonl`` (torn or unparsable lines skipped)."""
    out = []
    for line in _lines(Path(folder) / JSONL):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out
