"""Batch inference from a checkpoint into a CSV or JSON predictions file.

Inputs are files, folders (searched recursively) or list files (one path per line). Files are read
in a stream, a batch at a time; an unreadable file gets a row with its error in ``status`` and the
rest are still predicted. Output is written to a temp file and renamed at the end (or, with
``--resume``, appended row by row and fsynced, so a killed run carries on where it stopped).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xraydx.constants import UNCERTAIN_FLAG
from xraydx.device import resolve_device
from xraydx.fsutil import printable_path
from xraydx.io import ImageReadError, is_image_path, read_image
from xraydx.transforms import Preprocessing, normalize, preprocess

LIST_SUFFIXES = (".txt", ".lst", ".list")


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
        if isinstance(chunk, np.ndarray):
            # read-only arrays (memmaps, cached entries) are copied: torch cannot wrap them safely
            t = torch.from_numpy(np.ascontiguousarray(chunk) if chunk.flags.writeable else chunk.copy())
        else:
            t = chunk
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


def load_lung_segmenter() -> Any | None:
    """xraydx.segment's default lung segmenter, or None where the module or its shipped model is missing."""
    try:
        from xraydx.segment import LungSegmenter

        return LungSegmenter.default()
    except (ImportError, OSError, ValueError, RuntimeError):
        return None


class Predictor:
    """A checkpoint loaded once; predicts uint8 images or files."""

    def __init__(
        self, checkpoint: str | Path, device: str = "auto", engine: str = "torch", ood: bool = True
    ) -> None:
        """engine: ``torch`` (default) or ``onnx`` (onnxruntime; ``checkpoint`` may then also be an exported
        ``.onnx`` file, and a ``.safetensors`` checkpoint is exported in memory first). See xraydx.export.
        ood: check every file with xraydx.ood's guard in predict_files (status ``not_cxr`` + ``ood_score``)."""
        from xraydx.models import load_checkpoint

        self.device = resolve_device(device)
        self.engine = engine
        self.onnx: Any = None  # an xraydx.export.OnnxEngine with engine="onnx"
        if engine == "onnx":
            from xraydx.export import OnnxEngine

            self.onnx = OnnxEngine(checkpoint, device=self.device)
            self.meta = self.onnx.meta
            self.model = self.onnx.model  # None when the source is a .onnx file
            if self.model is not None:
                self.model.to(self.device)
        elif engine == "torch":
            self.model, self.meta = load_checkpoint(checkpoint, self.device)
        else:
            raise ValueError(f"engine must be torch or onnx; got {engine!r}")
        self.checkpoint = Path(checkpoint)
        self.classes: list[str] = list(self.meta["classes"])
        self.spec = Preprocessing.from_dict(self.meta["preprocessing"])
        self.temperature = float(self.meta.get("calibration", {}).get("temperature", 1.0))
        self.abstention: dict[str, Any] | None = self.meta.get("abstention") or None  # see docs/trust.md
        self._segmenter: Any = None
        self._ood: Any = None if ood else False  # xraydx.ood.OODGuard, loaded on first use; False: no check

    def flag(self, probs: Sequence[float] | np.ndarray) -> str:
        """UNCERTAIN_FLAG where the top calibrated probability is below the checkpoint's abstention
        threshold (chosen on validation at the end of training), else ""."""
        t = (self.abstention or {}).get("threshold")
        return UNCERTAIN_FLAG if t is not None and float(np.max(probs)) < float(t) else ""

    def prepare(self, img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if self.spec.lung_mask != "none" and mask is None:
            mask = self.lung_mask(img)
        return preprocess(img, self.spec, mask)

    def lung_mask(self, img: np.ndarray) -> np.ndarray:
        """A lung mask for a model trained with lung_mask=crop|mask: from xraydx.segment's shipped
        segmenter where installed (``LungSegmenter.default().predict_mask``), else an error."""
        if self._segmenter is None:
            self._segmenter = load_lung_segmenter() or False
            trained = (self.meta.get("lung_segmenter") or {}).get("identity")
            if self._segmenter and trained and trained != self._segmenter.identity:
                warnings.warn(
                    f"{self.checkpoint.name}: trained with lung masks from segmenter {trained}, but the installed"
                    f" segmenter is {self._segmenter.identity}: crops differ, predictions may shift",
                    stacklevel=2,
                )
        if not self._segmenter:
            raise ImageReadError(
                None,
                f"this model was trained with lung_mask={self.spec.lung_mask} and needs a lung mask for each image,"
                " but no lung segmenter is available (xraydx.segment with a shipped model); use a dataset with"
                " lung masks, or a model trained with lung_mask=none",
            )
        return self._segmenter.predict_mask(img)

    def ood_guard(self) -> Any | None:
        """The shipped OOD guard (on CPU, sharing the segmenter lung_mask uses), or None if off or missing."""
        if self._ood is None:
            try:
                from xraydx.ood import OODGuard

                self._ood = OODGuard.default()
            except (ImportError, OSError, ValueError) as exc:
                print(f"xraydx: warning: no out-of-distribution check ({exc})", file=sys.stderr)
                self._ood = False
        return self._ood or None

    def probs(self, images: np.ndarray) -> np.ndarray:
        if self.onnx is not None:
            logits = torch.from_numpy(self.onnx.batch_logits(images))
        else:
            logits = batch_logits(self.model, images, self.spec, self.device)
        return torch.softmax(logits / self.temperature, dim=1).numpy()

    def predict_files(
        self, paths: Iterable[Path], batch_size: int = 32, progress: bool = True, total: int | None = None
    ) -> Iterator[Prediction]:
        batch: list[tuple[Path, np.ndarray]] = []
        checks: list[Any] = []  # xraydx.ood.OODResult per batch entry, or None
        bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, leave=False)
        guard = self.ood_guard()

        def flush() -> Iterator[Prediction]:
            if not batch:
                return
            arr = np.stack([a for _, a in batch])
            for (p, _), pr, oc in zip(batch, self.probs(arr), checks, strict=True):
                extra: dict[str, Any] = {"flag": self.flag(pr)}
                if oc is not None:  # a non-CXR keeps its probabilities; status not_cxr says not to trust them
                    extra.update(ood_score=f"{oc.score:.3f}", ood=oc.to_dict())
                status = "ok" if oc is None or oc.is_cxr else "not_cxr"
                yield Prediction(str(p), [float(v) for v in pr], status, extra)
            bar.update(len(batch))
            batch.clear()
            checks.clear()

        for p in paths:
            try:
                img = read_image(p)
                oc = None
                if guard is not None:
                    from xraydx.ood import colourfulness_of_file

                    oc = guard.check(img, colourfulness_of_file(p))
                # the guard's mask is the shipped segmenter's (CPU), i.e. exactly what lung_mask() returns
                mask = oc.mask if oc is not None and self.spec.lung_mask != "none" else None
                batch.append((p, self.prepare(img, mask)))
                checks.append(oc)
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
    return ["path", "prediction", *[f"prob_{c}" for c in classes], "status", "ood_score", *extra]


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
            print(f"xraydx: {printable_path(p.path)}: {p.status.removeprefix('error: ')}", file=sys.stderr)
        else:
            counts["ok"] += 1
            if p.status == "not_cxr":
                counts["not_cxr"] = counts.get("not_cxr", 0) + 1
                why = "; ".join((p.extra.get("ood") or {}).get("reasons", []))
                print(f"xraydx: warning: {printable_path(p.path)}: does not look like a frontal chest X-ray"
                      f" (ood score {p.extra.get('ood_score', '?')}: {why}); its probabilities are not trustworthy",
                      file=sys.stderr)  # fmt: skip

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
        # stream into <out>.partial, fsynced row by row; a rerun carries it on; renamed to <out> at the end.
        # The rows kept (of the partial file, else of <out>) are rewritten atomically first, without a last
        # row torn by a kill mid-write: that file is then predicted again (done_paths skips it too).
        partial = out.with_name(out.name + ".partial")
        source = partial if partial.exists() else out
        header, kept = _complete_rows(source) if source.exists() else (None, [])
        if header is not None and header != cols:
            from xraydx.fsutil import OutputExistsError

            raise OutputExistsError(
                f"{source}: has the columns {','.join(header)}, not {','.join(cols)}; cannot --resume into it"
                " (choose another --out)"
            )
        with atomic_open(partial, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            cw = csv.writer(fh)
            cw.writerow(cols)
            cw.writerows(kept)
        with open(partial, "a", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            for p in preds:
                tally(p)
                w.writerow(prediction_row(p, classes))
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(partial, out)
        return counts
    refuse_overwrite(out, overwrite)
    with atomic_open(out, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for p in preds:
            tally(p)
            w.writerow(prediction_row(p, classes))
    return counts


def done_paths(out: Path) -> set[str]:
    """Paths already predicted for --resume: the complete rows of ``<out>.partial`` (a killed run's), else of
    ``out``; the same rows that write_predictions(resume=True) keeps."""
    partial = out.with_name(out.name + ".partial")
    source = partial if partial.exists() else out
    if not source.exists():
        return set()
    header, rows = _complete_rows(source)
    if header is None or "path" not in header:
        return set()
    i = header.index("path")
    return {r[i] for r in rows if r[i]}


def _complete_rows(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """Header and complete rows of a CSV that a kill may have cut short: a last line without its line end,
    and any row with the wrong number of fields, are dropped. Header None: the file has no complete line."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        text = fh.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return None, []
    return rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
