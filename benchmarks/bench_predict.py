"""Benchmark: images/s of ``xraydx predict`` end to end, ``--engine torch`` vs ``--engine onnx``.

The default pipeline (the shipped model: lung segmenter + OOD guard + classifier for every image)
over a folder of real X-rays, each run a fresh ``python -m xraydx predict DIR --out CSV`` process,
timed from start to exit (start-up and model loading included). One warm-up run per engine first
(it also fills the ONNX cache, so the timed onnx runs load the exported networks, as every run after
the first does). Then ``--rounds`` rounds, each running every engine once, in an order that rotates
each round, so a change in the machine's load hits both alike; the verdict is the median of the
per-round ratios, and the worst round is printed next to it. The two engines' CSVs are compared
(same rows, same predicted class and status, largest probability difference).

``--baseline SRC`` adds a third pipeline: the same command with another source tree first on the
path (e.g. a checkout of the commit before the engine work: "today's torch pipeline").

    PYTHONPATH=src python benchmarks/bench_predict.py [--images 400] [--rounds 3] [--baseline OLD/src]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _perf import ROOT, cxr_images, machine, median, table, write_result


def _run(src: Path, engine: str, folder: Path, out: Path, threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process) of one ``xraydx predict`` run."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "xraydx", "predict", str(folder), "--out", str(out), "-q", "--overwrite"]
    if engine == "onnx":
        cmd += ["--engine", "onnx"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def compare(a: Path, b: Path) -> dict[str, Any]:
    ra, rb = _rows(a), _rows(b)
    probs = [k for k in next(iter(ra.values())) if k.startswith("prob_")] if ra else []
    diff = max(
        (
            abs(float(ra[p][k]) - float(rb[p][k]))
            for p in ra
            if p in rb
            for k in probs
            if ra[p][k] and rb[p][k]
        ),
        default=0.0,
    )
    return {
        "rows": len(ra),
        "same_paths": ra.keys() == rb.keys(),
        "same_prediction": sum(ra[p]["prediction"] == rb[p]["prediction"] for p in ra if p in rb),
        "same_status": sum(ra[p]["status"] == rb[p]["status"] for p in ra if p in rb),
        "same_flag": sum(ra[p].get("flag") == rb[p].get("flag") for p in ra if p in rb),
        "max_abs_diff_probs": diff,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="real images to predict per run (default 400)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every pipeline once)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the runs (default 2)")
    ap.add_argument("--baseline", metavar="SRC", help="also time `--engine torch` with this src folder")
    ap.add_argument("--tag", default="", help="results file suffix: results/bench_predict-<tag>.json")
    args = ap.parse_args()

    host = machine()
    paths, source = cxr_images(args.images)
    src = ROOT / "src"
    pipelines: dict[str, tuple[Path, str]] = {"torch": (src, "torch"), "onnx": (src, "onnx")}
    if args.baseline:
        pipelines["baseline-torch"] = (Path(args.baseline).resolve(), "torch")
    times: dict[str, list[float]] = {k: [] for k in pipelines}
    cpu: dict[str, list[float]] = {k: [] for k in pipelines}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, p in enumerate(paths):  # distinct names: the same file may be listed twice
            os.symlink(p.resolve(), folder / f"{i:05d}__{p.name}")
        outs = {k: Path(tmp) / f"{k}.csv" for k in pipelines}
        for k, (s, eng) in pipelines.items():
            print(
                f"warm-up {k}: {args.images / _run(s, eng, folder, outs[k], args.threads)[0]:.1f} img/s",
                flush=True,
            )
        names = list(pipelines)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for k in order:
                s, eng = pipelines[k]
                wall, used = _run(s, eng, folder, outs[k], args.threads)
                times[k].append(wall)
                cpu[k].append(used)
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {args.images / times[k][-1]:.1f} img/s" for k in names),
                flush=True,
            )
        agreement = compare(outs["torch"], outs["onnx"])
    ips = {k: [args.images / t for t in v] for k, v in times.items()}
    ratio = [o / t for o, t in zip(ips["onnx"], ips["torch"], strict=True)]
    rows = [
        {
            "pipeline": k,
            "median_img_s": median(v),
            "worst_img_s": min(v),
            "best_img_s": max(v),
            "runs": len(v),
            "cpu_ms_per_img": 1000 * median(cpu[k]) / args.images,
        }
        for k, v in ips.items()
    ]
    result: dict[str, Any] = {
        "machine": host, "data": source, "images": args.images, "rounds": args.rounds, "threads": args.threads,
        "rows": rows, "images_per_s": ips, "seconds": times, "cpu_seconds": cpu, "onnx_over_torch": ratio,
        "onnx_over_torch_median": median(ratio), "onnx_over_torch_worst": min(ratio), "agreement": agreement,
    }  # fmt: skip
    print()
    print(table(rows, ["pipeline", "median_img_s", "worst_img_s", "best_img_s", "runs", "cpu_ms_per_img"]))
    print(f"\nonnx / torch (same code, per round): median {median(ratio):.2f}x, worst {min(ratio):.2f}x")
    if "baseline-torch" in ips:
        base = [o / b for o, b in zip(ips["onnx"], ips["baseline-torch"], strict=True)]
        base_cpu = [b / o for o, b in zip(cpu["onnx"], cpu["baseline-torch"], strict=True)]
        result.update(onnx_over_baseline=base, onnx_over_baseline_median=median(base))
        result["baseline_cpu_over_onnx_cpu"] = base_cpu
        result["onnx_over_baseline_worst"] = min(base)
        print(f"onnx / baseline torch: median {median(base):.2f}x, worst {min(base):.2f}x (target >= 3x)")
    print(
        f"torch vs onnx outputs: {agreement['same_prediction']}/{agreement['rows']} same class,"
        f" {agreement['same_status']} same status, max |probability difference| {agreement['max_abs_diff_probs']:.1e}"
    )
    print(f"wrote {write_result('bench_predict', result, args.tag)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
