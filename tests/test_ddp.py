"""Two-process DDP training on CPU (gloo) under torchrun, on the real bundled sample."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from orthanc_server import free_port

from conftest import ROOT, TINY_MODEL, sample_images, val_macro_f1
from xraydx.models import load_checkpoint, read_metadata
from xraydx.predict import Predictor


def _torchrun_train(tmp_path: Path, sample_dir: Path, epochs: int, *extra: str) -> Path:
    """``xraydx train`` on the sample in two CPU processes (gloo); the run folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "xraydx", "train", "--data", str(sample_dir),
        "--model", TINY_MODEL, "--pretrained", "none", "--image-size", "64", "--epochs", str(epochs),
        "--runs-dir", str(tmp_path / "runs"), "--name", "ddp", "-q", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "runs" / "ddp"


def test_torchrun_two_process_cpu_training(tmp_path: Path, sample_dir: Path, checkpoint: Path) -> None:
    run = _torchrun_train(tmp_path, sample_dir, 2)

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


def test_torchrun_with_the_linear_probe_and_weight_averaging(tmp_path: Path, sample_dir: Path) -> None:
    """Rank 0 fits the probe (DDP hands its head to rank 1); both ranks average the same weights and
    re-estimate the same BatchNorm statistics, so the val figure the ranks compute together is the saved
    average's own."""
    run = _torchrun_train(
        tmp_path, sample_dir, 2, "--set", "train.probe=lp-ft", "--set", "train.average=swa",
        "--set", "train.average_start=0.25",
    )  # fmt: skip
    log = (run / "train.log").read_text()
    assert log.count("linear probe (lp-ft): logistic regression") == 1 and "x2 ranks" in log
    meta = read_metadata(run / "checkpoints" / "last.safetensors")
    assert meta["average"]["mode"] == "swa" and meta["average"]["steps"] > 0
    assert (run / "checkpoints" / "last.raw.safetensors").is_file()
    with open(run / "log.csv") as fh:
        logged = float(list(csv.DictReader(fh))[-1]["val_macro_f1"])
    assert logged == pytest.approx(val_macro_f1(run, "last.safetensors", sample_dir, tmp_path), abs=1e-4)
