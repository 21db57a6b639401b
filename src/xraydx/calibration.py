"""Temperature scaling that can fail, and says so: the calibration applied at the end of training.

:func:`calibrate` fits one temperature on the validation logits (:func:`~xraydx.metrics.fit_temperature`,
T in [:data:`T_MIN`, :data:`T_MAX`]) and checks it on data it was not fitted on: validation is cut in
two halves (alternate cases of each class), a temperature is fitted on each half and the NLL of the
other half is compared with and without it. Where the held-out NLL is worse with the temperature, the
model is kept uncalibrated (T = 1). A fitted temperature at either bound means the fit failed to find
an optimum inside the range (on a weak model: T = 20, every probability near 1/3); that is warned
about, as is an ECE that calibration makes worse on validation. The warnings are logged at training
time and kept in the checkpoint's ``calibration`` metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xraydx.metrics import fit_temperature

__all__ = ["T_MAX", "T_MIN", "calibrate"]

#: the bounds fit_temperature clamps to
T_MIN, T_MAX = 0.05, 20.0


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def calibrate(logits: Any, labels: Any) -> dict[str, Any]:
    """The temperature to apply and why: ``temperature`` (1.0 where scaling was rejected),
    ``fitted_temperature``, ``at_cap``, ``heldout_nll_uncalibrated`` / ``heldout_nll_calibrated`` (the
    2-fold check on val), ``kept_uncalibrated`` and ``warnings`` (sentences, empty when all is well)."""
    lg = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    fitted = fit_temperature(lg, y)
    fold = np.zeros(len(y), dtype=np.int64)
    fold[np.argsort(y, kind="stable")[1::2]] = 1  # alternate cases of each class
    uncal = cal = 0.0
    for k in (0, 1):
        fit_on, check_on = fold != k, fold == k
        if not fit_on.any() or not check_on.any():
            continue
        tk = fit_temperature(lg[fit_on], y[fit_on])
        uncal += _nll(lg[check_on], y[check_on], 1.0) * int(check_on.sum())
        cal += _nll(lg[check_on], y[check_on], tk) * int(check_on.sum())
    n = max(1, len(y))
    uncal, cal = uncal / n, cal / n
    at_cap = not (T_MIN * 1.001 < fitted < T_MAX * 0.999)
    rejected = cal > uncal
    warnings: list[str] = []
    if at_cap:
        warnings.append(
            f"calibration failed: the fitted temperature {fitted:.3g} is at its bound ({T_MIN:g}-{T_MAX:g}), "
            "so the model's scores say little about how often it is right"
        )
    if rejected:
        warnings.append(
            f"temperature scaling made held-out NLL worse ({uncal:.4f} -> {cal:.4f}, 2-fold on val): "
            "the model is kept uncalibrated (T = 1)"
        )
    return {
        "temperature": 1.0 if rejected else float(fitted),
        "fitted_temperature": float(fitted),
        "at_cap": bool(at_cap),
        "heldout_nll_uncalibrated": uncal,
        "heldout_nll_calibrated": cal,
        "kept_uncalibrated": bool(rejected),
        "warnings": warnings,
    }
