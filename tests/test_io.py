"""Tests for xraydx.io: decoding real chest X-rays in many containers, and refusing bad input."""

from __future__ import annotations

import io
import os
import resource
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from badfiles import dx_dataset
from badfiles import hang_guard as _hang_guard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

import xraydx.io as xio
from xraydx.io import (
    MAX_ASPECT,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    MIN_SIDE,
    ImageReadError,
    image_info,
    read_image,
    read_image_bytes,
)
from xraydx.io_formats import SUPPORTED_SUFFIXES, is_image_path, sniff_format

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Fixtures and builders
# --------------------------------------------------------------------------------------------


def _find_real_png() -> Path | None:
    """First real 8-bit CXR PNG: the bundled sample first, then a shared copy beside the clone."""
    for root, pattern in ((REPO, "data/sample/**/*.png"), (REPO.parent / "shared", "data/cxr3/*/*.png")):
        for path in sorted(root.glob(pattern)):
            with Image.open(path) as im:
                if im.mode == "L" and min(im.size) >= 128:
                    return path
    return None


@pytest.fixture(scope="module")
def real_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _find_real_png()
    if path is not None:
        return path
    # Last resort so the suite still runs without data: a smooth synthetic radiograph-like image.
    yy, xx = np.mgrid[0:224, 0:224]
    arr = (127 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.uint8)
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.png"
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def real(real_png: Path) -> np.ndarray:
    with Image.open(real_png) as im:
        return np.asarray(im.convert("L"))


def _pil_bytes(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def _dicom(
    arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements: object
) -> Dataset:
    """An uncompressed DX dataset holding ``arr`` (uint8/uint16, 2-D or frames x H x W)."""
    ds = dx_dataset()
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def _dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _bmp_header_only(width: int, height: int) -> bytes:
    return (
        b"BM"
        + struct.pack("<IHHI", 54, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    )


def _d12(real: np.ndarray) -> np.ndarray:
    return real.astype(np.uint16) << 4  # 12-bit content in a 16-bit container


def _expect_error(target: Path | bytes, fragment: str, name: str = "<upload>") -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        if isinstance(target, Path):
            read_image(target)
        else:
            read_image_bytes(target, name)
    err = info.value
    shown = str(target) if isinstance(target, Path) else name
    assert err.path == shown
    assert str(err) == f"{shown}: {err.reason}"
    assert fragment in err.reason, err.reason
    return err


# --------------------------------------------------------------------------------------------
# Constants, sniffing, names
# --------------------------------------------------------------------------------------------


def test_constants() -> None:
    expected = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
    assert isinstance(SUPPORTED_SUFFIXES, frozenset) and set(SUPPORTED_SUFFIXES) == expected
    assert (MAX_PIXELS, MIN_SIDE, MAX_ASPECT, MAX_FILE_BYTES) == (64_000_000, 32, 4.0, 256 * 1024 * 1024)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", True),
        ("A.PNG", True),
        ("x/y.Dcm", True),
        ("b.tiff", True),
        ("c.jpeg", True),
        ("scan", False),
        ("notes.txt", False),
        ("archive.png.gz", False),
        (Path("d.DICOM"), True),
    ],
)
def test_is_image_path(name: str | Path, expected: bool) -> None:
    assert is_image_path(name) is expected


def test_sniff_format(real_png: Path, real: np.ndarray) -> None:
    im = Image.fromarray(real)
    assert sniff_format(real_png.read_bytes()[:32]) == "png"
    assert sniff_format(_pil_bytes(im, "JPEG")) == "jpeg"
    assert sniff_format(_pil_bytes(im, "BMP")) == "bmp"
    assert sniff_format(_pil_bytes(im, "TIFF")) == "tiff"
    assert sniff_format(_dicom_bytes(_dicom(real))) == "dicom"
    assert sniff_format(b"BMW is a car brand and not a bitmap") is None
    assert sniff_format(b"") is None
    assert sniff_format(b"GIF89a" + bytes(20)) is None


def test_error_pickles_and_formats() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ImageReadError(Path("a/b.png"), "broken")))
    assert (err.path, err.reason, str(err)) == (os.path.join("a", "b.png"), "broken", "a/b.png: broken")
    assert ImageReadError(None, "x").path  # never empty


# --------------------------------------------------------------------------------------------
# Pillow formats
# --------------------------------------------------------------------------------------------


def test_png_8bit_roundtrip(real_png: Path, real: np.ndarray) -> None:
    out = read_image(real_png)
    assert out.dtype == np.uint8 and out.ndim == 2 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, real)
    np.testing.assert_array_equal(read_image(str(real_png)), out)
    np.testing.assert_array_equal(read_image_bytes(real_png.read_bytes()), out)
    np.testing.assert_array_equal(read_image_bytes(bytearray(real_png.read_bytes())), out)


@pytest.mark.parametrize(
    ("fmt", "suffix", "exact"), [("JPEG", ".jpg", False), ("BMP", ".bmp", True), ("TIFF", ".tif", True)]
)
def test_other_8bit_formats(tmp_path: Path, real: np.ndarray, fmt: str, suffix: str, exact: bool) -> None:
    path = _write(tmp_path, "img" + suffix, _pil_bytes(Image.fromarray(real), fmt))
    out = read_image(path)
    assert out.shape == real.shape and out.dtype == np.uint8
    if exact:
        np.testing.assert_array_equal(out, real)
    else:
        assert _corr(out, real) > 0.99
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), path.name), out)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("widen", ["x257", "12bit"])
def test_16bit(real: np.ndarray, fmt: str, widen: str) -> None:
    wide = real.astype(np.uint16) * 257 if widen == "x257" else _d12(real)
    data = _pil_bytes(Image.fromarray(wide), fmt)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I;16")
    out = read_image_bytes(data)
    assert out.dtype == np.uint8 and out.shape == real.shape
    assert _corr(out, real) > 0.99
    # min-max window, not ">> 8": 12-bit data must still use most of the 8-bit range
    assert int(out.max()) - int(out.min()) >= 0.9 * (int(real.max()) - int(real.min()))


def test_32bit_float_tiff_with_nan(real: np.ndarray) -> None:
    arr = real.astype(np.float32) / 7.0 - 3.0
    arr[0, :5] = np.nan
    arr[1, :5] = np.inf
    out = read_image_bytes(_pil_bytes(Image.fromarray(arr, mode="F"), "TIFF"))
    assert out.dtype == np.uint8
    assert _corr(out[2:], real[2:]) > 0.99


def test_rgb_is_luminance(real: np.ndarray) -> None:
    gray_rgb = Image.fromarray(np.stack([real] * 3, axis=-1))
    np.testing.assert_array_equal(read_image_bytes(_pil_bytes(gray_rgb, "PNG")), real)
    tinted = np.stack([real, real // 2, np.zeros_like(real)], axis=-1)
    expected = np.asarray(Image.fromarray(tinted).convert("L"))
    np.testing.assert_array_equal(read_image_bytes(_pil_bytes(Image.fromarray(tinted), "PNG")), expected)


def test_rgba_composited_onto_black(real: np.ndarray) -> None:
    alpha = np.full(real.shape, 255, dtype=np.uint8)
    alpha[:, : real.shape[1] // 2] = 0
    rgba = np.dstack([real, real, real, alpha])
    out = read_image_bytes(_pil_bytes(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert out.shape == real.shape
    assert not out[:, : real.shape[1] // 2].any()
    np.testing.assert_array_equal(out[:, real.shape[1] // 2 :], real[:, real.shape[1] // 2 :])


def test_la_and_palette_and_1bit(real: np.ndarray) -> None:
    la = Image.fromarray(np.dstack([real, np.full_like(real, 128)]), mode="LA")
    out = read_image_bytes(_pil_bytes(la, "PNG"))
    assert out.shape == real.shape and np.abs(out.astype(int) - real.astype(int) // 2).max() <= 1

    pal = Image.fromarray(real).convert("P")
    assert pal.mode == "P"
    out = read_image_bytes(_pil_bytes(pal, "PNG"))
    assert out.shape == real.shape and out.dtype == np.uint8 and _corr(out, real) > 0.99

    bilevel = Image.fromarray(real).convert("1")
    out = read_image_bytes(_pil_bytes(bilevel, "PNG"))
    assert set(np.unique(out)) <= {0, 255} and out.shape == real.shape


def test_all_black_is_returned_not_refused() -> None:
    out = read_image_bytes(_pil_bytes(Image.new("L", (64, 64)), "PNG"))
    assert out.shape == (64, 64) and not out.any()
    flat16 = read_image_bytes(_pil_bytes(Image.fromarray(np.full((64, 64), 65535, np.uint16)), "PNG"))
    assert (flat16 == 255).all()


def test_image_info(tmp_path: Path, real_png: Path, real: np.ndarray) -> None:
    h, w = real.shape
    assert image_info(real_png) == {"format": "png", "width": w, "height": h, "bits": 8, "mode": "L"}
    tif = _write(tmp_path, "a.tif", _pil_bytes(Image.fromarray(_d12(real)), "TIFF"))
    assert image_info(tif)["bits"] == 16
    dcm = _write(tmp_path, "a.dcm", _dicom_bytes(_dicom(_d12(real), bits_stored=12)))
    assert image_info(dcm) == {"format": "dicom", "width": w, "height": h, "bits": 12, "mode": "MONOCHROME2"}
    with pytest.raises(ImageReadError, match="looks like text"):
        image_info(_write(tmp_path, "t.png", b"just text\n"))


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def test_dicom_monochrome2_with_rescale(tmp_path: Path, real: np.ndarray) -> None:
    ds = _dicom(_d12(real), bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    path = _write(tmp_path, "cxr.dcm", _dicom_bytes(ds))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == real.shape
    assert _corr(out, real) > 0.99
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes()), out)


def test_dicom_monochrome1_is_inverted(real: np.ndarray) -> None:
    mono2 = read_image_bytes(_dicom_bytes(_dicom(_d12(real), bits_stored=12)))
    mono1 = read_image_bytes(_dicom_bytes(_dicom(_d12(real), "MONOCHROME1", bits_stored=12)))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert _corr(mono1, real) < -0.99


def test_dicom_windowing_is_applied(real: np.ndarray) -> None:
    d12 = _d12(real)
    centre = float(np.median(d12))
    out = read_image_bytes(_dicom_bytes(_dicom(d12, bits_stored=12, WindowCenter=centre, WindowWidth=800)))
    plain = read_image_bytes(_dicom_bytes(_dicom(d12, bits_stored=12)))
    assert out.shape == real.shape
    # a narrow window saturates both ends, unlike the plain min-max rendering
    assert (out == 0).mean() > (plain == 0).mean() + 0.05
    assert (out == 255).mean() > (plain == 255).mean() + 0.05
    assert _corr(out, real) > 0.8


def test_dicom_8bit_and_multiframe(real: np.ndarray) -> None:
    out8 = read_image_bytes(_dicom_bytes(_dicom(real)))
    assert _corr(out8, real) > 0.999
    frames = np.stack([_d12(real), _d12(real)[::-1]])
    out = read_image_bytes(_dicom_bytes(_dicom(frames, bits_stored=12)))
    np.testing.assert_array_equal(out, read_image_bytes(_dicom_bytes(_dicom(_d12(real), bits_stored=12))))


# ---- presentation and windowing (issue 16 item 9, issue 17 item 9) -------------------------------


def test_dicom_presentation_lut_inverse_is_applied(real: np.ndarray) -> None:
    stored = 4095 - _d12(real)  # bone dark in the stored values, as a viewer's INVERSE shape undoes
    info: dict = {}
    inverse = read_image_bytes(
        _dicom_bytes(_dicom(stored, bits_stored=12, PresentationLUTShape="INVERSE")), info=info
    )
    plain = read_image_bytes(_dicom_bytes(_dicom(_d12(real), bits_stored=12)))
    assert np.abs(inverse.astype(int) - plain).max() <= 1  # the same window, mirrored (rounding aside)
    assert _corr(inverse, real) > 0.99 and info["inverted"] is True
    # MONOCHROME1 with INVERSE (what the DX module requires of MONOCHROME1): the same one inversion
    mono1 = read_image_bytes(
        _dicom_bytes(_dicom(stored, "MONOCHROME1", bits_stored=12, PresentationLUTShape="INVERSE"))
    )
    np.testing.assert_array_equal(mono1, inverse)
    identity = read_image_bytes(
        _dicom_bytes(_dicom(_d12(real), bits_stored=12, PresentationLUTShape="IDENTITY"))
    )
    np.testing.assert_array_equal(identity, plain)


def test_8bit_dicom_is_read_like_the_same_pixels_as_png(real: np.ndarray) -> None:
    low = (real // 2 + 40).astype(np.uint8)  # 40..167: a min-max stretch would change every pixel
    info: dict = {}
    out = read_image_bytes(_dicom_bytes(_dicom(low)), info=info)
    np.testing.assert_array_equal(out, read_image_bytes(_pil_bytes(Image.fromarray(low), "PNG")))
    assert info["window"] == "none"
    np.testing.assert_array_equal(read_image_bytes(_dicom_bytes(_dicom(low, "MONOCHROME1"))), 255 - low)


def test_16bit_dicom_without_window_ignores_a_few_extreme_pixels(real: np.ndarray) -> None:
    d12 = _d12(real)
    spiked = d12.copy()
    spiked[:2, :6] = 65535  # a dozen pixels (a burnt-in marker, a dead detector line) far above the rest
    info: dict = {}
    out = read_image_bytes(_dicom_bytes(_dicom(spiked, bits_stored=16)), info=info)
    clean = read_image_bytes(_dicom_bytes(_dicom(d12, bits_stored=12)))
    assert info["window"] == "default"
    # min-max would squeeze the whole chest into the lowest 1/16 of the gray levels
    assert np.abs(out.astype(int)[2:] - clean.astype(int)[2:]).mean() < 3
    assert int(np.percentile(out, 99)) > 200
    assert _corr(out, real) > 0.98


def test_dicom_window_maps_onto_the_full_range(real: np.ndarray) -> None:
    d12 = _d12(real)
    lo, hi = float(np.percentile(d12, 20)), float(np.percentile(d12, 80))
    c, w = (lo + hi) / 2, hi - lo
    info: dict = {}
    out = read_image_bytes(
        _dicom_bytes(_dicom(d12, bits_stored=12, WindowCenter=c, WindowWidth=w)), info=info
    )
    assert info["window"] == "file"
    expected = np.clip(np.rint(((d12 - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255)  # PS3.3 C.11.2.1.2.1
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    # an invalid window (width 0) is ignored for the default one, not divided by
    bad: dict = {}
    read_image_bytes(_dicom_bytes(_dicom(d12, bits_stored=12, WindowCenter=c, WindowWidth=0)), info=bad)
    assert bad["window"] == "default"


def test_dicom_without_pixel_data_is_refused(tmp_path: Path, real: np.ndarray) -> None:
    ds = _dicom(_d12(real), bits_stored=12)
    del ds.PixelData
    _expect_error(_write(tmp_path, "nopix.dcm", _dicom_bytes(ds)), "DICOM has no pixel data")


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_dicom_compressed_lossless(real: np.ndarray, syntax: pydicom.uid.UID) -> None:
    ds = _dicom(_d12(real), bits_stored=12)
    reference = read_image_bytes(_dicom_bytes(ds))
    ds.compress(syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_image_bytes(_dicom_bytes(ds)), reference)


def test_dicom_jpeg_baseline_encapsulated(real: np.ndarray) -> None:
    jpeg = _pil_bytes(Image.fromarray(real), "JPEG", quality=95)
    ds = _dicom(real)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    out = read_image_bytes(_dicom_bytes(ds))
    assert out.shape == real.shape and _corr(out, real) > 0.99


def test_dicom_missing_codec_names_syntax_and_package(
    monkeypatch: pytest.MonkeyPatch, real: np.ndarray
) -> None:
    ds = _dicom(_d12(real), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    data = _dicom_bytes(ds)

    class _Unavailable:
        is_available = False

    monkeypatch.setattr(xio, "_get_decoder", lambda uid: _Unavailable())
    err = _expect_error(data, "needs a decoder plugin")
    assert "JPEG 2000" in err.reason and "pip install" in err.reason and "pylibjpeg-openjpeg" in err.reason


def test_preambleless_dicom_is_read_and_fake_dicom_is_refused(real: np.ndarray) -> None:
    """Older PACS exports write DICOM without the 128-byte preamble and ``DICM`` (issue 16 item 2): with its
    file meta (explicit VR), or the data set alone in implicit VR. Both are sniffed and read like the file
    with a preamble; a file that merely starts like a DICOM tag is still refused."""
    from badfiles import _bare_dicom_bytes

    data = _dicom_bytes(_dicom(real))
    expected = read_image_bytes(data)
    for bare in (data[132:], _bare_dicom_bytes(real.astype(np.uint16) << 4, implicit=True)):
        assert sniff_format(bare) == "dicom"
        got = read_image_bytes(bare, "IM000001")
        assert got.shape == expected.shape
        assert float(np.corrcoef(got.ravel(), expected.ravel())[0, 1]) > 0.99
    np.testing.assert_array_equal(read_image_bytes(data[132:]), expected)
    assert sniff_format(b"\x08\x00\x05\x00" + b"garbage" * 40) is None  # a tag, then no VR or sane length
    assert sniff_format(b"\x02\x00\x00\x00UL\x04\x00" + b"\x7a" * 300) is None  # a second tag that is not
    _expect_error(bytes(128) + b"DICM" + b"garbage" * 20, "DICOM")


def test_the_whole_decoder_reason_reaches_the_user(monkeypatch: pytest.MonkeyPatch, real: np.ndarray) -> None:
    """A decoder's message of several lines is kept whole (issue 16 item 16: only its first line was)."""
    import pydicom.pixels

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("the first line\nthe line that says why: fragment 7 is cut short\n")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", fail)
    err = _expect_error(_dicom_bytes(_dicom(real)), "the first line / the line that says why: fragment 7")
    assert "\n" not in err.reason


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path, "empty.png", b""), "empty file (0 bytes)")
    _expect_error(b"", "empty file (0 bytes)", name="up.png")


def test_truncated_png(tmp_path: Path, real_png: Path) -> None:
    data = real_png.read_bytes()
    _expect_error(_write(tmp_path, "half.png", data[: len(data) // 2]), "truncated or corrupt image data")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg(tmp_path: Path, real: np.ndarray, keep: float) -> None:
    data = _pil_bytes(Image.fromarray(real), "JPEG")
    _expect_error(
        _write(tmp_path, "cut.jpg", data[: int(len(data) * keep)]), "truncated or corrupt image data"
    )


def test_text_named_png(tmp_path: Path) -> None:
    _expect_error(
        _write(tmp_path, "fake.png", b"<html><body>404 not found</body></html>\n"),
        "not an image (content looks like text)",
    )
    _expect_error(_write(tmp_path, "fake2.png", b"\xde\xad\xbe\xef" * 40), "not an image")
    _expect_error(_write(tmp_path, "anim.png", b"GIF89a" + bytes(200)), "unsupported image format (GIF)")


def test_extension_is_ignored(tmp_path: Path, real_png: Path, real: np.ndarray) -> None:
    path = _write(tmp_path, "no_suffix", real_png.read_bytes())
    np.testing.assert_array_equal(read_image(path), real)
    bmp_named_png = _write(tmp_path, "really_a_bmp.png", _pil_bytes(Image.fromarray(real), "BMP"))
    np.testing.assert_array_equal(read_image(bmp_named_png), real)


def test_png_bomb_refused_from_header(tmp_path: Path) -> None:
    path = _write(tmp_path, "bomb.png", _png_header_only(100_000, 100_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    _expect_error(path, "declared size 100000x100000 exceeds the 64000000-pixel limit")
    assert time.perf_counter() - start < 1.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50 * 1024


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (9_000, 8_000), (20_000, 5_000)])
def test_bmp_bomb_refused(width: int, height: int) -> None:
    start = time.perf_counter()
    _expect_error(_bmp_header_only(width, height), "exceeds the 64000000-pixel limit")
    assert time.perf_counter() - start < 1.0


def test_pillow_bomb_error_is_wrapped(monkeypatch: pytest.MonkeyPatch, real: np.ndarray) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow itself now objects first
    _expect_error(_pil_bytes(Image.fromarray(real), "JPEG"), "pixel limit")  # DecompressionBombError
    small = _pil_bytes(Image.fromarray(real[:40, :40]), "TIFF")  # 1600 px: only Pillow's warning
    with pytest.warns(Image.DecompressionBombWarning):
        assert read_image_bytes(small).shape == (40, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        _expect_error(small, "pixel limit")


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ((1, 1), "image too small (1x1 px; minimum side is 32 px)"),
        ((2000, 20), "image too small (2000x20 px"),
        ((2000, 100), "aspect ratio 20.0 exceeds 4.0"),
        ((40, 400), "aspect ratio 10.0 exceeds 4.0"),
    ],
)
def test_size_limits(tmp_path: Path, size: tuple[int, int], fragment: str) -> None:
    path = _write(tmp_path, "odd.png", _pil_bytes(Image.new("L", size, 90), "PNG"))
    _expect_error(path, fragment)


def test_size_limits_apply_to_dicom(real: np.ndarray) -> None:
    _expect_error(_dicom_bytes(_dicom(real[:10, :10])), "image too small (10x10 px")
    ds = _dicom(real[:8, :8])
    ds.Rows, ds.Columns = 40_000, 40_000  # declared only: refused before any decoding
    _expect_error(_dicom_bytes(ds), "declared size 40000x40000 exceeds")


def test_missing_directory_and_permission(tmp_path: Path, real_png: Path) -> None:
    _expect_error(tmp_path / "nope.png", "file not found")
    _expect_error(tmp_path, "is a directory")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return  # root reads everything
    locked = _write(tmp_path, "locked.png", real_png.read_bytes())
    locked.chmod(0)
    try:
        _expect_error(locked, "permission denied")
    finally:
        locked.chmod(0o600)


def test_file_size_guard(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, real_png: Path) -> None:
    monkeypatch.setattr(xio, "MAX_FILE_BYTES", 100)
    _expect_error(_write(tmp_path, "big.png", real_png.read_bytes()), "file too large")
    _expect_error(real_png.read_bytes(), "file too large")


def test_non_bytes_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        read_image_bytes("not bytes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Fuzzing: only ImageReadError or a valid array, never anything else, never a hang
# --------------------------------------------------------------------------------------------


def _check_outcome(data: bytes) -> None:
    with _hang_guard(5.0):
        try:
            out = read_image_bytes(data, "fuzz")
        except ImageReadError as err:
            assert err.path == "fuzz" and err.reason
            return
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 2
    assert min(out.shape) >= MIN_SIDE


@st.composite
def _mutations(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data[pos] = draw(st.integers(0, 255))
        else:  # hit header fields (sizes, lengths) more often than pixel data
            pos = draw(st.integers(0, min(len(data), 400) - 1))
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


_FUZZ = settings(
    max_examples=200,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.filterwarnings("ignore")
@_FUZZ
@given(data=st.binary(min_size=0, max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_outcome(data)
    _check_outcome(b"\x89PNG\r\n\x1a\n" + data)
    _check_outcome(bytes(128) + b"DICM" + data)


_SMALL = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
_PNG_BASE = _pil_bytes(Image.fromarray(_SMALL), "PNG")
_DCM_BASE = _dicom_bytes(
    _dicom(
        _SMALL.astype(np.uint16) << 4,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=0,
        WindowCenter=2000,
        WindowWidth=3000,
    )
)


@pytest.mark.filterwarnings("ignore")
@_FUZZ
@given(data=_mutations(_PNG_BASE))
def test_fuzz_mutated_png(data: bytes) -> None:
    _check_outcome(data)


@pytest.mark.filterwarnings("ignore")
@_FUZZ
@given(data=_mutations(_DCM_BASE))
def test_fuzz_mutated_dicom(data: bytes) -> None:
    _check_outcome(data)


def test_fuzz_bases_are_valid() -> None:
    assert read_image_bytes(_PNG_BASE).shape == (64, 64)
    assert read_image_bytes(_DCM_BASE).shape == (64, 64)
