"""The predictions file: one row of :mod:`xraydx.schema` per image, written atomically (CSV or JSON), or with
``--resume`` appended row by row and fsynced so a killed run carries on where it stopped; the rows a killed
run left (``done_paths``). Used by ``xraydx predict``, ``evaluate`` and the crossval."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from xraydx import schema
from xraydx.errors import UsageError
from xraydx.fsutil import (
    WRITE_ERRNOS,
    OutputExistsError,
    atomic_open,
    csv_unescape,
    csv_writer,
    output_error,
    printable_path,
    refuse_overwrite,
)
from xraydx.predict import Prediction

__all__ = ["csv_columns", "done_paths", "prediction_row", "resume_source", "write_predictions"]


def prediction_row(
    pred: Prediction, classes: Sequence[str], model_id: str = "", kind: str = "predict"
) -> dict[str, Any]:
    """``pred`` as one row of the prediction schema (:mod:`xraydx.schema`; JSON types, every column)."""
    own = ("flag", "ood_score", "ood_reason", "shift_score", "ood")
    extra = {k: v for k, v in pred.extra.items() if k not in own}
    return schema.make_row(
        pred.path, classes, pred.probs, pred.status, model=model_id, flag=pred.extra.get("flag"),
        ood_score=pred.extra.get("ood_score"), ood_reason=pred.extra.get("ood_reason"),
        shift_score=pred.extra.get("shift_score"), kind=kind, extra=extra,
    )  # fmt: skip


def csv_columns(classes: Sequence[str], kind: str = "predict") -> list[str]:
    """The CSV header of output ``kind``: :func:`xraydx.schema.columns`."""
    return schema.columns(classes, kind)


def write_predictions(
    preds: Iterable[Prediction],
    out: Path,
    classes: Sequence[str],
    *,
    model_id: str,
    fmt: str = "csv",
    overwrite: bool = False,
    resume: bool = False,
    kind: str = "predict",
    meta: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Write predictions atomically, one row of :mod:`xraydx.schema` each (columns of ``kind``), in the
    order given; return counts {"ok": n, "error": n, "not_cxr": n}.

    resume (CSV only): rows already in ``out`` are kept, their paths skipped by the caller."""
    counts = {"ok": 0, "error": 0}
    cols = csv_columns(classes, kind)

    def tally(p: Prediction) -> dict[str, Any]:
        if p.probs is None:
            counts["error"] += 1
            print(f"xraydx: {printable_path(p.path)}: {p.status.removeprefix('error: ')}", file=sys.stderr)
        else:
            counts["ok"] += 1
            if p.status == "not_cxr":
                counts["not_cxr"] = counts.get("not_cxr", 0) + 1
                score = p.extra.get("ood_score")
                s = f"ood score {score:.3f}: " if isinstance(score, float) else ""
                print(f"xraydx: warning: {printable_path(p.path)}: does not look like a frontal chest X-ray"
                      f" ({s}{p.extra.get('ood_reason') or ''}); flagged, its probabilities are for reference only",
                      file=sys.stderr)  # fmt: skip
        return prediction_row(p, classes, model_id, kind)

    if fmt == "json":
        if resume:
            raise UsageError("--resume works with CSV output only (--format csv)")
        refuse_overwrite(out, overwrite)
        rows = [tally(p) for p in preds]
        doc = {"model": meta or {}, "model_id": model_id, "classes": list(classes),
               "schema": schema.SCHEMA_FILE.name, "columns": cols, "predictions": rows}  # fmt: skip
        with atomic_open(out, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        return counts
    if fmt != "csv":
        raise ValueError(f"format must be csv or json; got {fmt!r}")
    if resume:
        # stream into <out>.partial, fsynced row by row; a rerun carries it on; renamed to <out> at the end.
        # The rows kept (of the partial file, else of <out>) are rewritten atomically first, without a last
        # row torn by a kill mid-write: that file is then predicted again (done_paths skips it too).
        source = resume_source(out)
        partial = out.with_name(out.name + ".partial")
        header, kept = _complete_rows(source) if source.exists() else (None, [])
        if header is not None and header != cols:
            raise OutputExistsError(
                f"{printable_path(str(source))}: has the columns {','.join(header)}, not {','.join(cols)}; "
                "cannot --resume into it (choose another --out)"
            )
        if header is not None and "model_id" in header:
            i = header.index("model_id")
            others = sorted({csv_unescape(r[i]) for r in kept if r[i] and csv_unescape(r[i]) != model_id})
            if others:
                raise OutputExistsError(
                    f"{printable_path(str(source))}: holds rows of another model ({others[0]}), not of "
                    f"{model_id}; --resume would mix two models in one file (use the same --checkpoint, or "
                    "another --out)"
                )
        with atomic_open(partial, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            cw = csv.writer(fh)  # the kept rows, as they are in the file (escaped already)
            cw.writerow(cols)
            cw.writerows(kept)
        try:
            with open(partial, "a", encoding="utf-8", errors="surrogateescape", newline="") as fh:
                w = csv_writer(fh)
                for p in preds:
                    w.writerow(schema.csv_cells(tally(p), cols))
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:  # disk full: the rows so far stay in the partial file for --resume
                raise output_error(partial, exc) from exc
            raise
        os.replace(partial, out)
        return counts
    refuse_overwrite(out, overwrite)
    stale = out.with_name(out.name + ".partial")
    if stale.exists():  # a killed --resume run's rows: this run is not resuming, so they would never be used
        stale.unlink()
        print(f"xraydx: note: removed {printable_path(str(stale))}, left by an earlier killed run "
              "(this run predicts everything again; --resume would have carried it on)", file=sys.stderr)  # fmt: skip
    with atomic_open(out, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        w = csv_writer(fh)
        w.writerow(cols)
        for p in preds:
            w.writerow(schema.csv_cells(tally(p), cols))
    return counts


def resume_source(out: Path) -> Path:
    """``<out>.partial`` (a killed --resume run's rows) where it exists, refused when it is older than a
    complete ``out`` (a stale partial must never beat a newer finished output); else ``out``."""
    partial = out.with_name(out.name + ".partial")
    if not partial.exists():
        return out
    if out.exists() and out.stat().st_mtime_ns > partial.stat().st_mtime_ns:
        raise OutputExistsError(
            f"{printable_path(str(partial))}: older than the finished {printable_path(str(out))}; it is left "
            "from an earlier killed run and --resume would replace the newer file with it: delete it to "
            "resume from the finished file"
        )
    return partial


def done_paths(out: Path) -> set[str]:
    """Paths already predicted for --resume: the complete rows of ``<out>.partial`` (a killed run's), else of
    ``out``; the same rows that write_predictions(resume=True) keeps."""
    source = resume_source(out)
    if not source.exists():
        return set()
    header, rows = _complete_rows(source)
    if header is None or "path" not in header:
        return set()
    i = header.index("path")
    return {csv_unescape(r[i]) for r in rows if r[i]}


def _complete_rows(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """Header and complete rows of a CSV that a kill may have cut short: a last line without its line end,
    and any row with the wrong number of fields, are dropped. Header None: the file has no complete line."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        text = fh.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return None, []
    return rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
