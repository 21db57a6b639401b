"""``xraydx explain``: Grad-CAM overlays (PNG) of what drove each prediction."""

from __future__ import annotations

import argparse

from xraydx.cli._common import SubParsers, checkpoint
from xraydx.errors import EXIT_OK, EXIT_PARTIAL, UsageError


def add_parser(sub: SubParsers) -> None:
    ex = sub.add_parser(
        "explain",
        help="Grad-CAM overlays (PNG) of what drove each prediction",
        description="Writes <stem>__<class>.png (Grad-CAM of the predicted class over the preprocessed image) "
        "and explain.csv (path, prediction, probabilities, flag, overlay file) into --out.",
    )
    ex.add_argument("inputs", nargs="+", help="image files, folders (recursive) or .txt list files")
    ex.add_argument("--checkpoint")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument(
        "--all-classes", action="store_true", help="one overlay per class, not only the predicted one"
    )
    ex.add_argument("--alpha", type=float, default=0.45, help="heat map opacity in the overlay (0-1)")
    ex.add_argument("--device", default="auto")
    ex.add_argument("--overwrite", action="store_true", help="replace existing overlays / explain.csv")
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ex.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xraydx.explain import explain_files
    from xraydx.fsutil import check_output_folder

    check_output_folder(args.out)
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1]; got {args.alpha}")
    try:
        counts = explain_files(
            checkpoint(args), args.inputs, Path(args.out), all_classes=args.all_classes, device=args.device,
            overwrite=args.overwrite, alpha=args.alpha, progress=not args.quiet,
        )  # fmt: skip
    except ValueError as exc:
        if "no image files" in str(exc):
            raise UsageError(str(exc)) from exc
        raise
    print(
        f"wrote {counts['overlays']} Grad-CAM overlays of {counts['ok']} images to {args.out} (index: explain.csv);"
        f" {counts['error']} unreadable"
    )
    return EXIT_PARTIAL if counts["error"] else EXIT_OK
