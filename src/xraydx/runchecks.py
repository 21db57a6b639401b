"""What training refuses, or warns about, before and while it runs.

- :func:`new_run_dir`: an existing run folder is never overwritten, except one an attempt that failed
  before its first checkpoint left (only xraydx's own early files, no checkpoint): ``--name`` reuses it.
- :func:`check_leaks`: exact and near duplicates across splits and conflicting labels among the images
  the run loaded (:func:`xraydx.data.inspect.find_leaks`): a warning, or with ``data.strict``
  (``--strict-data``) a refusal.
- :func:`refuse_divergence`: a non-finite train or val loss stops the run before that epoch reaches a
  checkpoint, in one line naming the last good one.
- :func:`best_on_disk`: the epoch of the best checkpoint already written (never replaced by an earlier one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from xraydx.config import Config
from xraydx.data import Manifest, Record
from xraydx.data.inspect import find_leaks
from xraydx.errors import OutputExistsError, TrainError, XraydxError
from xraydx.models import read_metadata

__all__ = [
    "EARLY_RUN_FILES",
    "best_on_disk",
    "check_leaks",
    "new_run_dir",
    "refuse_divergence",
    "reusable_run_dir",
]


def new_run_dir(cfg: Config) -> Path:
    """The new run's folder. An existing one is refused unless it is what an earlier attempt that failed
    before its first checkpoint left (only xraydx's own run files, no checkpoint): that one is reused."""
    name = cfg.name or f"{cfg.model.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run = Path(cfg.runs_dir) / name
    if run.exists() and any(run.iterdir()) and not reusable_run_dir(run):
        raise OutputExistsError(  # an existing output: bad usage, exit 2
            f"{run}: run folder already exists; use --resume to continue it or choose another --name"
        )
    return run


#: what a run writes before its first checkpoint; a folder holding only these (and an empty checkpoints/)
#: is an attempt that failed early, and --name may reuse it
EARLY_RUN_FILES = frozenset({"config.yaml", "train.log", "manifest.csv", "skipped.csv", "checkpoints"})


def reusable_run_dir(run: Path) -> bool:
    try:
        names = {p.name for p in run.iterdir()}
        ck = run / "checkpoints"
        return names <= EARLY_RUN_FILES and (not ck.is_dir() or not any(ck.iterdir()))
    except OSError:
        return False


def check_leaks(
    cfg: Config,
    manifest: Manifest,
    splits: list[tuple[Sequence[Record], np.ndarray]],
    log: Callable[[str], None],
) -> None:
    """Exact / near duplicates across splits and label conflicts in the loaded images: a warning (kept in
    the checkpoint's training_data.notes), or with data.strict (--strict-data) a refusal."""
    recs = [r for records, _ in splits for r in records]
    leaks = find_leaks(recs, _Concat([images for _, images in splits]))
    if not leaks:
        return
    found = "; ".join(leaks.lines())
    if cfg.data.strict:
        raise TrainError(
            f"{cfg.data.path}: {found}; refused (--strict-data); `xraydx data inspect` lists them all"
        )
    text = f"leakage: {found}; val/test figures are optimistic (`xraydx data inspect` lists them; --strict-data refuses)"
    manifest.notes.append(text)
    log(f"WARNING: {text}")


class _Concat:
    """Several (N_i, S, S) arrays indexed as one, without a copy."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i: int) -> np.ndarray:
        for p in self.parts:
            if i < len(p):
                return np.asarray(p[i])
            i -= len(p)
        raise IndexError(i)


def refuse_divergence(run: Path, cfg: Config, epoch: int, train_loss: float, val_loss: float) -> None:
    """A non-finite loss: stop before this epoch's weights reach any checkpoint (same test on every rank)."""
    if math.isfinite(train_loss) and math.isfinite(val_loss):
        return
    last = run / "checkpoints" / "last.safetensors"
    kept = (
        f"the last good checkpoint is {last} (epoch {epoch - 1})"
        if last.is_file()
        else "no checkpoint was written"
    )
    what = "train" if not math.isfinite(train_loss) else "val"
    raise TrainError(
        f"{run}: training diverged in epoch {epoch} ({what} loss is {train_loss if what == 'train' else val_loss});"
        f" {kept}; lower train.lr (now {cfg.train.lr:g}) and start a new run"
    )


def best_on_disk(path: Path) -> int:
    """The epoch of the best checkpoint already written (0 where there is none or it cannot be read)."""
    try:
        return int(read_metadata(path).get("epoch", 0)) if path.is_file() else 0
    except (XraydxError, OSError, TypeError, ValueError):
        return 0
