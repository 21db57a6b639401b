"""Walking a dataset's folders: sorted, hidden and system entries ignored, symlink loops ended.

Folders and files whose names start with ``.``, ``__MACOSX``, ``Thumbs.db`` and ``desktop.ini`` are
ignored; symlinked folders are followed once (visited real paths are tracked, so loops end); file
names that are not valid UTF-8 are kept (surrogate escapes). Problems are recorded, not raised.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from xraydx.data.records import _norm

_IGNORED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _subdirs(d: Path) -> list[Path]:
    """Visible sub-folders of ``d`` (symlinks followed), sorted by name."""
    out = []
    try:
        with os.scandir(d) as it:
            entries = list(it)
    except OSError:
        return []
    for e in entries:
        if _ignored(e.name):
            continue
        try:
            if e.is_dir():
                out.append(Path(e.path))
        except OSError:
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
            return sorted(Path(e.path) for e in it if not _ignored(e.name) and e.is_file())
    except OSError:
        return []


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
                self.skipped.append((os.fspath(d), f"cannot list folder ({exc.strerror or exc})"))
                continue
            subdirs = []
            for e in entries:
                if _ignored(e.name):
                    continue
                try:
                    is_dir = e.is_dir()
                    is_file = not is_dir and e.is_file()
                    is_link = e.is_symlink()
                except OSError:
                    is_dir = is_file = is_link = False
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
                elif is_link:
                    self.skipped.append((e.path, "broken symbolic link"))
            stack.extend(reversed(subdirs))
