"""``xraydx data inspect``: unreadable files, exact and near duplicates, leaks across splits, masks.

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

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from xraydx.constants import CLASSES, SPLITS
from xraydx.data.records import Manifest, Record, _show, _sort_key
from xraydx.data.walk import is_loss
from xraydx.errors import printable
from xraydx.io import ImageReadError, read_image

__all__ = ["NEAR_DUPLICATE_MAD", "InspectReport", "Leaks", "find_leaks", "format_report", "inspect"]

#: Near-duplicate threshold: mean absolute difference of 16x16 thumbnails (0–255 scale).
NEAR_DUPLICATE_MAD: float = 4.0

_THUMB = 16


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

    @property
    def not_read(self) -> list[tuple[str, str]]:
        """Skipped entries whose data could not be read (a folder that cannot be listed, a symbolic-link
        loop, a FIFO): data left out against the user's will, so ``data inspect`` ends with exit code 3."""
        return [(p, r) for p, r in self.skipped if is_loss(r)]

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
            "not_read": [{"path": _show(p), "reason": r} for p, r in self.not_read],
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


# ---- leaks in the images a training run loaded ---------------------------------------------------


@dataclass
class Leaks:
    """Exact and near duplicates across splits and label conflicts among the images of one manifest."""

    exact_cross_split: list[list[Path]] = field(default_factory=list)
    near_cross_split: list[list[Path]] = field(default_factory=list)
    label_conflicts: list[list[Path]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.exact_cross_split or self.near_cross_split or self.label_conflicts)

    def lines(self) -> list[str]:
        """One sentence per kind found, each with an example."""

        def ex(groups: list[list[Path]]) -> str:
            return " = ".join(_show(p) for p in groups[0][:3])

        out = []
        for groups, what in (
            (self.exact_cross_split, "exact duplicates across splits"),
            (self.near_cross_split, "near duplicates across splits"),
            (self.label_conflicts, "duplicates with conflicting labels"),
        ):
            if groups:
                out.append(f"{len(groups)} groups of {what} (e.g. {ex(groups)})")
        return out


def find_leaks(
    records: Sequence[Record],
    images: Sequence[np.ndarray] | np.ndarray,
    near_threshold: float = NEAR_DUPLICATE_MAD,
) -> Leaks:
    """Leaks among ``images`` (one decoded, preprocessed image per record, as a training run holds them).

    Exact: the same pixels (SHA-1 of the array). Near: the 16x16 box-thumbnail distance of :func:`inspect`
    (mean absolute difference at most ``near_threshold``, 0–255 scale), among images that are not exact
    copies of each other. Groups count when they span more than one split (a leak: val/test figures
    measure images the model trained on) or more than one label (a conflict)."""
    n = len(records)
    digests, thumbs = [], np.zeros((n, _THUMB, _THUMB), dtype=np.float32)
    for i in range(n):
        arr = np.ascontiguousarray(images[i])
        digests.append(hashlib.sha1(arr.tobytes()).hexdigest())
        thumbs[i] = np.asarray(
            Image.fromarray(arr).resize((_THUMB, _THUMB), Image.Resampling.BOX), np.float32
        )
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, dg in enumerate(digests):
        by_digest[dg].append(i)
    exact = [g for g in by_digest.values() if len(g) > 1]
    uf = _UnionFind(n)
    for a, b in _near_pairs(thumbs, near_threshold, False):
        uf.union(a, b)
    comps: dict[int, list[int]] = defaultdict(list)
    for k in range(n):
        comps[uf.find(k)].append(k)
    near = [g for g in comps.values() if len(g) > 1 and len({digests[i] for i in g}) > 1]

    def paths(groups: list[list[int]], kind: str) -> list[list[Path]]:
        key = {"split": lambda i: records[i].split, "label": lambda i: records[i].label}[kind]
        chosen = [g for g in groups if len({key(i) for i in g}) > 1]
        chosen.sort(key=lambda g: _sort_key(records[min(g)]))
        return [[records[i].path for i in sorted(g, key=lambda i: _sort_key(records[i]))] for g in chosen]

    return Leaks(paths(exact, "split"), paths(near, "split"), paths(exact, "label") + paths(near, "label"))


# ---- text report ---------------------------------------------------------------------------------

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
        "Not read (folders that cannot be listed, link loops, FIFOs: their images are left out)",
        [f"{rel(p)}: {why}" for p, why in report.not_read],
        str(len(report.not_read)) if report.not_read else "none",
    )
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
    return "\n".join(printable(ln) for ln in lines) + "\n"
