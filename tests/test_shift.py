"""The source-shift score as shipped: ``xraydx shift fit`` writes a checkpoint's sidecar; predict reads it,
reports ``shift_score`` per image and flags at or above the calibrated threshold; a sidecar that does not
belong to the checkpoint is refused with one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import sample_images
from xraydx.cli import main
from xraydx.errors import ShiftError
from xraydx.predict import Predictor
from xraydx.shift import SHIFT_FLAG, load_sidecar, sidecar_path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def model_copy(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shift")
    ck = d / "model.safetensors"
    shutil.copy(trained_run / "checkpoints" / "best.safetensors", ck)
    return ck


def _fit_args(checkpoint: Path, data: Path, *extra: str) -> list[str]:
    """``xraydx shift fit`` of ``checkpoint`` on ``data`` (quiet), with ``extra`` options."""
    return ["shift", "fit", "--checkpoint", str(checkpoint), "--data", str(data), *extra, "-q"]


def _predict(ck: Path, out: Path, images: list[Path]) -> list[dict[str, str]]:
    rc = main(["predict", *map(str, images), "--checkpoint", str(ck), "--out", str(out), "-q"])
    assert rc == 0
    return _rows(out)


def test_fit_then_predict_reports_the_score_and_flags_at_the_threshold(
    model_copy: Path, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = sample_images("test")[:12]
    base = _fit_args(model_copy, trained_run)
    assert main(base) == 0  # report only
    assert "no threshold" in capsys.readouterr().out
    rule = load_sidecar(sidecar_path(model_copy), Predictor(model_copy, "cpu", ood=False).model)
    assert rule.threshold is None and rule.score.scale > 0
    rows = _predict(model_copy, tmp_path / "a.csv", images)
    scores = np.array([float(r["shift_score"]) for r in rows])
    assert len(scores) == len(images) and (scores >= 0).all()
    assert not any(SHIFT_FLAG in r["flag"] for r in rows)

    assert main(base) == 2  # the sidecar exists: never silently replaced (an existing output is bad usage)
    t = float(np.median(scores))
    assert main([*base, "--threshold", f"{t}", "--overwrite"]) == 0
    rows = _predict(model_copy, tmp_path / "b.csv", images)
    got = [SHIFT_FLAG in r["flag"] for r in rows]
    assert got == [float(r["shift_score"]) >= t - 5e-4 for r in rows]  # the CSV rounds to 3 decimals
    assert any(got) and not all(got)
    doc = rule.meta
    assert doc["n_train"] > 0 and doc["threshold_from"] == "none"


def test_threshold_from_a_crossval_run(model_copy: Path, trained_run: Path, tmp_path: Path) -> None:
    cv = tmp_path / "cv"
    cv.mkdir()
    (cv / "metrics.json").write_text(json.dumps({"shift_flag": {"threshold": 1.25}}))
    out = tmp_path / "s.shift.safetensors"
    args = _fit_args(model_copy, trained_run, "--out", str(out))
    assert main([*args, "--crossval", str(cv)]) == 0
    rule = load_sidecar(out, Predictor(model_copy, "cpu", ood=False).model)
    assert rule.threshold == pytest.approx(1.25) and rule.meta["threshold_from"] == "crossval cv"
    (cv / "metrics.json").write_text(json.dumps({"flag": {}}))
    assert main([*args, "--crossval", str(cv), "--overwrite"]) == 2  # says which file lacks it


def test_a_sidecar_of_another_network_or_a_broken_one_is_refused(
    model_copy: Path, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    other = tmp_path / "other.safetensors"
    shutil.copy(model_copy, other)
    side = sidecar_path(other)
    fit = _fit_args(model_copy, trained_run, "--out", str(side))
    assert main(fit) == 0
    assert Predictor(other, "cpu", ood=False).shift is not None  # same tensors: it belongs to this one too
    model = Predictor(model_copy, "cpu", ood=False).model
    assert model is not None
    with torch.no_grad():
        next(p for p in model.parameters() if p.is_floating_point()).add_(1.0)  # another network
    with pytest.raises(ShiftError, match="another network"):
        load_sidecar(side, model)
    side.write_bytes(b"\x00" * 64)
    with pytest.raises(ShiftError, match="not a readable shift-score sidecar"):
        load_sidecar(side, Predictor(model_copy, "cpu", ood=False).model)
    capsys.readouterr()
    img = sample_images("test")[0]
    rc = main(["predict", str(img), "--checkpoint", str(other), "--out", str(tmp_path / "p.csv")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other.shift.safetensors" in err[0] and "sidecar" in err[0]
