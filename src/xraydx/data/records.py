"""Records and manifests: one row per image (path, label, split, group, source, mask), and the names
they use.

Labels and splits are normalised (lower case; runs of ``-``, ``_`` and spaces become ``_``) and mapped
through :data:`CLASS_ALIASES` and :data:`SPLIT_ALIASES`. :meth:`Manifest.to_csv` writes
``path,label,split,group,source,mask`` atomically, paths inside the CSV's folder relative to it.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from xraydx.constants import ALL_SPLITS, CLASSES, SPLITS
from xraydx.fsutil import atomic_open, csv_writer

__all__ = [
    "CLASS_ALIASES",
    "SPLIT_ALIASES",
    "Manifest",
    "Record",
    "normalize_label",
    "normalize_split",
]

#: Folder names / label values (normalised: lower case, runs of ``-``, ``_``, space → ``_``).
CLASS_ALIASES: dict[str, str] = {
    "covid": "covid",
    "covid_19": "covid",
    "covid19": "covid",
    "covid_positive": "covid",
    "sars_cov_2": "covid",
    "non_covid": "non_covid",
    "noncovid": "non_covid",
    "non_covid_19": "non_covid",
    "non_covid19": "non_covid",
    "pneumonia": "non_covid",
    "viral_pneumonia": "non_covid",
    "bacterial_pneumonia": "non_covid",
    "viral": "non_covid",
    "bacterial": "non_covid",
    "bacteria": "non_covid",
    "virus": "non_covid",
    "other_pneumonia": "non_covid",
    "lung_opacity": "non_covid",
    "normal": "normal",
    "healthy": "normal",
    "no_finding": "normal",
    "no_findings": "normal",
}

SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "external": "external",
}


# ---- names ---------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip().lower()).strip("_")


def normalize_label(value: str) -> str | None:
    """Map a folder name or label value to one of :data:`CLASSES` (``None`` if unknown)."""
    return CLASS_ALIASES.get(_norm(value))


def normalize_split(value: str) -> str | None:
    """Map a folder name or split value to one of :data:`SPLITS` (``None`` if unknown)."""
    return SPLIT_ALIASES.get(_norm(value))


def _show(p: str | os.PathLike[str]) -> str:
    """A printable version of a path (undecodable bytes shown as U+FFFD)."""
    return os.fsdecode(p).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ---- records and manifests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    path: Path  # absolute
    label: str  # one of CLASSES
    split: str  # train | val | test
    group: str  # patient id; defaults to the file's path relative to root
    source: str = ""  # collection / hospital where known
    mask: Path | None = None  # lung mask file where the dataset has one


def _sort_key(r: Record) -> tuple[int, int, str]:
    return (ALL_SPLITS.index(r.split), CLASSES.index(r.label), os.fspath(r.path))


@dataclass
class Manifest:
    root: Path
    layout: str
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Record]:
        if name not in ALL_SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(ALL_SPLITS)}")
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {s: dict.fromkeys(CLASSES, 0) for s in SPLITS}
        for r in self.records:
            out.setdefault(r.split, dict.fromkeys(CLASSES, 0))[r.label] += 1
        return out

    def to_csv(self, path: Path) -> None:
        """Write ``path,label,split,group,source,mask`` atomically (temp file + ``os.replace``).

        Paths inside the CSV's folder are written relative to it (POSIX separators), others
        absolute.
        """
        path = Path(path)
        base = Path(os.path.abspath(path.parent))
        buf = io.StringIO()
        writer = csv_writer(buf, lineterminator="\n")
        writer.writerow(["path", "label", "split", "group", "source", "mask"])
        for r in self.records:
            mask = "" if r.mask is None else _rel_or_abs(r.mask, base)
            writer.writerow([_rel_or_abs(r.path, base), r.label, r.split, r.group, r.source, mask])
        with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            fh.write(buf.getvalue())

    @classmethod
    def from_csv(cls, path: Path) -> Manifest:
        """Load a CSV manifest (e.g. one written by :meth:`to_csv`); same rules as :func:`discover`."""
        from xraydx.data.manifest import read_csv_manifest  # manifest.py builds on this module

        return read_csv_manifest(Path(path))


def _rel_or_abs(p: Path, base: Path) -> str:
    p = Path(os.path.abspath(p))
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return os.fspath(p)
