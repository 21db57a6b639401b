"""Benchmark c: inference images/s and single-image latency, PyTorch eager vs ONNX Runtime.

Both engines run the predict path's logits computation on preprocessed uint8 images (real X-rays):
``xraydx.predict.batch_logits`` (eager, float32, ``torch.inference_mode``) and
``xraydx.export.OnnxEngine.batch_logits`` (the exported graph in onnxruntime, CPU provider, all
graph optimisations), same threads, at batch 1 (latency) and batch 32 (throughput). Calls of the
two engines are interleaved so background load hits both alike.

    PYTHONPATH=src python benchmarks/bench_infer.py [--model mobilenetv2_100] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
from _perf import cxr_images, machine, median, table, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs-b1", type=int, default=40, help="timed batch-1 calls per engine")
    ap.add_argument("--runs-b32", type=int, default=6, help="timed batch-32 calls per engine")
    ap.add_argument(
        "--threads", type=int, default=0, help="threads for both engines (0 = all available CPUs)"
    )
    ap.add_argument("--tag", default="", help="results file suffix: results/<name>-<tag>.json")
    args = ap.parse_args()

    from xraydx.cache import available_cpus
    from xraydx.export import OnnxEngine, export_graph, with_metadata
    from xraydx.io import read_image
    from xraydx.models import create_model
    from xraydx.predict import batch_logits
    from xraydx.transforms import Preprocessing, preprocess

    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    host = machine()
    spec = Preprocessing(size=args.size, mean=0.5, std=0.25)
    paths, source = cxr_images(32)
    images = np.stack([preprocess(read_image(p), spec) for p in paths])
    model = create_model(args.model, 3, in_chans=1, pretrained="none").eval()
    meta = {
        "classes": ["covid", "non_covid", "normal"],
        "architecture": {"name": args.model, "in_chans": 1, "pretrained": "none"},
        "input_size": [1, args.size, args.size],
        "preprocessing": spec.to_dict(),
    }
    t0 = time.perf_counter()
    eng = OnnxEngine(with_metadata(export_graph(model, meta), meta, {}), threads=threads)
    export_s = time.perf_counter() - t0
    cpu = torch.device("cpu")
    eager = lambda x: batch_logits(model, x, spec, cpu, batch_size=64).numpy()  # noqa: E731
    onnx = eng.batch_logits
    diff = float(np.abs(eager(images) - onnx(images)).max())
    print(
        f"{args.model} at {args.size} px, {threads} threads; export + session {export_s:.1f}s; max |logit diff| {diff:.2e}"
    )

    def bench(batch: int, runs: int, warmup: int) -> dict[str, list[float]]:
        x = images[:batch]
        times: dict[str, list[float]] = {"eager": [], "onnx": []}
        for i in range(warmup + runs):
            for name, fn in (("eager", eager), ("onnx", onnx)):
                t0 = time.perf_counter()
                fn(x)
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[name].append(dt)
        return times

    rows: list[dict[str, Any]] = []
    for batch, runs, warmup in ((1, args.runs_b1, 5), (32, args.runs_b32, 1)):
        t = bench(batch, runs, warmup)
        for name in ("eager", "onnx"):
            med = median(t[name])
            rows.append(
                {
                    "engine": "PyTorch eager" if name == "eager" else "ONNX Runtime",
                    "batch": batch,
                    "median_ms_per_call": med * 1e3,
                    "p90_ms_per_call": float(np.percentile(t[name], 90)) * 1e3,
                    "images_per_s": batch / med,
                    "runs": runs,
                }
            )
        rows[-1]["speedup_vs_eager"] = rows[-1]["images_per_s"] / rows[-2]["images_per_s"]
        rows[-2]["speedup_vs_eager"] = 1.0
        print(
            f"  batch {batch}: eager {rows[-2]['images_per_s']:.1f} img/s, onnx {rows[-1]['images_per_s']:.1f} img/s"
        )
    print()
    print(
        table(
            rows,
            ["engine", "batch", "median_ms_per_call", "p90_ms_per_call", "images_per_s", "speedup_vs_eager"],
        )
    )
    b1 = rows[1]["speedup_vs_eager"]
    print(
        f"\nONNX Runtime / eager at batch 1: {b1:.2f}x; target >= 1.3x: {'met' if b1 >= 1.3 else 'NOT met'}"
    )
    out = write_result(
        "bench_infer",
        {
            "machine": host,
            "data": source,
            "settings": {"model": args.model, "size": args.size, "threads": threads, "pretrained": "none"},
            "max_abs_logit_diff": diff,
            "rows": rows,
            "speedup_batch1": b1,
            "target": 1.3,
            "met": b1 >= 1.3,
        },
        args.tag,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
