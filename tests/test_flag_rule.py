"""scripts/flag_rule.py: a checkpoint's abstention rule applied to a crossval's out-of-source predictions,
and the uncertainty signals of an ensemble of crossval runs."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("flag_rule", ROOT / "scripts" / "flag_rule.py")
assert spec and spec.loader
fr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fr)

COLS = ["path", "prob_covid", "prob_non_covid", "prob_normal", "status", "label", "source", "members_agree"]


def _write(path: Path, rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLS)
        w.writerows(rows)
    return path


def test_the_rule_counts_flagged_errors_per_source_and_pooled(tmp_path: Path) -> None:
    rows = [
        ["a1", 0.9, 0.05, 0.05, "ok", "covid", "a", "true"],  # right, confident: accepted
        ["a2", 0.6, 0.3, 0.1, "ok", "normal", "a", "true"],  # wrong, below 0.7: flagged
        ["a3", 0.8, 0.1, 0.1, "ok", "normal", "a", "false"],  # wrong, confident, members disagree
        ["b1", 0.1, 0.1, 0.8, "ok", "normal", "b", "true"],  # right
        ["b2", 0.1, 0.1, 0.8, "error: unreadable", "normal", "b", ""],  # left out
    ]
    f = _write(tmp_path / "p.csv", rows)
    alone = fr.apply(fr.read_rows(f), 0.7)
    assert alone["a"] == {
        "n": 3,
        "errors": 2,
        "errors_flagged": 0.5,
        "coverage": 2 / 3,
        "accuracy_accepted": 0.5,
    }
    both = fr.apply(fr.read_rows(f), 0.7, members=True)
    assert both["a"]["errors_flagged"] == 1.0 and both["a"]["accuracy_accepted"] == 1.0
    assert both["b"]["errors_flagged"] is None and both["pooled"]["n"] == 4
    # a temperature below 1 sharpens: 0.6 becomes more than 0.7, so the first error is no longer flagged
    sharp = fr.apply(fr.read_rows(f), 0.7, temperature=0.5)
    assert sharp["a"]["errors_flagged"] == 0.0
    no_agree = [{k: v for k, v in r.items() if k != "members_agree"} for r in fr.read_rows(f)]
    with pytest.raises(SystemExit, match="members_agree"):
        fr.apply(no_agree, 0.7, members=True)


def test_signals_rank_the_ensembles_errors(tmp_path: Path) -> None:
    # two members: confident and agreeing where right; split (and so unsure) on every fourth image, wrong
    m1, m2 = [], []
    for i in range(20):
        if i % 4:
            m1.append([f"x{i}", 0.9, 0.05, 0.05, "ok", "covid", "s", ""])
            m2.append([f"x{i}", 0.85, 0.1, 0.05, "ok", "covid", "s", ""])
        else:
            m1.append([f"x{i}", 0.3, 0.6, 0.1, "ok", "covid", "s", ""])
            m2.append([f"x{i}", 0.5, 0.45, 0.05, "ok", "covid", "s", ""])
    _write(tmp_path / "r1" / "predictions.csv", m1)
    _write(tmp_path / "r2" / "predictions.csv", m2)
    s = fr.signals([str(tmp_path / "r1"), str(tmp_path / "r2")])
    assert s["n"] == 20 and s["errors"] == 5
    assert s["1 - top probability"] == 1.0 and s["members disagree"] == 1.0 and s["entropy"] == 1.0
    assert 0.0 <= s["mutual information"] <= 1.0
