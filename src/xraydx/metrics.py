"""Metrics for a 3-class CXR classifier, computed with scikit-learn, and a readable table.

Per class (one-vs-rest): sensitivity (recall), specificity, PPV (precision), NPV, F1, ROC-AUC.
Overall: accuracy, balanced accuracy, macro-F1, macro ROC-AUC, log-loss, ECE, confusion matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
)

from xraydx.abstention import ABSTENTION_KEYS as ABSTENTION_KEYS
from xraydx.abstention import abstention_flags as abstention_flags
from xraydx.abstention import choose_abstention as choose_abstention
from xraydx.abstention import coverage_curve as coverage_curve
from xraydx.abstention import members_agree as members_agree
from xraydx.abstention import rule_flags as rule_flags


def _safe_div(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def compute_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape[1] != k or len(y) != len(p):
        raise ValueError(f"probs must be (N, {k}) with N = len(y_true); got {p.shape} and {len(y)}")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    pred = p.argmax(axis=1)
    labels = list(range(k))
    cm = confusion_matrix(y, pred, labels=labels)
    n = cm.sum()
    per_class: dict[str, dict[str, Any]] = {}
    f1s = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    for i, name in enumerate(classes):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = n - tp - fn - fp
        present = bool((y == i).any()) and bool((y != i).any())
        per_class[name] = {
            "support": int(cm[i].sum()),
            "sensitivity": _safe_div(tp, tp + fn),
            "specificity": _safe_div(tn, tn + fp),
            "ppv": _safe_div(tp, tp + fp),
            "npv": _safe_div(tn, tn + fn),
            "f1": float(f1s[i]),
            "roc_auc": float(roc_auc_score(y == i, p[:, i])) if present else None,
        }
    aucs = [v["roc_auc"] for v in per_class.values() if v["roc_auc"] is not None]
    clipped = np.clip(p, 1e-12, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return {
        "n": int(n),
        "classes": list(classes),
        "accuracy": float(accuracy_score(y, pred)),
        # the mean recall of the classes present, as sklearn's balanced_accuracy_score computes it, without
        # its "y_pred contains classes not in y_true" warning on stderr when one is predicted but absent
        "balanced_accuracy": float(np.mean([cm[i, i] / cm[i].sum() for i in labels if cm[i].sum()]))
        if len(set(y.tolist())) > 1
        else None,
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "macro_roc_auc": float(np.mean(aucs)) if len(aucs) == k else None,
        "nll": float(log_loss(y, clipped, labels=labels)),
        "ece": expected_calibration_error(y, p),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def _fmt(v: float | None, digits: int = 3) -> str:
    return "  n/a" if v is None else f"{v:.{digits}f}"


def format_metrics(m: dict[str, Any], title: str = "") -> str:
    classes = m["classes"]
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"n={m['n']}  accuracy={_fmt(m['accuracy'])}  balanced_acc={_fmt(m['balanced_accuracy'])}  "
        f"macro-F1={_fmt(m['macro_f1'])}  macro-AUC={_fmt(m['macro_roc_auc'])}  ECE={_fmt(m['ece'])}"
    )
    w = max(9, *(len(c) for c in classes))
    head = (
        f"{'class':<{w}}  {'n':>5}  {'sens':>6}  {'spec':>6}  {'PPV':>6}  {'NPV':>6}  {'F1':>6}  {'AUC':>6}"
    )
    lines += [head, "-" * len(head)]
    for c in classes:
        r = m["per_class"][c]
        lines.append(
            f"{c:<{w}}  {r['support']:>5}  {_fmt(r['sensitivity']):>6}  {_fmt(r['specificity']):>6}  "
            f"{_fmt(r['ppv']):>6}  {_fmt(r['npv']):>6}  {_fmt(r['f1']):>6}  {_fmt(r['roc_auc']):>6}"
        )
    lines.append("")
    lines.append("confusion matrix (rows = true, columns = predicted)")
    cw = max(len(c) for c in classes) + 2
    lines.append(" " * w + "".join(f"{c:>{cw}}" for c in classes))
    for c, row in zip(classes, m["confusion_matrix"], strict=True):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


def fit_temperature(logits: Any, labels: Any, max_iter: int = 200) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T)."""
    import torch

    lg = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lg / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp().clamp(0.05, 20.0))
    return t if np.isfinite(t) else 1.0


# ---- bootstrap confidence intervals --------------------------------------------------------------

CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "ece", "nll")
CI_PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc")


def _weighted_metrics(
    w: np.ndarray, y: np.ndarray, probs: np.ndarray, k: int, n_bins: int = 15
) -> dict[str, np.ndarray]:
    """The metrics of compute_metrics for B weighted copies of one sample at once.

    ``w`` (B, N) holds how often each sample was drawn in each bootstrap resample (all ones = the sample
    itself). Returns arrays of shape (B,) (overall) and (B, K) (per class); NaN where undefined."""
    n = w.sum(axis=1)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    correct = (pred == y).astype(np.float64)
    code = y * k + pred
    cm = np.stack([w[:, code == c].sum(axis=1) for c in range(k * k)], axis=1).reshape(-1, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    fn, fp = support - tp, predicted - tp
    tn = n[:, None] - tp - fn - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        ppv = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        npv = np.where(tn + fn > 0, tn / (tn + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        present = support > 0
        bal = np.where(
            present.sum(axis=1) > 1,
            np.nansum(np.where(present, sens, 0.0), axis=1) / present.sum(axis=1),
            np.nan,
        )
    # ECE with the same bins as expected_calibration_error: (lo, hi], the first bin [0, hi]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    gap = correct - conf
    ece = np.zeros(len(w))
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += np.abs(w[:, sel] @ gap[sel])
    ece /= n
    clipped = np.clip(probs, 1e-12, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    nll = (w @ -np.log(clipped[np.arange(len(y)), y])) / n
    auc = np.full((len(w), k), np.nan)
    for c in range(k):
        auc[:, c] = _weighted_auc(w, probs[:, c], y == c)
    return {
        "accuracy": tp.sum(axis=1) / n,
        "balanced_accuracy": bal,
        "macro_f1": f1.mean(axis=1),
        "macro_roc_auc": auc.mean(axis=1),  # NaN if any class's AUC is undefined, as in compute_metrics
        "ece": ece,
        "nll": nll,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "f1": f1,
        "roc_auc": auc,
    }


def _weighted_auc(w: np.ndarray, score: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) of each weighted resample; NaN without both kinds."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of equal scores
    ws = w[:, order]
    pos = np.add.reduceat(ws * positive[order], starts, axis=1)
    neg = np.add.reduceat(ws * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    u = (pos * (below + 0.5 * neg)).sum(axis=1)
    npos, nneg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((npos > 0) & (nneg > 0), u / (npos * nneg), np.nan)


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    stratified: bool = False,
) -> dict[str, Any]:
    """Percentile-bootstrap confidence intervals for the metrics of :func:`compute_metrics`.

    Each of ``n_boot`` resamples draws N images with replacement from all of them; with ``stratified``
    the draw is made within each true class, keeping every class's count fixed (then a class's recall
    of 10/10 is 1.000 in every resample: a zero-width interval, which is why reports use
    :func:`confidence_intervals` instead). The interval is the (1-level)/2 and (1+level)/2 percentiles
    of the metric over the resamples. Seeded: the same inputs and seed give the same intervals. Values
    are [low, high], or None where the metric is undefined in every resample."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape[1] != k or len(y) != len(p) or len(y) == 0:
        raise ValueError(f"probs must be (N, {k}) with N = len(y_true) > 0; got {p.shape} and {len(y)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive; got {n_boot}")
    rng = np.random.default_rng(seed)
    n = len(y)
    groups = [np.flatnonzero(y == c) for c in range(k)] if stratified else [np.arange(n)]
    groups = [g for g in groups if len(g)]
    draws: dict[str, list[np.ndarray]] = {}
    chunk = max(1, min(n_boot, 4_000_000 // max(1, n)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        w = np.zeros((b, n))
        for g in groups:
            w[:, g] = rng.multinomial(len(g), np.full(len(g), 1.0 / len(g)), size=b)
        for key, val in _weighted_metrics(w, y, p, k).items():
            draws.setdefault(key, []).append(val)
        done += b
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(a: np.ndarray) -> list[float] | None:
        a = a[np.isfinite(a)]
        if a.size == 0:
            return None
        return [float(np.percentile(a, lo_q)), float(np.percentile(a, hi_q))]

    out: dict[str, Any] = {
        "method": "percentile bootstrap" + (", resampled within each true class" if stratified else ""),
        "n_boot": n_boot,
        "seed": seed,
        "level": level,
    }
    stacked = {key: np.concatenate(v) for key, v in draws.items()}
    for key in CI_METRICS:
        out[key] = interval(stacked[key])
    out["per_class"] = {
        c: {key: interval(stacked[key][:, i]) for key in CI_PER_CLASS} for i, c in enumerate(classes)
    }
    return out


# ---- confidence intervals that stay honest at small n ------------------------------------------

SMALL_N = 30  # below this many cases a cell is marked in reports, and no bootstrap interval is given
WILSON_METRICS = ("accuracy",)
WILSON_PER_CLASS = ("sensitivity", "specificity", "ppv", "npv")


def wilson(k: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval for k successes of n (scipy); None for n = 0."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def recall_cells(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Per class present: recall k/n with its Wilson interval, and ``small`` where n < SMALL_N."""
    out: dict[str, Any] = {}
    for i, c in enumerate(classes):
        n = int((y == i).sum())
        if n == 0:
            continue
        k = int(((y == i) & (pred == i)).sum())
        out[c] = {"n": n, "correct": k, "recall": k / n, "ci": wilson(k, n), "small": n < SMALL_N}
    return out


def balanced_accuracy_ci(
    y: np.ndarray, pred: np.ndarray, k: int, level: float = 0.95, seed: int = 0, draws: int = 20_000
) -> list[float] | None:
    """An interval for balanced accuracy (the mean recall of the classes present) that is never zero-width:
    each class's recall k_c/n_c gets its Jeffreys posterior Beta(k_c + 1/2, n_c - k_c + 1/2) (the posterior
    behind the Jeffreys interval, which like Wilson's stays honest at small n), and the interval is the
    central ``level`` of the mean of independent draws from them (Monte Carlo, seeded). 10/10 in each of
    three classes gives about 0.90-1.00, not 1.00-1.00. None with fewer than two classes present."""
    present = [c for c in range(k) if (y == c).any()]
    if len(present) < 2:
        return None
    rng = np.random.default_rng(seed)
    mean = np.zeros(draws)
    for c in present:
        n_c = int((y == c).sum())
        k_c = int(((y == c) & (pred == c)).sum())
        mean += rng.beta(k_c + 0.5, n_c - k_c + 0.5, draws)
    mean /= len(present)
    return [float(np.percentile(mean, 50 * (1 - level))), float(np.percentile(mean, 50 * (1 + level)))]


def confidence_intervals(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """The 95% intervals reports show, honest at small n (same keys as :func:`bootstrap_ci`).

    Proportions -- accuracy and each class's sensitivity, specificity, PPV and NPV -- get Wilson score
    intervals (a 10/10 recall is 0.72-1.00, not 1.000-1.000). Balanced accuracy gets
    :func:`balanced_accuracy_ci`. The rest (macro-F1, ROC-AUC, ECE, NLL, per-class F1) gets a percentile
    bootstrap over all images (not within classes), and no interval (None) where n < SMALL_N or where every
    resample gives the same value (e.g. all correct): the bootstrap cannot bound it there."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    boot = bootstrap_ci(y, p, classes, n_boot=n_boot, seed=seed, level=level, stratified=False)
    n = len(y)
    small = n < SMALL_N

    def keep(ci: list[float] | None) -> list[float] | None:
        return None if small or ci is None or not ci[1] > ci[0] else ci

    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    out: dict[str, Any] = {
        "method": "Wilson score intervals for proportions (accuracy, sensitivity, specificity, PPV, NPV);"
        " balanced accuracy: the mean of the classes' Jeffreys posteriors of recall; macro-F1, F1, ROC-AUC,"
        f" ECE, NLL: percentile bootstrap over all images, none where n < {SMALL_N}",
        "n_boot": n_boot,
        "seed": seed,
        "level": level,
        "n": n,
        "small_n": small,
    }
    for key in CI_METRICS:
        out[key] = keep(boot[key])
    out["accuracy"] = wilson(int(np.trace(cm)), n, level)
    out["balanced_accuracy"] = balanced_accuracy_ci(y, pred, k, level, seed=seed)
    out["per_class"] = {}
    for i, c in enumerate(classes):
        tp = int(cm[i, i])
        fn, fp = int(cm[i].sum()) - tp, int(cm[:, i].sum()) - tp
        tn = n - tp - fn - fp
        cell = {key: keep(boot["per_class"][c][key]) for key in CI_PER_CLASS}
        cell.update(
            sensitivity=wilson(tp, tp + fn, level),
            specificity=wilson(tn, tn + fp, level),
            ppv=wilson(tp, tp + fp, level),
            npv=wilson(tn, tn + fn, level),
        )
        out["per_class"][c] = cell
    return out


# ---- calibration, coverage and abstention --------------------------------------------------------


def reliability_bins(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = 15
) -> list[dict[str, Any]]:
    """The reliability diagram behind :func:`expected_calibration_error`: per confidence bin, the count,
    mean confidence and accuracy (empty bins have count 0 and None)."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = bins == b
        out.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": int(sel.sum()),
                "confidence": float(conf[sel].mean()) if sel.any() else None,
                "accuracy": float(correct[sel].mean()) if sel.any() else None,
            }
        )
    return out


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) in float64, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def roc_curves(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """One-vs-rest ROC curve points (fpr, tpr) per class, or None where a class is absent or alone."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, dtype=int)
    out: dict[str, Any] = {}
    for i, c in enumerate(classes):
        pos = y == i
        if not pos.any() or pos.all():
            out[c] = None
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, i])
        out[c] = {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}
    return out


def per_source_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    sources: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Metrics for each source (collection / hospital), with notes where a class comes mostly from one
    source or a source holds mostly one class: there the classes can be told apart by the source alone.
    None when no source is recorded."""
    y = np.asarray(y_true, dtype=int)
    src = np.array([s or "(unknown)" for s in sources], dtype=object)
    if len(src) != len(y):
        raise ValueError(f"{len(src)} sources for {len(y)} samples")
    if not any(sources):
        return None
    out: dict[str, Any] = {}
    for s in sorted(set(src.tolist())):
        sel = src == s
        ys, ps = y[sel], probs[sel]
        with warnings.catch_warnings():  # a source often holds one or two classes only
            warnings.simplefilter("ignore", UserWarning)
            m = compute_metrics(ys, ps, classes)
        present = sorted(set(ys.tolist()))
        correct = int((ps.argmax(1) == ys).sum())
        out[s] = {
            "n": m["n"],
            "small": m["n"] < SMALL_N,
            "counts": {c: int((ys == i).sum()) for i, c in enumerate(classes)},
            "accuracy": m["accuracy"],
            "accuracy_ci": wilson(correct, m["n"]),  # Wilson: honest at a source's small n
            "balanced_accuracy": m["balanced_accuracy"],
            # over the classes this source holds: averaged over all, a one-class source scores 1/3 at
            # 100% accuracy (the F1 of the absent classes is 0 by definition)
            "macro_f1": float(f1_score(ys, ps.argmax(1), labels=present, average="macro", zero_division=0)),
            "classes_present": [classes[i] for i in present],
            "recall": {c: m["per_class"][c]["sensitivity"] for c in classes},
            "recall_cells": recall_cells(ys, ps.argmax(1), classes),  # k/n, Wilson interval, small
        }
    notes = []
    for i, c in enumerate(classes):
        n_c = int((y == i).sum())
        if n_c == 0:
            continue
        top = max(out, key=lambda s, c=c: out[s]["counts"][c])
        share = out[top]["counts"][c] / n_c
        if share >= 0.9 and len(out) > 1:
            notes.append(f"{share:.0%} of the {c} images come from {top}")
    for s, v in out.items():
        top_c = max(classes, key=lambda c, v=v: v["counts"][c])
        share = v["counts"][top_c] / v["n"]
        if share >= 0.9 and len(classes) > 1:
            notes.append(f"{share:.0%} of the {s} images are {top_c}")
    return {"sources": out, "notes": notes}


def evaluation_summary(
    y_true: Sequence[int] | np.ndarray,
    logits: np.ndarray,
    classes: Sequence[str],
    *,
    temperature: float = 1.0,
    sources: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    abstention: dict[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_worst: int = 12,
    agree: np.ndarray | None = None,
) -> dict[str, Any]:
    """Everything report.html shows, as JSON-ready data: compute_metrics on the calibrated probabilities,
    plus ``ci``, ``calibration`` (ECE / NLL before and after temperature scaling, reliability bins),
    ``roc_curves``, ``coverage_curve``, ``abstention`` (the checkpoint's rule applied to these cases;
    ``agree``: an ensemble's members' agreement per case, for a rule with ``members_disagree``),
    ``per_source`` (where sources are recorded) and ``worst_errors`` (the most confident wrong ones)."""
    y = np.asarray(y_true, dtype=int)
    lg = np.asarray(logits, dtype=np.float64)
    raw = softmax(lg)
    cal = softmax(lg, temperature)
    m = compute_metrics(y, cal, classes)
    before = compute_metrics(y, raw, classes)
    m["ci"] = confidence_intervals(y, cal, classes, n_boot=n_boot, seed=seed)
    m["calibration"] = {
        "method": "temperature scaling" if temperature != 1.0 else "none (temperature 1)",
        "temperature": float(temperature),
        "ece_before": before["ece"],
        "ece_after": m["ece"],
        "nll_before": before["nll"],
        "nll_after": m["nll"],
        "reliability_before": reliability_bins(y, raw),
        "reliability_after": reliability_bins(y, cal),
    }
    m["roc_curves"] = roc_curves(y, cal, classes)
    m["coverage_curve"] = coverage_curve(y, cal)
    if abstention and abstention.get("threshold") is not None:
        flagged = rule_flags(cal, abstention, agree)
        acc = cal.argmax(axis=1) == y
        m["abstention"] = {
            **{k: abstention[k] for k in ABSTENTION_KEYS if k in abstention},
            "coverage": float(1 - flagged.mean()),
            "n_flagged": int(flagged.sum()),
            "accuracy_accepted": float(acc[~flagged].mean()) if (~flagged).any() else None,
            "accuracy_flagged": float(acc[flagged].mean()) if flagged.any() else None,
        }
    else:
        m["abstention"] = None
    m["per_source"] = (
        per_source_metrics(y, cal, classes, sources, n_boot=n_boot, seed=seed) if sources else None
    )
    pred = cal.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-cal[wrong].max(axis=1), kind="stable")][:n_worst]
    m["worst_errors"] = [
        {
            "index": int(i),
            "path": str(paths[i]) if paths is not None else "",
            "source": (sources[i] if sources is not None else "") or "",
            "label": classes[y[i]],
            "prediction": classes[pred[i]],
            "confidence": float(cal[i].max()),
        }
        for i in wrong
    ]
    return m
