"""The HTTP routes: the API (``/api/*``) and the page (``/``). Each route is a few lines over :class:`Service`.

The service comes in through ``Depends`` (:data:`ServiceDep`); the token check is a dependency too
(:data:`AuthorizedService`: the service, handed over only after the check), so every API route but
``/api/health`` gets the service only with a valid token where the server has one.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from xraydx import schema
from xraydx.constants import STATIC_DIR
from xraydx.serve.errors import ApiError
from xraydx.serve.service import Service
from xraydx.serve.uploads import Upload, batch_body_limit, read_multipart, single_body_limit

# No ``from __future__ import annotations`` here: FastAPI reads these annotations at run time.

log = logging.getLogger("xraydx.serve")
T = TypeVar("T")


async def unless_gone(request: Request, svc: Service, work: Awaitable[T], what: str) -> T:
    """``work``, cancelled as soon as the client disconnects: its queued decode and model calls are then
    skipped (their futures are cancelled before the inference thread reaches them). The request's body
    has been read, so the next ASGI message is ``http.disconnect``, which comes only when the client goes
    away (or after the response)."""
    gone = False
    result: list[T] = []
    failure: list[Exception] = []

    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        async def run() -> None:
            try:
                result.append(await work)
            except Exception as exc:  # raised below, outside the task group (no ExceptionGroup)
                failure.append(exc)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if failure:
        raise failure[0]
    if gone and not result:
        svc.skipped += 1
        log.info("client went away before the answer for %s: its queued work was skipped", what)
        raise ApiError(499, "client_gone", f"{what}: the client closed the connection")
    return result[0]


def get_service(request: Request) -> Service:
    """The app's one :class:`Service` (built by :func:`xraydx.serve.app.create_app`)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def authorized_service(request: Request, svc: ServiceDep) -> Service:
    """The service, after the request's token is checked (401 when it is missing or wrong)."""
    svc.check_token(request.headers)
    return svc


AuthorizedService = Annotated[Service, Depends(authorized_service)]
Heatmap = Annotated[
    bool, Query(description="add Grad-CAM (overlay PNG, heat RGBA PNG) and the rendered input PNG")
]
RenderImage = Annotated[
    bool, Query(description="add the rendered input image as PNG (a DICOM shows in a browser)")
]


def _multipart_doc(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI request body for a multipart upload of one file (``many=False``) or a list of files."""
    binary: dict[str, Any] = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": binary} if many else binary
    schema = {"type": "object", "required": [field], "properties": {field: prop}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"description": d}
    for s, d in (
        (400, "malformed request"),
        (401, "missing or wrong token"),
        (413, "too large"),
        (415, "not a supported image"),
        (422, "unreadable image"),
    )
}

api = APIRouter(prefix="/api")


@api.get("/health", tags=["service"])
async def health(svc: ServiceDep) -> JSONResponse:
    """Liveness and the start-up check (a real prediction of a probe image): 200 with ``status: ok``, else
    503 (never needs the token)."""
    d = svc.health()
    return JSONResponse(d, status_code=200 if d["status"] == "ok" else 503)


@api.get("/model", tags=["service"], responses={401: ERRORS[401]})
async def model(svc: AuthorizedService) -> dict[str, Any]:
    """The checkpoint's metadata: classes, preprocessing, calibration, abstention rule, metrics, limits."""
    return svc.model_info()


@api.post("/predict", tags=["predict"], openapi_extra=_multipart_doc("file", many=False), responses=ERRORS)
async def predict(
    request: Request, svc: AuthorizedService, heatmap: Heatmap = False, image: RenderImage = False
) -> dict[str, Any]:
    """Class probabilities for one image (PNG, JPEG, BMP, TIFF or DICOM), in multipart field ``file``."""
    parts = await read_multipart(
        request, max_body=single_body_limit(svc.max_upload_bytes), max_part=svc.max_upload_bytes, max_files=1
    )
    if not parts:
        raise ApiError(400, "no_file", "no file in the request: send it as multipart field 'file'")
    up = parts[0]
    with svc.admit(1):
        return await unless_gone(
            request,
            svc,
            svc.predict_one(bytes(up.data), up.filename, heatmap=heatmap, image=image),
            up.filename,
        )


@api.post(
    "/predict/batch", tags=["predict"], openapi_extra=_multipart_doc("files", many=True), responses=ERRORS
)
async def predict_batch(
    request: Request, svc: AuthorizedService, heatmap: Heatmap = False, image: RenderImage = False
) -> dict[str, Any]:
    """Several images (multipart field ``files``, repeated); one result or one error per file."""
    t0 = time.perf_counter()
    parts = await read_multipart(
        request,
        max_body=batch_body_limit(svc.max_upload_bytes, svc.max_batch_files),
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
        except ApiError as exc:  # with the error row of the one prediction schema (every key present)
            return {
                "ok": False,
                "file": up.filename,
                **exc.payload(),
                "row": _error_row(svc, up.filename, exc),
            }
        except Exception as exc:  # a server bug on one file: logged, that file's error; the others are kept
            log.error("unexpected error on %s in a batch", up.filename, exc_info=exc)
            err = ApiError(500, "internal_error", f"{up.filename}: internal server error ({type(exc).__name__})",
                           up.filename)  # fmt: skip
            return {
                "ok": False,
                "file": up.filename,
                **err.payload(),
                "row": _error_row(svc, up.filename, err),
            }

    async def all_of_them() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(p) for p in parts)))

    with svc.admit(len(parts)):
        results = await unless_gone(request, svc, all_of_them(), f"a batch of {len(parts)} files")
    n_ok = sum(1 for r in results if r["ok"])
    return {
        "model_id": svc.model_id,
        "n": len(results),
        "ok": n_ok,
        "errors": len(results) - n_ok,
        "results": results,
        "processing_ms": round((time.perf_counter() - t0) * 1000, 2),
    }


page = APIRouter(include_in_schema=False)


@page.get("/")
async def index() -> FileResponse:
    """The web page (static files in ``xraydx/static``; no CDN, no build step)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")


def _error_row(svc: Service, name: str, exc: ApiError) -> dict[str, Any]:
    """A batch error's row of the one prediction schema (xraydx.schema): every key, status ``error: ...``."""
    reason = exc.message.removeprefix(f"{name}: ")
    return schema.error_row(name, svc.classes, reason, model=svc.model_id, kind="serve")
