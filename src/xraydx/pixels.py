"""Decoded pixel values to 8 bits: the default window and a DICOM's own VOI (used by :mod:`xraydx.io`).

* :func:`to_uint8`: min-max of the finite values onto 0..255, or with ``robust`` the **default window**:
  the :data:`DEFAULT_WINDOW_PERCENTILES` (0.5th and 99.5th) percentiles of the values present map to 0
  and 255, beyond is clipped (min-max where the two percentiles coincide). For high-bit-depth data
  without a window of its own: a dozen extreme pixels (a burnt-in marker, a dead detector line) cannot
  squeeze the chest into a few gray levels, as a min-max stretch does.
* :func:`dicom_gray`: modality values (after the Modality LUT) to 8 bits by the file's VOI LUT Sequence,
  else its first WindowCenter / WindowWidth by the formulas of PS3.3 C.11.2.1.2 (VOILUTFunction LINEAR,
  LINEAR_EXACT, SIGMOID) straight onto 0..255, else 8-bit data through its nominal range (8-bit values
  kept as they are: the same pixels as in a PNG), else the default window. ``how["window"]`` says which
  (``file-lut``, ``file``, ``none``, ``default``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DEFAULT_WINDOW_PERCENTILES", "dicom_gray", "to_uint8"]

DEFAULT_WINDOW_PERCENTILES: tuple[float, float] = (0.5, 99.5)
_PERCENTILE_SAMPLE = 2_000_000  # the default window's percentiles are taken on at most this many pixels


def _percentile_window(values: np.ndarray) -> tuple[float, float]:
    """The default window: the DEFAULT_WINDOW_PERCENTILES of ``values`` (finite, 1-D), on an evenly
    strided subsample of at most _PERCENTILE_SAMPLE values (deterministic)."""
    step = max(1, -(-values.size // _PERCENTILE_SAMPLE))
    lo, hi = np.percentile(values[::step], DEFAULT_WINDOW_PERCENTILES)
    return float(lo), float(hi)


def to_uint8(
    arr: np.ndarray, nominal: tuple[float, float] | None = None, *, robust: bool = False
) -> np.ndarray:
    """Window the finite values of ``arr`` onto 0..255: min-max, or with ``robust`` the default
    percentile window (min-max where its two percentiles coincide); values outside are clipped.

    A constant image is mapped through ``nominal`` (the container's value range) when given,
    else to zeros.  Non-finite values become 0.
    """
    if arr.dtype == np.uint8:
        return arr
    work = arr.astype(np.float64 if arr.dtype in (np.float64, np.int64, np.uint64) else np.float32)
    finite = np.isfinite(work)
    all_finite = bool(finite.all())
    if not all_finite:
        if not finite.any():
            return np.zeros(arr.shape, dtype=np.uint8)
        lo = float(work[finite].min())
        hi = float(work[finite].max())
        work[~finite] = lo
    else:
        lo = float(work.min())
        hi = float(work.max())
    if robust and hi > lo:
        plo, phi = _percentile_window(work[finite] if not all_finite else work.ravel())
        if phi > plo:
            lo, hi = plo, phi
    span = hi - lo
    if not span > 0:
        if nominal is None or nominal[1] <= nominal[0]:
            return np.zeros(arr.shape, dtype=np.uint8)
        value = (lo - nominal[0]) / (nominal[1] - nominal[0]) * 255.0
        return np.full(arr.shape, int(np.clip(round(value), 0, 255)), dtype=np.uint8)
    if np.isfinite(span):
        work -= lo
        work *= 255.0 / span
    else:  # range wider than the float type can represent: halve everything first
        work = work * 0.5 - lo * 0.5
        work *= 255.0 / (hi * 0.5 - lo * 0.5)
    np.clip(work, 0.0, 255.0, out=work)
    return np.rint(work).astype(np.uint8)


def _first_number(value: Any) -> float | None:
    """The first value of a (possibly multi-valued) DICOM number, or None where absent or invalid."""
    if value is None:
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _apply_window(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """The dataset's first window (PS3.3 C.11.2.1.2) applied to modality values, onto 0..255 as uint8;
    None where the file has no usable window."""
    c, w = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if c is None or w is None or w <= 0 or (function == "LINEAR" and w < 1):
        return None
    x = np.asarray(arr, dtype=np.float64)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif function == "LINEAR_EXACT":
        y = (x - c) / w + 0.5
    elif function == "LINEAR":
        y = (x > c - 0.5).astype(np.float64) if w == 1 else (x - (c - 0.5)) / (w - 1) + 0.5
    else:
        return None
    return np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def dicom_gray(arr: np.ndarray, ds: Any, how: dict[str, Any]) -> np.ndarray:
    """Modality values -> uint8 by the file's VOI, the 8-bit nominal range or the default window."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence"):
        how["window"] = "file-lut"
        return to_uint8(np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float64))
    windowed = _apply_window(arr, ds)
    if windowed is not None:
        how["window"] = "file"
        return windowed
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    slope, intercept = _first_number(ds.get("RescaleSlope")), _first_number(ds.get("RescaleIntercept"))
    plain = not ds.get("ModalityLUTSequence") and slope in (None, 1.0) and intercept in (None, 0.0)
    if bits <= 8 and plain and arr.dtype.kind in "ui":
        signed = arr.dtype.kind == "i" and int(ds.get("PixelRepresentation", 0) or 0) == 1
        lo = -(2 ** (bits - 1)) if signed else 0
        top = lo + 2**bits - 1
        how["window"] = "none"
        if bits == 8 and lo == 0:
            return np.clip(arr, 0, 255).astype(np.uint8)
        scaled = (np.clip(arr.astype(np.float64), lo, top) - lo) * (255.0 / (top - lo))
        return np.rint(scaled).astype(np.uint8)
    how["window"] = "default"
    return to_uint8(np.asarray(arr, dtype=np.float64), robust=True)
