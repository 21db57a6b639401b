"""A linear probe before (or instead of) fine-tuning: ``train.probe`` (LP-FT, Kumar et al., ICLR 2022).

Fine-tuning a pretrained network from a random head sends the head's large early errors back into
every layer, and the features are reshaped to fit the training sources before the head is any good.
Kumar et al. show that this *distorts* the pretrained features and costs accuracy out of distribution,
and that fitting the linear head first on the frozen features, then fine-tuning everything, keeps more
of what transfers. Two modes:

- ``lp-ft``: the classifier's linear head is set to a multinomial logistic regression (scikit-learn)
  fitted on the frozen network's penultimate features of the training images, augmented as the
  training epochs augment them (one view each), each image weighted as the training epochs draw it
  (``train.balance``), its L2 strength chosen on the val split's macro-F1; then the whole network
  trains as usual.
- ``lp``: the same probe, then only the head trains; every other weight is frozen and every BatchNorm
  layer keeps its pretrained statistics, so nothing a hospital's films look like is learned beyond what
  the pretrained features already show.

First the BatchNorm layers' statistics are re-estimated on the (augmented) training images
(:mod:`xraydx.bnadapt`), so the features the probe is fitted on are the ones the network computes on
chest X-rays in training (with ImageNet's statistics, or on images without the training augmentation,
they are not, and a head fitted on them starts fine-tuning with a loss above chance's, whose large
gradients are what LP-FT is meant to avoid); ``lp`` keeps these statistics. The probe is fitted on
standardised features and folded back into the head's weight and bias, so the network computes exactly
the probe's logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from xraydx.bnadapt import adapt_batchnorm, batchnorms
from xraydx.shift import batch_features

__all__ = ["C_GRID", "fit_probe", "freeze_backbone", "hold_statistics", "linear_head"]

C_GRID = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried (on standardised features)


def linear_head(model: nn.Module) -> nn.Linear:
    """The timm classifier's final linear layer (a TypeError for anything else)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}: train.probe needs a timm classifier whose head is one linear layer"
            f" (got {type(head).__name__})"
        )
    return head


def fit_probe(
    model: nn.Module,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    sample_weight: np.ndarray | None,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    spec: Any,
    device: torch.device,
    n_classes: int,
    prepare: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Fit the linear head on the frozen features and install it; what was fitted, for the log.
    ``prepare``: how a uint8 batch of training images becomes the network's input (the training
    augmentation, so the probe reads the images as fine-tuning will; default: normalised only); the
    val images are always only normalised."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    head = linear_head(model)
    t0 = time.perf_counter()
    was_training = model.training
    layers = 0
    if batchnorms(model, 0):  # the statistics the network will train with, not ImageNet's
        layers, _ = adapt_batchnorm(
            model, train_images, spec, device, what="the training images", prepare=prepare
        )
    ftr = batch_features(model, train_images, spec, device, normalize=False, prepare=prepare).astype(
        np.float64
    )
    fva = batch_features(model, val_images, spec, device, normalize=False).astype(np.float64)
    model.train(was_training)
    mu, sd = ftr.mean(0), ftr.std(0)
    sd[sd < 1e-6] = 1.0  # a feature that never fires: left at scale 1 (its weight stays ~0)
    ztr, zva = (ftr - mu) / sd, (fva - mu) / sd
    w = None if sample_weight is None else sample_weight / sample_weight.mean()
    best: tuple[float, float, Any] | None = None
    tried = {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(ztr, train_labels, sample_weight=w)
        f1 = float(f1_score(val_labels, clf.predict(zva), average="macro", labels=list(range(n_classes))))
        tried[str(c)] = round(f1, 4)
        if best is None or f1 > best[0] + 1e-9:  # ties keep the stronger regularisation (tried first)
            best = (f1, c, clf)
    assert best is not None
    f1, c, clf = best
    if list(clf.classes_) != list(range(n_classes)):
        raise ValueError(
            f"the probe saw classes {list(clf.classes_)}; the train split must hold all {n_classes}"
        )
    coef = clf.coef_ / sd  # logits = coef @ ((f - mu) / sd) + b  ==  (coef / sd) @ f + (b - (coef / sd) @ mu)
    bias = clf.intercept_ - coef @ mu
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(coef, dtype=head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return {
        "C": c, "val_macro_f1": round(f1, 4), "val_macro_f1_by_C": tried,
        "train_accuracy": round(float(clf.score(ztr, train_labels)), 4),
        "features": int(ftr.shape[1]), "batchnorm_layers": layers, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def freeze_backbone(model: nn.Module) -> int:
    """Every parameter but the linear head's made untrainable; how many parameters that froze."""
    keep = {id(p) for p in linear_head(model).parameters()}
    frozen = 0
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def hold_statistics(model: nn.Module) -> None:
    """BatchNorm layers back in eval mode (their pretrained statistics used and kept) after ``.train()``."""
    for m in batchnorms(model):
        m.eval()
