"""Walking a dataset's folders: sorted, hidden and system entries ignored, symlink loops ended.

Folders and files whose names start with ``.``, ``__MACOSX``, ``Thumbs.db`` and ``desktop.ini`` are
ignored; symlinked folders are followed once (visited real paths are tracked, so loops end); file
names that are not valid UTF-8 are kept (surrogate escapes). Problems are recorded, not raised.

Some problems lose data: a folder that cannot be listed, a symbolic-link loop (``ELOOP``), a FIFO,
socket or device where a file was expected. Their reasons start with one of :data:`LOSS_REASONS`;
:func:`is_loss` tells them apart from entries left out on purpose, and ``data inspect`` ends with exit
code 3 when there is one.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from xraydx.data.records import _norm

_IGNORED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})

CANNOT_LIST = "cannot list folder"
LINK_LOOP = "symbolic link loop"
NOT_REGULAR = "not a regular file"
#: The reasons of skipped entries whose data could not be read (see :func:`is_loss`).
LOSS_REASONS: tuple[str, ...] = (CANNOT_LIST, LINK_LOOP, NOT_REGULAR)


def is_loss(reason: str) -> bool:
    """Whether a skipped entry's reason says that data could not be read (not a choice to leave it out)."""
    return reason.startswith(LOSS_REASONS)


def extensionless(name: str) -> bool:
    """No suffix, or an all-digit one (``IM000001``, ``1.2.840.10008.5``): the names a PACS export uses;
    such files are images when their content says so (DICOM with or without its preamble, PNG, ...)."""
    suffix = os.path.splitext(name)[1]
    return suffix == "" or suffix[1:].isdigit()


def os_reason(exc: OSError) -> str:
    """An OS error in words; a symbolic-link loop is named as one."""
    if exc.errno == errno.ELOOP:
        return f"{LINK_LOOP} ({exc.strerror})"
    return exc.strerror or str(exc)


def _special_kind(path: str) -> str:
    """``not a regular file (FIFO)`` and the like, for an entry that is neither file nor folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return NOT_REGULAR
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
                       (stat.S_ISBLK, "device")):  # fmt: skip
        if test(mode):
            return f"{NOT_REGULAR} ({kind})"
    return NOT_REGULAR


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _subdirs(d: Path, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Visible sub-folders of ``d`` (symlinks followed), sorted by name; a listing that fails, and entries
    that cannot be looked at (a link loop), are recorded in ``skipped`` where given."""
    out = []
    try:
        with os.scandir(d) as it:
            entries = list(it)
    except OSError as exc:
        if skipped is not None:
            skipped.append((os.fspath(d), f"{CANNOT_LIST} ({os_reason(exc)})"))
        return []
    for e in entries:
        if _ignored(e.name):
            continue
        try:
            if e.is_dir():
                out.append(Path(e.path))
        except OSError as exc:
            if skipped is not None:
                skipped.append((e.path, os_reason(exc)))
            continue
    return sorted(out, key=lambda p: p.name)


def _child_dir(d: Path, names: Iterable[str]) -> Path | None:
    """The first sub-folder of ``d`` whose normalised name is in ``names`` (in that order)."""
    by_name = {_norm(p.name): p for p in _subdirs(d)}
    for n in names:
        if n in by_name:
            return by_name[n]
    return None


def _top_files(d: Path) -> list[Path]:
    try:
        with os.scandir(d) as it:
            entries = list(it)
    except OSError:
        return []  # _subdirs of the same folder records that it cannot be listed
    out = []
    for e in entries:
        try:
            if not _ignored(e.name) and e.is_file():
                out.append(Path(e.path))
        except OSError:
            continue  # a link loop: recorded by _subdirs of the same folder
    return sorted(out)


class _Walker:
    """Recursive file listing that records problems instead of raising.

    Each real folder is entered once.  A symlinked folder met while walking is not followed
    when it points into the dataset root or to one of its parents (its files are collected
    where they really are, and a link to a parent would be a loop); links to folders outside
    the root are followed.
    """

    def __init__(self, skipped: list[tuple[str, str]], root: Path) -> None:
        self.visited: set[str] = set()
        self.skipped = skipped
        self.root_real = os.path.realpath(root)

    def _inside_or_above_root(self, real: str) -> bool:
        try:
            common = os.path.commonpath([real, self.root_real])
        except ValueError:
            return False
        return common in (real, self.root_real)

    def files(self, top: Path) -> Iterator[Path]:
        stack = [top]
        while stack:
            d = stack.pop()
            real = os.path.realpath(d)
            if real in self.visited:
                continue
            self.visited.add(real)
            try:
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                self.skipped.append((os.fspath(d), f"{CANNOT_LIST} ({os_reason(exc)})"))
                continue
            subdirs = []
            for e in entries:
                if _ignored(e.name):
                    continue
                try:
                    is_dir = e.is_dir()
                    is_file = not is_dir and e.is_file()
                    is_link = e.is_symlink()
                except OSError as exc:  # a link loop (ELOOP), an I/O error
                    self.skipped.append((e.path, os_reason(exc)))
                    continue
                if is_dir:
                    if is_link:
                        target = os.path.realpath(e.path)
                        if target in self.visited or self._inside_or_above_root(target):
                            self.skipped.append(
                                (
                                    e.path,
                                    "symlinked folder pointing inside the dataset or to a parent; not followed",
                                )
                            )
                            continue
                    subdirs.append(Path(e.path))
                elif is_file:
                    yield Path(e.path)
                elif is_link and not os.path.exists(e.path):
                    self.skipped.append((e.path, "broken symbolic link"))
                else:  # a FIFO, socket or device (or a link to one)
                    self.skipped.append((e.path, _special_kind(e.path)))
            stack.extend(reversed(subdirs))
