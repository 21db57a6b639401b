"""Test-time augmentation (xraydx.tta) on real images from the bundled sample: the views are the fixed
shifts / zooms it names, the logits are their mean on every engine path, and a crossval can re-predict
another run's fold models with it (``--reuse-folds``) without training."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import sample_images
from xraydx import tta
from xraydx.io import read_image
from xraydx.transforms import Preprocessing, preprocess

SIZE = 100  # the shifts are whole pixels at this size


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    spec = Preprocessing(size=SIZE)
    return np.stack([preprocess(read_image(p), spec) for p in sample_images("test")[:6]])


def test_views_are_the_named_shifts_and_zooms(images: np.ndarray) -> None:
    vs = tta.views(images, "affine")
    assert len(vs) == len(tta.AFFINE_VIEWS) == tta.n_views("affine")
    assert tta.views(images, "none")[0] is images and tta.n_views("none") == 1
    for (scale, sx, sy), v in zip(tta.AFFINE_VIEWS, vs, strict=True):
        assert v.shape == images.shape and v.dtype == np.uint8
        if (scale, sx, sy) == (1.0, 0.0, 0.0):
            assert np.array_equal(v, images)
            continue
        assert not np.array_equal(v, images)
        if scale == 1.0:  # content moves by the shift (whole pixels at this size), in its direction
            dx, dy = round(sx * SIZE), round(sy * SIZE)
            assert (dx, dy) != (0, 0) and abs(dx - sx * SIZE) < 1e-6 and abs(dy - sy * SIZE) < 1e-6
            moved = np.roll(images, (dy, dx), axis=(1, 2))
            inner = (slice(None), slice(max(dy, 0), SIZE + min(dy, 0)), slice(max(dx, 0), SIZE + min(dx, 0)))
            assert np.abs(v[inner].astype(int) - moved[inner]).max() <= 1
        else:  # a zoom keeps the centre; zooming out leaves a black frame, zooming in fills the frame
            edge = lambda x: np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # noqa: E731
            if scale < 1:
                assert (edge(v) == 0).all()
            else:
                assert edge(v).mean() > 0


def test_mean_logits_is_the_mean_over_the_views(images: np.ndarray) -> None:
    def run(u8: np.ndarray) -> np.ndarray:  # any deterministic function of the pixels
        x = u8.reshape(len(u8), -1).astype(np.float64)
        return np.stack([x.mean(1), x[:, : x.shape[1] // 2].mean(1), x.std(1)], 1)

    want = np.mean([run(v) for v in tta.views(images, "affine")], axis=0)
    np.testing.assert_allclose(tta.mean_logits(run, images, "affine"), want, rtol=1e-5)
    np.testing.assert_allclose(tta.mean_logits(run, images, "none"), run(images))
    with pytest.raises(ValueError, match="tta must be one of"):
        tta.views(images, "flip")


def test_predictor_applies_the_override_on_both_engines_and_says_so_in_model_id(checkpoint: Path) -> None:
    from xraydx.engines import softmax
    from xraydx.predict import Predictor

    plain = Predictor(checkpoint, "cpu", ood=False)
    aug = Predictor(checkpoint, "cpu", ood=False, tta="affine")
    spec = plain.spec
    imgs = np.stack([preprocess(read_image(p), spec) for p in sample_images("test")[:5]])
    want = softmax(
        np.mean([plain.classifier.batch_logits(v) for v in tta.views(imgs, "affine")], axis=0),
        plain.temperature,
    )
    np.testing.assert_allclose(aug.probs(imgs), want, atol=1e-5)
    assert not np.allclose(aug.probs(imgs), plain.probs(imgs), atol=1e-4)
    assert plain.model_id.split("-")[-1] == aug.model_id.split("-")[-1]
    assert "+tta_affine-" in aug.model_id and "+tta" not in plain.model_id
    pytest.importorskip("onnxruntime")
    onnx = Predictor(checkpoint, "cpu", engine="onnx", ood=False, tta="affine")
    np.testing.assert_allclose(onnx.probs(imgs), aug.probs(imgs), atol=1e-3)


def test_a_checkpoint_trained_with_tta_predicts_with_it(trained_run: Path, tmp_path: Path) -> None:
    """data.tta is written into the checkpoint's preprocessing; every reader (evaluate, predict, serve)
    then averages the views without being told."""
    from xraydx.checkpoint import read_metadata
    from xraydx.predict import Predictor

    meta = read_metadata(trained_run / "checkpoints" / "best.safetensors")
    assert meta["preprocessing"]["tta"] == "none"
    assert Preprocessing.from_dict({**meta["preprocessing"], "tta": "affine"}).tta == "affine"
    pred = Predictor(trained_run / "checkpoints" / "best.safetensors", "cpu", ood=False, tta="none")
    assert "+tta" not in pred.model_id  # the checkpoint's own setting: no suffix


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_crossval_reuses_another_runs_fold_models_with_tta(
    tmp_path: Path, cv_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xraydx.cli import main

    src = cv_run  # the shared tiny crossval (conftest)
    ckpts = {p: p.stat().st_mtime_ns for p in src.rglob("*.safetensors")}
    reuse = ["crossval", "--reuse-folds", str(src), "-q"]
    assert main([*reuse, "--runs-dir", str(tmp_path), "--name", "cv-tta", "--set", "data.tta=affine"]) == 0
    new = tmp_path / "cv-tta"
    assert not list(new.rglob("*.safetensors"))  # nothing trained: the fold models are the other run's
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*.safetensors")} == ckpts
    a = {r["path"]: r for r in _rows(src / "predictions.csv")}
    b = {r["path"]: r for r in _rows(new / "predictions.csv")}
    assert a.keys() == b.keys()
    assert any(abs(float(a[k]["prob_covid"]) - float(b[k]["prob_covid"])) > 1e-4 for k in a)
    assert all(a[k]["fold"] == b[k]["fold"] for k in a)
    import json

    m = json.loads((new / "metrics.json").read_text())
    assert m["recipe"]["tta"] == "affine" and m["recipe"]["trained_from"] == str(src.resolve())
    # a setting that changes training cannot reuse the fold models; the other run's own name is taken
    assert main([*reuse, "--runs-dir", str(tmp_path), "--name", "cv-lr", "--set", "train.lr=0.1"]) == 2
    assert "train.lr" in capsys.readouterr().err and not (tmp_path / "cv-lr").exists()
    assert main([*reuse, "--set", "data.tta=affine"]) == 2  # no --name, no --runs-dir: the other run's own
    assert "already exists" in capsys.readouterr().err
    assert main(["crossval", "--reuse-folds", str(tmp_path), "--name", "x", "-q"]) == 2
    assert "not a crossval run folder" in capsys.readouterr().err
