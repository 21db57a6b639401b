"""The source-adversarial head (``train.adversary``, :mod:`xraydx.dann`): the gradient reversal turns the
head's gradient around, the coefficient ramps as in the paper, a training uses the head (checkpoints stay
plain classifiers) and a resumed one continues with the head's saved weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import kill_in_validation, one_source_manifest, tiny_config
from xraydx.checkpoint import load_tensors
from xraydx.config import Config, validate
from xraydx.dann import WithAdversary, grad_reverse, ramp, source_ids
from xraydx.errors import ConfigError
from xraydx.models import create_model, load_checkpoint


def test_the_reversal_is_the_identity_forward_and_minus_coeff_backward() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y.detach(), x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_the_coefficient_ramps_from_zero_to_the_weight() -> None:
    assert ramp(0.3, 0.0) == 0.0
    assert ramp(0.3, 1.0) == pytest.approx(0.3 * (2 / (1 + math.exp(-10)) - 1))
    assert ramp(0.3, 0.1) == pytest.approx(0.3 * (2 / (1 + math.exp(-1)) - 1))
    assert ramp(0.3, 0.2) < ramp(0.3, 0.5) < ramp(0.3, 2.0) == ramp(0.3, 1.0)


def test_source_ids_and_the_head_on_a_timm_model() -> None:
    ids, names = source_ids(["b", "a", "", "b"])
    assert names == ["", "a", "b"] and ids.tolist() == [2, 1, 0, 2]
    model = create_model("test_resnet", 3, in_chans=1, pretrained="none")
    wrapped = WithAdversary(model, 3, in_chans=1, size=32)
    wrapped.coeff = 1.0
    x = torch.randn(4, 1, 32, 32)
    logits, adv = wrapped(x)
    assert logits.shape == (4, 3) and adv.shape == (4, 3)
    assert torch.allclose(logits, model(x), atol=1e-5)  # the class head is the model's own
    # the source head's loss pushes the network's weights the opposite way to the head's own gradient
    torch.nn.functional.cross_entropy(adv, torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None for p in wrapped.adversary.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="two or more training sources"):
        WithAdversary(model, 1, in_chans=1, size=32)


def test_both_heads_see_the_same_pooled_features_under_dropout() -> None:
    """In training mode the class logits come from the very features the source head is given: one
    pooling, one dropout mask (pooling twice would draw two masks and let the heads see different images)."""
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, in_chans=1, pretrained="none", drop_rate=0.5)
    wrapped = WithAdversary(model, 3, in_chans=1, size=32).train()
    seen: list[torch.Tensor] = []
    wrapped.adversary[0].register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    logits, _ = wrapped(torch.randn(4, 1, 32, 32))
    assert len(seen) == 1 and (seen[0] == 0).any()  # dropout was drawn
    assert torch.allclose(logits, model.get_classifier()(seen[0]), atol=1e-6)


def test_bad_settings_are_refused(tmp_path: Path, sample_dir: Path) -> None:
    cfg = Config()
    for w in (-0.1, float("nan"), float("inf")):
        cfg.train.adversary = w
        with pytest.raises(ConfigError, match="train.adversary"):
            validate(cfg)
    from xraydx.train import run_training

    one = one_source_manifest(sample_dir, tmp_path / "one.csv")  # nothing to be adversarial about
    with pytest.raises(ConfigError, match="two or more sources"):
        run_training(tiny_config(one, tmp_path / "runs", epochs=1, adversary=0.3), progress=False)  # type: ignore[arg-type]


def test_training_with_the_head_logs_it_keeps_checkpoints_plain_and_resumes_it(
    tmp_path: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xraydx.train import ADVERSARY_FILE, run_training

    def cfg(runs: Path) -> object:
        return tiny_config(sample_dir, runs, epochs=2, adversary=0.5, balance="class_source")

    full = run_training(cfg(tmp_path / "a"), progress=False)  # type: ignore[arg-type]
    log = (full / "train.log").read_text()
    assert "source-adversarial head" in log and "the source head names the source of" in log
    head = load_tensors(full / "checkpoints" / ADVERSARY_FILE)
    model, meta = load_checkpoint(full / "checkpoints" / "best.safetensors")  # a plain classifier
    assert not any(k.startswith("adversary") for k in model.state_dict())
    assert meta["config"]["train"]["adversary"] == 0.5

    run = kill_in_validation(monkeypatch, cfg(tmp_path / "b"), epoch=2)
    assert run_training(None, resume=run, progress=False) == run
    resumed = load_tensors(run / "checkpoints" / ADVERSARY_FILE)
    # the same head as the uninterrupted run's: it continued from its saved weights
    assert all(torch.allclose(resumed[k], head[k], atol=1e-5) for k in head)
