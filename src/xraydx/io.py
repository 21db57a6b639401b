"""Safe image reading for chest X-rays.

Every reader in this module returns a 2-D ``numpy.uint8`` array of shape ``(H, W)``: grayscale,
0 = black, bone bright.  Anything that cannot be turned into such an array raises
:class:`ImageReadError`, which carries the file name and a short human-readable reason.

Design rules
------------
* The format is decided by sniffing the content (magic bytes), never by the file name
  (:func:`xraydx.io_formats.sniff_format`; that module also holds the suffix check for walking folders).
  Supported: PNG, JPEG, BMP, TIFF (via Pillow) and DICOM (via pydicom: ``DICM`` at offset 128,
  or a data set without that preamble, as older PACS exports write, read with pydicom's ``force``).
* Sizes are checked from the header *before* any pixel data is decoded: more than
  :data:`MAX_PIXELS` declared pixels, a side shorter than :data:`MIN_SIDE` or an aspect ratio
  above :data:`MAX_ASPECT` is refused.  Files larger than :data:`MAX_FILE_BYTES` are refused
  without being read.  Pillow's own ``DecompressionBombError`` (and its
  ``DecompressionBombWarning`` when warnings are turned into errors) becomes
  :class:`ImageReadError`; Pillow's default warning threshold (~89 Mpx) is above
  :data:`MAX_PIXELS`, so any image that makes Pillow warn is refused anyway.  No global
  Pillow or ``warnings`` state is modified (the readers are safe to call from threads).
* Truncated data is an error.  This module never sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``;
  if other code sets it globally, Pillow may return partially decoded images.
* Colour and alpha: RGB/palette/CMYK are converted with Pillow's ITU-R 601-2 luminance
  (``convert("L")``).  Images with transparency (RGBA, LA, PA, palette or gray with a
  ``transparency`` entry) are composited onto **black**, because the background of a chest
  X-ray is black.
* High bit depth without a window of its own (16-bit PNG/TIFF, 32-bit integer or float TIFF,
  DICOM without VOI LUT or window) is scaled to 8 bits by the **default window**: the
  :data:`DEFAULT_WINDOW_PERCENTILES` (0.5th and 99.5th) percentiles of the pixel values
  present map to 0 and 255, values beyond them are clipped (not ``>> 8``, so 12-bit data in a
  16-bit container keeps its contrast; not min-max, so a dozen extreme pixels -- a burnt-in
  marker, a dead detector line -- cannot squeeze the chest into a few gray levels).  Where the
  percentiles coincide (a mostly constant image) the min-max of the values is used.  Non-finite
  float values are ignored when finding the window and mapped to black.  A constant
  high-bit-depth image is mapped through its nominal range (e.g. 0..65535) when one is known,
  else to all zeros.  All-constant images are returned, not refused.
* DICOM: Modality LUT (rescale slope/intercept), then the file's VOI: a VOI LUT Sequence (its
  output min-max to 8 bits), else the first WindowCenter/WindowWidth applied by the formulas of
  PS3.3 C.11.2.1.2 (VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID) straight onto 0..255;
  without either, 8-bit data (BitsStored <= 8, no rescale) is mapped through its nominal range
  -- 8-bit values are kept as they are, exactly as the same pixels in a PNG -- and anything
  else gets the default window above.  The image is inverted (bone bright) when it is
  MONOCHROME1 **or** its PresentationLUTShape is INVERSE: the DX module requires INVERSE for
  MONOCHROME1, so the two name one inversion, not two; INVERSE on MONOCHROME2 inverts.
  Colour (RGB, YBR, PALETTE COLOR) DICOM is converted to luminance; multi-frame data yields
  the first frame.  Pass ``info={}`` to :func:`read_image` to learn which window was used
  (``info["window"]``: ``file``, ``file-lut``, ``none`` or ``default``) and whether the image
  was inverted.  Compressed transfer syntaxes are decoded through
  pydicom's plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg); a missing plugin gives a reason
  naming the transfer syntax and the pip package.  Deflated transfer syntax is refused (it
  would be inflated fully into memory before any size check).

Besides :class:`ImageReadError`, only ``KeyboardInterrupt``/``SystemExit`` and ``MemoryError``
escape the readers; a non-path argument to :func:`read_image` (or non-bytes to
:func:`read_image_bytes`) is a programming error and raises ``TypeError``.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from xraydx.errors import XraydxError
from xraydx.io_formats import HEAD_BYTES, sniff_format, unrecognised_reason
from xraydx.pixels import DEFAULT_WINDOW_PERCENTILES, dicom_gray, to_uint8

__all__ = [
    "DEFAULT_WINDOW_PERCENTILES",
    "MAX_ASPECT",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageReadError",
    "image_info",
    "read_image",
    "read_image_bytes",
]

MAX_PIXELS: int = 64_000_000
MIN_SIDE: int = 32
MAX_ASPECT: float = 4.0
MAX_FILE_BYTES: int = 256 * 1024 * 1024

_PIL_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}
_DEFLATED_TS = b"1.2.840.10008.1.2.1.99"

# Transfer syntax UID prefix -> pip package(s) providing a pydicom decoder for it.
_DICOM_CODEC_PACKAGES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.1.2.4.5", "pylibjpeg pylibjpeg-libjpeg"),  # JPEG baseline / extended
    ("1.2.840.10008.1.2.4.7", "pylibjpeg pylibjpeg-libjpeg"),  # JPEG lossless
    ("1.2.840.10008.1.2.4.8", "pylibjpeg pylibjpeg-libjpeg"),  # JPEG-LS
    ("1.2.840.10008.1.2.4.9", "pylibjpeg pylibjpeg-openjpeg"),  # JPEG 2000
    ("1.2.840.10008.1.2.4.20", "pylibjpeg pylibjpeg-openjpeg"),  # HTJ2K
    ("1.2.840.10008.1.2.5", "pylibjpeg pylibjpeg-rle"),  # RLE (pydicom has a native decoder)
)


class ImageReadError(XraydxError):
    """An input could not be read as a usable chest X-ray image.

    ``path`` is the file's name as given (``"<upload>"`` or similar for in-memory data) and
    ``reason`` a short human-readable explanation.
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path: str = "<unknown>" if path is None else os.fsdecode(path)
        self.reason: str = reason
        super().__init__(self.path, reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------------------------
# Public readers
# --------------------------------------------------------------------------------------------


def _open_checked(path: str | os.PathLike[str]) -> tuple[str, BinaryIO]:
    """Stat and open ``path``; map OS problems to :class:`ImageReadError`."""
    fspath = os.fspath(path)  # TypeError for non-path arguments is deliberate
    name = os.fsdecode(fspath)
    try:
        st = os.stat(fspath)
        if stat.S_ISDIR(st.st_mode):
            raise ImageReadError(name, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageReadError(name, "not a regular file")
        _check_byte_size(name, st.st_size)
        fp = open(fspath, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise ImageReadError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(name, "is a directory") from None
    except PermissionError:
        raise ImageReadError(name, "permission denied") from None
    except ValueError as exc:  # e.g. embedded NUL byte
        raise ImageReadError(name, f"invalid path ({exc})") from None
    except OSError as exc:
        raise ImageReadError(name, f"cannot open file ({exc.strerror or exc})") from None
    return name, fp


def _check_byte_size(name: str, size: int) -> None:
    if size == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise ImageReadError(name, f"file too large ({size} bytes; limit is {MAX_FILE_BYTES} bytes)")


def read_image(path: str | os.PathLike[str], *, info: dict[str, Any] | None = None) -> np.ndarray:
    """Read an image file as a 2-D ``uint8`` grayscale array (H, W); see the module docstring.

    ``info``: a dict filled with how the pixels became 8 bits: ``format``, ``window`` (``file``: the
    DICOM's own window; ``file-lut``: its VOI LUT Sequence; ``none``: 8-bit data kept as is; ``default``:
    the percentile window, the file had none) and ``inverted`` (MONOCHROME1 / PresentationLUTShape)."""
    name, fp = _open_checked(path)
    with fp:
        return _decode(fp, name, info)


def read_image_bytes(
    data: bytes, name: str = "<upload>", *, info: dict[str, Any] | None = None
) -> np.ndarray:
    """Like :func:`read_image` for in-memory data (``bytes``, ``bytearray`` or ``memoryview``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"read_image_bytes expects bytes, got {type(data).__name__}")
    _check_byte_size(name, len(data))
    return _decode(io.BytesIO(bytes(data)), name, info)


def image_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Header information without decoding the pixels.

    Returns ``{"format", "width", "height", "bits", "mode"}``: ``format`` as from
    :func:`~xraydx.io_formats.sniff_format`, ``bits`` per sample (DICOM: BitsStored), ``mode`` the Pillow mode or
    the DICOM photometric interpretation.  The size limits are *not* applied here.
    """
    name, fp = _open_checked(path)
    with fp:
        head = fp.read(HEAD_BYTES)
        fmt = sniff_format(head)
        if fmt is None:
            raise ImageReadError(name, unrecognised_reason(head))
        try:
            if fmt == "dicom":
                fp.seek(0)
                ds = _read_dicom(fp, head, stop_before_pixels=True)
                return {
                    "format": fmt,
                    "width": int(ds.Columns),
                    "height": int(ds.Rows),
                    "bits": int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0),
                    "mode": str(ds.get("PhotometricInterpretation", "")),
                }
            im = _pil_open(fp, name, fmt)
            with im:
                return {
                    "format": fmt,
                    "width": im.size[0],
                    "height": im.size[1],
                    "bits": _pil_bits(im),
                    "mode": im.mode,
                }
        except ImageReadError:
            raise
        except MemoryError:
            raise
        except Exception as exc:
            raise ImageReadError(name, f"cannot read {fmt.upper()} header ({_exc_text(exc)})") from None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


_MAX_REASON = 2000  # characters of a decoder's message kept in a reason (a guard, not a summary)


def _exc_text(exc: BaseException) -> str:
    """A decoder's exception as one line: its type and its whole message (every line, joined by " / ")."""
    msg = " / ".join(ln.strip() for ln in str(exc).strip().splitlines() if ln.strip())
    if len(msg) > _MAX_REASON:
        msg = msg[:_MAX_REASON] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _check_dimensions(name: str, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(name, f"invalid declared size {width}x{height}")
    if width * height > MAX_PIXELS:
        raise ImageReadError(name, f"declared size {width}x{height} exceeds the {MAX_PIXELS}-pixel limit")
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(name, f"image too small ({width}x{height} px; minimum side is {MIN_SIDE} px)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        raise ImageReadError(name, f"aspect ratio {ratio:.1f} exceeds {MAX_ASPECT}")


def _decode(fp: BinaryIO, name: str, info: dict[str, Any] | None = None) -> np.ndarray:
    head = fp.read(HEAD_BYTES)
    if not head:
        raise ImageReadError(name, "empty file (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageReadError(name, unrecognised_reason(head))
    fp.seek(0)
    how: dict[str, Any] = {"format": fmt, "window": "none", "inverted": False}
    try:
        out = _decode_dicom(fp, name, head, how) if fmt == "dicom" else _decode_pil(fp, name, fmt, head, how)
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # anything else from a decoder is a bad file, not a bug to propagate
        raise ImageReadError(name, f"cannot decode {fmt.upper()} ({_exc_text(exc)})") from None
    if out.ndim != 2 or out.dtype != np.uint8:  # pragma: no cover - internal invariant
        raise ImageReadError(name, f"internal error: decoded array has shape {out.shape}, dtype {out.dtype}")
    _check_dimensions(name, out.shape[1], out.shape[0])
    if info is not None:
        info.update(how)
    return np.ascontiguousarray(out)


# ---- Pillow formats -------------------------------------------------------------------------

_BOMB_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


def _pil_open(fp: BinaryIO, name: str, fmt: str) -> ImageFile.ImageFile:
    try:
        return Image.open(fp, formats=[_PIL_FORMATS[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (only reached when its limit is above ours or warnings are errors).
        m = _BOMB_PIXELS_RE.search(str(exc))
        declared = f" ({m.group(1)} pixels declared)" if m else ""
        raise ImageReadError(name, f"declared size exceeds the {MAX_PIXELS}-pixel limit{declared}") from None
    except UnidentifiedImageError as exc:
        raise ImageReadError(name, f"corrupt {fmt.upper()} header ({_exc_text(exc)})") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, KeyError) as exc:
        raise ImageReadError(name, f"corrupt {fmt.upper()} header ({_exc_text(exc)})") from None


def _pil_bits(im: Image.Image) -> int:
    mode = im.mode
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F"):
        return 32
    return 8


def _png_precheck(name: str, head: bytes) -> None:
    """Refuse an oversized PNG from its IHDR before Pillow is involved at all."""
    if len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", head, 16)
        _check_dimensions(name, width, height)


def _decode_pil(fp: BinaryIO, name: str, fmt: str, head: bytes, how: dict[str, Any]) -> np.ndarray:
    if fmt == "png":
        _png_precheck(name, head)
    im = _pil_open(fp, name, fmt)
    with im:
        width, height = im.size
        _check_dimensions(name, width, height)
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageReadError(name, f"decompression bomb refused ({_exc_text(exc)})") from None
        except MemoryError:
            raise
        except Exception as exc:
            raise ImageReadError(
                name, f"truncated or corrupt image data ({fmt.upper()}: {_exc_text(exc)})"
            ) from None
        if im.size != (width, height):  # pragma: no cover - defensive (e.g. JPEG draft mode)
            _check_dimensions(name, *im.size)
        return _pil_to_gray(im, name, how)


def _composite_on_black(rgba: Image.Image) -> np.ndarray:
    """Luminance of an RGBA/LA image composited onto black (premultiply by alpha)."""
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.uint16)
    gray = np.asarray(
        rgba.convert("RGB").convert("L") if rgba.mode == "RGBA" else rgba.getchannel("L"), dtype=np.uint16
    )
    return ((gray * alpha + 127) // 255).astype(np.uint8)


def _pil_to_gray(im: Image.Image, name: str, how: dict[str, Any]) -> np.ndarray:
    mode = im.mode
    has_transparency = "transparency" in im.info
    if mode == "L" and not has_transparency:
        return np.asarray(im, dtype=np.uint8)
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("LA", "La"):
        return _composite_on_black(im.convert("LA"))
    if mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "L", "RGB") and has_transparency):
        return _composite_on_black(im.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        nominal = (0.0, 65535.0) if mode.startswith("I;16") else None
        if arr.ndim != 2:
            raise ImageReadError(name, f"unexpected pixel layout for mode {mode}")
        how["window"] = "default"
        return to_uint8(arr, nominal, robust=True)
    if mode in ("P", "RGB", "CMYK", "YCbCr", "RGBX"):
        return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)
    try:
        return np.asarray(im.convert("L"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageReadError(name, f"unsupported image mode {mode} ({_exc_text(exc)})") from None


# ---- DICOM --------------------------------------------------------------------------------


def _dicom_codec_package(uid: str) -> str:
    for prefix, package in _DICOM_CODEC_PACKAGES:
        if uid.startswith(prefix):
            return package
    return "a pydicom pixel-data plugin (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg or gdcm)"


def _get_decoder(uid: str) -> Any:
    from pydicom.pixels import get_decoder

    return get_decoder(uid)


def _read_dicom(fp: BinaryIO, head: bytes, stop_before_pixels: bool = False) -> Any:
    """pydicom's data set of ``fp``; a preamble-less one (see :func:`_bare_dicom`) is read with
    ``force=True`` and, where it has no transfer syntax in its file meta, gets the one its encoding shows
    (implicit or explicit VR, little or big endian)."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    bare = head[128:132] != b"DICM"
    ds = pydicom.dcmread(fp, force=bare, stop_before_pixels=stop_before_pixels)
    if bare and not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        if implicit is not None:
            ds.file_meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian
                if implicit
                else ExplicitVRLittleEndian
                if little
                else ExplicitVRBigEndian
            )
    return ds


def _decode_dicom(fp: BinaryIO, name: str, head: bytes, how: dict[str, Any]) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    if _DEFLATED_TS in head:
        raise ImageReadError(
            name, "DICOM Deflated Explicit VR Little Endian transfer syntax is not supported"
        )
    try:
        ds = _read_dicom(fp, head)
    except InvalidDicomError as exc:
        raise ImageReadError(name, f"invalid DICOM ({_exc_text(exc)})") from None
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageReadError(name, f"corrupt DICOM ({_exc_text(exc)})") from None

    if not any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(name, "DICOM has no pixel data")
    meta = getattr(ds, "file_meta", None)
    ts = None if meta is None else meta.get("TransferSyntaxUID")
    if not ts:
        raise ImageReadError(name, "DICOM has no transfer syntax UID")
    ts = pydicom.uid.UID(str(ts))
    ts_label = f"{ts.name} ({ts})" if ts.is_valid else repr(str(ts))
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ImageReadError(name, "DICOM is missing Rows/Columns") from None
    _check_dimensions(name, cols, rows)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if spp not in (1, 3):
        raise ImageReadError(name, f"unsupported DICOM SamplesPerPixel {spp}")
    if bits not in (1, 8, 16, 32, 64):
        raise ImageReadError(name, f"unsupported DICOM BitsAllocated {bits}")

    try:
        decoder = _get_decoder(ts)
    except NotImplementedError:
        raise ImageReadError(name, f"DICOM transfer syntax {ts_label} is not supported") from None
    if not decoder.is_available:
        raise ImageReadError(
            name,
            f"DICOM transfer syntax {ts_label} needs a decoder plugin: pip install {_dicom_codec_package(ts)}",
        )
    try:
        arr = pixel_array(ds, index=0)
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageReadError(
            name, f"DICOM pixel data could not be decoded ({ts_label}: {_exc_text(exc)})"
        ) from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        # Colour: ITU-R 601-2 luminance, kept in the container's range (8-bit stays as is).
        rgb = arr.astype(np.float64)
        gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        if arr.dtype == np.uint8:
            return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else None
        return to_uint8(gray, None if top is None else (0.0, top))
    if arr.ndim != 2:
        raise ImageReadError(name, f"unexpected DICOM pixel array shape {arr.shape}")
    out = dicom_gray(apply_modality_lut(arr, ds), ds, how)
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":  # one inversion, see the module docstring
        how["inverted"] = True
        out = 255 - out
    return out
