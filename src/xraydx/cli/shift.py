"""``xraydx shift fit``: a checkpoint's source-shift score and its out-of-source threshold
(:mod:`xraydx.shiftfit`)."""

from __future__ import annotations

import argparse

from xraydx.cli._common import SubParsers
from xraydx.errors import EXIT_OK


def add_parser(sub: SubParsers) -> None:
    sh = sub.add_parser("shift", help="the source-shift score: fit it for a checkpoint")
    ssub = sh.add_subparsers(dest="shift_command", required=True)
    f = ssub.add_parser(
        "fit", help="fit a checkpoint's source-shift score (k-NN feature distance to its training images)",
        description="Fit the source-shift score of a checkpoint on the data it was trained on (its train "
        "split: the feature bank; its val split: the scale) and store it, with a threshold, in "
        "<checkpoint>.shift.safetensors, which predict, explain and serve then use.",
    )  # fmt: skip
    f.add_argument("--checkpoint", required=True, help="the classifier checkpoint (.safetensors)")
    f.add_argument("--data", required=True, help="its training run folder (exact splits) or its data")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--crossval", help="a crossval run of the same recipe: its out-of-source shift threshold")
    g.add_argument("--threshold", type=float, help="flag at or above this score (default: report only)")
    f.add_argument("--out", help="the sidecar (default: next to the checkpoint)")
    f.add_argument(
        "--cache-dir", help="the image cache (default: the run folder's runs/.cache, as train uses)"
    )
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    from xraydx.shiftfit import fit_shift

    doc = fit_shift(
        args.checkpoint, args.data, threshold=args.threshold, crossval=args.crossval, out=args.out,
        overwrite=args.overwrite, cache_dir=args.cache_dir, progress=not args.quiet,
    )  # fmt: skip
    t = doc["threshold"]
    print(
        f"wrote {doc['path']}: bank of {doc['bank']} training images, scale {doc['scale']:.4f}, "
        + (f"threshold {t:.3f} ({doc['threshold_from']})" if t is not None else "no threshold (report only)")
    )
    return EXIT_OK
