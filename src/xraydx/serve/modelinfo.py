"""What the server tells a client about the model and one image, in words fit to show: the model's
metadata with names only (never a path of the machine it was trained on), the lung crop's box in the
uploaded image, and the out-of-distribution reasons that make sense for that image."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from xraydx.constants import CROPPING_MODES
from xraydx.transforms import Preprocessing, mask_bbox, resize_uint8

#: keys whose string values name files or folders (reduced to the last component)
PATH_KEYS = re.compile(r"(^|_)(path|paths|file|files|dir|dirs|folder|root|mask|image|checkpoint)$")
_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")


def _name(value: str) -> str:
    if "\\" in value or _WINDOWS_ABS.match(value):
        return PureWindowsPath(value).name or value
    return PurePosixPath(value).name or value


def looks_like_path(value: str) -> bool:
    """An absolute POSIX or Windows path, or a home-relative one."""
    return value.startswith(("/", "~/")) or bool(_WINDOWS_ABS.match(value))


def names_only(obj: Any, key: str = "") -> Any:
    """``obj`` with every file or folder reduced to its name: string values under path-like keys
    (``path``, ``file``, ``root``, ``mask``, ...), and any string anywhere that is an absolute path."""
    if isinstance(obj, Mapping):
        return {k: names_only(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [names_only(v, key) for v in obj]
    if isinstance(obj, str) and (looks_like_path(obj) or (PATH_KEYS.search(key.lower()) and "/" in obj)):
        return _name(obj)
    return obj


def public_data_summary(summary: Any, data_path: Any = None) -> Any:
    """The training-data summary without the server's folder layout: ``root`` is only the dataset folder's
    name, and ``name`` the dataset's (the folder, or the manifest CSV's file name; from the training
    config's ``data.path`` for checkpoints older than the ``name`` key)."""
    if not isinstance(summary, Mapping):
        return summary
    out = dict(summary)
    if out.get("root"):
        out["root"] = _name(str(out["root"]))
    name = out.get("name") or (_name(str(data_path)) if data_path else None) or out.get("root")
    if name:
        out["name"] = _name(str(name))
    return names_only(out)


def crop_box(
    shape: tuple[int, ...], mask: np.ndarray | None, spec: Preprocessing
) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) in an image of ``shape`` of the lung box that ``lung_mask=crop`` (or
    ``crop_mask``) preprocessing cuts out (transforms.apply_lung_mask's rule, at the base resolution where the spec has
    one), or None where the model does not crop or the mask is empty."""
    if spec.lung_mask not in CROPPING_MODES or mask is None:
        return None
    h, w = int(shape[0]), int(shape[1])
    work = (spec.base_size, spec.base_size) if spec.base_size else (h, w)
    m = mask
    if m.shape != work:
        m = resize_uint8((m > 0).astype(np.uint8) * 255, work)
    fg = m > 127 if m.dtype == np.uint8 and m.max() > 1 else m > 0
    box = mask_bbox(fg) if fg.any() else None
    if box is None:
        return None
    t, b, left, r = box
    sy, sx = h / work[0], w / work[1]
    return round(t * sy), round(b * sy), round(left * sx), round(r * sx)


# ---- out-of-distribution reasons ---------------------------------------------------------------------

#: reasons that say the image is no radiograph of a chest at all: its orientation then means nothing
_NOT_A_CXR = ("colour image", "blank or nearly constant", "no clear lung fields")


def ood_message(info: Mapping[str, Any], guard_threshold: float | None = None) -> str:
    """The guard's reasons that make sense for this image, joined. "Looks rotated / inverted" is dropped
    where the image is not a chest radiograph at all (colour, blank, no lung fields) and where even the
    rotated (inverted) copy stays beyond the guard's distance threshold: a cat photo is not "rotated"."""
    reasons = [str(r) for r in (info.get("reasons") or [])]
    det = info.get("details") or {}
    not_cxr = any(r.startswith(_NOT_A_CXR) for r in reasons)
    d = det.get("feature_distance")

    def orientation_fits(gap_key: str) -> bool:
        gap = det.get(gap_key)
        if not_cxr:
            return False
        if guard_threshold is None or not isinstance(d, (int, float)) or not isinstance(gap, (int, float)):
            return True
        return float(d) - float(gap) <= guard_threshold  # the turned copy would pass the distance test

    kept = []
    for r in reasons:
        if r.startswith("looks rotated") and not orientation_fits("rotation_gap"):
            continue
        if r.startswith("looks inverted") and not orientation_fits("inversion_gap"):
            continue
        kept.append(r)
    return "; ".join(kept or reasons)
