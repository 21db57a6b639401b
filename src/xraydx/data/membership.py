"""Which images a training run put in which split, recorded and checked again later.

A run's split is the truth for everything that follows it: ``train --resume`` trains on the run's own
``manifest.csv`` (never a re-split of the folder as it is now), and ``evaluate`` checks that the data
it is given still splits into the checkpoint's recorded membership.

- :func:`split_membership`: per split, the image count and a SHA-256 digest of the sorted
  ``relative path<TAB>label`` lines (paths relative to the dataset root, POSIX separators), so a
  dataset moved to another folder or machine still matches, and any image added, removed, moved to
  another split or relabelled changes the digest. Stored in the checkpoint's metadata
  (``split_membership``).
- :func:`membership_change`: the recorded membership against a split made now, in words (``None``
  where they agree).
- :func:`resume_manifest`: the run's saved ``manifest.csv`` read back as the manifest (no split made
  again), with the images added to the data since (ignored, reported) and an error for the ones gone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from xraydx.constants import ALL_SPLITS
from xraydx.data.manifest import checkpoint_manifest, discover, read_csv_manifest
from xraydx.data.records import Manifest, Record, _show
from xraydx.errors import DatasetError

__all__ = ["checked_split", "membership_change", "membership_digest", "resume_manifest", "split_membership"]


def _rel(p: Path, root: Path) -> str:
    ap = Path(os.path.abspath(p))
    try:
        return ap.relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return ap.as_posix()


def membership_digest(records: Iterable[Record], root: Path) -> dict[str, Any]:
    """``{"n", "sha256"}`` of one split's records (paths relative to ``root``)."""
    lines = sorted(f"{_rel(r.path, root)}\t{r.label}" for r in records)
    h = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape"))
    return {"n": len(lines), "sha256": h.hexdigest()}


def split_membership(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The membership digest of every split the manifest has (see the module doc)."""
    return {
        s: membership_digest(manifest.split(s), manifest.root)
        for s in ALL_SPLITS
        if any(r.split == s for r in manifest.records)
    }


def membership_change(
    recorded: dict[str, Any] | None, records: Sequence[Record], root: Path, trained_root: str | None = None
) -> str | None:
    """Why ``records`` (one split as made now, relative to ``root``) are not the recorded split, or None.

    ``trained_root``: the dataset root of the training run; records that match relative to it match too
    (e.g. the run's own ``manifest.csv``, whose paths are absolute, given as the data)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return None
    now = membership_digest(records, root)
    if now["sha256"] == recorded["sha256"]:
        return None
    if trained_root and membership_digest(records, Path(trained_root))["sha256"] == recorded["sha256"]:
        return None
    return (
        f"the recorded split has {recorded.get('n')} images, the data now gives {now['n']}"
        f"{'' if now['n'] != recorded.get('n') else ' (the same count, but other images or labels)'}"
    )


def resume_manifest(saved_csv: Path, data_path: str, *, holdout: str = "") -> tuple[Manifest, list[str]]:
    """The run's ``manifest.csv`` as the manifest of a resumed run, and notes on what changed since.

    No split is made again (a saved split is read as it is). Images listed there that are gone are a
    :class:`DatasetError`; images the data holds now that the run never listed are ignored and counted
    in a note. ``data_path``: the run's ``data.path`` (its root makes the manifest's root, so the
    checkpoint's recorded membership stays relative to the dataset)."""
    saved_csv = Path(saved_csv)
    if not saved_csv.is_file():
        raise DatasetError(
            f"{_show(saved_csv)}: the run's manifest is missing; cannot resume on the same split"
        )
    saved = read_csv_manifest(saved_csv, val_fraction=0.0, test_fraction=0.0, require_all_classes=True)
    gone = [p for p, why in saved.skipped if "does not exist" in why or "is a folder" in why]
    if gone:
        raise DatasetError(
            f"{_show(saved_csv)}: {len(gone)} images of the run's split are missing from the data "
            f"(e.g. {gone[0]}); restore them, or start a new run"
        )
    if saved.skipped:
        p, why = saved.skipped[0]
        raise DatasetError(f"{_show(saved_csv)}: {len(saved.skipped)} rows cannot be used (e.g. {p}: {why})")
    notes = ["resumed: the run's own manifest.csv is the split (the data folder is not split again)"]
    root, layout = saved.root, saved.layout
    try:
        now = discover(data_path, require_all_classes=False)
    except DatasetError as exc:
        notes.append(
            f"the data at {data_path} cannot be listed now ({exc}); the run's manifest is used as is"
        )
    else:
        root, layout = now.root, now.layout
        known = {os.path.abspath(r.path) for r in saved.records}
        new = sorted(os.fspath(r.path) for r in now.records if os.path.abspath(r.path) not in known)
        if new:
            notes.append(
                f"{len(new)} images were added to the data since the run started and are ignored "
                f"(never trained on, never evaluated), e.g. {_show(new[0])}"
            )
    if holdout and not any(r.split == "external" for r in saved.records):
        notes.append(f"holdout_source {holdout!r}: the saved manifest has no external split")
    return replace(saved, root=root, layout=layout, notes=notes), notes


def checked_split(meta: dict[str, Any], path: str | Path, split: str) -> tuple[list[Record], str | None, str]:
    """The images of ``split`` of the data at ``path``, split as the checkpoint's training run split it
    (its ``data`` config: fractions, seed, held-out source), and the check against the membership the
    checkpoint recorded: ``(records, problem, kind)``. ``problem`` says how the data does not give the
    recorded split (None where it does). ``kind``: ``"none"`` for a checkpoint that records no membership
    (made before it was recorded), ``"same"`` where the data is the training dataset (the same root
    folder, or one of the same name: a moved copy), ``"other"`` for another dataset (an external test
    set; its split cannot hold the run's training images, and a mismatch is expected)"""
    data_cfg = (meta.get("config") or {}).get("data") or {}
    manifest = checkpoint_manifest(data_cfg, path)
    recs = manifest.split(split)
    membership = meta.get("split_membership")
    if not isinstance(membership, dict):
        return recs, None, "none"
    root = (meta.get("training_data") or {}).get("root")
    trained_root = root if isinstance(root, str) and root else None
    same = trained_root is None or (
        os.path.abspath(trained_root) == os.path.abspath(manifest.root)
        or Path(trained_root).name == manifest.root.name
    )
    recorded = membership.get(split)
    if recorded is None:
        change = f"the checkpoint's training run had no {split} split" if recs else None
    else:
        change = membership_change(recorded, recs, manifest.root, trained_root)
    return recs, change, "same" if same or change is None else "other"
