"""Grad-CAM: it finds the region that decides the class on a task built here; overlays; explain and
predict --heatmaps through the command line."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL, sample_images
from xraydx.cli import EXIT_OK, EXIT_PARTIAL, main
from xraydx.explain import GradCAM, heat_png, lung_share, overlay, overlay_png
from xraydx.models import create_model
from xraydx.transforms import Preprocessing, normalize

S = 64
SPEC = Preprocessing(size=S, mean=0.5, std=0.25)


def _square_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images; class 0 has a bright 12 px square in the left half, class 1 in the right half,
    class 2 none (so each square class needs its own positive evidence). Returns images, labels and a
    mask of the half that holds the square (empty for class 2)."""
    imgs = rng.normal(90, 25, size=(n, S, S)).clip(0, 255)
    labels = rng.integers(0, 3, n)
    halves = np.zeros((n, S, S), dtype=bool)
    for i, c in enumerate(labels):
        if c == 2:
            continue
        x0 = rng.integers(2, S // 2 - 14) + (S // 2 if c else 0)
        y0 = rng.integers(2, S - 14)
        imgs[i, y0 : y0 + 12, x0 : x0 + 12] = 230
        halves[i, :, S // 2 :] = bool(c)
        halves[i, :, : S // 2] = not c
    return imgs.astype(np.uint8), labels, halves


@pytest.fixture(scope="module")
def square_model() -> Iterator[torch.nn.Module]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a training fixture may have left 2 threads set; on a busy CPU 1 is far faster
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model(TINY_MODEL, 3, pretrained="none")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        x, y, _ = _square_images(32, rng)
        loss = torch.nn.functional.cross_entropy(model(normalize(torch.from_numpy(x), SPEC.mean, SPEC.std)),
                                                 torch.from_numpy(y))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    yield model.eval()


def test_gradcam_highlights_the_deciding_square(square_model: torch.nn.Module) -> None:
    rng = np.random.default_rng(123)
    x, y, halves = _square_images(60, rng)
    cam = GradCAM(square_model, SPEC)
    heats, probs = cam.batch(x, y)
    assert (probs.argmax(1) == y).mean() >= 0.9  # the model learned the task, so its CAM means something
    assert heats.shape == (60, S, S) and heats.dtype == np.float32
    assert heats.min() >= 0.0 and heats.max() <= 1.0
    sq = y < 2
    shares = np.array([lung_share(h, m) for h, m in zip(heats[sq], halves[sq], strict=True)])
    # a 64 px input gives test_resnet a 2 x 2 feature map: even a perfect map puts ~12% on the other half
    assert np.nanmean(shares[y[sq] == 0]) > 0.6, shares
    assert np.nanmean(shares[y[sq] == 1]) > 0.6, shares
    # the single-image API agrees with the batch
    h0, p0 = cam(x[0], int(y[0]))
    np.testing.assert_allclose(h0, heats[0], atol=1e-5)
    np.testing.assert_allclose(p0, probs[0], atol=1e-5)
    # default class = the predicted one
    h_pred, _ = cam(x[0])
    np.testing.assert_allclose(h_pred, cam(x[0], int(probs[0].argmax()))[0], atol=1e-6)


def test_gradcam_probs_use_the_temperature(square_model: torch.nn.Module) -> None:
    x, _, _ = _square_images(1, np.random.default_rng(5))
    _, p1 = GradCAM(square_model, SPEC)(x[0])
    _, p3 = GradCAM(square_model, SPEC, temperature=3.0)(x[0])
    with torch.no_grad():
        logits = square_model(normalize(torch.from_numpy(x), SPEC.mean, SPEC.std))[0]
    np.testing.assert_allclose(p3, torch.softmax(logits / 3.0, 0).numpy(), atol=1e-5)
    assert p3.max() < p1.max()


def test_gradcam_on_other_architectures() -> None:
    img = np.random.default_rng(0).integers(0, 255, (S, S), dtype=np.uint8)
    plain = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()  # fmt: skip
    vit = create_model("test_vit", 3, pretrained="none").eval()
    for model in (plain, vit):
        heats, probs = GradCAM(model, SPEC).all_classes(img)
        assert heats.shape == (3, S, S) and np.isfinite(heats).all()
        assert probs.shape == (3,) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        GradCAM(plain, SPEC).batch(np.zeros((1, S, S), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        GradCAM(plain, SPEC)(img, 7)


def test_lung_share() -> None:
    heat = np.zeros((S, S), np.float32)
    heat[:, : S // 2] = 1.0
    left = np.zeros((16, 16), np.uint8)
    left[:, :8] = 255  # a mask at another size
    assert lung_share(heat, left) == pytest.approx(1.0)
    assert lung_share(heat, 255 - left) == pytest.approx(0.0)
    assert lung_share(heat, np.ones((S, S), bool)) == pytest.approx(1.0)
    assert np.isnan(lung_share(np.zeros((S, S)), left))


def test_explain_draws_with_render() -> None:
    """explain's overlay names are render's encoders (serve and older callers import them from explain)."""
    from xraydx import render

    assert overlay is render.heat_overlay and overlay_png is render.heat_overlay_png
    assert heat_png is render.heat_png


def _rows(p: Path) -> list[dict[str, str]]:
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


def test_explain_cli(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    imgs = sample_images("test")[:2]
    for p in imgs:
        shutil.copy(p, src / p.name)
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "cam"
    assert (
        main(["explain", str(src), "--checkpoint", str(checkpoint), "--out", str(out), "-q"]) == EXIT_PARTIAL
    )
    rows = {Path(r["path"]).name: r for r in _rows(out / "explain.csv")}
    assert rows["broken.png"]["status"].startswith("error: ")
    for p in imgs:
        r = rows[p.name]
        assert r["status"] == "ok" and r["overlay"] == f"{p.stem}__{r['prediction']}.png"
        png = Image.open(out / r["overlay"])
        assert png.mode == "RGB" and png.size == (64, 64)
    assert len(list(out.glob("*.png"))) == 2
    # refuses to overwrite; --all-classes writes one overlay per class
    assert main(["explain", str(src), "--checkpoint", str(checkpoint), "--out", str(out), "-q"]) != EXIT_OK
    capsys.readouterr()
    assert main(["explain", str(imgs[0]), "--checkpoint", str(checkpoint), "--out", str(out), "-q",
                 "--all-classes", "--overwrite"]) == EXIT_OK  # fmt: skip
    assert {p.name for p in out.glob(f"{imgs[0].stem}__*.png")} == {
        f"{imgs[0].stem}__{c}.png" for c in ("covid", "non_covid", "normal")
    }
    # the summary counts the overlays written (3 for one image with --all-classes), not the images
    assert "wrote 3 Grad-CAM overlays of 1 images" in capsys.readouterr().out


def test_predict_heatmaps_and_flag(checkpoint: Path, tmp_path: Path) -> None:
    imgs = sample_images("val")[:3]
    out, maps = tmp_path / "pred.csv", tmp_path / "maps"
    code = main(["predict", *map(str, imgs), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--heatmaps", str(maps), "-q"])  # fmt: skip
    assert code == EXIT_OK
    rows = _rows(out)
    assert "flag" in rows[0] and "heatmap" in rows[0]
    for r in rows:
        assert r["heatmap"] == f"{Path(r['path']).stem}__{r['prediction']}.png"
        assert (maps / r["heatmap"]).is_file()
        assert r["flag"] in ("", "uncertain: refer to a radiologist")


def test_explain_marks_inputs_that_are_not_chest_xrays(checkpoint: Path, tmp_path: Path) -> None:
    import csv

    import numpy as np
    from PIL import Image

    from xraydx.explain import explain_files

    noise = tmp_path / "in" / "noise.png"
    noise.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)).save(noise)
    real = sample_images("test")[0]
    explain_files(checkpoint, [str(noise), str(real)], tmp_path / "out", progress=False)
    with open(tmp_path / "out" / "explain.csv", newline="") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert rows["noise.png"]["status"] == "not_cxr" and float(rows["noise.png"]["ood_score"]) > 1.0
    assert rows[real.name]["status"] == "ok"
