"""A run folder that lost part of itself, data that changed under a run, an early failure, a divergence:
resume, --name and the checkpoints behave as docs/reliability.md says (issue 16 items 3, 4, 14, 15)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from xraydx.cli import main
from xraydx.errors import EXIT_FATAL, EXIT_OK
from xraydx.models import read_metadata
from xraydx.train import run_training


def _copy_run(trained_run: Path, tmp_path: Path, epochs: int | None = None) -> Path:
    run = tmp_path / "runs" / trained_run.name
    shutil.copytree(trained_run, run)
    if epochs is not None:
        cfg_path = run / "config.yaml"
        doc = yaml.safe_load(cfg_path.read_text())
        doc["train"]["epochs"] = epochs
        cfg_path.write_text(yaml.safe_dump(doc))
    return run


def _log_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _no_times(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_resume_without_the_state_file_goes_on_from_last_and_says_so(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(trained_run, tmp_path, epochs=4)
    (run / "checkpoints" / "last.state.safetensors").unlink()
    best_epoch = read_metadata(run / "checkpoints" / "best.safetensors")["epoch"]
    before = _log_rows(run)
    log_before = (run / "train.log").read_text()
    assert main(["train", "--resume", str(run), "-q"]) == EXIT_OK
    added = (run / "train.log").read_text()[len(log_before) :]
    assert "WITHOUT optimiser state" in added
    assert "epoch 4/4" in added and "epoch 1/4" not in added  # only the missing epoch was trained
    rows = _log_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert _no_times(rows[:3]) == _no_times(before)  # log.csv keeps its rows
    assert read_metadata(run / "checkpoints" / "best.safetensors")["epoch"] in (best_epoch, 4)
    assert read_metadata(run / "checkpoints" / "last.safetensors")["epoch"] == 4


def test_resume_refuses_a_run_whose_last_checkpoint_is_gone(trained_run: Path, tmp_path: Path) -> None:
    run = _copy_run(trained_run, tmp_path)
    (run / "checkpoints" / "last.safetensors").unlink()
    (run / "checkpoints" / "last.state.safetensors").unlink()
    best = (run / "checkpoints" / "best.safetensors").read_bytes()
    log = (run / "log.csv").read_bytes()
    assert main(["train", "--resume", str(run), "-q"]) == EXIT_FATAL
    assert (run / "checkpoints" / "best.safetensors").read_bytes() == best
    assert (run / "log.csv").read_bytes() == log


def _own_data(sample_dir: Path, run: Path, tmp_path: Path) -> Path:
    """A copy of the sample, and the copied run pointed at it (config and manifest.csv)."""
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    for name in ("config.yaml", "manifest.csv"):
        p = run / name
        p.write_text(
            p.read_text().replace(str(sample_dir.resolve()), str(data)).replace(str(sample_dir), str(data))
        )
    doc = yaml.safe_load((run / "config.yaml").read_text())
    doc["data"]["path"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    return data


def test_resume_trains_on_the_runs_own_split_and_ignores_new_images(
    trained_run: Path, sample_dir: Path, tmp_path: Path
) -> None:
    run = _copy_run(trained_run, tmp_path, epochs=4)
    data = _own_data(sample_dir, run, tmp_path)
    manifest = (run / "manifest.csv").read_bytes()
    membership = read_metadata(run / "checkpoints" / "last.safetensors")["split_membership"]
    # images added between the kill and the resume: a re-split would move trained-on images to val/test
    with open(data / "manifest.csv", "a", newline="") as fh:
        w = csv.writer(fh)
        for i, src in enumerate(sorted((data / "train" / "normal").glob("*.png"))[:12]):
            dst = data / "train" / "normal" / f"added{i}.png"
            shutil.copy(src, dst)
            w.writerow([f"train/normal/{dst.name}", "normal", "train", f"added{i}", "added", "", "", "", ""])
    assert main(["train", "--resume", str(run), "-q"]) == EXIT_OK
    assert (run / "manifest.csv").read_bytes() == manifest
    assert (
        "12 images were added to the data since the run started and are ignored"
        in (run / "train.log").read_text()
    )
    assert read_metadata(run / "checkpoints" / "last.safetensors")["split_membership"] == membership


def test_resume_refuses_when_images_of_the_run_are_gone(
    trained_run: Path, sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(trained_run, tmp_path, epochs=4)
    data = _own_data(sample_dir, run, tmp_path)
    next((data / "val" / "covid").glob("*.png")).unlink()
    log = (run / "log.csv").read_bytes()
    assert main(["train", "--resume", str(run), "-q"]) == EXIT_FATAL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 images of the run's split are missing" in err[0]
    assert (run / "log.csv").read_bytes() == log


def test_early_failure_does_not_block_the_name_and_divergence_keeps_the_last_good_checkpoint(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    import xraydx.train as train_mod

    empty = tmp_path / "empty"
    (empty / "train" / "covid").mkdir(parents=True)
    args = ["train", "--model", "test_resnet", "--pretrained", "none", "--image-size", "64", "--batch-size", "16",
            "--runs-dir", str(tmp_path / "runs"), "--name", "again", "-q", "--set", "train.threads=1"]  # fmt: skip
    assert main([*args, "--data", str(empty), "--epochs", "2"]) == EXIT_FATAL  # fails before any checkpoint
    assert (tmp_path / "runs" / "again").is_dir()
    capsys.readouterr()

    real = train_mod.train_one_epoch

    def diverges_in_epoch_2(t: object, epoch: int, progress: bool) -> torch.Tensor:
        stats = real(t, epoch, progress)  # type: ignore[arg-type]
        if epoch == 2:
            stats[0] = float("nan")
        return stats

    monkeypatch.setattr(train_mod, "train_one_epoch", diverges_in_epoch_2)
    assert (
        main([*args, "--data", str(sample_dir), "--epochs", "3"]) == EXIT_FATAL
    )  # the same --name is reused
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "training diverged in epoch 2" in err[0] and "last.safetensors (epoch 1)" in err[0]
    )
    run = tmp_path / "runs" / "again"
    assert read_metadata(run / "checkpoints" / "last.safetensors")["epoch"] == 1
    assert read_metadata(run / "checkpoints" / "best.safetensors")["epoch"] == 1
    assert [r["epoch"] for r in _log_rows(run)] == ["1"]
    assert "reusing run folder" in (run / "train.log").read_text()


def test_a_folder_with_other_files_is_still_never_reused(tmp_path: Path, sample_dir: Path) -> None:
    from xraydx.errors import OutputExistsError

    run = tmp_path / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):  # exit 2: an existing output
        run_training(tiny_config(sample_dir, tmp_path), progress=False)
    assert (run / "notes.txt").read_text() == "mine"


def test_evaluate_checks_the_checkpoints_recorded_split(
    trained_run: Path, sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    ckpt = trained_run / "checkpoints" / "best.safetensors"
    assert set(read_metadata(ckpt)["split_membership"]) == {"train", "val", "test"}
    base = ["evaluate", "--checkpoint", str(ckpt), "-q"]
    assert main([*base, "--data", str(sample_dir), "--out", str(tmp_path / "same")]) == EXIT_OK
    same = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert same["split_check"] == "the data gives exactly the checkpoint's recorded split"
    # two training images copied into the test split of a copy of the data: the split is not the run's
    data = tmp_path / "copy" / sample_dir.name  # the same dataset, moved (a folder of the same name)
    shutil.copytree(sample_dir, data)
    with open(data / "manifest.csv", "a", newline="") as fh:
        for i, src in enumerate(sorted((data / "train" / "covid").glob("*.png"))[:2]):
            shutil.copy(src, data / "test" / "covid" / f"was_train{i}.png")
            csv.writer(fh).writerow(
                [f"test/covid/was_train{i}.png", "covid", "test", f"t{i}", "x", "", "", "", ""]
            )
    capsys.readouterr()
    assert main([*base, "--data", str(data), "--out", str(tmp_path / "refused")]) == EXIT_FATAL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no longer matches the checkpoint's recorded test split" in err[0]
    assert "32" in err[0] and "--allow-changed-data" in err[0] and "manifest.csv" in err[0]
    assert not (tmp_path / "refused" / "metrics.json").exists()
    out = tmp_path / "allowed"
    assert main([*base, "--data", str(data), "--out", str(out), "--allow-changed-data"]) == EXIT_OK
    assert json.loads((out / "metrics.json").read_text())["split_check"].startswith("CHANGED:")
    # the run's own manifest.csv, given as the data, is the recorded split
    own = tmp_path / "own"
    assert main([*base, "--data", str(trained_run / "manifest.csv"), "--out", str(own)]) == EXIT_OK
    assert json.loads((own / "metrics.json").read_text())["split_check"].startswith("the data gives exactly")
    # another dataset (an external test set) is evaluated: its split was never the run's
    other = tmp_path / "external"
    shutil.copytree(data, other)
    assert main([*base, "--data", str(other), "--out", str(tmp_path / "ext")]) == EXIT_OK
    assert json.loads((tmp_path / "ext" / "metrics.json").read_text())["split_check"].startswith(
        "another dataset"
    )
