"""Training end to end on the real bundled sample, with a tiny network at 64 px."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import kill_in_validation, tiny_config
from xraydx.errors import EXIT_USAGE, OutputExistsError
from xraydx.models import read_metadata
from xraydx.train import run_training


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv") as fh:
        return list(csv.DictReader(fh))


def test_run_folder_has_everything(trained_run: Path) -> None:
    for name in ("config.yaml", "log.csv", "metrics.json", "predictions.csv", "manifest.csv", "train.log"):
        assert (trained_run / name).is_file(), name
    for name in ("best.safetensors", "last.safetensors", "last.state.safetensors"):
        assert (trained_run / "checkpoints" / name).is_file(), name
    rows = _log(trained_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert sum(int(r["best"]) for r in rows) >= 1
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["test"]["n"] == 30 and 0.0 <= metrics["test"]["macro_f1"] <= 1.0
    meta = read_metadata(trained_run / "checkpoints" / "best.safetensors")
    assert meta["classes"] == ["covid", "non_covid", "normal"]
    assert meta["preprocessing"]["size"] == 64
    assert meta["training_data"]["counts"]["train"] == {"covid": 40, "non_covid": 40, "normal": 40}
    assert meta["calibration"]["temperature"] > 0
    assert "val_metrics" in meta and "test_metrics" in meta
    best_epoch = metrics["best_epoch"]
    best_f1 = max(float(r["val_macro_f1"]) for r in rows)
    assert float(rows[best_epoch - 1]["val_macro_f1"]) == pytest.approx(best_f1)


def _strip_times(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_same_config_and_seed_give_the_same_metrics(
    tmp_path: Path, sample_dir: Path, trained_run: Path
) -> None:
    cfg = tiny_config(sample_dir, tmp_path, epochs=3)
    run = run_training(cfg, progress=False)
    assert _strip_times(_log(run)) == _strip_times(_log(trained_run))
    a = json.loads((run / "metrics.json").read_text())["test"]
    b = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["nll"] == pytest.approx(b["nll"], abs=1e-9)


def test_resume_after_an_interrupted_run_matches_an_uninterrupted_one(
    tmp_path: Path, sample_dir: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = kill_in_validation(monkeypatch, tiny_config(sample_dir, tmp_path, epochs=3), epoch=3)
    assert len(_log(run)) == 2 and not (run / "metrics.json").exists()
    assert run_training(None, resume=run, progress=False) == run
    assert _strip_times(_log(run)) == _strip_times(_log(trained_run))
    assert (run / "metrics.json").is_file()


def test_existing_run_folder_is_never_overwritten(tmp_path: Path, sample_dir: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "precious.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="already exists") as exc:
        run_training(tiny_config(sample_dir, tmp_path), progress=False)
    assert exc.value.exit_code == EXIT_USAGE  # an existing output is bad usage (README: exit 2)
    assert (tmp_path / "tiny" / "precious.txt").read_text() == "keep"


def test_early_stopping(tmp_path: Path, sample_dir: Path) -> None:
    cfg = tiny_config(sample_dir, tmp_path, epochs=8, patience=2, lr=0.0)  # lr 0: val hardly moves
    run = run_training(cfg, progress=False)
    rows = _log(run)
    assert len(rows) < 8
    assert [r["best"] for r in rows[-2:]] == [
        "0",
        "0",
    ]  # stopped after exactly `patience` non-improving epochs
    assert "early stopping" in (run / "train.log").read_text()


def test_held_out_source_is_never_trained_on_and_evaluated_apart(tmp_path: Path, sample_dir: Path) -> None:
    from xraydx.cli import main

    cfg = tiny_config(sample_dir, tmp_path, epochs=1)
    cfg.data.holdout_source = "nihcxr8"
    run = run_training(cfg, progress=False)
    with open(run / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["split"] for r in rows if r["source"] == "nihcxr8"} == {"external"}
    assert "external" not in {r["split"] for r in rows if r["source"] != "nihcxr8"}
    ext = json.loads((run / "metrics.json").read_text())["external"]
    assert ext["n"] == 25 and ext["source"] == "nihcxr8"
    lo, hi = ext["ci"]["accuracy"]  # bootstrap 95% CI, as for the test split
    assert 0 <= lo <= ext["accuracy"] <= hi <= 1 and {"macro_f1", "per_class"} <= set(ext["ci"])
    out = tmp_path / "ev"
    ckpt = run / "checkpoints" / "best.safetensors"
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(sample_dir), "--split", "external"]
    assert main([*args, "--out", str(out), "-q"]) == 0
    assert json.loads((out / "metrics.json").read_text())["n"] == 25
