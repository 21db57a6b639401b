"""Security of the server: the API token, the security headers and CSP (a pure ASGI middleware).

With a token (``--token`` or ``XRAYDX_TOKEN``) every ``/api/*`` route but ``/api/health`` needs
``Authorization: Bearer <token>`` or ``X-API-Token: <token>`` (compared in constant time). Every response gets
the security headers; the page's CSP allows its own origin only, the Swagger page's also its inline bootstrap
script (and the CDN where the ``fastapi-offline`` assets are missing). The API's answers are ``no-store``.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from xraydx.constants import TOKEN_ENV as TOKEN_ENV  # one home; importable here as before

LOOPBACK = ("127.0.0.1", "::1", "localhost")
ANY_HOST = "*"

log = logging.getLogger("xraydx.serve")

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


def host_name(header: str) -> str:
    """The host name of a ``Host`` header value: no port, no IPv6 brackets, lower case, no final dot."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1 : h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.partition(":")[0]
    return h.rstrip(".")


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request's ``Host`` header names one of ``allowed`` (``"*"``: any). A request without one
    is refused: every browser sends it, and DNS rebinding is only caught by looking at it."""
    names = set(allowed)
    if ANY_HOST in names:
        return True
    return header is not None and host_name(header) in {host_name(n) for n in names}


def header_list(path: str, docs_csp: bytes = b"") -> list[tuple[bytes, bytes]]:
    """The security headers of a response to ``path`` (the CSP of the docs page on its own paths)."""
    csp = docs_csp if path in DOCS_PATHS and docs_csp else PAGE_CSP.encode()
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
    return extra


class SecurityHeaders:
    """Pure ASGI middleware, the outermost layer but uvicorn's: refuses (400) a request whose ``Host``
    header is not one of ``allowed_hosts`` (DNS rebinding), adds the security headers (and no-store on
    the API) to every response, and answers an unexpected exception itself with a logged 500, so that a
    500 carries the same headers and the traceback is logged once."""

    def __init__(self, app: Any, docs_csp: str, allowed_hosts: Iterable[str] = (ANY_HOST,)) -> None:
        self.app = app
        self.docs_csp = docs_csp.encode()
        self.allowed_hosts = tuple(allowed_hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        extra = header_list(path, self.docs_csp)
        started = False

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in extra if h[0] not in names
                ]
            await send(message)

        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
        if not host_allowed(host, self.allowed_hosts):
            shown = "none" if host is None else repr(host_name(host)[:100])
            await _send_json(send_with_headers, 400, "bad_host",
                             f"Host header {shown} is not one this server answers to (xraydx serve"
                             " --allowed-hosts)")  # fmt: skip
            return
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:  # a server bug: log it once, answer 500 with the headers, no internals
            log.error("unexpected error on %s %s", scope.get("method"), path, exc_info=exc)
            if not started:
                await _send_json(send_with_headers, 500, "internal_error",
                                 f"internal server error ({type(exc).__name__})")  # fmt: skip


async def _send_json(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"status": status, "code": code, "message": message}, "detail": message})
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body.encode()})
