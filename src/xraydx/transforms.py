"""Preprocessing shared by training, evaluation and inference, and batched on-device augmentation.

``preprocess`` is the one deterministic function every path goes through: (optional lung mask /
lung crop) -> resize to ``size`` x ``size`` -> uint8. ``normalize`` turns a uint8 batch into the
model's float input on whatever device it is on. Augmentation (``BatchAugment``) runs on whole
batches of tensors on the training device, never per image in PIL.

No horizontal flip: it would move the heart to the right side of the chest, an image no real
(non-dextrocardia) patient produces, and laterality markers would flip with it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from xraydx.constants import AUGMENT_INTERPOLATIONS, CROPPING_MODES, INTENSITY_MODES, LUNG_MASK_MODES

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
    base_size: int = 0  # >0: the whole image is first resized to base_size², so every source has the same
    #                     resolution before lung cropping (sharpness would otherwise tell sources apart)
    tta: str = "none"  # test-time augmentation of the classifier (xraydx.tta); not part of the image itself

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {
            k: d[k]
            for k in ("size", "lung_mask", "mean", "std", "resize", "intensity", "base_size", "tta")
            if k in d
        }
        return cls(**known)

    def cache_key(self) -> str:
        base = f"-b{self.base_size}" if self.base_size else ""
        return f"s{self.size}-{self.lung_mask}-{self.resize}-{self.intensity}{base}"


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
    """Crop to the lungs' box (``crop``), black out everything outside the (dilated) lungs (``mask``), or
    both (``crop_mask``: blacked out, then cut to the same box as ``crop``, so every input is the lung field
    at one scale whatever the film's field of view or the patient's size).

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
    if mode != "crop":
        k = max(1, int(round(MASK_DILATE * max(img.shape))))
        dil = F.max_pool2d(torch.from_numpy(fg.astype(np.float32))[None, None], 2 * k + 1, 1, k)[0, 0].numpy()
        img = np.where(dil > 0, img, 0).astype(np.uint8)
    if mode in CROPPING_MODES:
        box = mask_bbox(fg)
        assert box is not None
        top, bottom, left, right = box
        return np.ascontiguousarray(img[top:bottom, left:right])
    return img


def equalize(img: np.ndarray) -> np.ndarray:
    """Per-image histogram equalisation; black (0) pixels, e.g. outside a lung mask, do not count."""
    pil = Image.fromarray(img)
    fg = img > 0
    if fg.all() or not fg.any():
        return np.asarray(ImageOps.equalize(pil), dtype=np.uint8)
    out = np.asarray(ImageOps.equalize(pil, mask=Image.fromarray(fg.astype(np.uint8) * 255)), dtype=np.uint8)
    return np.where(fg, out, 0).astype(np.uint8)


def preprocess(img: np.ndarray, spec: Preprocessing, mask: np.ndarray | None = None) -> np.ndarray:
    """The single preprocessing function: resize to the base resolution (if set), lung masking (if
    asked), intensity normalisation (if asked), then resize. Returns uint8 (S, S)."""
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {img.dtype} {img.shape}")
    if spec.base_size:
        img = resize_uint8(img, spec.base_size)
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
    #: share of images re-sampled down (by one random factor in ``blur_factor`` per batch) and back up:
    #: sources differ in sharpness (224-px copies vs downscaled originals), a cue to take away
    blur: float = 0.0
    blur_factor: tuple[float, float] = (0.4, 0.9)

    @classmethod
    def preset(cls, name: str) -> AugmentSpec | None:
        if name == "none":
            return None
        if name == "light":
            return cls(7.0, (0.92, 1.08), 0.05, 0.10, 0.10, (0.85, 1.18), 0.0)
        if name == "strong":
            return cls(12.0, (0.85, 1.15), 0.08, 0.20, 0.20, (0.7, 1.4), 0.02, blur=0.5)
        raise ValueError(f"augment must be none, light or strong; got {name!r}")


class BatchAugment:
    """Random affine (rotation, scale, shift) + brightness/contrast/gamma (+ resolution blur, noise) on a
    uint8 batch, on its device.

    Input uint8 (B, 1, H, W); output float in [0, 1] of the same shape. ``interpolation`` is the affine's
    resampling: ``bilinear`` (default) or ``nearest``. Randomness comes from the
    generator given, so a seeded run is repeatable.
    """

    def __init__(
        self,
        spec: AugmentSpec,
        interpolation: str = "bilinear",
        fused: bool | None = None,
        reuse_output: bool = False,
    ) -> None:
        if interpolation not in AUGMENT_INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {AUGMENT_INTERPOLATIONS}; got {interpolation!r}")
        self.spec = spec
        self.interpolation = interpolation
        #: nearest mode on a CPU: one compiled pass (numba) instead of torch ops; None = where numba is installed
        self.fused = fused
        #: the fused kernel writes every batch into one buffer kept between calls (a smaller last batch into
        #: its first rows), so the returned tensor is only valid until the next call (the training loop
        #: consumes each batch before the next). Saves the allocator's fresh pages: on Linux a new 8-MB
        #: output is ~2,000 page faults, which measured 0.05-0.1 ms per 256-px image, as much as the kernel.
        self.reuse_output = reuse_output
        self._out: torch.Tensor | None = None

    def __call__(
        self, batch: torch.Tensor, gen: torch.Generator, norm: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """``norm=(mean, std)``: return (x - mean) / std instead of x in [0, 1] (the fused kernel then folds
        it into its lookup table: one pass over the images fewer)."""
        s = self.spec
        b = batch.shape[0]
        dev = batch.device

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(b, generator=gen).mul_(hi - lo).add_(lo).to(dev)

        ang = u(-s.rotate_deg, s.rotate_deg) * (math.pi / 180.0)
        sc = u(*s.scale)
        tx, ty = u(-s.translate, s.translate) * 2, u(-s.translate, s.translate) * 2
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.stack(
            [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
        )  # (B, 2, 3): output -> input sampling grid
        h, w = batch.shape[-2], batch.shape[-1]
        gam = torch.exp(u(math.log(s.gamma[0]), math.log(s.gamma[1])))
        con = u(1 - s.contrast, 1 + s.contrast)
        bri = u(-s.brightness, s.brightness)
        if (
            self.interpolation == "nearest"
            and dev.type == "cpu"
            and self.fused is not False
            and _fused_cpu(required=bool(self.fused))
        ):
            from xraydx import fastaug

            if norm is not None and s.blur == 0 and s.noise_std == 0:
                return fastaug.nearest_affine_lut(
                    batch, theta, gam, con, bri, norm=norm, out=self._buffer(batch)
                )
            x = fastaug.nearest_affine_lut(batch, theta, gam, con, bri, out=self._buffer(batch))
        elif self.interpolation == "nearest":
            # nearest resampling only moves pixels, so the intensity change can come first, as one
            # 256-entry lookup table per image (exact; far cheaper than pow on every pixel)
            x = _intensity_lut(batch, gam, con, bri)
            x = F.grid_sample(
                x, _affine_grid(theta, h, w), mode="nearest", padding_mode="zeros", align_corners=False
            )
        else:
            x = batch.float().div_(255.0)
            x = F.grid_sample(
                x, _affine_grid(theta, h, w), mode="bilinear", padding_mode="zeros", align_corners=False
            )
            x = x.clamp_(0, 1).pow_(gam.view(b, 1, 1, 1))
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * con.view(b, 1, 1, 1) + mean + bri.view(b, 1, 1, 1)
        if s.blur > 0:
            x = _resample_blur(x, torch.rand(b, generator=gen) < s.blur, u(*s.blur_factor)[0].item())
        if s.noise_std > 0:
            x = x + torch.randn(x.shape, generator=gen).to(dev) * s.noise_std
        x = x.clamp_(0, 1)
        return x if norm is None else x.sub_(norm[0]).div_(norm[1])

    def _buffer(self, batch: torch.Tensor) -> torch.Tensor | None:
        if not self.reuse_output:
            return None
        b = batch.shape[0]
        if self._out is None or self._out.shape[1:] != batch.shape[1:] or self._out.shape[0] < b:
            self._out = torch.empty(batch.shape, dtype=torch.float32)
        return self._out[:b]


@functools.lru_cache(maxsize=1)
def _numba_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def _fused_cpu(required: bool) -> bool:
    """Whether the numba kernels of :mod:`xraydx.fastaug` can run (the ``fast`` extra installs numba)."""
    ok = _numba_installed()
    if required and not ok:
        raise RuntimeError("fused CPU augmentation needs numba: pip install 'xraydx[fast]'")
    return ok


def _intensity_lut(
    batch: torch.Tensor, gam: torch.Tensor, con: torch.Tensor, bri: torch.Tensor
) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> float in [0, 1]: per image, v -> clamp((v^gam - m) * con + m + bri), where m
    is the image's mean after the gamma (over every other row and column); done as a lookup table
    indexed by the pixel values."""
    b = batch.shape[0]
    dev = batch.device
    g = (torch.arange(256, dtype=torch.float32, device=dev) / 255.0)[None].pow(gam[:, None])  # (B, 256)
    # each pixel value, offset to its own image's row of the table
    row = (torch.arange(b, dtype=torch.int32, device=dev) * 256)[:, None]
    idx = batch.reshape(b, -1).to(torch.int32).add_(row).view(-1)
    sub = batch[..., ::2, ::2].reshape(b, -1).to(torch.int32).add_(row).view(-1)
    hist = torch.bincount(sub, minlength=b * 256).view(b, 256).to(torch.float32)
    mean = (hist * g).sum(1, keepdim=True) / hist.sum(1, keepdim=True)
    lut = ((g - mean) * con[:, None] + mean + bri[:, None]).clamp_(0, 1)
    return lut.view(-1).index_select(0, idx).view(batch.shape)


def _resample_blur(x: torch.Tensor, which: torch.Tensor, factor: float) -> torch.Tensor:
    """Down-sample the images ``which`` selects by ``factor`` (antialiased) and back to full size."""
    idx = which.nonzero().flatten().to(x.device)
    if idx.numel() == 0:
        return x
    h, w = x.shape[-2:]
    small = F.interpolate(
        x[idx], size=(max(8, round(h * factor)), max(8, round(w * factor))), mode="bilinear", antialias=True
    )
    x = x.clone()
    x[idx] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return x


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)``, built as one well-shaped batched GEMM.

    Row i of the grid is linear in the column coordinate x: (gx, gy) = (a x + b y_i + c, d x + e y_i + f).
    So grid[b] viewed as (h, 2w) = P_b (h, 4) @ Q (4, 2w) with P_b[i] = (b y_i + c, a, e y_i + f, d) and
    Q's even columns (1, x, 0, 0), odd columns (0, 0, 1, x).  About 10x faster on CPU than
    ``F.affine_grid``, whose GEMM has an inner dimension of 3 and 2 output columns.
    """
    dt, dev = theta.dtype, theta.device
    b = theta.shape[0]
    ys = (torch.arange(h, dtype=dt, device=dev) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=dt, device=dev) * 2 + 1) / w - 1
    q = torch.zeros(4, 2 * w, dtype=dt, device=dev)
    q[0, 0::2], q[1, 0::2], q[2, 1::2], q[3, 1::2] = 1.0, xs, 1.0, xs
    t = theta
    p = torch.stack(
        [
            t[:, 0, 1, None] * ys + t[:, 0, 2, None],
            t[:, 0, 0, None].expand(b, h),
            t[:, 1, 1, None] * ys + t[:, 1, 2, None],
            t[:, 1, 0, None].expand(b, h),
        ],
        -1,
    )  # (B, h, 4)
    return torch.bmm(p, q.expand(b, 4, 2 * w)).view(b, h, w, 2)
