"""A checkpoint's abstention rule applied to out-of-source predictions: how many errors it flags, and
the accuracy of what it accepts, per held-out source and pooled.

    python scripts/flag_rule.py docs/results/crossval/ensembles/R4-CCC/predictions.csv.gz \
        --threshold 0.733 --temperature 0.872 [--members-disagree]

The file is a crossval's pooled predictions (``xraydx crossval``, or ``xraydx crossval ensemble``,
which adds ``members_agree``). Each row's probabilities are first re-calibrated by ``--temperature``
(softmax(log p / T): what a shipped ensemble applies to its members' mean), then flagged where the top
probability is below ``--threshold``, and, with ``--members-disagree``, where ``members_agree`` is
false: the shipped ensemble's rule (``abstention.members_disagree``). Rows that are errors or
``not_cxr`` are left out. Prints a markdown table: the threshold alone, and the rule as given.

    python scripts/flag_rule.py --signals docs/results/crossval/R4-C-s0 docs/results/crossval/R4-C-s1 \
        docs/results/crossval/R4-C-s2 --temperature 0.872

How well each candidate uncertainty signal of an ensemble of those crossval runs ranks its
out-of-source errors first (ROC-AUC, 0.5 = chance), from the members' own probabilities: 1 - top
probability of the mean (re-calibrated by ``--temperature``), its entropy, the members' mutual
information (entropy of the mean - mean entropy), the summed variance of their probabilities, and
whether their top classes differ.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np


def read_rows(path: str | Path) -> list[dict[str, str]]:
    raw = Path(path).read_bytes()
    text = (gzip.decompress(raw) if str(path).endswith(".gz") else raw).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def apply(
    rows: list[dict[str, str]], threshold: float, temperature: float = 1.0, members: bool = False
) -> dict[str, Any]:
    """Per source and pooled: n, errors, share of errors flagged, coverage, accuracy of the accepted."""
    if not rows:
        raise SystemExit("no rows")
    classes = [k.removeprefix("prob_") for k in rows[0] if k.startswith("prob_")]
    need = {"label", "source", "status", *(f"prob_{c}" for c in classes)} | (
        {"members_agree"} if members else set()
    )
    missing = sorted(need - set(rows[0]))
    if missing or not classes:
        raise SystemExit(f"not a crossval predictions file: no column {', '.join(missing) or 'prob_<class>'}")
    ok = [r for r in rows if r["status"] == "ok" and r["label"] in classes]
    p = _recalibrated(np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ok]), temperature)
    wrong = p.argmax(1) != np.array([classes.index(r["label"]) for r in ok])
    flagged = p.max(1) < threshold
    if members:
        flagged |= np.array([r["members_agree"].strip().lower() != "true" for r in ok])
    src = np.array([r["source"] for r in ok])
    out: dict[str, Any] = {}
    for name in [*sorted(set(src)), "pooled"]:
        sel = np.ones(len(ok), bool) if name == "pooled" else src == name
        w, f = wrong[sel], flagged[sel]
        out[name] = {
            "n": int(sel.sum()),
            "errors": int(w.sum()),
            "errors_flagged": float((w & f).sum() / w.sum()) if w.any() else None,
            "coverage": float((~f).mean()),
            "accuracy_accepted": float((~w[~f]).mean()) if (~f).any() else None,
        }
    return out


def _recalibrated(p: np.ndarray, temperature: float) -> np.ndarray:
    z = np.log(np.clip(p, 1e-12, 1.0)) / temperature
    q = np.exp(z - z.max(-1, keepdims=True))
    return q / q.sum(-1, keepdims=True)


def signals(runs: list[str], temperature: float = 1.0) -> dict[str, float]:
    """ROC-AUC for the ensemble's errors of each uncertainty signal (see the module doc)."""
    from sklearn.metrics import roc_auc_score

    members = []
    for run in runs:
        f = Path(run) / "predictions.csv"
        members.append({r["path"]: r for r in read_rows(f if f.is_file() else f.with_suffix(".csv.gz"))})
    first = members[0]
    classes = [k.removeprefix("prob_") for k in next(iter(first.values())) if k.startswith("prob_")]
    paths = [
        p for p, r in first.items()
        if r["status"] == "ok" and r["label"] in classes and all(m.get(p, {}).get("status") == "ok" for m in members)
    ]  # fmt: skip
    probs = np.array(
        [[[float(m[p][f"prob_{c}"]) for c in classes] for p in paths] for m in members]
    )  # (M, N, C)
    y = np.array([classes.index(first[p]["label"]) for p in paths])
    mean = _recalibrated(probs.mean(0), temperature)
    wrong = mean.argmax(1) != y

    def entropy(p: np.ndarray) -> np.ndarray:
        return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(-1)

    top = probs.argmax(2)
    scores = {
        "1 - top probability": 1 - mean.max(1),
        "entropy": entropy(mean),
        "mutual information": entropy(probs.mean(0)) - entropy(probs).mean(0),
        "variance": probs.var(0).sum(1),
        "members disagree": (top != top[0]).any(0).astype(float),
    }
    out = {k: float(roc_auc_score(wrong, v)) for k, v in scores.items()}
    out.update(n=float(len(y)), errors=float(wrong.sum()))
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", nargs="?")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--members-disagree", action="store_true")
    ap.add_argument(
        "--signals", nargs="+", metavar="RUN", help="crossval run folders: the members of an ensemble"
    )
    a = ap.parse_args(argv)
    if a.signals:
        res = signals(a.signals, a.temperature)
        print(f"{int(res.pop('n'))} out-of-source images, {int(res.pop('errors'))} errors of the ensemble")
        print("| signal | ROC-AUC for errors |\n|---|---:|")
        for k, v in res.items():
            print(f"| {k} | {v:.3f} |")
        return 0
    if a.predictions is None or a.threshold is None:
        ap.error("give PREDICTIONS and --threshold, or --signals RUN RUN ...")
    rows = read_rows(a.predictions)
    rules = [("threshold alone", apply(rows, a.threshold, a.temperature))]
    if a.members_disagree:
        rules.append(("threshold or members disagree", apply(rows, a.threshold, a.temperature, True)))
    print("| rule | source | n | errors | errors flagged | coverage | accuracy accepted |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, res in rules:
        for name, s in res.items():
            print(
                f"| {label} | {name} | {s['n']} | {s['errors']} | {_fmt(s['errors_flagged'])} | "
                f"{_fmt(s['coverage'])} | {_fmt(s['accuracy_accepted'])} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
