"""``xraydx train``: train with validation every epoch (flags are shortcuts for config keys)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xraydx.cli._common import SubParsers, add_quiet
from xraydx.errors import EXIT_OK, EXIT_PARTIAL, UsageError

TRAIN_FLAGS = {
    # flag: (config key, type, help)
    "data": (
        "data.path",
        str,
        "dataset: folder in any supported layout, or a CSV manifest (required, unless --config sets"
        " data.path; there is no default: `xraydx demo` trains on the bundled sample)",
    ),
    "model": ("model.name", str, "timm architecture (default mobilenetv2_100)"),
    "pretrained": (
        "model.pretrained",
        str,
        "offline (default: ImageNet weights shipped for mobilenetv2_100 and tf_efficientnet_lite0-2) |"
        " timm (downloads; needs internet) | none (random start: any other architecture)",
    ),
    "epochs": ("train.epochs", int, "maximum epochs"),
    "batch_size": ("train.batch_size", int, "batch size (per process)"),
    "lr": ("train.lr", float, "peak learning rate"),
    "image_size": ("data.image_size", int, "input size in pixels"),
    "lung_mask": ("data.lung_mask", str, "none | crop | mask | crop_mask"),
    "intensity": ("data.intensity", str, "none | equalize"),
    "base_size": (
        "data.base_size",
        int,
        "resize whole images to this size first, before lung cropping (0 = off)",
    ),
    "holdout_source": ("data.holdout_source", str, "evaluate on this source only, never train on it"),
    "augment": ("train.augment", str, "none | light | strong"),
    "seed": ("train.seed", int, "random seed"),
    "device": ("train.device", str, "auto | cpu | cuda | cuda:N"),
    "patience": ("train.patience", int, "early-stopping patience in epochs"),
    "name": ("name", str, "run name (folder under --runs-dir)"),
    "runs_dir": ("runs_dir", str, "where run folders go (default runs/)"),
    "cache_dir": ("data.cache_dir", str, "decoded-image cache (default <runs-dir>/.cache)"),
}


def add_parser(sub: SubParsers) -> None:
    tr = sub.add_parser("train", help="train with validation every epoch")
    tr.add_argument("--config", help="YAML config file")
    for flag, (key, typ, hlp) in TRAIN_FLAGS.items():
        tr.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, type=typ, default=None, help=f"{hlp} [{key}]"
        )
    tr.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any config field, e.g. train.weight_decay=0.01"
    )
    tr.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a killed or finished run from its last checkpoint"
    )
    tr.add_argument(
        "--strict-data", action="store_true",
        help="refuse to train on duplicates across splits or conflicting labels (default: warn) [data.strict]",
    )  # fmt: skip
    add_quiet(tr)
    tr.set_defaults(func=run)
    cmds = tr.add_subparsers(
        dest="train_command", required=False, metavar="{ensemble}", title="commands",
        description="ensemble: finished runs of one recipe (e.g. its seeds) as one model (xraydx train"
        " ensemble --help)",
    )  # fmt: skip
    ens = add_ensemble_parser(
        cmds, help="finished runs of one recipe as one model: the mean of their calibrated probabilities",
        description="Combine two or more finished training runs trained alike on the same splits (e.g. one"
        " recipe at several seeds) into one checkpoint in a new run folder, used like any other by predict,"
        " evaluate, explain, export, serve and dicom. It is finished as a training run is: temperature and"
        " abstention threshold chosen on val, the test split evaluated (metrics.json, report.html,"
        " predictions.csv).", members="training run folders (or their checkpoints)",
        runs_dir="where it goes (default: the members' runs folder)",
    )  # fmt: skip
    ens.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    ens.set_defaults(func=run_ensemble)


def add_ensemble_parser(
    cmds: Any, *, help: str, description: str, members: str, runs_dir: str
) -> argparse.ArgumentParser:
    """The ``ensemble`` subcommand of ``train`` and ``crossval``: RUN RUN ..., --name, --runs-dir, -q. Its
    options default to "not given", so that --name / --runs-dir given before ``ensemble`` are kept."""
    ens = cmds.add_parser("ensemble", help=help, description=description, argument_default=argparse.SUPPRESS)
    ens.add_argument("members", nargs="+", metavar="RUN", help=members)
    ens.add_argument("--name", help="the new run folder's name (default ensemble-<member>+<member>...)")
    ens.add_argument("--runs-dir", dest="runs_dir", help=runs_dir)
    add_quiet(ens)
    return ens


def ensemble_name(
    args: argparse.Namespace, command: str, what: str, allowed: tuple[str, ...], others: tuple[str, ...]
) -> str:
    """Refuse (exit 2) the training options given to ``<command> ensemble`` (any of TRAIN_FLAGS and
    ``others`` not in ``allowed``: the members were trained already); the new run's name."""
    given = [k for k in (*TRAIN_FLAGS, *others) if k not in allowed
             and getattr(args, k, None) not in (None, []) and getattr(args, k) is not False]  # fmt: skip
    if given:
        raise UsageError(
            f"{command} ensemble: --{given[0].replace('_', '-')} is a training option; an ensemble combines"
            f" finished {what} (xraydx {command} ensemble RUN RUN ... --name NAME)"
        )
    if len(args.members) < 2:
        raise UsageError(f"{command} ensemble: give at least two {what}")
    return getattr(args, "name", None) or "ensemble-" + "+".join(Path(m).resolve().name for m in args.members)


def build_config(args: argparse.Namespace) -> Any:
    """The config file (or the defaults), then the flags, then ``--set`` overrides."""
    from xraydx.config import Config, parse_overrides

    cfg = Config.load(args.config) if args.config else Config()
    overrides = {key: getattr(args, flag) for flag, (key, _, _) in TRAIN_FLAGS.items()}
    cfg.override(overrides)
    cfg.override(parse_overrides(args.set or []))
    if getattr(args, "strict_data", False):
        cfg.data.strict = True
    return cfg


def run(args: argparse.Namespace) -> int:
    from xraydx.train import run_training

    if args.resume:
        given = [f"--{f.replace('_', '-')}" for f in TRAIN_FLAGS if getattr(args, f) is not None]
        given += [flag for flag, value in (("--config", args.config), ("--set", args.set)) if value]
        if given:  # they would be silently ignored: the run goes on with its saved config.yaml
            raise UsageError(
                f"--resume continues a run with its saved config.yaml; {', '.join(given)} cannot be"
                f" combined with it (edit {Path(args.resume) / 'config.yaml'} to change a value)"
            )
        run_dir = run_training(None, resume=Path(args.resume), progress=not args.quiet)
    else:
        run_dir = run_training(build_config(args), progress=not args.quiet)
    # the run's log has already said "run folder: ..." (rank 0 only under torchrun): not repeated here
    skipped = run_dir / "skipped.csv"
    if skipped.is_file():  # written by train when images could not be read (training went on without them)
        import csv

        with open(skipped, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            n = sum(1 for _ in csv.reader(fh)) - 1
        print(f"xraydx: {n} unreadable image files were skipped; listed in {skipped}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def run_ensemble(args: argparse.Namespace) -> int:
    from xraydx.train_ensemble import build_ensemble

    name = ensemble_name(
        args,
        "train",
        "training runs",
        ("name", "runs_dir", "device"),
        ("config", "set", "resume", "strict_data"),
    )
    run_dir = build_ensemble(
        args.members, name, getattr(args, "runs_dir", None), device=getattr(args, "device", None) or "auto",
        progress=not args.quiet,
    )  # fmt: skip
    print(f"run folder: {run_dir}")
    return EXIT_OK
