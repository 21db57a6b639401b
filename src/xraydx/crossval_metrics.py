"""The numbers of a leave-source-out crossval, from its pooled out-of-source predictions.

Pooled: every image predicted by the fold model that never saw its source. Reported: the pooled
confusion matrix, balanced accuracy and macro-F1 with percentile-bootstrap 95% CIs; recall of each class
per held-out source with Wilson 95% intervals (honest at small n, where a bootstrap of 10 of 10 correct
gives the zero-width 1.000–1.000), cells with n < 30 marked; per-fold figures; and the uncertainty flag
on out-of-source images: the share of errors it catches, the accuracy of what it lets through, the
coverage–accuracy curve, and the threshold that would flag a target share of the out-of-source errors
(``oos_threshold``; what ``train.abstention_threshold`` can take for a model shipped to new sites).

What each fold's model learned each class from (:func:`training_coverage`, from the fold manifests): where
one source gives nearly all of a class's training images, that class's held-out recall measures how one
hospital's images transfer, and the summary counts the held-out images so judged (``one_source``).
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xraydx.constants import ONE_SOURCE_SHARE
from xraydx.metrics import (
    SMALL_N,
    compute_metrics,
    confidence_intervals,
    coverage_curve,
    recall_cells,
    wilson,
)

__all__ = [
    "SMALL_N",
    "flag_summary",
    "fold_training_coverage",
    "in_source_test",
    "one_source_lines",
    "recall_cells",
    "shift_summary",
    "shift_threshold",
    "summarize",
    "training_coverage",
    "wilson",
]


def _arrays(rows: Sequence[dict[str, str]], classes: Sequence[str]) -> dict[str, np.ndarray]:
    ok = [r for r in rows if r.get("prediction")]
    return {
        "y": np.array([classes.index(r["label"]) for r in ok], dtype=int),
        "p": np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ok], dtype=np.float64).reshape(
            len(ok), len(classes)
        ),
        "source": np.array([r.get("source", "") for r in ok], dtype=object),
        "fold": np.array([r.get("fold", "") for r in ok], dtype=object),
        # the tool's flag as shipped: 'uncertain' (abstention) or not a frontal CXR (OOD guard)
        "flagged": np.array([bool(r.get("flag")) or r.get("status") != "ok" for r in ok], dtype=bool),
        "not_cxr": np.array([r.get("status") == "not_cxr" for r in ok], dtype=bool),
        # the source-shift score (xraydx.shift), where the crossval computed it; NaN where not
        "shift": np.array([_float(r.get("shift_score")) for r in ok], dtype=np.float64),
    }


def _float(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def shift_threshold(wrong: np.ndarray, base: np.ndarray, shift: np.ndarray, target: float) -> float:
    """The largest ``S`` at which ``base | (shift >= S)`` flags at least ``target`` of the errors (inf when
    ``base`` alone does; the smallest score when even flagging everything scored is not enough)."""
    n_err = int(wrong.sum())
    need = int(np.ceil(target * n_err - 1e-9)) - int((wrong & base).sum())
    if need <= 0:
        return float("inf")
    rest = np.sort(shift[wrong & ~base & np.isfinite(shift)])[::-1]
    if not len(rest):
        return float("inf")
    return float(rest[min(need, len(rest)) - 1])


def _flag_stats(wrong: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    n_err = int(wrong.sum())
    return {
        "n": len(wrong),
        "coverage": float((~flagged).mean()) if len(wrong) else None,
        "errors_flagged": float((wrong & flagged).sum() / n_err) if n_err else None,
        "accuracy_accepted": float((~wrong[~flagged]).mean()) if (~flagged).any() else None,
    }


def shift_summary(a: dict[str, np.ndarray], target: float = 0.5) -> dict[str, Any] | None:
    """The shipped flag OR a source-shift threshold, on out-of-source images.

    ``threshold``: chosen on all pooled out-of-source predictions (what a shipped model takes); ``honest``:
    each fold flagged with the threshold chosen on the *other* folds only, so the figures are not fit to
    the images they are reported on. ``auroc_errors``: how well each score alone ranks errors above
    correct calls (0.5 = no better than chance)."""
    sh = a["shift"]
    if not np.isfinite(sh).any():
        return None
    y, p, base, fold, src = a["y"], a["p"], a["flagged"], a["fold"], a["source"]
    wrong = p.argmax(1) != y
    ok = np.isfinite(sh)
    out: dict[str, Any] = {"target_errors_flagged": target, "auroc_errors": {}}
    if wrong[ok].any() and (~wrong[ok]).any():
        from sklearn.metrics import roc_auc_score

        out["auroc_errors"] = {
            "shift_score": float(roc_auc_score(wrong[ok], sh[ok])),
            "one_minus_top_probability": float(roc_auc_score(wrong[ok], 1.0 - p[ok].max(1))),
        }
    s_all = shift_threshold(wrong, base, sh, target)
    out["threshold"] = s_all
    out["pooled_fit"] = _flag_stats(wrong, base | (sh >= s_all))
    honest = base.copy()
    per_fold_threshold = {}
    for f in sorted(set(fold.tolist())):
        sel = fold == f
        others = ~sel
        s_f = (
            shift_threshold(wrong[others], base[others], sh[others], target) if others.any() else float("inf")
        )
        per_fold_threshold[str(f)] = s_f
        honest[sel] = base[sel] | (sh[sel] >= s_f)
    out["honest"] = _flag_stats(wrong, honest)
    out["honest"]["threshold_per_fold"] = per_fold_threshold
    out["honest"]["per_source"] = {
        str(s): _flag_stats(wrong[src == s], honest[src == s]) for s in sorted(set(src.tolist()))
    }
    return out


def flag_summary(a: dict[str, np.ndarray], target: float = 0.5) -> dict[str, Any]:
    """How the shipped flag does on out-of-source images, and the threshold that would reach ``target``."""
    y, p, flagged = a["y"], a["p"], a["flagged"]
    wrong = p.argmax(1) != y
    n_err = int(wrong.sum())
    accepted = ~flagged
    out: dict[str, Any] = {
        "n": len(y),
        "n_errors": n_err,
        "n_flagged": int(flagged.sum()),
        "coverage": float(accepted.mean()) if len(y) else None,
        "errors_flagged": float((wrong & flagged).sum() / n_err) if n_err else None,
        "accuracy_accepted": float((~wrong[accepted]).mean()) if accepted.any() else None,
        "accuracy_all": float((~wrong).mean()) if len(y) else None,
        "coverage_curve": coverage_curve(y, p) if len(y) else [],
    }
    # the lowest top-probability threshold (most cases kept) at which >= target of the errors are flagged,
    # the OOD guard's not_cxr counting as flagged whatever the threshold
    top = p.max(1)
    best = None
    for t in np.unique(np.r_[top, 1.0 + 1e-9]):
        fl = (top < t) | a["not_cxr"]
        if n_err and (wrong & fl).sum() / n_err >= target - 1e-12:
            best = (float(t), fl)
            break
    if best is not None:
        t, fl = best
        out["oos_threshold"] = {
            "target_errors_flagged": target,
            "threshold": min(t, 1.0),
            "coverage": float((~fl).mean()),
            "errors_flagged": float((wrong & fl).sum() / n_err),
            "accuracy_accepted": float((~wrong[~fl]).mean()) if (~fl).any() else None,
        }
    return out


def training_coverage(
    train: Iterable[tuple[str, str]], classes: Sequence[str], share: float = ONE_SOURCE_SHARE
) -> dict[str, Any]:
    """Per class: a fold model's training images of that class by source (``train``: (label, source) of
    each), the largest source's share, and ``one_source`` where that share is ≥ ``share`` (or none)."""
    counts: dict[str, Counter[str]] = {c: Counter() for c in classes}
    for label, source in train:
        if label in counts:
            counts[label][source or "(no source)"] += 1
    out: dict[str, Any] = {}
    for c in classes:
        n = sum(counts[c].values())
        top = counts[c].most_common(1)
        out[c] = {
            "n": n,
            "by_source": dict(counts[c].most_common()),
            "top_source": top[0][0] if top else None,
            "top_share": top[0][1] / n if n else None,
            "one_source": not n or top[0][1] / n >= share,
        }
    return out


def fold_training_coverage(manifest_csv: Path, classes: Sequence[str]) -> dict[str, Any] | None:
    """:func:`training_coverage` of a crossval fold manifest's train split; None where it cannot be read."""
    try:
        with open(manifest_csv, encoding="utf-8", newline="") as fh:
            train = [
                (r["label"], r.get("source") or "") for r in csv.DictReader(fh) if r.get("split") == "train"
            ]
    except (OSError, KeyError, ValueError, csv.Error):
        return None
    return training_coverage(train, classes) if train else None


def in_source_test(run: Path) -> dict[str, Any] | None:
    """A fold run's own test split (its training sources' held-back patients), as its metrics.json has it."""
    try:
        m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    t = m.get("test")
    if not t:
        return None
    return {"n": t["n"], "macro_f1": t["macro_f1"], "balanced_accuracy": t.get("balanced_accuracy")}


def _one_source(
    a: dict[str, np.ndarray], pred: np.ndarray, classes: Sequence[str], coverage: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The held-out images whose class their fold's model learned from one source, and the recall there
    against the rest (None where no fold's coverage is known)."""
    known = np.array([f in coverage and coverage[f] is not None for f in a["fold"]])
    if not known.any():
        return None
    one = np.array(
        [
            bool(k and coverage[f][classes[c]]["one_source"])
            for k, f, c in zip(known, a["fold"], a["y"], strict=True)
        ]
    )
    right = pred == a["y"]
    cells = sorted({f"{f}: {classes[c]}" for f, c in zip(a["fold"][one], a["y"][one], strict=True)})
    rest = known & ~one
    return {
        "n": int(one.sum()),
        "of": int(known.sum()),
        "share": float(one.sum() / known.sum()),
        "recall": float(right[one].mean()) if one.any() else None,
        "recall_rest": float(right[rest].mean()) if rest.any() else None,
        "cells": cells,
        "threshold": ONE_SOURCE_SHARE,
    }


def summarize(
    rows: Sequence[dict[str, str]],
    classes: Sequence[str],
    *,
    folds: Sequence[str],
    in_source: dict[str, Any] | None = None,
    coverage: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The crossval's numbers (module docstring); ``coverage``: per fold, :func:`training_coverage` of its
    model's training images (None or absent where unknown)."""
    a = _arrays(rows, classes)
    y, p = a["y"], a["p"]
    if len(y) == 0:
        raise ValueError("no out-of-source image could be predicted")
    pred = p.argmax(1)
    with warnings.catch_warnings():  # the pooled set may lack a class (every fold normal-only, say)
        warnings.simplefilter("ignore", UserWarning)
        pooled = compute_metrics(y, p, classes)
    # Wilson for proportions, bootstrap over images (not within classes) for the rest: metrics.confidence_intervals
    pooled["ci"] = confidence_intervals(y, p, classes, n_boot=n_boot, seed=seed)
    pooled["recall"] = recall_cells(y, pred, classes)
    per_source: dict[str, Any] = {}
    for s in sorted(set(a["source"].tolist())):
        sel = a["source"] == s
        per_source[s] = {
            "n": int(sel.sum()),
            "fold": str(a["fold"][sel][0]),
            "accuracy": float((pred[sel] == y[sel]).mean()),
            "recall": recall_cells(y[sel], pred[sel], classes),
            "flagged": float(a["flagged"][sel].mean()),
        }
    per_fold: dict[str, Any] = {}
    for f in folds:
        sel = a["fold"] == f
        if not sel.any():
            continue
        present = sorted(set(y[sel].tolist()))
        recalls = [float((pred[sel][y[sel] == c] == c).mean()) for c in present]
        per_fold[f] = {
            "n": int(sel.sum()),
            "accuracy": float((pred[sel] == y[sel]).mean()),
            "balanced_accuracy": float(np.mean(recalls)),
            "recall": recall_cells(y[sel], pred[sel], classes),
            "in_source_test": (in_source or {}).get(f),
            "trained_on": (coverage or {}).get(f),
        }
    return {
        "what": "leave-source-out crossval: every image predicted by the fold model that never saw its source",
        "n_rows": len(rows),
        "n_unreadable": len(rows) - len(y),
        "classes": list(classes),
        "pooled": pooled,
        "per_source": per_source,
        "per_fold": per_fold,
        "one_source": _one_source(a, pred, classes, coverage or {}),
        "flag": flag_summary(a),
        "shift_flag": shift_summary(a),
    }


def one_source_lines(summary: Mapping[str, Any]) -> list[str]:
    """The log's lines on held-out classes their fold's model learned from one source (empty if none)."""
    lines = []
    for f, v in summary["per_fold"].items():
        cov = v.get("trained_on") or {}
        for c, cell in v["recall"].items():
            t = cov.get(c)
            if t and t["one_source"] and cell["n"]:
                lines.append(
                    f"fold {f}: its {cell['n']:,} {c} images are judged by a model that learned {c} from one"
                    f" source: {t['top_source']} ({t['by_source'].get(t['top_source'], 0):,} of {t['n']:,}"
                    " training images)"
                )
    o = summary.get("one_source")
    if o and o["n"]:
        lines.append(
            f"{o['n']:,} of {o['of']:,} held-out images ({o['share']:.0%}) are of a class their fold's model"
            f" learned from one source; recall {o['recall']:.3f} there, "
            + (f"{o['recall_rest']:.3f} on the rest" if o["recall_rest"] is not None else "no other images")
        )
    return lines
