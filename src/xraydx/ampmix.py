"""Fourier amplitude mixing across sources (``train.ampmix``): each image keeps its anatomy and takes on
part of another hospital's look.

A radiograph's Fourier *phase* carries its structure (edges, the lungs' outline, opacities); its
*amplitude* spectrum carries much of what a scanner and a hospital's processing add: contrast curve,
sharpness, noise texture, grid lines. Mixing amplitude spectra between images of different domains and
keeping each image's phase is a domain-generalisation augmentation from the literature (FACT: Xu et al.,
"A Fourier-based Framework for Domain Generalization", CVPR 2021; FedDG's amplitude interpolation, Liu
et al., CVPR 2021), written here from the papers' description. For an image ``x`` and a partner ``x'`` of
a *different source* in the same batch::

    F = fft2(x), F' = fft2(x');  lam ~ U(0, eta)
    x <- ifft2(((1 - lam) |F| + lam |F'|) * exp(i angle(F)))      (real part, clamped to 0-255)

Where a class is learned from one hospital only (60% of the held-out images of this project's crossval,
docs/generalisation.md), that hospital's spectral style is a perfect cue for the class; mixing it with
other sources' styles removes the cue's reward. With ``train.balance=class_source`` a batch holds many
sources, so partners exist; an image whose batch holds no other source is left as it is. Works on the
uint8 batch (B, 1, H, W) on any device, before the acquisition and geometric augmentation; training only,
so checkpoints and inference are unchanged. Seeded by the generator given.
"""

from __future__ import annotations

import torch

__all__ = ["AmplitudeMix", "mix_amplitude", "partners"]


def partners(sources: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each image, a random other image of the batch from a different source; -1 where none."""
    src = sources.detach().to("cpu", torch.long)
    n = len(src)
    out = torch.full((n,), -1, dtype=torch.long)
    for i in range(n):
        others = torch.nonzero(src != src[i]).flatten()
        if len(others):
            out[i] = others[int(torch.randint(0, len(others), (1,), generator=gen))]
    return out


def mix_amplitude(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Float (B, H, W) images, their partners' images (B, H, W) and weights (B,): each image's phase with
    the mixed amplitude spectrum (float, not clamped)."""
    f, fp = torch.fft.fft2(x), torch.fft.fft2(partner)
    w = lam.view(-1, 1, 1)
    amp = (1 - w) * f.abs() + w * fp.abs()
    return torch.fft.ifft2(torch.polar(amp, f.angle())).real


class AmplitudeMix:
    """With probability ``p`` per image, mix its amplitude spectrum with a different source's image's."""

    def __init__(self, p: float, eta: float = 1.0) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"train.ampmix must be in (0, 1] (the probability per image); got {p}")
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"the amplitude mixing weight's bound must be in (0, 1]; got {eta}")
        self.p, self.eta = p, eta

    def describe(self) -> str:
        return (
            f"Fourier amplitude mixing across sources (xraydx.ampmix): probability {self.p:g} per image,"
            f" weight ~ U(0, {self.eta:g})"
        )

    def __call__(self, batch: torch.Tensor, sources: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 (B, 1, H, W) and each image's source id (B,) in; uint8 of the same shape and device out
        (a new tensor)."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"expected a uint8 (B, 1, H, W) batch; got {tuple(batch.shape)} {batch.dtype}")
        if len(sources) != len(batch):
            raise ValueError(f"{len(sources)} source ids for a batch of {len(batch)} images")
        pick = partners(sources, gen)
        chosen = (torch.rand(len(batch), generator=gen) < self.p) & (pick >= 0)
        if not chosen.any():
            return batch.clone()
        lam = torch.rand(len(batch), generator=gen) * self.eta
        idx = torch.nonzero(chosen).flatten()
        dev = batch.device
        own, other = idx.to(dev), pick[idx].to(dev)
        x = batch[:, 0].float()
        mixed = mix_amplitude(x[own], x[other], lam[idx].to(dev))
        out = batch.clone()
        out[own, 0] = mixed.round_().clamp_(0, 255).to(torch.uint8)
        return out
