"""Preprocessing shared by training, evaluation and inference, and batched on-device augmentation.

``preprocess`` is the one deterministic function every path goes through: (optional lung mask /
lung crop) -> resize to ``size`` x ``size`` -> uint8. ``normalize`` turns a uint8 batch into the
model's float input on whatever device it is on. Augmentation (``BatchAugment``) runs on whole
batches of tensors on the training device, never per image in PIL.

No horizontal flip: it would move the heart to the right side of the chest, an image no real
(non-dextrocardia) patient produces, and laterality markers would flip with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

LUNG_MASK_MODES = ("none", "crop", "mask")
INTENSITY_MODES = ("none", "equalize")
CROP_MARGIN = 0.08  # of the lung box's size, each side
MASK_DILATE = 0.02  # of the image size, so the pleura and costophrenic angles stay visible


@dataclass(frozen=True)
class Preprocessing:
    size: int = 224
    lung_mask: str = "none"
    mean: float = 0.449
    std: float = 0.226
    resize: str = "bilinear-antialias"
    intensity: str = "none"  # none | equalize (per-image histogram equalisation, against source style)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {k: d[k] for k in ("size", "lung_mask", "mean", "std", "resize", "intensity") if k in d}
        return cls(**known)

    def cache_key(self) -> str:
        return f"s{self.size}-{self.lung_mask}-{self.resize}-{self.intensity}"


def resize_uint8(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a 2-D uint8 image to (h, w) = size with Pillow's antialiased bilinear filter."""
    h, w = (size, size) if isinstance(size, int) else size
    if img.shape == (h, w):
        return img
    out = Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def mask_bbox(mask: np.ndarray, margin: float = CROP_MARGIN) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the mask's foreground, widened by ``margin``; None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0 or xs.size == 0:
        return None
    t, b, left, r = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    mh, mw = int(round((b - t) * margin)), int(round((r - left) * margin))
    h, w = mask.shape
    return max(0, t - mh), min(h, b + mh), max(0, left - mw), min(w, r + mw)


def apply_lung_mask(img: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Crop to the lungs' box (``crop``) or black out everything outside the (dilated) lungs (``mask``).

    The mask may have any size: it is resized to the image first, so masks made at one resolution line
    up with images at another.
    """
    if mode == "none":
        return img
    if mode not in LUNG_MASK_MODES:
        raise ValueError(f"lung_mask must be one of {LUNG_MASK_MODES}; got {mode!r}")
    m = mask
    if m.shape != img.shape:
        m = resize_uint8((m > 0).astype(np.uint8) * 255, img.shape)
    fg = m > 127 if m.dtype == np.uint8 and m.max() > 1 else m > 0
    if not fg.any():
        return img  # an empty mask says nothing about where the lungs are: keep the image as it is
    if mode == "crop":
        box = mask_bbox(fg)
        assert box is not None
        t, b, left, r = box
        return np.ascontiguousarray(img[t:b, left:r])
    k = max(1, int(round(MASK_DILATE * max(img.shape))))
    t = torch.from_numpy(fg.astype(np.float32))[None, None]
    dil = F.max_pool2d(t, kernel_size=2 * k + 1, stride=1, padding=k)[0, 0].numpy() > 0
    return np.where(dil, img, 0).astype(np.uint8)


def equalize(img: np.ndarray) -> np.ndarray:
    """Per-image histogram equalisation; black (0) pixels, e.g. outside a lung mask, do not count."""
    pil = Image.fromarray(img)
    fg = img > 0
    if fg.all() or not fg.any():
        return np.asarray(ImageOps.equalize(pil), dtype=np.uint8)
    out = np.asarray(ImageOps.equalize(pil, mask=Image.fromarray(fg.astype(np.uint8) * 255)), dtype=np.uint8)
    return np.where(fg, out, 0).astype(np.uint8)


def preprocess(img: np.ndarray, spec: Preprocessing, mask: np.ndarray | None = None) -> np.ndarray:
    """The single preprocessing function: lung masking (if asked), intensity normalisation (if asked),
    then resize. Returns uint8 (S, S)."""
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {img.dtype} {img.shape}")
    if spec.lung_mask != "none":
        if mask is None:
            raise ValueError(f"lung_mask={spec.lung_mask!r} needs a lung mask for every image")
        img = apply_lung_mask(img, mask, spec.lung_mask)
    if spec.intensity == "equalize":
        img = equalize(img)
    elif spec.intensity != "none":
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}; got {spec.intensity!r}")
    return resize_uint8(img, spec.size)


def normalize(batch: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, H, W) or (B, 1, H, W) -> float32 (B, 1, H, W), (x/255 - mean) / std, on batch's device."""
    if batch.ndim == 3:
        batch = batch.unsqueeze(1)
    return (batch.float().div_(255.0) - mean).div_(std)


@dataclass(frozen=True)
class AugmentSpec:
    rotate_deg: float
    scale: tuple[float, float]
    translate: float
    brightness: float
    contrast: float
    gamma: tuple[float, float]
    noise_std: float

    @classmethod
    def preset(cls, name: str) -> AugmentSpec | None:
        if name == "none":
            return None
        if name == "light":
            return cls(7.0, (0.92, 1.08), 0.05, 0.10, 0.10, (0.85, 1.18), 0.0)
        if name == "strong":
            return cls(12.0, (0.85, 1.15), 0.08, 0.20, 0.20, (0.7, 1.4), 0.02)
        raise ValueError(f"augment must be none, light or strong; got {name!r}")


class BatchAugment:
    """Random affine (rotation, scale, shift) + brightness/contrast/gamma on a uint8 batch, on its device.

    Input uint8 (B, 1, H, W); output float in [0, 1] of the same shape. Randomness comes from the
    generator given, so a seeded run is repeatable.
    """

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec

    def __call__(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = self.spec
        b = batch.shape[0]
        dev = batch.device

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(b, generator=gen).mul_(hi - lo).add_(lo).to(dev)

        x = batch.float().div_(255.0)
        ang = u(-s.rotate_deg, s.rotate_deg) * (math.pi / 180.0)
        sc = u(*s.scale)
        tx, ty = u(-s.translate, s.translate) * 2, u(-s.translate, s.translate) * 2
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.stack(
            [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
        )  # (B, 2, 3): output -> input sampling grid
        grid = _affine_grid(theta, x.shape[-2], x.shape[-1])
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        gam = torch.exp(u(math.log(s.gamma[0]), math.log(s.gamma[1])))
        x = x.clamp_(0, 1).pow_(gam.view(b, 1, 1, 1))
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        con = u(1 - s.contrast, 1 + s.contrast).view(b, 1, 1, 1)
        bri = u(-s.brightness, s.brightness).view(b, 1, 1, 1)
        x = (x - mean) * con + mean + bri
        if s.noise_std > 0:
            x = x + torch.randn(x.shape, generator=gen).to(dev) * s.noise_std
        return x.clamp_(0, 1)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)`` as one batched matmul: the same grid,
    about twice as fast on CPU (F.affine_grid's CPU kernel dominated the augmentation's cost)."""
    ys = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1
    base = torch.stack(
        [xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, dtype=theta.dtype, device=theta.device)],
        -1,
    )  # (h, w, 3): x, y, 1
    return torch.matmul(base.view(1, h * w, 3), theta.transpose(1, 2)).view(theta.shape[0], h, w, 2)
