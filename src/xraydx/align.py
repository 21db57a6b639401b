"""Alignment of each class across the training sources: the training option ``train.align``.

A penalty on how far apart one class's penultimate features sit between sources, added to the loss with
the weight ``train.align``. Within each training batch, with ``f_i`` the pooled features (the classifier's
input), ``mu_{c,s}`` the mean of class ``c``'s features from source ``s`` and ``mu_c`` the mean of class
``c``'s features from every source in the batch::

    penalty = sum_{c,s} n_{c,s} |mu_{c,s} - mu_c|^2  /  sum_i |f_i - mean(f)|^2

the between-source scatter within the classes over the batch's total scatter: 0 where every class looks
the same from every source, at most 1, and unchanged when the features are scaled (so the network cannot
pay it by shrinking them). A class that only one source sends to the batch adds nothing: a hospital that
sends normals only is asked to look like the other sources' normals, never like their COVID-19.

This is the conditional invariance of domain generalisation (Li et al., "Deep Domain Generalization via
Conditional Invariant Adversarial Networks", ECCV 2018), written from the paper's idea as a moment
penalty without an adversary. The source-adversarial head (:mod:`xraydx.dann`) asks the features to hide
the source whatever the class, which fights the class wherever a source sends one class only.

With two or three images per (class, source) cell in a batch, a cell's mean carries its images' spread:
the penalty then also pulls the images of one cell together a little (it is not de-biased for that).

:class:`WithFeatures` wraps the classifier for training only: ``forward(x)`` -> (logits, pooled features),
the same logits as the classifier's own forward. Checkpoints hold the classifier alone; nothing else is
saved, so ``--resume`` needs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from xraydx.dann import logits_and_pooled, require_timm_parts, train_source_ids

__all__ = ["WithFeatures", "align_sources", "class_source_scatter"]


class WithFeatures(nn.Module):
    """A timm classifier that also returns its pooled features: ``forward(x)`` -> (logits, features)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        require_timm_parts(model, "train.align")
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_pooled(self.model, x)


def class_source_scatter(feats: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """The penalty of the module docstring for one batch (``feats``: (B, D); ``labels``, ``sources``: (B,)
    integer ids), in float32; 0 for a batch of fewer than two images or with no spread."""
    f = feats.float().flatten(1)
    labels = labels.to(f.device).long()
    sources = sources.to(f.device).long()
    if f.shape[0] < 2:
        return f.sum() * 0.0
    n_src = int(sources.max()) + 1
    n_cls = int(labels.max()) + 1
    cells = labels * n_src + sources
    dim = f.shape[1]
    cell_sum = f.new_zeros(n_cls * n_src, dim).index_add_(0, cells, f)
    cell_n = torch.bincount(cells, minlength=n_cls * n_src).to(f.dtype)
    class_sum = f.new_zeros(n_cls, dim).index_add_(0, labels, f)
    class_n = torch.bincount(labels, minlength=n_cls).to(f.dtype)
    cell_mean = cell_sum / cell_n.clamp(min=1).unsqueeze(1)
    class_mean = class_sum / class_n.clamp(min=1).unsqueeze(1)
    own_class = torch.arange(n_cls * n_src, device=f.device) // n_src
    between = (cell_n * (cell_mean - class_mean[own_class]).pow(2).sum(1)).sum()
    total = (f - f.mean(0, keepdim=True)).pow(2).sum()
    return between / total.clamp(min=1e-12)


def align_sources(
    cfg: Any, sources: Sequence[str], log: Callable[[str], None]
) -> tuple[torch.Tensor, list[str]]:
    """``train.align``: each train record's source id and the sources' names; a ConfigError where the
    train split has fewer than two sources (nothing to align)."""
    ids, names = train_source_ids(cfg, sources, "train.align")
    log(
        f"alignment of each class across {len(names)} train sources (xraydx.align: the between-source"
        f" scatter within classes over the total, on the pooled features), weight {cfg.train.align}"
    )
    return ids, names
