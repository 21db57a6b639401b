"""Source-shift score: how far an image's classifier features are from every image the model trained on.

The top probability does not tell a new hospital's images from the training hospitals' (out of source it
is even *anti*-correlated with being right: docs/generalisation.md). This score asks the classifier itself:
its penultimate features (timm's ``forward_head(..., pre_logits=True)``), L2-normalised, are compared with
a bank of the training images' features; the score is the cosine distance to the ``k``-th nearest bank
feature (the non-parametric k-NN out-of-distribution score of Sun et al., ICML 2022, written from the
paper's description), divided by the ``quantile`` of the same distance on the run's *validation* images
(new images of the training sources). So 1.0 means "as far from the training data as the 95th-percentile
new image of a training source", whatever the model or its feature size, and a threshold chosen on one
set of fold models (``xraydx crossval``, calibrated out of source) applies to another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from xraydx.engines import normalise

__all__ = ["ShiftScore", "batch_features"]


def batch_features(
    model: nn.Module, images: np.ndarray, spec: Any, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """L2-normalised penultimate features (N, D) of a timm classifier for preprocessed uint8 (N, S, S)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"{type(model).__name__}: no forward_features/forward_head (not a timm classifier)")
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(normalise(images[i : i + batch_size], spec.mean, spec.std)).to(device)
            f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
            out.append(torch.nn.functional.normalize(f.float().flatten(1), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class ShiftScore:
    """A feature bank and the scale that makes the k-NN distance 1.0 at the validation quantile."""

    bank: np.ndarray  # (M, D) float32, rows L2-normalised
    k: int
    scale: float
    quantile: float

    @classmethod
    def fit(
        cls, train: np.ndarray, val: np.ndarray, *, k: int = 10, quantile: float = 0.95,
        max_bank: int = 4096, seed: int = 0,
    ) -> ShiftScore:  # fmt: skip
        if len(train) <= k:
            raise ValueError(f"the shift score needs more than k={k} training images; got {len(train)}")
        if not len(val):
            raise ValueError("the shift score needs validation images to set its scale")
        if len(train) > max_bank:
            train = train[np.random.default_rng(seed).choice(len(train), max_bank, replace=False)]
        s = cls(np.ascontiguousarray(train, dtype=np.float32), k, 1.0, quantile)
        d = s.distance(val)
        s.scale = float(max(np.quantile(d, quantile), 1e-6))
        return s

    def distance(self, feats: np.ndarray) -> np.ndarray:
        """Cosine distance of each row of ``feats`` to its k-th nearest bank feature."""
        if not len(feats):
            return np.zeros(0)
        out = []
        bank = torch.from_numpy(self.bank)
        for i in range(0, len(feats), 1024):
            sim = torch.from_numpy(np.ascontiguousarray(feats[i : i + 1024], dtype=np.float32)) @ bank.T
            out.append((1.0 - sim.topk(self.k, dim=1).values[:, -1]).double().numpy())
        return np.concatenate(out)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """The k-NN distance in units of its validation quantile (1.0 = that quantile)."""
        return self.distance(feats) / self.scale
