"""MixStyle: mix the feature statistics of two images during training (``train.mixstyle``).

A domain-generalisation method (Zhou, Yang, Qiao and Xiang, "Domain Generalization with MixStyle",
ICLR 2021), written from the paper's description. A CNN's early feature maps carry an image's *style* -
for a radiograph: the scanner's contrast curve, noise, sharpness, the look of one hospital - mostly in the
per-channel mean and standard deviation over space, and its content in the normalised map. MixStyle
replaces, with probability ``p`` per batch, each image's channel statistics by a random mixture of its own
and another image's of the same batch::

    mu, sigma = mean and std of x over (H, W), per image and channel (not differentiated through)
    lam ~ Beta(alpha, alpha) per image;  j = a random permutation of the batch
    x <- (x - mu) / sigma * (lam * sigma + (1 - lam) * sigma[j]) + (lam * mu + (1 - lam) * mu[j])

With class x source balanced sampling a batch holds many sources, so the network sees each image's lungs
with other collections' styles and is given no reward for reading style. The mixing sits after the first
three down-sampling stages of the backbone (at 1/4, 1/8 and 1/16 of the input, as timm's ``feature_info``
names them: ``blocks.1, blocks.2, blocks.4`` of MobileNetV2 and EfficientNet-Lite, ``layer1-3`` of a ResNet); it is
a forward hook active only in training mode, so evaluation, the checkpoint's tensors and every inference
engine (torch, ONNX) are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from xraydx.errors import ConfigError

__all__ = ["MixStyle", "REDUCTIONS", "attach", "stages"]

#: the statistics are mixed after the backbone stages whose output is at these fractions of the input
REDUCTIONS: tuple[int, ...] = (4, 8, 16)
EPS = 1e-6


class MixStyle:
    """The mixing, as a forward hook: ``module.register_forward_hook(MixStyle(p, alpha))``. Whether to mix,
    ``lam`` and the permutation are drawn from torch's global generator (seeded per epoch by the training
    loop, so a run repeats)."""

    def __init__(self, p: float, alpha: float = 0.1) -> None:
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"train.mixstyle must be in (0, 1] (the probability per batch), got {p}")
        if alpha <= 0.0:
            raise ConfigError(
                f"train.mixstyle_alpha must be > 0 (the Beta distribution's parameter), got {alpha}"
            )
        self.p, self.alpha = float(p), float(alpha)
        self.beta = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))

    def mix(self, x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) with its statistics mixed by ``lam`` (B,) with the images ``perm`` (B,)."""
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sigma = (x.var(dim=(2, 3), keepdim=True) + EPS).sqrt().detach()
        lam = lam.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
        perm = perm.to(x.device)
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
        return (x - mu) / sigma * sigma_mix + mu_mix

    def __call__(self, module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or output.dim() != 4 or output.shape[0] < 2:
            return None
        if float(torch.rand(())) >= self.p:
            return None
        b = output.shape[0]
        return self.mix(output, self.beta.sample((b,)), torch.randperm(b))


def stages(model: nn.Module, reductions: Sequence[int] = REDUCTIONS) -> list[str]:
    """The modules after which MixStyle mixes: for each of ``reductions``, the last module of the backbone
    stage whose output is at that fraction of the input (timm's ``feature_info``). A ConfigError naming the
    architecture where timm describes no such stages."""
    info = getattr(model, "feature_info", None)
    try:
        found = {int(f["reduction"]): str(f["module"]) for f in info} if info is not None else {}
    except (TypeError, KeyError, ValueError):
        found = {}
    missing = [r for r in reductions if r not in found]
    if missing:
        raise ConfigError(
            f"train.mixstyle needs a timm backbone whose feature_info names its stages at 1/"
            f"{', 1/'.join(map(str, reductions))} of the input; {type(model).__name__} has none at 1/"
            f"{', 1/'.join(map(str, missing))}: set train.mixstyle=0"
        )
    return [found[r] for r in reductions]


def attach(
    model: nn.Module, p: float, alpha: float = 0.1, reductions: Sequence[int] = REDUCTIONS
) -> list[RemovableHandle]:
    """Hook MixStyle after each of :func:`stages`; the handles (``.remove()`` detaches)."""
    hook = MixStyle(p, alpha)
    return [model.get_submodule(name).register_forward_hook(hook) for name in stages(model, reductions)]
