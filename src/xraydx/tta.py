"""Test-time augmentation (TTA): the classifier's logits averaged over a few fixed views of each image.

``affine`` makes 7 views of a preprocessed image: itself, shifted by 3% of its width left / right / up /
down, and zoomed out / in by 5%: small geometric changes inside the range the ``light`` training
augmentation draws from (xraydx.transforms.AugmentSpec), so every view is an image the model was trained
to read. The logits of the views are averaged (a mean in log-space, where temperature scaling and the
abstention rule then apply unchanged). No flip: a mirrored chest is an image no real patient makes.

The views are made from the uint8 model inputs with one bilinear resampling (outside the image: black,
as the training augmentation fills), so every engine (torch, onnxruntime, the server's batcher) gets the
same views: TTA lives in the checkpoint's preprocessing (``preprocessing.tta``), not in the network.
Cost: one forward pass per view.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from xraydx.constants import TTA_MODES

#: (scale, shift x, shift y) per view; shifts in fractions of the image side
AFFINE_VIEWS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (1.0, 0.03, 0.0),
    (1.0, -0.03, 0.0),
    (1.0, 0.0, 0.03),
    (1.0, 0.0, -0.03),
    (0.95, 0.0, 0.0),
    (1.05, 0.0, 0.0),
)


def check_mode(mode: str) -> str:
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {mode!r}")
    return mode


def n_views(mode: str) -> int:
    return len(AFFINE_VIEWS) if check_mode(mode) == "affine" else 1


def views(images: np.ndarray, mode: str) -> list[np.ndarray]:
    """uint8 (N, S, S) preprocessed images -> the views, each uint8 (N, S, S); ``none``: [images]."""
    if check_mode(mode) == "none" or not len(images):
        return [images]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    n = x.shape[0]
    out = []
    for scale, sx, sy in AFFINE_VIEWS:
        if (scale, sx, sy) == (1.0, 0.0, 0.0):
            out.append(np.asarray(images))
            continue
        # output -> input sampling grid: zoom in (scale > 1) samples a smaller input area
        theta = torch.tensor([[1.0 / scale, 0.0, -2.0 * sx], [0.0, 1.0 / scale, -2.0 * sy]])
        grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out.append(v[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy())
    return out


def mean_logits(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, mode: str) -> np.ndarray:
    """``run`` (uint8 (N, S, S) -> logits (N, C)) averaged over the views of ``images``."""
    vs = views(images, mode)
    if len(vs) == 1:
        return run(vs[0])
    acc = None
    for v in vs:
        lg = np.asarray(run(v), dtype=np.float64)
        acc = lg if acc is None else acc + lg
    assert acc is not None
    return (acc / len(vs)).astype(np.float32)


__all__ = ["AFFINE_VIEWS", "check_mode", "mean_logits", "n_views", "views"]
