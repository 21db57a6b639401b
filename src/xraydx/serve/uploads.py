"""Uploads: the multipart body read bounded and in memory, the upload limits, and the checks on the content.

The request body is never read unbounded: ``Content-Length`` is checked first, then bytes are counted while
the body streams in, and the multipart parse happens in memory (nothing is spooled to disk; no client-sent
name ever reaches the filesystem; the file name is only echoed back, sanitised by :func:`safe_filename`).
The format is sniffed from the content (:func:`xraydx.io_formats.sniff_format`), never taken from the name or the
content type; :func:`xraydx.io.read_image_bytes` applies the pixel-count (decompression bomb), side and
aspect limits.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from xraydx.config import MIB
from xraydx.io import ImageReadError, read_image_bytes
from xraydx.io_formats import sniff_format
from xraydx.serve.errors import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from starlette.requests import Request

log = logging.getLogger("xraydx.serve")

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the file bytes
FIELD_LIMIT = 64 * 1024  # a form field that is not a file
BATCH_BODY_FILES = 4  # a batch body may hold this many files of the largest size


def single_body_limit(max_upload_bytes: int) -> int:
    """The largest request body of ``POST /api/predict`` (one file)."""
    return max_upload_bytes + MULTIPART_OVERHEAD


def batch_body_limit(max_upload_bytes: int, max_files: int) -> int:
    """The largest request body of ``POST /api/predict/batch``."""
    return max_upload_bytes * BATCH_BODY_FILES + MULTIPART_OVERHEAD * max_files


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


def limit_text(n: int, body: int | None = None) -> str:
    per_file = f"{n} bytes per file" if n < MIB else f"{n / MIB:g} MB per file"
    return per_file if body is None else f"{per_file}, {body} bytes per request"


@dataclass
class Upload:
    field: str
    filename: str
    data: bytearray = field(default_factory=bytearray)


class _Parts:
    """python-multipart's callbacks: collect the parts in memory, refusing (413) too many or too big ones."""

    def __init__(self, max_part: int, max_files: int) -> None:
        self.max_part, self.max_files = max_part, max_files
        self.parts: list[Upload] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._name, self._value = b"", b""
        self._upload: Upload | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._headers, self._name, self._value, self._upload = {}, b"", b"", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._name).lower()] = bytes(self._value)
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, disp = parse_options_header(self._headers.get(b"content-disposition", b""))
        fname = disp.get(b"filename")
        up = Upload(
            field=disp.get(b"name", b"").decode("utf-8", errors="replace"),
            filename=safe_filename(fname) if fname is not None else "",
        )
        if fname is not None:
            if len(self.parts) >= self.max_files:
                raise ApiError(413, "too_many_files", f"more than {self.max_files} files in one request")
            self.parts.append(up)
        self._upload = up

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        up = self._upload
        assert up is not None
        up.data += data[start:end]
        limit = self.max_part if up.filename else FIELD_LIMIT
        if len(up.data) > limit:
            name = up.filename or up.field
            raise ApiError(
                413, "too_large", f"{name}: larger than the upload limit ({limit_text(limit)})",
                up.filename or None,
            )  # fmt: skip

    def on_end(self) -> None:
        self.ended = True


def _check_declared_length(request: Request, max_body: int, max_part: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        n = int(declared)
    except ValueError:
        raise ApiError(400, "bad_content_length", f"invalid Content-Length {declared!r}") from None
    if n > max_body:
        raise ApiError(
            413, "too_large",
            f"request body of {n} bytes is over this server's limit ({limit_text(max_part, max_body)})",
        )  # fmt: skip


async def read_multipart(
    request: Request, *, max_body: int, max_part: int, max_files: int, what: str = "file"
) -> list[Upload]:
    """Parse a multipart/form-data body into in-memory parts, refusing it (413) as soon as it is too big."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.requests import ClientDisconnect

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(
            415, "expected_multipart",
            f"send the {what} as multipart/form-data (e.g. curl -F {what}=@image.png); got content type"
            f" {request.headers.get('content-type') or 'none'!r}",
        )  # fmt: skip
    _check_declared_length(request, max_body, max_part)
    parts = _Parts(max_part, max_files)
    parser = MultipartParser(params[b"boundary"], parts.callbacks())
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_body:
                raise ApiError(
                    413, "too_large",
                    f"request body is over this server's limit ({limit_text(max_part, max_body)})",
                )  # fmt: skip
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart body ({exc})") from None
    except ClientDisconnect:
        name = parts.parts[-1].filename if parts.parts else "the request"
        log.info("client went away during the upload of %s (%d bytes received)", name, seen)
        raise ApiError(
            499, "client_gone", f"{name}: the client closed the connection during the upload"
        ) from None
    if not parts.ended:
        raise ApiError(400, "bad_multipart", "incomplete multipart body (no closing boundary)")
    return parts.parts


# ---- the content ---------------------------------------------------------------------------------


def read_upload_image(
    data: bytes, name: str, info: dict[str, Any] | None = None
) -> tuple[np.ndarray, str | None]:
    """The decoded image and its sniffed format; 422 for an empty or unusable image, 415 for a non-image.
    ``info``: filled as :func:`xraydx.io.read_image_bytes` does (which window made it 8 bits)."""
    if not data:
        raise ApiError(422, "empty_file", f"{name}: empty file (0 bytes)", name)
    fmt = sniff_format(bytes(data[:16384]))
    try:
        img = read_image_bytes(data, name, info=info)
    except ImageReadError as exc:
        if fmt is None:
            raise ApiError(415, "unsupported_media_type", str(exc), name, plain_reason(exc.reason)) from None
        raise ApiError(422, "unreadable_image", str(exc), name, plain_reason(exc.reason)) from None
    return img, fmt


def plain_reason(reason: str) -> str:
    """A reader's reason in words for a person: unrecognised content is named as such, without the hex
    dump of its first bytes (which stays in ``message`` for a developer)."""
    if reason.startswith("not an image (unrecognised content"):
        return "not an image this server reads (the content is not PNG, JPEG, BMP, TIFF or DICOM)"
    return reason


def content_notes(img: np.ndarray, data: bytes, fmt: str | None, model_size: int) -> list[str]:
    """Warnings about an accepted image: a DICOM header's view / modality, an image smaller than the input."""
    notes = dicom_notes(bytes(data)) if fmt == "dicom" else []
    if min(img.shape) < model_size:
        notes.append(
            f"image is small ({img.shape[1]}x{img.shape[0]} px); it was enlarged to the model's"
            f" {model_size} px input"
        )
    return notes


def dicom_notes(data: bytes) -> list[str]:
    """Warnings from a DICOM header (modality); never raises."""
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
    except Exception:  # the pixel reader has already accepted the file; notes are best effort
        return []
    notes = []  # the view is xraydx.frontal's rule (status not_cxr, flag), not a note here
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in ("CR", "DX", "DR", "OT", "SC"):
        notes.append(f"DICOM Modality is {modality}: the model was trained on radiographs (CR/DX)")
    return notes
