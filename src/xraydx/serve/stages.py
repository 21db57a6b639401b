"""The optional stages a response can carry: the out-of-distribution check and Grad-CAM.

:func:`ood_hook` picks the OOD check this server runs and :func:`interpret_ood` turns its result into the
``ood`` object of the response; :func:`ood_warning` is the warning shown when an image is flagged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from xraydx import ood
from xraydx.fsutil import json_safe

log = logging.getLogger("xraydx.serve")

OodCheck = Callable[[np.ndarray, bytes], Any]


def ood_hook(predictor: Any) -> tuple[OodCheck | None, str]:
    """The out-of-distribution check this xraydx has, if any, and a note saying which (or why none).

    In order: ``Predictor.ood_check(img)`` where the predictor has one; else the shipped guard
    :meth:`xraydx.ood.OODGuard.default` (``check(img, colourfulness)``). A hook's result may be an
    ``OODResult`` (``is_cxr``, ``score``, ``reasons``), a mapping with ``status`` (``"ok"``,
    ``"not_cxr"`` or ``"ood"``) and optionally ``score`` / ``reason``, or a
    :class:`xraydx.predict.Prediction` whose ``status`` / ``extra["ood"]`` say the same."""
    fn = getattr(predictor, "ood_check", None)
    if callable(fn):
        return (lambda img, data: fn(img)), "the predictor's out-of-distribution check"
    try:
        guard = ood.OODGuard.default(getattr(predictor, "device", "cpu"))
    except Exception as exc:  # e.g. OODError: the shipped statistics or segmenter are missing
        log.warning("out-of-distribution check unavailable: %s", exc)  # the full reason, paths included
        return None, "out-of-distribution check unavailable in this installation (the server log says why)"

    def check(img: np.ndarray, data: bytes) -> Any:
        return guard.check(img, ood.colourfulness_of_bytes(data))

    return check, "xraydx.ood guard (lung segmenter + feature distance to real chest X-rays)"


def interpret_ood(result: Any) -> dict[str, Any] | None:
    """Normalise whatever the OOD hook returned into ``{"status", "flagged", ...}`` (None: no check)."""
    if result is None:
        return None
    if hasattr(result, "is_cxr"):  # xraydx.ood.OODResult
        info = (
            dict(result.to_dict())
            if hasattr(result, "to_dict")
            else {"score": getattr(result, "score", None)}
        )
        reasons = list(getattr(result, "reasons", []) or [])
        info["status"] = "ok" if result.is_cxr else "not_cxr"
        if reasons:
            info["reason"] = "; ".join(reasons)
    elif isinstance(result, Mapping):
        info = dict(result)
    else:  # a Prediction-like object
        extra = getattr(result, "extra", {}) or {}
        inner = extra.get("ood")
        info = dict(inner) if isinstance(inner, Mapping) else ({"score": inner} if inner is not None else {})
        status = str(getattr(result, "status", "ok"))
        info.setdefault("status", status if status in ("not_cxr", "ood") else "ok")
    status = str(info.get("status", "ok"))
    info["status"] = status
    info["flagged"] = status in ("not_cxr", "ood")
    return json_safe(info)


def ood_warning(info: Mapping[str, Any]) -> str:
    score = info.get("score")
    s = f" (score {float(score):.3g})" if isinstance(score, (int, float)) else ""
    why = f": {info['reason']}" if info.get("reason") else ""
    return (
        f"This does not look like a frontal chest X-ray{s}{why}. The class probabilities below are not"
        " trustworthy for this image."
    )
