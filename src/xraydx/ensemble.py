"""Ensembles of crossval runs, measured out of source.

Each member is a finished leave-source-out crossval run (:mod:`xraydx.crossval`) over the same images
and folds: its prediction of an image came from the fold model that never saw that image's source. The
mean of the members' probabilities is therefore an honest out-of-source estimate of an ensemble of
those recipes (independently trained models, averaged), and the members' disagreement is a candidate
uncertainty signal. :func:`combine` writes a crossval-like run folder::

    <runs>/<name>/crossval.json     "ensemble_of": the member run folders, "folds": theirs
    <runs>/<name>/predictions.csv   one row per image: the members' mean probabilities, prediction =
                                    their argmax, flag, members_agree, pred_<member> per member
    <runs>/<name>/metrics.json      crossval_metrics.summarize of those rows + an ``ensemble`` block
    <runs>/<name>/report.html       the crossval page + the ensemble's signals
    <runs>/<name>/crossval.log

The rule, per image: a member that could not predict it (status ``error: ...``) makes the row that error
(nothing averaged); else prediction = argmax of the mean probability, status ``not_cxr`` where any member
has it, and flagged where any member flagged it or the members' top classes differ. ``shift_score`` is
left empty: each member's score is its own fold model's, and no single checkpoint computes their mean.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from xraydx.constants import NOT_FRONTAL_FLAG, UNCERTAIN_FLAG
from xraydx.crossval_folds import Fold
from xraydx.crossval_metrics import summarize
from xraydx.errors import OutputExistsError, UsageError
from xraydx.fsutil import (
    CsvDictWriter,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    csv_unescape,
    json_safe,
    printable_path,
)
from xraydx.schema import SHIFT_FLAG, columns, csv_cells, make_row

__all__ = ["RULE", "Member", "combine", "combine_rows", "read_member", "signal_stats"]

RULE = (
    "probabilities: the mean of the members' per image; prediction: its argmax; flag: uncertain where any"
    " member flagged the image or the members' top classes differ; a member's error row stays an error"
)
NEEDED = ("path", "prediction", "status", "flag", "label", "source", "fold")
SHOWN = 3  # how many differing paths an error names


@dataclass(frozen=True)
class Member:
    """One finished crossval run, read: its pooled predictions by path (in file order)."""

    run: Path
    name: str
    folds: list[list[str]]
    classes: tuple[str, ...]
    rows: dict[str, dict[str, str]]
    metrics: dict[str, Any] | None
    info: dict[str, Any]


def _shown(path: Path) -> str:
    return printable_path(str(path))


def _predictions_file(run: Path) -> Path:
    for name in ("predictions.csv", "predictions.csv.gz"):
        if (run / name).is_file():
            return run / name
    raise UsageError(
        f"{_shown(run)}: no predictions.csv or predictions.csv.gz (a crossval that has not finished?)"
    )


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise UsageError(f"{_shown(path)}: cannot read it ({exc})") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = [{k: csv_unescape(v or "") for k, v in r.items()} for r in reader]
    return list(reader.fieldnames or []), rows


def read_member(run: Path | str) -> Member:
    """A crossval run folder's folds (crossval.json), pooled predictions and metrics.json, checked."""
    run = Path(run)
    info_file = run / "crossval.json"
    if not info_file.is_file():
        raise UsageError(f"{_shown(run)}: not a crossval run folder (no crossval.json)")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        folds = [list(map(str, f)) for f in info["folds"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{_shown(info_file)}: cannot read its folds ({exc})") from exc
    pred_file = _predictions_file(run)
    header, rows = _read_csv(pred_file)
    classes = tuple(c.removeprefix("prob_") for c in header if c.startswith("prob_"))
    missing = [c for c in NEEDED if c not in header]
    if missing or not classes:
        raise UsageError(
            f"{_shown(pred_file)}: not a crossval predictions file: no column "
            f"{', '.join(missing) or 'prob_<class>'}"
        )
    by_path: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["path"] in by_path:
            raise UsageError(f"{_shown(pred_file)}: the image {printable_path(r['path'])} is in it twice")
        by_path[r["path"]] = r
    if not by_path:
        raise UsageError(f"{_shown(pred_file)}: no predictions")
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = None
    return Member(run, run.resolve().name, folds, classes, by_path, metrics, info)


def _first(paths: Sequence[str]) -> str:
    return ", ".join(printable_path(p) for p in sorted(paths)[:SHOWN])


def check_members(members: Sequence[Member]) -> None:
    """Refuse members that are not over the same images (path, label, source, fold) and folds."""
    if len(members) < 2:
        raise UsageError("ensemble: give at least two crossval runs")
    ref = members[0]
    seen: dict[str, Path] = {}
    for m in members:
        if m.name in seen:
            raise UsageError(
                f"ensemble: two members are named {m.name!r} ({_shown(seen[m.name])}, {_shown(m.run)});"
                " each member's predictions get a column pred_<name>"
            )
        seen[m.name] = m.run
    for m in members[1:]:
        where = f"{_shown(m.run)} (member {m.name}) does not match {ref.name}"
        if m.folds != ref.folds:
            raise UsageError(f"{where}: its crossval.json folds {m.folds} differ from {ref.folds}")
        if m.classes != ref.classes:
            raise UsageError(f"{where}: its classes {list(m.classes)} differ from {list(ref.classes)}")
        only_m = m.rows.keys() - ref.rows.keys()
        only_ref = ref.rows.keys() - m.rows.keys()
        if only_m or only_ref:
            parts = [
                f"{n} images only in {who}" + (f" ({_first(list(only))})" if only else "")
                for n, who, only in ((len(only_m), m.name, only_m), (len(only_ref), ref.name, only_ref))
            ]
            raise UsageError(f"{where}: the image sets differ: {'; '.join(parts)}")
        for col in ("label", "source", "fold"):
            diff = [p for p, r in ref.rows.items() if m.rows[p][col] != r[col]]
            if diff:
                p = sorted(diff)[0]
                raise UsageError(
                    f"{where}: the {col} differs for {len(diff)} images (first: {printable_path(p)}: "
                    f"{m.rows[p][col]!r} vs {ref.rows[p][col]!r})"
                )


def _probs(r: dict[str, str], classes: Sequence[str]) -> list[float] | None:
    if not r.get("prediction") or r.get("status", "").startswith("error"):
        return None
    try:
        return [float(r[f"prob_{c}"]) for c in classes]
    except (KeyError, ValueError):
        return None


def _number(v: str | None) -> float | None:
    try:
        f = float(v) if v else None
    except ValueError:
        return None
    return f if f is not None and np.isfinite(f) else None


def _member_flagged(r: dict[str, str]) -> bool:
    """What crossval_metrics counts as flagged: a flag, or a status other than ok."""
    return bool(r.get("flag")) or r.get("status") != "ok"


def _case_flags(m: Member, r: dict[str, str]) -> set[str]:
    given = {f.strip() for f in (r.get("flag") or "").split(";") if f.strip()} - {NOT_FRONTAL_FLAG}
    unknown = given - {UNCERTAIN_FLAG, SHIFT_FLAG}
    if unknown:
        raise UsageError(f"{_shown(m.run)}: {printable_path(r['path'])}: unknown flag {sorted(unknown)[0]!r}")
    return given


def _model_id(members: Sequence[Member], rows: Sequence[dict[str, str]]) -> str:
    ids = [r.get("model_id") or f"{m.name}/{r.get('fold', '')}" for m, r in zip(members, rows, strict=True)]
    return "ensemble-" + hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:12]


def combine_rows(members: Sequence[Member]) -> list[dict[str, str]]:
    """The ensemble's prediction rows (CSV cells), in the first member's order; see the module doc."""
    classes = members[0].classes
    cols = [*columns(classes, "crossval"), "members_agree", *[f"pred_{m.name}" for m in members]]
    out = []
    for path, first in members[0].rows.items():
        rs = [m.rows[path] for m in members]
        preds = {f"pred_{m.name}": r.get("prediction", "") for m, r in zip(members, rs, strict=True)}
        extra: dict[str, Any] = {k: first.get(k, "") for k in ("label", "source", "group", "fold")}
        probs = [_probs(r, classes) for r in rs]
        model = _model_id(members, rs)
        if any(p is None for p in probs):
            bad = next(r for r, p in zip(rs, probs, strict=True) if p is None)
            status = bad.get("status") or "error: not predicted"
            if not status.startswith("error"):
                status = f"error: {status}"
            row = make_row(path, classes, None, status, model=model, kind="crossval", extra=extra)
        else:
            agree = len({r["prediction"] for r in rs}) == 1
            not_cxr = [r for r in rs if r.get("status") == "not_cxr"]
            flags: set[str] = set()
            for m, r in zip(members, rs, strict=True):
                flags |= _case_flags(m, r)
            oods = [v for v in (_number(r.get("ood_score")) for r in rs) if v is not None]
            row = make_row(
                path, classes, list(np.mean(np.array(probs), axis=0)), "not_cxr" if not_cxr else "ok",
                model=model, flag="; ".join(sorted(flags)), uncertain=not agree,
                ood_score=float(np.mean(oods)) if len(oods) == len(rs) else None,
                ood_reason=(not_cxr[0].get("ood_reason") or None) if not_cxr else None,
                kind="crossval", extra=extra,
            )  # fmt: skip
            row["members_agree"] = "true" if agree else "false"
        row.update(preds)
        out.append(dict(zip(cols, csv_cells(row, cols), strict=True)))
    return out


def signal_stats(wrong: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    """How a flag does on out-of-source images: the share of errors it catches, of cases it keeps, and
    the accuracy of those it keeps."""
    n_err, kept = int(wrong.sum()), ~flagged
    return {
        "n": len(wrong),
        "n_flagged": int(flagged.sum()),
        "coverage": float(kept.mean()) if len(wrong) else None,
        "errors_flagged": float((wrong & flagged).sum() / n_err) if n_err else None,
        "accuracy_accepted": float((~wrong[kept]).mean()) if kept.any() else None,
    }


def _signals(members: Sequence[Member], rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """(a) the members' own flags, (b) their disagreement, (c) both: on the pooled predicted rows."""
    classes = members[0].classes
    ok = [r for r in rows if r["prediction"]]
    y = np.array([classes.index(r["label"]) for r in ok], dtype=int)
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ok]).reshape(len(ok), len(classes))
    wrong = p.argmax(1) != y
    by_member = np.array(
        [[_member_flagged(m.rows[r["path"]]) for m in members] for r in ok], dtype=bool
    ).reshape(len(ok), len(members))
    member_flag = by_member.any(1)
    disagree = np.array([r["members_agree"] != "true" for r in ok], dtype=bool)
    return {
        "agree_share": float((~disagree).mean()) if len(ok) else None,
        "accuracy_when_agree": float((~wrong[~disagree]).mean()) if (~disagree).any() else None,
        "accuracy_when_disagree": float((~wrong[disagree]).mean()) if disagree.any() else None,
        "members_flags": signal_stats(wrong, member_flag),
        "disagreement": signal_stats(wrong, disagree),
        "union": signal_stats(wrong, member_flag | disagree),
    }


def _in_source(members: Sequence[Member], folds: Sequence[str]) -> dict[str, Any]:
    """Per fold: the mean of the members' in-source test figures, where every member has them."""
    out: dict[str, Any] = {}
    for f in folds:
        got = [
            ((m.metrics or {}).get("per_fold", {}).get(f) or {}).get("in_source_test") or {} for m in members
        ]
        if not all(g.get("macro_f1") is not None for g in got):
            continue
        bal = [g.get("balanced_accuracy") for g in got]
        ns = {g.get("n") for g in got}
        out[f] = {
            "n": ns.pop() if len(ns) == 1 else None,
            "macro_f1": float(np.mean([g["macro_f1"] for g in got])),
            "balanced_accuracy": None if None in bal else float(np.mean(bal)),
            "of": "mean of the members' in-source test figures",
        }
    return out


def _coverage(members: Sequence[Member], folds: Sequence[str]) -> dict[str, Any]:
    """Per fold: what its models learned each class from, where every member's summary says the same."""
    out: dict[str, Any] = {}
    for f in folds:
        got = [((m.metrics or {}).get("per_fold", {}).get(f) or {}).get("trained_on") for m in members]
        if got[0] and all(g == got[0] for g in got):
            out[f] = got[0]
    return out


def _member_summary(m: Member) -> dict[str, Any]:
    mt = m.metrics or {}
    pooled, flag = mt.get("pooled") or {}, mt.get("flag") or {}
    return {
        "name": m.name, "run": str(m.run.resolve()), "recipe": mt.get("recipe"),
        "balanced_accuracy": pooled.get("balanced_accuracy"), "macro_f1": pooled.get("macro_f1"),
        "errors_flagged": flag.get("errors_flagged"), "coverage": flag.get("coverage"),
        "accuracy_accepted": flag.get("accuracy_accepted"),
    }  # fmt: skip


def _section(e: dict[str, Any]) -> str:
    from xraydx.report import esc, fmt, table

    names = ", ".join(esc(m["name"]) for m in e["members"])
    sig = e["signals"]
    what = {"members_flags": "the members' own flags (any member)", "disagreement": "the members' top classes differ",
            "union": "either (the ensemble's flag)"}  # fmt: skip
    return "\n".join(
        [
            f"<h2>The ensemble</h2><p>Members: {names}. {esc(e['rule'])}.</p>",
            table(
                ["member", "balanced accuracy", "macro-F1", "errors flagged", "coverage"],
                [
                    [
                        esc(m["name"]),
                        fmt(m["balanced_accuracy"]),
                        fmt(m["macro_f1"]),
                        fmt(m["errors_flagged"]),
                        fmt(m["coverage"]),
                    ]
                    for m in e["members"]
                ],
            ),  # fmt: skip
            f"<p>The members agree on {fmt(sig['agree_share'])} of the images; accuracy where they agree"
            f" {fmt(sig['accuracy_when_agree'])}, where they differ {fmt(sig['accuracy_when_disagree'])}.</p>",
            table(
                ["flagged where", "flagged", "errors flagged", "coverage", "accuracy accepted"],
                [
                    [
                        esc(what[k]),
                        str(sig[k]["n_flagged"]),
                        fmt(sig[k]["errors_flagged"]),
                        fmt(sig[k]["coverage"]),
                        fmt(sig[k]["accuracy_accepted"]),
                    ]
                    for k in what
                ],
            ),  # fmt: skip
        ]
    )


def combine(runs: Sequence[Path | str], name: str, runs_dir: Path | str = "runs") -> Path:
    """Combine the crossval runs ``runs`` into the new run folder ``runs_dir/name``; returns it."""
    from xraydx.report import write_html
    from xraydx.report_crossval import crossval_page

    out = Path(runs_dir) / name
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{_shown(out)}: already exists; choose another --name")
    members = [read_member(r) for r in runs]
    check_members(members)
    log: list[str] = []

    def say(msg: str) -> None:
        msg = printable_path(msg)
        print(f"ensemble: {msg}", flush=True)
        log.append(f"{datetime.now().isoformat(timespec='seconds')} {msg}")

    for m in members:
        say(f"member {m.name}: {_shown(m.run)}, {len(m.rows)} images")
    rows = combine_rows(members)
    folds = [Fold(i + 1, tuple(s)).name for i, s in enumerate(members[0].folds)]
    summary = summarize(
        rows,
        members[0].classes,
        folds=folds,
        in_source=_in_source(members, folds),
        coverage=_coverage(members, folds),
    )
    summary["what"] = (
        "ensemble of leave-source-out crossvals: every image predicted by each member's fold model that never"
        " saw its source, the members' probabilities averaged"
    )
    summary["ensemble"] = {
        "members": [_member_summary(m) for m in members],
        "rule": RULE,
        "signals": _signals(members, rows),
    }
    pipelines = {m.info.get("pipeline", "cached") for m in members}
    data = {m.info.get("data") for m in members}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "crossval.json",
        {
            "ensemble_of": [str(m.run.resolve()) for m in members],
            "data": data.pop() if len(data) == 1 else None,
            "by": "source",
            "pipeline": pipelines.pop() if len(pipelines) == 1 else "mixed",
            "folds": members[0].folds,
        },
    )
    with atomic_open(out / "predictions.csv", "w", encoding="utf-8", newline="") as fh:
        w = CsvDictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_json(out / "metrics.json", json_safe(summary))
    page = crossval_page(
        summary, title=f"xraydx crossval ensemble {name}", extra=_section(summary["ensemble"])
    )
    write_html(out / "report.html", page, overwrite=True)
    p, sig = summary["pooled"], summary["ensemble"]["signals"]
    say(
        f"pooled out-of-source: n={p['n']}, balanced accuracy {p['balanced_accuracy']:.3f} "
        f"[{p['ci']['balanced_accuracy'][0]:.3f}-{p['ci']['balanced_accuracy'][1]:.3f}], macro-F1 "
        f"{p['macro_f1']:.3f}; errors flagged: members' flags {_pct(sig['members_flags'])}, disagreement "
        f"{_pct(sig['disagreement'])}, either {_pct(sig['union'])}"
    )
    say(f"run folder: {_shown(out)}")
    atomic_write_text(out / "crossval.log", "\n".join(log) + "\n")
    return out


def _pct(s: dict[str, Any]) -> str:
    v = s["errors_flagged"]
    return "—" if v is None else f"{v:.0%}"
