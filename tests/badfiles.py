"""The bad-input matrix: files built from a real bundled chest X-ray, each with the reason it must give.

Used by tests/test_bad_inputs_cli.py and tests/test_bad_inputs_api.py. A case whose ``reason`` is
``None`` must be read fine (16-bit, RGBA, palette, JPEG 2000 DICOM, a non-UTF-8 file name); any
other case must be refused with an error whose reason contains ``reason``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import sample_images


@dataclass(frozen=True)
class Case:
    key: str
    name: bytes  # file name as bytes, so that non-UTF-8 names are possible
    data: bytes
    reason: str | None  # None: must decode; else a fragment of the expected error reason

    @property
    def display_name(self) -> str:
        return os.fsdecode(self.name)


def real_xray() -> tuple[Path, np.ndarray]:
    """The first bundled training image (a real 224x224 8-bit CXR) and its pixels."""
    path = sample_images("train", "covid")[0]
    with Image.open(path) as im:
        return path, np.asarray(im.convert("L"))


def _pil(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking 8-bit gray PNG declaring ``width`` x ``height`` pixels (10 Gpx by default), with a
    small zlib stream of zero rows: decoding it naively would allocate gigabytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 << 20), 9)  # the first few rows; ~1 KB compressed
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def dx_dataset():  # -> pydicom Dataset
    """An empty uncompressed DX DICOM dataset with its file meta: the skeleton every test DICOM shares."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    return ds


def dicom_bytes(pixels: np.ndarray | None, transfer_syntax: str = "1.2.840.10008.1.2.1") -> bytes:
    """A DX DICOM file of a 12-bit image (``pixels`` uint16); ``None`` leaves out the pixel data.
    A compressed ``transfer_syntax`` is encoded through pydicom (JPEG 2000 needs pylibjpeg-openjpeg)."""
    from pydicom.uid import ExplicitVRLittleEndian

    shape = (224, 224) if pixels is None else pixels.shape
    ds = dx_dataset()
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build_cases() -> list[Case]:
    """Every case of the matrix, built from one real sample X-ray."""
    from pydicom.uid import JPEG2000Lossless

    _, real = real_xray()
    png = _pil(Image.fromarray(real), "PNG")
    jpeg = _pil(Image.fromarray(real), "JPEG", quality=90)
    rgba = np.dstack([real, real, real, np.full_like(real, 255)])
    twelve_bit = real.astype(np.uint16) << 4
    strip = np.tile(real[100:140, :], (1, 10))  # 40 x 2240 px: aspect ratio 56
    return [
        Case("zero_bytes", b"zero.png", b"", "empty file (0 bytes)"),
        Case("truncated_png", b"truncated.png", png[: len(png) // 2], "truncated or corrupt image data"),
        Case(
            "truncated_jpeg",
            b"truncated.jpg",
            jpeg[: int(len(jpeg) * 0.6)],
            "truncated or corrupt image data",
        ),
        Case(
            "text_named_png", b"notes.png", b"patient list\nno images here\n" * 20, "content looks like text"
        ),
        Case("png_bomb", b"bomb.png", png_bomb(), "exceeds the 64000000-pixel limit"),
        Case("png_16bit", b"gray16.png", _pil(Image.fromarray(real.astype(np.uint16) * 257), "PNG"), None),
        Case("png_rgba", b"rgba.png", _pil(Image.fromarray(rgba, "RGBA"), "PNG"), None),
        Case("png_palette", b"palette.png", _pil(Image.fromarray(real).convert("P"), "PNG"), None),
        Case(
            "one_pixel",
            b"onepixel.png",
            _pil(Image.fromarray(real[:1, :1]), "PNG"),
            "image too small (1x1 px",
        ),
        Case("elongated", b"strip.png", _pil(Image.fromarray(strip), "PNG"), "aspect ratio 56.0 exceeds"),
        Case("dicom_no_pixels", b"nopixels.dcm", dicom_bytes(None), "DICOM has no pixel data"),
        Case("dicom_jpeg2000", b"j2k.dcm", dicom_bytes(twelve_bit, JPEG2000Lossless), None),
        Case("non_utf8_name_ok", b"caf\xe9-\xff.png", png, None),
        Case("non_utf8_name_bad", b"bad-\xff\xfe.png", b"\x00\x01garbage" * 30, "not an image"),
    ]


def write_cases(folder: Path, cases: list[Case]) -> dict[str, Path]:
    """Write each case into ``folder``; returns key -> path (non-UTF-8 names as surrogate escapes)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for c in cases:
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), c.name)))
        path.write_bytes(c.data)
        out[c.key] = path
    return out


def printable(path: str | os.PathLike[str]) -> str:
    """How xraydx shows a path in a message: undecodable bytes as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def hang_guard(seconds: float) -> Iterator[None]:
    """Fail loudly instead of hanging (SIGALRM; a no-op where unavailable)."""
    if not hasattr(signal, "setitimer"):  # pragma: no cover - not POSIX
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise TimeoutError(f"the reader took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
