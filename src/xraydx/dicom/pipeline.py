"""One received (or pulled) DICOM instance -> screened, classified, results built, recorded.

The same steps for ``xraydx dicom listen`` and ``xraydx dicom pull``:

1. **Screen the header** (:func:`screen`): the SOP class must be CR, DX (for presentation or for
   processing) or Secondary Capture of the chest (BodyPartExamined CHEST); the body part, where given,
   the chest; the view frontal (ViewPosition AP/PA, or absent: then the OOD guard decides; lateral and
   other views, a lateral ViewCodeSequence or an ImageLaterality of L/R are skipped); pixel data present;
   the transfer syntax decodable here; the size within io's limits.
2. **Classify** through ``Predictor.predict_files`` of xraydx.predict, i.e. exactly what ``xraydx predict``
   does with the file: io's DICOM reader (Modality LUT, VOI LUT, MONOCHROME1), the OOD guard, the lung
   segmenter where the model needs it, the calibrated softmax and the uncertainty flag.
3. **Build results**: a TID 1500 Comprehensive SR, and with ``heatmap`` a Grad-CAM Secondary Capture
   (xraydx.dicom.sr), written to ``<out>/results/<SOPInstanceUID>.dcm``.

Each outcome carries the DIMSE status a C-STORE SCP answers with: success (0x0000) for a classified image
and for one skipped for a clinical reason (modality, view, the guard); 0xA900 for an image without pixel
data; 0xC000 for data the node cannot decode (unsupported transfer syntax, corrupt or truncated pixel
data); 0xA700 over the size limit; 0x0110 for an unexpected failure of the node itself.

One Predictor serves every association: classification is serialised by a lock.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from xraydx.dicom.results import Record, clean_code, clean_uid
from xraydx.dicom.sr import Classification, ModelInfo, build_heatmap_sc, build_sr
from xraydx.frontal import view_reason
from xraydx.fsutil import atomic_write_bytes
from xraydx.io import MAX_FILE_BYTES, MAX_PIXELS, ImageReadError

__all__ = ["ACCEPTED_SOP_CLASSES", "Outcome", "Pipeline", "decodable_transfer_syntaxes", "screen"]

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ACCEPTED_SOP_CLASSES = {CR: "CR", DX_PRESENTATION: "DX", DX_PROCESSING: "DX", SECONDARY_CAPTURE: "SC"}
CHEST_PARTS = {"CHEST", "THORAX", "LUNG"}
DEFLATED = "1.2.840.10008.1.2.1.99"

SUCCESS, OUT_OF_RESOURCES, NOT_MATCHING_SOP_CLASS, CANNOT_UNDERSTAND, PROCESSING_FAILURE = (
    0x0000, 0xA700, 0xA900, 0xC000, 0x0110,
)  # fmt: skip


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data pydicom can decode in this environment (deflate excluded: io
    refuses it before decoding, as it would be inflated into memory before any size check)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        AllTransferSyntaxes,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    native = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    out = list(native)
    for uid in AllTransferSyntaxes:
        if uid in native or uid == DEFLATED:
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(str(uid))
        except NotImplementedError:
            continue
    return out


@dataclass
class Outcome:
    record: Record
    dimse_status: int
    results: list[Path] = field(default_factory=list)  # result files written (SR, then the SC)


def _ids(ds: Dataset) -> dict[str, str]:
    return {
        "sop_instance_uid": clean_uid(ds.get("SOPInstanceUID")),
        "study_instance_uid": clean_uid(ds.get("StudyInstanceUID")),
        "series_instance_uid": clean_uid(ds.get("SeriesInstanceUID")),
        "sop_class_uid": clean_uid(ds.get("SOPClassUID")),
        "modality": clean_code(ds.get("Modality")),
    }


def screen(ds: Dataset, size: int, decodable: set[str]) -> tuple[str, int] | None:
    """(skip reason, DIMSE status) for an instance that is not classified, or None to classify it."""
    sop_class = str(ds.get("SOPClassUID", ""))
    kind = ACCEPTED_SOP_CLASSES.get(sop_class)
    modality = clean_code(ds.get("Modality")) or "unknown"
    part = clean_code(ds.get("BodyPartExamined")).upper()
    if kind is None:
        return f"modality {modality} is not CR/DX/chest SC", SUCCESS
    if kind == "SC" and part not in CHEST_PARTS:
        return f"Secondary Capture of body part {part or 'unknown'}, not the chest", SUCCESS
    if part and part not in CHEST_PARTS:
        return f"body part {part} is not the chest", SUCCESS
    view = view_reason(ds)  # the one view rule (xraydx.frontal), as predict, explain and serve apply it
    if view:
        return view, SUCCESS
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "no pixel data", NOT_MATCHING_SOP_CLASS
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts not in decodable:
        name = pydicom.uid.UID(ts).name if ts else "none"
        return f"unsupported transfer syntax {clean_code(name, 48)}", CANNOT_UNDERSTAND
    if size > MAX_FILE_BYTES:
        return f"over the size limit ({size} bytes; limit {MAX_FILE_BYTES})", OUT_OF_RESOURCES
    with contextlib.suppress(TypeError, ValueError):
        pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        if pixels > MAX_PIXELS:
            return f"over the size limit ({pixels} pixels; limit {MAX_PIXELS})", OUT_OF_RESOURCES
    return None


class Pipeline:
    """Screens, classifies and builds the results of instances; one per node or pull run.

    predictor: an xraydx.predict.Predictor (built as ``xraydx predict`` builds it); out: the output folder
    (``incoming/`` for the files being classified, ``received/`` with keep, ``results/``)."""

    def __init__(self, predictor: Any, out: Path, *, heatmap: bool = False, keep: bool = False) -> None:
        self.predictor = predictor
        self.model = ModelInfo.from_predictor(predictor)
        self.out = Path(out)
        self.heatmap = heatmap
        self.keep = keep
        for sub in ("incoming", "results") + (("received",) if keep else ()):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        for stale in (self.out / "incoming").glob(
            "*.dcm"
        ):  # a killed run's; never answered, so resent by the PACS
            with contextlib.suppress(OSError):
                stale.unlink()
        self.decodable = set(decodable_transfer_syntaxes())
        self._lock = threading.Lock()
        self._cam: Any = None
        # one series per run and kind, in each study: results of one run are grouped in the PACS
        self._series: dict[tuple[str, str], str] = {}
        if heatmap and getattr(predictor, "model", None) is None:
            raise ValueError("heatmaps need the PyTorch model (Grad-CAM): pass the .safetensors, not .onnx")

    def warm_up(self) -> None:
        """Load the OOD guard and the lung segmenter and run the model once, so that the first C-STORE is
        not answered seconds late (an SCU's DIMSE timeout may be as short as 10 s)."""
        p = self.predictor
        p.ood_guard()
        img = np.full((p.spec.size, p.spec.size), 128, np.uint8)
        with contextlib.suppress(ImageReadError, ValueError):
            p.probs(p.prepare(img)[None])

    def series_uid(self, study: str, kind: str) -> str:
        with self._lock:
            key = (study, kind)
            if key not in self._series:
                self._series[key] = pydicom.uid.generate_uid()
            return self._series[key]

    def process(self, raw: bytes, ds: Dataset, *, event: str, calling_ae: str = "") -> Outcome:
        """Classify one instance given as DICOM file bytes (``raw``) and its parsed dataset (``ds``).
        Never raises for bad data: every problem becomes the outcome's status."""
        t0 = time.perf_counter()
        rec = Record(event=event, calling_ae=clean_code(calling_ae), model_id=self.model.model_id, **_ids(ds))
        try:
            out = self._process(raw, ds, rec)
        except (
            Exception
        ) as exc:  # the node must not die on one instance: record it, answer "processing failure"
            rec.status = f"error: internal failure ({type(exc).__name__})"
            rec.probs, rec.flag, rec.ood_reason = None, "", ""  # an error row holds no prediction
            out = Outcome(rec, PROCESSING_FAILURE)
        rec.dimse_status = f"0x{out.dimse_status:04X}"
        rec.elapsed_ms = f"{(time.perf_counter() - t0) * 1000:.0f}"
        return out

    def _process(self, raw: bytes, ds: Dataset, rec: Record) -> Outcome:
        if not rec.sop_instance_uid or rec.sop_instance_uid == "invalid":
            rec.status = "error: no valid SOP Instance UID"
            return Outcome(rec, CANNOT_UNDERSTAND)
        skip = screen(ds, len(raw), self.decodable)
        if skip is not None:
            reason, status = skip
            rec.status = f"skipped: {reason}"
            rec.ood_reason = view_reason(ds) or ""  # flagged "not a frontal chest X-ray" (xraydx.schema)
            return Outcome(rec, status)
        path = self.out / "incoming" / f"{rec.sop_instance_uid}.dcm"
        atomic_write_bytes(path, raw)
        try:
            with self._lock:
                pred = next(iter(self.predictor.predict_files([path], batch_size=1, progress=False)))
                overlay = self._overlay(path, pred) if self.heatmap and pred.status == "ok" else None
        finally:
            self._dispose(path, rec.sop_instance_uid)
        if pred.probs is None:
            rec.status = pred.status  # "error: <reason>" from io's reader
            return Outcome(rec, CANNOT_UNDERSTAND)
        ood_score = pred.extra.get("ood_score")
        rec.ood_score = ood_score
        if pred.status == "not_cxr":
            why = str(pred.extra.get("ood_reason") or f"score {ood_score}")[:200]
            rec.status = f"skipped: not a frontal chest X-ray (OOD guard: {why})"
            rec.ood_reason = why
            return Outcome(rec, SUCCESS)
        rec.probs, rec.flag = list(pred.probs), str(pred.extra.get("flag") or "")
        rec.shift_score = pred.extra.get("shift_score")
        return Outcome(rec, SUCCESS, self._results(ds, rec, ood_score, overlay))

    def _overlay(self, path: Path, pred: Any) -> np.ndarray | None:
        from xraydx.explain import GradCAM, overlay
        from xraydx.io import read_image

        p = self.predictor
        if self._cam is None:
            self._cam = GradCAM(p.model, p.spec, temperature=p.temperature)
        try:
            img = p.prepare(read_image(path))
        except (ImageReadError, ValueError):
            return None
        heat, _ = self._cam(img, int(np.argmax(pred.probs)))
        return overlay(img, heat)

    def _results(self, ds: Dataset, rec: Record, ood_score: Any, overlay: np.ndarray | None) -> list[Path]:
        result = Classification(
            rec.probs or [], rec.flag, None if ood_score in (None, "") else float(ood_score)
        )
        header = _header_only(ds)
        sr = build_sr(header, result, self.model, series_uid=self.series_uid(rec.study_instance_uid, "sr"))
        written = [self._save(sr)]
        if overlay is not None:
            top = self.model.classes[int(np.argmax(result.probs))]
            sc = build_heatmap_sc(
                header, overlay, self.model, top, series_uid=self.series_uid(rec.study_instance_uid, "sc")
            )
            written.append(self._save(sc))
        rec.results = [p.stem for p in written]
        return written

    def _save(self, ds: Dataset) -> Path:
        path = self.out / "results" / f"{ds.SOPInstanceUID}.dcm"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def _dispose(self, path: Path, uid: str) -> None:
        if self.keep:
            os.replace(path, self.out / "received" / f"{uid}.dcm")
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _header_only(ds: Dataset) -> Dataset:
    """The dataset without its pixel data (the SR and SC reference the image; they do not copy it)."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0 or elem.keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            continue
        out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def parse(raw: bytes) -> Dataset:
    """A DICOM file's bytes -> Dataset (raises for data pydicom cannot parse)."""
    return pydicom.dcmread(io.BytesIO(raw), force=False)
