"""The one view rule: is a DICOM header that of a frontal chest X-ray? Every entry point applies it.

The models are trained on frontal (PA/AP) chest X-rays. A DICOM file whose header says otherwise is
*not a frontal chest X-ray*, whatever its pixels look like:

* ``ViewPosition`` lateral (``LL``, ``RL``, ``LAT``, ``LATERAL``, ``LLO``, ``RLO``, ``LLAT``, ``RLAT``)
  or any other value than ``AP``/``PA`` (an unknown view);
* a ``ViewCodeSequence`` item whose meaning says lateral;
* ``ImageLaterality`` ``L`` or ``R`` (a one-sided image).

No ``ViewPosition`` at all (common in exports) is not a reason: the OOD guard then decides, as for a
PNG. ``xraydx predict``, ``explain`` and ``serve`` mark such an input status ``not_cxr`` with flag
``not a frontal chest X-ray`` and this reason in ``ood_reason`` (probabilities are still computed,
shown for reference only); the DICOM node does not classify it (``skipped: <reason>``, same flag).
Only the header is read (``stop_before_pixels``); a file that is not DICOM has no view reason.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

__all__ = ["FRONTAL_VIEWS", "LATERAL_VIEWS", "view_reason", "view_reason_of_bytes", "view_reason_of_file"]

FRONTAL_VIEWS = frozenset({"AP", "PA"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLO", "RLO", "LLAT", "RLAT"})
_CODE = re.compile(r"[^A-Za-z0-9_ .\-]")


def _code(value: Any, limit: int = 16) -> str:
    if value is None:
        return ""
    text = value[0] if isinstance(value, (list, tuple)) and value else value
    return _CODE.sub("?", str(text).strip())[:limit]


def view_reason(ds: Any) -> str | None:
    """Why the dataset ``ds`` (a pydicom Dataset, or a mapping with its keywords) is not a frontal
    chest X-ray by its header, or None where the header does not say so."""
    view = _code(ds.get("ViewPosition")).upper()
    if view in LATERAL_VIEWS:
        return f"lateral view (ViewPosition {view})"
    if view and view not in FRONTAL_VIEWS:
        return f"unknown view (ViewPosition {view})"
    for item in ds.get("ViewCodeSequence", None) or []:
        if "lateral" in str(item.get("CodeMeaning", "")).lower():
            return "lateral view (ViewCodeSequence)"
    laterality = _code(ds.get("ImageLaterality")).upper()
    if laterality in ("L", "R"):
        return f"one-sided image (ImageLaterality {laterality}), not a frontal chest X-ray"
    return None


def _is_dicom(head: bytes) -> bool:
    from xraydx.io_formats import sniff_format

    return sniff_format(head) == "dicom"


def view_reason_of_bytes(data: bytes) -> str | None:
    """:func:`view_reason` of a file's bytes; None for a file that is not DICOM or whose header cannot
    be read (its pixels are judged by the reader and the OOD guard)."""
    if not _is_dicom(bytes(data[:16384])):
        return None
    return _header_reason(io.BytesIO(data))


def view_reason_of_file(path: str | os.PathLike[str]) -> str | None:
    """:func:`view_reason` of a file on disk (header only); None as in :func:`view_reason_of_bytes`."""
    try:
        with open(path, "rb") as fh:
            if not _is_dicom(fh.read(16384)):
                return None
            fh.seek(0)
            return _header_reason(fh)
    except OSError:
        return None


def _header_reason(fp: Any) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
    except Exception:  # the pixel reader reports unreadable files; this rule only reads what it can
        return None
    return view_reason(ds)
