"""The ``xraydx`` parser, built statically from one module per command, and :func:`main`.

Each command module has ``add_parser(sub)`` (its flags and help; imports nothing heavy) and
``run(args) -> int`` (imports the library lazily, calls it, prints the summary). Errors reach
:func:`main` as :class:`xraydx.errors.XraydxError`, which carries the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xraydx import __version__
from xraydx.cli import (
    audit,
    crossval,
    data,
    demo,
    dicom,
    evaluate,
    explain,
    export,
    ood,
    predict,
    segment,
    serve,
    shift,
    train,
)
from xraydx.errors import EXIT_FATAL, EXIT_INTERRUPTED, XraydxError, printable
from xraydx.fsutil import WRITE_ERRNOS

#: in the order ``xraydx --help`` lists them
COMMANDS = (
    data,
    train,
    crossval,
    evaluate,
    predict,
    demo,
    export,
    explain,
    audit,
    segment,
    serve,
    dicom,
    ood,
    shift,
)


def build_parser() -> argparse.ArgumentParser:
    import xraydx.cli

    p = argparse.ArgumentParser(
        prog="xraydx", description=xraydx.cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"xraydx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except XraydxError as exc:
        print(f"xraydx: error: {printable(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xraydx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a write that no atomic_open saw fail (disk full, read-only): one line, exit 1
        if exc.errno not in WRITE_ERRNOS:
            raise
        where = f"{printable(exc.filename)}: " if isinstance(exc.filename, str) else ""
        print(f"xraydx: error: {where}cannot write ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_FATAL
