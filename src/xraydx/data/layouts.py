"""Dataset layouts on disk: one detector class per layout behind one interface (:class:`Layout`).

:func:`find_plan` walks down from the given folder (at most :data:`MAX_DEPTH` levels) and asks each
detector in :data:`DETECTORS` in turn whether a folder is its layout; the one that says yes collects
the records (:meth:`Layout.collect`). Folder names are matched case-insensitively, with ``-``, ``_``
and spaces treated alike.

``covid-qu-ex`` (:class:`CovidQuEx`)
    COVID-QU-Ex: ``Lung Segmentation Data/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/images``
    with lung masks of the same file name in the sibling ``lung masks`` folder; also
    ``Infection Segmentation Data`` (same structure; its ``lung masks`` are used, its
    ``infection masks`` ignored).  The path may be the dataset root, a folder above it (Kaggle
    unzips repeat the outer folder: ``archive/COVID-QU-Ex/...``), or one part folder itself.
    When both parts are present, Lung Segmentation Data (the full set) is used.  There are no
    patient ids in COVID-QU-Ex: ``group`` is the file stem.
``radiography-db`` (:class:`RadiographyDB`)
    COVID-19 Radiography Database: ``COVID``, ``Lung_Opacity``, ``Viral Pneumonia``,
    ``Normal``, each with ``images/`` (and ``masks/``), or the older release with images
    directly in the class folders.  COVID→covid, Lung_Opacity and Viral Pneumonia→non_covid,
    Normal→normal.  No splits: test and val are made (see :mod:`xraydx.data.manifest`).
``split-class-folders`` / ``class-folders`` (:class:`SplitClassFolders`, :class:`ClassFolders`)
    ``{covid,non_covid,normal}/`` (names through :data:`CLASS_ALIASES`), with or without
    ``{train,val,test}/`` parents (:data:`SPLIT_ALIASES`); image files are collected
    recursively.  A class folder that has an ``images/`` sub-folder is read like the
    Radiography DB (``masks/`` or ``lung masks/`` beside it give the masks).
``csv`` (:class:`CsvManifest`)
    A ``.csv`` file, or a folder with ``manifest.csv``; columns through
    :data:`CSV_COLUMN_ALIASES` (``path`` and ``label`` required; ``split``, ``group``,
    ``source``, ``mask`` optional), paths relative to the CSV's folder.

For ``csv`` and the class-folder layouts, when there is no source column, a file name of the
form ``<source>__<name>`` (as in the cxr3 development set) gives ``source = <source>``.

Folders and files whose names start with ``.``, ``__MACOSX``, ``Thumbs.db`` and
``desktop.ini`` are ignored; symlinked folders are followed once (visited real paths are
tracked, so loops end); file names that are not valid UTF-8 are kept (surrogate escapes).
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from xraydx.constants import CLASSES
from xraydx.data.records import (
    Record,
    _norm,
    _rel_or_abs,
    _show,
    normalize_label,
    normalize_split,
)
from xraydx.data.walk import _child_dir, _subdirs, _top_files, _Walker, extensionless
from xraydx.errors import DatasetError
from xraydx.fsutil import csv_unescape
from xraydx.io_formats import is_image_path, sniff_file

__all__ = [
    "CSV_COLUMN_ALIASES",
    "DETECTORS",
    "LAYOUTS",
    "ClassFolders",
    "Collector",
    "CovidQuEx",
    "CsvManifest",
    "Layout",
    "Plan",
    "RadiographyDB",
    "SplitClassFolders",
    "collect",
    "find_plan",
    "is_mask_folder",
]

LAYOUTS: tuple[str, ...] = ("covid-qu-ex", "radiography-db", "class-folders", "split-class-folders", "csv")

#: Canonical CSV column -> accepted header names (normalised), in order of preference.
CSV_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "path": ("path", "file", "filename", "file_name", "image", "image_path", "filepath", "file_path"),
    "label": ("label", "class", "target"),
    "split": ("split", "subset", "fold_name"),
    "group": ("group", "patient_group", "patient", "patient_id", "patientid", "subject", "subject_id"),
    "source": ("source", "site", "hospital", "dataset"),
    "mask": ("mask", "mask_path", "lung_mask"),
}

_QU_PARTS: dict[str, str] = {
    "lung_segmentation_data": "Lung Segmentation Data",
    "infection_segmentation_data": "Infection Segmentation Data",
}
_RDB_FOLDERS = frozenset({"covid", "lung_opacity", "viral_pneumonia", "normal"})
_MASK_DIRS: tuple[str, ...] = ("lung_masks", "masks", "mask", "lung_mask")
_IGNORED_MASK_DIRS = frozenset({"infection_masks", "infection_mask"})
MAX_DEPTH = 4


def is_mask_folder(d: Path) -> bool:
    """Whether ``d`` is the mask folder of a known layout: named like one (``lung masks``, ``masks``,
    ``infection masks``, ...) beside an ``images`` folder, as in COVID-QU-Ex and the Radiography DB. Its
    PNGs are masks, not X-rays: a folder walk for prediction leaves them out (and says how many)."""
    return (
        _norm(d.name) in (*_MASK_DIRS, *_IGNORED_MASK_DIRS) and _child_dir(d.parent, ("images",)) is not None
    )


_UNKNOWN_CLASS = (
    "folder name is not a known class (covid, non_covid, normal or an alias such as COVID-19, "
    "pneumonia, healthy: see xraydx.data.CLASS_ALIASES)"
)


def _source_from_name(name: str) -> str:
    return name.split("__", 1)[0] if "__" in name[1:] else ""


# ---- collecting records --------------------------------------------------------------------------


class Collector:
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
            for sub in _subdirs(d, self.skipped):
                if sub not in (images, mask_dir) and _norm(sub.name) not in _IGNORED_MASK_DIRS:
                    self.skipped.append((os.fspath(sub), "folder beside images/ not used"))
        masks: dict[str, Path] = {}
        if mask_dir is not None:
            for m in _Walker([], self.root).files(mask_dir):
                masks[m.relative_to(mask_dir).as_posix()] = m
        top = images if images is not None else d
        for f in self.walker.files(top):
            if not is_image_path(f) and not (extensionless(f.name) and sniff_file(f)[0] is not None):
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
        for sub in _subdirs(d, self.skipped):
            label = normalize_label(sub.name)
            if label is None:
                n = sum(1 for _ in _Walker([], self.root).files(sub))
                self.skipped.append((os.fspath(sub), f"{unknown_reason} ({n} files not used)"))
                continue
            self.class_dir(sub, label, split)
        for f in _top_files(d):
            if is_image_path(f):
                self.skipped.append((os.fspath(f), "image file not inside a class folder"))


def _load_split_root(col: Collector, d: Path, unknown: str) -> None:
    for sub in _subdirs(d, col.skipped):
        split = normalize_split(sub.name)
        if split is None:
            col.skipped.append((os.fspath(sub), "folder name is not a split (train/val/test or an alias)"))
            continue
        col.classes_under(sub, split, unknown_reason=unknown)
    for f in _top_files(d):
        if is_image_path(f):
            col.skipped.append((os.fspath(f), "image file not inside a split/class folder"))


# ---- the layouts ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a detector found: the layout's name, its root, and what the layout needs to collect it."""

    layout: str
    root: Path
    csv: Path | None = None
    qu_parts: dict[str, Path] = field(default_factory=dict)  # COVID-QU-Ex: part name -> split root


class Layout:
    """One dataset layout: :meth:`detect` says whether a folder is one (a :class:`Plan`, else None),
    :meth:`collect` turns the plan into records, skipped entries and notes."""

    name: ClassVar[str]

    def detect(self, d: Path) -> Plan | None:
        raise NotImplementedError

    def collect(self, plan: Plan) -> Collector:
        col = Collector(plan.root, plan.layout)
        col.classes_under(plan.root, None, unknown_reason=_UNKNOWN_CLASS)
        return col


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


class CsvManifest(Layout):
    """A ``.csv`` manifest, or a folder holding ``manifest.csv``."""

    name = "csv"

    def detect(self, d: Path) -> Plan | None:
        try:
            with os.scandir(d) as it:
                found = [Path(e.path) for e in it if e.name.lower() == "manifest.csv" and e.is_file()]
        except OSError:
            found = []
        return Plan(self.name, d, csv=found[0]) if found else None

    def collect(self, plan: Plan) -> Collector:
        assert plan.csv is not None
        path = Path(os.path.abspath(plan.csv))
        rows = _read_csv_rows(path)
        if not rows:
            raise DatasetError(f"{_show(path)}: empty CSV")
        header, body = rows[0], rows[1:]
        reader = _CsvRows(path, _resolve_columns(header, path))
        col = reader.col
        has_split = "split" in reader.cols and any(reader.cell(r, "split") for r in body)
        if "split" in reader.cols and not has_split:
            col.notes.append("the CSV's split column is empty in every row: treated as having no split")
        for lineno, row in enumerate(body, start=2):
            reader.add(row, lineno, has_split)
        if reader.missing_masks:
            col.notes.append(
                f"{reader.missing_masks} mask files named in the CSV do not exist (mask left empty)"
            )
        if "source" not in reader.cols and any(r.source for r in col.records + col.unassigned):
            col.notes.append("no source column: source taken from '<source>__<name>' file names")
        for lab in CLASSES:
            col.class_folders[lab] = []
        return col


class CovidQuEx(Layout):
    """COVID-QU-Ex: Lung / Infection Segmentation Data, each with official splits and lung masks."""

    name = "covid-qu-ex"

    def detect(self, d: Path) -> Plan | None:
        parts: dict[str, Path] = {}
        for sub in _subdirs(d):
            key = _norm(sub.name)
            if key in _QU_PARTS:
                root = _qu_part_root(sub)
                if root is not None:
                    parts[_QU_PARTS[key]] = root
        if not parts and _is_qu_split_root(d):
            parts[_QU_PARTS.get(_norm(d.name), "Lung Segmentation Data")] = d
        return Plan(self.name, d, qu_parts=parts) if parts else None

    def collect(self, plan: Plan) -> Collector:
        col = Collector(plan.root, plan.layout)
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
        _load_split_root(col, plan.qu_parts[part], _UNKNOWN_CLASS)
        return col


class RadiographyDB(Layout):
    """COVID-19 Radiography Database: COVID, Lung_Opacity, Viral Pneumonia, Normal (no splits)."""

    name = "radiography-db"

    def detect(self, d: Path) -> Plan | None:
        subs = {_norm(s.name): s for s in _subdirs(d)}
        rdb = _RDB_FOLDERS & subs.keys()
        if len(rdb) >= 2 and (
            {"lung_opacity", "viral_pneumonia"} & rdb or any(_child_dir(subs[n], ("images",)) for n in rdb)
        ):
            return Plan(self.name, d)
        return None


class SplitClassFolders(Layout):
    """``{train,val,test}/{covid,non_covid,normal}/`` (or aliases)."""

    name = "split-class-folders"

    def detect(self, d: Path) -> Plan | None:
        splits = _split_dirs(d)
        labels = {lab for dirs in splits.values() for sd in dirs for lab in _class_dirs(sd)}
        return Plan(self.name, d) if len(labels) >= 2 else None

    def collect(self, plan: Plan) -> Collector:
        col = Collector(plan.root, plan.layout)
        _load_split_root(col, plan.root, _UNKNOWN_CLASS)
        return col


class ClassFolders(Layout):
    """``{covid,non_covid,normal}/`` (or aliases) without split folders."""

    name = "class-folders"

    def detect(self, d: Path) -> Plan | None:
        return Plan(self.name, d) if len(_class_dirs(d)) >= 2 else None


#: in the order they are asked: the first that recognises a folder wins
DETECTORS: tuple[Layout, ...] = (
    CsvManifest(),
    CovidQuEx(),
    RadiographyDB(),
    SplitClassFolders(),
    ClassFolders(),
)
_BY_NAME: dict[str, Layout] = {det.name: det for det in DETECTORS}


def detect(d: Path) -> Plan | None:
    """The plan of the first detector that recognises ``d`` (None: no layout here)."""
    for det in DETECTORS:
        plan = det.detect(d)
        if plan is not None:
            return plan
    return None


def collect(plan: Plan) -> Collector:
    """The records of a found dataset, collected by its layout."""
    return _BY_NAME[plan.layout].collect(plan)


def find_plan(top: Path) -> Plan:
    """The one dataset at or below ``top`` (breadth first, at most :data:`MAX_DEPTH` levels down)."""
    level = [top]
    seen: set[str] = set()
    for _depth in range(MAX_DEPTH + 1):
        found = []
        nxt = []
        for d in level:
            real = os.path.realpath(d)
            if real in seen:
                continue
            seen.add(real)
            plan = detect(d)
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
        f"{_show(top)}: no supported dataset layout found within {MAX_DEPTH} folder levels "
        f"(looked for manifest.csv; COVID-QU-Ex 'Lung Segmentation Data' / 'Infection Segmentation Data'; "
        f"COVID-19 Radiography Database folders COVID, Lung_Opacity, Viral Pneumonia, Normal; "
        f"at least two of the class folders {', '.join(CLASSES)} (or aliases), with or without "
        f"train/val/test parents). Found: {seen_names}"
    )


# ---- the CSV layout's rows -----------------------------------------------------------------------


class _CsvRows:
    """Turns the rows of one CSV manifest into records (problems go to ``col.skipped``)."""

    def __init__(self, path: Path, cols: dict[str, int]) -> None:
        self.path, self.cols, self.base = path, cols, path.parent
        self.col = Collector(self.base, "csv")
        self.seen: set[str] = set()
        self.missing_masks = 0

    def cell(self, row: list[str], name: str) -> str:
        i = self.cols.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    def _file(self, row: list[str], lineno: int) -> Path | None:
        col = self.col
        raw = self.cell(row, "path")
        if not raw:
            col.skipped.append((f"{_show(self.path)}:{lineno}", "empty path"))
            return None
        f = _resolve_file(raw, self.base)
        key = os.fspath(f)
        if key in self.seen:
            col.skipped.append((key, f"listed more than once in the CSV (line {lineno} ignored)"))
            return None
        self.seen.add(key)
        if not f.is_file():
            why = "is a folder" if f.is_dir() else "does not exist"
            col.skipped.append((key, f"listed in the CSV (line {lineno}) but the file {why}"))
            return None
        if not is_image_path(f):
            col.skipped.append((key, f"not an image file (suffix {f.suffix or 'none'!r})"))
            return None
        return f

    def add(self, row: list[str], lineno: int, has_split: bool) -> None:
        f = self._file(row, lineno)
        if f is None:
            return
        key = os.fspath(f)
        raw_label = self.cell(row, "label")
        label = normalize_label(raw_label)
        if label is None:
            self.col.skipped.append((key, f"unknown label {raw_label!r} (line {lineno})"))
            return
        split: str | None = None
        if has_split:
            raw_split = self.cell(row, "split")
            split = normalize_split(raw_split)
            if split is None:
                self.col.skipped.append((key, f"unknown or empty split {raw_split!r} (line {lineno})"))
                return
        group = self.cell(row, "group") or _rel_or_abs(f, self.base)
        source = self.cell(row, "source") if "source" in self.cols else _source_from_name(f.name)
        mask: Path | None = None
        raw_mask = self.cell(row, "mask")
        if raw_mask:
            mask = _resolve_file(raw_mask, self.base)
            if not mask.is_file():
                self.missing_masks += 1
                mask = None
        rec = Record(path=f, label=label, split=split or "train", group=group, source=source, mask=mask)
        (self.col.records if split is not None else self.col.unassigned).append(rec)


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
    # The delimiter from the header line alone, the quote always '"': cells that xraydx escaped with a
    # leading ' (see xraydx.fsutil.csv_cell), or a TAB inside a name, would mislead a sniffer of the rows.
    try:
        delimiter = csv.Sniffer().sniff(text.split("\n", 1)[0][:8192], delimiters=",;\t").delimiter
    except csv.Error:
        delimiter = ","
    rows = csv.reader(io.StringIO(text), delimiter=delimiter, quotechar='"', doublequote=True)
    return [[csv_unescape(c) for c in row] for row in rows if any(c.strip() for c in row)]  # our own escapes
