"""Weight averaging while training: ``train.average`` = ``swa`` | ``ema``.

- ``swa``: the plain mean of the weights after every optimiser step from ``train.average_start`` (a share
  of the run's steps) on: stochastic weight averaging (Izmailov et al., UAI 2018) taken densely, after
  every step, as SWAD does for domain generalisation (Cha et al., NeurIPS 2021: a mean of weights sits in
  a flatter region of the loss, and flat minima lose less at a domain never trained on).
- ``ema``: an exponential moving average with decay ``train.ema_decay``, from the same step on.

The averaging itself is PyTorch's (:class:`torch.optim.swa_utils.AveragedModel`); only parameters are
averaged. A mean of weights is a network of its own, so its BatchNorm statistics are not a mean either:
before each validation they are re-estimated on (up to :data:`BN_IMAGES` of) that epoch's training draws,
augmented as the epoch augmented them (:func:`xraydx.bnadapt.adapt_batchnorm`). From the first epoch that
ends with an average, the average is what the run validates, selects and checkpoints (``best`` / ``last``,
so ``evaluate``, ``export`` and ``predict`` use it); the weights being trained are kept next to them for
``--resume`` (:data:`RAW_FILE`), with the number of steps averaged in the checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from xraydx.bnadapt import adapt_batchnorm, batchnorms
from xraydx.constants import AVERAGE_MODES

__all__ = ["BN_IMAGES", "RAW_FILE", "WeightAverage"]

#: training draws on which the average's BatchNorm statistics are re-estimated before each validation
BN_IMAGES = 1024
#: the weights being trained (not the average) after the last epoch, for --resume
RAW_FILE = "last.raw.safetensors"


class WeightAverage:
    """The running average of ``model``'s weights (a copy; ``model`` itself is never changed)."""

    def __init__(self, model: nn.Module, mode: str, start_step: int, decay: float = 0.99) -> None:
        if mode == "none" or mode not in AVERAGE_MODES:
            raise ValueError(f"weight averaging: unknown mode {mode!r} (swa or ema)")
        self.mode, self.start_step, self.decay = mode, max(0, int(start_step)), decay
        avg_fn = get_ema_multi_avg_fn(decay) if mode == "ema" else None
        self.averaged = AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=False)

    @property
    def module(self) -> nn.Module:
        """The averaged network (same architecture and state-dict keys as the trained one)."""
        return self.averaged.module

    @property
    def count(self) -> int:
        """How many optimiser steps' weights are in the average (0: averaging has not begun)."""
        return int(self.averaged.n_averaged)

    def describe(self) -> str:
        how = "mean" if self.mode == "swa" else f"exponential moving average (decay {self.decay})"
        return f"weight averaging ({self.mode}): the {how} of the weights after every step from step {self.start_step + 1} on"

    def step(self, model: nn.Module, steps_done: int) -> None:
        """Called after each optimiser step; ``steps_done`` counts the run's steps so far (1 after the first)."""
        if steps_done > self.start_step:
            self.averaged.update_parameters(model)

    def load(self, state: dict[str, torch.Tensor], count: int) -> None:
        """The average as a checkpoint saved it (``count`` steps in it), for ``--resume``."""
        self.module.load_state_dict(state)
        self.averaged.n_averaged.fill_(int(count))

    def refresh_statistics(
        self,
        images: np.ndarray,
        spec: object,
        device: torch.device,
        prepare: Callable[[np.ndarray], torch.Tensor],
    ) -> int:
        """The average's BatchNorm statistics re-estimated on uint8 (N, S, S) training ``images`` made into
        the network's input by ``prepare``; the number of images used (0: the network has no BatchNorm)."""
        if not batchnorms(self.module):
            return 0
        _, n = adapt_batchnorm(
            self.module, images, spec, device, what="weight averaging: the training draws", prepare=prepare
        )
        return n
