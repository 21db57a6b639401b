"""The HTTP routes: the API (``/api/*``) and the page (``/``). Each route is a few lines over :class:`Service`.

The service comes in through ``Depends`` (:data:`ServiceDep`); the token check is a dependency too
(:data:`AuthorizedService`: the service, handed over only after the check), so every API route but
``/api/health`` gets the service only with a valid token where the server has one.
"""

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from xraydx.constants import STATIC_DIR
from xraydx.serve.errors import ApiError
from xraydx.serve.service import Service
from xraydx.serve.uploads import Upload, batch_body_limit, read_multipart, single_body_limit

# No ``from __future__ import annotations`` here: FastAPI reads these annotations at run time.


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
async def health(svc: ServiceDep) -> dict[str, Any]:
    """Liveness (never needs the token)."""
    return svc.health()


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
    return await svc.predict_one(bytes(up.data), up.filename, heatmap=heatmap, image=image)


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


page = APIRouter(include_in_schema=False)


@page.get("/")
async def index() -> FileResponse:
    """The web page (static files in ``xraydx/static``; no CDN, no build step)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")
