"""Benchmark a: loader throughput, images/s delivered to the model (decode + augment), at 256 px.

cached:  xraydx.cache (decoded once; uint8 array in RAM, or the on-disk memmap train switches to above
         the threshold) -> iter_batches (the training loop's batch gatherer) -> BatchAugment ("light";
         bilinear affine, nearest as torch ops, and nearest fused: the numba kernel; torchvision's
         RandomAffine on the naive side resamples nearest) with the normalisation folded in, as
         xraydx.train calls it.
naive:   a torch DataLoader whose Dataset decodes each PNG with PIL every epoch and applies
         torchvision transforms per image (Resize, RandomAffine, ColorJitter, ToTensor, Normalize).

Same real images, same batch size, same output (float (B, 1, 256, 256), normalised). After one
warm-up epoch of every pipeline (starts the naive workers, compiles the kernel), each round times one
epoch of every pipeline, in an order rotated per round; the cached/naive ratios are taken within a
round (the slower cache variant vs the faster naive one), so a change in the machine's load hits both
sides alike; the verdict is the median over rounds, and every round is in the JSON.

    PYTHONPATH=src python benchmarks/bench_loader.py [--n 2048] [--batch-size 32] [--rounds 5]
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
from _perf import cxr_images, machine, median, table, write_result
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


def naive_loader(
    paths: list[Path], size: int, bs: int, workers: int, augment: bool = True
) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    ds = NaiveDataset(paths, size, 0.5, 0.25, augment)
    return torch.utils.data.DataLoader(
        ds, batch_size=bs, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


class Pipeline:
    """One way of delivering an epoch of normalised float batches; ``epoch()`` returns the images delivered."""

    def __init__(self, name: str, kind: str, augment: bool, interpolation: str | None, epoch: Any) -> None:
        self.name, self.kind, self.augment, self.interpolation = name, kind, augment, interpolation
        self.epoch = epoch
        self.rates: list[float] = []

    def timed_epoch(self) -> float:
        t0 = time.perf_counter()
        n = self.epoch()
        rate = n / (time.perf_counter() - t0)
        self.rates.append(rate)
        return rate


def cached_epoch(arr: np.ndarray, bs: int, aug: Any, norm: tuple[float, float], seed: list[int]) -> Any:
    """An epoch of the training loop's data path: iter_batches (the loop's gatherer) -> BatchAugment with the
    normalisation folded in, as xraydx.train calls it (aug None: float + normalise only)."""
    from xraydx.batches import BatchBuffers, iter_batches

    labels = np.zeros(len(arr), dtype=np.int64)
    dev = torch.device("cpu")
    buffers = BatchBuffers()  # kept across epochs, as xraydx.train keeps them

    def run() -> int:
        seed[0] += 1
        gen = torch.Generator().manual_seed(seed[0])
        order = torch.randperm(len(arr), generator=gen).numpy()
        n = 0
        for xb, _ in iter_batches(arr, labels, order, bs, dev, reuse=buffers):  # as xraydx.train calls them
            x = (
                aug(xb, gen, norm=norm)
                if aug is not None
                else xb.float().div_(255.0).sub_(norm[0]).div_(norm[1])
            )
            n += len(x)
        return n

    return run


def build_cache(
    paths: list[Path], size: int, cache_dir: Path
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The two cache variants train uses (an array in RAM, and the on-disk memmap it switches to above the
    threshold), timing the first pass (decode + resize + write) and re-opening by the next run."""
    from xraydx.cache import load_many
    from xraydx.transforms import Preprocessing

    spec = Preprocessing(size=size, mean=0.5, std=0.25)
    shutil.rmtree(cache_dir, ignore_errors=True)
    times: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, threshold in (("in RAM", 1 << 62), ("memmap", 0)):
        t0 = time.perf_counter()
        arr, fails = load_many(paths, spec, cache_dir=cache_dir, progress=False, memmap_threshold=threshold)
        times[f"{name}: first pass" if name == "in RAM" else "memmap: array from the entries"] = (
            time.perf_counter() - t0
        )
        assert not fails, fails[:3]
        t0 = time.perf_counter()
        arr, _ = load_many(paths, spec, cache_dir=cache_dir, progress=False, memmap_threshold=threshold)
        times[f"{name}: re-opened by the next run"] = time.perf_counter() - t0
        arrays[name] = arr
    assert isinstance(arrays["memmap"], np.memmap), "the memmap variant did not memory-map"
    return arrays, times


def make_pipelines(
    paths: list[Path], args: argparse.Namespace, arrays: dict[str, np.ndarray]
) -> list[Pipeline]:
    from xraydx.transforms import AugmentSpec, BatchAugment, _fused_cpu

    spec = AugmentSpec.preset("light")
    assert spec is not None
    norm = (0.5, 0.25)
    seed = [0]
    pipes = []
    for interp in args.interpolation:
        # "nearest" = BatchAugment's default on CPU (the fused numba kernel where numba is installed);
        # "nearest-torch" = the same augmentation as torch ops
        mode = "nearest" if interp.startswith("nearest") else interp
        fused = False if interp == "nearest-torch" else None
        label = "nearest-fused" if interp == "nearest" and _fused_cpu(required=False) else interp
        aug = BatchAugment(spec, mode, fused=fused, reuse_output=True)  # as xraydx.train makes it on a CPU
        for where, arr in arrays.items():
            pipes.append(
                Pipeline(
                    f"cached ({where}) -> BatchAugment({label})", "cached", True, label,
                    cached_epoch(arr, args.batch_size, aug, norm, seed),
                )
            )  # fmt: skip
    pipes.append(
        Pipeline("cached (in RAM), no augmentation", "cached", False, None,
                 cached_epoch(arrays["in RAM"], args.batch_size, None, norm, seed))
    )  # fmt: skip

    def naive_epoch(dl: Any) -> Any:
        return lambda: sum(len(xb) for xb in dl)

    for w in args.naive_workers:
        dl = naive_loader(paths, args.size, args.batch_size, w)
        pipes.append(Pipeline(f"naive, workers={w}", "naive", True, None, naive_epoch(dl)))
    dl = naive_loader(paths, args.size, args.batch_size, max(args.naive_workers), augment=False)
    pipes.append(
        Pipeline(
            f"naive, workers={max(args.naive_workers)}, no augmentation",
            "naive",
            False,
            None,
            naive_epoch(dl),
        )
    )
    return pipes


def profile_stages(paths: list[Path], size: int, bs: int) -> list[dict[str, Any]]:
    """Where the time goes, single thread, best of 3: ms per image for each stage of both pipelines."""
    import torch.nn.functional as F
    from torchvision import transforms as T

    from xraydx.batches import gather_batch
    from xraydx.io import read_image
    from xraydx.transforms import (
        AugmentSpec,
        BatchAugment,
        _affine_grid,
        _fused_cpu,
        _intensity_lut,
        resize_uint8,
    )

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
    aug_nn = BatchAugment(AugmentSpec.preset("light"), "nearest", fused=False)  # type: ignore[arg-type]
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
    rows.append({"stage": "cached: BatchAugment('light', nearest, torch ops), whole", "ms_per_image": per_batch(lambda: aug_nn(xb, gen))})  # fmt: skip
    rows.append({"stage": "  of which F.grid_sample (nearest)", "ms_per_image": per_batch(lambda: F.grid_sample(xf, grid, mode="nearest", align_corners=False))})  # fmt: skip
    ones = torch.ones(len(arr))
    rows.append({"stage": "  of which the intensity lookup table", "ms_per_image": per_batch(lambda: _intensity_lut(xb, ones, ones, ones * 0))})  # fmt: skip
    aug_fused = (
        BatchAugment(AugmentSpec.preset("light"), "nearest", fused=True) if _fused_cpu(False) else None
    )  # type: ignore[arg-type]
    if aug_fused is not None:
        aug_fused(xb, gen)  # compile
        rows.append({"stage": "cached: BatchAugment('light', nearest), fused numba kernel (new output each call)", "ms_per_image": per_batch(lambda: aug_fused(xb, gen, norm=(0.5, 0.25)))})  # fmt: skip
    rows.append({"stage": "cached: normalise", "ms_per_image": per_batch(lambda: (xf - 0.5) / 0.25)})
    torch.set_num_threads(prev)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="images per epoch (default 2048)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--rounds", type=int, default=5, help="measured rounds; each times one epoch of every pipeline"
    )
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
    try:
        arrays, cache_times = build_cache(paths, args.size, tmp / "cache")
        pipes = make_pipelines(paths, args, arrays)
        for p in pipes:  # warm-up: starts the naive workers, compiles the fused kernel; not counted
            p.epoch()
        # Rounds: one epoch of every pipeline per round, the order rotated each round, so a change in the
        # machine's load hits all pipelines alike; the ratios are taken within each round.
        rounds = []
        for r in range(args.rounds):
            k = r % len(pipes)
            for p in pipes[k:] + pipes[:k]:
                p.timed_epoch()
            rates = {p.name: p.rates[-1] for p in pipes}
            rounds.append(rates)
            print(f"round {r + 1}: " + ", ".join(f"{name} {v:,.0f}" for name, v in rates.items()), flush=True)
        for p in pipes:
            p.epoch = None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio_in_round(r: int, interp: str | None, augment: bool) -> float:
        cached = [
            p.rates[r]
            for p in pipes
            if p.kind == "cached" and p.augment == augment and p.interpolation == interp
        ]
        naive = [p.rates[r] for p in pipes if p.kind == "naive" and p.augment == augment]
        return min(cached) / max(naive)  # the slower cache variant vs the faster naive one

    interps = list(dict.fromkeys(p.interpolation for p in pipes if p.augment))
    ratios = {i: [ratio_in_round(r, i, True) for r in range(args.rounds)] for i in interps if i is not None}
    ratios_noaug = [ratio_in_round(r, None, False) for r in range(args.rounds)]
    rows = []
    for p in pipes:
        best_naive = [
            max(q.rates[r] for q in pipes if q.kind == "naive" and q.augment == p.augment)
            for r in range(args.rounds)
        ]
        rows.append(
            {
                "pipeline": p.name,
                "augment": p.augment,
                "interpolation": p.interpolation,
                "images_per_s": median(p.rates),
                "images_per_s_min": min(p.rates),
                "images_per_s_max": max(p.rates),
                "x_best_naive": median([a / b for a, b in zip(p.rates, best_naive, strict=True)]),
                "images_per_s_by_round": p.rates,
            }
        )
    print()
    print(table(rows, ["pipeline", "images_per_s", "images_per_s_min", "images_per_s_max", "x_best_naive"]))
    print(
        f"\ncache first pass (decode + resize + write): {len(paths) / cache_times['in RAM: first pass']:,.0f} img/s;"
        f" re-opening the cache for the next run: {cache_times['in RAM: re-opened by the next run']:.2f} s"
        f" (memmap: {cache_times['memmap: re-opened by the next run']:.2f} s) for {len(paths)} images"
    )
    summary = {}
    for interp, qs in ratios.items():
        met = sum(q >= 10 for q in qs)
        summary[interp] = {"median": median(qs), "min": min(qs), "max": max(qs), "rounds_met": met}
        print(
            f"with augmentation ({interp}): cached / naive = {median(qs):.1f}x median of {len(qs)} rounds"
            f" (range {min(qs):.1f}-{max(qs):.1f}x; slower of RAM/memmap vs the faster naive variant);"
            f" target >= 10x: {'met' if median(qs) >= 10 else 'NOT met'} (in {met} of {len(qs)} rounds)"
        )
    print(
        f"decode only (no augmentation on either side): cached / naive = {median(ratios_noaug):.1f}x"
        f" (range {min(ratios_noaug):.1f}-{max(ratios_noaug):.1f}x)"
    )
    ratio = max(s["median"] for s in summary.values())
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
                "rounds": args.rounds,
                "augment": "light",
                "interpolation": args.interpolation,
                "naive_workers": args.naive_workers,
            },
            "cache_seconds": cache_times,
            "rows": rows,
            "ratio_by_interpolation": summary,
            "ratio_by_interpolation_and_round": ratios,
            "ratio_no_augmentation_by_round": ratios_noaug,
            "ratio_cached_vs_best_naive": ratio,
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
