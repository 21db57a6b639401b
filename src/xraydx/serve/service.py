"""What the routes share: :class:`Service` holds the model, the engine, the inference thread and the limits,
checks the token, describes the model and answers one upload. It imports no FastAPI (the routes do)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xraydx import explain
from xraydx.config import ServeConfig
from xraydx.errors import CheckpointError
from xraydx.fsutil import file_sha256, json_safe
from xraydx.ood import colourfulness_of_bytes
from xraydx.predict import Checked, Predictor
from xraydx.serve.errors import ApiError
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


def ood_warning(info: Mapping[str, Any]) -> str:
    """The warning put first in a response whose image the out-of-distribution check flags."""
    score = info.get("score")
    s = f" (score {float(score):.3g})" if isinstance(score, (int, float)) else ""
    why = f": {info['reason']}" if info.get("reason") else ""
    return (
        f"This does not look like a frontal chest X-ray{s}{why}. The class probabilities below are not"
        " trustworthy for this image."
    )


def _png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render_png(img: np.ndarray, max_side: int = RENDER_MAX_SIDE) -> bytes:
    """The decoded grayscale image as an 8-bit PNG (longest side at most ``max_side``)."""
    import io

    from PIL import Image

    im = Image.fromarray(img)
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize(
            (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR
        )
    out = io.BytesIO()
    im.save(out, format="PNG", compress_level=3)
    return out.getvalue()


def public_data_summary(summary: Any, data_path: Any = None) -> Any:
    """The training-data summary without the server's folder layout: ``root`` is only the dataset folder's
    name, and ``name`` the dataset's (the folder, or the manifest CSV's file name; from the training
    config's ``data.path`` for checkpoints older than the ``name`` key)."""
    if not isinstance(summary, Mapping):
        return summary
    out = dict(summary)
    if out.get("root"):
        out["root"] = Path(str(out["root"])).name
    name = out.get("name") or (Path(str(data_path)).name if data_path else None) or out.get("root")
    if name:
        out["name"] = Path(str(name)).name
    return out


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
        self.decode_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.sha256 = file_sha256(checkpoint)
        self.model_id = f"{self.meta['architecture']['name']}-{self.sha256[:12]}"
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
        return json_safe(
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
                },
                "val_metrics": m.get("val_metrics"),
                "test_metrics": m.get("test_metrics"),
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
                },
                "notice": NOTICE,
            }
        )

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model_id": self.model_id,
            "engine": self.engine_name,
            "uptime_s": round(time.time() - self.started, 1),
            "batches": self.worker.batches,
            "images": self.worker.images,
        }

    # -- one file: the steps --------------------------------------------------------------------

    def decode(self, data: bytes, name: str) -> Decoded:
        """Sniff and decode one upload and note what is odd about it; runs in a worker thread."""
        img, fmt = read_upload_image(data, name)
        colour = colourfulness_of_bytes(bytes(data)) if self.ood_check else None
        return Decoded(img, fmt or "unknown", content_notes(img, data, fmt, self.spec.size), colour)

    def check(self, dec: Decoded, name: str) -> Checked:
        """Predictor.check, the pipeline's one per-image check (the lung mask, the OOD guard, the one
        preprocessing function); runs on the inference thread. 422 where the image cannot be used."""
        if self.unavailable is not None:
            raise ApiError(503, "model_unavailable", f"{name}: {self.unavailable}", name)
        checked = self.predictor.check([dec.image], [dec.colour])[0]
        if isinstance(checked, str):
            raise ApiError(422, "cannot_preprocess", f"{name}: {checked}", name)
        return checked

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
        crop = self.spec.lung_mask == "crop"
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

    def uncertainty(self, confidence: float) -> tuple[bool | None, dict[str, Any]]:
        """The abstention rule (``Predictor.uncertain``) applied to one prediction's top probability."""
        uncertain = self.predictor.uncertain([confidence])
        message = (
            "uncertain: refer to a radiologist"
            if uncertain
            else ("within the model's confidence rule" if uncertain is False else None)
        )
        return uncertain, {"threshold": self.threshold, "rule": self.abstention_note, "message": message}

    # -- one file -------------------------------------------------------------------------------

    async def predict_one(self, data: bytes, name: str, *, heatmap: bool, image: bool) -> dict[str, Any]:
        """The response for one upload: probabilities, uncertainty, OOD, optional heat map and rendering."""
        import anyio.to_thread

        t0 = time.perf_counter()
        dec = await anyio.to_thread.run_sync(self.decode, data, name, limiter=self.decode_limiter)
        checked = await asyncio.wrap_future(self.worker.submit_call(lambda: self.check(dec, name)))
        prepared = checked.prepared
        t1 = time.perf_counter()
        probs = await asyncio.wrap_future(self.worker.submit_probs(prepared))
        t2 = time.perf_counter()
        idx = int(np.argmax(probs))
        warns = list(dec.warnings) + list(self.static_warnings)
        ood = json_safe(checked.ood_info())
        if ood and ood["flagged"]:
            warns.insert(0, ood_warning(ood))
        t3 = time.perf_counter()
        heat = await self._heatmap(prepared, idx, name, warns) if heatmap else None
        t4 = time.perf_counter()
        rendered = await anyio.to_thread.run_sync(render_png, dec.image) if (image or heatmap) else None
        uncertain, uncertainty = self.uncertainty(float(probs[idx]))
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
                "calibrated": self.calibrated,
                "uncertain": uncertain,
                "uncertainty": uncertainty,
                "ood": ood,
                "heatmap": heat,
                "image_png": _png_b64(rendered) if rendered is not None else None,
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
