"""The linear probe before (or instead of) fine-tuning: ``train.probe`` (xraydx.probe), on the real sample."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, epoch_rows, kill_in_validation, tiny_config
from xraydx.checkpoint import load_tensors
from xraydx.errors import ConfigError, TrainError
from xraydx.train import run_training


def _split(sample_dir: Path, tmp_path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    from xraydx.data import discover
    from xraydx.trainset import load_split
    from xraydx.transforms import Preprocessing

    recs = discover(sample_dir).split(name)
    sd, bad = load_split(recs, Preprocessing(size=64), tmp_path / "cache", name, False)
    assert not bad
    return sd.images, sd.labels


def test_the_head_computes_the_fitted_logistic_regression(sample_dir: Path, tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    from xraydx.engines import normalise
    from xraydx.models import create_model
    from xraydx.probe import C_GRID, fit_probe
    from xraydx.shift import batch_features
    from xraydx.transforms import Preprocessing

    spec = Preprocessing(size=64)
    (xtr, ytr), (xva, yva) = _split(sample_dir, tmp_path, "train"), _split(sample_dir, tmp_path, "val")
    torch.manual_seed(0)
    model = create_model(TINY_MODEL, 3, in_chans=1, pretrained="none")
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.all(bn.running_mean == 0)
    w = np.where(ytr == 0, 2.0, 1.0)  # weights reach the fit
    info = fit_probe(model, xtr, ytr, w, xva, yva, spec, torch.device("cpu"), 3)
    assert info["C"] in C_GRID and set(info["val_macro_f1_by_C"]) == {str(c) for c in C_GRID}
    assert info["batchnorm_layers"] > 0 and not torch.all(bn.running_mean == 0)  # the images' statistics
    f = batch_features(model, xtr, spec, torch.device("cpu"), normalize=False).astype(np.float64)
    mu, sd = f.mean(0), f.std(0)
    sd[sd < 1e-6] = 1.0
    clf = LogisticRegression(C=info["C"], max_iter=2000).fit((f - mu) / sd, ytr, sample_weight=w / w.mean())
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(normalise(xtr, spec.mean, spec.std))).double().numpy()
    assert np.allclose(logits, clf.decision_function((f - mu) / sd), atol=1e-3)
    assert (logits.argmax(1) == ytr).mean() == pytest.approx(info["train_accuracy"], abs=1e-4)


def test_lp_trains_the_head_alone_and_resumes_frozen(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(sample_dir, tmp_path, epochs=2, probe="lp")
    run = kill_in_validation(monkeypatch, cfg, epoch=2)
    first = load_tensors(run / "checkpoints" / "last.safetensors", TrainError)
    shutil.copy(run / "checkpoints" / "last.safetensors", tmp_path / "epoch1.safetensors")
    assert run_training(None, resume=run, progress=False) == run
    second = load_tensors(run / "checkpoints" / "last.safetensors", TrainError)
    head = {k for k in first if k.startswith("fc.")}
    assert head and all(not torch.equal(first[k], second[k]) for k in head if k.endswith("weight"))
    # every other tensor, BatchNorm statistics included, is what the probe left (epoch 1 == epoch 2)
    assert all(torch.equal(first[k], second[k]) for k in first if k not in head and "num_batches" not in k)
    assert any("running_mean" in k and not torch.all(first[k] == 0) for k in first)
    log = (run / "train.log").read_text()
    assert "linear probe (lp): logistic regression" in log and "the head alone trains" in log


def test_lp_ft_fine_tunes_everything_and_a_killed_run_resumes_without_probing_again(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = run_training(tiny_config(sample_dir, tmp_path / "a", epochs=2, probe="lp-ft"), progress=False)
    log = (whole / "train.log").read_text()
    assert log.count("linear probe (lp-ft): logistic regression") == 1 and "alone trains" not in log
    run = kill_in_validation(monkeypatch, tiny_config(sample_dir, tmp_path / "b", epochs=2, probe="lp-ft"), 2)
    first = load_tensors(run / "checkpoints" / "last.safetensors", TrainError)
    assert run_training(None, resume=run, progress=False) == run
    assert epoch_rows(run) == epoch_rows(whole)  # the resumed run repeats the uninterrupted one
    assert (run / "train.log").read_text().count("logistic regression") == 1  # not fitted again on resume
    second = load_tensors(run / "checkpoints" / "last.safetensors", TrainError)
    assert not torch.equal(first["conv1.0.weight"], second["conv1.0.weight"])  # the backbone trains too


def test_an_unknown_probe_mode_is_refused_before_anything_runs(sample_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.probe must be one of none, lp-ft, lp"):
        run_training(tiny_config(sample_dir, tmp_path, probe="lpft"), progress=False)
    assert not (tmp_path / "tiny").exists()
