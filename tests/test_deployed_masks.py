"""evaluate (and audit) measure the deployed pipeline: a lung-crop model's images cropped with the shipped
segmenter's masks, as predict and serve crop them; `--masks dataset` is the explicit other choice; a run
trained with dataset masks reports both figures (issue 17 item 5)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import sample_images, tiny_config
from xraydx.audit import prior_lung_mask
from xraydx.cli import main
from xraydx.constants import CLASSES
from xraydx.errors import EXIT_OK
from xraydx.predict import load_lung_segmenter

pytestmark = pytest.mark.skipif(load_lung_segmenter() is None, reason="needs the shipped lung segmenter")


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sample as a CSV manifest whose every image has a dataset lung mask (the two-ellipse prior, which
    is not what the segmenter draws), and a tiny lung_mask=crop model trained on it."""
    from xraydx.train import run_training

    root = tmp_path_factory.mktemp("masked")
    Image.fromarray(prior_lung_mask(224, 224)).save(root / "lungs.png")
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "mask"])
        for split in ("train", "val", "test"):
            for c in CLASSES:
                for p in sample_images(split, c):
                    w.writerow([str(p), c, split, "lungs.png"])
    cfg = tiny_config(root / "manifest.csv", tmp_path_factory.mktemp("runs"), epochs=1, augment="none")
    cfg.data.lung_mask = "crop"
    return root / "manifest.csv", run_training(cfg, progress=False)


def _probs(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as fh:
        return {
            r["path"]: [float(r[f"prob_{c}"]) for c in CLASSES]
            for r in csv.DictReader(fh)
            if r["status"] == "ok"
        }


def test_training_with_dataset_masks_reports_the_deployed_figures(masked_run: tuple[Path, Path]) -> None:
    _, run = masked_run
    m = json.loads((run / "metrics.json").read_text())
    assert m["test_deployed"]["n"] == m["test"]["n"] == 30 and m["test_deployed"]["masks"].startswith(
        "segmenter"
    )
    log = (run / "train.log").read_text()
    assert "predict, serve and evaluate crop with the shipped segmenter's" in log and "as deployed" in log


def test_evaluate_measures_what_predict_predicts(masked_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = masked_run
    ckpt = run / "checkpoints" / "best.safetensors"
    base = ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "-q"]
    assert main([*base, "--out", str(tmp_path / "deployed")]) == EXIT_OK
    assert main([*base, "--out", str(tmp_path / "dataset"), "--masks", "dataset"]) == EXIT_OK
    files = [str(p) for c in CLASSES for p in sample_images("test", c)]
    assert main(["predict", "--checkpoint", str(ckpt), *files, "--out", str(tmp_path / "p.csv"), "-q"]) in (
        0,
        3,
    )
    predicted = _probs(tmp_path / "p.csv")
    deployed = _probs(tmp_path / "deployed" / "predictions.csv")
    assert predicted and set(predicted) <= set(deployed)
    for path, p in predicted.items():
        assert deployed[path] == pytest.approx(p, abs=2e-6), path
    own = _probs(tmp_path / "dataset" / "predictions.csv")
    assert any(own[k] != pytest.approx(p, abs=2e-6) for k, p in predicted.items())  # the other crop
    assert json.loads((tmp_path / "deployed" / "metrics.json").read_text())["masks"] == "segmenter"
    assert json.loads((tmp_path / "dataset" / "metrics.json").read_text())["masks"] == "dataset"
