"""``xraydx predict``: predict files, folders or list files into CSV/JSON (optionally with Grad-CAM overlays)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xraydx.cli._common import SubParsers, add_quiet, checkpoint
from xraydx.constants import ENGINES, TTA_MODES
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
    pr.add_argument(
        "--tta", choices=list(TTA_MODES), default=None,
        help="test-time augmentation: none, or affine (mean logits of 7 shifted/zoomed views, 7x the cost); "
        "default: the checkpoint's (the shipped model: none)",
    )  # fmt: skip
    pr.add_argument(
        "--adapt-bn", type=float, default=0.0, metavar="W",
        help="test-time BatchNorm adaptation to these inputs first (0 < W <= 1: the weight of their own "
        "statistics; one extra read of every file). Only for a representative mix of one site's cases: "
        "on a folder of one class it hurts (README, Predict)",
    )  # fmt: skip
    pr.add_argument(
        "--adapt-bn-layers", type=int, default=0, metavar="K",
        help="with --adapt-bn: adapt only each network's first K BatchNorm layers (0: all)",
    )  # fmt: skip
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    pr.add_argument(
        "--resume", action="store_true", help="carry on a killed run: skip paths already in --out"
    )
    pr.add_argument("--heatmaps", metavar="DIR", help="also write a Grad-CAM overlay per image into DIR")
    add_quiet(pr)
    pr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xraydx.data.inputs import refuse_inputs_as_outputs
    from xraydx.fsutil import check_output_file, check_output_folder
    from xraydx.predict import Prediction, Predictor, expand_inputs
    from xraydx.predwrite import done_paths, write_predictions

    out = Path(args.out)
    if args.resume and args.format != "csv":
        raise UsageError("--resume works with CSV output only (--format csv)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1; got {args.batch_size}")
    check_output_file(out, overwrite=args.overwrite or args.resume)  # before any image is read
    if args.heatmaps:
        check_output_folder(args.heatmaps, flag="--heatmaps")
    notes: list[str] = []
    paths, missing = expand_inputs(args.inputs, notes)
    for note in notes:
        print(f"xraydx: note: {note}", file=sys.stderr)
    if not paths and not missing:
        raise UsageError("no image files found in the inputs given")
    refuse_inputs_as_outputs(args.inputs, paths, out, args.heatmaps)
    skip = done_paths(out) if args.resume else set()
    given = {str(p) for p in paths} | {str(p) for p, _ in missing}
    foreign = sorted(skip - given)
    if foreign:
        raise UsageError(
            f"{out}: --resume: {len(foreign)} of its rows are not among the inputs given (e.g. "
            f"{foreign[0]}); it was made from another input list (give the same inputs, or another --out)"
        )
    todo = [p for p in paths if str(p) not in skip]
    from xraydx.bnadapt import check_request

    check_request(args.adapt_bn, args.adapt_bn_layers, args.engine)  # before any export or image read
    pred = Predictor(checkpoint(args), args.device, engine=args.engine, tta=args.tta)
    if args.heatmaps and pred.model is None:
        raise UsageError("--heatmaps needs the PyTorch model (Grad-CAM): pass the .safetensors, not .onnx")
    meta = {"checkpoint": str(pred.checkpoint), "architecture": pred.meta["architecture"]}
    if args.adapt_bn:  # on every input (also those a --resume skips): the same statistics as the first run
        from xraydx.bnadapt import adapt_predictor_to_files

        meta["adapted"] = adapt_predictor_to_files(
            pred, paths, args.adapt_bn, args.batch_size, not args.quiet, first=args.adapt_bn_layers
        )
        print(
            f"xraydx: note: BatchNorm statistics adapted to {meta['adapted']['images']} of the inputs "
            f"(weight {args.adapt_bn:g}); model_id {pred.model_id}",
            file=sys.stderr,
        )
    stream = pred.predict_files(todo, batch_size=args.batch_size, progress=not args.quiet, total=len(todo))
    if args.heatmaps:
        from xraydx.explain import with_heatmaps

        stream = with_heatmaps(pred, stream, Path(args.heatmaps), overwrite=args.overwrite or args.resume)

    def all_rows() -> Any:  # in input order: an input that cannot be read has its row where it was given
        rows = iter(stream)
        for item in input_order(args.inputs, paths, missing):
            if isinstance(item, tuple):
                if str(item[0]) not in skip:
                    yield Prediction(str(item[0]), None, f"error: {item[1]}")
            elif str(item) not in skip:
                yield next(rows)

    counts = write_predictions(
        all_rows(), out, pred.classes, fmt=args.format, overwrite=args.overwrite, resume=args.resume,
        meta=meta, model_id=pred.model_id, kind="predict-heatmaps" if args.heatmaps else "predict",
    )  # fmt: skip
    done = f" ({len(skip)} already done)" if skip else ""
    print(f"wrote {out}: {counts['ok']} predicted, {counts['error']} unreadable{done}", file=sys.stderr)
    return EXIT_PARTIAL if counts["error"] else EXIT_OK


def input_order(
    inputs: Sequence[str], paths: Sequence[Path], problems: Sequence[tuple[Path, str]]
) -> list[Path | tuple[Path, str]]:
    """``paths`` (already in input order) with each problem put where it was met: after the paths of the
    inputs before its own, and inside a folder at its place in the folder's sorted walk."""

    def arg_of(p: Path) -> int:
        for i, raw in enumerate(inputs):
            r = Path(raw)
            if p == r or r in p.parents:
                return i
        return len(inputs)

    pos = [arg_of(p) for p in paths]
    keyed: list[tuple[float, int, Path | tuple[Path, str]]] = [(k, 0, q) for k, q in enumerate(paths)]
    for j, prob in enumerate(problems):
        a, name = arg_of(prob[0]), str(prob[0])
        at = next(
            (
                k
                for k, (q, qa) in enumerate(zip(paths, pos, strict=True))
                if qa > a or (qa == a and str(q) > name)
            ),
            len(paths),
        )
        keyed.append((at - 0.5, j, prob))
    return [item for _, _, item in sorted(keyed, key=lambda t: (t[0], t[1]))]
