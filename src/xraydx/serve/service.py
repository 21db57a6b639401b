"""What the routes share: :class:`Service` holds the model, the engine, the inference thread and the limits,
checks the token, describes the model and answers one upload. It imports no FastAPI (the routes do)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xraydx import explain, schema
from xraydx.config import ServeConfig
from xraydx.constants import CROPPING_MODES, WEIGHTS_DIR
from xraydx.engines import PROBE_GLOB
from xraydx.errors import CheckpointError
from xraydx.frontal import view_reason_of_bytes
from xraydx.fsutil import file_sha256, json_safe
from xraydx.io_formats import sniff_format
from xraydx.ood import colourfulness_of_bytes
from xraydx.predict import NONFINITE, Checked, Predictor, finite
from xraydx.render import gray_png
from xraydx.serve.decoding import MemoryBudget, decode_cost
from xraydx.serve.errors import ApiError
from xraydx.serve.modelinfo import crop_box, names_only, ood_message, public_data_summary
from xraydx.serve.security import presented_token, token_matches
from xraydx.serve.uploads import content_notes, read_upload_image
from xraydx.serve.worker import InferenceWorker

log = logging.getLogger("xraydx.serve")

RENDER_MAX_SIDE = 1024  # the rendered input image sent back to the browser
NOTICE = "Research use only - not a diagnostic device."


@dataclass
class Decoded:
    image: np.ndarray
    fmt: str
    warnings: list[str]
    colour: float | None = None  # the file's colourfulness, for the out-of-distribution guard
    window: str | None = None  # how the reader windowed it (io's info["window"]): the guard's windowing hint
    view: str | None = None  # xraydx.frontal's reason where a DICOM header says not frontal


@dataclass
class Inspected:
    """One image after :meth:`Service.check`: what the classifier sees, and the lung crop's box."""

    checked: Checked
    box: tuple[int, int, int, int] | None  # (top, bottom, left, right) in the decoded image, or None


class ClientGone(Exception):
    """The client of a request went away; its queued work is skipped."""


def ood_warning(info: Mapping[str, Any], guard_threshold: float | None = None) -> str:
    """The warning put first in a response whose image the out-of-distribution check flags."""
    score = info.get("score")
    s = f" (score {float(score):.3g})" if isinstance(score, (int, float)) else ""
    why = ood_message(info, guard_threshold)
    return (
        f"This does not look like a frontal chest X-ray{s}{': ' + why if why else ''}. The class probabilities"
        " below are not trustworthy for this image."
    )


def _png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render_png(img: np.ndarray, max_side: int = RENDER_MAX_SIDE) -> bytes:
    """The decoded image for the browser (xraydx.render's encoder; longest side at most ``max_side``)."""
    return gray_png(img, max_side=max_side, compress_level=3)


class Service:
    """Everything the routes share: the predictor, the engine, the inference thread, the limits."""

    def __init__(self, config: ServeConfig) -> None:
        import anyio

        cfg = self.config = config  # validated by ServeConfig itself
        checkpoint = Path(cfg.checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"{checkpoint}: checkpoint not found")
        if cfg.threads:
            import torch

            torch.set_num_threads(int(cfg.threads))
        self.started = time.time()
        self.checkpoint = checkpoint
        # the whole pipeline (lung segmenter, OOD guard, classifier) on one engine; see xraydx.engines
        self.predictor = Predictor(checkpoint, cfg.device, engine=cfg.engine, threads=int(cfg.threads or 0))
        self.engine_name = cfg.engine
        self.meta: dict[str, Any] = self.predictor.meta
        self.classes = list(self.predictor.classes)
        self.spec = self.predictor.spec
        self.worker = InferenceWorker(
            self.predictor,
            max_batch=cfg.max_batch,
            window_s=cfg.batch_window_ms / 1000.0,
            heat_fn=self.heat_batch,
        )
        self.token = cfg.token.encode("utf-8") if cfg.token else None
        self.max_upload_bytes = int(cfg.max_upload_bytes)
        self.max_batch_files = int(cfg.max_batch_files)
        # decoding: a few threads, and one byte budget shared by every decode and decoded image in flight
        self.decode_limiter = anyio.CapacityLimiter(max(2, min(4, os.cpu_count() or 2)))
        self.decode_budget = MemoryBudget(cfg.decode_memory_bytes)
        self.max_pixels = int(cfg.max_pixels)
        self.max_queue = int(cfg.max_queue)
        self.pending = 0  # images admitted and not yet answered
        self.skipped = 0  # requests whose client went away before their work was done
        self.refused_busy = 0
        self.warm_up_result: dict[str, Any] = {"ok": None, "message": "not run yet"}
        self.sha256 = file_sha256(checkpoint)
        self.model_id = self.predictor.model_id  # the model_id column of every output (xraydx.schema)
        self.explain: Any = explain  # Grad-CAM; None (tests) where the response should say it is missing
        self._cam: Any = None
        self.ood_check = self.predictor.ood_guard() is not None  # loaded now, not on the first request
        self.ood_note = (
            "xraydx.ood guard (lung segmenter + feature distance to real chest X-rays)"
            if self.ood_check
            else "out-of-distribution check unavailable in this installation (the server log says why)"
        )
        # a model trained on lung masks cannot run without the segmenter: the server's limit, not the file's
        self.unavailable = (
            f"this model was trained with lung_mask={self.spec.lung_mask} and needs a lung mask for each"
            " image, but no lung segmenter is available on this server"
            if self.spec.lung_mask != "none" and self.predictor.segmenter() is None
            else None
        )
        self.threshold = self.predictor.threshold
        self.abstention_note = self.predictor.abstention_note()
        # training could not reach the abstention target: every prediction is flagged (never the green box)
        rule = self.meta.get("abstention") if isinstance(self.meta.get("abstention"), dict) else {}
        self.flag_all = bool(rule.get("flag_all")) and self.threshold is not None
        self.flag_all_reason = str(
            rule.get("reason") or "the abstention target was not reached on validation"
        )
        cal = self.meta.get("calibration") or {}
        self.calibrated = cal.get("method", "none") != "none" and "temperature" in cal
        self.static_warnings: list[str] = []
        if not self.calibrated:
            self.static_warnings.append(
                "probabilities are not calibrated (the checkpoint has no temperature)"
            )
        if self.threshold is None:
            self.static_warnings.append(self.abstention_note)

    # -- auth -----------------------------------------------------------------------------------

    def check_token(self, headers: Mapping[str, str]) -> None:
        """Raise 401 unless the request's headers carry this server's token (when it has one)."""
        if self.token is not None and not token_matches(presented_token(headers), self.token):
            raise ApiError(401, "unauthorized", "missing or wrong API token (Authorization: Bearer <token>)")

    # -- model info -----------------------------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        m = self.meta
        return names_only(json_safe(
            {
                "model_id": self.model_id,
                "checkpoint": self.checkpoint.name,
                "sha256": self.sha256,
                "engine": self.engine_name,
                "classes": self.classes,
                "architecture": m.get("architecture"),
                "input_size": m.get("input_size"),
                "preprocessing": self.spec.to_dict(),
                "calibration": m.get("calibration"),
                "calibrated": self.calibrated,
                "abstention": {
                    "rule": m.get("abstention") if self.threshold is not None else None,
                    "threshold": self.threshold,
                    "note": self.abstention_note,
                    "flag_all": self.flag_all,
                    "reason": self.flag_all_reason if self.flag_all else None,
                },
                "val_metrics": names_only(m.get("val_metrics")),
                "test_metrics": names_only(m.get("test_metrics")),
                "training_data": public_data_summary(
                    m.get("training_data"), ((m.get("config") or {}).get("data") or {}).get("path")
                ),
                "epoch": m.get("epoch"),
                "created": m.get("created"),
                "tool_version": m.get("tool_version"),
                "heatmaps": self.explain is not None,
                "ood_check": self.ood_check,
                "ood_note": self.ood_note,
                "limits": {
                    "max_upload_bytes": self.max_upload_bytes,
                    "max_batch_files": self.max_batch_files,
                    "max_pixels": self.max_pixels,
                    "decode_memory_bytes": self.decode_budget.total,
                    "max_queue": self.max_queue,
                },
                "notice": NOTICE,
            }
        ))  # fmt: skip

    def health(self) -> dict[str, Any]:
        """Liveness and the start-up check: ``status`` is ``ok`` only after a real prediction of a probe image
        succeeded (``error`` where it failed, ``starting`` before it ran)."""
        ok = self.warm_up_result.get("ok")
        return {
            "status": "ok" if ok else ("starting" if ok is None else "error"),
            "warm_up": dict(self.warm_up_result),
            "model_id": self.model_id,
            "engine": self.engine_name,
            "uptime_s": round(time.time() - self.started, 1),
            "batches": self.worker.batches,
            "images": self.worker.images,
            "queued": self.pending,
            "skipped_gone": self.skipped,
            "refused_busy": self.refused_busy,
            "decode_memory": {
                "used": self.decode_budget.used,
                "peak": self.decode_budget.peak,
                "total": self.decode_budget.total,
            },  # fmt: skip
        }

    async def warm_up(self) -> dict[str, Any]:
        """One real prediction of a shipped probe X-ray through the whole pipeline (decode, lung mask, OOD
        guard, classifier), run at start; :meth:`health` reports its result."""
        probes = sorted(WEIGHTS_DIR.glob(PROBE_GLOB))
        t0 = time.perf_counter()
        try:
            if not probes:
                raise CheckpointError(f"no probe image ({PROBE_GLOB}) in {WEIGHTS_DIR.name}/")
            d = await self.predict_one(probes[0].read_bytes(), probes[0].name, heatmap=False, image=False)
            probs = np.array(list(d["probabilities"].values()), dtype=np.float64)
            if not (np.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-3):
                raise CheckpointError(f"the model gave invalid probabilities {probs.tolist()} for the probe")
            self.warm_up_result = {"ok": True, "probe": probes[0].name,
                                   "ms": round((time.perf_counter() - t0) * 1000, 1)}  # fmt: skip
        except Exception as exc:
            msg = exc.message if isinstance(exc, ApiError) else str(exc)
            self.warm_up_result = {
                "ok": False,
                "message": f"warm-up prediction failed: {msg or type(exc).__name__}",
            }
            log.error("%s; /api/health answers 503", self.warm_up_result["message"])
        return self.warm_up_result

    @contextlib.contextmanager
    def admit(self, n: int = 1) -> Iterator[None]:
        """Admit ``n`` images to the queue, or 503 when the queue (``max_queue``) cannot take them."""
        if self.pending + n > self.max_queue:
            self.refused_busy += 1
            raise ApiError(
                503, "busy",
                f"the server is busy ({self.pending} images queued, at most {self.max_queue}); retry shortly",
            )  # fmt: skip
        self.pending += n
        try:
            yield
        finally:
            self.pending -= n

    # -- one file: the steps --------------------------------------------------------------------

    def decode(self, data: bytes, name: str) -> Decoded:
        """Sniff and decode one upload and note what is odd about it; runs in a worker thread."""
        info: dict[str, Any] = {}
        img, fmt = read_upload_image(data, name, info)
        colour = colourfulness_of_bytes(bytes(data)) if self.ood_check else None
        notes = content_notes(img, data, fmt, self.spec.size)
        view = view_reason_of_bytes(bytes(data)) if fmt == "dicom" else None
        return Decoded(img, fmt or "unknown", notes, colour, info.get("window"), view)

    def check(self, dec: Decoded, name: str) -> Inspected:
        """Predictor.check, the pipeline's one per-image check (the lung mask, the OOD guard, the one
        preprocessing function), and the crop box; runs on the inference thread. 422 where the image cannot
        be used."""
        if self.unavailable is not None:
            raise ApiError(503, "model_unavailable", f"{name}: {self.unavailable}", name)
        checked = self.predictor.check([dec.image], [dec.colour], [dec.window], [dec.view])[0]
        if isinstance(checked, str):
            raise ApiError(422, "cannot_preprocess", f"{name}: {checked}", name)
        box = None
        if self.spec.lung_mask in CROPPING_MODES:
            mask = checked.ood.mask if checked.ood is not None else None
            if mask is None:
                mask = self.predictor.lung_mask(dec.image)
            box = crop_box(dec.image.shape, mask, self.spec)
        return Inspected(checked, box)

    def guard_threshold(self) -> float | None:
        guard = self.predictor.ood_guard() if self.ood_check else None
        t = getattr(guard, "threshold", None)
        return float(t) if isinstance(t, (int, float)) else None

    async def decoded(self, data: bytes, name: str) -> tuple[Decoded, int]:
        """Decode within the byte budget: the header's estimate is reserved for the decode, then only the
        decoded image's bytes stay reserved; returns them (the caller releases them when it answers)."""
        import anyio.to_thread

        cost = await anyio.to_thread.run_sync(
            decode_cost, data, name, self.max_pixels, self.decode_budget.total, limiter=self.decode_limiter
        )
        total = self.decode_budget.total
        if cost is not None:
            need = min(cost.decode_bytes, total)
        else:  # not an image (refused at once, nothing decoded), or a header unread here: then decode it alone
            need = 0 if sniff_format(bytes(data[:16384])) is None else total
        keep = cost.result_bytes if cost is not None else 0
        await self.decode_budget.acquire(need)
        try:
            dec = await anyio.to_thread.run_sync(self.decode, data, name, limiter=self.decode_limiter)
        except BaseException:
            self.decode_budget.release(need)
            raise
        keep = min(keep or dec.image.size, need)
        self.decode_budget.release(need - keep)
        return dec, keep

    def heat_batch(self, images: np.ndarray, classes: list[int]) -> np.ndarray:
        """Grad-CAM heat maps (N, S, S) for preprocessed images; runs on the inference thread."""
        if self._cam is None:
            self._cam = self.explain.GradCAM(self.predictor.model, self.spec)
        imgs = np.array(images)  # a writable copy for torch
        if hasattr(self._cam, "batch"):
            heats, _ = self._cam.batch(imgs, np.asarray(classes, dtype=np.int64))
            return np.asarray(heats, dtype=np.float32)
        return np.stack(
            [
                np.asarray(self._cam(im, class_idx=c)[0], np.float32)
                for im, c in zip(imgs, classes, strict=True)
            ]
        )

    def heatmap_payload(self, prepared: np.ndarray, heat: np.ndarray, class_idx: int) -> dict[str, Any]:
        """The heat map as PNGs for the response (runs in a worker thread, off the inference thread)."""
        crop = self.spec.lung_mask in CROPPING_MODES
        return {
            "class": self.classes[class_idx],
            "overlay_png": _png_b64(self.explain.overlay_png(prepared, heat)),
            "heat_png": _png_b64(self.explain.heat_png(heat)),
            "size": [int(heat.shape[1]), int(heat.shape[0])],
            # preprocess stretches the whole image to the square input unless it crops to the lungs
            "aligned_to": "model_input" if crop else "image",
            "model_input_png": _png_b64(render_png(prepared)) if crop else None,
        }

    async def _heatmap(
        self, prepared: np.ndarray, idx: int, name: str, warns: list[str]
    ) -> dict[str, Any] | None:
        """Grad-CAM of the predicted class (batched on the inference thread, encoded off it)."""
        import anyio.to_thread

        if self.explain is None:
            warns.append("heatmaps are not available: this xraydx has no Grad-CAM module (xraydx.explain)")
            return None
        try:
            raw = await asyncio.wrap_future(self.worker.submit_heat(prepared, idx))
            return await anyio.to_thread.run_sync(self.heatmap_payload, prepared, raw, idx)
        except Exception as exc:
            log.exception("Grad-CAM failed for %s", name)
            warns.append(f"the heatmap could not be computed ({type(exc).__name__}: {exc})")
            return None

    def uncertainty(self, confidence: float, agree: bool | None = None) -> tuple[bool | None, dict[str, Any]]:
        """The abstention rule (``Predictor.uncertain``) applied to one prediction's top probability and,
        for an ensemble, its members' agreement."""
        uncertain = True if self.flag_all else self.predictor.uncertain([confidence], agree)
        message = (
            "uncertain: refer to a radiologist"
            if uncertain
            else ("within the model's confidence rule" if uncertain is False else None)
        )
        out = {"threshold": self.threshold, "rule": self.abstention_note, "message": message,
               "flag_all": self.flag_all, "members_agree": agree}  # fmt: skip
        if uncertain and agree is False and self.predictor.members_rule and not self.flag_all:
            out["message"] = (
                "uncertain: the ensemble's networks pick different classes; refer to a radiologist"
            )
        if self.flag_all:
            out["message"] = f"uncertain: every prediction of this model is flagged ({self.flag_all_reason})"
            out["reason"] = self.flag_all_reason
        return uncertain, out

    # -- one file -------------------------------------------------------------------------------

    async def predict_one(self, data: bytes, name: str, *, heatmap: bool, image: bool) -> dict[str, Any]:
        """The response for one upload: probabilities, uncertainty, OOD, optional heat map and rendering."""
        t0 = time.perf_counter()
        dec, held = await self.decoded(data, name)
        try:
            return await self._answer(dec, name, heatmap=heatmap, image=image, t0=t0)
        finally:
            self.decode_budget.release(held)

    async def _answer(
        self, dec: Decoded, name: str, *, heatmap: bool, image: bool, t0: float
    ) -> dict[str, Any]:
        import anyio.to_thread

        seen = await asyncio.wrap_future(self.worker.submit_call(lambda: self.check(dec, name)))
        checked, prepared = seen.checked, seen.checked.prepared
        t1 = time.perf_counter()
        probs, agree = await asyncio.wrap_future(self.worker.submit_probs(prepared))
        if not finite(probs):  # a damaged model: an error, never a class (the rule predict applies)
            raise ApiError(500, "non_finite_output", f"{name}: {NONFINITE}", name)
        t2 = time.perf_counter()
        idx = int(np.argmax(probs))
        warns = list(dec.warnings) + list(self.static_warnings)
        ood = json_safe(checked.ood_info())
        ood_text = None
        if ood and ood["flagged"]:
            ood_text = ood_message(ood, self.guard_threshold())
            warns.insert(0, ood_warning(ood, self.guard_threshold()))
        t3 = time.perf_counter()
        heat = await self._heatmap(prepared, idx, name, warns) if heatmap else None
        t4 = time.perf_counter()
        show = image or heatmap
        rendered = await anyio.to_thread.run_sync(render_png, dec.image) if show else None
        model_input = await anyio.to_thread.run_sync(render_png, prepared) if show else None
        uncertain, uncertainty = self.uncertainty(float(probs[idx]), agree)
        ex = checked.extra()
        row = schema.make_row(
            name, self.classes, [float(p) for p in probs], checked.status, model=self.model_id,
            flag=self.predictor.flag(probs, checked.shift, agree), ood_score=ex["ood_score"], ood_reason=ex["ood_reason"],
            shift_score=ex["shift_score"], kind="serve",
        )  # fmt: skip
        t5 = time.perf_counter()
        return json_safe(
            {
                "file": name,
                "format": dec.fmt,
                "width": int(dec.image.shape[1]),
                "height": int(dec.image.shape[0]),
                "classes": self.classes,
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs, strict=True)},
                "predicted_class": self.classes[idx],
                "confidence": float(probs[idx]),
                "status": row["status"],
                "flag": row["flag"],  # "not a frontal chest X-ray": the page shows no headline class
                "row": row,  # the one prediction schema (xraydx.schema), as predict writes it
                "calibrated": self.calibrated,
                "uncertain": uncertain,
                "uncertainty": uncertainty,
                "ood": ood,
                "ood_message": ood_text,
                "heatmap": heat,
                "image_png": _png_b64(rendered) if rendered is not None else None,
                "model_input_png": _png_b64(model_input) if model_input is not None else None,
                "crop_box": (
                    dict(zip(("top", "bottom", "left", "right"), seen.box, strict=True)) if seen.box else None
                ),
                "model_id": self.model_id,
                "engine": self.engine_name,
                "processing_ms": {
                    "decode": round((t1 - t0) * 1000, 2),
                    "inference": round((t2 - t1) * 1000, 2),
                    "heatmap": round((t4 - t3) * 1000, 2) if heatmap else None,
                    "total": round((t5 - t0) * 1000, 2),
                },
                "warnings": warns,
                "notice": NOTICE,
            }
        )
