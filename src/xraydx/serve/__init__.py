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

Modules
-------
``app``       :func:`create_app`: the service, the middleware, the error handlers, the routers (assembly only)
``routes``    the API and page routes (``APIRouter``; the service and the token check come by ``Depends``)
``service``   :class:`Service`: the model (a :class:`xraydx.predict.Predictor`: its engine, its one OOD check
              and abstention rule), the limits, the token, model info, one prediction (no FastAPI import)
``worker``    :class:`InferenceWorker`: the one inference thread and its micro-batches
``uploads``   the bounded in-memory multipart parse, the upload limits, the checks on the content
``security``  the token, the security headers and CSP (ASGI middleware)
``handlers``  every error as one JSON shape
``docs``      the Swagger UI page and its assets
``run``       ``xraydx serve`` under uvicorn, and :func:`serve_in_thread` for tests

Concurrency
-----------
The model is loaded once. Decoding runs in worker threads (bounded); every model call (probabilities,
Grad-CAM, the optional out-of-distribution check) runs on one inference thread that owns the model, so
hooks and threads never interfere. Concurrent probability requests that arrive within ``batch_window_ms``
of each other are run as one batch (up to ``max_batch``); so are concurrent Grad-CAM requests.

FastAPI, uvicorn and the model are imported only when an app is built (the names below load their module
on first use), so ``xraydx`` starts without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from xraydx.errors import ServeError
from xraydx.serve.errors import ApiError
from xraydx.serve.run import cmd_serve, serve_in_thread
from xraydx.serve.security import TOKEN_ENV
from xraydx.serve.uploads import safe_filename

_LAZY = {
    "create_app": "app",
    "Service": "service",
    "InferenceWorker": "worker",
    "ood_warning": "service",
    "offline_docs_assets": "docs",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


__all__ = [
    "TOKEN_ENV",
    "ApiError",
    "ServeError",
    "cmd_serve",
    "safe_filename",
    "serve_in_thread",
    *_LAZY,
]
