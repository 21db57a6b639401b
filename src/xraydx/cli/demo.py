"""``xraydx demo``: the main job on the bundled sample: train, validate, test, predict."""

from __future__ import annotations

import argparse
import time

from xraydx.cli._common import SubParsers, add_quiet
from xraydx.constants import sample_dir
from xraydx.errors import EXIT_OK


def add_parser(sub: SubParsers) -> None:
    de = sub.add_parser("demo", help="the main job on the bundled sample: train, validate, test, predict")
    de.add_argument("--data", default=str(sample_dir()))
    de.add_argument("--runs-dir", default="runs")
    de.add_argument("--epochs", type=int, default=8)
    add_quiet(de)
    de.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from xraydx.config import Config
    from xraydx.train import run_training

    t0 = time.perf_counter()
    cfg = Config()
    cfg.data.path = args.data
    cfg.runs_dir = args.runs_dir
    cfg.name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.train.epochs = args.epochs
    run_dir = run_training(cfg, progress=not args.quiet)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    te = metrics.get("test")
    secs = time.perf_counter() - t0
    print()
    print(f"demo finished in {secs / 60:.1f} min")  # the training log has printed the run folder
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
