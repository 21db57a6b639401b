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
    """How xraydx shows a path in a message: undecodable bytes and control characters as \\xNN escapes."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 else ch for ch in text)


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


# ---- folder-walk cases: what a folder may hold besides files (issue 16 items 1, 2, 16; issue 17 item 11) ----


@dataclass(frozen=True)
class WalkCase:
    """One entry of a folder given to ``predict``. ``expect``: ``read`` (a row with status ok), ``row`` (an
    error row whose status holds ``reason``, also on stderr; exit code 3) or ``left_out`` (no row; the note on
    stderr holds ``reason``). ``blocked``: the test makes ``os.scandir`` fail for it (tests run as root, and
    chmod 000 does not stop root). ``as_input``: given on the command line, not found by the walk."""

    key: str
    name: str
    expect: str
    reason: str
    blocked: bool = False
    as_input: bool = False


def _bare_dicom_bytes(pixels: np.ndarray, implicit: bool) -> bytes:
    """A DICOM without the 128-byte preamble and ``DICM``: the file meta group first (explicit VR), or, with
    ``implicit``, the data set alone in implicit VR little endian (no file meta at all)."""
    import pydicom
    from pydicom.filewriter import dcmwrite

    data = dicom_bytes(pixels)
    if not implicit:
        return data[132:]
    ds = pydicom.dcmread(io.BytesIO(data))
    bare = pydicom.Dataset()
    bare.update(ds)
    buf = io.BytesIO()
    dcmwrite(buf, bare, implicit_vr=True, little_endian=True)
    return buf.getvalue()


WALK_CASES: list[WalkCase] = [
    WalkCase("unlistable", "locked", "row", "cannot list folder (Permission denied)", blocked=True),
    WalkCase("link_loop", "loop-a", "row", "symbolic link loop"),
    WalkCase("fifo", "pipe", "row", "not a regular file (FIFO)"),
    WalkCase("fifo_png", "pipe.png", "row", "not a regular file"),
    WalkCase("dicom_no_suffix", "IM000001", "read", ""),
    WalkCase("dicom_bare_meta", "IM000002", "read", ""),
    WalkCase("dicom_bare_implicit", "1.2.840.99.3", "read", ""),
    WalkCase(
        "text_no_suffix", "README", "row", "no image file suffix, and not an image (content looks like text)"
    ),
    WalkCase("dicomdir", "DICOMDIR", "left_out", "1 DICOMDIR"),
    WalkCase("mask_folder", "Normal/lung masks", "left_out", "left out 1 files in 1 mask folders"),
    WalkCase("control_chars", "esc-\x1b[2J-cr\r.png", "row", "not an image"),
    WalkCase("png_named_txt", "scan.txt", "read", "", as_input=True),
    WalkCase("binary_txt", "junk.txt", "row", "not read as a list file", as_input=True),
]


def write_walk_cases(folder: Path) -> dict[str, Path]:
    """Build every :data:`WALK_CASES` entry in ``folder`` from one real X-ray; returns key -> path.
    ``Normal/images/`` holds a real image beside the mask folder."""
    _, real = real_xray()
    png = _pil(Image.fromarray(real), "PNG")
    twelve = real.astype(np.uint16) << 4
    folder.mkdir(parents=True, exist_ok=True)
    out = {c.key: folder / c.name for c in WALK_CASES}
    (folder / "locked").mkdir()
    (folder / "locked" / "inside.png").write_bytes(png)
    os.symlink("loop-b", folder / "loop-a")
    os.symlink("loop-a", folder / "loop-b")
    os.mkfifo(folder / "pipe")
    os.mkfifo(folder / "pipe.png")
    out["dicom_no_suffix"].write_bytes(dicom_bytes(twelve))
    out["dicom_bare_meta"].write_bytes(_bare_dicom_bytes(twelve, implicit=False))
    out["dicom_bare_implicit"].write_bytes(_bare_dicom_bytes(twelve, implicit=True))
    out["text_no_suffix"].write_text("exported by a PACS\n", encoding="utf-8")
    out["dicomdir"].write_bytes(dicom_bytes(None))
    (folder / "Normal" / "images").mkdir(parents=True)
    (folder / "Normal" / "images" / "n1.png").write_bytes(png)
    out["mask_folder"].mkdir()
    (out["mask_folder"] / "n1.png").write_bytes(png)
    out["control_chars"].write_bytes(b"\x00\x01garbage" * 30)
    out["png_named_txt"].write_bytes(png)
    out["binary_txt"].write_bytes(b"\x00\x01\x02\x03" * 64)
    return out


# ---- bad command lines: refused up front, one line on stderr -------------------------------------------


@dataclass(frozen=True)
class CliCase:
    """A command line that must stop before any work with one ``xraydx: error: ...`` line.

    ``argv`` may use {data} (the bundled sample), {runs} (an empty runs folder), {ckpt} (a tiny
    checkpoint), {image} (one sample X-ray), {tmp} (the test's temp folder), {file} (a regular file there),
    {folder} (an existing folder there), {bad_yaml} (a config that is not UTF-8). ``env``: variables set."""

    key: str
    argv: tuple[str, ...]
    exit_code: int
    message: str  # a fragment of the one error line
    env: tuple[tuple[str, str], ...] = ()
    needs_no_cuda: bool = False  # only meaningful where there is no GPU


TRAIN = ("train", "--data", "{data}", "--model", "test_resnet", "--pretrained", "none", "--image-size", "64",
         "--epochs", "1", "--runs-dir", "{runs}", "--name", "bad", "-q")  # fmt: skip
PREDICT = ("predict", "{image}", "--checkpoint", "{ckpt}", "-q")
USAGE, FATAL = 2, 1

CLI_CASES = [
    # exit 2: validated before any image is decoded and before a run folder is made
    CliCase(
        "train_device_cuda_without_gpu",
        (*TRAIN, "--device", "cuda"),
        USAGE,
        "CUDA is not available",
        needs_no_cuda=True,
    ),  # fmt: skip
    CliCase("train_device_bogus", (*TRAIN, "--device", "bogus"), USAGE, "unknown device 'bogus'"),
    CliCase("lr_nan", (*TRAIN, "--set", "train.lr=nan"), USAGE, "train.lr must be a finite number; got nan"),
    CliCase(
        "label_smoothing_5",
        (*TRAIN, "--set", "train.label_smoothing=5"),
        USAGE,
        "train.label_smoothing must be in [0, 1); got 5.0",
    ),  # fmt: skip
    CliCase(
        "drop_rate_5", (*TRAIN, "--set", "model.drop_rate=5"), USAGE, "model.drop_rate must be in [0, 1)"
    ),
    CliCase("in_chans_0", (*TRAIN, "--set", "model.in_chans=0"), USAGE, "model.in_chans must be 1"),
    CliCase(
        "weight_decay_negative",
        (*TRAIN, "--set", "train.weight_decay=-0.1"),
        USAGE,
        "train.weight_decay must be >= 0; got -0.1",
    ),  # fmt: skip
    CliCase(
        "warmup_inf",
        (*TRAIN, "--set", "train.warmup_epochs=inf"),
        USAGE,
        "train.warmup_epochs must be a finite number",
    ),  # fmt: skip
    CliCase(
        "config_not_utf8",
        ("train", "--config", "{bad_yaml}", "-q"),
        USAGE,
        "not a UTF-8 text file (byte 0xe9 at offset 18)",
    ),  # fmt: skip
    CliCase(
        "memmap_bytes_abc",
        TRAIN,
        USAGE,
        "XRAYDX_MEMMAP_BYTES must be a whole number of bytes",
        env=(("XRAYDX_MEMMAP_BYTES", "abc"),),
    ),  # fmt: skip
    CliCase(
        "holdout_source_unknown",
        (*TRAIN, "--holdout-source", "nosuch"),
        USAGE,
        "--holdout-source 'nosuch' matches no source of this data; sources: kermany",
    ),  # fmt: skip
    CliCase(
        "model_unknown",
        (*TRAIN, "--model", "resnet5"),
        USAGE,
        "unknown model 'resnet5': not a timm architecture; did you mean resnet50",
    ),  # fmt: skip
    CliCase(
        "model_without_offline_weights",
        (*TRAIN, "--model", "resnet50", "--pretrained", "offline"),
        USAGE,
        "no offline ImageNet weights for 'resnet50'",
    ),  # fmt: skip
    CliCase(
        "train_resume_with_other_flags",
        ("train", "--resume", "{runs}", "--epochs", "3", "--set", "train.lr=0.1", "-q"),
        USAGE,
        "--resume continues a run with its saved config.yaml; --epochs, --set",
    ),  # fmt: skip
    CliCase(
        "train_without_data",
        ("train", "--model", "test_resnet", "--runs-dir", "{runs}", "-q"),
        USAGE,
        "no data given: pass --data PATH",
    ),  # fmt: skip
    CliCase(
        "predict_json_resume",
        (*PREDICT, "--out", "{tmp}/p.json", "--format", "json", "--resume"),
        USAGE,
        "--resume works with CSV output only",
    ),  # fmt: skip
    CliCase(
        "predict_device_bogus",
        (*PREDICT, "--out", "{tmp}/p.csv", "--device", "bogus"),
        USAGE,
        "unknown device 'bogus'",
    ),  # fmt: skip
    CliCase(
        "predict_device_cuda_without_gpu",
        (*PREDICT, "--out", "{tmp}/p.csv", "--device", "cuda"),
        USAGE,
        "CUDA is not available",
        needs_no_cuda=True,
    ),  # fmt: skip
    CliCase(
        "predict_out_exists", (*PREDICT, "--out", "{file}"), USAGE, "already exists; refusing to overwrite"
    ),
    CliCase(
        "serve_max_upload_inf",
        ("serve", "--checkpoint", "{ckpt}", "--max-upload-mb", "inf"),
        USAGE,
        "--max-upload-mb must be a finite number > 0; got inf",
    ),  # fmt: skip
    CliCase(
        "serve_batch_window_negative",
        ("serve", "--checkpoint", "{ckpt}", "--batch-window-ms", "-1"),
        USAGE,
        "--batch-window-ms must be a finite number >= 0",
    ),  # fmt: skip
    # exit 1: an output that cannot be written, named with the cause
    CliCase(
        "predict_out_missing_folder",
        (*PREDICT, "--out", "{tmp}/nowhere/p.csv"),
        FATAL,
        "nowhere/p.csv: the folder",
    ),  # fmt: skip
    CliCase(
        "predict_out_is_a_folder",
        (*PREDICT, "--out", "{folder}", "--overwrite"),
        FATAL,
        "is a folder; --out names the file to write",
    ),  # fmt: skip
    CliCase(
        "export_out_under_a_file",
        ("export", "--checkpoint", "{ckpt}", "--out", "{file}/model.onnx"),
        FATAL,
        "is a file, not a folder",
    ),  # fmt: skip
    CliCase(
        "explain_out_is_a_file",
        ("explain", "{image}", "--checkpoint", "{ckpt}", "--out", "{file}", "-q"),
        FATAL,
        "is a file; --out names an output folder",
    ),  # fmt: skip
]
