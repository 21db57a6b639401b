"""Shared fixtures: the bundled sample of real chest X-rays, and tiny configs for fast training."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# ONNX exports made by the tests (xraydx.engines caches them) go to a folder of this session, not ~/.cache
_CACHE = tempfile.mkdtemp(prefix="xraydx-test-cache-")
os.environ.setdefault("XRAYDX_CACHE_DIR", _CACHE)
atexit.register(shutil.rmtree, _CACHE, True)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TINY_MODEL = "test_resnet"  # timm's 0.37 M-parameter test network: fast, real architecture


def sample_images(split: str = "train", label: str | None = None) -> list[Path]:
    pattern = f"{split}/{label or '*'}/*.png"
    found = sorted(SAMPLE.glob(pattern))
    if not found:
        raise RuntimeError(f"bundled sample missing: {SAMPLE}/{pattern}")
    return found


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert SAMPLE.is_dir(), f"bundled sample missing at {SAMPLE}"
    return SAMPLE


def tiny_config(data: Path | str, runs: Path, **train: object) -> object:
    from xraydx.config import Config

    cfg = Config()
    cfg.data.path = str(data)
    cfg.data.image_size = 64
    cfg.runs_dir = str(runs)
    cfg.name = "tiny"
    cfg.model.name = TINY_MODEL
    cfg.model.pretrained = "none"
    cfg.train.epochs = 2
    cfg.train.batch_size = 16
    cfg.train.threads = 1
    cfg.train.lr = 3e-3
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def kill_in_validation(monkeypatch: pytest.MonkeyPatch, cfg: object, epoch: int) -> Path:
    """Train ``cfg`` until a KeyboardInterrupt in epoch ``epoch``'s validation (as a killed run stops after
    its last saved epoch); returns the run folder, to ``--resume``. The real validation is back afterwards."""
    import xraydx.train as train_mod
    from xraydx.train import run_training

    real = train_mod.eval_logits
    calls = {"n": 0}

    def dies(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "eval_logits", dies)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, progress=False)  # type: ignore[arg-type]
    monkeypatch.setattr(train_mod, "eval_logits", real)
    return Path(cfg.runs_dir) / cfg.name  # type: ignore[attr-defined]


def refused_values(sample_dir: Path, key: str, values: Sequence[float]) -> None:
    """``validate`` refuses each of ``values`` for ``train.<key>``, naming the setting."""
    from xraydx.config import Config, validate
    from xraydx.errors import ConfigError

    cfg = Config()
    cfg.data.path = str(sample_dir)
    for v in values:
        setattr(cfg.train, key, v)
        with pytest.raises(ConfigError, match=f"train.{key}"):
            validate(cfg)


def refused_on_one_source(sample_dir: Path, tmp: Path, match: str, **train: object) -> None:
    """Training with ``train`` settings on the sample with one source is refused: ConfigError matching
    ``match`` (for the options that work across sources)."""
    from xraydx.errors import ConfigError
    from xraydx.train import run_training

    one = one_source_manifest(sample_dir, tmp / "one.csv")
    with pytest.raises(ConfigError, match=match):
        run_training(tiny_config(one, tmp / "runs", epochs=1, **train), progress=False)  # type: ignore[arg-type]


def plain_and_with(sample_dir: Path, tmp: Path, **train: object) -> tuple[Path, Path]:
    """Two one-epoch class x source balanced runs on the sample, the same seed and draws: without and with
    ``train`` settings (their run folders)."""
    from xraydx.train import run_training

    plain = run_training(tiny_config(sample_dir, tmp / "a", epochs=1, balance="class_source"), progress=False)  # type: ignore[arg-type]
    run = run_training(
        tiny_config(sample_dir, tmp / "b", epochs=1, balance="class_source", **train), progress=False
    )  # type: ignore[arg-type]
    return plain, run


def one_source_manifest(sample_dir: Path, out: Path) -> Path:
    """The bundled sample as a manifest (absolute paths) in which every image has one source, ``onesite``:
    for the options that need two or more training sources."""
    import csv

    with (sample_dir / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["source"] = "onesite"
        r["path"] = str(sample_dir / r["path"])
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), quoting=csv.QUOTE_ALL)
        w.writeheader()
        w.writerows(rows)
    return out


def epoch_rows(run: Path) -> list[dict[str, str]]:
    """A training run's log.csv rows without the timings (two runs that trained alike compare equal)."""
    import csv

    with open(run / "log.csv") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def val_macro_f1(run: Path, checkpoint: str, sample_dir: Path, tmp_path: Path) -> float:
    """The val macro-F1 of one of ``run``'s checkpoints, computed here in one process (a tiny run on the sample)."""
    import torch

    from xraydx.checkpoint import load_tensors, read_metadata
    from xraydx.data import discover
    from xraydx.errors import TrainError
    from xraydx.metrics import compute_metrics
    from xraydx.models import create_model
    from xraydx.predict import batch_logits
    from xraydx.trainset import load_split
    from xraydx.transforms import Preprocessing

    spec = Preprocessing.from_dict(read_metadata(run / "checkpoints" / checkpoint)["preprocessing"])
    va, bad = load_split(discover(sample_dir).split("val"), spec, tmp_path / "cache", "val", False)
    assert not bad
    model = create_model(TINY_MODEL, 3, in_chans=1, pretrained="none")
    model.load_state_dict(load_tensors(run / "checkpoints" / checkpoint, TrainError))
    probs = torch.softmax(batch_logits(model.eval(), va.images, spec, torch.device("cpu")), 1).numpy()
    return float(compute_metrics(va.labels, probs, ["covid", "non_covid", "normal"])["macro_f1"])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """One tiny training run on the real sample, shared by the tests that need a checkpoint."""
    from xraydx.train import run_training

    runs = tmp_path_factory.mktemp("runs")
    return run_training(tiny_config(sample_dir, runs, epochs=3), progress=False)


@pytest.fixture(scope="session")
def checkpoint(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "best.safetensors"


# a tiny leave-source-out crossval (test_crossval, test_bnadapt)
CV_FOLDS = "kermany;nihcxr8"
CV_TINY = ["--model", "test_resnet", "--pretrained", "none", "--image-size", "64", "--epochs", "1",
        "--set", "train.batch_size=16", "--set", "train.threads=1", "--set", "train.lr=3e-3"]  # fmt: skip


@pytest.fixture(scope="session")
def cv_run(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """The command a user types: a tiny leave-source-out crossval over two of the sample's sources."""
    runs = tmp_path_factory.mktemp("cv")
    args = [
        "crossval",
        "--data",
        str(sample_dir),
        "--folds",
        CV_FOLDS,
        "--runs-dir",
        str(runs),
        "--name",
        "cv",
        "-q",
    ]
    from xraydx.cli import main

    assert main([*args, *CV_TINY]) == 0
    return runs / "cv"
