"""DICOM node benchmark: instances per second from C-STORE received to SR stored in Orthanc, and the latency
the DICOM path adds to ``xraydx predict`` on the same images. Loopback only, bounded in count and time.

    python benchmarks/bench_dicom.py                  # 24 images, default model, 1 and 4 concurrent senders

Starts a real Orthanc (needs Debian's orthanc + orthanc-dicomweb) on free loopback ports and the node
as a subprocess (its own interpreter, as in production; the library calls ``xraydx dicom listen
--send-to ORTHANC@... --device cpu`` makes),
writes ``--n`` 12-bit DX DICOMs from real chest X-rays, then:

* **predict baseline** (in this process, warm): ``Predictor.predict_files`` on each DICOM file alone
  (batch 1, what the node does per instance), median ms; and ``xraydx predict``'s default batch of 32
  over all files, images/s.
* **sequential latency**: one C-STORE at a time; the clock runs from the C-STORE request until Orthanc's
  REST API counts the SR (polled every 5 ms): median and p90 ms; minus the predict baseline = added latency.
* **throughput**: ``--concurrency`` associations send all images at once; instances/s from the first
  C-STORE to the last SR stored.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _perf import ROOT, cxr_images, machine, median, table, write_result

sys.path.insert(0, str(ROOT / "tests"))
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def _node_process(out: str, send_to: str) -> None:
    """The node as ``xraydx dicom listen --send-to ... --device cpu`` runs it (the same library calls)."""
    from xraydx.constants import DEFAULT_CHECKPOINT
    from xraydx.dicom.node import Node
    from xraydx.dicom.pipeline import Pipeline
    from xraydx.dicom.results import ResultsLog
    from xraydx.dicom.send import CStoreSender, Destination
    from xraydx.predict import Predictor

    pred = Predictor(DEFAULT_CHECKPOINT, "cpu")
    pipeline = Pipeline(pred, Path(out))
    pipeline.warm_up()
    node = Node(
        pipeline, ResultsLog(Path(out), pred.classes), port=0, sender=CStoreSender(Destination.parse(send_to))
    )
    node.serve_forever(
        ready=lambda n: print(f"DICOM node {n.aet} on 127.0.0.1:{n.port}", file=sys.stderr, flush=True)
    )


def _start_node(orthanc: Any, out: Path, threads: int) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, __file__, "--node", str(out), f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "DICOM node" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
            return proc, int(line.rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("xraydx dicom listen did not start")


def _sr_count(orthanc: Any) -> int:
    """Instances in Orthanc: only the node's SRs arrive there in this benchmark."""
    return int(orthanc.get("/statistics")["CountInstances"])


def _wait_count(orthanc: Any, n: int, timeout: float = 300.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _sr_count(orthanc) >= n:
            return time.perf_counter()
        time.sleep(0.005)
    raise TimeoutError(f"Orthanc did not reach {n} instances in {timeout:.0f} s")


def _baseline(files: list[Path]) -> tuple[list[float], float]:
    """``xraydx predict``'s Predictor, warm: ms per file alone (batch 1), and img/s at its default batch 32."""
    from xraydx.constants import DEFAULT_CHECKPOINT
    from xraydx.predict import Predictor

    pred = Predictor(DEFAULT_CHECKPOINT, "cpu")
    list(pred.predict_files(files[:2], batch_size=1, progress=False))  # warm-up
    single = []
    for f in files[2:]:
        t0 = time.perf_counter()
        list(pred.predict_files([f], batch_size=1, progress=False))
        single.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    list(pred.predict_files(files[2:], batch_size=32, progress=False))
    batch_ips = len(files[2:]) / (time.perf_counter() - t0)
    print(
        f"predict baseline: {median(single):.0f} ms per image alone, {batch_ips:.2f} img/s at batch 32",
        flush=True,
    )
    return single, batch_ips


def _through_node(
    orthanc: Any, datasets: list[Any], images: list[Path], tmp: Path, args: argparse.Namespace
) -> tuple[list[float], float]:
    """Sequential C-STORE -> SR-in-Orthanc latencies (ms), then instances/s with concurrent associations."""
    from dicomfiles import scu, xray_dataset

    node, port = _start_node(orthanc, tmp / "out", args.threads)
    try:
        assoc = scu(port)
        for ds in datasets[:2]:  # warm-up of the node's model
            assoc.send_c_store(ds)
        _wait_count(orthanc, 2)
        latency = []
        for ds in datasets[2:]:
            before = _sr_count(orthanc)
            t0 = time.perf_counter()
            assoc.send_c_store(ds)
            latency.append((_wait_count(orthanc, before + 1) - t0) * 1000)
        assoc.release()

        orthanc.clear()
        fresh = [xray_dataset(p) for p in images[2:]]
        chunks = [fresh[i :: args.concurrency] for i in range(args.concurrency)]

        def send(chunk: list[Any]) -> None:
            a = scu(port)
            for ds in chunk:
                a.send_c_store(ds)
            a.release()

        threads = [threading.Thread(target=send, args=(c,)) for c in chunks]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        t_end = _wait_count(orthanc, len(fresh))  # the SRs (the images go to the node only)
        for t in threads:
            t.join()
        return latency, len(fresh) / (t_end - t0)
    finally:
        node.terminate()
        node.wait(timeout=120)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from dicomfiles import write, xray_dataset
    from orthanc_server import Orthanc, free_port, missing_reason

    if missing_reason():
        raise SystemExit(f"bench_dicom: {missing_reason()}")
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dicom_"))
    images, source = cxr_images(args.n + 2)
    datasets = [xray_dataset(p) for p in images]
    files = [write(ds, tmp / "in" / f"{i:03d}.dcm") for i, ds in enumerate(datasets)]

    orthanc = Orthanc(tmp / "orthanc", free_port()).start()  # first: fail fast where Orthanc cannot start
    try:
        single, batch_ips = _baseline(files)
        latency, throughput = _through_node(orthanc, datasets, images, tmp, args)
    finally:
        orthanc.stop()

    lat_sorted = sorted(latency)
    p90 = lat_sorted[int(0.9 * (len(lat_sorted) - 1))]
    rows = [
        {"measure": "predict_files, 1 image (ms, median)", "value": median(single)},
        {"measure": "xraydx predict, batch 32 (img/s)", "value": batch_ips},
        {"measure": "C-STORE -> SR in Orthanc (ms, median)", "value": median(latency)},
        {"measure": "C-STORE -> SR in Orthanc (ms, p90)", "value": float(p90)},
        {"measure": "added latency vs predict (ms, median)", "value": median(latency) - median(single)},
        {"measure": f"throughput, {args.concurrency} associations (inst/s)", "value": throughput},
        {"measure": "throughput, 1 association (inst/s)", "value": 1000.0 / median(latency)},
    ]
    print(table(rows, ["measure", "value"]))
    return {
        "machine": machine(),
        "settings": {"n": args.n, "threads": args.threads, "concurrency": args.concurrency, "images": source},
        "predict_single_ms": single,
        "predict_batch32_img_s": batch_ips,
        "cstore_to_sr_ms": latency,
        "throughput_inst_s": throughput,
        "summary": {r["measure"]: r["value"] for r in rows},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="images timed (plus 2 warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (node and baseline)")
    ap.add_argument("--concurrency", type=int, default=4, help="associations sending at once")
    ap.add_argument("--tag", default="")
    ap.add_argument("--node", nargs=2, metavar=("OUT", "SEND_TO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.node:
        _node_process(*args.node)
        return
    doc = run(args)
    print(f"wrote {write_result('bench_dicom', doc, args.tag)}")


if __name__ == "__main__":
    main()
