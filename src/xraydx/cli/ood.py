"""``xraydx ood fit``: fit the out-of-distribution guard's statistics (:mod:`xraydx.ood`)."""

from __future__ import annotations

import argparse
import shlex
import sys

from xraydx.cli._common import SubParsers
from xraydx.errors import EXIT_OK


def add_parser(sub: SubParsers) -> None:
    ood = sub.add_parser("ood", help="the out-of-distribution guard: fit its statistics")
    osub = ood.add_subparsers(dest="ood_command", required=True)
    f = osub.add_parser(
        "fit", help="fit the OOD guard's statistics", description="fit the OOD guard's statistics"
    )
    f.add_argument("--cxr3", required=True, help="cxr3-style folder (manifest.csv with file, patient_group)")
    f.add_argument(
        "--lungseg", help="lungseg folder: its segmenter-train split joins the fit set, val the calibration"
    )
    f.add_argument("--segmenter", help="segmenter checkpoint (default: the shipped one)")
    f.add_argument("--out", required=True)
    f.add_argument("--k", type=int, default=64)
    f.add_argument("--percentile", type=float, default=99.5, help="of calibration distances: the threshold")
    f.add_argument("--rotation-percentile", type=float, default=99.9)
    f.add_argument("--inversion-percentile", type=float, default=99.7)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--features-cache", help="folder to keep the computed descriptors in (reused on a rerun)")
    f.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    from xraydx.fsutil import check_output_file
    from xraydx.ood import fit_guard_files

    check_output_file(args.out, overwrite=args.overwrite)  # before the descriptors are computed
    meta = fit_guard_files(
        args.out, args.cxr3, lungseg=args.lungseg, segmenter=args.segmenter, k=args.k, percentile=args.percentile,
        rotation_percentile=args.rotation_percentile, inversion_percentile=args.inversion_percentile,
        seed=args.seed, threads=args.threads, overwrite=args.overwrite, features_cache=args.features_cache,
        command="xraydx " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )  # fmt: skip
    print(
        f"wrote {args.out}: threshold {meta['threshold']:.3f} (calibration {args.percentile}th percentile,"
        f" n={meta['calib_n']}), rules {meta['rules']}"
    )
    return EXIT_OK
