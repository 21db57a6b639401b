"""Small pieces several command modules share."""

from __future__ import annotations

import argparse
from pathlib import Path

from xraydx.constants import checkpoint_or_default

SubParsers = argparse._SubParsersAction


def add_quiet(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def checkpoint(args: argparse.Namespace) -> Path:
    """``--checkpoint``, else the shipped default model (a UsageError when there is none)."""
    return checkpoint_or_default(getattr(args, "checkpoint", None))
