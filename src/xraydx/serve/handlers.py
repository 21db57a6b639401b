"""Every error as the same JSON shape (``{"error": {status, code, message[, file]}, "detail"}``).

A client's problem is an :class:`~xraydx.serve.errors.ApiError` (4xx; 503 when the model cannot run here);
FastAPI's own 404 / 405 and validation errors are answered the same way; anything else is a server bug,
logged with its traceback (once) and answered 500 without internals by
:class:`xraydx.serve.security.SecurityHeaders`, so that the 500 carries the security headers too.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from xraydx.serve.errors import ApiError

log = logging.getLogger("xraydx.serve")


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.code == "busy":
        headers = {"Retry-After": "1"}
    return JSONResponse(exc.payload(), status_code=exc.status, headers=headers)


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(ApiError(exc.status_code, "http_error", str(exc.detail)))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(ApiError(422, "invalid_request", msgs or "invalid request"))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
