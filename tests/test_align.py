"""The alignment of each class across sources (``train.align``, :mod:`xraydx.align`): the penalty is the
between-source scatter within classes over the total scatter (checked against a plain loop), 0 where a
class looks the same from every source or comes from one source only, unchanged by the features' scale;
the wrapper gives the classifier's own logits; bad settings are refused; a training uses it and logs it,
and its checkpoints stay plain classifiers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import epoch_rows, plain_and_with, refused_on_one_source, refused_values
from xraydx.align import WithFeatures, class_source_scatter
from xraydx.config import Config, validate
from xraydx.errors import ConfigError
from xraydx.models import create_model, load_checkpoint


def _by_loops(f: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> float:
    """The penalty written out cell by cell (float64)."""
    f = f.double()
    between = 0.0
    for c in y.unique():
        fc, sc = f[y == c], s[y == c]
        mu_c = fc.mean(0)
        for src in sc.unique():
            cell = fc[sc == src]
            between += len(cell) * float(((cell.mean(0) - mu_c) ** 2).sum())
    return between / float(((f - f.mean(0)) ** 2).sum())


def test_the_penalty_is_the_between_source_share_of_the_scatter() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        f = torch.randn(24, 7, generator=g)
        y = torch.randint(0, 3, (24,), generator=g)
        s = torch.randint(0, 4, (24,), generator=g)
        value = float(class_source_scatter(f, y, s))
        assert value == pytest.approx(_by_loops(f, y, s), rel=1e-5)
        assert 0.0 < value <= 1.0
        assert float(class_source_scatter(f * 37.0, y, s)) == pytest.approx(value, rel=1e-5)  # scale-free


def test_no_penalty_where_a_class_looks_alike_across_sources_or_has_one_source() -> None:
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    s = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    class_look = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-3.0, 2.0]])
    f = class_look[y] + 0.0  # every class the same from every source
    assert float(class_source_scatter(f, y, s)) == pytest.approx(0.0, abs=1e-7)
    # classes 1 and 2 each from one source: their sources' looks cost nothing, however different
    f2 = f.clone()
    f2[4:6] += 10.0
    assert float(class_source_scatter(f2, y, s)) == pytest.approx(0.0, abs=1e-7)
    # class 0's source 1 shifted: penalised, and the gradient pulls it back towards source 0
    f3 = f.clone()
    f3[s == 1] += torch.tensor([2.0, 0.0])
    f3.requires_grad_(True)
    pen = class_source_scatter(f3, y, s)
    assert float(pen.detach()) > 0.05
    pen.backward()
    assert f3.grad is not None and float(f3.grad[1, 0]) > 0 and float(f3.grad[0, 0]) < 0
    assert float(class_source_scatter(f[:1], y[:1], s[:1])) == 0.0  # one image: nothing to compare


def test_the_wrapper_returns_the_classifiers_own_logits() -> None:
    model = create_model("test_resnet", 3, in_chans=1, pretrained="none").eval()
    x = torch.randn(4, 1, 32, 32)
    logits, feats = WithFeatures(model)(x)
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert feats.shape[0] == 4 and feats.ndim == 2
    with pytest.raises(ValueError, match="timm model"):
        WithFeatures(torch.nn.Linear(3, 3))


def test_bad_settings_are_refused(tmp_path: Path, sample_dir: Path) -> None:
    refused_values(sample_dir, "align", (-0.5, float("nan"), float("inf")))
    cfg = Config()
    cfg.data.path = str(sample_dir)
    cfg.train.align, cfg.train.adversary = 1.0, 0.5
    with pytest.raises(ConfigError, match="cannot be combined"):
        validate(cfg)
    refused_on_one_source(sample_dir, tmp_path, "train.align needs two or more sources", align=1.0)


def test_training_with_alignment_logs_it_and_keeps_checkpoints_plain(
    tmp_path: Path, sample_dir: Path
) -> None:
    plain, run = plain_and_with(sample_dir, tmp_path, align=5.0)
    log = (run / "train.log").read_text()
    assert "alignment of each class across" in log and "class-within-source scatter share" in log
    share = float(log.split("class-within-source scatter share ")[1].split()[0])
    assert 0.0 < share < 1.0
    # the same seed and draws, one more term in the loss: the training went differently
    assert epoch_rows(run)[0]["train_loss"] != epoch_rows(plain)[0]["train_loss"]
    model, meta = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert meta["config"]["train"]["align"] == 5.0
    assert isinstance(model, torch.nn.Module) and not isinstance(model, WithFeatures)
