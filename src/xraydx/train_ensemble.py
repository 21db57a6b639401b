"""``xraydx train ensemble``: finished training runs of one recipe (e.g. its seeds) as one classifier.

The members must be alike: the same classes, architecture, preprocessing and split membership (the same
images in train, val and test). The result is a new run folder laid out as a training run's, whose
``checkpoints/best.safetensors`` holds every member's weights (:class:`xraydx.models.SeedEnsemble`:
the mean of the members' calibrated probabilities) and is used wherever a checkpoint is (predict,
evaluate, explain, export, serve, the DICOM node). The ensemble is then finished exactly as a training
run is (:func:`xraydx.finish.finish_run`): temperature and abstention threshold chosen on val, the test
split evaluated, ``metrics.json``, ``report.html`` and ``predictions.csv`` written, plus an ``ensemble``
block in ``metrics.json`` with every member's own figures.

Why: a leave-source-out crossval of a seed ensemble (``xraydx crossval ensemble``) raised the worst unseen
hospital and the share of out-of-source errors flagged over either seed alone (docs/generalisation.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xraydx import __version__, schema
from xraydx.checkpoint import save as save_checkpoint
from xraydx.config import Config
from xraydx.data.membership import split_membership
from xraydx.device import Dist, resolve_device
from xraydx.errors import TrainError, UsageError
from xraydx.finish import finish_run
from xraydx.fsutil import printable_path
from xraydx.models import SeedEnsemble, load_checkpoint, read_metadata
from xraydx.runchecks import new_run_dir
from xraydx.train import _open_run, load_data

#: what must be equal in every member's checkpoint metadata, and how to say it is not
ALIKE = {
    "classes": "classes",
    "architecture": "architecture",
    "preprocessing": "preprocessing",
    "split_membership": "split membership (the images of train, val and test)",
}

#: a member's metadata that describes that member alone: the ensemble's own is computed anew
MEMBER_ONLY = ("epoch", "val_metrics", "calibration", "abstention", "test_metrics", "test_metrics_deployed",
               "external_metrics", "tensors_sha256")  # fmt: skip


def member_checkpoint(member: str | Path) -> Path:
    """A run folder (its ``checkpoints/best.safetensors``) or a checkpoint file."""
    p = Path(member)
    ck = p / "checkpoints" / "best.safetensors" if p.is_dir() else p
    if not ck.is_file():
        raise UsageError(
            f"{printable_path(str(p))}: not a finished training run (no checkpoints/best.safetensors)"
            if p.is_dir()
            else f"{printable_path(str(p))}: no such run folder or checkpoint file"
        )
    return ck


def read_members(members: Sequence[str | Path]) -> list[tuple[Path, dict[str, Any], str]]:
    """Every member's checkpoint, metadata and model id (the file's digest, read once), refused (naming the
    member and what differs) unless they are alike, finished (calibrated on val) and distinct."""
    if len(members) < 2:
        raise UsageError("train ensemble: give at least two finished training runs")
    out: list[tuple[Path, dict[str, Any], str]] = []
    for m in members:
        ck = member_checkpoint(m)
        meta = read_metadata(ck)
        if meta.get("architecture", {}).get("member_temperatures"):
            raise UsageError(f"{printable_path(str(ck))}: already an ensemble; give its members instead")
        if "calibration" not in meta:
            raise UsageError(f"{printable_path(str(ck))}: the run has not finished (no calibration on val)")
        out.append((ck, meta, schema.model_id(ck, meta)))
    first_ck, first, _ = out[0]
    for ck, meta, _ in out:
        for key, what in ALIKE.items():
            if meta.get(key) != first.get(key):
                raise UsageError(
                    f"{printable_path(str(ck))}: its {what} differs from {printable_path(str(first_ck))}'s;"
                    " an ensemble's members must be trained alike on the same splits"
                )
    if len({mid for _, _, mid in out}) < len(out):
        raise UsageError("train ensemble: the same checkpoint given twice")
    return out


def _member_row(ck: Path, meta: dict[str, Any], mid: str) -> dict[str, Any]:
    test = meta.get("test_metrics") or {}
    return {
        "checkpoint": str(ck),
        "model_id": mid,
        "seed": meta.get("config", {}).get("train", {}).get("seed"),
        "epoch": meta.get("epoch"),
        "temperature": float(meta["calibration"].get("temperature", 1.0)),
        "val_macro_f1": (meta.get("val_metrics") or {}).get("macro_f1"),
        "test_macro_f1": test.get("macro_f1"),
        "test_balanced_accuracy": test.get("balanced_accuracy"),
    }


def build_ensemble(
    members: Sequence[str | Path], name: str, runs_dir: str | Path | None = None, *, device: str = "auto",
    progress: bool = True,
) -> Path:  # fmt: skip
    """Combine ``members`` into the run folder ``<runs_dir>/<name>`` (refused if it exists); returns it."""
    read = read_members(members)
    first = read[0][1]
    cfg = Config.from_dict(first["config"])
    if not cfg.data.cache_dir:  # the members' decoded-image cache, wherever the new run goes
        cfg.data.cache_dir = str(Path(cfg.runs_dir) / ".cache")
    cfg.name = name
    if runs_dir is not None:
        cfg.runs_dir = str(runs_dir)
    new_run_dir(cfg)  # refused (exit 2) before anything is read when the folder exists
    dev = resolve_device(device)
    d = Dist()
    run, log = _open_run(cfg, d, None, progress)
    rows = [_member_row(*m) for m in read]
    temps = [r["temperature"] for r in rows]
    log(f"ensemble of {len(read)} members: " + ", ".join(
        f"{r['checkpoint']} (seed {r['seed']}, test macro-F1 {r['test_macro_f1']})" for r in rows))  # fmt: skip
    manifest, spec, splits = load_data(cfg, d, run, log, progress)
    if split_membership(manifest) != first.get("split_membership"):
        raise TrainError(
            f"{cfg.data.path}: its splits are no longer the images the members were trained and validated on"
            " (the data changed since); retrain the members"
        )
    # load_checkpoint's errors name the member's file
    model = SeedEnsemble([load_checkpoint(ck, dev)[0] for ck, _, _ in read], temps).to(dev).eval()
    meta = {k: v for k, v in first.items() if k not in MEMBER_ONLY and k not in ("format", "format_version")}
    meta.update(
        tool_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=cfg.to_dict(), ensemble={"members": rows, "combine": "mean of calibrated probabilities"},
    )  # fmt: skip
    meta["architecture"] = {**first["architecture"], "member_temperatures": temps}
    save_checkpoint(run / "checkpoints" / "best.safetensors", model, meta)
    finish_run(run, cfg, spec, manifest, splits, dev, log, None, extra={"ensemble": meta["ensemble"]})
    return run
