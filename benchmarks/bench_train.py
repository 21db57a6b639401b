"""Benchmark b: training throughput end to end vs the model-only ceiling.

end to end:  the training loop's step as in xraydx.train: cached uint8 images -> iter_batches (gather
             one batch ahead in a thread; pinned + non_blocking on CUDA) -> BatchAugment ("light")
             -> normalise -> (channels_last, bf16 autocast on CUDA) -> forward -> weighted,
             label-smoothed cross-entropy -> backward -> AdamW step -> LR schedule step, plus the
             loss/accuracy read-back the loop does every step.
ceiling:     the same model, optimiser, batch size and step, on one batch already normalised and in
             device memory (no data path at all).

The two are measured interleaved (one step of each in turn) so that background load on a shared
machine hits both alike. ratio = ceiling step time / end-to-end step time (1.0 = the data path
costs nothing).

    PYTHONPATH=src python benchmarks/bench_train.py [--models mobilenetv2_100 resnet50] [--steps 4]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _perf import cxr_images, machine, median, table, write_result

DEFAULT_BATCH_CPU = {"mobilenetv2_100": 32, "resnet50": 16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model_name: str,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    amp: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    full_epoch: bool = False,
) -> dict[str, Any]:
    """Per-step times of the end-to-end training step and of the model-only ceiling (interleaved)."""
    from xraydx.batches import BatchBuffers, iter_batches
    from xraydx.config import TrainConfig
    from xraydx.models import create_model
    from xraydx.optim import param_groups
    from xraydx.transforms import AugmentSpec, BatchAugment

    size = images.shape[1]
    cuda = device.type == "cuda"
    use_cl = cuda and channels_last
    use_amp = cuda and amp
    model = create_model(model_name, 3, in_chans=1, pretrained="none").to(device)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    run_model: Any = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    weight = torch.ones(3, device=device)
    # as xraydx.train makes it: the configured default resampling, one reused output buffer on a CPU
    aug = BatchAugment(
        AugmentSpec.preset("light"), TrainConfig().augment_interpolation, reuse_output=not cuda
    )  # type: ignore[arg-type]
    mean, std = 0.5, 0.25
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, len(images)).astype(np.int64)
    gen = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = run_model(x)
            loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        float(loss.detach())  # the loop's per-step read-back (a device sync on CUDA)
        int((logits.argmax(1) == y).sum())

    buffers = BatchBuffers()

    def e2e_batches() -> Any:
        while True:
            order = rng.permutation(len(images))
            yield from iter_batches(images, labels, order, batch_size, device, reuse=buffers)  # as train

    def data(xb: torch.Tensor) -> torch.Tensor:
        x = aug(xb, gen, norm=(mean, std))  # normalisation folded in, as the training loop calls it
        if use_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def e2e(xb: torch.Tensor, yb: torch.Tensor) -> None:
        step(data(xb), yb)

    x0 = torch.randn(batch_size, 1, size, size, device=device)
    if use_cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    y0 = torch.as_tensor(labels[:batch_size], device=device)
    model.train()
    batches = e2e_batches()
    t_e2e: list[float] = []
    t_ceil: list[float] = []
    t_data: list[float] = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        xb, yb = next(batches)
        x = data(xb)
        if not cuda:  # on CPU the split costs nothing; on CUDA a sync here would stall the pipeline
            t_data.append(time.perf_counter() - t0)
        step(x, yb)
        _sync(device)
        t1 = time.perf_counter()
        step(x0, y0)
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            t_e2e.append(t1 - t0)
            t_ceil.append(t2 - t1)
        elif t_data:
            t_data.pop()
    out: dict[str, Any] = {
        "model": model_name,
        "device": str(device),
        "image_size": size,
        "batch_size": batch_size,
        "amp_bf16": use_amp,
        "channels_last": use_cl,
        "compile": compile,
        "steps_measured": steps,
        "warmup_steps": warmup,
        "e2e_step_s": median(t_e2e),
        "ceiling_step_s": median(t_ceil),
        "e2e_images_per_s": batch_size / median(t_e2e),
        "ceiling_images_per_s": batch_size / median(t_ceil),
        "ratio": median(t_ceil) / median(t_e2e),
        # within each end-to-end step: the share not spent in the data path (robust to load between steps)
        "data_path_s": median(t_data) if t_data else None,
        "ratio_within_step": median([1 - d / e for d, e in zip(t_data, t_e2e, strict=True)])
        if t_data
        else None,
        "data_path_times_s": t_data,
        "e2e_step_times_s": t_e2e,
        "ceiling_step_times_s": t_ceil,
    }
    with contextlib.suppress(StopIteration):
        batches.close()
    if full_epoch:  # one real epoch through the loop's own batch iterator
        order = rng.permutation(len(images))
        _sync(device)
        t0 = time.perf_counter()
        for xb, yb in iter_batches(images, labels, order, batch_size, device, reuse=buffers):
            e2e(xb, yb)
        _sync(device)
        out["full_epoch_s"] = time.perf_counter() - t0
        out["full_epoch_images"] = len(images)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenetv2_100", "resnet50"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument(
        "--batch-size", type=int, default=0, help="0 = per model (mobilenetv2_100 32, resnet50 16)"
    )
    ap.add_argument("--steps", type=int, default=6, help="measured steps of each kind (after warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--n", type=int, default=256, help="real images in the cache")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = all available CPUs, as xraydx train)"
    )
    ap.add_argument("--tag", default="", help="results file suffix: results/<name>-<tag>.json")
    args = ap.parse_args()

    from xraydx.cache import available_cpus, load_many
    from xraydx.transforms import Preprocessing

    torch.set_num_threads(args.threads or available_cpus())
    host = machine()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # as xraydx train does on CPU
    paths, source = cxr_images(args.n)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xraydx-bench-train-") as tmp:
        images, fails = load_many(
            paths,
            Preprocessing(size=args.size),
            cache_dir=Path(tmp),
            progress=False,
            memmap_threshold=1 << 62,
        )
    print(
        f"{len(paths)} real images from {source}, cached at {args.size} px in {time.perf_counter() - t0:.1f}s"
    )
    assert not fails, fails[:3]
    rows = []
    for name in args.models:
        bs = args.batch_size or DEFAULT_BATCH_CPU.get(name, 32)
        print(
            f"  {name}: batch {bs}, {args.warmup} warmup + {args.steps} measured steps of each kind ...",
            flush=True,
        )
        r = measure(name, images, bs, device, steps=args.steps, warmup=args.warmup)
        rows.append(r)
        print(
            f"    end to end {r['e2e_images_per_s']:.1f} img/s, ceiling {r['ceiling_images_per_s']:.1f} img/s,"
            f" ratio {r['ratio']:.3f}; data path {r['data_path_s'] or 0:.3f}s of each step"
            f" (ratio within step {r['ratio_within_step'] or 0:.3f})",
            flush=True,
        )
    print()
    cols = ["model", "batch_size", "e2e_images_per_s", "ceiling_images_per_s", "ratio", "data_path_s"]
    print(table(rows, [*cols, "ratio_within_step"]))
    worst = min(r["ratio"] for r in rows)
    worst_in = min(r["ratio_within_step"] or 0.0 for r in rows)
    verdict = "met" if min(worst, worst_in) >= 0.9 else "NOT met" if max(worst, worst_in) < 0.9 else "mixed"
    print(
        f"\nlowest ratio {worst:.3f} (interleaved steps), {worst_in:.3f} (within step); target >= 0.9: {verdict}"
    )
    doc = {
        "machine": host,
        "data": source,
        "rows": rows,
        "min_ratio": worst,
        "min_ratio_within_step": worst_in,
    }
    out = write_result("bench_train", {**doc, "target": 0.9, "met": min(worst, worst_in) >= 0.9}, args.tag)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
