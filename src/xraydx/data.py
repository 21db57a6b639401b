"""Find chest X-ray datasets on disk, turn them into one manifest, and inspect them.

:func:`discover` recognises these layouts (folder names are matched case-insensitively, with
``-``, ``_`` and spaces treated alike):

``covid-qu-ex``
    COVID-QU-Ex: ``Lung Segmentation Data/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/images``
    with lung masks of the same file name in the sibling ``lung masks`` folder; also
    ``Infection Segmentation Data`` (same structure; its ``lung masks`` are used, its
    ``infection masks`` ignored).  The path may be the dataset root, a folder above it (Kaggle
    unzips repeat the outer folder: ``archive/COVID-QU-Ex/...``), or one part folder itself.
    When both parts are present, Lung Segmentation Data (the full set) is used.  There are no
    patient ids in COVID-QU-Ex: ``group`` is the file stem.
``radiography-db``
    COVID-19 Radiography Database: ``COVID``, ``Lung_Opacity``, ``Viral Pneumonia``,
    ``Normal``, each with ``images/`` (and ``masks/``), or the older release with images
    directly in the class folders.  COVID→covid, Lung_Opacity and Viral Pneumonia→non_covid,
    Normal→normal.  No splits: test and val are made (see below).
``split-class-folders`` / ``class-folders``
    ``{covid,non_covid,normal}/`` (names through :data:`CLASS_ALIASES`), with or without
    ``{train,val,test}/`` parents (:data:`SPLIT_ALIASES`); image files are collected
    recursively.  A class folder that has an ``images/`` sub-folder is read like the
    Radiography DB (``masks/`` or ``lung masks/`` beside it give the masks).
``csv``
    A ``.csv`` file, or a folder with ``manifest.csv``; columns through
    :data:`CSV_COLUMN_ALIASES` (``path`` and ``label`` required; ``split``, ``group``,
    ``source``, ``mask`` optional), paths relative to the CSV's folder.

For ``csv`` and the class-folder layouts, when there is no source column, a file name of the
form ``<source>__<name>`` (as in the cxr3 development set) gives ``source = <source>``.

Missing splits are made from ``train`` with scikit-learn's ``StratifiedGroupKFold`` (one fold
taken out; stratified by class; every group on one side; seeded): first ``test`` when there is
none, then ``val``.  ``val_fraction``/``test_fraction`` are fractions of the images that were
in ``train`` before any split was made; the fold count is ``round(1 / fraction)`` of the pool
it is cut from, so the result is close to, not exactly, the fraction.

Folders and files whose names start with ``.``, ``__MACOSX``, ``Thumbs.db`` and
``desktop.ini`` are ignored; symlinked folders are followed once (visited real paths are
tracked, so loops end); file names that are not valid UTF-8 are kept (surrogate escapes).

:func:`inspect` reads every image through :func:`xraydx.io.read_image` and reports unreadable
files, exact duplicates (SHA-1 of the decoded pixels and their shape, so a PNG re-saved with
other settings still matches), near duplicates, duplicates across splits, patient groups in
more than one split and missing masks.  "Near duplicate" means: the mean absolute difference
of the two images' 16x16 box-averaged grayscale thumbnails is at most
:data:`NEAR_DUPLICATE_MAD` (0–255 scale).  A 64-bit difference hash was tried first and is not
used: on the 4200 distinct cxr3 images it gave 112 pairs of *different* radiographs an
identical hash (chest X-rays look alike at 9x8 pixels), while a JPEG q95 re-save or a resize
moved it by up to 4 bits.  The thumbnail distance of those re-saves/resizes is at most about
1.1, that of distinct cxr3 images at least 6.1.  The search is exact: images are sorted by
thumbnail mean and only pairs whose mean and 4x4 thumbnails (both lower bounds of the 16x16
distance) are close enough are compared in full.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from xraydx.constants import ALL_SPLITS, CLASSES, SPLITS
from xraydx.errors import DatasetError
from xraydx.fsutil import atomic_open
from xraydx.io import ImageReadError, is_image_path, read_image

__all__ = [
    "CLASSES",
    "CLASS_ALIASES",
    "CSV_COLUMN_ALIASES",
    "LAYOUTS",
    "NEAR_DUPLICATE_MAD",
    "SPLITS",
    "SPLIT_ALIASES",
    "DatasetError",
    "InspectReport",
    "Manifest",
    "Record",
    "discover",
    "format_report",
    "inspect",
    "normalize_label",
    "normalize_split",
]

LAYOUTS: tuple[str, ...] = ("covid-qu-ex", "radiography-db", "class-folders", "split-class-folders", "csv")

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

#: Canonical CSV column -> accepted header names (normalised), in order of preference.
CSV_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "path": ("path", "file", "filename", "file_name", "image", "image_path", "filepath", "file_path"),
    "label": ("label", "class", "target"),
    "split": ("split", "subset", "fold_name"),
    "group": ("group", "patient_group", "patient", "patient_id", "patientid", "subject", "subject_id"),
    "source": ("source", "site", "hospital", "dataset"),
    "mask": ("mask", "mask_path", "lung_mask"),
}

#: Near-duplicate threshold: mean absolute difference of 16x16 thumbnails (0–255 scale).
NEAR_DUPLICATE_MAD: float = 4.0

_IGNORED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
_QU_PARTS: dict[str, str] = {
    "lung_segmentation_data": "Lung Segmentation Data",
    "infection_segmentation_data": "Infection Segmentation Data",
}
_RDB_FOLDERS = frozenset({"covid", "lung_opacity", "viral_pneumonia", "normal"})
_MASK_DIRS: tuple[str, ...] = ("lung_masks", "masks", "mask", "lung_mask")
_IGNORED_MASK_DIRS = frozenset({"infection_masks", "infection_mask"})
_MAX_DEPTH = 4
_THUMB = 16


# --------------------------------------------------------------------------------------------
# Records and manifests
# --------------------------------------------------------------------------------------------


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
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "label", "split", "group", "source", "mask"])
        for r in self.records:
            mask = "" if r.mask is None else _rel_or_abs(r.mask, base)
            writer.writerow([_rel_or_abs(r.path, base), r.label, r.split, r.group, r.source, mask])
        with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            fh.write(buf.getvalue())

    @classmethod
    def from_csv(cls, path: Path) -> Manifest:
        """Load a CSV manifest (e.g. one written by :meth:`to_csv`); same rules as :func:`discover`."""
        return _load_csv(Path(path), val_fraction=0.15, test_fraction=0.15, seed=0)


def _rel_or_abs(p: Path, base: Path) -> str:
    p = Path(os.path.abspath(p))
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return os.fspath(p)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip().lower()).strip("_")


def normalize_label(value: str) -> str | None:
    """Map a folder name or label value to one of :data:`CLASSES` (``None`` if unknown)."""
    return CLASS_ALIASES.get(_norm(value))


def normalize_split(value: str) -> str | None:
    """Map a folder name or split value to one of :data:`SPLITS` (``None`` if unknown)."""
    return SPLIT_ALIASES.get(_norm(value))


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _source_from_name(name: str) -> str:
    return name.split("__", 1)[0] if "__" in name[1:] else ""


def _show(p: str | os.PathLike[str]) -> str:
    """A printable version of a path (undecodable bytes shown as U+FFFD)."""
    return os.fsdecode(p).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# File system walking
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    layout: str
    root: Path
    csv: Path | None = None
    qu_parts: dict[str, Path] = field(default_factory=dict)  # part name -> split root


def _class_dirs(d: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    for sub in _subdirs(d):
        label = normalize_label(sub.name)
        if label is not None:
            out[label].append(sub)
    return out


def _split_dirs(d: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    for sub in _subdirs(d):
        split = normalize_split(sub.name)
        if split is not None:
            out[split].append(sub)
    return out


def _is_qu_split_root(d: Path) -> bool:
    for dirs in _split_dirs(d).values():
        for sd in dirs:
            for cdirs in _class_dirs(sd).values():
                if any(_child_dir(c, ("images",)) is not None for c in cdirs):
                    return True
    return False


def _qu_part_root(d: Path, depth: int = 0) -> Path | None:
    if _is_qu_split_root(d):
        return d
    subs = _subdirs(d)
    if depth < 3 and len(subs) == 1:
        return _qu_part_root(subs[0], depth + 1)
    return None


def _match(d: Path) -> _Plan | None:
    try:
        with os.scandir(d) as it:
            names = {
                e.name.lower(): Path(e.path) for e in it if e.name.lower() == "manifest.csv" and e.is_file()
            }
    except OSError:
        names = {}
    if "manifest.csv" in names:
        return _Plan("csv", d, csv=names["manifest.csv"])

    parts: dict[str, Path] = {}
    for sub in _subdirs(d):
        key = _norm(sub.name)
        if key in _QU_PARTS:
            root = _qu_part_root(sub)
            if root is not None:
                parts[_QU_PARTS[key]] = root
    if not parts and _is_qu_split_root(d):
        name = _norm(d.name)
        parts[_QU_PARTS.get(name, "Lung Segmentation Data")] = d
    if parts:
        return _Plan("covid-qu-ex", d, qu_parts=parts)

    subs = {_norm(s.name): s for s in _subdirs(d)}
    rdb = _RDB_FOLDERS & subs.keys()
    if len(rdb) >= 2 and (
        {"lung_opacity", "viral_pneumonia"} & rdb or any(_child_dir(subs[n], ("images",)) for n in rdb)
    ):
        return _Plan("radiography-db", d)

    splits = _split_dirs(d)
    if splits:
        labels = {lab for dirs in splits.values() for sd in dirs for lab in _class_dirs(sd)}
        if len(labels) >= 2:
            return _Plan("split-class-folders", d)

    if len(_class_dirs(d)) >= 2:
        return _Plan("class-folders", d)
    return None


def _find_plan(top: Path) -> _Plan:
    level = [top]
    seen: set[str] = set()
    for _depth in range(_MAX_DEPTH + 1):
        found = []
        nxt = []
        for d in level:
            real = os.path.realpath(d)
            if real in seen:
                continue
            seen.add(real)
            plan = _match(d)
            if plan is not None:
                found.append(plan)
            else:
                nxt.extend(_subdirs(d))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listing = "; ".join(f"{_show(p.root)} ({p.layout})" for p in found)
            raise DatasetError(f"{_show(top)}: several datasets found, pass one of them: {listing}")
        level = nxt
        if not level:
            break
    seen_names = ", ".join(_show(p.name) for p in _subdirs(top)[:12]) or "no sub-folders"
    raise DatasetError(
        f"{_show(top)}: no supported dataset layout found within {_MAX_DEPTH} folder levels "
        f"(looked for manifest.csv; COVID-QU-Ex 'Lung Segmentation Data' / 'Infection Segmentation Data'; "
        f"COVID-19 Radiography Database folders COVID, Lung_Opacity, Viral Pneumonia, Normal; "
        f"at least two of the class folders {', '.join(CLASSES)} (or aliases), with or without "
        f"train/val/test parents). Found: {seen_names}"
    )


# --------------------------------------------------------------------------------------------
# Folder layouts
# --------------------------------------------------------------------------------------------


class _Collector:
    def __init__(self, root: Path, layout: str) -> None:
        self.root = root
        self.layout = layout
        self.records: list[Record] = []
        self.skipped: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.walker = _Walker(self.skipped, root)
        self.class_folders: dict[str, list[Path]] = defaultdict(list)
        self.unassigned: list[Record] = []  # no split known yet

    def _group(self, f: Path) -> str:
        if self.layout == "covid-qu-ex":
            return f.stem
        try:
            return f.relative_to(self.root).as_posix()
        except ValueError:
            return os.fspath(f)

    def _source(self, f: Path) -> str:
        if self.layout in ("class-folders", "split-class-folders"):
            return _source_from_name(f.name)
        return ""

    def class_dir(self, d: Path, label: str, split: str | None) -> None:
        """Collect every image under one class folder."""
        self.class_folders[label].append(d)
        images = _child_dir(d, ("images",))
        mask_dir = None
        if images is not None:
            mask_dir = _child_dir(d, _MASK_DIRS)
            for sub in _subdirs(d):
                if sub not in (images, mask_dir) and _norm(sub.name) not in _IGNORED_MASK_DIRS:
                    self.skipped.append((os.fspath(sub), "folder beside images/ not used"))
        masks: dict[str, Path] = {}
        if mask_dir is not None:
            for m in _Walker([], self.root).files(mask_dir):
                masks[m.relative_to(mask_dir).as_posix()] = m
        top = images if images is not None else d
        for f in self.walker.files(top):
            if not is_image_path(f):
                self.skipped.append((os.fspath(f), f"not an image file (suffix {f.suffix or 'none'!r})"))
                continue
            mask = masks.get(f.relative_to(top).as_posix()) if masks else None
            rec = Record(
                path=Path(os.path.abspath(f)),
                label=label,
                split=split or "train",
                group=self._group(f),
                source=self._source(f),
                mask=None if mask is None else Path(os.path.abspath(mask)),
            )
            (self.records if split is not None else self.unassigned).append(rec)

    def classes_under(self, d: Path, split: str | None, *, unknown_reason: str) -> None:
        """Collect the class folders directly under ``d``; list the rest as skipped."""
        for sub in _subdirs(d):
            label = normalize_label(sub.name)
            if label is None:
                n = sum(1 for _ in _Walker([], self.root).files(sub))
                self.skipped.append((os.fspath(sub), f"{unknown_reason} ({n} files not used)"))
                continue
            self.class_dir(sub, label, split)
        for f in _top_files(d):
            if is_image_path(f):
                self.skipped.append((os.fspath(f), "image file not inside a class folder"))


def _top_files(d: Path) -> list[Path]:
    try:
        with os.scandir(d) as it:
            return sorted(Path(e.path) for e in it if not _ignored(e.name) and e.is_file())
    except OSError:
        return []


def _load_folders(plan: _Plan) -> _Collector:
    col = _Collector(plan.root, plan.layout)
    unknown = (
        "folder name is not a known class (covid, non_covid, normal or an alias such as COVID-19, "
        "pneumonia, healthy: see xraydx.data.CLASS_ALIASES)"
    )
    if plan.layout == "covid-qu-ex":
        if "Lung Segmentation Data" in plan.qu_parts and "Infection Segmentation Data" in plan.qu_parts:
            col.notes.append(
                "COVID-QU-Ex: both 'Lung Segmentation Data' and 'Infection Segmentation Data' found; "
                "using Lung Segmentation Data (the full 33,920-image set; Infection Segmentation Data "
                "is a subset of it)"
            )
            part = "Lung Segmentation Data"
        else:
            part = next(iter(plan.qu_parts))
            if part == "Infection Segmentation Data":
                col.notes.append(
                    "COVID-QU-Ex: only 'Infection Segmentation Data' found (a subset of the full "
                    "set); its lung masks are used, infection masks ignored"
                )
        _load_split_root(col, plan.qu_parts[part], unknown)
    elif plan.layout == "radiography-db":
        col.classes_under(plan.root, None, unknown_reason=unknown)
    elif plan.layout == "split-class-folders":
        _load_split_root(col, plan.root, unknown)
    else:
        col.classes_under(plan.root, None, unknown_reason=unknown)
    return col


def _load_split_root(col: _Collector, d: Path, unknown: str) -> None:
    for sub in _subdirs(d):
        split = normalize_split(sub.name)
        if split is None:
            col.skipped.append((os.fspath(sub), "folder name is not a split (train/val/test or an alias)"))
            continue
        col.classes_under(sub, split, unknown_reason=unknown)
    for f in _top_files(d):
        if is_image_path(f):
            col.skipped.append((os.fspath(f), "image file not inside a split/class folder"))


# --------------------------------------------------------------------------------------------
# CSV layout
# --------------------------------------------------------------------------------------------


def _resolve_columns(header: Sequence[str], path: Path) -> dict[str, int]:
    normed = [_norm(h.lstrip("\ufeff")) for h in header]
    cols: dict[str, int] = {}
    for canon, aliases in CSV_COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in normed:
                cols[canon] = normed.index(alias)
                break
    for required in ("path", "label"):
        if required not in cols:
            raise DatasetError(
                f"{_show(path)}: no {required} column (accepted names: "
                f"{', '.join(CSV_COLUMN_ALIASES[required])}); header is {', '.join(header)}"
            )
    return cols


def _resolve_file(raw: str, base: Path) -> Path:
    p = Path(raw)
    if not p.is_absolute():
        p = base / p
    if not os.path.lexists(p) and "\\" in raw:
        alt = Path(raw.replace("\\", "/"))
        p = alt if alt.is_absolute() else base / alt
    return Path(os.path.abspath(p))


def _read_csv_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            text = fh.read()
    except OSError as exc:
        raise DatasetError(f"{_show(path)}: cannot read CSV ({exc.strerror or exc})") from None
    try:
        dialect: Any = csv.Sniffer().sniff(text[:8192], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return [row for row in csv.reader(io.StringIO(text), dialect) if any(c.strip() for c in row)]


def _load_csv(
    path: Path, *, val_fraction: float, test_fraction: float, seed: int, require_all_classes: bool = True
) -> Manifest:
    path = Path(os.path.abspath(path))
    rows = _read_csv_rows(path)
    if not rows:
        raise DatasetError(f"{_show(path)}: empty CSV")
    header, body = rows[0], rows[1:]
    cols = _resolve_columns(header, path)
    base = path.parent
    col = _Collector(base, "csv")

    def cell(row: list[str], name: str) -> str:
        i = cols.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    has_split = "split" in cols and any(cell(r, "split") for r in body)
    if "split" in cols and not has_split:
        col.notes.append("the CSV's split column is empty in every row: treated as having no split")
    seen: set[str] = set()
    missing_masks = 0
    for lineno, row in enumerate(body, start=2):
        where = f"{_show(path)}:{lineno}"
        raw = cell(row, "path")
        if not raw:
            col.skipped.append((where, "empty path"))
            continue
        f = _resolve_file(raw, base)
        key = os.fspath(f)
        if key in seen:
            col.skipped.append((key, f"listed more than once in the CSV (line {lineno} ignored)"))
            continue
        seen.add(key)
        if not f.is_file():
            why = "is a folder" if f.is_dir() else "does not exist"
            col.skipped.append((key, f"listed in the CSV (line {lineno}) but the file {why}"))
            continue
        if not is_image_path(f):
            col.skipped.append((key, f"not an image file (suffix {f.suffix or 'none'!r})"))
            continue
        raw_label = cell(row, "label")
        label = normalize_label(raw_label)
        if label is None:
            col.skipped.append((key, f"unknown label {raw_label!r} (line {lineno})"))
            continue
        split: str | None = None
        if has_split:
            raw_split = cell(row, "split")
            split = normalize_split(raw_split)
            if split is None:
                col.skipped.append((key, f"unknown or empty split {raw_split!r} (line {lineno})"))
                continue
        group = cell(row, "group") or _rel_or_abs(f, base)
        source = cell(row, "source") if "source" in cols else _source_from_name(f.name)
        mask: Path | None = None
        raw_mask = cell(row, "mask")
        if raw_mask:
            mask = _resolve_file(raw_mask, base)
            if not mask.is_file():
                missing_masks += 1
                mask = None
        rec = Record(path=f, label=label, split=split or "train", group=group, source=source, mask=mask)
        (col.records if split is not None else col.unassigned).append(rec)
    if missing_masks:
        col.notes.append(f"{missing_masks} mask files named in the CSV do not exist (mask left empty)")
    if "source" not in cols and any(r.source for r in col.records + col.unassigned):
        col.notes.append("no source column: source taken from '<source>__<name>' file names")
    for lab in CLASSES:
        col.class_folders[lab] = []
    return _finish(
        col, path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        require_all_classes=require_all_classes,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _carve(pool: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record], int]:
    """Take about ``fraction`` of ``pool`` out: stratified by label, whole groups, seeded.

    Returns ``(kept, taken, n_folds)``; ``taken`` is empty when the pool is too small.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not pool or fraction <= 0:
        return pool, [], 0
    group_ids = {g: i for i, g in enumerate(sorted({r.group for r in pool}))}
    groups = np.array([group_ids[r.group] for r in pool])
    y = np.array([CLASSES.index(r.label) for r in pool])
    largest_class = int(np.bincount(y).max())
    k = min(max(2, round(1 / fraction)), len(group_ids), largest_class)
    if k < 2:
        return pool, [], 0
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, take_idx = next(sgkf.split(np.zeros(len(pool)), y, groups))
    take = set(take_idx.tolist())
    kept = [r for i, r in enumerate(pool) if i not in take]
    taken = [r for i, r in enumerate(pool) if i in take]
    return kept, taken, k


def _make_splits(
    records: list[Record], *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Record], list[str]]:
    notes: list[str] = []
    present = {r.split for r in records}
    if "train" not in present:
        notes.append("no train split in the data: no val/test split was made")
        return records, notes
    pool = sorted((r for r in records if r.split == "train"), key=_sort_key)
    others = [r for r in records if r.split != "train"]
    n0 = len(pool)
    test: list[Record] = []
    val: list[Record] = []
    cut_test = "test" not in present and test_fraction > 0
    if cut_test:
        pool, test, k = _carve(pool, test_fraction, seed)
        if test:
            notes.append(
                f"no test split in the data: made one from train ({len(test)} images, "
                f"{100 * len(test) / n0:.1f}%; asked {100 * test_fraction:g}%; stratified by class, "
                f"grouped by patient, StratifiedGroupKFold 1 of {k} folds, seed {seed})"
            )
        else:
            notes.append("no test split in the data and too few images/groups in train to make one")
    elif "test" not in present:
        notes.append("no test split in the data (test_fraction=0: none made)")
    if "val" not in present and val_fraction > 0:
        frac = val_fraction / (1 - test_fraction) if cut_test and test else val_fraction
        n1 = len(pool)
        pool, val, k = _carve(pool, min(frac, 0.5), seed)
        if val:
            notes.append(
                f"no val split in the data: made one from train ({len(val)} images, "
                f"{100 * len(val) / n0:.1f}% of the original train; asked {100 * val_fraction:g}%; "
                f"stratified by class, grouped by patient, StratifiedGroupKFold 1 of {k} folds of the "
                f"{n1} remaining, seed {seed})"
            )
        else:
            notes.append("no val split in the data and too few images/groups in train to make one")
    elif "val" not in present:
        notes.append("no val split in the data (val_fraction=0: none made)")
    out = others + pool + [replace(r, split="test") for r in test] + [replace(r, split="val") for r in val]
    return out, notes


def _finish(
    col: _Collector,
    where: Path,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    require_all_classes: bool = True,
) -> Manifest:
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= frac < 1:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction + test_fraction must be below 1")
    records = col.records
    if col.unassigned:
        if records:
            col.notes.append(f"{len(col.unassigned)} images without a split were put in train")
        records = records + col.unassigned
        if not col.records:
            col.notes.append("the data has no splits: all images start in train")
    counts = {lab: 0 for lab in CLASSES}
    for r in records:
        counts[r.label] += 1
    empty = [lab for lab in CLASSES if counts[lab] == 0]
    if empty and not require_all_classes and len(empty) < len(CLASSES):
        col.notes.append(f"no images of class {', '.join(empty)} (allowed for evaluation)")
        empty = []
    if empty:
        parts = []
        for lab in empty:
            folders = col.class_folders.get(lab) or []
            if folders:
                parts.append(
                    f"class {lab!r} has 0 images (folder(s) {', '.join(_show(f) for f in folders)} empty)"
                )
            elif col.layout == "csv":
                parts.append(f"class {lab!r} has 0 usable rows")
            else:
                parts.append(f"class {lab!r} has 0 images (no folder with a {lab} name)")
        hint = ""
        if col.skipped:
            hint = (
                f"; {len(col.skipped)} entries skipped, e.g. {_show(col.skipped[0][0])}: {col.skipped[0][1]}"
            )
        raise DatasetError(f"{_show(where)} ({col.layout}): " + "; ".join(parts) + hint)
    records, split_notes = _make_splits(
        records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    col.notes.extend(split_notes)
    records.sort(key=_sort_key)
    manifest = Manifest(
        root=Path(os.path.abspath(col.root)),
        layout=col.layout,
        records=records,
        skipped=sorted(col.skipped),
        notes=col.notes,
    )
    counts2 = manifest.counts()
    for s in SPLITS:
        if sum(counts2[s].values()) == 0:
            continue
        for lab in CLASSES:
            if counts2[s][lab] == 0:
                manifest.notes.append(f"split {s} has no images of class {lab}")
    n_masks = sum(r.mask is not None for r in records)
    if n_masks:
        manifest.notes.append(f"lung masks attached to {n_masks} of {len(records)} images")
    return manifest


def discover(
    path: str | Path,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    require_all_classes: bool = True,
) -> Manifest:
    """Find the dataset at ``path`` and return its manifest (see the module docstring).

    ``require_all_classes=False`` (evaluation) accepts data that lacks one or two classes, e.g. an
    external set of COVID-19 images only; training needs all three.
    """
    opts: dict[str, Any] = {
        "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
        "require_all_classes": require_all_classes,
    }  # fmt: skip
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not os.path.exists(p):
        raise DatasetError(f"{_show(p)}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DatasetError(f"{_show(p)}: a file was given but it is not a .csv manifest")
        return _load_csv(p, **opts)
    plan = _find_plan(p)
    if plan.layout == "csv":
        assert plan.csv is not None
        return _load_csv(plan.csv, **opts)
    col = _load_folders(plan)
    return _finish(col, plan.root, **opts)


def hold_out_source(manifest: Manifest, source: str) -> Manifest:
    """Move every image of one source (hospital / collection) to an 'external' split: a test of
    generalisation to a source the model never saw, which a random split cannot give."""
    known = sorted({r.source for r in manifest.records if r.source})
    if source not in known:
        raise DatasetError(
            f"holdout_source {source!r} not in the data; sources: {', '.join(known) or 'none recorded'}"
        )
    recs = [replace(r, split="external") if r.source == source else r for r in manifest.records]
    note = (
        f"held out source {source!r}: {sum(r.split == 'external' for r in recs)} images in split 'external'"
    )
    return replace(manifest, records=recs, notes=[*manifest.notes, note])


def checkpoint_split(data_cfg: dict[str, Any], path: str | Path, split: str) -> list[Record]:
    """The images of ``split`` of the data at ``path``, split exactly as the training run whose resolved
    ``data`` config section is ``data_cfg`` split it (fractions, seed, held-out source). For evaluation:
    classes may be missing; a held-out source that is absent from this data is simply not held out."""
    manifest = discover(
        path,
        val_fraction=float(data_cfg.get("val_fraction", 0.15)),
        test_fraction=float(data_cfg.get("test_fraction", 0.15)),
        seed=int(data_cfg.get("split_seed", 0)),
        require_all_classes=False,
    )
    held_out = str(data_cfg.get("holdout_source") or "")
    if held_out and any(r.source == held_out for r in manifest.records):
        manifest = hold_out_source(manifest, held_out)
    return manifest.split(split)


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------


@dataclass
class InspectReport:
    root: Path
    layout: str
    counts: dict[str, dict[str, int]]
    n_records: int
    checked_images: bool
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    exact_duplicates: list[list[Path]] = field(default_factory=list)
    cross_split_duplicates: list[list[Path]] = field(default_factory=list)
    near_duplicates: list[list[Path]] = field(default_factory=list)
    near_cross_split_duplicates: list[list[Path]] = field(default_factory=list)
    label_conflicts: list[list[Path]] = field(default_factory=list)  # exact/near groups with >1 label
    groups_in_multiple_splits: list[tuple[str, list[str]]] = field(default_factory=list)
    masks_present: int = 0
    masks_missing: int = 0
    near_threshold: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    split_of: dict[str, str] = field(default_factory=dict, repr=False)  # path -> split, for display

    def to_dict(self) -> dict[str, Any]:
        def paths(groups: list[list[Path]]) -> list[list[str]]:
            return [[_show(p) for p in g] for g in groups]

        return {
            "root": _show(self.root),
            "layout": self.layout,
            "counts": self.counts,
            "n_records": self.n_records,
            "checked_images": self.checked_images,
            "unreadable": [{"path": _show(p), "reason": r} for p, r in self.unreadable],
            "exact_duplicates": paths(self.exact_duplicates),
            "cross_split_duplicates": paths(self.cross_split_duplicates),
            "near_duplicates": paths(self.near_duplicates),
            "near_cross_split_duplicates": paths(self.near_cross_split_duplicates),
            "label_conflicts": paths(self.label_conflicts),
            "groups_in_multiple_splits": [
                {"group": _show(g), "splits": s} for g, s in self.groups_in_multiple_splits
            ],
            "masks_present": self.masks_present,
            "masks_missing": self.masks_missing,
            "near_threshold": self.near_threshold,
            "notes": self.notes,
            "skipped": [{"path": _show(p), "reason": r} for p, r in self.skipped],
        }


@dataclass
class _ImageInfo:
    digest: str | None
    thumb: np.ndarray | None
    error: str | None


def _image_info(path: Path, want_thumb: bool) -> _ImageInfo:
    try:
        arr = read_image(path)
    except ImageReadError as exc:
        return _ImageInfo(None, None, exc.reason)
    h = hashlib.sha1(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    thumb = None
    if want_thumb:
        im = Image.fromarray(arr)
        thumb = np.asarray(im.resize((_THUMB, _THUMB), Image.Resampling.BOX), dtype=np.float32)
    return _ImageInfo(h.hexdigest(), thumb, None)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _near_pairs(thumbs: np.ndarray, threshold: float, progress: bool) -> list[tuple[int, int]]:
    """All pairs (i, j) with mean |thumb_i - thumb_j| <= threshold, found exactly.

    The thumbnail mean and the 4x4 block means are lower bounds of the 16x16 distance, so
    sorting by the mean and pre-filtering on 4x4 blocks prunes most pairs without missing any.
    """
    n = len(thumbs)
    if n < 2:
        return []
    flat = thumbs.reshape(n, -1)
    coarse = thumbs.reshape(n, 4, _THUMB // 4, 4, _THUMB // 4).mean(axis=(2, 4)).reshape(n, -1)
    means = flat.mean(axis=1)
    order = np.argsort(means, kind="stable")
    ms = means[order]
    flat_s = flat[order]
    coarse_s = coarse[order]
    eps = 1e-4  # float32 rounding of the bounds
    ends = np.searchsorted(ms, ms + threshold + eps, side="right")
    pairs: list[tuple[int, int]] = []
    for i in tqdm(range(n - 1), desc="near duplicates", unit="img", disable=not progress, leave=False):
        j_end = int(ends[i])
        if j_end <= i + 1:
            continue
        c = np.abs(coarse_s[i + 1 : j_end] - coarse_s[i]).mean(axis=1)
        cand = np.nonzero(c <= threshold + eps)[0]
        if cand.size == 0:
            continue
        idx = cand + i + 1
        d = np.abs(flat_s[idx] - flat_s[i]).mean(axis=1)
        for j in idx[d <= threshold]:
            a, b = int(order[i]), int(order[j])
            pairs.append((min(a, b), max(a, b)))
    return pairs


def inspect(
    manifest: Manifest,
    *,
    check_images: bool = True,
    near: bool = True,
    progress: bool = True,
    near_threshold: float = NEAR_DUPLICATE_MAD,
    workers: int | None = None,
) -> InspectReport:
    """Check a manifest: unreadable images, duplicates, groups across splits, masks.

    ``check_images=False`` only checks that the files exist (no duplicates then);
    ``near=False`` skips the near-duplicate search.  Images are read on ``workers`` threads
    (default: up to 8, one per CPU).
    """
    recs = manifest.records
    report = InspectReport(
        root=manifest.root,
        layout=manifest.layout,
        counts=manifest.counts(),
        n_records=len(recs),
        checked_images=check_images,
        notes=list(manifest.notes),
        skipped=list(manifest.skipped),
        near_threshold=near_threshold if (check_images and near) else None,
        split_of={os.fspath(r.path): r.split for r in recs},
    )

    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        splits_of_group[r.group].add(r.split)
    report.groups_in_multiple_splits = sorted(
        (g, sorted(s, key=SPLITS.index)) for g, s in splits_of_group.items() if len(s) > 1
    )

    if any(r.mask is not None for r in recs):
        present = sum(1 for r in recs if r.mask is not None and os.path.isfile(r.mask))
        report.masks_present = present
        report.masks_missing = len(recs) - present

    if not check_images:
        for r in recs:
            if not os.path.isfile(r.path):
                report.unreadable.append((r.path, "file not found"))
        return report

    n_workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        infos = list(
            tqdm(
                pool.map(lambda r: _image_info(r.path, near), recs),
                total=len(recs),
                desc="reading images",
                unit="img",
                disable=not progress,
            )
        )

    ok: list[int] = []
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, info in enumerate(infos):
        if info.error is not None:
            report.unreadable.append((recs[i].path, info.error))
        else:
            assert info.digest is not None
            ok.append(i)
            by_digest[info.digest].append(i)

    def splits(idx: Iterable[int]) -> set[str]:
        return {recs[i].split for i in idx}

    def labels(idx: Iterable[int]) -> set[str]:
        return {recs[i].label for i in idx}

    def as_paths(idx: Iterable[int]) -> list[Path]:
        return [recs[i].path for i in sorted(idx, key=lambda i: _sort_key(recs[i]))]

    exact = sorted((g for g in by_digest.values() if len(g) > 1), key=lambda g: _sort_key(recs[min(g)]))
    report.exact_duplicates = [as_paths(g) for g in exact]
    report.cross_split_duplicates = [as_paths(g) for g in exact if len(splits(g)) > 1]
    conflicts = [as_paths(g) for g in exact if len(labels(g)) > 1]

    if near and len(ok) > 1:
        thumbs = np.stack([infos[i].thumb for i in ok])  # type: ignore[misc]
        uf = _UnionFind(len(ok))
        for a, b in _near_pairs(thumbs, near_threshold, progress):
            uf.union(a, b)
        comps: dict[int, list[int]] = defaultdict(list)
        for k in range(len(ok)):
            comps[uf.find(k)].append(ok[k])
        near_groups = [g for g in comps.values() if len(g) > 1 and len({infos[i].digest for i in g}) > 1]
        near_groups.sort(key=lambda g: _sort_key(recs[min(g)]))
        report.near_duplicates = [as_paths(g) for g in near_groups]
        report.near_cross_split_duplicates = [as_paths(g) for g in near_groups if len(splits(g)) > 1]
        conflicts += [as_paths(g) for g in near_groups if len(labels(g)) > 1]
    report.label_conflicts = conflicts
    return report


# --------------------------------------------------------------------------------------------
# Text report
# --------------------------------------------------------------------------------------------

_MAX_EXAMPLES = 20


def format_report(report: InspectReport) -> str:
    """A readable text report: counts table, then each problem section with examples."""
    root = Path(report.root)

    def rel(p: str | os.PathLike[str]) -> str:
        try:
            return _show(Path(p).relative_to(root))
        except ValueError:
            return _show(p)

    def tagged(p: Path) -> str:
        split = report.split_of.get(os.fspath(p))
        return f"[{split}] {rel(p)}" if split else rel(p)

    lines = [f"dataset: {_show(root)}", f"layout:  {report.layout}", ""]
    width = max(len(c) for c in CLASSES) + 2
    lines.append("split".ljust(7) + "".join(c.rjust(width) for c in CLASSES) + "total".rjust(width))
    col_tot = dict.fromkeys(CLASSES, 0)
    for s in SPLITS:
        row = report.counts.get(s, {})
        for c in CLASSES:
            col_tot[c] += row.get(c, 0)
        lines.append(
            s.ljust(7)
            + "".join(str(row.get(c, 0)).rjust(width) for c in CLASSES)
            + str(sum(row.values())).rjust(width)
        )
    lines.append(
        "total".ljust(7)
        + "".join(str(col_tot[c]).rjust(width) for c in CLASSES)
        + str(sum(col_tot.values())).rjust(width)
    )

    def section(title: str, items: list[str], total_text: str) -> None:
        lines.append("")
        lines.append(f"{title}: {total_text}")
        for item in items[:_MAX_EXAMPLES]:
            lines.append(f"  {item}")
        if len(items) > _MAX_EXAMPLES:
            lines.append(f"  ... and {len(items) - _MAX_EXAMPLES} more")

    def dup_section(title: str, groups: list[list[Path]]) -> None:
        n_img = sum(len(g) for g in groups)
        items = [" = ".join(tagged(p) for p in g) for g in groups]
        section(title, items, f"{len(groups)} groups, {n_img} images" if groups else "none")

    section(
        "Skipped files",
        [f"{rel(p)}: {why}" for p, why in report.skipped],
        str(len(report.skipped)) if report.skipped else "none",
    )
    if report.checked_images:
        section(
            "Unreadable images",
            [f"{tagged(p)}: {why}" for p, why in report.unreadable],
            str(len(report.unreadable)) if report.unreadable else "none",
        )
        dup_section("Exact duplicates (same decoded pixels)", report.exact_duplicates)
        dup_section("Exact duplicates across splits (leak)", report.cross_split_duplicates)
        if report.near_threshold is not None:
            how = f"16x16 thumbnail mean abs. difference <= {report.near_threshold:g}"
            dup_section(f"Near duplicates ({how})", report.near_duplicates)
            dup_section("Near duplicates across splits (leak)", report.near_cross_split_duplicates)
        else:
            lines += ["", "Near duplicates: not checked"]
        dup_section("Duplicates with different labels", report.label_conflicts)
    else:
        section(
            "Missing files (images not decoded)",
            [f"{tagged(p)}: {why}" for p, why in report.unreadable],
            str(len(report.unreadable)) if report.unreadable else "none",
        )
    section(
        "Patient groups in more than one split (leak)",
        [f"{_show(g)}: {', '.join(s)}" for g, s in report.groups_in_multiple_splits],
        str(len(report.groups_in_multiple_splits)) if report.groups_in_multiple_splits else "none",
    )
    lines.append("")
    if report.masks_present or report.masks_missing:
        lines.append(f"Masks: {report.masks_present} present, {report.masks_missing} missing")
    else:
        lines.append("Masks: none in this dataset")
    if report.notes:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  - {n}" for n in report.notes)
    return "\n".join(lines) + "\n"
