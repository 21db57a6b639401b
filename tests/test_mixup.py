"""Mixup / CutMix of the training batch (``train.mixup``): each image is mixed with the batch read
backwards and its soft target follows the mixing weight; CutMix pastes a box whose area is the target's
share; the draws repeat per (seed, epoch); bad settings are refused; a training uses it and logs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from xraydx.config import Config, validate
from xraydx.errors import ConfigError
from xraydx.mixup import BatchMixup, from_config

N_CLASSES = 3


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1][:n])


def test_mixup_mixes_each_image_with_its_mirror_and_the_targets_follow() -> None:
    x, y = _batch()
    mix = BatchMixup(1.0, 0.4, 0.0, label_smoothing=0.0, n_classes=N_CLASSES)
    mix.seed_epoch(0, 1)
    out, soft = mix(x.clone(), y)
    assert soft.shape == (8, N_CLASSES) and torch.allclose(soft.sum(1), torch.ones(8))
    lam = float(soft[0, y[0]]) if y[0] != y[-1] else None
    assert lam is not None and 0.0 < lam < 1.0
    # one weight for the whole batch (timm's batch mode): out = lam * x + (1 - lam) * x reversed
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    onehot = torch.nn.functional.one_hot(y, N_CLASSES).float()
    assert torch.allclose(soft, lam * onehot + (1 - lam) * onehot.flip(0), atol=1e-6)


def test_cutmix_pastes_a_box_whose_area_is_the_partner_share() -> None:
    x, y = _batch()
    mix = BatchMixup(1.0, 0.0, 1.0, label_smoothing=0.0, n_classes=N_CLASSES)
    mix.seed_epoch(0, 2)
    out, soft = mix(x.clone(), y)
    from_partner = torch.isclose(out, x.flip(0)) & ~torch.isclose(out, x)
    from_self = torch.isclose(out, x)
    assert bool((from_partner | from_self).all())  # every pixel is one image's or the other's, unmixed
    share = float(from_partner[0].float().mean())
    assert 0.0 < share < 1.0
    onehot = torch.nn.functional.one_hot(y, N_CLASSES).float()
    assert torch.allclose(soft, (1 - share) * onehot + share * onehot.flip(0), atol=1e-6)


def test_draws_repeat_per_seed_and_epoch_and_odd_batches_are_only_smoothed() -> None:
    x, y = _batch()
    mix = BatchMixup(1.0, 0.4, 1.0, label_smoothing=0.1, n_classes=N_CLASSES)
    runs = []
    for epoch in (1, 1, 2):
        mix.seed_epoch(5, epoch)
        runs.append([mix(x.clone(), y) for _ in range(3)])
    for (a, sa), (b, sb) in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b) and torch.equal(sa, sb)
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(runs[0], runs[2], strict=True))
    odd_x, odd_y = x[:7], y[:7]
    out, soft = mix(odd_x.clone(), odd_y)
    assert torch.equal(out, odd_x)
    assert torch.allclose(soft.max(1).values, torch.full((7,), 0.9 + 0.1 / 3))
    assert torch.equal(soft.argmax(1), odd_y)


def test_bad_settings_are_refused_before_anything_runs() -> None:
    for key, value, match in (
        ("mixup", 1.5, "train.mixup"),
        ("mixup", -0.1, "train.mixup"),
        ("mixup_alpha", -1.0, "train.mixup_alpha"),
        ("cutmix_alpha", float("inf"), "train.cutmix_alpha"),
    ):
        cfg = Config()
        cfg.data.path = "x"
        setattr(cfg.train, key, value)
        with pytest.raises(ConfigError, match=match):
            validate(cfg)
    cfg = Config()
    cfg.data.path = "x"
    cfg.train.mixup, cfg.train.mixup_alpha = 0.5, 0.0
    with pytest.raises(ConfigError, match="mixup_alpha > 0 or train.cutmix_alpha > 0"):
        validate(cfg)
    assert from_config(Config().train, N_CLASSES) is None  # off by default
    with pytest.raises(ConfigError, match="probability"):
        BatchMixup(0.0, 0.2, 0.0, 0.1, N_CLASSES)


def test_training_with_mixup_logs_it_and_differs_from_the_plain_run(tmp_path: Path, sample_dir: Path) -> None:
    import csv
    import math

    from xraydx.train import run_training

    plain = run_training(tiny_config(sample_dir, tmp_path / "a", epochs=1), progress=False)  # type: ignore[arg-type]
    mixed = run_training(
        tiny_config(sample_dir, tmp_path / "b", epochs=1, mixup=1.0, cutmix_alpha=1.0),  # type: ignore[arg-type]
        progress=False,
    )
    log = (mixed / "train.log").read_text()
    assert "batch mixing: Mixup alpha=0.2 / CutMix alpha=1.0 on 100% of the batches" in log

    def first_loss(run: Path) -> float:
        rows = list(csv.DictReader((run / "log.csv").open()))
        return float(rows[0]["train_loss"])

    loss = first_loss(mixed)
    assert math.isfinite(loss) and loss != pytest.approx(first_loss(plain), rel=1e-4)
