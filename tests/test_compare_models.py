"""scripts/compare_models.py --paired: B − A on the images two predictions.csv files share."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from conftest import sample_images

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_models", ROOT / "scripts" / "compare_models.py")
assert spec and spec.loader
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)


def _write(path: Path, rows: list[tuple[str, str, str, str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "prediction", "flag", "label"])
        w.writerows(rows)
    return str(path)


def test_paired_difference_and_flag_figures(tmp_path: Path) -> None:
    imgs = sample_images("test")
    truth = [(str(p), p.parent.name) for p in imgs]
    wrong = {"covid": "normal", "non_covid": "covid", "normal": "covid"}
    # A: every third image wrong, half of its errors flagged; B: every sixth wrong, none flagged
    a = [
        (p, wrong[t] if i % 3 == 0 else t, "uncertain" if i % 6 == 0 else "", t)
        for i, (p, t) in enumerate(truth)
    ]
    b = [(p, wrong[t] if i % 6 == 0 else t, "", t) for i, (p, t) in enumerate(truth)]
    b.append(("only-in-b.png", "covid", "", "covid"))  # not in A: left out
    r = cm.paired(_write(tmp_path / "a.csv", a), _write(tmp_path / "b.csv", b), resamples=300)
    assert r["n"] == len(truth)
    n_wrong_a = sum(i % 3 == 0 for i in range(len(truth)))
    n_wrong_b = sum(i % 6 == 0 for i in range(len(truth)))
    assert r["accuracy"]["A"] == pytest.approx(1 - n_wrong_a / len(truth))
    assert r["accuracy"]["diff"] == pytest.approx((n_wrong_a - n_wrong_b) / len(truth))
    lo, hi = r["accuracy"]["ci95"]
    assert 0 < lo <= r["accuracy"]["diff"] <= hi  # B is never worse on any image: every resample favours B
    assert r["flag_A"]["errors_flagged"] == pytest.approx(n_wrong_b / n_wrong_a)
    assert r["flag_B"]["errors_flagged"] == 0 and r["flag_B"]["coverage"] == 1
    assert "B − A" in cm.format_paired(r) and "macro_f1" in cm.format_paired(r)


def test_paired_refuses_files_that_disagree_on_a_label(tmp_path: Path) -> None:
    p = str(sample_images("test", "covid")[0])
    a = _write(tmp_path / "a.csv", [(p, "covid", "", "covid")])
    b = _write(tmp_path / "b.csv", [(p, "covid", "", "normal")])
    with pytest.raises(SystemExit, match="labelled differently"):
        cm.paired(a, b)
    c = _write(tmp_path / "c.csv", [("elsewhere.png", "covid", "", "covid")])
    with pytest.raises(SystemExit, match="no image in common"):
        cm.paired(a, c)
