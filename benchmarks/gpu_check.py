"""The one GPU check (issue 3, item 7): benchmark b on a GPU, sized like COVID-QU-Ex.

For resnet50 and the default model (mobilenetv2_100) at 224 px, with bf16 autocast and
channels_last: the end-to-end training step (host uint8 array -> pinned, non_blocking copy one batch
ahead -> BatchAugment on the GPU -> forward/backward/AdamW) vs the model-only ceiling (a batch already
on the GPU), then one full epoch over synthetic data the size of COVID-QU-Ex (27,132 images at
224 px, 1.4 GB of uint8 in host memory, memory-mapped like the cache). Prints images/s and seconds
per epoch; writes benchmarks/results/gpu_check.json. Designed to finish in well under 8 minutes on
one modern GPU; nothing is downloaded.

    PYTHONPATH=src python benchmarks/gpu_check.py            # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --n 256 --size 64 --models test_resnet \
        --batch-size 16 --steps 2 --warmup 1                  # smoke test of the script itself, on CPU

Anchor: published ResNet-50 AMP training runs at about 2,500 img/s on one A100.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _perf import machine, table, write_result
from bench_train import measure

COVID_QU_EX_IMAGES = 27_132  # train + val + test of the COVID-QU-Ex lung-segmentation set


def synthetic_images(n: int, size: int, folder: Path) -> np.ndarray:
    """n uint8 (size, size) chest-X-ray-like images (smooth blobs + noise) in an on-disk memmap."""
    arr = np.lib.format.open_memmap(
        folder / "synthetic.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)
    )
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 255 * np.exp(-(((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.05)) + 255 * np.exp(
        -(((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.05)
    )
    chunk = 1024
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        noise = rng.integers(0, 40, (m, size, size), dtype=np.uint8)
        arr[i : i + m] = np.clip(255 - base[None] * 0.6 + noise, 0, 255).astype(np.uint8)
    arr.flush()
    return arr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv2_100"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=COVID_QU_EX_IMAGES)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the model (adds compile time)")
    ap.add_argument("--no-full-epoch", action="store_true")
    ap.add_argument("--tag", default="", help="results file suffix: results/<name>-<tag>.json")
    args = ap.parse_args()

    t_start = time.perf_counter()
    host = machine()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible", file=sys.stderr)
            return 1
        torch.backends.cudnn.benchmark = True
        print(f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="xraydx-gpu-check-") as tmp:
        t0 = time.perf_counter()
        images = synthetic_images(args.n, args.size, Path(tmp))
        print(
            f"synthetic data: {args.n} images at {args.size} px ({images.nbytes / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s"
        )
        rows = []
        for name in args.models:
            r = measure(
                name, images, args.batch_size, device, steps=args.steps, warmup=args.warmup, amp=True,
                channels_last=True, compile=args.compile, full_epoch=not args.no_full_epoch,
            )  # fmt: skip
            r["seconds_per_epoch_estimated"] = args.n / r["e2e_images_per_s"]
            if "full_epoch_s" in r:
                r["full_epoch_images_per_s"] = r["full_epoch_images"] / r["full_epoch_s"]
            rows.append(r)
            print(
                f"  {name}: end to end {r['e2e_images_per_s']:,.0f} img/s, ceiling {r['ceiling_images_per_s']:,.0f}"
                f" img/s, ratio {r['ratio']:.3f}; full epoch {r.get('full_epoch_s', float('nan')):.1f}s",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del images
    cols = ["model", "batch_size", "e2e_images_per_s", "ceiling_images_per_s", "ratio", "full_epoch_s"]
    print()
    print(table(rows, cols))
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f}s. Anchor: ResNet-50 AMP training ~2,500 img/s on one A100 (published).")
    out = write_result(
        "gpu_check",
        {
            "machine": host,
            "data": f"synthetic, {args.n} x {args.size} px uint8",
            "rows": rows,
            "total_s": total,
        },
        args.tag,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
