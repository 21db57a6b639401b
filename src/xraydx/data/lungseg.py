"""Image + lung-mask pairs for training and testing the lung segmenter.

Sources: lungseg-style manifests (a folder with ``manifest.csv``, or the CSV itself, with columns
``image,mask`` and optionally a patient column ``patientid`` / ``patient_id`` / ``group`` /
``patient`` and ``split``), split here by patient when there is no split column (seeded: groups
shuffled, then taken for test until ``test_fraction`` of the images, then for val); and any
dataset :func:`xraydx.data.discover` reads, where its records have a lung mask (its own splits
and groups). Every patient group is on one side of the split.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xraydx.data.manifest import discover
from xraydx.errors import SegmenterError

__all__ = ["SegSample", "collect_samples"]


@dataclass(frozen=True)
class SegSample:
    image: Path
    mask: Path
    group: str  # patient id: every group on one side of the split
    split: str  # train | val | test
    source: str


def _is_lungseg_folder(p: Path) -> bool:
    m = p / "manifest.csv" if p.is_dir() else p
    if not m.is_file() or m.suffix.lower() != ".csv":
        return False
    with open(m, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    return "image" in header and "mask" in header


def _group_split(
    groups: list[str], sizes: dict[str, int], seed: int, val_f: float, test_f: float
) -> dict[str, str]:
    """Seeded patient-level split: groups shuffled, then taken for test until test_f of the images, then val."""
    rng = np.random.default_rng(seed)
    order = sorted(set(groups))
    rng.shuffle(order)
    total = sum(sizes.values())
    out: dict[str, str] = {}
    n_test = n_val = 0
    for g in order:
        if n_test < test_f * total:
            out[g], n_test = "test", n_test + sizes[g]
        elif n_val < val_f * total:
            out[g], n_val = "val", n_val + sizes[g]
        else:
            out[g] = "train"
    return out


def _read_lungseg(p: Path, seed: int, val_f: float, test_f: float) -> list[SegSample]:
    m = p / "manifest.csv" if p.is_dir() else p
    base = m.parent
    with open(m, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SegmenterError(f"{m}: no rows")
    gcol = next((c for c in ("patientid", "patient_id", "group", "patient") if c in rows[0]), None)
    groups = [r[gcol] if gcol and r.get(gcol) else r["image"] for r in rows]
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    has_split = "split" in rows[0] and all(r.get("split") in ("train", "val", "test") for r in rows)
    assign = {} if has_split else _group_split(groups, sizes, seed, val_f, test_f)
    out = []
    for r, g in zip(rows, groups, strict=True):
        img, msk = base / r["image"], base / r["mask"]
        for f in (img, msk):
            if not f.is_file():
                raise SegmenterError(f"{m}: listed file {f} does not exist")
        split = r["split"] if has_split else assign[g]
        out.append(SegSample(img, msk, f"{m}:{g}", split, r.get("source_repo") or base.name))
    return out


def collect_samples(
    paths: Sequence[str | Path], seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> tuple[list[SegSample], list[str]]:
    """Image/mask pairs from lungseg-style manifests (``image,mask[,patientid]`` CSV: split here by
    patient, seeded) and from any dataset :func:`xraydx.data.discover` reads (records with a mask; the
    dataset's own splits and groups)."""
    samples: list[SegSample] = []
    notes: list[str] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise SegmenterError(f"{p}: not found")
        if _is_lungseg_folder(p):
            got = _read_lungseg(p, seed, val_fraction, test_fraction)
            notes.append(
                f"{p}: {len(got)} image/mask pairs (lungseg manifest, split by patient, seed {seed})"
            )
        else:
            man = discover(p, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
            with_mask = [r for r in man.records if r.mask is not None]
            if not with_mask:
                raise SegmenterError(
                    f"{p}: layout {man.layout}, but none of its {len(man.records)} images has a lung mask"
                )
            got = [
                SegSample(r.path, r.mask, f"{p}:{r.group}", r.split, r.source or man.layout)
                for r in with_mask
            ]  # type: ignore[arg-type]
            notes.append(
                f"{p}: {len(got)} of {len(man.records)} images have lung masks ({man.layout}, its own splits)"
            )
        samples += got
    return samples, notes
