"""MixStyle (``train.mixstyle``): an image's channel statistics are replaced by the mixture, its normalised
content kept; the hook acts in training mode only and leaves the checkpoint's tensors alone; a training uses it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_MODEL, tiny_config
from xraydx.config import Config, validate
from xraydx.errors import ConfigError
from xraydx.mixstyle import REDUCTIONS, MixStyle, attach, stages
from xraydx.models import create_model


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)


def test_mixing_takes_the_other_images_statistics_and_keeps_the_content() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) * torch.tensor([1.0, 2.0, 3.0, 0.5]).view(4, 1, 1, 1) + torch.arange(
        4.0
    ).view(4, 1, 1, 1)
    ms = MixStyle(1.0)
    perm = torch.tensor([2, 3, 0, 1])
    assert torch.allclose(ms.mix(x, torch.ones(4), perm), x, atol=1e-5)  # lam = 1: unchanged
    out = ms.mix(x, torch.zeros(4), perm)  # lam = 0: the statistics of image perm[i]
    mu_o, sd_o = _stats(out)
    mu_x, sd_x = _stats(x)
    assert torch.allclose(mu_o, mu_x[perm], atol=1e-5) and torch.allclose(sd_o, sd_x[perm], atol=1e-4)
    z = lambda t: (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(z(out), z(x), atol=1e-4)  # the content (normalised map) is the image's own
    half = ms.mix(x, torch.full((4,), 0.5), perm)
    assert torch.allclose(_stats(half)[0], 0.5 * mu_x + 0.5 * mu_x[perm], atol=1e-5)


def test_hook_changes_training_forward_only_and_not_the_tensors() -> None:
    torch.manual_seed(0)
    model = create_model(TINY_MODEL, 3, pretrained="none", drop_rate=0.0)
    x = torch.randn(4, 1, 64, 64)
    keys, start = list(model.state_dict()), copy.deepcopy(model.state_dict())

    def forward(training: bool) -> torch.Tensor:  # from the same weights and batch-norm statistics each time
        model.load_state_dict(start)
        model.train(training)
        torch.manual_seed(1)
        with torch.no_grad():
            return model(x)

    plain_eval, plain_train = forward(False), forward(True)
    handles = attach(model, 1.0)
    assert len(handles) == len(REDUCTIONS) and list(model.state_dict()) == keys
    assert torch.equal(forward(False), plain_eval)  # evaluation untouched
    assert not torch.allclose(forward(True), plain_train, atol=1e-4)
    for h in handles:
        h.remove()
    assert torch.allclose(forward(True), plain_train, atol=1e-6)


def test_bad_settings_and_architectures_are_refused() -> None:
    for key, value in (("mixstyle", 1.5), ("mixstyle", -0.1), ("mixstyle_alpha", 0.0)):
        cfg = Config()
        cfg.data.path = "x"
        setattr(cfg.train, key, value)
        with pytest.raises(ConfigError, match=f"train.{key}"):
            validate(cfg)
    with pytest.raises(ConfigError, match="train.mixstyle"):
        attach(nn.Sequential(nn.Conv2d(1, 4, 3)), 0.5)
    assert stages(create_model("mobilenetv2_100", 3, pretrained="none")) == [
        "blocks.1",
        "blocks.2",
        "blocks.4",
    ]
    with pytest.raises(ConfigError, match="probability"):
        MixStyle(0.0)


def test_training_with_mixstyle_logs_it_and_saves_a_plain_checkpoint(
    tmp_path: Path, sample_dir: Path
) -> None:
    from safetensors import safe_open

    from xraydx.train import run_training

    run = run_training(tiny_config(sample_dir, tmp_path, epochs=1, mixstyle=0.5), progress=False)  # type: ignore[arg-type]
    assert "MixStyle after layer1, layer2, layer3: p=0.5" in (run / "train.log").read_text()
    model = create_model(TINY_MODEL, 3, pretrained="none")
    with safe_open(str(run / "checkpoints" / "best.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(model.state_dict())
