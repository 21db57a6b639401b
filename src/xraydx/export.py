"""``xraydx export``: a classifier checkpoint as a self-describing ONNX file, checked against PyTorch.

The exported graph takes the *normalised* float image, ``image``: float32 (B, 1, S, S) =
(uint8 / 255 - mean) / std with the checkpoint's preprocessing, and returns ``logits``: float32
(B, C); the batch axis is dynamic. Probabilities are softmax(logits / temperature). An ensemble
(``xraydx train ensemble``) has a second output, ``member_logp``: float32 (B, M, C), each member's
calibrated log-probabilities, which its abstention rule reads (flag where the members' top classes
differ: ``abstention.members_disagree``). Everything
needed to use the file alone (classes, preprocessing, mean/std, temperature, architecture, the
whole checkpoint metadata, the parity result) is stored as JSON in the model's
``metadata_props`` under the key ``"xraydx"``; ``read_onnx_metadata`` returns it.

``xraydx export --checkpoint CKPT --out model.onnx`` exports, then runs real images through PyTorch
and onnxruntime (the parity probe of :mod:`xraydx.engines`: one rule, one tolerance, 1e-4 on the
probabilities) and prints the max absolute difference; above the tolerance it exits 1 and writes
nothing. ``xraydx predict --engine onnx`` runs the whole pipeline (lung segmenter, OOD guard,
classifier) through onnxruntime (:mod:`xraydx.engines`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xraydx.engines import (
    DEFAULT_OPSET,
    INPUT_NAME,
    PARITY_TOLERANCE,
    Classifier,
    classifier_network,
    export_checked,
    export_onnx,
    probe_images,
)
from xraydx.errors import ExportError
from xraydx.models import load_checkpoint
from xraydx.onnxio import META_KEY, read_onnx_metadata
from xraydx.onnxio import with_metadata as _with_doc

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "META_KEY",
    "OUTPUT_NAME",
    "PARITY_TOLERANCE",
    "ExportError",
    "OnnxEngine",
    "export_checkpoint",
    "export_graph",
    "read_onnx_metadata",
    "with_metadata",
]

OUTPUT_NAME = "logits"


class OnnxEngine(Classifier):
    """A classifier on onnxruntime: an exported ``.onnx`` file, its bytes, or a checkpoint (exported once
    and cached, see :func:`xraydx.engines.onnx_engine`). ``logits(x)`` takes float32 (B, 1, S, S)
    normalised input; ``batch_logits(u8)`` / ``probs(u8)`` take preprocessed uint8 (N, S, S) images."""

    def __init__(
        self, source: str | Path | bytes, *, threads: int = 0, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(source, "onnx", device=device, threads=threads)


def export_graph(model: nn.Module, meta: dict[str, Any], *, opset: int = DEFAULT_OPSET) -> bytes:
    """The classifier as ONNX bytes (no xraydx metadata yet); input (B, C, S, S) float32, dynamic batch."""
    return export_onnx(classifier_network(model, meta), opset=opset)


def with_metadata(data: bytes, meta: dict[str, Any], extra: dict[str, Any]) -> bytes:
    """Store the checkpoint metadata (+ ``extra`` under ``"onnx"``) in the model's metadata_props."""
    return _with_doc(data, {**meta, "onnx": extra}, f"xraydx {meta['architecture']['name']} classifier")


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    check_images: Sequence[Path] = (),
    max_images: int = 64,
    opset: int = DEFAULT_OPSET,
    tolerance: float = PARITY_TOLERANCE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export, check parity on ``check_images``, and write ``out`` atomically if within ``tolerance``.

    Returns a report {"out", "written", "parity": {...}, "seconds"}; nothing is written on a parity failure."""
    from xraydx.fsutil import atomic_write_bytes, refuse_overwrite

    out = Path(out)
    refuse_overwrite(out, overwrite)
    t0 = time.perf_counter()
    model, meta = load_checkpoint(checkpoint, "cpu")
    net = classifier_network(model, meta, Path(checkpoint))
    images = probe_images(net, check_images, max_images)
    if not len(images):
        raise ExportError("no readable images to check parity on (pass --check-images DIR)")
    data, parity = export_checked(net, images, opset=opset, tolerance=tolerance)
    report: dict[str, Any] = {"out": str(out), "written": False, "parity": parity}
    if parity["passed"]:
        atomic_write_bytes(out, data)
        report["written"] = True
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report
