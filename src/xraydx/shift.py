"""Source-shift score: how far an image's classifier features are from every image the model trained on.

The top probability does not tell a new hospital's images from the training hospitals' (out of source it
is even *anti*-correlated with being right: docs/generalisation.md). This score asks the classifier itself:
its penultimate features (timm's ``forward_head(..., pre_logits=True)``), L2-normalised, are compared with
a bank of the training images' features; the score is the cosine distance to the ``k``-th nearest bank
feature (the non-parametric k-NN out-of-distribution score of Sun et al., ICML 2022, written from the
paper's description), divided by the ``quantile`` of the same distance on the run's *validation* images
(new images of the training sources). So 1.0 means "as far from the training data as the 95th-percentile
new image of a training source", whatever the model or its feature size, and a threshold chosen on one
set of fold models (``xraydx crossval``, calibrated out of source) applies to another model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xraydx import constants
from xraydx.engines import normalise
from xraydx.errors import ShiftError
from xraydx.fsutil import printable_path

__all__ = [
    "SHIFT_FLAG", "ShiftRule", "ShiftScore", "batch_features", "load_sidecar", "model_digest", "save_sidecar",
    "sidecar_path",
]  # fmt: skip


def batch_features(
    model: nn.Module,
    images: np.ndarray,
    spec: Any,
    device: torch.device,
    batch_size: int = 64,
    normalize: bool = True,
    prepare: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> np.ndarray:
    """Penultimate features (N, D) of a timm classifier for preprocessed uint8 (N, S, S), L2-normalised
    unless ``normalize`` is False (then what the classifier's linear head reads). ``prepare``: how a uint8
    batch becomes the network's input (default: normalised by ``spec``; e.g. augmented as in training)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"{type(model).__name__}: no forward_features/forward_head (not a timm classifier)")
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            x = (
                prepare(batch)
                if prepare
                else torch.from_numpy(normalise(batch, spec.mean, spec.std)).to(device)
            )
            f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
            f = f.float().flatten(1)
            out.append((torch.nn.functional.normalize(f, dim=1) if normalize else f).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class ShiftScore:
    """A feature bank and the scale that makes the k-NN distance 1.0 at the validation quantile."""

    bank: np.ndarray  # (M, D) float32, rows L2-normalised
    k: int
    scale: float
    quantile: float

    @classmethod
    def fit(
        cls, train: np.ndarray, val: np.ndarray, *, k: int = 10, quantile: float = 0.95,
        max_bank: int = 4096, seed: int = 0,
    ) -> ShiftScore:  # fmt: skip
        if len(train) <= k:
            raise ValueError(f"the shift score needs more than k={k} training images; got {len(train)}")
        if not len(val):
            raise ValueError("the shift score needs validation images to set its scale")
        if len(train) > max_bank:
            train = train[np.random.default_rng(seed).choice(len(train), max_bank, replace=False)]
        s = cls(np.ascontiguousarray(train, dtype=np.float32), k, 1.0, quantile)
        d = s.distance(val)
        s.scale = float(max(np.quantile(d, quantile), 1e-6))
        return s

    def distance(self, feats: np.ndarray) -> np.ndarray:
        """Cosine distance of each row of ``feats`` to its k-th nearest bank feature."""
        if not len(feats):
            return np.zeros(0)
        out = []
        bank = torch.from_numpy(self.bank)
        for i in range(0, len(feats), 1024):
            sim = torch.from_numpy(np.ascontiguousarray(feats[i : i + 1024], dtype=np.float32)) @ bank.T
            out.append((1.0 - sim.topk(self.k, dim=1).values[:, -1]).double().numpy())
        return np.concatenate(out)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """The k-NN distance in units of its validation quantile (1.0 = that quantile)."""
        return self.distance(feats) / self.scale


# ---- the shipped form: a sidecar next to the checkpoint --------------------------------------------

SHIFT_FLAG = constants.SHIFT_FLAG  # the flag text's one home is xraydx.constants (xraydx.schema uses it)


def sidecar_path(checkpoint: str | Path) -> Path:
    """``model.safetensors`` -> ``model.shift.safetensors``: where a checkpoint's shift score lives."""
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".safetensors") + ".shift.safetensors")


def model_digest(model: nn.Module) -> str:
    """sha256 of a model's tensors (names, shapes, dtypes and bytes, in name order): pairs a sidecar with
    the one network whose features it was fit on, whatever the checkpoint file's metadata says."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ShiftRule:
    """A fitted :class:`ShiftScore` and the threshold at or above which an image is flagged."""

    score: ShiftScore
    threshold: float | None  # None: the score is reported, nothing is flagged by it
    meta: dict[str, Any]

    def flags(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            return np.zeros(len(scores), dtype=bool)
        return np.asarray(scores) >= self.threshold

    def note(self) -> str:
        if self.threshold is None:
            return "the source-shift score is reported; no threshold was calibrated, so it flags nothing"
        return (
            f"flagged '{SHIFT_FLAG}' when the source-shift score is at least {self.threshold:.3f}"
            f" (calibrated out of source: {self.meta.get('threshold_from', 'unknown')})"
        )


def save_sidecar(
    path: Path, score: ShiftScore, *, threshold: float | None, digest: str, info: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    from xraydx.fsutil import atomic_write_with

    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"the shift threshold must be a finite number > 0; got {threshold}")
    doc = {"k": score.k, "scale": score.scale, "quantile": score.quantile, "threshold": threshold,
           "model_digest": digest, **info}  # fmt: skip
    tensors = {"bank": torch.from_numpy(score.bank).to(torch.float16)}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"shift": json.dumps(doc)}))


def load_sidecar(path: Path, model: nn.Module) -> ShiftRule:
    """The sidecar at ``path`` for ``model``; ShiftError where it is unreadable, malformed or was fit on
    another network."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            doc = json.loads((fh.metadata() or {})["shift"])
            bank = fh.get_tensor("bank").float().numpy()
        k, scale, q = int(doc["k"]), float(doc["scale"]), float(doc["quantile"])
        t = doc.get("threshold")
        t = None if t is None else float(t)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise ShiftError(f"{printable_path(str(path))}: not a readable shift-score sidecar ({exc})") from exc
    if not (bank.ndim == 2 and len(bank) > k >= 1 and math.isfinite(scale) and scale > 0) or (
        t is not None and not (math.isfinite(t) and t > 0)
    ):
        raise ShiftError(
            f"{printable_path(str(path))}: malformed shift-score sidecar (k, scale or threshold)"
        )
    if doc.get("model_digest") != model_digest(model):
        raise ShiftError(
            f"{printable_path(str(path))}: fit on another network than this checkpoint's (digest differs); "
            "refit it with `xraydx shift fit`"
        )
    norms = np.linalg.norm(bank, axis=1, keepdims=True)
    return ShiftRule(ShiftScore(bank / np.maximum(norms, 1e-12), k, scale, q), t, doc)
