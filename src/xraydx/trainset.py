"""The training data as a run holds it: the splits decoded through the cache (``load_split``), the balanced
epoch draws (``sampling_weights``, ``epoch_order``) and the data's part of a checkpoint's metadata
(``build_meta``). Used by the training loop, the crossval, the run's finish and ``xraydx shift fit``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xraydx import __version__
from xraydx.cache import load_many
from xraydx.config import Config
from xraydx.data import CLASSES, Manifest, Record
from xraydx.data.membership import split_membership
from xraydx.device import Dist
from xraydx.transforms import Preprocessing

__all__ = ["SplitData", "build_meta", "data_summary", "epoch_order", "load_split", "sampling_weights"]


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class SplitData:
    records: list[Record]
    images: np.ndarray  # uint8 (N, S, S)
    labels: np.ndarray  # int64 (N,)


def load_split(
    records: list[Record], spec: Preprocessing, cache_dir: Path, name: str, progress: bool
) -> tuple[SplitData, list[tuple[Record, str]]]:
    masks = [r.mask for r in records] if spec.lung_mask != "none" else None
    mask_fn = None
    if masks is not None and any(m is None for m in masks):
        # images without a mask in the dataset get the shipped segmenter's, exactly as Predictor.lung_mask does
        from xraydx.segment import LungSegmenter

        mask_fn = LungSegmenter.default()  # callable img -> mask; its cache_tag names the weights
    # compact=True: only the readable images, and no in-RAM copy when the cache returns a memmap
    images, failures = load_many(
        [r.path for r in records], spec, cache_dir=cache_dir, masks=masks, mask_fn=mask_fn, progress=progress,
        desc=f"load {name}", compact=True,
    )  # fmt: skip
    bad = {i for i, _ in failures}
    recs = [records[i] for i in range(len(records)) if i not in bad]
    labels = np.array([CLASSES.index(r.label) for r in recs], dtype=np.int64)
    return SplitData(recs, images, labels), [(records[i], reason) for i, reason in failures]


# ---- checkpoint metadata -------------------------------------------------------------------------


def data_summary(manifest: Manifest, name: str | None = None) -> dict[str, Any]:
    """``name``: the dataset's name as the user gave it (the folder, or the manifest CSV's file name)."""
    sources: dict[str, int] = {}
    for r in manifest.records:
        if r.source:
            sources[r.source] = sources.get(r.source, 0) + 1
    return {
        "name": name or manifest.root.name,
        "root": str(manifest.root),
        "layout": manifest.layout,
        "counts": manifest.counts(),
        "sources": sources,
        "notes": list(manifest.notes),
    }


def _segmenter_info(spec: Preprocessing, manifest: Manifest) -> dict[str, Any] | None:
    """Which segmenter made the lung masks (where the dataset had none): predict warns if it differs."""
    if spec.lung_mask == "none" or all(r.mask is not None for r in manifest.records):
        return None
    from xraydx.segment import LungSegmenter

    seg = LungSegmenter.default()
    return {"identity": seg.identity, "cache_tag": seg.cache_tag}


def build_meta(cfg: Config, spec: Preprocessing, manifest: Manifest, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "tool": "xraydx",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": list(CLASSES),
        "architecture": {
            "name": cfg.model.name,
            "in_chans": cfg.model.in_chans,
            "pretrained": cfg.model.pretrained,
        },
        "input_size": [cfg.model.in_chans, spec.size, spec.size],
        "preprocessing": spec.to_dict(),
        "lung_segmenter": _segmenter_info(spec, manifest),
        "training_data": data_summary(manifest, Path(cfg.data.path).name if cfg.data.path else None),
        "split_membership": split_membership(manifest),  # evaluate checks the data against it
        "config": cfg.to_dict(),
        **extra,
    }


# ---- the epoch's draws ---------------------------------------------------------------------------


def sampling_weights(labels: np.ndarray, sources: Sequence[str], balance: str) -> np.ndarray | None:
    """Per-image draw weights for a balanced epoch, or None for a plain permutation.

    ``sampler``: every class drawn equally often. ``class_source``: every class equally often and, within a
    class, every source (hospital / collection) equally often, so no one collection's look dominates what a
    class looks like (images without a source count as one source)."""
    if balance == "sampler":
        counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
        return 1.0 / counts[labels]
    if balance == "class_source":
        cells: dict[tuple[int, str], int] = {}
        for y, s in zip(labels.tolist(), sources, strict=True):
            cells[(y, s)] = cells.get((y, s), 0) + 1
        per_class = {y: sum(1 for c in cells if c[0] == y) for y, _ in cells}
        return np.array(
            [1.0 / (per_class[y] * cells[(y, s)]) for y, s in zip(labels.tolist(), sources, strict=True)]
        )
    return None


def epoch_order(
    n: int, labels: np.ndarray, cfg: Config, epoch: int, d: Dist, sources: Sequence[str] | None = None
) -> np.ndarray:
    """This rank's sample indices for an epoch: a seeded permutation (or balanced draw), sharded by rank.
    ``train.epoch_size`` > 0 draws that many per epoch (with replacement where balanced, else the first
    ones of a fresh permutation), so an epoch costs the same whatever the data's size."""
    g = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
    size = cfg.train.epoch_size or n
    w = sampling_weights(labels, list(sources) if sources is not None else [""] * n, cfg.train.balance)
    if w is not None:
        order = torch.multinomial(torch.as_tensor(w), size, replacement=True, generator=g).numpy()
    else:
        order = torch.randperm(n, generator=g).numpy()
        if size != n:
            order = np.resize(order, size)
    if d.active:
        per = math.ceil(len(order) / d.world)
        order = np.resize(order, per * d.world)  # pad by wrapping so every rank has the same count
        order = order[d.rank :: d.world]
    return order
