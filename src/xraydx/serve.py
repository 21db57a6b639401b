"""``xraydx serve``: a REST API and a web page in front of one checkpoint (FastAPI + uvicorn).

Endpoints
---------
``GET  /``                   the web page (static files in ``xraydx/static``; no CDN, no build step)
``POST /api/predict``        one PNG / JPEG / BMP / TIFF / DICOM as multipart field ``file``;
                             ``?heatmap=true`` adds Grad-CAM, ``?image=true`` the rendered input as PNG
``POST /api/predict/batch``  several files (field ``files``); one result or error per file
``GET  /api/health``         liveness (never needs the token)
``GET  /api/model``          the checkpoint's metadata: classes, architecture, preprocessing, calibration,
                             abstention rule, validation / test metrics, training-data summary
``GET  /docs``, ``/openapi.json``  OpenAPI documentation (Swagger UI served from the ``fastapi-offline``
                             package when it is installed, so it works offline; else from a CDN)

Safety
------
* The request body is never read unbounded: ``Content-Length`` is checked first, then bytes are counted
  while the body streams in, and the multipart parse happens in memory (nothing is spooled to disk; no
  client-sent name ever reaches the filesystem; the file name is only echoed back, sanitised).
* The format is sniffed from the content (:func:`xraydx.io.sniff_format`), never taken from the name or
  the content type; :func:`xraydx.io.read_image_bytes` applies the pixel-count (decompression bomb),
  side and aspect limits.
* A bad file gets a 4xx JSON error naming the file and the reason: 413 too large, 415 not a supported
  image, 422 unreadable / refused; 503 when the model cannot run here (a lung-mask model without the
  segmenter). 500 is kept for real server bugs (logged, no internals sent).
* Binds to 127.0.0.1 by default. With a token (``--token`` or ``XRAYDX_TOKEN``) every ``/api/*`` route but
  ``/api/health`` needs ``Authorization: Bearer <token>`` or ``X-API-Token: <token>`` (constant-time check).
* Security headers on every response; the page's CSP allows its own origin only.

Concurrency
-----------
The model is loaded once. Decoding runs in worker threads (bounded); every model call (probabilities,
Grad-CAM, the optional out-of-distribution check) runs on one inference thread that owns the model, so
hooks and threads never interfere. Concurrent probability requests that arrive within ``batch_window_ms``
of each other are run as one batch (up to ``max_batch``); so are concurrent Grad-CAM requests.

FastAPI and uvicorn are imported only inside :func:`create_app` / :func:`cmd_serve`, so the ``xraydx``
command starts without them. (No ``from __future__ import annotations`` here: FastAPI reads the route
functions' annotations at run time, and those name classes imported inside ``create_app``.)
"""

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import hmac
import importlib
import importlib.util
import io
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from xraydx.constants import STATIC_DIR, checkpoint_or_default
from xraydx.errors import EXIT_FATAL, ServeError
from xraydx.fsutil import file_sha256
from xraydx.fsutil import json_safe as _json_safe

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI, Request

    from xraydx.predict import Predictor

log = logging.getLogger("xraydx.serve")

MIB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 20 * MIB
MAX_BATCH_FILES = 32
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the file bytes
RENDER_MAX_SIDE = 1024  # the rendered input image sent back to the browser
TOKEN_ENV = "XRAYDX_TOKEN"
LOOPBACK = ("127.0.0.1", "::1", "localhost")

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# FastAPI's Swagger page bootstraps itself with an inline script.
DOCS_CSP_OFFLINE = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_CSP_CDN = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect")


class ApiError(Exception):
    """A client-side problem, answered as JSON ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.file = file

    def payload(self) -> dict[str, Any]:
        err: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.file is not None:
            err["file"] = self.file
        return {"error": err, "detail": self.message}


# ---- engines -------------------------------------------------------------------------------------


class Engine(Protocol):
    name: str

    def probs(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, C) for preprocessed uint8 images (N, S, S)."""
        ...


class TorchEngine:
    name = "torch"

    def __init__(self, predictor: "Predictor") -> None:
        self.predictor = predictor

    def probs(self, batch: np.ndarray) -> np.ndarray:
        return self.predictor.probs(batch)


class OnnxEngine:
    """onnxruntime through :class:`xraydx.export.OnnxEngine` (the checkpoint exported in memory at start-up),
    checked against PyTorch on random input before the server starts."""

    name = "onnx"
    PARITY_TOL = 1e-3  # max absolute difference of probabilities on a random probe

    def __init__(self, predictor: "Predictor", threads: int | None = None) -> None:
        try:
            from xraydx.export import OnnxEngine as RuntimeEngine
        except ModuleNotFoundError as exc:
            if exc.name != "xraydx.export":
                raise
            raise ServeError("--engine onnx needs xraydx.export, which this xraydx does not have") from None
        # raises xraydx.errors.ExportError when onnxruntime is missing or export fails
        self.runtime = RuntimeEngine(predictor.checkpoint, threads=int(threads or 0), device="cpu")
        size = predictor.spec.size
        probe = np.random.default_rng(0).integers(0, 256, size=(2, size, size), dtype=np.uint8)
        diff = float(np.abs(self.probs(probe) - predictor.probs(probe)).max())
        if not diff <= self.PARITY_TOL:
            raise ServeError(f"the ONNX model disagrees with PyTorch (max probability difference {diff:.2e})")
        self.parity = diff

    def probs(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.runtime.probs(batch))


def make_engine(name: str, predictor: "Predictor", threads: int | None = None) -> Engine:
    if name == "torch":
        return TorchEngine(predictor)
    if name == "onnx":
        return OnnxEngine(predictor, threads)
    raise ServeError(f"engine must be torch or onnx; got {name!r}")


# ---- the inference thread (micro-batcher) ----------------------------------------------------------

T = TypeVar("T")
HeatFn = Callable[[np.ndarray, list[int]], np.ndarray]  # (N, S, S) uint8, classes -> (N, S, S) heat


@dataclass
class _Job:
    fut: concurrent.futures.Future[Any]
    kind: str  # "probs" and "heat" are batched; "call" runs alone; "stop" ends the thread
    image: np.ndarray | None = None
    arg: Any = None
    call: Callable[[], Any] | None = None


class InferenceWorker:
    """One thread owns the model(s). Jobs of one batchable kind (probabilities, Grad-CAM) that arrive within
    ``window_s`` of the first one in a batch are stacked and run together (at most ``max_batch``, in
    arrival order); any other call runs alone. Results go back through concurrent futures."""

    def __init__(
        self, engine: Engine, *, max_batch: int = 16, window_s: float = 0.005, heat_fn: HeatFn | None = None
    ) -> None:
        if max_batch < 1:
            raise ServeError(f"max_batch must be >= 1; got {max_batch}")
        if window_s < 0:
            raise ServeError(f"batch window must be >= 0; got {window_s}")
        self.engine = engine
        self.heat_fn = heat_fn
        self.max_batch = int(max_batch)
        self.window_s = float(window_s)
        self._q: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # probability batches run
        self.images = 0  # images in them

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="xraydx-inference", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None and t.is_alive():
            self._q.put(_Job(concurrent.futures.Future(), "stop"))
            t.join(timeout)

    def _submit(self, job: _Job) -> concurrent.futures.Future[Any]:
        self.start()
        self._q.put(job)
        return job.fut

    def submit_probs(self, image: np.ndarray) -> concurrent.futures.Future[np.ndarray]:
        return self._submit(_Job(concurrent.futures.Future(), "probs", image=image))

    def submit_heat(self, image: np.ndarray, class_idx: int) -> concurrent.futures.Future[np.ndarray]:
        if self.heat_fn is None:
            raise ServeError("no heatmap function configured")
        return self._submit(_Job(concurrent.futures.Future(), "heat", image=image, arg=int(class_idx)))

    def submit_call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        return self._submit(_Job(concurrent.futures.Future(), "call", call=fn))

    def _run(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending if pending is not None else self._q.get()
            pending = None
            if job.kind == "stop":
                return
            if job.kind == "call":
                self._exec_call(job)
                continue
            batch = [job]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt.kind != job.kind:
                    pending = nxt  # handled next, in order
                    break
                batch.append(nxt)
            self._exec_batch(batch)

    @staticmethod
    def _exec_call(job: _Job) -> None:
        if not job.fut.set_running_or_notify_cancel():
            return
        assert job.call is not None
        try:
            job.fut.set_result(job.call())
        except BaseException as exc:  # delivered to the awaiting request
            job.fut.set_exception(exc)

    def _exec_batch(self, batch: list[_Job]) -> None:
        live = [j for j in batch if j.fut.set_running_or_notify_cancel()]
        if not live:
            return
        kind = live[0].kind
        try:
            arr = np.stack([j.image for j in live])  # type: ignore[misc]
            if kind == "probs":
                out = self.engine.probs(arr)
            else:
                assert self.heat_fn is not None
                out = self.heat_fn(arr, [int(j.arg) for j in live])
        except BaseException as exc:
            for j in live:
                j.fut.set_exception(exc)
            return
        if kind == "probs":
            self.batches += 1
            self.images += len(live)
        for j, p in zip(live, out, strict=True):
            j.fut.set_result(np.asarray(p, dtype=np.float64 if kind == "probs" else np.float32))


# ---- optional stages: Grad-CAM (xraydx.explain) and the out-of-distribution guard --------------------


def _load_explain() -> Any | None:
    """The Grad-CAM module, or None where this build has none (the response then says so)."""
    try:
        mod = importlib.import_module("xraydx.explain")
    except ModuleNotFoundError as exc:
        if exc.name != "xraydx.explain":
            raise
        return None
    if not all(hasattr(mod, n) for n in ("GradCAM", "overlay_png", "heat_png")):
        return None
    return mod


OodCheck = Callable[[np.ndarray, bytes], Any]


def ood_hook(predictor: Any) -> tuple[OodCheck | None, str]:
    """The out-of-distribution check this xraydx has, if any, and a note saying which (or why none).

    In order: ``Predictor.ood_check(img)`` where the predictor has one; else the shipped guard
    :meth:`xraydx.ood.OODGuard.default` (``check(img, colourfulness)``). A hook's result may be an
    ``OODResult`` (``is_cxr``, ``score``, ``reasons``), a mapping with ``status`` (``"ok"``,
    ``"not_cxr"`` or ``"ood"``) and optionally ``score`` / ``reason``, or a
    :class:`xraydx.predict.Prediction` whose ``status`` / ``extra["ood"]`` say the same."""
    fn = getattr(predictor, "ood_check", None)
    if callable(fn):
        return (lambda img, data: fn(img)), "the predictor's out-of-distribution check"
    try:
        ood = importlib.import_module("xraydx.ood")
    except ModuleNotFoundError as exc:
        if exc.name != "xraydx.ood":
            raise
        return None, "no out-of-distribution check in this xraydx"
    try:
        guard = ood.OODGuard.default(getattr(predictor, "device", "cpu"))
    except Exception as exc:  # e.g. OODError: the shipped statistics or segmenter are missing
        log.warning("out-of-distribution check unavailable: %s", exc)  # the full reason, paths included
        return None, "out-of-distribution check unavailable in this installation (the server log says why)"
    colour = getattr(ood, "colourfulness_of_bytes", None)

    def check(img: np.ndarray, data: bytes) -> Any:
        return guard.check(img, colour(data) if colour is not None else None)

    return check, "xraydx.ood guard (lung segmenter + feature distance to real chest X-rays)"


def interpret_ood(result: Any) -> dict[str, Any] | None:
    """Normalise whatever the OOD hook returned into ``{"status", "flagged", ...}`` (None: no check)."""
    if result is None:
        return None
    if hasattr(result, "is_cxr"):  # xraydx.ood.OODResult
        info = (
            dict(result.to_dict())
            if hasattr(result, "to_dict")
            else {"score": getattr(result, "score", None)}
        )
        reasons = list(getattr(result, "reasons", []) or [])
        info["status"] = "ok" if result.is_cxr else "not_cxr"
        if reasons:
            info["reason"] = "; ".join(reasons)
    elif isinstance(result, Mapping):
        info = dict(result)
    else:  # a Prediction-like object
        extra = getattr(result, "extra", {}) or {}
        inner = extra.get("ood")
        info = dict(inner) if isinstance(inner, Mapping) else ({"score": inner} if inner is not None else {})
        status = str(getattr(result, "status", "ok"))
        info.setdefault("status", status if status in ("not_cxr", "ood") else "ok")
    status = str(info.get("status", "ok"))
    info["status"] = status
    info["flagged"] = status in ("not_cxr", "ood")
    return _json_safe(info)


def ood_warning(info: Mapping[str, Any]) -> str:
    score = info.get("score")
    s = f" (score {float(score):.3g})" if isinstance(score, (int, float)) else ""
    why = f": {info['reason']}" if info.get("reason") else ""
    return (
        f"This does not look like a frontal chest X-ray{s}{why}. The class probabilities below are not"
        " trustworthy for this image."
    )


# ---- helpers -------------------------------------------------------------------------------------


def safe_filename(raw: str | bytes | None) -> str:
    """The client's file name reduced to something safe to echo: last path component, printable, short."""
    if raw is None:
        return "upload"
    name = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if len(name) > 128:
        name = name[:60] + "..." + name[-60:]
    return name or "upload"


def _public_data_summary(summary: Any, data_path: Any = None) -> Any:
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


def _png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render_png(img: np.ndarray, max_side: int = RENDER_MAX_SIDE) -> bytes:
    """The decoded grayscale image as an 8-bit PNG (longest side at most ``max_side``)."""
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


def dicom_notes(data: bytes) -> list[str]:
    """Warnings from a DICOM header (view position, modality); never raises."""
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
    except Exception:  # the pixel reader has already accepted the file; notes are best effort
        return []
    notes = []
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view and view not in ("PA", "AP"):
        notes.append(f"DICOM ViewPosition is {view}: the model was trained on frontal (PA/AP) chest X-rays")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in ("CR", "DX", "DR", "OT", "SC"):
        notes.append(f"DICOM Modality is {modality}: the model was trained on radiographs (CR/DX)")
    return notes


# ---- request bodies: bounded, in memory ----------------------------------------------------------


def _limit_text(n: int, body: int | None = None) -> str:
    per_file = f"{n} bytes per file" if n < MIB else f"{n / MIB:g} MB per file"
    return per_file if body is None else f"{per_file}, {body} bytes per request"


@dataclass
class Upload:
    field: str
    filename: str
    data: bytearray = field(default_factory=bytearray)


async def read_multipart(
    request: "Request", *, max_body: int, max_part: int, max_files: int, what: str = "file"
) -> list[Upload]:
    """Parse a multipart/form-data body into in-memory parts, refusing it (413) as soon as it is too big."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(
            415, "expected_multipart",
            f"send the {what} as multipart/form-data (e.g. curl -F {what}=@image.png); got content type"
            f" {request.headers.get('content-type') or 'none'!r}",
        )  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "bad_content_length", f"invalid Content-Length {declared!r}") from None
        if n > max_body:
            raise ApiError(
                413,
                "too_large",
                f"request body of {n} bytes is over this server's limit ({_limit_text(max_part, max_body)})",
            )

    parts: list[Upload] = []
    cur: dict[str, Any] = {}
    state = {"ended": False}

    def on_part_begin() -> None:
        cur.clear()
        cur.update(headers={}, name=b"", value=b"", upload=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur["value"] += data[start:end]

    def on_header_end() -> None:
        cur["headers"][bytes(cur["name"]).lower()] = bytes(cur["value"])
        cur["name"], cur["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(cur["headers"].get(b"content-disposition", b""))
        fname = disp.get(b"filename")
        up = Upload(
            field=disp.get(b"name", b"").decode("utf-8", errors="replace"),
            filename=safe_filename(fname) if fname is not None else "",
        )
        if fname is not None:
            if len(parts) >= max_files:
                raise ApiError(413, "too_many_files", f"more than {max_files} files in one request")
            parts.append(up)
        cur["upload"] = up

    def on_part_data(data: bytes, start: int, end: int) -> None:
        up: Upload = cur["upload"]
        up.data += data[start:end]
        limit = max_part if up.filename else 64 * 1024
        if len(up.data) > limit:
            name = up.filename or up.field
            raise ApiError(
                413,
                "too_large",
                f"{name}: larger than the upload limit ({_limit_text(limit)})",
                up.filename or None,
            )

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_end": on_end,
        },
    )
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_body:
                raise ApiError(
                    413,
                    "too_large",
                    f"request body is over this server's limit ({_limit_text(max_part, max_body)})",
                )
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart body ({exc})") from None
    if not state["ended"]:
        raise ApiError(400, "bad_multipart", "incomplete multipart body (no closing boundary)")
    return parts


# ---- the app state -------------------------------------------------------------------------------


@dataclass
class Decoded:
    image: np.ndarray
    prepared: np.ndarray | None  # None until the lung mask is applied on the inference thread
    fmt: str
    warnings: list[str]


class Service:
    """Everything the routes share: the predictor, the engine, the inference thread, the limits."""

    def __init__(
        self,
        checkpoint: Path,
        *,
        token: str | None,
        max_upload_bytes: int,
        engine: str,
        device: str,
        threads: int | None,
        max_batch: int,
        batch_window_ms: float,
        max_batch_files: int,
    ) -> None:
        import anyio

        from xraydx.models import CheckpointError
        from xraydx.predict import Predictor

        if max_upload_bytes < 1:
            raise ServeError(f"max upload size must be positive; got {max_upload_bytes}")
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"{checkpoint}: checkpoint not found")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.started = time.time()
        self.checkpoint = checkpoint
        self.predictor = Predictor(checkpoint, device)
        self.meta: dict[str, Any] = self.predictor.meta
        self.classes = list(self.predictor.classes)
        self.spec = self.predictor.spec
        self.engine = make_engine(engine, self.predictor, threads)
        self.worker = InferenceWorker(
            self.engine, max_batch=max_batch, window_s=batch_window_ms / 1000.0, heat_fn=self.heat_batch
        )
        self.token = token.encode("utf-8") if token else None
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_batch_files = int(max_batch_files)
        self.decode_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.sha256 = file_sha256(checkpoint)
        self.model_id = f"{self.meta['architecture']['name']}-{self.sha256[:12]}"
        self.explain = _load_explain()
        self._cam: Any = None
        self.ood, self.ood_note = ood_hook(self.predictor)
        self.threshold, self.abstention_note = self._abstention()
        cal = self.meta.get("calibration") or {}
        self.calibrated = cal.get("method", "none") != "none" and "temperature" in cal
        self.static_warnings: list[str] = []
        if not self.calibrated:
            self.static_warnings.append(
                "probabilities are not calibrated (the checkpoint has no temperature)"
            )
        if self.threshold is None:
            self.static_warnings.append(self.abstention_note)
        if self.spec.lung_mask != "none":
            log.info("lung_mask=%s: masks come from the lung segmenter (xraydx.segment)", self.spec.lung_mask)

    def _abstention(self) -> tuple[float | None, str]:
        rule = self.meta.get("abstention")
        if not isinstance(rule, Mapping) or rule.get("threshold") is None:
            return None, "this model has no abstention rule, so no prediction is flagged as uncertain"
        try:
            t = float(rule["threshold"])
        except (TypeError, ValueError):
            t = float("nan")
        if not 0.0 <= t <= 1.0:
            log.warning("ignoring abstention threshold %r (not in [0, 1])", rule.get("threshold"))
            return None, "the model's abstention threshold is invalid and was ignored: no uncertainty flag"
        note = f"uncertain when the highest calibrated probability is below {t:.3f}"
        cov, acc = rule.get("val_coverage"), rule.get("val_accuracy_accepted")
        if isinstance(cov, (int, float)) and isinstance(acc, (int, float)):
            note += f" (chosen on validation: keeps {cov:.0%} of cases, accuracy {acc:.3f} on those"
            target = rule.get("target_accuracy")
            if rule.get("target_reached") is False and isinstance(target, (int, float)):
                note += f"; the {target:.2f} target accuracy was not reached"
            note += ")"
        return t, note

    # -- auth -----------------------------------------------------------------------------------

    def check_token(self, request: "Request") -> None:
        if self.token is None:
            return
        given = request.headers.get("x-api-token")
        auth = request.headers.get("authorization")
        if given is None and auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip()
        if given is None or not hmac.compare_digest(given.encode("utf-8", errors="replace"), self.token):
            raise ApiError(401, "unauthorized", "missing or wrong API token (Authorization: Bearer <token>)")

    # -- model info -----------------------------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        m = self.meta
        return _json_safe(
            {
                "model_id": self.model_id,
                "checkpoint": self.checkpoint.name,
                "sha256": self.sha256,
                "engine": self.engine.name,
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
                "training_data": _public_data_summary(
                    m.get("training_data"), ((m.get("config") or {}).get("data") or {}).get("path")
                ),
                "epoch": m.get("epoch"),
                "created": m.get("created"),
                "tool_version": m.get("tool_version"),
                "heatmaps": self.explain is not None,
                "ood_check": self.ood is not None,
                "ood_note": self.ood_note,
                "limits": {
                    "max_upload_bytes": self.max_upload_bytes,
                    "max_batch_files": self.max_batch_files,
                },
                "notice": "Research use only - not a diagnostic device.",
            }
        )

    # -- one file -------------------------------------------------------------------------------

    def decode(self, data: bytes, name: str) -> Decoded:
        """Sniff, decode and (for models without lung masking) preprocess one upload; runs in a worker thread."""
        from xraydx.io import ImageReadError, read_image_bytes, sniff_format

        if not data:
            raise ApiError(422, "empty_file", f"{name}: empty file (0 bytes)", name)
        fmt = sniff_format(bytes(data[:16384]))
        try:
            img = read_image_bytes(data, name)
        except ImageReadError as exc:
            if fmt is None:
                raise ApiError(415, "unsupported_media_type", str(exc), name) from None
            raise ApiError(422, "unreadable_image", str(exc), name) from None
        # lung masking runs the segmenter, a model: that happens on the inference thread (see prepare)
        prepared = self.prepare(img, name) if self.spec.lung_mask == "none" else None
        notes: list[str] = []
        if fmt == "dicom":
            notes += dicom_notes(bytes(data))
        if min(img.shape) < self.spec.size:
            notes.append(
                f"image is small ({img.shape[1]}x{img.shape[0]} px); it was enlarged to the model's"
                f" {self.spec.size} px input"
            )
        return Decoded(img, prepared, fmt or "unknown", notes)

    def prepare(self, img: np.ndarray, name: str) -> np.ndarray:
        """The model's input (Predictor.prepare: the one preprocessing function, lung mask included)."""
        from xraydx.io import ImageReadError

        try:
            return self.predictor.prepare(img)
        except ImageReadError as exc:
            if (
                exc.path == "<unknown>"
            ):  # the model's requirement (e.g. no lung segmenter), not the file's fault
                raise ApiError(503, "model_unavailable", f"{name}: {exc.reason}", name) from None
            raise ApiError(422, "cannot_preprocess", f"{name}: {exc.reason}", name) from None
        except ValueError as exc:
            raise ApiError(422, "cannot_preprocess", f"{name}: {exc}", name) from None

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
        return {
            "class": self.classes[class_idx],
            "overlay_png": _png_b64(self.explain.overlay_png(prepared, heat)),
            "heat_png": _png_b64(self.explain.heat_png(heat)),
            "size": [int(heat.shape[1]), int(heat.shape[0])],
            # preprocess stretches the whole image to the square input unless it crops to the lungs
            "aligned_to": "model_input" if self.spec.lung_mask == "crop" else "image",
            "model_input_png": _png_b64(render_png(prepared)) if self.spec.lung_mask == "crop" else None,
        }

    async def predict_one(self, data: bytes, name: str, *, heatmap: bool, image: bool) -> dict[str, Any]:
        import anyio.to_thread
        from starlette.concurrency import run_in_threadpool

        t0 = time.perf_counter()
        dec = await anyio.to_thread.run_sync(self.decode, data, name, limiter=self.decode_limiter)
        if dec.prepared is None:
            img = dec.image
            dec.prepared = await asyncio.wrap_future(self.worker.submit_call(lambda: self.prepare(img, name)))
        prepared: np.ndarray = dec.prepared
        t1 = time.perf_counter()
        probs = await asyncio.wrap_future(self.worker.submit_probs(prepared))
        t2 = time.perf_counter()
        idx = int(np.argmax(probs))
        conf = float(probs[idx])
        warns = list(dec.warnings) + list(self.static_warnings)
        ood = None
        if self.ood is not None:
            check = self.ood
            try:
                ood = interpret_ood(
                    await asyncio.wrap_future(self.worker.submit_call(lambda: check(dec.image, data)))
                )
            except Exception as exc:
                log.exception("out-of-distribution check failed for %s", name)
                warns.append(f"the out-of-distribution check failed ({type(exc).__name__}); it was skipped")
            if ood and ood["flagged"]:
                warns.insert(0, ood_warning(ood))
        heat: dict[str, Any] | None = None
        t3 = time.perf_counter()
        if heatmap:
            if self.explain is None:
                warns.append(
                    "heatmaps are not available: this xraydx has no Grad-CAM module (xraydx.explain)"
                )
            else:
                try:
                    raw = await asyncio.wrap_future(self.worker.submit_heat(prepared, idx))
                    heat = await run_in_threadpool(self.heatmap_payload, prepared, raw, idx)
                except Exception as exc:
                    log.exception("Grad-CAM failed for %s", name)
                    warns.append(f"the heatmap could not be computed ({type(exc).__name__}: {exc})")
        t4 = time.perf_counter()
        rendered = await run_in_threadpool(render_png, dec.image) if (image or heatmap) else None
        uncertain = None if self.threshold is None else bool(conf < self.threshold)  # = Predictor.flag
        t5 = time.perf_counter()
        return _json_safe(
            {
                "file": name,
                "format": dec.fmt,
                "width": int(dec.image.shape[1]),
                "height": int(dec.image.shape[0]),
                "classes": self.classes,
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs, strict=True)},
                "predicted_class": self.classes[idx],
                "confidence": conf,
                "calibrated": self.calibrated,
                "uncertain": uncertain,
                "uncertainty": {
                    "threshold": self.threshold,
                    "rule": self.abstention_note,
                    "message": (
                        "uncertain: refer to a radiologist"
                        if uncertain
                        else ("within the model's confidence rule" if uncertain is False else None)
                    ),
                },
                "ood": ood,
                "heatmap": heat,
                "image_png": _png_b64(rendered) if rendered is not None else None,
                "model_id": self.model_id,
                "engine": self.engine.name,
                "processing_ms": {
                    "decode": round((t1 - t0) * 1000, 2),
                    "inference": round((t2 - t1) * 1000, 2),
                    "heatmap": round((t4 - t3) * 1000, 2) if heatmap else None,
                    "total": round((t5 - t0) * 1000, 2),
                },
                "warnings": warns,
                "notice": "Research use only - not a diagnostic device.",
            }
        )


# ---- the app -------------------------------------------------------------------------------------


class SecurityHeaders:
    """Pure ASGI middleware adding security headers (and no-store on the API) to every response."""

    def __init__(self, app: Any, docs_csp: str) -> None:
        self.app = app
        self.docs_csp = docs_csp.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        csp = self.docs_csp if path in DOCS_PATHS else PAGE_CSP.encode()
        extra = [
            (b"content-security-policy", csp),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"cross-origin-resource-policy", b"same-origin"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
        ]
        if path.startswith("/api/"):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in extra if h[0] not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def offline_docs_assets() -> Path | None:
    """Swagger UI's files as shipped in the ``fastapi-offline`` wheel (found, not imported)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    need = ("swagger-ui-bundle.js", "swagger-ui.css")
    return static if all((static / n).is_file() for n in need) else None


def _multipart_doc(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI request body for a multipart upload of one file (``many=False``) or a list of files."""
    binary: dict[str, Any] = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": binary} if many else binary
    schema = {"type": "object", "required": [field], "properties": {field: prop}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_UPLOAD_DOC = _multipart_doc("file", many=False)
_BATCH_DOC = _multipart_doc("files", many=True)
_ERRORS = {
    s: {"description": d}
    for s, d in (
        (400, "malformed request"),
        (401, "missing or wrong token"),
        (413, "too large"),
        (415, "not a supported image"),
        (422, "unreadable image"),
    )
}


def create_app(
    checkpoint: Path,
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    engine: str = "torch",
    device: str = "cpu",
    threads: int | None = None,
    max_batch: int = 16,
    batch_window_ms: float = 5.0,
    max_batch_files: int = MAX_BATCH_FILES,
) -> "FastAPI":
    """The FastAPI app serving ``checkpoint`` (loaded once, here)."""
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from xraydx import __version__

    svc = Service(
        Path(checkpoint), token=token, max_upload_bytes=max_upload_bytes, engine=engine, device=device,
        threads=threads, max_batch=max_batch, batch_window_ms=batch_window_ms, max_batch_files=max_batch_files,
    )  # fmt: skip
    assets = offline_docs_assets()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.worker.start()
        yield
        svc.worker.stop()

    app = FastAPI(
        title="xraydx",
        version=__version__,
        description=(
            "Chest X-ray classification (covid / non_covid / normal). **Research use only - not a diagnostic"
            " device.** Probabilities are calibrated on the model's validation split, which comes from the same"
            " sources as its training data; they do not tell how the model does on another hospital's images."
        ),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = svc
    app.add_middleware(SecurityHeaders, docs_csp=DOCS_CSP_OFFLINE if assets else DOCS_CSP_CDN)

    def error_response(exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.payload(), status_code=exc.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, "http_error", str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return error_response(ApiError(422, "invalid_request", msgs or "invalid request"))

    @app.exception_handler(Exception)
    async def _server_bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            ApiError(500, "internal_error", f"internal server error ({type(exc).__name__})")
        )

    def auth(request: Request) -> None:
        svc.check_token(request)

    # -- API --------------------------------------------------------------------------------------

    @app.get("/api/health", tags=["service"])
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_id": svc.model_id,
            "engine": svc.engine.name,
            "uptime_s": round(time.time() - svc.started, 1),
            "batches": svc.worker.batches,
            "images": svc.worker.images,
        }

    @app.get("/api/model", tags=["service"], dependencies=[Depends(auth)], responses={401: _ERRORS[401]})
    async def model() -> dict[str, Any]:
        return svc.model_info()

    heatmap_q = Query(
        False, description="add Grad-CAM (overlay PNG, heat RGBA PNG) and the rendered input PNG"
    )
    image_q = Query(False, description="add the rendered input image as PNG (a DICOM shows in a browser)")

    @app.post(
        "/api/predict", tags=["predict"], dependencies=[Depends(auth)], openapi_extra=_UPLOAD_DOC,
        responses=_ERRORS,
    )  # fmt: skip
    async def predict(request: Request, heatmap: bool = heatmap_q, image: bool = image_q) -> dict[str, Any]:
        """Class probabilities for one image (PNG, JPEG, BMP, TIFF or DICOM), in multipart field ``file``."""
        parts = await read_multipart(
            request,
            max_body=svc.max_upload_bytes + MULTIPART_OVERHEAD,
            max_part=svc.max_upload_bytes,
            max_files=1,
        )
        if not parts:
            raise ApiError(400, "no_file", "no file in the request: send it as multipart field 'file'")
        up = parts[0]
        return await svc.predict_one(bytes(up.data), up.filename, heatmap=heatmap, image=image)

    @app.post(
        "/api/predict/batch", tags=["predict"], dependencies=[Depends(auth)], openapi_extra=_BATCH_DOC,
        responses=_ERRORS,
    )  # fmt: skip
    async def predict_batch(
        request: Request, heatmap: bool = heatmap_q, image: bool = image_q
    ) -> dict[str, Any]:
        """Several images (multipart field ``files``, repeated); one result or one error per file."""
        t0 = time.perf_counter()
        parts = await read_multipart(
            request,
            max_body=svc.max_upload_bytes * 4 + MULTIPART_OVERHEAD * svc.max_batch_files,
            max_part=svc.max_upload_bytes,
            max_files=svc.max_batch_files,
            what="files",
        )
        if not parts:
            raise ApiError(400, "no_file", "no files in the request: send them as multipart fields 'files'")

        async def one(up: Upload) -> dict[str, Any]:
            try:
                return {
                    "ok": True,
                    **await svc.predict_one(bytes(up.data), up.filename, heatmap=heatmap, image=image),
                }
            except ApiError as exc:
                return {"ok": False, "file": up.filename, **exc.payload()}

        results = await asyncio.gather(*(one(p) for p in parts))
        n_ok = sum(1 for r in results if r["ok"])
        return {
            "model_id": svc.model_id,
            "n": len(results),
            "ok": n_ok,
            "errors": len(results) - n_ok,
            "results": results,
            "processing_ms": round((time.perf_counter() - t0) * 1000, 2),
        }

    # -- docs -------------------------------------------------------------------------------------

    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")
        js, css, icon = (
            "/docs-assets/swagger-ui-bundle.js",
            "/docs-assets/swagger-ui.css",
            "/docs-assets/favicon.png",
        )
    else:  # FastAPI's defaults: the browser fetches Swagger UI from a CDN
        js = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"
        css = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"
        icon = "https://fastapi.tiangolo.com/img/favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="xraydx API", oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=js, swagger_css_url=css, swagger_favicon_url=icon,
            swagger_ui_parameters={"validatorUrl": None},
        )  # fmt: skip

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def docs_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    # -- the page ---------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    return app


# ---- running the app in-process (tests, screenshots) ---------------------------------------------


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread on a free port of ``host``; yield its base URL.

    The socket is bound before the server starts (no port race); the server stops on exit."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="xraydx-uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise ServeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


# ---- CLI -----------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {text}")
    return v


def cmd_serve(args: argparse.Namespace) -> int:
    ckpt = checkpoint_or_default(args.checkpoint)
    try:
        import uvicorn
    except ImportError as exc:
        print(
            f"xraydx: error: serve needs FastAPI and uvicorn ({exc}): pip install 'xraydx[serve]'",
            file=sys.stderr,
        )
        return EXIT_FATAL
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.host not in LOOPBACK and token is None:
        print(
            f"xraydx: warning: serving on {args.host} without a token: anyone who can reach port {args.port} can"
            f" use this API. Set {TOKEN_ENV} (or --token) and put TLS in front of it.",
            file=sys.stderr,
        )
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(
            ckpt, token=token, max_upload_bytes=int(args.max_upload_mb * MIB), engine=args.engine,
            device=args.device, threads=args.workers_threads, max_batch=args.max_batch,
            batch_window_ms=args.batch_window_ms,
        )  # fmt: skip
    except ServeError as exc:
        print(f"xraydx: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    svc: Service = app.state.service
    print(
        f"xraydx: serving {svc.model_id} ({svc.engine.name}) on http://{args.host}:{args.port}/"
        f"  (API docs at /docs; research use only - not a diagnostic device)",
        file=sys.stderr,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, limit_concurrency=args.limit_concurrency,
        server_header=False,
    )  # fmt: skip
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "serve",
        help="REST API + web page for one checkpoint",
        description="Serve a checkpoint over HTTP: a web page at /, the API under /api, docs at /docs.",
    )
    sp.add_argument("--checkpoint", help="checkpoint (.safetensors); default: the model shipped with xraydx")
    sp.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    sp.add_argument("--port", type=_port, default=8000)
    sp.add_argument(
        "--token", help=f"API token required on /api/* (except /api/health); default: ${TOKEN_ENV} if set"
    )
    sp.add_argument("--max-upload-mb", type=_positive_float, default=20.0, help="largest accepted file (MB)")
    sp.add_argument("--engine", choices=["torch", "onnx"], default="torch", help="inference engine")
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torch engine; Grad-CAM)")
    sp.add_argument(
        "--workers-threads", type=_positive_int, default=None, help="intra-op threads for inference"
    )
    sp.add_argument("--max-batch", type=_positive_int, default=16, help="most images per inference batch")
    sp.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="wait this long to group concurrent requests (0: greedy)",
    )
    sp.add_argument(
        "--limit-concurrency",
        type=_positive_int,
        default=64,
        help="connections beyond this get 503 (memory bound)",
    )
    sp.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sp.set_defaults(func=cmd_serve)


__all__: Sequence[str] = (
    "ApiError",
    "InferenceWorker",
    "OnnxEngine",
    "ServeError",
    "TorchEngine",
    "add_cli",
    "create_app",
    "interpret_ood",
    "ood_hook",
    "safe_filename",
    "serve_in_thread",
)
