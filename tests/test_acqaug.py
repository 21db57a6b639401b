"""Acquisition-cue augmentation and class x source balanced sampling, on real sample images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import sample_images
from xraydx.acqaug import AcquisitionAugment
from xraydx.config import Config, ConfigError, validate
from xraydx.device import Dist
from xraydx.trainset import epoch_order, sampling_weights


def _batch(n: int = 16, size: int = 96) -> torch.Tensor:
    imgs = [np.asarray(Image.open(p).convert("L").resize((size, size))) for p in sample_images()[:n]]
    return torch.from_numpy(np.stack(imgs)).unsqueeze(1)


def test_acquisition_augment_is_seeded_changes_images_and_keeps_shape() -> None:
    b = _batch()
    aug = AcquisitionAugment()
    out1 = aug(b, torch.Generator().manual_seed(7))
    out2 = aug(b, torch.Generator().manual_seed(7))
    out3 = aug(b, torch.Generator().manual_seed(8))
    assert out1.shape == b.shape and out1.dtype == torch.uint8
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    changed = [(out1[i] != b[i]).float().mean().item() for i in range(len(b))]
    assert sum(c > 0.01 for c in changed) >= len(b) // 2  # most images get at least one cue randomised
    assert torch.equal(b, _batch())  # the input batch is left as it was


def test_acquisition_strength_zero_is_identity_and_bad_input_is_refused() -> None:
    b = _batch(4)
    assert torch.equal(AcquisitionAugment(0.0)(b, torch.Generator().manual_seed(0)), b)
    with pytest.raises(ValueError, match="uint8"):
        AcquisitionAugment()(b.float(), torch.Generator())
    with pytest.raises(ValueError, match="strength"):
        AcquisitionAugment(1.5)
    cfg = Config()
    cfg.train.acquisition = 2.0
    with pytest.raises(ConfigError, match="train.acquisition"):
        validate(cfg)


def test_class_source_weights_balance_classes_and_sources_within_each_class() -> None:
    labels = np.array([0] * 90 + [0] * 10 + [1] * 30 + [2] * 5 + [2] * 45)
    sources = ["a"] * 90 + ["b"] * 10 + ["a"] * 30 + ["c"] * 5 + ["a"] * 45
    w = sampling_weights(labels, sources, "class_source")
    assert w is not None
    w = w / w.sum()
    for c in range(3):
        assert w[labels == c].sum() == pytest.approx(1 / 3)
    src = np.array(sources)
    assert w[(labels == 0) & (src == "a")].sum() == pytest.approx(w[(labels == 0) & (src == "b")].sum())
    assert w[(labels == 2) & (src == "c")].sum() == pytest.approx(1 / 6)


def test_epoch_size_fixes_the_draws_per_epoch() -> None:
    labels = np.array([0, 1, 2] * 20)
    cfg = Config()
    cfg.train.epoch_size = 25
    one = Dist()
    for balance in ("none", "class_source"):
        cfg.train.balance = balance
        order = epoch_order(len(labels), labels, cfg, 1, one, ["s"] * len(labels))
        assert len(order) == 25 and order.max() < len(labels)
        assert np.array_equal(order, epoch_order(len(labels), labels, cfg, 1, one, ["s"] * len(labels)))
