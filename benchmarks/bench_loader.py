"""Benchmark a: loader throughput, images/s delivered to the model (decode + augment), at 256 px.

cached:  xraydx.cache (decoded once; uint8 array in RAM or memmap) -> iter_batches (the training
         loop's batch gatherer) -> BatchAugment ("light"; bilinear affine, and nearest: the
         resampling torchvision's RandomAffine uses by default) -> normalise, batched on tensors.
naive:   a torch DataLoader whose Dataset decodes each PNG with PIL every epoch and applies
         torchvision transforms per image (Resize, RandomAffine, ColorJitter, ToTensor, Normalize).

Same real images, same batch size, same output (float (B, 1, 256, 256), normalised). Steady state:
the naive loader's second epoch (workers already started), the cached loader's epochs after the
first pass. The first pass (decode + write the cache) and re-opening the cache are reported too.

    PYTHONPATH=src python benchmarks/bench_loader.py [--n 512] [--batch-size 32] [--epochs 3]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _perf import cxr_images, machine, table, write_result
from PIL import Image


class NaiveDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, paths: list[Path], size: int, mean: float, std: float, augment: bool = True) -> None:
        from torchvision import transforms as T

        self.paths = paths
        aug = [
            T.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.92, 1.08)),
            T.ColorJitter(brightness=0.1, contrast=0.1),
        ]
        self.tf = T.Compose(
            [
                T.Resize((size, size), antialias=True),
                *(aug if augment else []),
                T.ToTensor(),
                T.Normalize([mean], [std]),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("L"))


def run_naive(
    paths: list[Path], size: int, bs: int, workers: int, epochs: int, augment: bool = True
) -> dict[str, Any]:
    ds = NaiveDataset(paths, size, 0.5, 0.25, augment)
    dl = torch.utils.data.DataLoader(
        ds, batch_size=bs, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for xb in dl:
            n += len(xb)
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    return {
        "pipeline": f"naive: PIL + torchvision per image, DataLoader workers={workers}",
        "augment": augment,
        "images": n,
        "first_epoch_s": times[0],
        "steady_epoch_s": float(np.median(steady)),
        "images_per_s": n / float(np.median(steady)),
    }


def run_cached(
    paths: list[Path],
    size: int,
    bs: int,
    epochs: int,
    cache_dir: Path,
    memmap: bool,
    augment: bool = True,
    interpolation: str = "bilinear",
) -> dict[str, Any]:
    from xraydx.cache import iter_batches, load_many
    from xraydx.transforms import AugmentSpec, BatchAugment, Preprocessing, _fused_cpu

    spec = Preprocessing(size=size, mean=0.5, std=0.25)
    threshold = 0 if memmap else 1 << 62
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    arr, fails = load_many(paths, spec, cache_dir=cache_dir, progress=False, memmap_threshold=threshold)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    arr, fails = load_many(paths, spec, cache_dir=cache_dir, progress=False, memmap_threshold=threshold)
    reopen = time.perf_counter() - t0
    assert not fails, fails[:3]
    # "nearest" = BatchAugment's default on CPU (the fused numba kernel where numba is installed);
    # "nearest-torch" = the same augmentation as torch ops
    mode = "nearest" if interpolation.startswith("nearest") else interpolation
    fused = False if interpolation == "nearest-torch" else None
    aug = BatchAugment(AugmentSpec.preset("light"), mode, fused=fused)  # type: ignore[arg-type]
    if mode == "nearest" and fused is None and _fused_cpu(required=False):
        interpolation = "nearest-fused"
    labels = np.zeros(len(arr), dtype=np.int64)
    dev = torch.device("cpu")
    times = []
    for ep in range(epochs):
        gen = torch.Generator().manual_seed(ep)
        order = torch.randperm(len(arr), generator=gen).numpy()
        t0 = time.perf_counter()
        n = 0
        for xb, _ in iter_batches(arr, labels, order, bs, dev):
            if augment:
                x = aug(xb, gen, norm=(spec.mean, spec.std))  # as the training loop calls it
            else:
                x = (xb.float().div_(255.0) - spec.mean) / spec.std
            n += len(x)
        times.append(time.perf_counter() - t0)
    return {
        "pipeline": f"cached: xraydx cache ({'memmap' if memmap else 'in RAM'}) -> "
        + (f"BatchAugment({interpolation}) on tensors" if augment else "float, normalised"),
        "augment": augment,
        "interpolation": interpolation if augment else None,
        "images": n,
        "first_pass_s": first,
        "first_pass_images_per_s": len(paths) / first,
        "reopen_s": reopen,
        "steady_epoch_s": float(np.median(times)),
        "images_per_s": n / float(np.median(times)),
    }


def profile_stages(paths: list[Path], size: int, bs: int) -> list[dict[str, Any]]:
    """Where the time goes, single thread, best of 3: ms per image for each stage of both pipelines."""
    import torch.nn.functional as F
    from torchvision import transforms as T

    from xraydx.cache import gather_batch
    from xraydx.io import read_image
    from xraydx.transforms import AugmentSpec, BatchAugment, _affine_grid, _intensity_lut, resize_uint8

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    sample = paths[:: max(1, len(paths) // 64)][:64]
    small = [p for p in sample if max(Image.open(p).size) <= 320]
    large = [p for p in sample if max(Image.open(p).size) > 320]

    def per_image(fn: Any, ps: list[Path]) -> float:
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for p in ps:
                fn(p)
            best = min(best, (time.perf_counter() - t0) / max(1, len(ps)))
        return best * 1e3

    pil = {p: Image.open(p).convert("L").resize((size, size)) for p in sample}
    tf_aff = T.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.92, 1.08))
    tf_col = T.ColorJitter(brightness=0.1, contrast=0.1)
    tf_tens = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.25])])
    rows = []
    for name, ps in (("small sources (<= 320 px)", small), ("large sources (> 320 px)", large)):
        if ps:
            rows.append({"stage": f"naive: PIL decode, {name}, n={len(ps)}",
                         "ms_per_image": per_image(lambda p: Image.open(p).convert("L").load(), ps)})  # fmt: skip
            rows.append({"stage": f"cache first pass: read_image + resize, {name}",
                         "ms_per_image": per_image(lambda p: resize_uint8(read_image(p), size), ps)})  # fmt: skip
    rows.append({"stage": "naive: Resize", "ms_per_image": per_image(lambda p: T.Resize((size, size))(Image.open(p).convert("L")), sample[:8]) - per_image(lambda p: Image.open(p).convert("L").load(), sample[:8])})  # fmt: skip
    rows.append(
        {
            "stage": "naive: RandomAffine (PIL, uint8)",
            "ms_per_image": per_image(lambda p: tf_aff(pil[p]), sample),
        }
    )
    rows.append(
        {
            "stage": "naive: ColorJitter (PIL, uint8)",
            "ms_per_image": per_image(lambda p: tf_col(pil[p]), sample),
        }
    )
    rows.append(
        {"stage": "naive: ToTensor + Normalize", "ms_per_image": per_image(lambda p: tf_tens(pil[p]), sample)}
    )
    arr = np.stack([np.asarray(pil[p]) for p in sample[:bs]] * math.ceil(bs / len(sample)))[:bs]
    idx = np.arange(len(arr))
    aug = BatchAugment(AugmentSpec.preset("light"))  # type: ignore[arg-type]
    aug_nn = BatchAugment(AugmentSpec.preset("light"), "nearest")  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    xb = gather_batch(arr, idx)
    xf = xb.float().div_(255.0)
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(len(arr), 2, 3).contiguous()
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)

    def per_batch(fn: Any) -> float:
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3 / len(arr)

    rows.append(
        {
            "stage": "cached: gather uint8 batch (iter_batches)",
            "ms_per_image": per_batch(lambda: gather_batch(arr, idx)),
        }
    )
    rows.append(
        {
            "stage": "cached: BatchAugment('light', bilinear), whole",
            "ms_per_image": per_batch(lambda: aug(xb, gen)),
        }
    )
    rows.append({"stage": "  of which the affine grid (one batched GEMM)", "ms_per_image": per_batch(lambda: _affine_grid(theta, xf.shape[-2], xf.shape[-1]))})  # fmt: skip
    rows.append({"stage": "  (F.affine_grid, for comparison)", "ms_per_image": per_batch(lambda: F.affine_grid(theta, list(xf.shape), align_corners=False))})  # fmt: skip
    rows.append({"stage": "  of which F.grid_sample (bilinear)", "ms_per_image": per_batch(lambda: F.grid_sample(xf, grid, align_corners=False))})  # fmt: skip
    rows.append({"stage": "  of which gamma (pow, per-sample exponent)", "ms_per_image": per_batch(lambda: xf.clamp(0, 1).pow(torch.rand(len(arr), 1, 1, 1)))})  # fmt: skip
    rows.append({"stage": "cached: BatchAugment('light', nearest), whole", "ms_per_image": per_batch(lambda: aug_nn(xb, gen))})  # fmt: skip
    rows.append({"stage": "  of which F.grid_sample (nearest)", "ms_per_image": per_batch(lambda: F.grid_sample(xf, grid, mode="nearest", align_corners=False))})  # fmt: skip
    ones = torch.ones(len(arr))
    rows.append({"stage": "  of which the intensity lookup table", "ms_per_image": per_batch(lambda: _intensity_lut(xb, ones, ones, ones * 0))})  # fmt: skip
    rows.append({"stage": "cached: normalise", "ms_per_image": per_batch(lambda: (xf - 0.5) / 0.25)})
    torch.set_num_threads(prev)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="images per epoch (default 512)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="cached epochs measured (naive: 2, the 2nd counts)")
    ap.add_argument("--naive-workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the cached path (0 = all CPUs)")
    ap.add_argument(
        "--interpolation",
        nargs="+",
        default=["bilinear", "nearest-torch", "nearest"],
        choices=["bilinear", "nearest-torch", "nearest"],
        help="BatchAugment resampling(s) to measure (torchvision's RandomAffine, the naive side, is nearest)",
    )
    ap.add_argument("--no-profile", action="store_true", help="skip the per-stage breakdown")
    ap.add_argument("--tag", default="", help="results file suffix: results/<name>-<tag>.json")
    args = ap.parse_args()

    from xraydx.cache import available_cpus

    torch.set_num_threads(args.threads or available_cpus())
    host = machine()
    paths, source = cxr_images(args.n)
    sizes = [Image.open(p).size for p in paths[:: max(1, len(paths) // 50)]]
    print(f"{len(paths)} real images from {source}; typical source size {sorted(sizes)[len(sizes) // 2]}")
    tmp = Path(tempfile.mkdtemp(prefix="xraydx-bench-loader-"))
    rows: list[dict[str, Any]] = []

    def show(r: dict[str, Any]) -> None:
        rows.append(r)
        print(
            f"  {r['pipeline']}{'' if r['augment'] else ', no augmentation'}: {r['images_per_s']:,.0f} img/s",
            flush=True,
        )

    try:
        for interp in args.interpolation:
            for memmap in (False, True):
                show(
                    run_cached(
                        paths, args.size, args.batch_size, args.epochs, tmp / "cache", memmap, True, interp
                    )
                )
        show(run_cached(paths, args.size, args.batch_size, args.epochs, tmp / "cache", False, augment=False))
        for w in args.naive_workers:
            show(run_naive(paths, args.size, args.batch_size, w, 2))
        show(run_naive(paths, args.size, args.batch_size, max(args.naive_workers), 2, augment=False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def best(kind: str, augment: bool, pick: Any) -> float:
        return pick(
            r["images_per_s"] for r in rows if r["pipeline"].startswith(kind) and r["augment"] == augment
        )

    best_naive = best("naive", True, max)
    ratios = {
        interp: min(r["images_per_s"] for r in rows if r.get("interpolation") == interp) / best_naive
        for interp in dict.fromkeys(r["interpolation"] for r in rows if r.get("interpolation"))
    }
    ratio = max(ratios.values())
    ratio_noaug = best("cached", False, min) / best("naive", False, max)
    for r in rows:
        r["x_best_naive"] = r["images_per_s"] / best("naive", r["augment"], max)
    print()
    print(table(rows, ["pipeline", "augment", "images_per_s", "x_best_naive", "steady_epoch_s"]))
    c0 = rows[0]
    print(
        f"\ncache first pass (decode + resize + write): {c0['first_pass_images_per_s']:,.0f} img/s;"
        f" re-opening the cache for the next run: {c0['reopen_s']:.2f}s for {len(paths)} images"
    )
    for interp, q in ratios.items():
        print(
            f"with augmentation ({interp} affine): cached / best naive = {q:.1f}x (slower of RAM/memmap vs"
            f" faster naive variant); target >= 10x: {'met' if q >= 10 else 'NOT met'}"
        )
    print(f"decode only (no augmentation on either side): cached / naive = {ratio_noaug:.1f}x")
    stages = [] if args.no_profile else profile_stages(paths, args.size, args.batch_size)
    if stages:
        print("\nwhere the time goes (1 thread, best of several, ms per image):")
        print(table(stages, ["stage", "ms_per_image"]))
    out = write_result(
        "bench_loader",
        {
            "machine": host,
            "data": source,
            "settings": {
                "n": len(paths),
                "size": args.size,
                "batch_size": args.batch_size,
                "augment": "light",
                "interpolation": args.interpolation,
            },
            "rows": rows,
            "ratio_cached_vs_best_naive": ratio,
            "ratio_cached_vs_best_naive_by_interpolation": ratios,
            "ratio_cached_vs_best_naive_no_augmentation": ratio_noaug,
            "stages_ms_per_image_1_thread": stages,
            "target": 10.0,
            "met": ratio >= 10,
        },
        args.tag,
    )
    print(f"wrote {out}")
    return 0 if math.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
