"""Markdown table comparing candidate models from the metrics.json files `xraydx evaluate` wrote.

    python scripts/compare_models.py NAME=runs/eval/A-test/metrics.json NAME2=... [--sources]

One row per file: n, accuracy, macro-F1 and the sensitivity of each class with 95% bootstrap CIs, ECE
after calibration; ``--sources`` adds each source's per-class recall (where a collection and a label
go together, this is where it shows).
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", nargs="+", help="NAME=path/to/metrics.json")
    ap.add_argument("--sources", action="store_true", help="also per-source recall")
    args = ap.parse_args(argv)
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
