"""``xraydx crossval``: leave-one-source-out validation of a training recipe (see xraydx.crossval)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xraydx.cli._common import SubParsers, add_quiet
from xraydx.cli.train import TRAIN_FLAGS, build_config
from xraydx.errors import EXIT_OK, UsageError

#: the cheap screening settings (--screen): 128 px, 4 epochs of 1,024 images each
SCREEN = {"data.image_size": "128", "train.epochs": "4", "train.epoch_size": "1024"}


def add_parser(sub: SubParsers) -> None:
    cv = sub.add_parser(
        "crossval",
        help="leave-one-source-out validation: train without each source, predict it, pool",
        description="For each fold (a source, or sources joined with +), train the recipe without the fold's"
        " sources and predict their images with the fold's model; pool these out-of-source predictions and"
        " summarise them (metrics.json, report.html) in one run folder.",
    )
    cv.add_argument("--config", help="YAML config file (the recipe)")
    for flag, (key, typ, hlp) in TRAIN_FLAGS.items():
        if flag == "holdout_source":  # the folds say what is held out
            continue
        cv.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, type=typ, default=None, help=f"{hlp} [{key}]"
        )
    cv.add_argument(
        "--by", choices=("source",), default="source", help="what a fold holds out (default source)"
    )
    cv.add_argument(
        "--folds",
        metavar="'A;B;C+D'",
        help="folds separated by ';', sources within a fold joined by '+' (default: one fold per source)",
    )
    cv.add_argument(
        "--screen",
        action="store_true",
        help="cheap screening settings: "
        + ", ".join(f"{k}={v}" for k, v in SCREEN.items())
        + " (--set wins)",
    )
    cv.add_argument(
        "--oos-pipeline",
        choices=("cached", "deployed"),
        default="cached",
        help="predict held-out images from the training cache (the model inputs predict makes; default) or"
        " through the whole predict pipeline incl. the OOD guard (slower)",
    )
    cv.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field")
    cv.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a killed crossval (finished folds are kept)"
    )
    cv.add_argument(
        "--reuse-folds", metavar="RUN_DIR",
        help="predict with that crossval run's fold models instead of training new ones (its recipe:"
        " only prediction settings may differ, e.g. --set data.tta=affine; give a new --name)",
    )  # fmt: skip
    add_quiet(cv)
    cv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xraydx.crossval import run_crossval

    if args.resume:
        out = run_crossval(None, resume=Path(args.resume), progress=not args.quiet)
    else:
        if args.screen:
            args.set = [f"{k}={v}" for k, v in SCREEN.items()] + list(args.set or [])
        args.holdout_source = None
        if args.reuse_folds and not args.config:  # the recipe of the run whose fold models are reused
            args.config = str(Path(args.reuse_folds) / "config.yaml")
            if not Path(args.config).is_file():
                raise UsageError(
                    f"--reuse-folds {args.reuse_folds}: not a crossval run folder (no config.yaml)"
                )
        cfg = build_config(args)
        out = run_crossval(
            cfg, folds=args.folds, progress=not args.quiet, pipeline=args.oos_pipeline,
            trained_from=Path(args.reuse_folds) if args.reuse_folds else None,
        )  # fmt: skip
    print(f"run folder: {out}")
    return EXIT_OK
