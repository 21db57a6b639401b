"""Sharpness-aware minimisation: the training option ``train.sam`` (the neighbourhood radius ``rho``).

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021),
written from the paper's algorithm: each step first moves the weights uphill, to the worst point of a ball
of radius ``rho`` around them to first order, takes the gradient there, moves back and lets the base
optimiser (AdamW here) step with that gradient::

    g = grad L(w);   e = rho * g / |g|;   w <- w + e;   g' = grad L(w);   w <- w - e;   optimiser step with g'

so the weights settle where the loss is low in a whole neighbourhood, not at a sharp minimum. Flat minima
are what weight averaging looks for too (SWA / SWAD, :mod:`xraydx.weightavg`), and in domain
generalisation they are argued to transfer better to unseen domains (Cha et al., NeurIPS 2021). Each step
costs two forward and backward passes.

The second pass leaves BatchNorm's running statistics alone (its momentum is 0 for that pass), so they
follow the training batches once per step as without SAM. Under DDP the gradients are averaged over ranks
before the ascent, so every rank moves the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["SAM"]


class SAM:
    """The ascent and its undoing around the base optimiser's step (see the module docstring)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], rho: float) -> None:
        if not rho > 0:
            raise ValueError(f"SAM's radius must be > 0; got {rho}")
        self.rho = float(rho)
        self.params = [p for p in params if p.requires_grad]
        self._moved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    @torch.no_grad()
    def ascend(self) -> float:
        """Moves the weights by ``rho * g / |g|`` (the gradients of the first pass); returns ``|g|``."""
        if self._moved:
            raise RuntimeError("SAM.ascend called twice without descend")
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        scale = self.rho / (float(norm) + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self._moved.append((p, p.detach().clone()))
            p.add_(p.grad.to(p.dtype) * scale)
        return float(norm)

    @torch.no_grad()
    def descend(self) -> None:
        """Puts the weights back exactly where :meth:`ascend` found them (the second pass's gradients stay)."""
        for p, original in self._moved:
            p.copy_(original)
        self._moved = []

    @staticmethod
    @contextmanager
    def second_pass(model: nn.Module) -> Iterator[None]:
        """BatchNorm's running statistics held (momentum 0) during the perturbed pass."""
        saved = []
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
                saved.append((m, m.momentum))
                m.momentum = 0.0
        try:
            yield
        finally:
            for m, momentum in saved:
                m.momentum = momentum
