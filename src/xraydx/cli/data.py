"""``xraydx data inspect``: layout, counts, unreadable files, duplicates and leakage of a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xraydx.cli._common import SubParsers, add_quiet
from xraydx.errors import EXIT_OK, EXIT_PARTIAL, printable


def add_parser(sub: SubParsers) -> None:
    data = sub.add_parser("data", help="inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    ins = dsub.add_parser("inspect", help="layout, counts, unreadable files, duplicates and leakage")
    ins.add_argument("path")
    ins.add_argument("--val-fraction", type=float, default=0.15)
    ins.add_argument("--test-fraction", type=float, default=0.15)
    ins.add_argument("--seed", type=int, default=0)
    ins.add_argument(
        "--no-read", action="store_true", help="do not decode images (faster; no unreadable/duplicate check)"
    )
    ins.add_argument("--no-near", action="store_true", help="skip the near-duplicate search")
    ins.add_argument("--json", help="also write the report as JSON here")
    ins.add_argument("--manifest-out", help="write the resolved manifest (CSV) here")
    add_quiet(ins)
    ins.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xraydx.data import discover, format_report, inspect
    from xraydx.fsutil import atomic_write_json, check_output_file

    for flag in ("json", "manifest_out"):
        if getattr(args, flag):  # written after reading every image: checked before
            check_output_file(getattr(args, flag), overwrite=True, flag=f"--{flag.replace('_', '-')}")
    manifest = discover(
        args.path, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed
    )
    report = inspect(manifest, check_images=not args.no_read, near=not args.no_near, progress=not args.quiet)
    print(format_report(report))
    for p, why in report.not_read:  # data left out: on stderr too, and exit code 3
        print(
            f"xraydx: {printable(p)}: {printable(why)}; its images are not in the manifest", file=sys.stderr
        )
    if args.json:
        atomic_write_json(Path(args.json), report.to_dict())
    if args.manifest_out:
        manifest.to_csv(Path(args.manifest_out))
    return EXIT_PARTIAL if report.unreadable or report.not_read else EXIT_OK
