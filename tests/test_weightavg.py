"""Weight averaging while training: ``train.average`` (xraydx.weightavg), on the real sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import epoch_rows, kill_in_validation, tiny_config, val_macro_f1
from xraydx.checkpoint import load_tensors, read_metadata
from xraydx.errors import ConfigError, TrainError
from xraydx.train import run_training
from xraydx.weightavg import RAW_FILE, WeightAverage


def test_swa_is_the_mean_and_ema_the_moving_average_of_the_steps_after_the_start() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    swa = WeightAverage(model, "swa", start_step=2)
    ema = WeightAverage(model, "ema", start_step=2, decay=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for i in range(6):
        torch.manual_seed(i)
        loss = model(torch.randn(8, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        swa.step(model, i + 1)
        ema.step(model, i + 1)
    assert swa.count == 4 and ema.count == 4  # steps 3-6
    for k, v in swa.module.named_parameters():
        assert torch.allclose(v, torch.stack([s[k] for s in seen[2:]]).mean(0), atol=1e-6)
    for k, v in ema.module.named_parameters():
        want = seen[2][k]
        for s in seen[3:]:
            want = 0.8 * want + 0.2 * s[k]
        assert torch.allclose(v, want, atol=1e-6)
    assert not torch.allclose(swa.module[0].weight, model[0].weight)  # a copy: the model is its own
    with pytest.raises(ValueError, match="unknown mode"):
        WeightAverage(model, "mean", 0)


def test_the_average_is_validated_checkpointed_and_a_killed_run_resumes_to_the_same_weights(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 steps per epoch, 24 in all; averaging from step 10 on: epoch 1 validates the trained weights
    settings = {"epochs": 3, "average": "swa", "average_start": 0.4}
    whole = run_training(tiny_config(sample_dir, tmp_path / "a", **settings), progress=False)
    ck = whole / "checkpoints"
    meta = read_metadata(ck / "last.safetensors")
    assert meta["average"] == {"mode": "swa", "steps": 15}  # steps 10-24
    last, raw = load_tensors(ck / "last.safetensors", TrainError), load_tensors(ck / RAW_FILE, TrainError)
    assert last.keys() == raw.keys() and not torch.equal(last["conv1.0.weight"], raw["conv1.0.weight"])
    means = [k for k in last if k.endswith("running_mean")]
    assert means and all(not torch.equal(last[k], raw[k]) for k in means)  # its own BatchNorm statistics
    # what the log reports for the last epoch is the checkpoint's own val macro-F1: the average was validated
    rows = epoch_rows(whole)
    assert float(rows[-1]["val_macro_f1"]) == pytest.approx(
        val_macro_f1(whole, "last.safetensors", sample_dir, tmp_path), abs=1e-4
    )
    log = (whole / "train.log").read_text()
    assert "weight averaging (swa)" in log and "weight average of 15 steps" in log
    assert "weight average of" not in log.split("epoch 1/3")[0].split("weight averaging (swa)")[1]

    run = kill_in_validation(monkeypatch, tiny_config(sample_dir, tmp_path / "b", **settings), epoch=3)
    assert read_metadata(run / "checkpoints" / "last.safetensors")["average"]["steps"] == 7  # after epoch 2
    assert run_training(None, resume=run, progress=False) == run
    assert epoch_rows(run) == rows  # the resumed run repeats the uninterrupted one
    again = load_tensors(run / "checkpoints" / "last.safetensors", TrainError)
    assert all(torch.equal(again[k], last[k]) for k in last)


def test_resuming_without_the_trained_weights_is_refused(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = kill_in_validation(
        monkeypatch, tiny_config(sample_dir, tmp_path, epochs=3, average="ema", average_start=0.0), epoch=2
    )
    (run / "checkpoints" / RAW_FILE).unlink()
    with pytest.raises(TrainError, match=f"{RAW_FILE}: missing.*weight average of 8 steps"):
        run_training(None, resume=run, progress=False)


def test_the_hold_schedule_keeps_the_learning_rate_where_the_averaging_starts(
    sample_dir: Path, tmp_path: Path
) -> None:
    # 8 steps per epoch, 24 in all; the cosine is held from step 9 (0.4 of 24) on, as SWA averages
    cfg = tiny_config(sample_dir, tmp_path, epochs=3, average="swa", average_start=0.4, schedule="hold")
    run = run_training(cfg, progress=False)
    lrs = [float(r["lr"]) for r in epoch_rows(run)]
    base = cfg.train.lr
    assert lrs[1] == lrs[2] and lrs[0] > lrs[1] and 0.0 < lrs[1] < base
    assert "learning-rate schedule after the warmup: hold" in (run / "train.log").read_text()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("average", "mean", "train.average must be one of none, swa, ema"),
        ("average_start", 1.0, r"train.average_start must be in \[0, 1\)"),
        ("ema_decay", 1.0, r"train.ema_decay must be in \(0, 1\)"),
        ("schedule", "step", "train.schedule must be one of cosine, constant, hold"),
    ],
)
def test_bad_averaging_settings_are_refused_before_anything_runs(
    sample_dir: Path, tmp_path: Path, key: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_training(tiny_config(sample_dir, tmp_path, **{key: value}), progress=False)
    assert not (tmp_path / "tiny").exists()
