"""Property-based fuzzing of the image reader beyond tests/test_io.py (random bytes, mutated PNG/DICOM bytes):
mutated JPEG / TIFF / BMP, structured PNG chunk edits, and structured DICOM headers.

For every input the reader either raises ImageReadError (with the name and a reason) or returns a usable
image: a 2-D uint8 array with both sides >= MIN_SIDE, at most MAX_PIXELS pixels and an aspect ratio of at
most MAX_ASPECT. Nothing else escapes, and nothing hangs (a SIGALRM guard per example). PNG edits that do
not change the pixels (IDAT split into pieces, ancillary chunks added, moved or dropped) must give exactly
the original pixels: a reader that "succeeds" with other pixels would be returning garbage.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from badfiles import dx_dataset
from badfiles import hang_guard as _hang_guard
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import sample_images
from xraydx.io import MAX_ASPECT, MAX_PIXELS, MIN_SIDE, ImageReadError, read_image_bytes

_REAL = np.asarray(Image.open(sample_images("train", "normal")[0]).convert("L"))
_CROP = np.ascontiguousarray(_REAL[80:144, 80:144])  # 64 x 64 of a real radiograph: small, fast to decode
FUZZ = settings(
    max_examples=150,
    deadline=None,  # the SIGALRM guard below is the time limit
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def outcome(data: bytes) -> np.ndarray | None:
    """Read ``data``; None for a clean refusal. Any other exception, or a bad array, fails the test."""
    with _hang_guard(5.0):
        try:
            out = read_image_bytes(data, "fuzz.bin")
        except ImageReadError as err:
            assert err.path == "fuzz.bin" and err.reason and str(err).startswith("fuzz.bin: ")
            return None
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 2
    h, w = out.shape
    assert min(h, w) >= MIN_SIDE and h * w <= MAX_PIXELS and max(h, w) / min(h, w) <= MAX_ASPECT
    assert out.flags.c_contiguous
    return out


def _pil(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@st.composite
def mutated(draw: st.DrawFn, base: bytes, header: int) -> bytes:
    """Byte edits of ``base``: overwrites (biased to the first ``header`` bytes and to boundary values),
    inserted and deleted runs, and truncation."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "set_header", "insert", "delete"]))
        if op == "set":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "set_header":
            data[draw(st.integers(0, min(header, len(data)) - 1))] = draw(
                st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])
            )
        elif op == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif len(data) > 2:
            pos = draw(st.integers(0, len(data) - 2))
            del data[pos : pos + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


_JPEG = _pil(_CROP, "JPEG", quality=90)
_JPEG_PROGRESSIVE = _pil(_CROP, "JPEG", quality=80, progressive=True)
_TIFF = _pil(_CROP.astype(np.uint16) * 257, "TIFF")
_TIFF_DEFLATE = _pil(_CROP, "TIFF", compression="tiff_adobe_deflate")
_BMP = _pil(_CROP, "BMP")


def test_bases_decode() -> None:
    for data in (_JPEG, _JPEG_PROGRESSIVE, _TIFF, _TIFF_DEFLATE, _BMP):
        out = outcome(data)
        assert out is not None and out.shape == _CROP.shape
        assert np.corrcoef(out.ravel().astype(float), _CROP.ravel().astype(float))[0, 1] > 0.98


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(data=st.one_of(mutated(_JPEG, 700), mutated(_JPEG_PROGRESSIVE, 700)))
def test_fuzz_mutated_jpeg(data: bytes) -> None:
    outcome(data)


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(data=st.one_of(mutated(_TIFF, 300), mutated(_TIFF_DEFLATE, 300)))
def test_fuzz_mutated_tiff(data: bytes) -> None:
    outcome(data)


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(data=mutated(_BMP, 60))
def test_fuzz_mutated_bmp(data: bytes) -> None:
    outcome(data)


# ---- PNG, chunk by chunk --------------------------------------------------------------------------

_SIG = b"\x89PNG\r\n\x1a\n"
ANCILLARY = [b"tEXt", b"tIME", b"gAMA", b"pHYs", b"iTXt", b"zTXt", b"sBIT", b"bKGD", b"prVt"]


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def split_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], len(_SIG)
    while pos < len(png):
        (n,) = struct.unpack_from(">I", png, pos)
        out.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def join_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return _SIG + b"".join(chunk(k, d) for k, d in chunks)


_PNG = _pil(_CROP, "PNG")
_ZTXT_BOMB = b"comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9)
_PNG_CHUNKS = split_chunks(_PNG)


@st.composite
def neutral_png(draw: st.DrawFn) -> bytes:
    """Edits that keep the pixels: IDAT split into pieces, ancillary chunks (valid CRC) inserted before or
    after the image data."""
    ihdr, idat = _PNG_CHUNKS[0], b"".join(d for k, d in _PNG_CHUNKS if k == b"IDAT")
    cuts = sorted(draw(st.lists(st.integers(1, len(idat) - 1), max_size=6, unique=True)))
    pieces = [idat[a:b] for a, b in zip([0, *cuts], [*cuts, len(idat)], strict=True)]
    extra = st.tuples(st.sampled_from([b"tEXt", b"tIME", b"pHYs", b"prVt"]), st.binary(max_size=40))
    before = draw(st.lists(extra, max_size=3))
    after = draw(st.lists(extra, max_size=3))
    # tIME / pHYs have fixed sizes; give them valid payloads so that Pillow has nothing to object to
    fix = {b"tIME": struct.pack(">HBBBBB", 2024, 1, 2, 3, 4, 5), b"pHYs": struct.pack(">IIB", 2835, 2835, 1)}
    before = [(k, fix.get(k, b"k\x00" + d)) for k, d in before]
    after = [(k, fix.get(k, b"k\x00" + d)) for k, d in after]
    return join_chunks([ihdr, *before, *[(b"IDAT", p) for p in pieces], *after, (b"IEND", b"")])


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(data=neutral_png())
def test_fuzz_png_edits_that_keep_the_pixels(data: bytes) -> None:
    out = outcome(data)
    assert out is not None, "a valid PNG was refused"
    np.testing.assert_array_equal(out, _CROP)


@st.composite
def structured_png(draw: st.DrawFn) -> bytes:
    """Chunk-level edits with valid CRCs: IHDR fields rewritten, chunks dropped / duplicated / reordered,
    IDAT payload edited and recompressed data cut, random or oversized (zTXt bomb) ancillary chunks."""
    chunks = list(_PNG_CHUNKS)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["ihdr", "drop", "dup", "swap", "idat", "ancillary", "ztxt_bomb", "plte"]))
        at = next((i for i, (k, d) in enumerate(chunks) if k == b"IHDR" and len(d) == 13), None)
        if op == "ihdr" and at is not None:
            w, h, depth, color, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[at][1])
            field = draw(st.sampled_from(["w", "h", "depth", "color", "comp", "filt", "inter"]))
            big = st.one_of(
                st.integers(0, 4096), st.sampled_from([0, 1, 31, 32, 2**31 - 1, 2**32 - 1, 100_000])
            )
            if field == "w":
                w = draw(big)
            elif field == "h":
                h = draw(big)
            elif field == "depth":
                depth = draw(st.sampled_from([0, 1, 2, 4, 8, 16, 3, 255]))
            elif field == "color":
                color = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7, 255]))
            elif field == "comp":
                comp = draw(st.integers(0, 255))
            elif field == "filt":
                filt = draw(st.integers(0, 255))
            else:
                inter = draw(st.integers(0, 255))
            chunks[at] = (b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, comp, filt, inter))
        elif op == "drop" and len(chunks) > 1:
            del chunks[draw(st.integers(0, len(chunks) - 1))]
        elif op == "dup":
            i = draw(st.integers(0, len(chunks) - 1))
            chunks.insert(i, chunks[i])
        elif op == "swap" and len(chunks) > 1:
            i, j = draw(st.integers(0, len(chunks) - 1)), draw(st.integers(0, len(chunks) - 1))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "idat":
            raw = bytearray(zlib.decompress(b"".join(d for k, d in _PNG_CHUNKS if k == b"IDAT")))
            for _ in range(draw(st.integers(1, 8))):
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))  # filter bytes included
            comp = zlib.compress(bytes(raw))
            comp = comp[: draw(st.integers(1, len(comp)))]
            chunks = [c for c in chunks if c[0] != b"IDAT"]
            chunks.insert(min(1, len(chunks)), (b"IDAT", comp))
        elif op == "ancillary":
            chunks.insert(
                draw(st.integers(0, len(chunks))),
                (draw(st.sampled_from(ANCILLARY)), draw(st.binary(max_size=64))),
            )
        elif op == "ztxt_bomb":  # 64 MiB of text in 64 KiB: Pillow's text-chunk limit must refuse it cleanly
            chunks.insert(1, (b"zTXt", _ZTXT_BOMB))
        else:
            chunks.insert(1, (b"PLTE", draw(st.binary(max_size=800))))
    return join_chunks(chunks)


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(data=structured_png())
def test_fuzz_structured_png(data: bytes) -> None:
    outcome(data)


# ---- DICOM, field by field ---------------------------------------------------------------------------


@st.composite
def structured_dicom(draw: st.DrawFn) -> bytes:
    """Uncompressed DICOM whose header fields disagree with each other and with the pixel data: sizes,
    bit depths, samples per pixel, photometric interpretation, signedness, frames, rescale and window values."""
    ds = dx_dataset()
    rows = draw(st.one_of(st.just(64), st.integers(0, 300), st.sampled_from([1, 31, 65535])))
    cols = draw(st.one_of(st.just(64), st.integers(0, 300), st.sampled_from([1, 31, 65535])))
    ds.Rows, ds.Columns = rows, cols
    bits = draw(st.sampled_from([8, 16, 16, 32, 1, 12, 0]))
    ds.BitsAllocated = bits
    ds.BitsStored = draw(st.sampled_from([bits, 12, 1, 0, 33])) if bits else 0
    ds.HighBit = max(0, int(ds.BitsStored) - 1)
    ds.SamplesPerPixel = draw(st.sampled_from([1, 1, 3, 4, 0]))
    ds.PhotometricInterpretation = draw(
        st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", "HSV", ""])
    )
    ds.PixelRepresentation = draw(st.sampled_from([0, 1, 2]))
    if int(ds.SamplesPerPixel) > 1:
        ds.PlanarConfiguration = draw(st.sampled_from([0, 1, 7]))
    if draw(st.booleans()):
        ds.NumberOfFrames = draw(st.sampled_from([1, 2, 0, 1000]))
    if draw(st.booleans()):
        ds.RescaleSlope = draw(st.sampled_from(["1", "0", "-1", "1e308", "0.001"]))
        ds.RescaleIntercept = draw(st.sampled_from(["0", "-1024", "1e308"]))
    if draw(st.booleans()):
        ds.WindowCenter = draw(st.sampled_from(["40", "0", "-1e9", "2048"]))
        ds.WindowWidth = draw(st.sampled_from(["400", "0", "1", "-5", "1e9"]))
    want = rows * cols * max(1, int(ds.SamplesPerPixel)) * max(1, bits // 8)
    size = min(
        draw(st.sampled_from([want, want, want // 2, want + 7, 0, 3])), 1 << 21
    )  # huge only as declared
    ds.PixelData = (
        np.resize(np.frombuffer(_CROP.tobytes(), np.uint8), max(size, 0)).tobytes() if size else b""
    )
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError, struct.error):
        reject()  # pydicom will not write this combination; nothing to read
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(data=structured_dicom())
def test_fuzz_structured_dicom(data: bytes) -> None:
    outcome(data)
