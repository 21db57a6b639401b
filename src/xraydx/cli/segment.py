"""``xraydx segment``: lung masks and overlays for images; ``xraydx segment train``: train a segmenter.

Two real sub-commands: ``train``, and the default one (``run``), which is used when the first word
after ``segment`` is not a sub-command's name, so ``xraydx segment INPUTS... --out DIR`` works as
it always did. Options may come before or after the inputs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from xraydx.cli._common import SubParsers
from xraydx.constants import SEGMENTER_ENCODERS
from xraydx.errors import EXIT_OK, EXIT_PARTIAL, UsageError

DESCRIPTION = (
    "xraydx segment [--checkpoint SEG] INPUTS... --out DIR   (masks/, overlays/, segment.csv)\n"
    "xraydx segment train --data PATH [--data PATH ...] --out DIR    (lungseg manifests or datasets with masks)"
)

#: (flags, add_argument keywords) of `segment train`'s own options
TRAIN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--data",
        {"action": "append", "help": "lungseg folder/manifest or any dataset with lung masks (repeatable)"},
    ),
    ("--epochs", {"type": int}),
    ("--image-size", {"type": int}),
    ("--batch-size", {"type": int}),
    ("--lr", {"type": float}),
    ("--seed", {"type": int}),
    ("--encoder", {"choices": SEGMENTER_ENCODERS}),
    ("--pretrained", {"choices": ("offline", "none")}),
    ("--threads", {"type": int}),
    ("--half", {"action": "store_true", "help": "store float16 weights"}),
    ("--val-fraction", {"type": float}),
    ("--test-fraction", {"type": float}),
)
_TRAIN_ONLY = tuple(flag[2:].replace("-", "_") for flag, _ in TRAIN_OPTIONS)


class _DefaultSubParsers(argparse._SubParsersAction):
    """Sub-commands with a default one: arguments that do not start with a sub-command's name go to
    ``default_command`` (argparse has no default sub-command of its own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.choices = None  # any first word is accepted here; __call__ routes it
        self.default_command = ""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
        option_string: str | None = None,
    ) -> None:  # fmt: skip
        if values and values[0] not in self._name_parser_map:
            values = [self.default_command, *values]
        super().__call__(parser, namespace, values, option_string)


def _add_common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--out", help="output folder (required)")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_segmenting(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("segmenting")
    g.add_argument("--checkpoint", help="lung-segmenter checkpoint (default: the shipped one)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--no-overlay", action="store_true", help="write masks only")


def add_parser(sub: SubParsers) -> None:
    sp = sub.add_parser(
        "segment",
        help="lung masks and overlays for images; `segment train` trains a segmenter",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(sp)  # here too, so that options may come before the inputs
    _add_segmenting(sp)
    cmds = sp.add_subparsers(
        dest="segment_command", required=True, action=_DefaultSubParsers, metavar="{INPUTS...,train}",
        title="commands", description="INPUTS... (the default, `run`) or `train`; see xraydx segment train --help",
    )  # fmt: skip
    cmds.default_command = "run"
    # the sub-commands' options default to "not given", so they never hide the same option given before
    run_p = cmds.add_parser(
        "run", help="lung masks and overlays for image files, folders or .txt lists (the default)",
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    run_p.add_argument("inputs", nargs="+", help="image files, folders or .txt lists")
    _add_common(run_p)
    _add_segmenting(run_p)
    for flag, kw in TRAIN_OPTIONS:  # accepted only to say that they belong to `segment train`
        run_p.add_argument(flag, **{**kw, "help": argparse.SUPPRESS})
    run_p.set_defaults(func=run)
    tr = cmds.add_parser(
        "train", help="train a lung segmenter", description=DESCRIPTION.splitlines()[1],
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    _add_common(tr)
    t = tr.add_argument_group("training")
    for flag, kw in TRAIN_OPTIONS:
        t.add_argument(flag, **kw)
    tr.set_defaults(func=run_train)


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return [k for k in names if getattr(args, k, None) not in (None, False)]


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xraydx.fsutil import check_output_folder
    from xraydx.segment import LungSegmenter
    from xraydx.segment_train import segment_files

    if not args.out:
        raise UsageError("segment: --out DIR is required")
    check_output_folder(args.out)
    given = _given(args, _TRAIN_ONLY)
    if given:
        raise UsageError(
            f"segment: --{given[0].replace('_', '-')} is a training option (xraydx segment train ...)"
        )
    seg = (
        LungSegmenter.load(args.checkpoint, args.device)
        if args.checkpoint
        else LungSegmenter.default(args.device)
    )
    counts = segment_files(
        seg, args.inputs, Path(args.out), overlays=not args.no_overlay, overwrite=args.overwrite,
        progress=not args.quiet,
    )  # fmt: skip
    print(f"wrote {args.out}: {counts['ok']} masks, {counts['error']} unreadable", file=sys.stderr)
    return EXIT_PARTIAL if counts["error"] else EXIT_OK


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xraydx.fsutil import check_output_folder
    from xraydx.segment_train import train_segmenter

    if not args.out:
        raise UsageError("segment: --out DIR is required")
    check_output_folder(args.out)
    if not getattr(args, "data", None):
        raise UsageError("segment train: --data PATH is required")
    opts = {k: getattr(args, k) for k in _given(args, _TRAIN_ONLY) if k != "data"}
    if "image_size" in opts:
        opts["size"] = opts.pop("image_size")
    command = "xraydx " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    res = train_segmenter(
        args.data, Path(args.out), overwrite=args.overwrite, progress=not args.quiet, command=command, **opts
    )
    te = res.get("test")
    if te:
        print(
            f"test split (n={te['n']}; {res['split']}): Dice {te['dice_mean']:.4f}, IoU {te['iou_mean']:.4f}"
        )
    for w in res.get("warnings", []):
        print(f"xraydx: warning: {w}", file=sys.stderr)
    return EXIT_OK
