"""Is recipe B better than recipe A at a hospital neither has seen, beyond noise? A paired comparison of two
finished crossval runs over the same images and folds, or of two groups of runs (each recipe at several
seeds: the figures are the groups' means, and a second interval adds the seeds' variance).

Both runs predicted every image with a model that never saw its source, so the difference of any pooled
figure (B − A) is measured on the same images. Its 95% interval comes from a paired bootstrap that resamples
**patient groups** (the ``group`` column: images of one patient go together, as the splits keep them), the
same resample for both runs, so the interval is about the recipes and not about which images were drawn.
It is still optimistic about a *new* site: the sources are fixed, only patients are resampled; and a
difference between two single runs is partly a difference between two seeds (docs/generalisation.md: up
to 0.15 in one source's recall): compare groups of seeds, whose ``ci95_seeds`` counts that too.

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


RunGroup = Path | str | Sequence[Path | str]


def _runs(group: RunGroup) -> list[Path]:
    """One run, or a group of runs of one recipe (e.g. its seeds): a sequence, or one comma-separated
    string (a path that exists as written is one run, whatever its characters)."""
    if isinstance(group, (str, Path)):
        p = Path(group)
        parts = [p] if p.exists() or "," not in str(group) else [Path(x) for x in str(group).split(",") if x]
    else:
        parts = [Path(x) for x in group]
    if not parts:
        raise UsageError("crossval compare: an empty group of runs")
    return parts


def compare(
    run_a: RunGroup, run_b: RunGroup, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """B − A for every figure, with the paired patient-group bootstrap 95% interval.

    ``run_a`` / ``run_b`` may each be a group of runs of one recipe (its seeds): a figure is then the mean
    of the group's runs, every run is resampled with the same patient groups, and each row also carries
    the runs' own figures and ``ci95_seeds``, an interval that adds the between-seed variance of the two
    means (s_A²/n_A + s_B²/n_B, where a group has two or more runs) to the bootstrap's (normal
    approximation)."""
    if resamples < 100:
        raise UsageError(f"--resamples must be at least 100 for a 95% interval; got {resamples}")
    paths_a, paths_b = _runs(run_a), _runs(run_b)
    seen: dict[Path, Path] = {}
    for p in paths_a + paths_b:
        if p.resolve() in seen:
            raise UsageError(f"crossval compare: {p} is given twice")
        seen[p.resolve()] = p
    ma, mb = [read_member(p) for p in paths_a], [read_member(p) for p in paths_b]
    everyone = ma + mb
    check_members(everyone)
    ok = [k for k in ma[0].rows if all(_usable(m.rows[k]) for m in everyone)]
    if not ok:
        raise UsageError(
            f"crossval compare: no image has a prediction in every one of {', '.join(m.name for m in everyone)}"
        )
    classes = list(ma[0].classes)
    code = {c: i for i, c in enumerate(classes)}
    ref = ma[0].rows
    src_names = sorted({ref[k]["source"] for k in ok})
    src_code = {s: i for i, s in enumerate(src_names)}
    y = np.array([code[ref[k]["label"]] for k in ok])
    source = np.array([src_code[ref[k]["source"]] for k in ok])
    preds = {id(m): np.array([code[m.rows[k]["prediction"]] for k in ok]) for m in everyone}
    flags = {id(m): np.array([bool(m.rows[k].get("flag")) for k in ok]) for m in everyone}
    groups = np.array([ref[k].get("group") or k for k in ok])
    srcs = range(len(src_names))

    def per_run(ms: list[Any], idx: np.ndarray | None) -> list[dict[str, float]]:
        sel = slice(None) if idx is None else idx
        return [
            figures(y[sel], preds[id(m)][sel], flags[id(m)][sel], source[sel], len(classes), srcs) for m in ms
        ]

    def mean(figs: list[dict[str, float]]) -> dict[str, float]:
        return {k: _nanmean([f[k] for f in figs]) for k in figs[0]}

    runs_a, runs_b = per_run(ma, None), per_run(mb, None)
    fig_a, fig_b = mean(runs_a), mean(runs_b)
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.diff(inverse[order])) + 1
    members = np.split(order, starts)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {k: [] for k in fig_a}
    for _ in range(resamples):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        ra, rb = mean(per_run(ma, idx)), mean(per_run(mb, idx))
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

    grouped = len(ma) > 1 or len(mb) > 1
    rows = []
    for k in fig_a:
        if not np.isfinite(fig_a[k]):  # no case of it (a class a source does not have)
            continue
        d = np.array([v for v in diffs[k] if np.isfinite(v)])
        lo, hi = np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan)
        row: dict[str, Any] = {
            "figure": label(k), "a": fig_a[k], "b": fig_b[k], "difference": fig_b[k] - fig_a[k],
            "ci95": [float(lo), float(hi)], "n": n_cases(k),
        }  # fmt: skip
        if grouped:
            va, vb = [f[k] for f in runs_a], [f[k] for f in runs_b]
            seed_var = sum(float(np.var(v, ddof=1)) / len(v) for v in (va, vb) if len(v) > 1)
            half = 1.96 * float(np.sqrt((float(np.var(d)) if len(d) else np.nan) + seed_var))
            row.update(a_runs=va, b_runs=vb, ci95_seeds=[row["difference"] - half, row["difference"] + half])
        rows.append(row)
    return {
        "a": ",".join(str(m.run) for m in ma), "b": ",".join(str(m.run) for m in mb),
        "runs_a": len(ma), "runs_b": len(mb), "n_images": len(ok), "n_groups": len(members),
        "left_out": len(ref) - len(ok), "resamples": resamples, "seed": seed,
        "bootstrap": "paired, patient groups" + (" (figures: mean over each group's runs)" if grouped else ""),
        "figures": rows,
    }  # fmt: skip


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _usable(r: dict[str, str]) -> bool:
    return bool(r.get("prediction")) and not r.get("status", "").startswith("error")


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (a difference whose interval excludes 0 is bold; for groups of
    runs, the interval with the seeds' variance decides)."""
    grouped = result.get("runs_a", 1) > 1 or result.get("runs_b", 1) > 1
    what = (
        f"mean of {result['runs_b']} runs" if result.get("runs_b", 1) > 1 else "",
        f"mean of {result['runs_a']} runs" if result.get("runs_a", 1) > 1 else "",
    )
    lines = [
        f"B − A: B = {result['b']}{f' ({what[0]})' if what[0] else ''}, A = {result['a']}"
        f"{f' ({what[1]})' if what[1] else ''}; {result['n_images']} images in "
        f"{result['n_groups']} patient groups ({result['left_out']} left out: no prediction in one run); "
        f"paired patient-group bootstrap, {result['resamples']} resamples, seed {result['seed']}",
        "",
        "| figure | n | A | B | B − A [95% CI] |"
        + (" with seeds' variance | A runs | B runs |" if grouped else ""),
        "| --- | ---: | ---: | ---: | --- |" + (" --- | --- | --- |" if grouped else ""),
    ]
    for r in result["figures"]:
        lo, hi = r["ci95"]
        d = f"{r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        line = f"| {r['figure']} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} | "
        if grouped:
            slo, shi = r["ci95_seeds"]
            sd = f"{r['difference']:+.3f} [{slo:+.3f}, {shi:+.3f}]"
            if np.isfinite(slo) and (slo > 0 or shi < 0):
                sd = f"**{sd}**"
            runs = [" ".join(f"{v:.3f}" for v in r[key]) for key in ("a_runs", "b_runs")]
            line += f"{d} | {sd} | {runs[0]} | {runs[1]} |"
        else:
            if np.isfinite(lo) and (lo > 0 or hi < 0):
                d = f"**{d}**"
            line += f"{d} |"
        lines.append(line)
    return "\n".join(lines)


__all__ = ["compare", "figures", "format_table"]
