"""A client's problem with one request: :class:`ApiError`, answered as JSON with its HTTP status.

(The server's own start-up problems are :class:`xraydx.errors.ServeError`.)"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A client-side problem, answered as JSON ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, file: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.file = file
        if reason is None:  # the message without the file name it starts with: what a page shows by a name
            prefix = f"{file}: " if file else None
            reason = message[len(prefix) :] if prefix and message.startswith(prefix) else message
        self.reason = reason

    def payload(self) -> dict[str, Any]:
        err: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.file is not None:
            err["file"] = self.file
        err["reason"] = self.reason
        return {"error": err, "detail": self.message}
