"""``xraydx shift fit``: fit a checkpoint's source-shift score (:mod:`xraydx.shift`) on the data it was
trained on, with the threshold a leave-source-out crossval calibrated out of source, into the sidecar
``<checkpoint>.shift.safetensors`` that :class:`xraydx.predict.Predictor` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from xraydx.data import Manifest, discover
from xraydx.device import resolve_device
from xraydx.errors import OutputExistsError, UsageError
from xraydx.fsutil import printable_path
from xraydx.shift import ShiftScore, batch_features, model_digest, save_sidecar, sidecar_path
from xraydx.trainset import load_split

__all__ = ["crossval_threshold", "fit_shift"]


def crossval_threshold(run: str | Path) -> float:
    """The shift threshold a crossval chose on all its out-of-source predictions (metrics.json)."""
    m = Path(run) / "metrics.json"
    try:
        t = json.loads(m.read_text(encoding="utf-8"))["shift_flag"]["threshold"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"{printable_path(str(m))}: no shift_flag.threshold (a crossval run of this version?)"
        ) from exc
    if t is None or not np.isfinite(float(t)):
        raise UsageError(
            f"{printable_path(str(m))}: the crossval's flag reached its target without the shift score"
        )
    return float(t)


def _manifest(data: str | Path) -> Manifest:
    p = Path(data)
    if p.is_dir() and (p / "manifest.csv").is_file() and (p / "config.yaml").is_file():
        return Manifest.from_csv(p / "manifest.csv")  # a run folder: exactly its splits
    return discover(p)


def fit_shift(
    checkpoint: str | Path, data: str | Path, *, threshold: float | None = None, crossval: str | Path | None = None,
    out: str | Path | None = None, overwrite: bool = False, k: int = 10, quantile: float = 0.95,
    cache_dir: str | Path | None = None, device: str = "auto", progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Bank = the train split's features, scale = the val split's ``quantile``; returns the sidecar's doc."""
    from xraydx.models import load_checkpoint
    from xraydx.transforms import Preprocessing

    if threshold is not None and crossval is not None:
        raise UsageError("give --threshold or --crossval, not both")
    src = "none"
    if crossval is not None:
        threshold, src = crossval_threshold(crossval), f"crossval {Path(crossval).name}"
    elif threshold is not None:
        src = "given on the command line"
    target = Path(out) if out else sidecar_path(checkpoint)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{printable_path(str(target))}: already exists (use --overwrite)")
    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, dev)
    spec = Preprocessing.from_dict(meta["preprocessing"])
    recs = _manifest(data).records
    if cache_dir:
        cache = Path(cache_dir)
    else:  # where train put it: beside the run folder (runs/.cache), else runs/.cache here
        cache = (Path(data).parent if (Path(data) / "config.yaml").is_file() else Path("runs")) / ".cache"
    feats = {}
    for split in ("train", "val"):
        chosen = [r for r in recs if r.split == split]
        if not chosen:
            raise UsageError(f"{printable_path(str(data))}: no {split} split to fit the shift score on")
        d, _ = load_split(chosen, spec, cache, split, progress)
        feats[split] = batch_features(model, d.images, spec, dev)
    score = ShiftScore.fit(feats["train"], feats["val"], k=k, quantile=quantile)
    info = {"threshold_from": src, "n_train": len(feats["train"]), "n_val": len(feats["val"]),
            "data": Path(data).name, "checkpoint": Path(checkpoint).name}  # fmt: skip
    save_sidecar(target, score, threshold=threshold, digest=model_digest(model), info=info)
    return {
        "path": str(target),
        "threshold": threshold,
        "scale": score.scale,
        "bank": len(score.bank),
        **info,
    }
