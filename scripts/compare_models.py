"""Markdown table comparing candidate models from the metrics.json files `xraydx evaluate` wrote.

    python scripts/compare_models.py NAME=runs/eval/A-test/metrics.json NAME2=... [--sources]

One row per file: n, accuracy, macro-F1 and the sensitivity of each class with 95% bootstrap CIs, ECE
after calibration; ``--sources`` adds each source's per-class recall (where a collection and a label
go together, this is where it shows).

    python scripts/compare_models.py --paired runs/eval-A/predictions.csv runs/eval-B/predictions.csv

B − A on the images both predicted (matched by path; both files must give each image the same label):
macro-F1, balanced accuracy and accuracy with 95% intervals from a paired bootstrap over images (the same
resample for both), and each model's coverage, accuracy on the accepted and share of errors flagged.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

CLASSES = ("covid", "non_covid", "normal")


def _ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    if not ci:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}–{ci[1]:.3f}]"


def row(name: str, m: dict[str, Any]) -> list[str]:
    ci = m.get("ci") or {}
    pc = ci.get("per_class", {})
    cells = [
        name,
        str(m["n"]),
        _ci(m["accuracy"], ci.get("accuracy")),
        _ci(m["macro_f1"], ci.get("macro_f1")),
    ]
    for c in CLASSES:
        sens = m["per_class"][c]["sensitivity"]
        cells.append(_ci(sens, pc.get(c, {}).get("sensitivity")) if m["per_class"][c]["support"] else "—")
    cells.append(f"{m['ece']:.3f}")
    return cells


def source_rows(name: str, m: dict[str, Any]) -> list[list[str]]:
    out = []
    for src, s in sorted((m.get("per_source") or {}).get("sources", {}).items()):
        rec = [f"{s['recall'][c]:.3f}" if s["recall"].get(c) is not None else "—" for c in CLASSES]
        out.append([name, src, str(s["n"]), f"{s['accuracy']:.3f}", *rec])
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _predictions(path: str) -> dict[str, tuple[str, str, bool]]:
    """path -> (label, prediction, flagged) of the readable, labelled rows of a predictions.csv."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"path", "prediction", "label", "flag"} <= set(rows[0]):
        raise SystemExit(f"{path}: not a predictions.csv with path, prediction, flag and label columns")
    return {
        r["path"]: (r["label"], r["prediction"], bool(r["flag"]))
        for r in rows
        if r["label"] in CLASSES and r["prediction"] in CLASSES
    }


def paired(path_a: str, path_b: str, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """B − A with paired image-bootstrap intervals, and each model's abstention figures."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, f1_score

    a, b = _predictions(path_a), _predictions(path_b)
    common = sorted(set(a) & set(b))
    if not common:
        raise SystemExit(f"{path_a} and {path_b}: no image in common")
    differ = [p for p in common if a[p][0] != b[p][0]]
    if differ:
        raise SystemExit(f"{differ[0]}: labelled differently in the two files")
    y = np.array([CLASSES.index(a[p][0]) for p in common])
    preds = {k: np.array([CLASSES.index(d[p][1]) for p in common]) for k, d in (("A", a), ("B", b))}
    flags = {k: np.array([d[p][2] for p in common]) for k, d in (("A", a), ("B", b))}
    metrics = {
        "macro_f1": lambda t, q: f1_score(t, q, average="macro", labels=[0, 1, 2], zero_division=0),
        "balanced_accuracy": balanced_accuracy_score,
        "accuracy": lambda t, q: float((t == q).mean()),
    }
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, len(y), len(y)) for _ in range(resamples)]
    out: dict[str, Any] = {"n": len(common), "resamples": resamples}
    for name, f in metrics.items():
        va, vb = f(y, preds["A"]), f(y, preds["B"])
        d = [f(y[i], preds["B"][i]) - f(y[i], preds["A"][i]) for i in idx]
        out[name] = {
            "A": va,
            "B": vb,
            "diff": vb - va,
            "ci95": [float(x) for x in np.percentile(d, [2.5, 97.5])],
        }
    for k in ("A", "B"):
        err, fl = preds[k] != y, flags[k]
        out[f"flag_{k}"] = {
            "coverage": float(1 - fl.mean()),
            "accuracy_accepted": float((~err[~fl]).mean()) if (~fl).any() else float("nan"),
            "errors_flagged": float(fl[err].mean()) if err.any() else float("nan"),
        }
    return out


def format_paired(r: dict[str, Any]) -> str:
    rows = [
        [
            k,
            f"{r[k]['A']:.3f}",
            f"{r[k]['B']:.3f}",
            f"{r[k]['diff']:+.3f} [{r[k]['ci95'][0]:+.3f}, {r[k]['ci95'][1]:+.3f}]",
        ]
        for k in ("macro_f1", "balanced_accuracy", "accuracy")
    ]
    for key, label in (
        ("coverage", "coverage"),
        ("accuracy_accepted", "accuracy accepted"),
        ("errors_flagged", "errors flagged"),
    ):
        va, vb = r["flag_A"][key], r["flag_B"][key]
        rows.append([label, f"{va:.3f}", f"{vb:.3f}", f"{vb - va:+.3f}"])
    head = ["figure", "A", "B", f"B − A [95%, paired bootstrap over {r['n']} images]"]
    return table(head, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", nargs="*", help="NAME=path/to/metrics.json")
    ap.add_argument("--sources", action="store_true", help="also per-source recall")
    ap.add_argument(
        "--paired", nargs=2, metavar=("A_CSV", "B_CSV"), help="B − A from two predictions.csv files"
    )
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for --paired")
    args = ap.parse_args(argv)
    if args.paired:
        print(format_paired(paired(*args.paired, resamples=args.resamples)))
        return 0
    if not args.metrics:
        ap.error("give metrics.json files, or --paired A_CSV B_CSV")
    loaded = []
    for item in args.metrics:
        name, _, path = item.partition("=")
        if not path:
            name, path = Path(item).parent.name, item
        loaded.append((name, json.loads(Path(path).read_text(encoding="utf-8"))))
    head = ["model", "n", "accuracy", "macro-F1", *[f"sens. {c}" for c in CLASSES], "ECE"]
    print(table(head, [row(n, m) for n, m in loaded]))
    if args.sources:
        print()
        rows = [r for n, m in loaded for r in source_rows(n, m)]
        print(table(["model", "source", "n", "accuracy", *[f"recall {c}" for c in CLASSES]], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
