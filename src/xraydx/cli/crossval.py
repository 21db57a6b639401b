"""``xraydx crossval``: leave-one-source-out validation of a training recipe (see xraydx.crossval);
``xraydx crossval ensemble RUN RUN ...``: the members' averaged predictions, as a new run (xraydx.ensemble).

The sub-command is optional: ``xraydx crossval --data ...`` (no sub-command) runs a crossval as it always
did."""

from __future__ import annotations

import argparse
from pathlib import Path

from xraydx.cli._common import SubParsers, add_quiet
from xraydx.cli.train import TRAIN_FLAGS, add_ensemble_parser, build_config, ensemble_name
from xraydx.constants import COMPARE_RESAMPLES as DEFAULT_RESAMPLES
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
    cmds = cv.add_subparsers(
        dest="crossval_command", required=False, metavar="{ensemble,compare}", title="commands",
        description="ensemble: combine finished crossval runs (see xraydx crossval ensemble --help); compare:"
        " B - A with paired patient-group bootstrap intervals (xraydx crossval compare --help)",
    )  # fmt: skip
    ens = add_ensemble_parser(
        cmds, help="combine finished crossval runs: mean probabilities, flag where they disagree",
        description="Combine two or more finished crossval runs over the same images and folds into a new"
        " crossval run folder: each image's class probabilities averaged over the members (every member's"
        " prediction of it came from a model that never saw its source), flagged where any member flagged"
        " it or the members' top classes differ.", members="crossval run folders (two or more)",
        runs_dir="where it goes (default runs/)",
    )  # fmt: skip
    ens.set_defaults(func=run_ensemble)
    cmp = cmds.add_parser(
        "compare", help="is run B better than run A out of source? paired bootstrap differences",
        description="B - A for the pooled out-of-source figures of two finished crossval runs over the same"
        " images and folds (balanced accuracy, macro-F1, recall per class and per held-out source, errors"
        " flagged), each with a 95% interval from a paired bootstrap over patient groups. Give a recipe's"
        " seeds as RUN,RUN,... to compare means over seeds; a second interval then adds the seeds' variance.",
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    cmp.add_argument(
        "run_a", metavar="RUN_A", help="crossval run folder (the reference), or several runs of one recipe"
        " (its seeds) joined by commas: the figures are then their mean",
    )  # fmt: skip
    cmp.add_argument(
        "run_b", metavar="RUN_B", help="crossval run folder (the candidate), or runs joined by commas"
    )
    cmp.add_argument("--resamples", type=int, help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})")
    cmp.add_argument("--json", metavar="FILE", help="also write the comparison as JSON (never replaced)")
    cmp.set_defaults(func=run_compare)


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


#: the crossval options that mean nothing to `crossval ensemble` (its members were trained already)
_NOT_FOR_ENSEMBLE = ("config", "folds", "resume", "reuse_folds", "set", "screen")


def run_ensemble(args: argparse.Namespace) -> int:
    from xraydx.config import Config
    from xraydx.ensemble import combine

    name = ensemble_name(args, "crossval", "crossval runs", ("name", "runs_dir"), _NOT_FOR_ENSEMBLE)
    out = combine(args.members, name, getattr(args, "runs_dir", None) or Config().runs_dir)
    print(f"run folder: {out}")
    return EXIT_OK


def run_compare(args: argparse.Namespace) -> int:
    from xraydx.crossval_compare import compare, format_table
    from xraydx.fsutil import atomic_write_json, check_output_file

    if getattr(args, "json", None):
        check_output_file(Path(args.json), overwrite=False, flag="--json")
    result = compare(args.run_a, args.run_b, resamples=getattr(args, "resamples", DEFAULT_RESAMPLES))
    print(format_table(result))
    if getattr(args, "json", None):
        atomic_write_json(Path(args.json), result)
    return EXIT_OK
