"""Peak memory of decoding one upload, per kind of image, against the server's estimate.

    python benchmarks/bench_decode_memory.py                  # 3000 x 3000 px, every kind
    python benchmarks/bench_decode_memory.py --side 4000 --kinds dicom16,dicom_j2k
    python benchmarks/bench_decode_memory.py --server 6 --side 5000   # 6 concurrent uploads to a server

For each kind it writes one synthetic image (a smooth gradient with noise, so that compressed formats stay
realistic), then decodes it with ``xraydx.io.read_image_bytes`` in a *fresh* Python process whose peak
resident set size is reset (``/proc/self/clear_refs``) just before the decode: the figure is the real
peak of the decode on top of the process with the file's bytes loaded, C allocations (Pillow, openjpeg)
included. It prints that peak per pixel next to the server's estimate (``xraydx.serve.decoding``),
which must be the larger of the two.

``--server N`` instead starts ``xraydx serve`` (the shipped model) as a subprocess and sends N concurrent
uploads of one JPEG 2000 DICOM of ``--side``² 16-bit pixels, then reads the server process's own peak RSS
(``VmHWM``) against its RSS before, and its decode budget's peak from ``/api/health``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

KINDS = ("png8", "jpeg8", "png16", "tiff_float", "png_rgb", "jpeg_rgb", "png_rgba", "dicom8", "dicom16",
         "dicom16_rescaled", "dicom_j2k")  # fmt: skip

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from xraydx.io import read_image_bytes
data = open(sys.argv[1], "rb").read()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0

import numpy, pydicom, pydicom.pixels  # imported before the baseline: not part of a decode's cost
from PIL import Image
Image.init()
for mod in ("openjpeg", "libjpeg"):
    try:
        __import__(mod)
    except ImportError:
        pass
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
img = read_image_bytes(data, "probe")
peak = status("VmHWM:")
print(json.dumps({"base": base, "peak": peak, "shape": list(img.shape)}))
"""


def _gradient(side: int, bits: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    top = 2**bits - 1
    v = (0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y)) * top + rng.normal(0, top / 200, (side, side))
    return np.clip(v, 0, top)


def make(kind: str, side: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    if kind in ("png8", "jpeg8"):
        Image.fromarray(_gradient(side, 8).astype(np.uint8)).save(
            buf, format="PNG" if kind == "png8" else "JPEG"
        )
    elif kind == "png16":
        Image.fromarray(_gradient(side, 16).astype(np.uint16)).save(buf, format="PNG")
    elif kind == "tiff_float":
        Image.fromarray(_gradient(side, 16).astype(np.float32)).save(
            buf, format="TIFF", compression="tiff_adobe_deflate"
        )
    elif kind in ("png_rgb", "jpeg_rgb", "png_rgba"):
        g = _gradient(side, 8).astype(np.uint8)
        chans = [g, g[::-1], g[:, ::-1]] + ([np.full_like(g, 200)] if kind == "png_rgba" else [])
        Image.fromarray(np.stack(chans, -1)).save(buf, format="JPEG" if kind == "jpeg_rgb" else "PNG")
    else:
        return _dicom(kind, side)
    return buf.getvalue()


def _dicom(kind: str, side: int) -> bytes:
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    bits = 8 if kind == "dicom8" else 16
    arr = _gradient(side, 12 if bits == 16 else 8).astype(np.uint16 if bits == 16 else np.uint8)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if kind == "dicom16_rescaled":
        ds.RescaleSlope, ds.RescaleIntercept = 1.5, -100
        ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.PixelData = arr.tobytes()
    if kind == "dicom_j2k":
        ds.compress(JPEG2000Lossless, arr)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def measure(kind: str, side: int, folder: Path) -> dict[str, object]:
    from xraydx.serve.decoding import decode_cost

    data = make(kind, side)
    path = folder / f"{kind}.bin"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(ROOT / "src")], capture_output=True,
                         text=True, check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    cost = decode_cost(data, kind, max_pixels=10**12, budget=2**62)
    assert cost is not None, kind
    pixels = side * side
    peak = int(got["peak"]) - int(got["base"])
    # the server holds FILE_COPIES copies of the file; the child had one loaded before the baseline
    est = cost.decode_bytes - len(data)
    return {
        "kind": kind, "side": side, "file_bytes": len(data), "peak_bytes": peak,
        "peak_per_pixel": round(peak / pixels, 2), "estimate_bytes": est,
        "estimate_per_pixel": round(est / pixels, 2), "ok": peak <= est,
    }  # fmt: skip


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def server_attack(n: int, side: int, extra: list[str]) -> dict[str, object]:
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import Server

    from xraydx.cli import DEFAULT_CHECKPOINT

    data = make("dicom_j2k", side)
    server = Server(DEFAULT_CHECKPOINT, "torch", 16, 5.0, None, extra=extra)
    try:
        server.wait_ready()
        pid = server.proc.pid
        before = _status_kb(pid, "VmRSS:")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the server's peak RSS to now

        async def go() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as c:
                rs = await asyncio.gather(*(c.post("/api/predict", files={"file": (f"big{i}.dcm", data)})
                                            for i in range(n)))  # fmt: skip
            return [r.status_code for r in rs]

        codes = asyncio.run(go())
        peak = _status_kb(pid, "VmHWM:")
        health = server.health()
    finally:
        server.stop()
    return {
        "uploads": n, "side": side, "file_bytes": len(data), "statuses": codes, "rss_before": before,
        "rss_peak": peak, "growth": peak - before, "budget": health.get("decode_memory"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=3000, help="image side in pixels (square)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ", ".join(KINDS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--server", type=int, default=0, metavar="N", help="N concurrent uploads to a server")
    ap.add_argument("--serve-args", default="", help="with --server: extra xraydx serve arguments")
    args = ap.parse_args(argv)
    if not 32 <= args.side <= 8000:
        ap.error("--side must be within 32..8000")
    if args.server:
        if not 0 < args.server <= 64:
            ap.error("--server must be within 1..64")
        res = server_attack(args.server, args.side, args.serve_args.split())
        mib = 2**20
        print(f"\n{res['uploads']} concurrent uploads of a {args.side}x{args.side} 16-bit JPEG 2000 DICOM"
              f" ({int(res['file_bytes']) / mib:.1f} MB): statuses {res['statuses']}; server RSS"
              f" {int(res['rss_before']) / mib:.0f} MB before, peak {int(res['rss_peak']) / mib:.0f} MB"
              f" (+{int(res['growth']) / mib:.0f} MB); decode budget {res['budget']}")  # fmt: skip
        if args.json:
            from xraydx.fsutil import atomic_write_json

            atomic_write_json(args.json, res)
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"unknown kinds: {', '.join(unknown)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="xraydx-decode-mem-") as tmp:
        for k in kinds:
            rows.append(measure(k, args.side, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\n{args.side} x {args.side} px; {os.cpu_count()} CPUs")
    print("| kind | file MB | peak MB | peak B/px | estimate B/px | estimate >= peak |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {int(r['file_bytes']) / 2**20:.1f} | {int(r['peak_bytes']) / 2**20:.0f} |"
              f" {r['peak_per_pixel']} | {r['estimate_per_pixel']} | {'yes' if r['ok'] else 'NO'} |")  # fmt: skip
    if args.json:
        from xraydx.fsutil import atomic_write_json

        atomic_write_json(args.json, {"side": args.side, "rows": rows})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
