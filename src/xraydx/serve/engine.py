"""The probability engine the inference thread calls: PyTorch, or onnxruntime checked against it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xraydx.errors import ServeError
from xraydx.export import OnnxEngine as RuntimeEngine

if TYPE_CHECKING:  # pragma: no cover
    from xraydx.predict import Predictor


class TorchEngine:
    name = "torch"

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def probs(self, batch: np.ndarray) -> np.ndarray:
        return self.predictor.probs(batch)


class OnnxEngine:
    """onnxruntime through :class:`xraydx.export.OnnxEngine` (the checkpoint exported in memory at start-up),
    checked against PyTorch on random input before the server starts."""

    name = "onnx"
    PARITY_TOL = 1e-3  # max absolute difference of probabilities on a random probe

    def __init__(self, predictor: Predictor, threads: int | None = None) -> None:
        # raises xraydx.export.ExportError (a CheckpointError) when onnxruntime is missing or export fails
        self.runtime = RuntimeEngine(predictor.checkpoint, threads=int(threads or 0), device="cpu")
        size = predictor.spec.size
        probe = np.random.default_rng(0).integers(0, 256, size=(2, size, size), dtype=np.uint8)
        diff = float(np.abs(self.probs(probe) - predictor.probs(probe)).max())
        if not diff <= self.PARITY_TOL:
            raise ServeError(f"the ONNX model disagrees with PyTorch (max probability difference {diff:.2e})")
        self.parity = diff

    def probs(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.runtime.probs(batch))


def make_engine(name: str, predictor: Predictor, threads: int | None = None) -> TorchEngine | OnnxEngine:
    if name == "torch":
        return TorchEngine(predictor)
    if name == "onnx":
        return OnnxEngine(predictor, threads)
    raise ServeError(f"engine must be torch or onnx; got {name!r}")
