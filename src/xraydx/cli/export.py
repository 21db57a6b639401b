"""``xraydx export``: a checkpoint to ONNX, with a parity check against PyTorch on real images."""

from __future__ import annotations

import argparse
from pathlib import Path

from xraydx.cli._common import SubParsers, checkpoint
from xraydx.constants import ONNX_OPSET, PARITY_TOLERANCE, sample_dir
from xraydx.errors import EXIT_FATAL, EXIT_OK, UsageError

DESCRIPTION = """\
ONNX export with a parity check against PyTorch, and an onnxruntime inference engine.

The exported graph takes the *normalised* float image, ``image``: float32 (B, 1, S, S) =
(uint8 / 255 - mean) / std with the checkpoint's preprocessing, and returns ``logits``: float32
(B, C); the batch axis is dynamic. Probabilities are softmax(logits / temperature). Everything
needed to use the file alone (classes, preprocessing, mean/std, temperature, architecture, the
whole checkpoint metadata, the parity result) is stored as JSON in the model's
``metadata_props`` under the key ``"xraydx"``; ``read_onnx_metadata`` returns it.

``xraydx export --checkpoint CKPT --out model.onnx`` exports, then runs the same real images
through PyTorch and onnxruntime and prints the max absolute difference of the probabilities; above
the tolerance (default 1e-4) it exits 1 and writes nothing. ``xraydx predict --engine onnx`` runs
prediction through onnxruntime (see :class:`OnnxEngine`).
"""


def add_parser(sub: SubParsers) -> None:
    ex = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX and check parity with PyTorch on real images",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("--checkpoint", help="xraydx checkpoint (.safetensors)")
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")
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
    ex.set_defaults(func=run)


def _default_check_dir() -> Path | None:
    d = sample_dir() / "test"
    return d if d.is_dir() else None


def run(args: argparse.Namespace) -> int:
    from xraydx.export import export_checkpoint
    from xraydx.fsutil import check_output_file
    from xraydx.predict import expand_inputs

    check_output_file(Path(args.out), overwrite=args.overwrite)  # before the export and the parity check
    ckpt = checkpoint(args)
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
