"""One manifest from a dataset on disk: :func:`discover`, the splits it makes, held-out sources.

Missing splits are made from ``train`` with scikit-learn's ``StratifiedGroupKFold`` (one fold
taken out; stratified by class; every group on one side; seeded): first ``test`` when there is
none, then ``val``.  ``val_fraction``/``test_fraction`` are fractions of the images that were
in ``train`` before any split was made; the fold count is ``round(1 / fraction)`` of the pool
it is cut from, so the result is close to, not exactly, the fraction.

:func:`hold_out_source` moves one source to an ``external`` split; :func:`checkpoint_split` splits
data exactly as a training run did (from the run's resolved ``data`` config).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from xraydx.constants import CLASSES, SPLITS
from xraydx.data.layouts import Collector, CsvManifest, Plan, collect, find_plan
from xraydx.data.records import Manifest, Record, _show, _sort_key
from xraydx.errors import ConfigError, DatasetError

__all__ = ["checkpoint_split", "discover", "hold_out_source", "read_csv_manifest"]

# ---- splitting -----------------------------------------------------------------------------------


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
    col: Collector,
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


# ---- discovery -----------------------------------------------------------------------------------


def read_csv_manifest(
    path: Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
    require_all_classes: bool = True,
) -> Manifest:  # fmt: skip
    """The manifest of one CSV file (the ``csv`` layout), splits made as :func:`discover` makes them."""
    path = Path(os.path.abspath(path))
    col = CsvManifest().collect(Plan("csv", path.parent, csv=path))
    return _finish(
        col, path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        require_all_classes=require_all_classes,
    )  # fmt: skip


def discover(
    path: str | Path,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    require_all_classes: bool = True,
) -> Manifest:
    """Find the dataset at ``path`` and return its manifest (layouts: :mod:`xraydx.data.layouts`; splits:
    this module's docstring).

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
        return read_csv_manifest(p, **opts)
    plan = find_plan(p)
    if plan.csv is not None:
        return read_csv_manifest(plan.csv, **opts)
    return _finish(collect(plan), plan.root, **opts)


def hold_out_source(manifest: Manifest, source: str) -> Manifest:
    """Move every image of one source (hospital / collection) to an 'external' split: a test of
    generalisation to a source the model never saw, which a random split cannot give."""
    known = sorted({r.source for r in manifest.records if r.source})
    if source not in known:
        raise ConfigError(
            f"{_show(manifest.root)}: --holdout-source {source!r} matches no source of this data;"
            f" sources: {', '.join(known) or 'none recorded'}"
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
    return checkpoint_manifest(data_cfg, path).split(split)


def checkpoint_manifest(data_cfg: dict[str, Any], path: str | Path) -> Manifest:
    """The data at ``path`` split as the run with this resolved ``data`` config split it (see
    :func:`checkpoint_split`)."""
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
    return manifest
