"""Cache memory check: process memory with the memmap path vs an in-RAM array, for one epoch of batches.

Runs ``load_many`` on real images (cxr3 if present, else the sample repeated) in three fresh
subprocesses: memmap (first build), memmap (reopened by the next run), in RAM. Each reports its
anonymous memory (RssAnon: what cannot be paged out) and file-backed memory (RssFile: page cache
the kernel can drop) after loading and after one epoch of random batches.

    PYTHONPATH=src python benchmarks/bench_cache_memory.py [--n 4200] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _perf import ROOT, cxr_images, machine, table, write_result


def _mem() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) // 1024
    return out


def child(mode: str, size: int, n: int, root: str) -> None:
    import numpy as np

    from xraydx.cache import load_many
    from xraydx.transforms import Preprocessing

    paths, _ = cxr_images(n)
    start = _mem()
    t0 = time.perf_counter()
    arr, fails = load_many(
        paths, Preprocessing(size=size), cache_dir=Path(root), progress=False,
        memmap_threshold=0 if mode.startswith("memmap") else 1 << 62, compact=True,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    loaded = _mem()
    order = np.random.default_rng(0).permutation(len(arr))
    for i in range(0, len(arr), 32):
        arr[np.sort(order[i : i + 32])]
    epoch = _mem()
    print(json.dumps({
        "mode": mode, "array_mib": arr.nbytes / 2**20, "load_s": load_s, "kind": type(arr).__name__,
        "anon_mib_added_after_load": loaded["RssAnon"] - start["RssAnon"],
        "anon_mib_added_after_epoch": epoch["RssAnon"] - start["RssAnon"],
        "file_backed_mib_after_epoch": epoch["RssFile"] - start["RssFile"], "failures": len(fails),
    }))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tag", default="")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.size, args.n, args.child[1])
        return 0
    host = machine()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="xraydx-bench-mem-") as root:
        for mode in ("memmap (first build)", "memmap (reopened)", "in RAM"):
            cmd = [
                sys.executable,
                __file__,
                "--n",
                str(args.n),
                "--size",
                str(args.size),
                "--child",
                mode,
                root,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {mode}: +{rows[-1]['anon_mib_added_after_epoch']} MiB anonymous", flush=True)
    cols = ["mode", "array_mib", "load_s", "anon_mib_added_after_epoch", "file_backed_mib_after_epoch"]
    print()
    print(table(rows, cols))
    out = write_result(
        "bench_cache_memory", {"machine": host, "n": args.n, "size": args.size, "rows": rows}, args.tag
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
