"""The FastAPI app: :func:`create_app` builds the :class:`~xraydx.serve.service.Service` (the model is loaded
once, here), then assembles the middleware, the error handlers, the routers and the static files."""

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from xraydx import __version__
from xraydx.config import ServeConfig
from xraydx.constants import STATIC_DIR
from xraydx.serve.docs import ASSETS_URL, docs_csp, docs_router, offline_docs_assets
from xraydx.serve.handlers import add_error_handlers
from xraydx.serve.routes import api, page
from xraydx.serve.security import SecurityHeaders
from xraydx.serve.service import Service

DESCRIPTION = (
    "Chest X-ray classification (covid / non_covid / normal). **Research use only - not a diagnostic"
    " device.** Probabilities are calibrated on the model's validation split, which comes from the same"
    " sources as its training data; they do not tell how the model does on another hospital's images."
)


def create_app(config: "ServeConfig | str | os.PathLike[str]", /, **options: Any) -> FastAPI:
    """The FastAPI app serving one checkpoint.

    ``config`` is a :class:`~xraydx.config.ServeConfig` or the checkpoint's path; ``options`` are any of
    ServeConfig's fields (``create_app(ckpt, token="...", engine="onnx")``)."""
    cfg = config if isinstance(config, ServeConfig) else ServeConfig(checkpoint=Path(config))
    if options:
        cfg = dataclasses.replace(cfg, **options)
    svc = Service(cfg)
    assets = offline_docs_assets()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.worker.start()
        await svc.warm_up()  # a real prediction of a probe image; /api/health reports it
        yield
        svc.worker.stop()

    app = FastAPI(title="xraydx", version=__version__, description=DESCRIPTION, docs_url=None, redoc_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.service = svc
    app.add_middleware(SecurityHeaders, docs_csp=docs_csp(assets), allowed_hosts=cfg.allowed_hosts)
    add_error_handlers(app)
    app.include_router(api)
    app.include_router(docs_router(assets))
    app.include_router(page)
    if assets is not None:
        app.mount(ASSETS_URL, StaticFiles(directory=str(assets)), name="docs-assets")
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    return app
