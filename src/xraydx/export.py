"""``xraydx export``: a classifier checkpoint as a self-describing ONNX file, checked against PyTorch.

The exported graph takes the *normalised* float image, ``image``: float32 (B, 1, S, S) =
(uint8 / 255 - mean) / std with the checkpoint's preprocessing, and returns ``logits``: float32
(B, C); the batch axis is dynamic. Probabilities are softmax(logits / temperature). Everything
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

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xraydx.constants import checkpoint_or_default, sample_dir
from xraydx.engines import (
    DEFAULT_OPSET,
    INPUT_NAME,
    META_KEY,
    PARITY_TOLERANCE,
    Classifier,
    classifier_network,
    export_checked,
    export_onnx,
    probe_images,
    read_onnx_metadata,
)
from xraydx.engines import with_metadata as _with_doc
from xraydx.errors import EXIT_FATAL, EXIT_OK, ExportError, UsageError
from xraydx.models import load_checkpoint

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


# ---- CLI -------------------------------------------------------------------------------------------


def _default_check_dir() -> Path | None:
    d = sample_dir() / "test"
    return d if d.is_dir() else None


def cmd_export(args: argparse.Namespace) -> int:
    from xraydx.predict import expand_inputs

    ckpt = checkpoint_or_default(args.checkpoint)
    check_dir = Path(args.check_images) if args.check_images else _default_check_dir()
    if check_dir is None:
        raise UsageError("no images to check parity on: pass --check-images DIR (real X-rays, any layout)")
    if not check_dir.exists():
        raise UsageError(f"{check_dir}: --check-images folder not found")
    if args.opset < 9:
        raise UsageError(f"--opset must be at least 9; got {args.opset}")
    paths, _ = expand_inputs([check_dir])
    report = export_checkpoint(
        ckpt, args.out, check_images=paths, max_images=args.max_images, opset=args.opset,
        tolerance=args.tolerance, overwrite=args.overwrite,
    )  # fmt: skip
    par = report["parity"]
    print(
        f"parity on {par['n_images']} real images from {check_dir} (PyTorch eager vs onnxruntime, CPU, float32):"
    )
    print(
        f"  max |difference| of probabilities  {par['max_abs_diff_probs']:.3e}   (tolerance {par['tolerance']:.0e})"
    )
    print(f"  max |difference| of logits         {par['max_abs_diff_logits']:.3e}")
    print(f"  same predicted class               {par['argmax_agreement'] * 100:.1f}%")
    if not report["written"]:
        print(f"xraydx: error: parity check failed; {args.out} not written", flush=True)
        return EXIT_FATAL
    print(
        f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB, opset {args.opset}) in {report['seconds']:.1f}s"
    )
    return EXIT_OK


def add_cli(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX and check parity with PyTorch on real images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("--checkpoint", help="xraydx checkpoint (.safetensors)")
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    ex.add_argument(
        "--check-images",
        metavar="DIR",
        help="real images for the parity check (default: the bundled sample's test split)",
    )
    ex.add_argument("--max-images", type=int, default=64, help="at most this many parity images (default 64)")
    ex.add_argument(
        "--tolerance", type=float, default=PARITY_TOLERANCE,
        help=f"max allowed |difference| of probabilities (default {PARITY_TOLERANCE:g})",
    )  # fmt: skip
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.add_argument(
        "-q", "--quiet", action="store_true", help="(accepted for symmetry; export prints a short report)"
    )
    ex.set_defaults(func=cmd_export)
