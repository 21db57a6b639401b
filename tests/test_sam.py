"""Sharpness-aware minimisation (``train.sam``, :mod:`xraydx.sam`): the ascent moves the weights by ``rho``
along the gradient and the descent puts them back exactly; the perturbed pass leaves BatchNorm's running
statistics alone; bad settings are refused; a training uses it, differs from a plain one, and a killed
run resumes to the same epochs as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import epoch_rows, kill_in_validation, tiny_config
from xraydx.config import Config, validate
from xraydx.errors import ConfigError
from xraydx.sam import SAM


def test_the_ascent_is_rho_along_the_gradient_and_the_descent_undoes_it() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    frozen = nn.Linear(2, 2).requires_grad_(False)  # not a parameter SAM moves
    before = [p.detach().clone() for p in net.parameters()]
    nn.functional.cross_entropy(net(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    grads = [p.grad.detach().clone() for p in net.parameters()]  # type: ignore[union-attr]
    sam = SAM([*net.parameters(), *frozen.parameters()], rho=0.05)
    norm = sam.ascend()
    assert norm == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()), rel=1e-5)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before, strict=True)])
    assert float(moved.norm()) == pytest.approx(0.05, rel=1e-4)  # a step of length rho ...
    direction = torch.cat([g.flatten() for g in grads])
    assert torch.allclose(moved / moved.norm(), direction / direction.norm(), atol=1e-5)  # ... uphill
    with pytest.raises(RuntimeError, match="twice"):
        sam.ascend()
    sam.descend()
    assert all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="radius"):
        SAM(net.parameters(), rho=0.0)


def test_the_second_pass_holds_batchnorm_statistics() -> None:
    bn = nn.BatchNorm1d(3).train()
    bn(torch.randn(16, 3) + 4.0)
    held = bn.running_mean.clone()
    with SAM.second_pass(bn):
        bn(torch.randn(16, 3) - 9.0)
    assert torch.equal(bn.running_mean, held) and bn.momentum == 0.1
    bn(torch.randn(16, 3) - 9.0)
    assert not torch.equal(bn.running_mean, held)  # outside the pass they follow the batches again


def test_bad_settings_are_refused() -> None:
    cfg = Config()
    for rho in (-0.05, float("nan"), float("inf")):
        cfg.train.sam = rho
        with pytest.raises(ConfigError, match="train.sam"):
            validate(cfg)


def test_training_with_sam_differs_from_plain_and_resumes_to_the_same_epochs(
    tmp_path: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xraydx.train import run_training

    def cfg(runs: Path, **kw: object) -> object:
        return tiny_config(sample_dir, runs, epochs=2, balance="class_source", **kw)

    plain = run_training(cfg(tmp_path / "p"), progress=False)  # type: ignore[arg-type]
    full = run_training(cfg(tmp_path / "a", sam=0.05), progress=False)  # type: ignore[arg-type]
    assert "sharpness-aware minimisation" in (full / "train.log").read_text()
    assert epoch_rows(full)[0]["train_loss"] != epoch_rows(plain)[0]["train_loss"]
    run = kill_in_validation(monkeypatch, cfg(tmp_path / "b", sam=0.05), epoch=2)
    assert run_training(None, resume=run, progress=False) == run
    assert epoch_rows(run) == epoch_rows(full)
