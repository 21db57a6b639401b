"""Atomic file writes (every output is written to a temp file in the same folder, then renamed), the one
JSON sanitiser (:func:`json_safe`), :func:`printable_path` for messages, and CSV cells that a spreadsheet
will not run as formulas (:func:`csv_cell`, :func:`csv_writer`, :class:`CsvDictWriter`, :func:`csv_unescape`).

CSV formula injection (OWASP): a cell that starts with ``=``, ``+``, ``-``, ``@``, TAB or CR is written
with a leading ``'`` (``=HYPERLINK(...)`` becomes ``'=HYPERLINK(...)``), so Excel, LibreOffice and Sheets
show it as text. Numbers (``-0.5``, ``1e-3``, ``-inf``) are kept as they are. A cell that already starts
with ``'`` before such a character gets one more ``'``, so :func:`csv_unescape` (used wherever xraydx reads
its own CSVs back: manifests, ``--resume``, crossval) gives back exactly what was written. JSON is never
escaped."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from xraydx.errors import OutputError, OutputExistsError, printable

#: errors of writing (not of reading an input): raised inside an ``atomic_open`` block they name the output
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def output_error(path: Path | str, exc: OSError) -> OutputError:
    """One line naming the output and the cause (``No space left on device``, ``Is a directory``, ...)."""
    where = exc.filename if isinstance(exc.filename, str) and exc.filename else str(path)
    if os.path.basename(where).startswith(".") and where.endswith(".tmp"):
        where = str(path)  # our temp file: name the output it stands for
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"{printable_path(where)}: cannot write ({reason})")


def _temp_beside(path: Path) -> tuple[int, str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        check_output_file(path, overwrite=True)  # a clearer cause where there is one (missing folder, ...)
        raise output_error(path, exc) from exc
    _default_mode(fd)
    return fd, tmp


def _finish(tmp: str, path: Path) -> None:
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(path, exc) from exc


@contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success it is fsynced and renamed over ``path``. A write that
    fails (disk full, read-only, ...) is an :class:`OutputError` naming ``path``; the old file stays whole."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            try:
                yield fh
            except OSError as exc:
                if exc.errno in WRITE_ERRNOS:  # e.g. a write into fh on a full disk
                    raise output_error(path, exc) from exc
                raise
            try:
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as exc:
                raise output_error(path, exc) from exc
        _finish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _output_mode() -> int:
    """The one permission rule for every output (predictions, manifests, reports, checkpoints): what a plain
    open() gives, 0666 & ~umask (0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _default_mode(fd: int) -> None:
    """mkstemp makes 0600 files; outputs get :func:`_output_mode`."""
    os.fchmod(fd, _output_mode())


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """For libraries that insist on writing to a path themselves: they write a temp path, we rename."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        try:
            writer(Path(tmp))
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise output_error(path, exc) from exc
            raise
        os.chmod(tmp, _output_mode())  # the library may have made its own file (safetensors: 0600)
        _finish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def refuse_overwrite(path: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(
            f"{printable_path(str(path))}: already exists; refusing to overwrite it (pass {flag} to replace it)"
        )


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: Path | str, overwrite: bool, flag: str = "--out") -> Path:
    """Before any work: ``path`` can be written as a file. An :class:`OutputError` (exit 1) when it is a
    folder, its folder does not exist or is a file, or the folder cannot be written; an
    :class:`OutputExistsError` (exit 2) when it exists and ``overwrite`` is false."""
    path = Path(path)
    shown = printable_path(str(path))
    if path.is_dir():
        raise OutputError(f"{shown}: is a folder; {flag} names the file to write")
    refuse_overwrite(path, overwrite)
    parent = path.parent
    if not parent.is_dir():
        found = _nearest_existing(parent)
        if os.path.lexists(found) and not found.is_dir():
            raise OutputError(
                f"{shown}: cannot write there: {printable_path(str(found))} is a file, not a folder"
            )
        raise OutputError(
            f"{shown}: the folder {printable_path(str(parent))} does not exist (create it first)"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write (no permission to write in {printable_path(str(parent))})")
    return path


def check_output_folder(path: Path | str, flag: str = "--out") -> Path:
    """Before any work: ``path`` is a folder, or one that can be made (missing parents are made too). An
    :class:`OutputError` (exit 1) when it, or the nearest existing folder above it, is a file or not writable."""
    path = Path(path)
    shown = printable_path(str(path))
    found = _nearest_existing(path)
    if os.path.lexists(found) and not found.is_dir():
        what = "is a file" if found == path else f"cannot be made: {printable_path(str(found))} is a file"
        raise OutputError(f"{shown}: {what}; {flag} names an output folder")
    if not os.access(found, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write (no permission to write in {printable_path(str(found))})")
    return path


def json_safe(obj: Any) -> Any:
    """NaN / inf become None (JSON has no NaN); numpy scalars and arrays become Python values; mappings get
    string keys; anything else that JSON cannot hold becomes its ``str``."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def printable_path(path: str) -> str:
    """A path (or a message holding one) for a terminal or log: :func:`xraydx.errors.printable` (bytes that
    are not UTF-8 and control characters as \\xNN; never a crash on print)."""
    return printable(path)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|infinity|nan)", re.IGNORECASE)


def csv_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula: text starting with = + - @ TAB or CR (also after
    leading ``'``) gets a leading ``'``; numbers and non-text values are returned unchanged."""
    if not isinstance(value, str) or not value.lstrip("'").startswith(_FORMULA_START):
        return value
    if value[0] != "'" and _NUMBER.fullmatch(value):
        return value
    return "'" + value


def csv_unescape(cell: str) -> str:
    """The value :func:`csv_cell` escaped (the leading ``'`` removed where it added one)."""
    if cell.startswith("'") and cell.lstrip("'").startswith(_FORMULA_START):
        return cell[1:]
    return cell


class _SafeWriter:
    """A ``csv.writer`` whose cells go through :func:`csv_cell`."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self.dialect = writer.dialect

    def writerow(self, row: Any) -> Any:
        return self._writer.writerow([csv_cell(v) for v in row])

    def writerows(self, rows: Any) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(fh: Any, **kwargs: Any) -> Any:
    """``csv.writer(fh, **kwargs)`` with every cell escaped by :func:`csv_cell`: the one way xraydx writes CSV."""
    return _SafeWriter(csv.writer(fh, **kwargs))


class CsvDictWriter(csv.DictWriter):  # type: ignore[type-arg]
    """``csv.DictWriter`` with every cell escaped by :func:`csv_cell`."""

    def __init__(self, fh: Any, fieldnames: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(fh, fieldnames, *args, **kwargs)
        self.writer = _SafeWriter(self.writer)
