"""optim.py, shared by the classifier and segmenter trainers: parameter groups, the warmup + cosine
schedule, the per-epoch CSV log and the resumable optimiser state."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from xraydx.optim import (
    load_train_state,
    lr_lambda,
    make_optimizer,
    param_groups,
    save_train_state,
    write_log,
)


def _net() -> torch.nn.Module:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    net[1].weight.requires_grad_(False)  # frozen: left out
    return net


def test_param_groups_decay_only_matrices_and_kernels() -> None:
    decay, no_decay = param_groups(_net(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(p.ndim for p in decay["params"]) == [2, 4]
    assert sorted(p.numel() for p in no_decay["params"]) == [2, 4, 4]  # biases and BN bias; BN weight frozen


@pytest.mark.parametrize("floor", [0.01, 0.02])
def test_lr_lambda_warms_up_then_decays_to_the_floor(floor: float) -> None:
    f = lr_lambda(100, 10, floor)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(floor + (1 - floor) * 0.5)  # half way through the cosine
    assert f(100) == pytest.approx(floor) and f(500) == pytest.approx(floor)
    vals = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    assert lr_lambda(10, 0)(0) == pytest.approx(0.5 * (1 + math.cos(0)) * (1 - 0.01) + 0.01)


def test_lr_lambda_constant_and_hold_schedules() -> None:
    cosine = lr_lambda(100, 10)
    const = lr_lambda(100, 10, schedule="constant")
    assert [const(s) for s in (0, 9)] == pytest.approx([0.1, 1.0])  # the same warmup
    assert all(const(s) == 1.0 for s in range(10, 200))
    hold = lr_lambda(100, 10, schedule="hold", hold_step=60)
    assert [hold(s) for s in range(61)] == pytest.approx([cosine(s) for s in range(61)])
    assert cosine(60) < 0.5 and all(hold(s) == pytest.approx(cosine(60)) for s in range(60, 200))
    held_early = lr_lambda(100, 10, schedule="hold", hold_step=0)  # held from the warmup's end
    assert held_early(50) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_lambda(100, 10, schedule="step")


def test_make_optimizer_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _net()
    opt, sched = make_optimizer(net, lr=1e-2, weight_decay=0.1, total_steps=20, warmup_steps=5)
    for _ in range(3):
        loss = net(torch.randn(2, 1, 3, 3)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-2 * 4 / 5)
    save_train_state(tmp_path / "s.safetensors", opt, sched, {"epoch": 3})
    opt2, sched2 = make_optimizer(net, lr=1e-2, weight_decay=0.1, total_steps=20, warmup_steps=5)
    assert load_train_state(tmp_path / "s.safetensors", opt2, sched2) == {"epoch": 3}
    assert sched2.get_last_lr() == sched.get_last_lr()
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_write_log(tmp_path: Path) -> None:
    rows = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    write_log(tmp_path / "log.csv", rows)
    with open(tmp_path / "log.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"epoch": "1", "loss": "0.5"}, {"epoch": "2", "loss": "0.25"}]
    write_log(tmp_path / "log.csv", rows, ["epoch", "loss", "extra"])
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "epoch,loss,extra"
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]
