"""Recognising the image files :mod:`xraydx.io` reads: by name and by content, without decoding anything.

* :func:`is_image_path`: whether a name has one of the :data:`SUPPORTED_SUFFIXES` (how folders are walked;
  the readers themselves ignore the name).
* :func:`sniff_format`: the format from a file's first bytes (magic numbers: PNG, JPEG, BMP, TIFF, DICOM
  with its ``DICM`` preamble or without it); :func:`sniff_file` does the same for a path and never raises
  for OS problems.
* :func:`unrecognised_reason`: why content that is none of these is refused (an unsupported format by
  name, :data:`TEXT_REASON` for text, else its first bytes).

:data:`HEAD_BYTES` is how much of a file the sniffing (and :mod:`xraydx.io`) reads first.
"""

from __future__ import annotations

import codecs
import os
import stat
import struct
from collections.abc import Callable

__all__ = [
    "HEAD_BYTES",
    "SUPPORTED_SUFFIXES",
    "TEXT_REASON",
    "is_image_path",
    "sniff_file",
    "sniff_format",
    "unrecognised_reason",
]

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
)
HEAD_BYTES: int = 16384  # enough for every magic number and for a DICOM file meta group
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has a supported image suffix (case-insensitive).

    Files without a suffix are not considered images here; :func:`xraydx.io.read_image` itself ignores
    the name and sniffs the content.
    """
    suffix = os.path.splitext(os.fsdecode(path))[1].lower()
    return suffix in SUPPORTED_SUFFIXES


def sniff_format(head: bytes) -> str | None:
    """Identify a supported format from the first bytes of a file.

    Returns ``"png"``, ``"jpeg"``, ``"bmp"``, ``"tiff"``, ``"dicom"`` (``"DICM"`` at offset
    128, or a preamble-less dataset: see :func:`_bare_dicom`) or ``None``.  Pass at least 132
    bytes to recognise DICOM.
    """
    head = bytes(head[:HEAD_BYTES])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM" or _bare_dicom(head):
        return "dicom"
    if head.startswith(b"BM") and len(head) >= 18:
        (dib_size,) = struct.unpack_from("<I", head, 14)
        if dib_size in _BMP_DIB_SIZES:
            return "bmp"
    return None


# Value representations of DICOM (PS3.5 6.2): an explicit-VR data set has one of these after its first tag.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def _bare_dicom(head: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble and ``DICM`` (older PACS exports, ACR-NEMA style):
    the file starts with a little-endian tag of the file meta (0002,00xx) or identifying (0008,00xx) group,
    then an explicit VR or an implicit length that fits in the file; the next element is checked the same
    way. A cheap structural check: pydicom decides when the file is read."""
    pos = 0
    for _ in range(2):
        if len(head) < pos + 8:
            return False
        group, elem = struct.unpack_from("<HH", head, pos)
        if group not in (0x0002, 0x0008) or elem > 0x0FFF:
            return False
        if head[pos + 4 : pos + 6] in _DICOM_VRS:
            vr = head[pos + 4 : pos + 6]
            if vr in (
                b"OB",
                b"OD",
                b"OF",
                b"OL",
                b"OV",
                b"OW",
                b"SQ",
                b"SV",
                b"UC",
                b"UN",
                b"UR",
                b"UT",
                b"UV",
            ):
                (length,) = struct.unpack_from("<I", head, pos + 8) if len(head) >= pos + 12 else (1 << 32,)
                pos += 12 + length
            else:
                (length,) = struct.unpack_from("<H", head, pos + 6)
                pos += 8 + length
        else:
            (length,) = struct.unpack_from("<I", head, pos + 4)
            if length > 1024:  # an implicit-VR value of these groups is short (a UID, a date, a code)
                return False
            pos += 8 + length
        if pos >= len(head):
            return True  # the first element fills what was read: nothing contradicts it
    return True


_OTHER_FORMATS: tuple[tuple[Callable[[bytes], bool], str], ...] = (
    (lambda h: h[:6] in (b"GIF87a", b"GIF89a"), "GIF"),
    (lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP", "WebP"),
    (lambda h: h[4:12] in (b"ftypavif", b"ftypavis"), "AVIF"),
    (lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"heic", b"heix", b"mif1", b"msf1"), "HEIF"),
    (lambda h: h.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or h.startswith(b"\xffO\xffQ"), "JPEG 2000"),
    (lambda h: h.startswith(b"%PDF"), "PDF"),
    (lambda h: h.startswith(b"PK\x03\x04"), "ZIP archive"),
    (lambda h: h.startswith(b"\x1f\x8b"), "gzip data"),
    (lambda h: h.startswith(b"\x93NUMPY"), "NumPy .npy array"),
    (lambda h: h[344:348] in (b"n+1\x00", b"ni1\x00"), "NIfTI volume"),
)


def _looks_like_text(head: bytes) -> bool:
    sample = head[:4096]
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return False
    if not text.strip():
        return bool(text)  # whitespace only still counts as text
    allowed = {"\t", "\n", "\r", "\f", "\ufeff"}
    return all(ch.isprintable() or ch in allowed for ch in text)


#: The reason for a file whose content is text (list files are told apart from images by it).
TEXT_REASON = "not an image (content looks like text)"


def sniff_file(path: str | os.PathLike[str]) -> tuple[str | None, str]:
    """``(format, "")`` from a file's first bytes (see :func:`sniff_format`), or ``(None, why)``: why it is
    not an image (:data:`TEXT_REASON` for text) or cannot be opened. Only regular files are opened (a FIFO
    would block). Never raises for OS problems."""
    name = os.fsdecode(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as exc:
        return None, f"cannot open file ({exc.strerror or exc})"
    except ValueError as exc:  # e.g. an embedded NUL byte
        return None, f"invalid path {name!r} ({exc})"
    if not head:
        return None, "empty file (0 bytes)"
    fmt = sniff_format(head)
    return (fmt, "") if fmt is not None else (None, unrecognised_reason(head))


def unrecognised_reason(head: bytes) -> str:
    """Why ``head`` (a file's first bytes, that :func:`sniff_format` does not recognise) is refused."""
    for test, label in _OTHER_FORMATS:
        if test(head):
            return f"unsupported image format ({label}); supported are PNG, JPEG, BMP, TIFF and DICOM"
    if _looks_like_text(head):
        return TEXT_REASON
    return f"not an image (unrecognised content starting with 0x{head[:8].hex()})"
