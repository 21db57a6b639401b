"""``xraydx audit``: the shortcut audit (does the model read the lungs or the borders / markers?)."""

from __future__ import annotations

import argparse

from xraydx.cli._common import SubParsers
from xraydx.constants import ALL_SPLITS, AUDIT_BORDER, AUDIT_CORNER
from xraydx.errors import EXIT_OK, EXIT_PARTIAL, UsageError


def add_parser(sub: SubParsers) -> None:
    au = sub.add_parser(
        "audit",
        help="shortcut audit: does the model read the lungs or the borders / markers?",
        description="Measures Grad-CAM mass inside the lungs and accuracy with the lungs, the outside, or the "
        "border and corners blacked out; writes audit.json and audit.html. Repeat --checkpoint to compare models "
        "(e.g. one trained with --lung-mask mask).",
    )
    au.add_argument(
        "--checkpoint", action="append", required=True, help="checkpoint (repeat to compare models)"
    )
    au.add_argument("--data", required=True)
    au.add_argument("--split", default="test", choices=list(ALL_SPLITS))
    au.add_argument("--out", required=True, help="output folder")
    au.add_argument("--border", type=float, default=AUDIT_BORDER, help="border band, fraction of the side")
    au.add_argument("--corner", type=float, default=AUDIT_CORNER, help="corner squares, fraction of the side")
    au.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument(
        "--masks", default="segmenter", choices=["segmenter", "dataset"],
        help="lung masks: the segmenter's, as predict/serve use (default), or the dataset's own",
    )  # fmt: skip
    au.add_argument("--device", default="auto")
    au.add_argument("--overwrite", action="store_true")
    au.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    au.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xraydx.audit import VARIANTS, run_audit
    from xraydx.fsutil import check_output_folder, refuse_overwrite
    from xraydx.report import audit_name, write_audit

    out = check_output_folder(Path(args.out))
    for name in ("audit.json", "audit.html"):
        refuse_overwrite(out / name, args.overwrite)  # before the work, not after
    if not 0 <= args.border < 0.5 or not 0 <= args.corner < 0.5:
        raise UsageError("--border and --corner must be fractions of the side in [0, 0.5)")
    audits = []
    for ck in args.checkpoint:
        a = run_audit(
            ck, args.data, args.split, device=args.device, border=args.border, corner=args.corner,
            n_boot=args.n_boot, seed=args.seed, progress=not args.quiet, masks=args.masks,
        )  # fmt: skip
        audits.append(a)
        print(f"{audit_name(a)}: {a['verdict']['text']}")
        for name in VARIANTS:
            r = a["variants"][name]
            print(
                f"  {name:<15} balanced accuracy {r['balanced_accuracy'] or 0:.3f}  accuracy {r['accuracy']:.3f}"
            )
        print(f"  Grad-CAM mass inside the lung field: {a['saliency']['mean_lung_share'] or float('nan'):.3f}"
              f" (lung field: {a['lung_field_text']})")  # fmt: skip
    write_audit(audits, out, overwrite=args.overwrite)
    print(f"wrote {out / 'audit.json'} and {out / 'audit.html'}")
    return EXIT_PARTIAL if any(a["unreadable"] for a in audits) else EXIT_OK
