"""Every PNG and overlay xraydx draws: one home for the encoders and the colour rules.

Arrays in: uint8 gray images (H, W), heat maps float in [0, 1], lung masks uint8 {0, 255} (or bool).
Out: RGB uint8 arrays (:func:`heat_overlay`, :func:`mask_overlay`), PNG bytes (``*_png``), ``data:``
URIs (:func:`png_uri`) and atomically written PNG files (:func:`save_png`).

- Grad-CAM: the heat map in matplotlib's ``jet`` colormap blended over the gray image (alpha 0.45),
  or alone as RGBA with opacity = heat, for a client-side slider.
- Lung masks: the lungs tinted (30% of (0, 200, 255)) with a yellow outline about 1/300 of the side
  thick; :func:`outline` draws a one-pixel outline of a mask into an RGB image.
- Figures: matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xraydx.fsutil import atomic_open

__all__ = [
    "COLORMAP",
    "fig_png",
    "figure",
    "gray_png",
    "heat_overlay",
    "heat_overlay_png",
    "heat_png",
    "mask_overlay",
    "outline",
    "png_bytes",
    "png_uri",
    "save_png",
]

COLORMAP = "jet"
HEAT_ALPHA = 0.45
MASK_TINT = (0.0, 200.0, 255.0)
MASK_EDGE = (255.0, 220.0, 0.0)


# ---- encoders ------------------------------------------------------------------------------------


def png_bytes(arr: np.ndarray, compress_level: int | None = None) -> bytes:
    """uint8 (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA as PNG bytes (Pillow's default compression
    unless ``compress_level`` is given)."""
    from PIL import Image

    buf = io.BytesIO()
    opts = {} if compress_level is None else {"compress_level": compress_level}
    Image.fromarray(arr).save(buf, format="PNG", **opts)
    return buf.getvalue()


def gray_png(img: np.ndarray, max_side: int | None = None, compress_level: int | None = None) -> bytes:
    """A gray image as an 8-bit PNG; with ``max_side``, downscaled (bilinear) so its longest side fits."""
    from PIL import Image

    im = Image.fromarray(np.asarray(img, dtype=np.uint8))
    if max_side is not None and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize(
            (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR
        )
    return png_bytes(np.asarray(im), compress_level)


def png_uri(data: bytes) -> str:
    """PNG bytes as a ``data:`` URI (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def save_png(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as a PNG file atomically (temp file + rename)."""
    from PIL import Image

    with atomic_open(path, "wb") as fh:
        Image.fromarray(arr).save(fh, format="PNG")


def figure(width: float = 4.0, height: float = 3.2) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---- Grad-CAM heat maps --------------------------------------------------------------------------


def _colormap(heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps[COLORMAP](np.clip(heat, 0.0, 1.0))  # float RGBA (..., 4)


def _resize_float(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape[:2]), mode="bilinear", align_corners=False)[0, 0].numpy()


def heat_overlay(img: np.ndarray, heat: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """The heat map ('jet' colormap) blended over the gray image: RGB uint8 (S, S, 3)."""
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D gray image; got shape {img.shape}")
    h = heat if heat.shape == img.shape else _resize_float(heat, img.shape)
    gray = (img.astype(np.float32) / 255.0)[..., None]
    color = _colormap(h)[..., :3]
    out = (1.0 - alpha) * gray + alpha * color
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def heat_overlay_png(img: np.ndarray, heat: np.ndarray, alpha: float = HEAT_ALPHA) -> bytes:
    return png_bytes(heat_overlay(img, heat, alpha))


def heat_png(heat: np.ndarray) -> bytes:
    """The heat map alone as RGBA PNG: colormap colour, opacity = heat (for a client-side slider)."""
    rgba = _colormap(heat)
    rgba[..., 3] = np.clip(heat, 0.0, 1.0)
    return png_bytes(np.clip(rgba * 255.0 + 0.5, 0, 255).astype(np.uint8))


# ---- lung masks ----------------------------------------------------------------------------------


def mask_overlay(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8: the gray image with the lungs tinted and their outline drawn."""
    from scipy import ndimage

    fg = mask > 127
    rgb = np.repeat(img[..., None], 3, axis=2).astype(np.float32)
    tint = np.array(MASK_TINT, np.float32)
    rgb[fg] = 0.7 * rgb[fg] + 0.3 * tint
    k = max(1, round(max(img.shape) / 300))
    edge = fg & ~ndimage.binary_erosion(fg, iterations=k)
    rgb[edge] = MASK_EDGE
    return rgb.clip(0, 255).astype(np.uint8)


def outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """``rgb`` with the one-pixel outline of the bool ``mask`` (4-neighbourhood) drawn in ``colour``, in place."""
    inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    rgb[mask & ~inner] = colour
    return rgb
