"""Batch inference from a checkpoint into a CSV or JSON predictions file.

Inputs are files, folders (searched recursively) or list files (one path per line). Files are read
in a stream, a batch at a time; an unreadable file gets a row with its error in ``status`` and the
rest are still predicted. Output is written to a temp file and renamed at the end (or, with
``--resume``, appended row by row and fsynced, so a killed run carries on where it stopped).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xraydx.io import ImageReadError, is_image_path, read_image
from xraydx.transforms import Preprocessing, normalize, preprocess

LIST_SUFFIXES = (".txt", ".lst", ".list")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


@torch.inference_mode()
def batch_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    spec: Preprocessing,
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    """Logits (N, C) on CPU for preprocessed uint8 images (N, S, S)."""
    model.eval()
    out = []
    n = len(images)
    for i in range(0, n, batch_size):
        chunk = images[i : i + batch_size]
        t = torch.as_tensor(np.ascontiguousarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
        x = normalize(t.to(device, non_blocking=True), spec.mean, spec.std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            y = model(x)
        out.append(y.float().cpu())
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out)


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files, folders (recursive, image suffixes only, symlink loops skipped) and list files -> paths."""
    paths: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            paths.extend(_walk_images(p))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            base = p.parent
            for line in p.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    paths.append(q if q.is_absolute() else base / q)
        elif p.exists() or p.is_symlink():
            paths.append(p)
        else:
            problems.append((p, "file not found"))
    return paths, problems


def _walk_images(root: Path) -> list[Path]:
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue  # symlink loop or a folder reached twice
        seen.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    stack.append(Path(e.path))
                elif is_image_path(e.name):
                    found.append(Path(e.path))
            except OSError:
                continue
    return sorted(found)


@dataclass
class Prediction:
    path: str
    probs: list[float] | None
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)


class Predictor:
    """A checkpoint loaded once; predicts uint8 images or files."""

    def __init__(self, checkpoint: str | Path, device: str = "auto") -> None:
        from xraydx.models import load_checkpoint

        self.device = resolve_device(device)
        self.model, self.meta = load_checkpoint(checkpoint, self.device)
        self.checkpoint = Path(checkpoint)
        self.classes: list[str] = list(self.meta["classes"])
        self.spec = Preprocessing.from_dict(self.meta["preprocessing"])
        self.temperature = float(self.meta.get("calibration", {}).get("temperature", 1.0))

    def prepare(self, img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if self.spec.lung_mask != "none" and mask is None:
            mask = self.lung_mask(img)
        return preprocess(img, self.spec, mask)

    def lung_mask(self, img: np.ndarray) -> np.ndarray:
        raise ImageReadError(
            None, f"this model was trained with lung_mask={self.spec.lung_mask}; pass a lung mask for each image"
        )

    def probs(self, images: np.ndarray) -> np.ndarray:
        logits = batch_logits(self.model, images, self.spec, self.device)
        return torch.softmax(logits / self.temperature, dim=1).numpy()

    def predict_files(
        self, paths: Iterable[Path], batch_size: int = 32, progress: bool = True, total: int | None = None
    ) -> Iterator[Prediction]:
        batch: list[tuple[Path, np.ndarray]] = []
        bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, leave=False)

        def flush() -> Iterator[Prediction]:
            if not batch:
                return
            arr = np.stack([a for _, a in batch])
            for (p, _), pr in zip(batch, self.probs(arr), strict=True):
                yield Prediction(str(p), [float(v) for v in pr])
            bar.update(len(batch))
            batch.clear()

        for p in paths:
            try:
                batch.append((p, self.prepare(read_image(p))))
            except (ImageReadError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, ImageReadError) else str(exc)
                bar.update(1)
                yield Prediction(str(p), None, f"error: {reason}")
                continue
            if len(batch) >= batch_size:
                yield from flush()
        yield from flush()
        bar.close()


def prediction_row(pred: Prediction, classes: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"path": pred.path}
    if pred.probs is None:
        row["prediction"] = ""
        row.update({f"prob_{c}": "" for c in classes})
    else:
        row["prediction"] = classes[int(np.argmax(pred.probs))]
        row.update({f"prob_{c}": f"{v:.6f}" for c, v in zip(classes, pred.probs, strict=True)})
    row["status"] = pred.status
    row.update(pred.extra)
    return row


def csv_columns(classes: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    return ["path", "prediction", *[f"prob_{c}" for c in classes], "status", *extra]


def write_predictions(
    preds: Iterable[Prediction],
    out: Path,
    classes: Sequence[str],
    *,
    fmt: str = "csv",
    overwrite: bool = False,
    resume: bool = False,
    extra_columns: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Write predictions atomically; return counts {"ok": n, "error": n}.

    resume (CSV only): rows already in ``out`` are kept, their paths skipped by the caller."""
    from xraydx.fsutil import atomic_open, refuse_overwrite

    counts = {"ok": 0, "error": 0}
    cols = csv_columns(classes, extra_columns)

    def tally(p: Prediction) -> None:
        if p.probs is None:
            counts["error"] += 1
            print(f"xraydx: {p.path}: {p.status.removeprefix('error: ')}", file=sys.stderr)
        else:
            counts["ok"] += 1

    if fmt == "json":
        if resume:
            raise ValueError("--resume works with CSV output only")
        refuse_overwrite(out, overwrite)
        rows = []
        for p in preds:
            tally(p)
            rows.append(prediction_row(p, classes))
        for r in rows:
            for c in classes:
                r[f"prob_{c}"] = float(r[f"prob_{c}"]) if r[f"prob_{c}"] != "" else None
        with atomic_open(out, "w", encoding="utf-8") as fh:
            json.dump({"model": meta or {}, "classes": list(classes), "predictions": rows}, fh, indent=1)
        return counts
    if fmt != "csv":
        raise ValueError(f"format must be csv or json; got {fmt!r}")
    if resume:
        # stream into <out>.partial, fsynced row by row; a rerun appends to it; renamed to <out> at the end
        partial = out.with_name(out.name + ".partial")
        if not partial.exists() and out.exists():
            shutil.copyfile(out, partial)
        new = not partial.exists()
        with open(partial, "a", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            if new:
                w.writeheader()
            for p in preds:
                tally(p)
                w.writerow(prediction_row(p, classes))
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(partial, out)
        return counts
    refuse_overwrite(out, overwrite)
    with atomic_open(out, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for p in preds:
            tally(p)
            w.writerow(prediction_row(p, classes))
    return counts


def done_paths(out: Path) -> set[str]:
    """Paths already predicted in a (possibly partial) CSV, for --resume."""
    done: set[str] = set()
    for cand in (out, out.with_name(out.name + ".partial")):
        if cand.exists():
            with open(cand, encoding="utf-8", newline="") as fh:
                for row in csv.DictReader(fh):
                    if row.get("path"):
                        done.add(row["path"])
    return done
