"""Load benchmark of ``xraydx serve``: bounded in count and time, on 127.0.0.1 only.

    python benchmarks/bench_serve.py                       # 500 requests at concurrency 8, default model
    python benchmarks/bench_serve.py --compare --json out.json   # several server settings, one after another
    python benchmarks/bench_serve.py --abandon 100         # 100 dropped requests, then one real one

Starts ``xraydx serve`` as a subprocess on a free loopback port (so the load generator does not share the
server's interpreter), sends a few warm-up requests, then ``--requests`` POST /api/predict uploads of the
bundled sample X-rays from ``--concurrency`` concurrent clients (httpx, asyncio), and reports throughput,
p50 / p95 / p99 / max latency, errors, and the server's mean inference batch size. Stops at
``--time-limit`` seconds whatever the count. The server process is stopped at the end.

Without ``--checkpoint`` and without a shipped default model it builds a stand-in checkpoint with the
default architecture and input size (mobilenetv2_100 at 224 px, offline ImageNet weights, untrained
head): the weights do not change the cost of a forward pass, so the figures hold for a trained model of
the same architecture.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

HOST = "127.0.0.1"  # never anything else: this sends load, so it only ever targets this machine
COMPARE = (
    # (label, engine, max_batch, window_ms)
    ("torch, no batching", "torch", 1, 0.0),
    ("torch, batch<=16, 5 ms window", "torch", 16, 5.0),
    ("torch, batch<=16, greedy (0 ms)", "torch", 16, 0.0),
    ("onnx, batch<=16, 5 ms window", "onnx", 16, 5.0),
)


@dataclass
class Result:
    label: str
    engine: str
    max_batch: int
    window_ms: float
    requests: int
    concurrency: int
    sent: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    throughput_rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_batch: float = 0.0
    stopped_by_time: bool = False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stand_in_checkpoint(folder: Path) -> Path:
    """mobilenetv2_100 at 224 px with offline ImageNet weights and a fresh head (speed only)."""
    from xraydx import __version__
    from xraydx.data import CLASSES
    from xraydx.models import create_model, normalization_for, save_checkpoint
    from xraydx.transforms import Preprocessing

    name = "mobilenetv2_100"
    mean, std = normalization_for(name, "offline")
    spec = Preprocessing(size=224, mean=mean, std=std)
    model = create_model(name, len(CLASSES), pretrained="offline")
    meta = {
        "tool": "xraydx",
        "tool_version": __version__,
        "classes": list(CLASSES),
        "architecture": {"name": name, "in_chans": 1, "pretrained": "offline"},
        "input_size": [1, 224, 224],
        "preprocessing": spec.to_dict(),
        "calibration": {"method": "none", "temperature": 1.0},
        "note": "benchmark stand-in: untrained head, for speed measurements only",
    }
    path = folder / "bench-mobilenetv2_100-224.safetensors"
    save_checkpoint(path, model, meta)
    return path


def sample_files(limit: int = 200) -> list[tuple[str, bytes]]:
    paths = sorted((ROOT / "data" / "sample").glob("*/*/*.png"))[:limit]
    if not paths:
        raise SystemExit("the bundled sample (data/sample) is missing")
    return [(p.name, p.read_bytes()) for p in paths]


class Server:
    """``xraydx serve`` in a subprocess on a free loopback port."""

    def __init__(
        self,
        checkpoint: Path,
        engine: str,
        max_batch: int,
        window_ms: float,
        threads: int | None,
        extra: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [
            sys.executable, "-m", "xraydx", "serve", "--checkpoint", str(checkpoint), "--host", HOST,
            "--port", str(self.port), "--engine", engine, "--max-batch", str(max_batch),
            "--batch-window-ms", str(window_ms), "--log-level", "warning", "--device", "cpu",
        ]  # fmt: skip
        if threads:
            cmd += ["--workers-threads", str(threads)]
        cmd += extra or []
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise SystemExit(f"the server exited ({self.proc.returncode}):\n{err[-2000:]}")
            try:
                if httpx.get(self.url + "/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit("the server did not become ready in time")

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/api/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def load(url: str, files: list[tuple[str, bytes]], n: int, concurrency: int, time_limit: float,
               query: str) -> tuple[list[float], dict[str, int], int, float, bool]:  # fmt: skip
    """Send n requests from `concurrency` workers; return latencies (s), errors by kind, sent, wall, timed out."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = {"next": 0}
    stop_at = time.monotonic() + time_limit
    timed_out = {"hit": False}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def worker() -> None:
            while True:
                i = counter["next"]
                if i >= n:
                    return
                if time.monotonic() > stop_at:
                    timed_out["hit"] = True
                    return
                counter["next"] = i + 1
                name, data = files[i % len(files)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/api/predict" + query, files={"file": (name, data, "image/png")})
                    dt = time.perf_counter() - t0
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[f"HTTP {r.status_code}"] = errors.get(f"HTTP {r.status_code}", 0) + 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, errors, counter["next"], wall, timed_out["hit"]


async def abandoned(url: str, files: list[tuple[str, bytes]], n: int, give_up_s: float) -> dict[str, Any]:
    """Send ``n`` uploads whose clients give up ``give_up_s`` after sending (the connection is closed, as a
    browser tab closed mid-wait does), then one real request: its latency and what the server computed."""
    import httpx

    async def one_real(client: httpx.AsyncClient) -> float:
        name, data = files[0]
        t0 = time.perf_counter()
        r = await client.post("/api/predict", files={"file": (name, data, "image/png")})
        r.raise_for_status()
        return time.perf_counter() - t0

    async with httpx.AsyncClient(base_url=url, timeout=120.0) as real:
        alone = sorted([await one_real(real) for _ in range(3)])[1]
        before = (await real.get("/api/health")).json()
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        timeout = httpx.Timeout(120.0, read=give_up_s)
        gave_up = 0
        answered: dict[Any, int] = {}  # dropped requests that got an answer (or an error) before giving up
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as drop:

            async def dropped(i: int) -> None:
                nonlocal gave_up
                name, data = files[i % len(files)]
                try:
                    r = await drop.post("/api/predict", files={"file": (name, data, "image/png")})
                    answered[r.status_code] = answered.get(r.status_code, 0) + 1
                except httpx.TimeoutException:
                    gave_up += 1
                except httpx.HTTPError as exc:
                    answered[type(exc).__name__] = answered.get(type(exc).__name__, 0) + 1

            await asyncio.gather(*(dropped(i) for i in range(n)))
        after_drop = await one_real(real)
        await asyncio.sleep(1.0)
        after = (await real.get("/api/health")).json()
    return {
        "abandoned": n, "gave_up": gave_up, "give_up_s": give_up_s, "answered": {str(k): v for k, v in answered.items()},
        "latency_alone_ms": round(alone * 1000, 1), "latency_after_ms": round(after_drop * 1000, 1),
        "computed_images": after["images"] - before["images"],
        "skipped_gone": after.get("skipped_gone", 0) - before.get("skipped_gone", 0),
    }  # fmt: skip


def percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_one(checkpoint: Path, label: str, engine: str, max_batch: int, window_ms: float, args: argparse.Namespace,
            files: list[tuple[str, bytes]]) -> Result:  # fmt: skip
    res = Result(label, engine, max_batch, window_ms, args.requests, args.concurrency)
    server = Server(checkpoint, engine, max_batch, window_ms, args.threads)
    query = "?heatmap=true" if args.heatmap else ""
    try:
        server.wait_ready()
        asyncio.run(load(server.url, files, args.warmup, min(4, args.concurrency), 120.0, query))
        before = server.health()
        lat, errs, sent, wall, timed = asyncio.run(
            load(server.url, files, args.requests, args.concurrency, args.time_limit, query)
        )
        after = server.health()
    finally:
        server.stop()
    res.sent, res.ok, res.errors, res.error_kinds = sent, len(lat), sum(errs.values()), errs
    res.wall_s = round(wall, 2)
    res.throughput_rps = round(len(lat) / wall, 2) if wall > 0 else 0.0
    for q, attr in ((50, "p50_ms"), (95, "p95_ms"), (99, "p99_ms"), (100, "max_ms")):
        setattr(res, attr, round(percentile(lat, q) * 1000, 1))
    batches = after["batches"] - before["batches"]
    res.mean_batch = round((after["images"] - before["images"]) / batches, 2) if batches else 0.0
    res.stopped_by_time = timed
    return res


def run_abandon(checkpoint: Path, args: argparse.Namespace, files: list[tuple[str, bytes]]) -> int:
    if not 0 < args.abandon <= 1000:
        raise SystemExit("--abandon must be within 1..1000")
    server = Server(checkpoint, args.engine, args.max_batch, args.batch_window_ms, args.threads,
                    extra=["--max-queue", str(max(64, args.abandon + 8)),
                           "--limit-concurrency", str(max(64, args.abandon + 16))])  # fmt: skip
    try:
        server.wait_ready()
        res = asyncio.run(abandoned(server.url, files, args.abandon, args.give_up_s))
    finally:
        server.stop()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.abandon} requests whose clients gave up after {args.give_up_s} s, then one real request;"
          f" {os.cpu_count()} CPUs, load average {load_avg:.1f} at the end")  # fmt: skip
    print(
        "| abandoned | gave up | real request alone ms | real request after them ms | images computed | skipped |"
    )
    print("|---|---|---|---|---|---|")
    if res["answered"]:
        print(f"answered before their clients gave up: {res['answered']}")
    print(f"| {res['abandoned']} | {res['gave_up']} | {res['latency_alone_ms']} | {res['latency_after_ms']} |"
          f" {res['computed_images']} | {res['skipped_gone']} |")  # fmt: skip
    if args.json:
        from xraydx.fsutil import atomic_write_json

        atomic_write_json(args.json, {"load_average": load_avg, "abandon": res})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="default: the shipped model, else a stand-in (see above)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per run, at most")
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--engine", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="server --workers-threads")
    ap.add_argument("--heatmap", action="store_true", help="ask for Grad-CAM on every request")
    ap.add_argument("--compare", action="store_true", help="run the settings in COMPARE one after another")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--abandon",
        type=int,
        default=0,
        metavar="N",
        help="instead of the load: N requests whose clients give up, then one real request",
    )
    ap.add_argument("--give-up-s", type=float, default=0.2, help="with --abandon: seconds each client waits")
    args = ap.parse_args(argv)
    if not (0 < args.requests <= 100_000 and 0 < args.concurrency <= 256 and 0 < args.time_limit <= 3600):
        ap.error(
            "--requests, --concurrency and --time-limit must be positive and bounded (100000, 256, 3600)"
        )

    from xraydx.cli import DEFAULT_CHECKPOINT

    files = sample_files()
    with tempfile.TemporaryDirectory(prefix="xraydx-bench-") as tmp:
        ckpt = args.checkpoint or (DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None)
        if ckpt is None:
            ckpt = stand_in_checkpoint(Path(tmp))
            print(f"no checkpoint given and no shipped model: using a stand-in, {ckpt.name}", file=sys.stderr)
        if args.abandon:
            return run_abandon(ckpt, args, files)
        configs = (
            COMPARE
            if args.compare
            else ((f"{args.engine}", args.engine, args.max_batch, args.batch_window_ms),)
        )
        results = []
        for label, engine, mb, win in configs:
            print(f"running: {label} ...", file=sys.stderr)
            results.append(run_one(ckpt, label, engine, mb, win, args, files))
    cpu = os.cpu_count()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.requests} requests, concurrency {args.concurrency}, {'with' if args.heatmap else 'no'} heatmap;"
          f" {cpu} CPUs, load average {load_avg:.1f} at the end")  # fmt: skip
    head = "| setting | ok | errors | throughput (req/s) | p50 ms | p95 ms | p99 ms | max ms | mean batch |"
    print(head)
    print("|" + "---|" * 9)
    for r in results:
        print(
            f"| {r.label} | {r.ok} | {r.errors} | {r.throughput_rps} | {r.p50_ms} | {r.p95_ms} | {r.p99_ms} |"
            f" {r.max_ms} | {r.mean_batch} |" + (" (stopped at the time limit)" if r.stopped_by_time else "")
        )
    if args.json:
        from xraydx.fsutil import atomic_write_json

        atomic_write_json(
            args.json, {"cpus": cpu, "load_average": load_avg, "results": [asdict(r) for r in results]}
        )
    bad = any(r.errors or r.stopped_by_time for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
