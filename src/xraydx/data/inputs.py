"""The inputs of ``predict``, ``explain`` and ``segment``: files, folders and list files -> image paths.

:func:`expand_inputs` returns the paths to read and the *problems*: inputs that cannot be read, each
with its reason, which the caller reports as an error row (so the command ends with exit code 3) and on
stderr. Nothing found is left out without a word. The rules:

* A **file** given by name is read whatever its name (the format is sniffed from the content).
* A **list file** (``.txt``, ``.lst``, ``.list``) holds one path per line (``#`` comments, paths
  relative to the list's folder). Its content is sniffed first: an image named ``.txt`` is read as the
  image; binary content that is not an image is a problem, not 562 lines of paths.
* A **folder** is walked recursively, sorted; names starting with ``.``, ``__MACOSX``, ``Thumbs.db`` and
  ``desktop.ini`` are ignored. Taken: files with an image suffix (:data:`xraydx.io_formats.SUPPORTED_SUFFIXES`),
  and files without one (no suffix, or an all-digit one as in ``IM000001`` or a UID-named
  ``1.2.840.1234.5``) whose content is an image: DICOM with or without its preamble (PACS exports),
  PNG, JPEG, ... An extensionless file that is not an image is a problem (``not read: ...`` and why);
  files with another suffix (``.txt``, ``.csv``, ``.json``, ...) are not images and are left alone.
  ``DICOMDIR`` (a DICOM index, no pixels) is left out, counted in the notes.
* A folder that **cannot be listed** (permission denied, I/O error), a **symbolic-link loop** (``ELOOP``)
  and a **FIFO, socket or device** without an image suffix are problems. A symlinked folder that leads
  to a folder already walked is not walked twice (its images are there already; counted in the notes).
* **Mask folders** of a known layout (``lung masks`` / ``masks`` / ``infection masks`` beside an
  ``images`` folder: COVID-QU-Ex, the COVID-19 Radiography Database) are not walked: their PNGs are
  masks, not X-rays. How many files were left out is in the notes. Name a mask folder itself to
  predict it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from xraydx.data.layouts import is_mask_folder
from xraydx.data.walk import _ignored, _special_kind, extensionless, os_reason
from xraydx.errors import UsageError, printable
from xraydx.io_formats import TEXT_REASON, is_image_path, sniff_file

__all__ = ["LIST_SUFFIXES", "expand_inputs", "refuse_inputs_as_outputs"]

LIST_SUFFIXES = (".txt", ".lst", ".list")

Problems = list[tuple[Path, str]]


def expand_inputs(
    inputs: Sequence[str | os.PathLike[str]], notes: list[str] | None = None
) -> tuple[list[Path], Problems]:
    """``(paths, problems)`` for files, folders and list files (see the module docstring); ``notes``, where
    given, gets one line per kind of thing left out on purpose (mask folders, DICOMDIR, folders reached
    twice), with counts."""
    paths: list[Path] = []
    problems: Problems = []
    walker = _FolderWalk()
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found, trouble = walker.walk(p)
            paths.extend(found)
            problems.extend(trouble)
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            _list_file(p, paths, problems)
        elif p.exists() or p.is_symlink():
            paths.append(p)  # read_image names what is wrong with it (a loop, a FIFO, ...)
        else:
            problems.append((p, "file not found"))
    if notes is not None:
        notes.extend(walker.notes())
    return paths, problems


def refuse_inputs_as_outputs(
    inputs: Sequence[str | os.PathLike[str]], paths: Sequence[Path], out: Path, heatmaps: str | None = None
) -> None:
    """A UsageError where ``--out`` is one of the inputs (``--overwrite`` would replace an X-ray), or where
    ``--heatmaps`` is, or is inside, an input folder or the folder of an input file (the next run over
    that folder would predict the overlays as X-rays)."""
    given = {os.path.realpath(p) for p in [*inputs, *paths]}
    if os.path.realpath(out) in given:
        raise UsageError(f"{printable(out)}: --out is one of the inputs; write the predictions elsewhere")
    if heatmaps:
        h = os.path.realpath(heatmaps)
        folders = {os.path.realpath(p) for p in inputs if os.path.isdir(p)}
        folders |= {os.path.dirname(os.path.realpath(p)) for p in paths}
        inside = next((f for f in sorted(folders) if h == f or h.startswith(f.rstrip(os.sep) + os.sep)), None)
        if inside is not None:
            raise UsageError(
                f"{printable(heatmaps)}: --heatmaps is inside the input folder {printable(inside)}; the overlays"
                " would be read as X-rays next time: choose a folder outside the inputs"
            )


def _list_file(p: Path, paths: list[Path], problems: Problems) -> None:
    fmt, why = sniff_file(p)
    if fmt is not None:  # an image named .txt: the image, not a list of paths
        paths.append(p)
        return
    if why != TEXT_REASON and not why.startswith("empty file"):
        problems.append((p, f"not read as a list file: {why}"))
        return
    try:
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        problems.append((p, f"cannot read list file ({os_reason(exc)})"))
        return
    base = p.parent
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            q = Path(line)
            paths.append(q if q.is_absolute() else base / q)


class _FolderWalk:
    """Recursive listing of folders for prediction; what it leaves out is counted for :meth:`notes`."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.twice = 0
        self.mask_folders: list[Path] = []
        self.mask_files = 0
        self.dicomdirs = 0

    def notes(self) -> list[str]:
        out = []
        if self.mask_folders:
            names = sorted({p.name for p in self.mask_folders})
            out.append(
                f"left out {self.mask_files} files in {len(self.mask_folders)} mask folders"
                f" ({', '.join(names)} beside images/: masks of a COVID-QU-Ex or Radiography DB layout, not"
                " X-rays); name a mask folder itself to predict it"
            )
        if self.dicomdirs:
            out.append(f"left out {self.dicomdirs} DICOMDIR files (DICOM indexes, no image)")
        if self.twice:
            out.append(f"{self.twice} symlinked folders lead to folders already walked; not walked twice")
        return out

    def walk(self, root: Path) -> tuple[list[Path], Problems]:
        found: list[Path] = []
        problems: Problems = []
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                st = d.stat()
                key = (st.st_dev, st.st_ino)
                if key in self.seen:
                    self.twice += d != root
                    continue
                self.seen.add(key)
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                problems.append((d, f"cannot list folder ({os_reason(exc)})"))
                continue
            for e in entries:
                if _ignored(e.name):
                    continue
                self._entry(e, stack, found, problems)
        return sorted(found), sorted(problems)

    def _entry(self, e: os.DirEntry[str], stack: list[Path], found: list[Path], problems: Problems) -> None:
        p = Path(e.path)
        try:
            is_dir = e.is_dir()
            is_file = not is_dir and e.is_file()
        except OSError as exc:  # ELOOP: a link that leads to itself (a file or a folder: cannot tell)
            problems.append((p, os_reason(exc)))
            return
        if is_dir:
            if is_mask_folder(p):
                self.mask_folders.append(p)
                self.mask_files += sum(len(files) for _, _, files in os.walk(p))
            else:
                stack.append(p)
        elif is_image_path(e.name):
            found.append(p)  # read_image names what is wrong with it (FIFO, broken link, ...)
        elif not extensionless(e.name):
            return  # another kind of file (.txt, .csv, .json, ...): not an image
        elif e.name.upper() == "DICOMDIR":
            self.dicomdirs += 1
        elif not is_file:
            why = (
                "broken symbolic link" if e.is_symlink() and not os.path.exists(p) else _special_kind(e.path)
            )
            problems.append((p, f"not read: {why}"))
        else:
            fmt, why = sniff_file(p)
            if fmt is not None:
                found.append(p)
            else:
                problems.append((p, f"not read: no image file suffix, and {why}"))
