"""Two-process DDP training on CPU (gloo) under torchrun, on the real bundled sample."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import ROOT, TINY_MODEL, sample_images
from xraydx.models import load_checkpoint, read_metadata
from xraydx.predict import Predictor


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_process_cpu_training(tmp_path: Path, sample_dir: Path, checkpoint: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "xraydx", "train", "--data", str(sample_dir),
        "--model", TINY_MODEL, "--pretrained", "none", "--image-size", "64", "--epochs", "2",
        "--runs-dir", str(tmp_path / "runs"), "--name", "ddp", "-q",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"

    for name in ("config.yaml", "log.csv", "metrics.json", "predictions.csv", "manifest.csv", "train.log"):
        assert (run / name).is_file(), name
    for name in ("best.safetensors", "last.safetensors", "last.state.safetensors"):
        assert (run / "checkpoints" / name).is_file(), name
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*.tmp"))
    with open(run / "log.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]
    log = (run / "train.log").read_text()
    assert "x2 ranks" in log
    assert log.count("epoch 2/2:") == 1, "only rank 0 writes"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] == len(sample_images("test"))
    with open(run / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(sample_images("test"))

    # the same checkpoint a 1-process run writes: same metadata sections, loads and predicts
    meta = read_metadata(run / "checkpoints" / "best.safetensors")
    assert set(read_metadata(checkpoint)) <= set(meta)
    assert meta["training_data"]["counts"]["train"] == {"covid": 40, "non_covid": 40, "normal": 40}
    load_checkpoint(run / "checkpoints" / "best.safetensors")
    pred = Predictor(run / "checkpoints" / "best.safetensors", "cpu")
    preds = list(pred.predict_files(sample_images("test")[:6], progress=False))
    assert all(p.status == "ok" and p.probs is not None for p in preds)
    assert np.allclose([sum(p.probs or []) for p in preds], 1.0, atol=1e-5)
