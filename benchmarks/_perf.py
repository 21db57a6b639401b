"""Shared helpers for the benchmark scripts: machine description, timing, table, JSON result file."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing


def cxr_images(limit: int) -> tuple[list[Path], str]:
    """Real chest X-rays: /work/shared/data/cxr3 if present (or $XRAYDX_BENCH_DATA), else the bundled
    sample repeated. Spread evenly over the sorted list so every class and source is in it."""
    root = Path(os.environ.get("XRAYDX_BENCH_DATA", "/work/shared/data/cxr3"))
    found = sorted(p for p in root.rglob("*.png")) if root.is_dir() else []
    source = str(root)
    if not found:
        found = sorted((ROOT / "data" / "sample").rglob("*.png"))
        source = f"{ROOT / 'data' / 'sample'} (repeated)"
    if len(found) >= limit:
        step = len(found) / limit
        return [found[int(i * step)] for i in range(limit)], source
    return [found[i % len(found)] for i in range(limit)], source


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    return "\n".join(lines)


def write_result(name: str, doc: dict[str, Any], tag: str = "") -> Path:
    """benchmarks/results/<name>[-<tag>].json, written atomically."""
    from xraydx.fsutil import atomic_write_json

    doc = {
        "benchmark": name,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **doc,
    }
    doc.setdefault("machine", {})["load_average_at_end"] = (
        os.getloadavg() if hasattr(os, "getloadavg") else None
    )
    path = RESULTS / f"{name}{'-' + tag if tag else ''}.json"
    atomic_write_json(path, doc)
    return path
