"""Class offsets chosen out of source, measured fold by fold (docs/generalisation.md, thirteenth round (b)).

    python scripts/class_offsets.py docs/results/crossval/R8-W25K-s0 [--out runs/off] [--step 0.05]

For a finished crossval run, a per-class offset is added to the log-probabilities before the argmax,
chosen to maximise balanced accuracy on out-of-source predictions. Honestly, per fold: each fold's
offsets are fitted on the *other* folds' held-out images only, then applied to its own. The last class
is the reference (offset 0); the others are searched on a grid over [-2, 2]. Prints one JSON line per
run: the pooled balanced accuracy before and after, the offsets per fold and fitted on all folds (what a
shipped model would carry), the offsets that would be best in hindsight on all images (an optimistic
ceiling, not a result), and recalls per class and per (source, class). With ``--out``, writes a copy of
the run folder whose predictions carry the nested offsets' calls, for ``xraydx crossval compare``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import shutil
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np


def read_run(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    f = run / "predictions.csv.gz"
    if not f.is_file():
        f = run / "predictions.csv"
    if not f.is_file():
        raise SystemExit(f"{run}: no predictions.csv(.gz): not a finished crossval run folder")
    raw = f.read_bytes()
    text = (gzip.decompress(raw) if f.suffix == ".gz" else raw).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows:
        raise SystemExit(f"{f}: no predictions")
    missing = sorted({"label", "source", "status", "fold", "prediction"} - set(rows[0]))
    classes = [k.removeprefix("prob_") for k in rows[0] if k.startswith("prob_")]
    if missing or not classes:
        raise SystemExit(
            f"{f}: not a crossval predictions file: no column {', '.join(missing) or 'prob_<class>'}"
        )
    return classes, rows


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in range(k) if (y == c).any()]))


def fit(logp: np.ndarray, y: np.ndarray, step: float = 0.05, bound: float = 2.0) -> np.ndarray:
    """The offsets (last class 0) that maximise balanced accuracy on these rows; ties go to the smallest."""
    k = logp.shape[1]
    grid = np.round(np.arange(-bound, bound + step / 2, step), 6)
    best: tuple[float, float] = (-1.0, 0.0)
    best_o = np.zeros(k)
    for free in product(grid, repeat=k - 1):
        o = np.array([*free, 0.0])
        key = (balanced_accuracy(y, np.argmax(logp + o, 1), k), -float(o @ o))
        if key > best:
            best, best_o = key, o
    return best_o


def nested(
    logp: np.ndarray, y: np.ndarray, fold: np.ndarray, step: float
) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Each fold's calls with offsets fitted on the other folds' rows only."""
    pred = np.argmax(logp, 1)
    per_fold: dict[str, list[float]] = {}
    for f in sorted(set(fold)):
        o = fit(logp[fold != f], y[fold != f], step)
        per_fold[str(f)] = o.tolist()
        pred[fold == f] = np.argmax(logp[fold == f] + o, 1)
    return pred, per_fold


def measure(run: Path, out: Path | None, step: float) -> dict[str, Any]:
    classes, rows = read_run(run)
    ok = [r for r in rows if r["status"] == "ok" and r["label"] in classes]
    code = {c: i for i, c in enumerate(classes)}
    logp = np.log(np.clip(np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ok]), 1e-12, 1.0))
    y = np.array([code[r["label"]] for r in ok])
    fold = np.array([r["fold"] for r in ok])
    src = np.array([r["source"] for r in ok])
    before = np.array([code.get(r["prediction"], -1) for r in ok])
    after, per_fold = nested(logp, y, fold, step)
    k = len(classes)
    cells = {}
    for s in sorted(set(src)):
        for c in range(k):
            m = (src == s) & (y == c)
            if m.any():
                cells[f"{s}:{classes[c]}"] = [float(np.mean(before[m] == c)), float(np.mean(after[m] == c))]
    hindsight = fit(logp, y, step)
    result = {
        "run": str(run),
        "balanced_accuracy": [balanced_accuracy(y, before, k), balanced_accuracy(y, after, k)],
        "recall": {
            classes[c]: [float(np.mean(before[y == c] == c)), float(np.mean(after[y == c] == c))]
            for c in range(k)
        },
        "cells": cells,
        "offsets_per_fold": per_fold,
        "offsets_all_folds": hindsight.tolist(),
        "hindsight_balanced_accuracy": balanced_accuracy(y, np.argmax(logp + hindsight, 1), k),
    }
    if out is not None:
        dest = out / f"{run.resolve().name}-offsets"
        if dest.exists():
            raise SystemExit(f"{dest} exists: not overwriting it")
        dest.mkdir(parents=True)
        shutil.copy(run / "crossval.json", dest / "crossval.json")
        calls = iter(after)
        for r in rows:
            if r["status"] == "ok" and r["label"] in classes:
                r["prediction"] = classes[next(calls)]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        (dest / "predictions.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode("utf-8")))
        result["written"] = str(dest)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished crossval run folders")
    ap.add_argument("--out", type=Path, help="write each run's copy with the nested offsets' calls here")
    ap.add_argument("--step", type=float, default=0.05, help="grid step of the offsets (default 0.05)")
    a = ap.parse_args(argv)
    for run in a.runs:
        print(json.dumps(measure(run, a.out, a.step)))


if __name__ == "__main__":
    main()
