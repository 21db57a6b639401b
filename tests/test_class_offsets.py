"""scripts/class_offsets.py: class offsets fitted on the other folds' out-of-source predictions only."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("class_offsets", ROOT / "scripts" / "class_offsets.py")
assert spec and spec.loader
co = importlib.util.module_from_spec(spec)
spec.loader.exec_module(co)

CLASSES = ["covid", "non_covid", "normal"]
COLS = ["path", "prediction", *(f"prob_{c}" for c in CLASSES), "status", "label", "source", "fold"]


def _run(tmp: Path, rows: list[list[object]]) -> Path:
    run = tmp / "run"
    run.mkdir(parents=True)
    (run / "crossval.json").write_text(json.dumps({"folds": [["a"], ["b"], ["c"]]}), encoding="utf-8")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(COLS)
    for i, (probs, label, source) in enumerate(rows):
        pred = CLASSES[int(np.argmax(probs))]
        w.writerow([f"img{i}.png", pred, *probs, "ok", label, source, f"f-{source}"])
    (run / "predictions.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode("utf-8")))
    return run


def _biased(source: str) -> list[list[object]]:
    """Every COVID-19 image gets a little less COVID-19 probability than normal: argmax under-calls it."""
    return [
        *[[[0.42, 0.08, 0.50], "covid", source]] * 4,
        *[[[0.05, 0.85, 0.10], "non_covid", source]] * 4,
        *[[[0.20, 0.05, 0.75], "normal", source]] * 4,
    ]


def test_a_bias_shared_by_every_fold_is_found_from_the_other_folds(tmp_path: Path) -> None:
    run = _run(tmp_path, _biased("a") + _biased("b") + _biased("c"))
    r = co.measure(run, None, 0.05)
    before, after = r["balanced_accuracy"]
    assert before == pytest.approx(2 / 3)
    assert after == pytest.approx(1.0)
    assert r["recall"]["covid"] == [0.0, 1.0]
    for o in r["offsets_per_fold"].values():
        assert o[0] > 0 and o[2] == 0.0  # COVID-19 raised, normal the reference


def test_a_folds_offsets_never_see_its_own_images(tmp_path: Path) -> None:
    rows = _biased("a") + _biased("b") + _biased("c")
    first = co.measure(_run(tmp_path / "1", rows), None, 0.05)["offsets_per_fold"]
    # fold a's own COVID-19 images now need a larger offset: its offsets must not move, the others' must
    flipped = [
        [[0.30, 0.05, 0.65], lab, s] if s == "a" and lab == "covid" else [p, lab, s] for p, lab, s in rows
    ]
    second = co.measure(_run(tmp_path / "2", flipped), None, 0.05)["offsets_per_fold"]
    assert second["f-a"] == first["f-a"]
    assert second["f-b"] != first["f-b"]


def test_out_writes_a_comparable_copy_and_never_overwrites(tmp_path: Path) -> None:
    run = _run(tmp_path, _biased("a") + _biased("b") + _biased("c"))
    out = tmp_path / "off"
    r = co.measure(run, out, 0.1)
    dest = Path(r["written"])
    assert (dest / "crossval.json").is_file()
    rows = list(
        csv.DictReader(io.StringIO(gzip.decompress((dest / "predictions.csv.gz").read_bytes()).decode()))
    )
    assert [row["prediction"] for row in rows] == [row["label"] for row in rows]
    with pytest.raises(SystemExit, match="exists"):
        co.measure(run, out, 0.1)


def test_a_folder_without_predictions_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no predictions.csv"):
        co.measure(tmp_path, None, 0.05)
