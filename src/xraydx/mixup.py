"""Mixup and CutMix of the training batch: ``train.mixup`` (timm's :class:`timm.data.Mixup`).

Mixup (Zhang, Cisse, Dauphin and Lopez-Paz, ICLR 2018) trains on convex combinations of two images and of
their labels, ``x = lam * x_i + (1 - lam) * x_j`` with the target ``lam * y_i + (1 - lam) * y_j``; CutMix
(Yun et al., ICCV 2019) pastes a box of ``x_j`` into ``x_i`` and weighs the labels by the box's area. As a
domain-generalisation method ("inter-domain mixup", Xu et al., AAAI 2020; Wang et al. 2020) the two images
come from different collections, so a mixed image carries two hospitals' looks and a label that follows
neither: reading the scanner no longer pays. Here the partner of each image is the batch read backwards
(timm's pairing); the training loop gathers a batch in record order, so each record is paired with one
far from it in the manifest (in a manifest written collection by collection, mostly another collection).

The mixing, the Beta draws and the box are timm's; timm draws them from numpy's global generator, which
:meth:`BatchMixup.seed_epoch` seeds per epoch (a run, and a resumed run, repeats). The label smoothing of
``train.label_smoothing`` goes into the soft targets (the loss then adds none). A batch of odd size (an
epoch's last) is not mixed. Training only: checkpoints and every inference engine are untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from xraydx.errors import ConfigError

__all__ = ["BatchMixup", "from_config"]


class BatchMixup:
    """``train.mixup`` (probability per batch), ``train.mixup_alpha`` (Mixup's Beta parameter, 0 = no Mixup)
    and ``train.cutmix_alpha`` (CutMix's, 0 = none; with both, each mixed batch is one or the other, evenly)."""

    def __init__(
        self, prob: float, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, n_classes: int
    ) -> None:
        if not 0.0 < prob <= 1.0:
            raise ConfigError(f"train.mixup must be in (0, 1] (the probability per batch), got {prob}")
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha + cutmix_alpha <= 0:
            raise ConfigError(
                "train.mixup needs train.mixup_alpha > 0 or train.cutmix_alpha > 0 (Beta parameters, both >= 0),"
                f" got {mixup_alpha} and {cutmix_alpha}"
            )
        self.prob, self.mixup_alpha, self.cutmix_alpha = float(prob), float(mixup_alpha), float(cutmix_alpha)
        self.n_classes, self.label_smoothing = n_classes, float(label_smoothing)
        self.fn = Mixup(
            mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, prob=self.prob, switch_prob=0.5,
            mode="batch", correct_lam=True, label_smoothing=self.label_smoothing, num_classes=n_classes,
        )  # fmt: skip

    def describe(self) -> str:
        kinds = [f"Mixup alpha={self.mixup_alpha}"] * (self.mixup_alpha > 0)
        kinds += [f"CutMix alpha={self.cutmix_alpha}"] * (self.cutmix_alpha > 0)
        return f"{' / '.join(kinds)} on {self.prob:.0%} of the batches (timm), each image with the batch read backwards"

    @staticmethod
    def seed_epoch(seed: int, epoch: int) -> None:
        """timm draws from numpy's global generator: seed it for this epoch."""
        np.random.seed((seed * 15_485_863 + epoch * 7_727) % 2**32)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A normalised float batch and its integer labels -> the (maybe) mixed batch and soft targets."""
        if len(x) % 2:  # timm mixes pairs; an odd batch keeps its images, its targets are only smoothed
            return x, mixup_target(y, self.n_classes, lam=1.0, smoothing=self.label_smoothing)
        return self.fn(x, y)


def from_config(train: Any, n_classes: int) -> BatchMixup | None:
    """The mixing a :class:`~xraydx.config.TrainConfig` asks for; None where ``train.mixup`` is 0."""
    if train.mixup <= 0:
        return None
    return BatchMixup(train.mixup, train.mixup_alpha, train.cutmix_alpha, train.label_smoothing, n_classes)
