"""Fused CPU kernel for ``BatchAugment(..., "nearest")``: the per-image intensity lookup table and the
nearest-neighbour affine in one compiled pass over the batch (numba, the ``fast`` extra).

Same result as the torch path of :class:`xraydx.transforms.BatchAugment` (lookup table, then
``grid_sample(mode="nearest", padding_mode="zeros", align_corners=False)``), up to float rounding:
source pixels whose coordinate falls within ~1e-8 of an exact .5 may round the other way (a few per
million) and the table is computed in float64. On a CPU the torch path costs several full passes over
each image (grid, sampling, table); this does one, parallel over the images of the batch, about 10x
faster. How: per output row the source coordinates are linear in the column, so the row's columns
that land inside the source form one interval, found once per row; inside it the coordinates are
stepped in 32.32 fixed point (one integer add per pixel and axis, no rounding, no bounds test).
The kernel compiles on first use (about 2 s per process).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_KERNEL: Any = None
_FRAC = 32  # fixed-point fraction bits of the source coordinates


def _compile() -> Any:
    from numba import njit, prange

    one = float(1 << _FRAC)
    half = np.int64(1 << (_FRAC - 1))
    frac = np.int64(_FRAC)

    @njit(inline="always", cache=False)  # type: ignore[misc]
    def inside(x0: int, dx: int, y0: int, dy: int, j: int, w: int, h: int) -> bool:  # pragma: no cover
        ix = (x0 + j * dx + half) >> frac
        iy = (y0 + j * dy + half) >> frac
        return ix >= 0 and ix < w and iy >= 0 and iy < h

    @njit(parallel=True, cache=False)  # type: ignore[misc]
    def kernel(
        x8: Any, theta: Any, gam: Any, con: Any, bri: Any, mean: float, std: float, out: Any
    ) -> None:  # pragma: no cover (compiled)
        b_n, h, w = x8.shape
        fill = np.float32((0.0 - mean) / std)
        for b in prange(b_n):
            # 1. the intensity table: v -> clamp((v^gam - m) * con + m + bri), m = mean after the gamma
            hist = np.zeros(256, np.int64)
            n = 0
            for i in range(0, h, 2):  # the mean for the contrast: every other row and column is enough
                for j in range(0, w, 2):
                    hist[x8[b, i, j]] += 1
                    n += 1
            g = np.empty(256)
            m = 0.0
            for v in range(256):
                g[v] = (v / 255.0) ** gam[b]
                m += hist[v] * g[v]
            m /= n
            lut = np.empty(256, np.float32)
            for v in range(256):
                y = min(max((g[v] - m) * con[b] + m + bri[b], 0.0), 1.0)
                lut[v] = (y - mean) / std
            # 2. the affine: source pixel (x, y) of output pixel (i, j) is linear in j: start + j * step
            src = x8[b].ravel()
            a0 = theta[b, 0, 0]
            d0 = theta[b, 1, 0]
            sy = d0 * h / w
            dx = np.int64(np.rint(a0 * one))
            dy = np.int64(np.rint(sy * one))
            for i in range(h):
                yn = (2.0 * i + 1.0) / h - 1.0
                px0 = a0 * (1.0 - w) / 2.0 + (w / 2.0) * (theta[b, 0, 1] * yn + theta[b, 0, 2] + 1.0) - 0.5
                py0 = (
                    d0 * (h / 2.0) * (1.0 / w - 1.0)
                    + (h / 2.0) * (theta[b, 1, 1] * yn + theta[b, 1, 2] + 1.0)
                    - 0.5
                )
                x0 = np.int64(np.rint(px0 * one))
                y0 = np.int64(np.rint(py0 * one))
                # the columns inside the source: estimate the interval in floats, then settle it exactly
                lo, hi = 0, w
                for p0, step, lim in ((px0, a0, w), (py0, sy, h)):
                    if step != 0.0:
                        ja = (-0.5 - p0) / step
                        jb = (lim - 0.5 - p0) / step
                        if ja > jb:
                            ja, jb = jb, ja
                        lo = max(lo, int(max(min(math.floor(ja), w), 0.0)))
                        hi = min(hi, int(max(min(math.ceil(jb) + 1.0, w), 0.0)))
                lo = min(lo, hi)
                while lo < hi and not inside(x0, dx, y0, dy, lo, w, h):
                    lo += 1
                while hi > lo and not inside(x0, dx, y0, dy, hi - 1, w, h):
                    hi -= 1
                if lo < hi:
                    while lo > 0 and inside(x0, dx, y0, dy, lo - 1, w, h):
                        lo -= 1
                    while hi < w and inside(x0, dx, y0, dy, hi, w, h):
                        hi += 1
                o = out[b, i]
                for j in range(lo):
                    o[j] = fill
                xx = x0 + lo * dx + half
                yy = y0 + lo * dy + half
                for j in range(lo, hi):
                    o[j] = lut[src[(yy >> frac) * w + (xx >> frac)]]
                    xx += dx
                    yy += dy
                for j in range(hi, w):
                    o[j] = fill

    return kernel


def nearest_affine_lut(
    batch: torch.Tensor,
    theta: torch.Tensor,
    gam: torch.Tensor,
    con: torch.Tensor,
    bri: torch.Tensor,
    norm: tuple[float, float] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, 1, H, W) on CPU -> float32 (B, 1, H, W) in [0, 1]: per image, the table
    v -> clamp((v^gam - m) * con + m + bri) (m: the image's mean after the gamma, over every other row
    and column), then the affine ``theta`` (B, 2, 3; output -> input, normalised coordinates as for
    ``F.affine_grid``) with nearest resampling and black outside the source. ``norm=(mean, std)``
    returns (x - mean) / std, folded into the table. ``out``: a contiguous float32 (B, 1, H, W) CPU tensor
    to write into (returned), instead of a new one."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _compile()
    import numba

    torch_threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
    b, _, h, w = batch.shape
    x8 = np.ascontiguousarray(batch.reshape(b, h, w).numpy())
    as64 = [np.ascontiguousarray(t.detach().cpu().double().numpy()) for t in (theta, gam, con, bri)]
    mean, std = norm if norm is not None else (0.0, 1.0)
    if out is None:
        out = torch.empty((b, 1, h, w), dtype=torch.float32)
    elif out.shape != (b, 1, h, w) or out.dtype != torch.float32 or not out.is_contiguous() or out.is_cuda:
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {(b, 1, h, w)}")
    _KERNEL(x8, *as64, float(mean), float(std), out.numpy()[:, 0])
    if torch.get_num_threads() != torch_threads:
        # numba's OpenMP pool and torch may share one OpenMP runtime: starting the pool sets its thread
        # count to all CPUs, which would override train.threads (and change torch's float reductions)
        torch.set_num_threads(torch_threads)
    return out
