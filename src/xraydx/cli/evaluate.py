"""``xraydx evaluate``: metrics of a checkpoint on a dataset split (metrics.json, report.html, predictions.csv)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from xraydx.cli._common import SubParsers, add_quiet, checkpoint
from xraydx.constants import ALL_SPLITS
from xraydx.errors import EXIT_OK, EXIT_PARTIAL


def add_parser(sub: SubParsers) -> None:
    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on a dataset split")
    ev.add_argument("--checkpoint")
    ev.add_argument("--data", required=True)
    ev.add_argument(
        "--split", default="test", choices=list(ALL_SPLITS),
        help="external: the source held out in training (train --holdout-source)",
    )  # fmt: skip
    ev.add_argument("--out", help="output folder (default: <run>/eval-<split>-<time>)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--overwrite", action="store_true")
    ev.add_argument("--audit", action="store_true", help="also run the shortcut audit (in report.html)")
    ev.add_argument(
        "--allow-changed-data", action="store_true",
        help="evaluate --split test even where the data no longer gives the checkpoint's recorded split",
    )  # fmt: skip
    ev.add_argument(
        "--masks", default="segmenter", choices=["segmenter", "dataset"],
        help="lung masks for a lung-crop model: the segmenter's, as predict/serve use (default), or the dataset's",
    )  # fmt: skip
    ev.add_argument(
        "--adapt-bn", type=float, default=0.0, metavar="W",
        help="first adapt the network's BatchNorm statistics to the split's images (0 < W <= 1; a labelled "
        "folder of one site: README, Predict)",
    )  # fmt: skip
    ev.add_argument("--adapt-bn-layers", type=int, default=0, metavar="K",
                    help="with --adapt-bn: only each network's first K BatchNorm layers")  # fmt: skip
    add_quiet(ev)
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xraydx.evaluate import evaluate_checkpoint
    from xraydx.fsutil import check_output_folder
    from xraydx.metrics import format_metrics

    ckpt = checkpoint(args)
    out = check_output_folder(Path(args.out) if args.out else _default_eval_dir(ckpt, args.split))
    m = evaluate_checkpoint(
        ckpt, args.data, args.split, out, device=args.device, overwrite=args.overwrite, progress=not args.quiet,
        audit=args.audit, allow_changed_data=args.allow_changed_data, masks=args.masks,
        adapt_bn=args.adapt_bn, adapt_bn_layers=args.adapt_bn_layers,
    )  # fmt: skip
    print(format_metrics(m, title=f"{args.data} [{args.split}] with {ckpt}"))
    if m.get("audit"):
        print(f"\nshortcut audit: {m['audit']['verdict']['text']}")
    print(f"\nwrote {out / 'metrics.json'}, {out / 'report.html'} and {out / 'predictions.csv'}")
    return EXIT_PARTIAL if m["unreadable"] else EXIT_OK


def _default_eval_dir(ckpt: Path, split: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / f"eval-{split}-{stamp}"
    return Path(f"xraydx-eval-{split}-{stamp}")
