"""The ``xraydx`` command: data, train, evaluate, predict, demo (and more as stages land).

Exit codes: 0 success; 1 a fatal error (message on stderr); 2 bad usage or config;
3 finished, but some input files could not be read (they are listed in the output and on stderr).
"""

from __future__ import annotations

from xraydx.cli.main import build_parser, main
from xraydx.constants import DEFAULT_CHECKPOINT
from xraydx.errors import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, UsageError

__all__ = [
    "DEFAULT_CHECKPOINT", "EXIT_FATAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE",
    "UsageError", "build_parser", "main",
]  # fmt: skip
