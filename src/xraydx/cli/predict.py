"""``xraydx predict``: predict files, folders or list files into CSV/JSON (optionally with Grad-CAM overlays)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xraydx.cli._common import SubParsers, add_quiet, checkpoint
from xraydx.constants import ENGINES
from xraydx.errors import EXIT_OK, EXIT_PARTIAL, UsageError


def add_parser(sub: SubParsers) -> None:
    pr = sub.add_parser("predict", help="predict files, folders or list files into CSV/JSON")
    pr.add_argument("inputs", nargs="+", help="image files, folders (recursive) or .txt list files")
    pr.add_argument("--checkpoint")
    pr.add_argument("--out", required=True)
    pr.add_argument("--format", choices=["csv", "json"], default="csv")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default="auto")
    pr.add_argument(
        "--engine", choices=list(ENGINES), default="torch",
        help="torch, or onnx (onnxruntime; --checkpoint may then be an exported .onnx file)",
    )  # fmt: skip
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    pr.add_argument(
        "--resume", action="store_true", help="carry on a killed run: skip paths already in --out"
    )
    pr.add_argument("--heatmaps", metavar="DIR", help="also write a Grad-CAM overlay per image into DIR")
    add_quiet(pr)
    pr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xraydx.fsutil import refuse_overwrite
    from xraydx.predict import Prediction, Predictor, done_paths, expand_inputs, write_predictions

    out = Path(args.out)
    if not args.resume:
        refuse_overwrite(out, args.overwrite)
    notes: list[str] = []
    paths, missing = expand_inputs(args.inputs, notes)
    for note in notes:
        print(f"xraydx: note: {note}", file=sys.stderr)
    if not paths and not missing:
        raise UsageError("no image files found in the inputs given")
    skip = done_paths(out) if args.resume else set()
    todo = [p for p in paths if str(p) not in skip]
    pred = Predictor(checkpoint(args), args.device, engine=args.engine)
    if args.heatmaps and pred.model is None:
        raise UsageError("--heatmaps needs the PyTorch model (Grad-CAM): pass the .safetensors, not .onnx")
    stream = pred.predict_files(todo, batch_size=args.batch_size, progress=not args.quiet, total=len(todo))
    if args.heatmaps:
        from xraydx.explain import with_heatmaps

        stream = with_heatmaps(pred, stream, Path(args.heatmaps), overwrite=args.overwrite or args.resume)
    missing_rows = [
        Prediction(str(p), None, f"error: {reason}") for p, reason in missing if str(p) not in skip
    ]

    def all_rows() -> Any:
        yield from missing_rows
        yield from stream

    counts = write_predictions(
        all_rows(), out, pred.classes, fmt=args.format, overwrite=args.overwrite, resume=args.resume,
        meta={"checkpoint": str(pred.checkpoint), "architecture": pred.meta["architecture"]},
        model_id=pred.model_id, kind="predict-heatmaps" if args.heatmaps else "predict",
    )  # fmt: skip
    done = f" ({len(skip)} already done)" if skip else ""
    print(f"wrote {out}: {counts['ok']} predicted, {counts['error']} unreadable{done}", file=sys.stderr)
    return EXIT_PARTIAL if counts["error"] else EXIT_OK
