"""The API documentation page (``/docs``): Swagger UI from the ``fastapi-offline`` wheel where installed
(so it works offline), else from a CDN; the CSP of the page follows that choice."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

from xraydx.serve.security import DOCS_CSP_CDN, DOCS_CSP_OFFLINE

ASSETS_URL = "/docs-assets"
CDN_JS = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"
CDN_CSS = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"
CDN_ICON = "https://fastapi.tiangolo.com/img/favicon.png"


def offline_docs_assets() -> Path | None:
    """Swagger UI's files as shipped in the ``fastapi-offline`` wheel (found, not imported)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    need = ("swagger-ui-bundle.js", "swagger-ui.css")
    return static if all((static / n).is_file() for n in need) else None


def docs_csp(assets: Path | None) -> str:
    """The Content-Security-Policy of the docs page: own origin only when the assets are served here."""
    return DOCS_CSP_OFFLINE if assets is not None else DOCS_CSP_CDN


def docs_router(assets: Path | None) -> APIRouter:
    """``/docs`` and its OAuth2 redirect page; the assets themselves are mounted at ``ASSETS_URL``."""
    if assets is not None:
        js, css, icon = (
            f"{ASSETS_URL}/{n}" for n in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
        )
    else:  # FastAPI's defaults: the browser fetches Swagger UI from a CDN
        js, css, icon = CDN_JS, CDN_CSS, CDN_ICON
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="xraydx API", oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=js, swagger_css_url=css, swagger_favicon_url=icon,
            swagger_ui_parameters={"validatorUrl": None},
        )  # fmt: skip

    @router.get("/docs/oauth2-redirect")
    async def docs_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    return router
