"""The abstention rule: which predictions are flagged "uncertain: refer to a radiologist".

:func:`coverage_curve` (accuracy of the accepted cases against the share accepted), :func:`choose_abstention`
(the rule chosen on validation: the lowest top-probability threshold at which the accepted cases reach the
target accuracy; for an ensemble also flagging where its members' top classes differ) and the rule applied
(:func:`abstention_flags`, :func:`rule_flags`). Re-exported by :mod:`xraydx.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ABSTENTION_KEYS", "abstention_flags", "choose_abstention", "coverage_curve", "members_agree", "rule_flags",
]  # fmt: skip


def coverage_curve(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, max_points: int = 200
) -> list[dict[str, float]]:
    """Accuracy on the accepted cases vs coverage, accepting a case when its top probability >= threshold.

    One point per distinct threshold (ties are accepted together), thinned to about ``max_points``,
    from the most confident case alone (lowest coverage) to every case (coverage 1)."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    if len(y) == 0:
        return []
    conf = p.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    hits = np.cumsum(p.argmax(axis=1)[order] == y[order])
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # last index of each tie group
    if len(ends) > max_points:
        keep = np.unique(np.linspace(0, len(ends) - 1, max_points).round().astype(int))
        ends = ends[keep]
    n = len(y)
    return [
        {"threshold": float(c[e]), "coverage": float((e + 1) / n), "accuracy": float(hits[e] / (e + 1))}
        for e in ends
    ]


def choose_abstention(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    target_accuracy: float = 0.95,
    *,
    min_accepted: int = 10,
    fallback_coverage: float = 0.5,
    agree: np.ndarray | None = None,
) -> dict[str, Any]:
    """The abstention rule, chosen on validation data (calibrated probabilities).

    A prediction is accepted when its top calibrated probability is >= ``threshold``, otherwise flagged
    "uncertain: refer to a radiologist". The threshold is the lowest one (the most cases accepted) at
    which the accepted validation cases reach ``target_accuracy``, counting only thresholds that accept
    at least ``min_accepted`` cases (or all cases, if fewer). If no threshold reaches the target, no
    prediction can be trusted by this rule: ``flag_all`` is True (every prediction is flagged, threshold
    1.0), ``target_reached`` False, ``reason`` says why, and ``best_unreached`` keeps the threshold with
    the best accepted accuracy among those keeping at least ``fallback_coverage`` of the cases (for the
    record; it is not applied).

    ``agree`` (an ensemble's, (N,) bool: :func:`members_agree`): the rule also flags every case whose
    members' top classes differ (``members_disagree``: True), and the threshold is chosen among the cases
    they agree on; coverage and accuracy are still over all ``N`` validation cases."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target accuracy must be in (0, 1]; got {target_accuracy}")
    n = len(y)
    if n == 0:
        raise ValueError("no validation cases to choose an abstention threshold on")
    keep = np.ones(n, bool) if agree is None else np.asarray(agree, dtype=bool)
    if keep.shape != (n,):
        raise ValueError(f"agree must be one bool per case ({n}); got shape {keep.shape}")
    share = keep.mean()
    curve = [
        {**pt, "coverage": pt["coverage"] * share}
        for pt in coverage_curve(y[keep], p[keep], max_points=10**9)
    ]
    if not curve:  # the members disagree on every case: nothing can be accepted
        curve = [{"threshold": 1.0, "coverage": 0.0, "accuracy": 0.0}]
    need = min(min_accepted, max(1, int(keep.sum())))
    ok = [pt for pt in curve if pt["coverage"] * n >= need - 1e-9] or curve[-1:]
    reach = [pt for pt in ok if pt["accuracy"] >= target_accuracy - 1e-12]
    if reach:
        best, reached = max(reach, key=lambda pt: pt["coverage"]), True
    else:
        wide = [pt for pt in ok if pt["coverage"] >= fallback_coverage - 1e-12] or ok
        best, reached = max(wide, key=lambda pt: (pt["accuracy"], pt["coverage"])), False
    rule: dict[str, Any] = {
        "rule": "flag when the top calibrated probability is below threshold"
        + (" or the ensemble's members' top classes differ" if agree is not None else ""),
        "threshold": best["threshold"],
        "target_accuracy": target_accuracy,
        "target_reached": reached,
        "flag_all": False,
        "val_coverage": best["coverage"],
        "val_accuracy_accepted": best["accuracy"],
        "val_accuracy_all": float((p.argmax(axis=1) == y).mean()),
        "n_val": n,
        "min_accepted": need,
        "fallback_coverage": fallback_coverage,
    }
    if agree is not None:
        rule.update(members_disagree=True, val_members_agree=float(share))
    if not reached:
        rule.update(
            threshold=1.0, flag_all=True, val_coverage=0.0, val_accuracy_accepted=None,
            best_unreached={"threshold": best["threshold"], "coverage": best["coverage"], "accuracy": best["accuracy"]},
            reason=(
                f"no confidence threshold reaches the target accuracy {target_accuracy:.2f} on validation "
                f"(best: {best['accuracy']:.3f} keeping {best['coverage']:.0%} of {n} cases), so every "
                "prediction is flagged uncertain"
            ),
        )  # fmt: skip
    return rule


ABSTENTION_KEYS = (
    "threshold", "target_accuracy", "target_reached", "flag_all", "reason", "val_coverage", "val_accuracy_accepted",
    "members_disagree",
)  # fmt: skip


def abstention_flags(
    probs: np.ndarray, threshold: float | None, flag_all: bool = False, disagree: np.ndarray | None = None
) -> np.ndarray:
    """True where a prediction is flagged uncertain (top probability below the threshold, or ``disagree``:
    an ensemble's members' top classes differ; every one where ``flag_all``, the rule of a model whose
    target accuracy was not reached on validation). No threshold: no rule, nothing flagged."""
    p = np.asarray(probs, dtype=np.float64)
    if flag_all:
        return np.ones(len(p), dtype=bool)
    if threshold is None:
        return np.zeros(len(p), dtype=bool)
    out = p.max(axis=1) < threshold
    return out | np.asarray(disagree, dtype=bool) if disagree is not None else out


def members_agree(member_scores: np.ndarray) -> np.ndarray:
    """(N, M, C) an ensemble's members' scores (log-probabilities or logits) -> (N,) bool: every member's
    top class is the same."""
    top = np.asarray(member_scores).argmax(-1)
    return np.all(top == top[:, :1], axis=1)


def rule_flags(probs: np.ndarray, rule: dict[str, Any] | None, agree: np.ndarray | None = None) -> np.ndarray:
    """A checkpoint's abstention rule (its metadata's ``abstention``) applied to calibrated probabilities:
    :func:`abstention_flags` with the threshold, ``flag_all`` and, where the rule has
    ``members_disagree`` and ``agree`` is known (an ensemble's :func:`members_agree`), disagreement."""
    rule = rule or {}
    t = rule.get("threshold")
    disagree = ~np.asarray(agree, dtype=bool) if agree is not None and rule.get("members_disagree") else None
    return abstention_flags(probs, None if t is None else float(t), rule.get("flag_all") is True, disagree)
