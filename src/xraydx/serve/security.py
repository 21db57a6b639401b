"""Security of the server: the API token, the security headers and CSP (a pure ASGI middleware).

With a token (``--token`` or ``XRAYDX_TOKEN``) every ``/api/*`` route but ``/api/health`` needs
``Authorization: Bearer <token>`` or ``X-API-Token: <token>`` (compared in constant time). Every response gets
the security headers; the page's CSP allows its own origin only, the Swagger page's also its inline bootstrap
script (and the CDN where the ``fastapi-offline`` assets are missing). The API's answers are ``no-store``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from xraydx.constants import TOKEN_ENV as TOKEN_ENV  # one home; importable here as before

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


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The token a request carries: ``X-API-Token``, else ``Authorization: Bearer <token>``."""
    given = headers.get("x-api-token")
    auth = headers.get("authorization")
    if given is None and auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
    return given


def token_matches(given: str | None, expected: bytes) -> bool:
    """Constant-time comparison of a presented token with the server's."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", errors="replace"), expected)


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
