"""The ``xraydx`` command: data, train, evaluate, predict, demo (and more as stages land).

Exit codes: 0 success; 1 a fatal error (message on stderr); 2 bad usage or config;
3 finished, but some input files could not be read (they are listed in the output and on stderr).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xraydx.constants import DEFAULT_CHECKPOINT, checkpoint_or_default
from xraydx.constants import sample_dir as _sample_dir
from xraydx.errors import (
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    UsageError,
    XraydxError,
)

__all__ = [
    "DEFAULT_CHECKPOINT", "EXIT_FATAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE",
    "UsageError", "build_parser", "main",
]  # fmt: skip


def _checkpoint(args: argparse.Namespace) -> Path:
    return checkpoint_or_default(getattr(args, "checkpoint", None))


# ---- data ----------------------------------------------------------------------------------------


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from xraydx.data import discover, format_report, inspect
    from xraydx.fsutil import atomic_write_json

    manifest = discover(
        args.path, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed
    )
    report = inspect(manifest, check_images=not args.no_read, near=not args.no_near, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        atomic_write_json(Path(args.json), report.to_dict())
    if args.manifest_out:
        manifest.to_csv(Path(args.manifest_out))
    return EXIT_PARTIAL if report.unreadable else EXIT_OK


# ---- train ---------------------------------------------------------------------------------------

TRAIN_FLAGS = {
    # flag: (config key, type, help)
    "data": ("data.path", str, "dataset: folder in any supported layout, or a CSV manifest"),
    "model": ("model.name", str, "timm architecture (default mobilenetv2_100)"),
    "pretrained": ("model.pretrained", str, "offline | timm | none"),
    "epochs": ("train.epochs", int, "maximum epochs"),
    "batch_size": ("train.batch_size", int, "batch size (per process)"),
    "lr": ("train.lr", float, "peak learning rate"),
    "image_size": ("data.image_size", int, "input size in pixels"),
    "lung_mask": ("data.lung_mask", str, "none | crop | mask"),
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


def build_config(args: argparse.Namespace) -> Any:
    from xraydx.config import Config, parse_overrides

    cfg = Config.load(args.config) if args.config else Config()
    overrides = {key: getattr(args, flag) for flag, (key, _, _) in TRAIN_FLAGS.items()}
    cfg.override(overrides)
    cfg.override(parse_overrides(args.set or []))
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from xraydx.train import run_training

    if args.resume:
        run = run_training(None, resume=Path(args.resume), progress=not args.quiet)
    else:
        run = run_training(build_config(args), progress=not args.quiet)
    print(f"run folder: {run}")
    skipped = run / "skipped.csv"
    if skipped.is_file():  # written by train when images could not be read (training went on without them)
        import csv

        with open(skipped, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            n = sum(1 for _ in csv.reader(fh)) - 1
        print(f"xraydx: {n} unreadable image files were skipped; listed in {skipped}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


# ---- evaluate ------------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from xraydx.evaluate import evaluate_checkpoint
    from xraydx.metrics import format_metrics

    ckpt = _checkpoint(args)
    out = Path(args.out) if args.out else _default_eval_dir(ckpt, args.split)
    m = evaluate_checkpoint(
        ckpt, args.data, args.split, out, device=args.device, overwrite=args.overwrite, progress=not args.quiet,
        audit=args.audit,
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


# ---- predict -------------------------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    from xraydx.fsutil import refuse_overwrite
    from xraydx.predict import Prediction, Predictor, done_paths, expand_inputs, write_predictions

    out = Path(args.out)
    if not args.resume:
        refuse_overwrite(out, args.overwrite)
    paths, missing = expand_inputs(args.inputs)
    if not paths and not missing:
        raise UsageError("no image files found in the inputs given")
    skip = done_paths(out) if args.resume else set()
    todo = [p for p in paths if str(p) not in skip]
    pred = Predictor(_checkpoint(args), args.device, engine=args.engine)
    if args.heatmaps and pred.model is None:
        raise UsageError("--heatmaps needs the PyTorch model (Grad-CAM): pass the .safetensors, not .onnx")
    stream = pred.predict_files(todo, batch_size=args.batch_size, progress=not args.quiet, total=len(todo))
    if args.heatmaps:
        from xraydx.explain import with_heatmaps

        stream = with_heatmaps(pred, stream, Path(args.heatmaps), overwrite=args.overwrite or args.resume)
    missing_rows = [
        Prediction(str(p), None, f"error: {reason}") for p, reason in missing if str(p) not in skip
    ]

    def all_rows() -> Any:
        yield from missing_rows
        yield from stream

    counts = write_predictions(
        all_rows(), out, pred.classes, fmt=args.format, overwrite=args.overwrite, resume=args.resume,
        meta={"checkpoint": str(pred.checkpoint), "architecture": pred.meta["architecture"]},
        extra_columns=("flag", "heatmap") if args.heatmaps else ("flag",),
    )  # fmt: skip
    done = f" ({len(skip)} already done)" if skip else ""
    print(f"wrote {out}: {counts['ok']} predicted, {counts['error']} unreadable{done}", file=sys.stderr)
    return EXIT_PARTIAL if counts["error"] else EXIT_OK


# ---- demo (the main job on the bundled sample) ---------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import json

    from xraydx.config import Config
    from xraydx.train import run_training

    t0 = time.perf_counter()
    cfg = Config()
    cfg.data.path = args.data
    cfg.runs_dir = args.runs_dir
    cfg.name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.train.epochs = args.epochs
    run = run_training(cfg, progress=not args.quiet)
    metrics = json.loads((run / "metrics.json").read_text())
    te = metrics.get("test")
    secs = time.perf_counter() - t0
    print()
    print(f"demo finished in {secs / 60:.1f} min; run folder {run}")
    if te:
        recall = ", ".join(f"{c} {v['sensitivity']:.2f}" for c, v in te["per_class"].items())
        print(
            f"test split of {args.data} (n={te['n']}): accuracy {te['accuracy']:.3f}, macro-F1 {te['macro_f1']:.3f}"
            f" (recall: {recall})"
        )
        print(
            "This is a tiny sample from a few public collections: the figure says the pipeline works, not how the"
            " model does on another hospital's images. See README, Results."
        )
    return EXIT_OK


# ---- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from xraydx import __version__

    p = argparse.ArgumentParser(
        prog="xraydx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"xraydx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

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
    common(ins)
    ins.set_defaults(func=cmd_data_inspect)

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
    common(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on a dataset split")
    ev.add_argument("--checkpoint")
    ev.add_argument("--data", required=True)
    ev.add_argument(
        "--split", default="test", choices=["train", "val", "test", "external"],
        help="external: the source held out in training (train --holdout-source)",
    )  # fmt: skip
    ev.add_argument("--out", help="output folder (default: <run>/eval-<split>-<time>)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--overwrite", action="store_true")
    ev.add_argument("--audit", action="store_true", help="also run the shortcut audit (in report.html)")
    common(ev)
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="predict files, folders or list files into CSV/JSON")
    pr.add_argument("inputs", nargs="+", help="image files, folders (recursive) or .txt list files")
    pr.add_argument("--checkpoint")
    pr.add_argument("--out", required=True)
    pr.add_argument("--format", choices=["csv", "json"], default="csv")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default="auto")
    pr.add_argument(
        "--engine", choices=["torch", "onnx"], default="torch",
        help="torch, or onnx (onnxruntime; --checkpoint may then be an exported .onnx file)",
    )  # fmt: skip
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    pr.add_argument(
        "--resume", action="store_true", help="carry on a killed run: skip paths already in --out"
    )
    pr.add_argument("--heatmaps", metavar="DIR", help="also write a Grad-CAM overlay per image into DIR")
    common(pr)
    pr.set_defaults(func=cmd_predict)

    de = sub.add_parser("demo", help="the main job on the bundled sample: train, validate, test, predict")
    de.add_argument("--data", default=str(_sample_dir()))
    de.add_argument("--runs-dir", default="runs")
    de.add_argument("--epochs", type=int, default=8)
    common(de)
    de.set_defaults(func=cmd_demo)

    # stages that own their sub-command: each module has add_cli(sub) -> None
    import importlib

    for name in STAGE_MODULES:
        try:
            mod = importlib.import_module(f"xraydx.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"xraydx.{name}":
                raise
            continue
        mod.add_cli(sub)
    return p


STAGE_MODULES = ("export", "explain", "audit", "segment", "serve")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except XraydxError as exc:
        print(f"xraydx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xraydx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
