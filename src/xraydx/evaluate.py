"""Metrics for a 3-class CXR classifier, computed with scikit-learn, and a readable table.

Per class (one-vs-rest): sensitivity (recall), specificity, PPV (precision), NPV, F1, ROC-AUC.
Overall: accuracy, balanced accuracy, macro-F1, macro ROC-AUC, log-loss, ECE, confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
)


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


def compute_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
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
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(set(y.tolist())) > 1 else None,
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
    head = f"{'class':<{w}}  {'n':>5}  {'sens':>6}  {'spec':>6}  {'PPV':>6}  {'NPV':>6}  {'F1':>6}  {'AUC':>6}"
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
