"""Is recipe B better than recipe A at a hospital neither has seen, beyond noise? A paired comparison of two
finished crossval runs over the same images and folds.

Both runs predicted every image with a model that never saw its source, so the difference of any pooled
figure (B − A) is measured on the same images. Its 95% interval comes from a paired bootstrap that resamples
**patient groups** (the ``group`` column: images of one patient go together, as the splits keep them), the
same resample for both runs, so the interval is about the recipes and not about which images were drawn.
It is still optimistic about a *new* site: the sources are fixed, only patients are resampled; and a
difference between two runs is partly a difference between two seeds (docs/generalisation.md measures
one recipe at two seeds).

Figures: pooled balanced accuracy, macro-F1, recall per class, recall per (held-out source, class), and
the share of errors the flag catches; images that either run could not read are left out (counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xraydx.constants import COMPARE_RESAMPLES
from xraydx.ensemble import check_members, read_member
from xraydx.errors import UsageError

DEFAULT_RESAMPLES = COMPARE_RESAMPLES


def figures(
    y: np.ndarray,
    pred: np.ndarray,
    flag: np.ndarray,
    source: np.ndarray,
    n_classes: int,
    sources: Sequence[int],
) -> dict[str, float]:
    """The compared figures of one (re)sample, from integer class codes (one confusion matrix: fast enough
    for a thousand resamples; the tests check it against scikit-learn). NaN where a figure has no case."""
    k = n_classes
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    support, predicted, hit = cm.sum(1), cm.sum(0), np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hit / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * hit / (support + predicted), 0.0)
    out = {"balanced_accuracy": float(np.nanmean(recall)), "macro_f1": float(f1.mean())}
    for c in range(k):
        out[f"recall {c}"] = float(recall[c])
    for s in sources:
        for c in range(k):
            m = (source == s) & (y == c)
            out[f"recall {c} @ {s}"] = float(np.mean(pred[m] == c)) if m.any() else float("nan")
    wrong = pred != y
    out["errors flagged"] = float(np.mean(flag[wrong])) if wrong.any() else float("nan")
    return out


def compare(
    run_a: Path | str, run_b: Path | str, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """B − A for every figure, with the paired patient-group bootstrap 95% interval."""
    if resamples < 100:
        raise UsageError(f"--resamples must be at least 100 for a 95% interval; got {resamples}")
    a, b = read_member(run_a), read_member(run_b)
    if a.run.resolve() == b.run.resolve():
        raise UsageError(f"crossval compare: {a.run} is given twice")
    check_members([a, b])
    ok = [k for k in a.rows if _usable(a.rows[k]) and _usable(b.rows[k])]
    if not ok:
        raise UsageError(f"crossval compare: no image has a prediction in both {a.name} and {b.name}")
    classes = list(a.classes)
    code = {c: i for i, c in enumerate(classes)}
    src_names = sorted({a.rows[k]["source"] for k in ok})
    src_code = {s: i for i, s in enumerate(src_names)}
    y = np.array([code[a.rows[k]["label"]] for k in ok])
    pa = np.array([code[a.rows[k]["prediction"]] for k in ok])
    pb = np.array([code[b.rows[k]["prediction"]] for k in ok])
    source = np.array([src_code[a.rows[k]["source"]] for k in ok])
    fa = np.array([bool(a.rows[k].get("flag")) for k in ok])
    fb = np.array([bool(b.rows[k].get("flag")) for k in ok])
    groups = np.array([a.rows[k].get("group") or k for k in ok])
    srcs = range(len(src_names))
    fig_a = figures(y, pa, fa, source, len(classes), srcs)
    fig_b = figures(y, pb, fb, source, len(classes), srcs)
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.diff(inverse[order])) + 1
    members = np.split(order, starts)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {k: [] for k in fig_a}
    for _ in range(resamples):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        ra = figures(y[idx], pa[idx], fa[idx], source[idx], len(classes), srcs)
        rb = figures(y[idx], pb[idx], fb[idx], source[idx], len(classes), srcs)
        for k in diffs:
            diffs[k].append(rb[k] - ra[k])

    def label(key: str) -> str:  # "recall 0 @ 2" -> "recall covid @ kermany"
        if not key.startswith("recall "):
            return key
        c, _, s = key.removeprefix("recall ").partition(" @ ")
        return f"recall {classes[int(c)]}" + (f" @ {src_names[int(s)]}" if s else "")

    def n_cases(key: str) -> int:
        if not key.startswith("recall "):
            return len(y)
        c, _, s = key.removeprefix("recall ").partition(" @ ")
        return int(np.sum((y == int(c)) & ((source == int(s)) if s else True)))

    rows = []
    for k in fig_a:
        if not np.isfinite(fig_a[k]):  # no case of it (a class a source does not have)
            continue
        d = np.array([v for v in diffs[k] if np.isfinite(v)])
        lo, hi = np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan)
        rows.append(
            {
                "figure": label(k), "a": fig_a[k], "b": fig_b[k], "difference": fig_b[k] - fig_a[k],
                "ci95": [float(lo), float(hi)], "n": n_cases(k),
            }
        )  # fmt: skip
    return {
        "a": str(a.run), "b": str(b.run), "n_images": len(ok), "n_groups": len(members),
        "left_out": len(a.rows) - len(ok), "resamples": resamples, "seed": seed,
        "bootstrap": "paired, patient groups", "figures": rows,
    }  # fmt: skip


def _usable(r: dict[str, str]) -> bool:
    return bool(r.get("prediction")) and not r.get("status", "").startswith("error")


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (a difference whose interval excludes 0 is bold)."""
    lines = [
        f"B − A: B = {result['b']}, A = {result['a']}; {result['n_images']} images in "
        f"{result['n_groups']} patient groups ({result['left_out']} left out: no prediction in one run); "
        f"paired patient-group bootstrap, {result['resamples']} resamples, seed {result['seed']}",
        "",
        "| figure | n | A | B | B − A [95% CI] |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in result["figures"]:
        lo, hi = r["ci95"]
        d = f"{r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        if np.isfinite(lo) and (lo > 0 or hi < 0):
            d = f"**{d}**"
        lines.append(f"| {r['figure']} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} | {d} |")
    return "\n".join(lines)


__all__ = ["compare", "figures", "format_table"]
