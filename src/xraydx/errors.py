"""Every error xraydx raises on purpose, and the exit code each one ends the command with.

One base class, :class:`XraydxError`, carries ``exit_code``; ``xraydx.cli.main`` prints the message
and returns that code (one ``except``, no ladder). The kinds keep the built-in base they always had
(``ValueError``, ``RuntimeError``, ``FileExistsError``), so code that catches those still works.

Exit codes: 0 success; 1 a fatal error (message on stderr); 2 bad usage or config (a flag or config
value that cannot work, an unknown model or one without offline weights, an output that exists without
``--overwrite``), found before any work starts; 3 finished, but some input files could not be read (they
are listed in the output and on stderr); 130 interrupted.

``xraydx.io.ImageReadError`` (one unreadable file, exit 1 when it ends a command) and the
stage-specific ``OODError`` (a checkpoint error) subclasses these.
"""

from __future__ import annotations

import os
import re

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class XraydxError(Exception):
    """Base of every deliberate xraydx error; ``exit_code`` is what the command exits with."""

    exit_code: int = EXIT_FATAL


class UsageError(XraydxError):
    """The command line asks for something that cannot be done as given."""

    exit_code = EXIT_USAGE


class ConfigError(XraydxError, ValueError):
    """A config file, override or value that is not valid."""

    exit_code = EXIT_USAGE


class DeviceError(XraydxError, RuntimeError):
    """A ``--device`` that does not exist or is not available here (e.g. ``cuda`` without CUDA)."""

    exit_code = EXIT_USAGE


class DatasetError(XraydxError, ValueError):
    """The data at a path cannot be turned into a usable 3-class manifest."""


class AuditError(XraydxError, ValueError):
    """Nothing to audit (no images in the split, none readable)."""


class CheckpointError(XraydxError, ValueError):
    """A checkpoint that cannot be read or used (names the file and why)."""


class SegmenterError(CheckpointError):
    """A lung-segmenter checkpoint or segmentation dataset that cannot be used (names the file and why)."""


class ShiftError(CheckpointError):
    """A checkpoint's source-shift sidecar that cannot be used (names the file and why)."""


class ExportError(XraydxError, ValueError):
    """Export or ONNX loading failed."""


class OutputExistsError(XraydxError, FileExistsError):
    """An output exists and ``--overwrite`` was not given (bad usage: the command asks to overwrite it)."""

    exit_code = EXIT_USAGE


class OutputError(XraydxError, OSError):
    """An output cannot be written: its folder is missing or not a folder, it is a folder, no permission,
    the disk is full (names the file and the cause)."""


class TrainError(XraydxError, RuntimeError):
    """Training cannot start or go on (no usable data, a run folder that cannot be resumed, ...)."""


class ServeError(XraydxError, RuntimeError):
    """The server cannot start as asked (engine unavailable, bad limits, ...)."""


#: What :func:`printable` escapes: C0 and C1 control characters (ESC, CR, LF, TAB, BEL, DEL, ...), the
#: Unicode line/paragraph separators and bidirectional overrides (which reorder what a terminal shows),
#: and lone surrogates (bytes of a file name that are not UTF-8, as Python's ``surrogateescape`` keeps them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    o = ord(m.group())
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def printable(text: object) -> str:
    """``text`` made safe for a terminal or a log line: the one helper for every message that may hold a
    file name (or a decoder's words about one). Control characters (ESC, CR, LF, TAB, ...) become
    ``\\xNN``, bytes of a name that are not UTF-8 ``\\xNN``, line separators and bidi overrides
    ``\\uNNNN``; everything else is kept. ``bytes`` and paths are decoded the way the OS does."""
    s = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    return _UNSAFE.sub(_escape, s)


__all__ = [
    "EXIT_FATAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "AuditError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DeviceError",
    "ExportError",
    "OutputError",
    "OutputExistsError",
    "SegmenterError",
    "ServeError",
    "ShiftError",
    "TrainError",
    "UsageError",
    "XraydxError",
    "printable",
]
