"""Bounded decode memory: what an upload will cost to decode, read from its header before any pixel is
decoded, and a byte budget that every decode in the server shares.

:func:`decode_cost` reads only headers (PNG IHDR, Pillow's lazy open for JPEG / BMP / TIFF, the DICOM
header and, for a compressed DICOM, the first frame's own JPEG / JPEG 2000 codestream header, which may
declare a larger image than Rows / Columns). The estimate is

    bytes = pixels x (bytes per sample x samples x frames + work) + copies x file bytes

where ``work`` is the peak of xraydx.io's own pipeline per pixel for that kind of image (the float
windowing of DICOM and high-bit-depth images, Pillow's 4-byte RGB storage, the alpha composite), measured
with ``benchmarks/bench_decode_memory.py`` (peak RSS of a fresh process decoding one image) and rounded up.
An image over the server's pixel limit, or whose estimate exceeds the whole budget, is refused before
decoding.

:class:`MemoryBudget` is the pool every decode draws from: a request waits (first come, first served)
until its estimate fits in what is left, decodes, then keeps only the decoded 8-bit image's bytes
reserved until its answer is sent. So the decoded images in flight and the decodes under way together
stay within ``decode_memory_bytes``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from xraydx.config import MIB
from xraydx.io import ImageReadError
from xraydx.io_formats import sniff_format
from xraydx.serve.errors import ApiError

#: peak working bytes per pixel of xraydx.io's pipeline on top of the raw samples, by kind of image
#: (measured by benchmarks/bench_decode_memory.py, rounded up; see docs/serving.md "Memory")
WORK_BYTES_PER_PIXEL: dict[str, int] = {
    "gray8": 3,  # Pillow L and its array copy (measured 3.0 B/px in all)
    "gray16": 15,  # Pillow I;16, then the float32 min-max window (14.8)
    "float32": 17,  # Pillow I / F (32-bit TIFF), then the float32 window (18.8)
    "rgb": 7,  # Pillow keeps RGB in 4 bytes a pixel; the luminance conversion (9.2)
    "alpha": 16,  # RGBA / LA / transparency: the composite onto black in uint16 (17.1)
    "dicom": 32,  # modality LUT, VOI LUT or window in float64, the float64 min-max window (28.0-30.0)
}
#: copies of the file's bytes a decode holds (the request's, read_image_bytes', pydicom's element value)
FILE_COPIES = 3

_PIL_SAMPLE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


@dataclass(frozen=True)
class DecodeCost:
    """What decoding one upload will take, from its header alone."""

    fmt: str
    width: int
    height: int
    bytes_per_sample: int
    samples: int
    frames: int
    kind: str  # a key of WORK_BYTES_PER_PIXEL
    file_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        """The estimated peak memory of decoding this upload (bytes)."""
        raw = self.bytes_per_sample * self.samples * self.frames
        return self.pixels * (raw + WORK_BYTES_PER_PIXEL[self.kind]) + FILE_COPIES * self.file_bytes

    @property
    def result_bytes(self) -> int:
        """The decoded 8-bit gray image, held until the answer is sent."""
        return self.pixels


def mb(n: int) -> str:
    return f"{n / MIB:.0f} MB" if n >= MIB else f"{n} bytes"


def decode_cost(data: bytes, name: str, max_pixels: int, budget: int) -> DecodeCost | None:
    """The cost of decoding ``data`` from its header; 422 when it declares more than ``max_pixels`` or needs
    more than the whole ``budget``. None where the header cannot be read here (the decoder then says why,
    with the pixel limit of xraydx.io still applied)."""
    fmt = sniff_format(bytes(data[:16384]))
    if fmt is None:
        return None
    try:
        cost = _dicom_cost(data) if fmt == "dicom" else _pil_cost(data, fmt)
    except (ImageReadError, MemoryError):
        raise
    except Exception:  # an unreadable header: the decoder gives the reason
        return None
    if cost is None:
        return None
    if cost.pixels > max_pixels:
        raise ApiError(
            422, "too_many_pixels",
            f"{name}: declared size {cost.width}x{cost.height} exceeds the {max_pixels}-pixel limit of this"
            " server (xraydx serve --max-megapixels)", name,
        )  # fmt: skip
    if cost.decode_bytes > budget:
        raise ApiError(
            422, "decode_too_large",
            f"{name}: decoding this {cost.width}x{cost.height} image ({cost.frames} frame(s),"
            f" {8 * cost.bytes_per_sample} bits x {cost.samples} sample(s)) would take about"
            f" {mb(cost.decode_bytes)}, more than this server's decode memory ({mb(budget)};"
            " xraydx serve --decode-memory-mb)", name,
        )  # fmt: skip
    return cost


# ---- headers -------------------------------------------------------------------------------------


def _pil_cost(data: bytes, fmt: str) -> DecodeCost | None:
    from PIL import Image

    formats = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", data, 16)
        if width * height > 4 * 10**9:  # a bomb: refuse by its size, without asking Pillow
            return DecodeCost(fmt, width, height, 1, 1, 1, "gray8", len(data))
    with Image.open(io.BytesIO(bytes(data)), formats=[formats[fmt]]) as im:  # lazy: the header only
        width, height = im.size
        mode = im.mode
        alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    per = _PIL_SAMPLE_BYTES.get(mode)
    if alpha:
        kind, per, samples = "alpha", 1, 4
    elif per == 2:
        kind, samples = "gray16", 1
    elif per == 4:
        kind, samples = "float32", 1
    elif per == 1:
        kind, samples = "gray8", 1
    else:  # RGB, CMYK, YCbCr, ...: Pillow keeps 4 bytes per pixel
        kind, per, samples = "rgb", 1, 4
    return DecodeCost(fmt, width, height, per, samples, 1, kind, len(data))


def _dicom_cost(data: bytes) -> DecodeCost | None:
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(io.BytesIO(bytes(data)), force=False)
    if "PixelData" not in ds:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        frames = 1
    per = max(1, (bits + 7) // 8)
    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
    if ts is not None and pydicom.uid.UID(str(ts)).is_compressed:
        # the codestream's own header: a decoder allocates what the codestream declares
        first = next(generate_frames(ds.PixelData, number_of_frames=frames), b"")
        inner = codestream_size(first)
        if inner is not None:
            w, h, comps, prec = inner
            cols, rows = max(cols, w), max(rows, h)
            spp = max(spp, comps)
            # openjpeg and libjpeg decode into 32-bit samples before the output array
            per = max(per, 4 if prec > 8 else 1)
    return DecodeCost("dicom", cols, rows, per, spp, frames, "dicom", len(data))


def codestream_size(buf: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, precision) from a JPEG 2000 (SIZ) or JPEG / JPEG-LS (SOFn) codestream
    header, or None where there is none in its first bytes."""
    head = bytes(buf[:65536])
    at = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (also inside a JP2 box structure)
    if at >= 0 and len(head) >= at + 4 + 38 + 3:
        siz = at + 4
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", head, siz + 4)
        (csiz,) = struct.unpack_from(">H", head, siz + 36)
        prec = (head[siz + 38] & 0x7F) + 1
        return max(0, xsiz - xo), max(0, ysiz - yo), csiz, prec
    if head.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 <= len(head):
            if head[i] != 0xFF:
                i += 1
                continue
            marker = head[i + 1]
            if marker in (0xFF, 0x01) or 0xD0 <= marker <= 0xD8:
                i += 1 if marker == 0xFF else 2
                continue
            (length,) = struct.unpack_from(">H", head, i + 2)
            if marker in _JPEG_SOF:
                prec = head[i + 4]
                h, w = struct.unpack_from(">HH", head, i + 5)
                return w, h, head[i + 9] if i + 9 < len(head) else 1, prec
            i += 2 + length
    return None


# ---- the budget ----------------------------------------------------------------------------------


class MemoryBudget:
    """A pool of bytes shared by every decode (asyncio; first come, first served). Not thread-safe: use it
    from the event loop only."""

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _grant(self) -> None:
        while self._waiters:
            need, fut = self._waiters[0]
            if fut.done():  # its request was cancelled
                self._waiters.popleft()
                continue
            if self.used + need > self.total:
                return
            self._waiters.popleft()
            self._take(need)
            fut.set_result(None)

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    async def acquire(self, n: int) -> None:
        n = min(int(n), self.total)
        if not self._waiters and self.used + n <= self.total:
            self._take(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted just as it was cancelled: give it back
                self.release(n)
            else:
                fut.cancel()
                self._grant()
            raise

    @contextlib.asynccontextmanager
    async def reserve(self, n: int) -> AsyncIterator[None]:
        n = min(int(n), self.total)
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)
