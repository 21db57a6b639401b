"""The shortcut audit: its masks, its verdict rules, and that it catches a planted shortcut (a white block in
a class-specific corner) that a lung-only model (--lung-mask mask) cannot read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import sample_images, tiny_config
from xraydx.audit import (
    BORDER_DROP,
    HIDDEN_MARGIN,
    aligned_lungs,
    border_mask,
    load_audit_data,
    model_name,
    prior_lung_mask,
    run_audit,
    variant,
    verdict,
)
from xraydx.cli import EXIT_OK, main
from xraydx.data import Record
from xraydx.io import ImageReadError, read_image
from xraydx.models import read_metadata
from xraydx.predict import Predictor, load_lung_segmenter
from xraydx.report import audit_name
from xraydx.transforms import Preprocessing, preprocess

CLASSES = ("covid", "non_covid", "normal")
CORNERS = {"covid": (0, 0), "non_covid": (0, 1), "normal": (1, 0)}  # (bottom?, right?) per class
MARK = 30  # px of the 224 px sample images: inside the 20% corner squares the audit blanks


def test_prior_lung_mask_is_a_plausible_lung_field() -> None:
    m = prior_lung_mask(200, 160) > 0
    assert m.shape == (200, 160)
    assert 0.3 < m.mean() < 0.5  # lungs cover about a third of a frontal CXR
    assert not m[:, 78:82].any()  # the mediastinum between the two lungs is outside
    assert m[90, 45] and m[95, 115]  # the centre of each lung is inside
    assert not m[:10].any() and not m[-20:].any()


def test_border_mask_by_hand() -> None:
    b = border_mask(100, border=0.1, corner=0.2)
    assert b[0, 50] and b[95, 50] and b[50, 3] and b[50, 97]  # the band
    assert b[15, 15] and b[15, 85] and b[85, 15] and b[85, 85]  # the corners, deeper than the band
    assert not b[15, 50] and not b[50, 15] and not b[50, 50]
    assert b.sum() == 100 * 100 - 80 * 80 + 4 * (20 * 20 - 10 * 10 - 2 * 10 * 10)


def test_aligned_lungs_follow_the_lung_crop() -> None:
    mask = np.zeros((100, 200), np.uint8)
    mask[20:80, 40:160] = 255
    none = aligned_lungs(mask, (100, 200), Preprocessing(size=50))
    assert none.mean() == pytest.approx(0.6 * 0.6, abs=0.03)
    crop = aligned_lungs(mask, (100, 200), Preprocessing(size=50, lung_mask="crop"))
    assert crop.mean() > 0.7  # the crop keeps the lung box and a small margin
    both = aligned_lungs(mask, (100, 200), Preprocessing(size=50, lung_mask="crop_mask"))
    assert np.array_equal(both, crop)  # crop_mask cuts the same box
    small = aligned_lungs(mask[::2, ::2], (100, 200), Preprocessing(size=50))  # masks of another size
    assert (small == none).mean() > 0.97


def test_border_mask_of_a_rectangle() -> None:
    b = border_mask((100, 200), border=0.05, corner=0.2)
    assert b.shape == (100, 200)
    assert b[4, 100] and not b[5, 100]  # the band: 5% of the height at top
    assert b[50, 9] and not b[50, 10]  # and 5% of the width at the sides
    assert b[19, 19] and not b[19, 20] and not b[20, 19]  # corner squares: 20% of the shorter side
    assert b[80, 180] and not b[79, 180]


def test_border_is_blanked_on_the_original_image_not_inside_a_lung_crop(tmp_path: Path) -> None:
    """For a lung_mask=crop model the preprocessed image is the lung box: blanking its border cut lung.
    The audit blanks the original's border and then applies the model's own preprocessing."""
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (200, 200)).astype(np.uint8)
    mask = np.zeros((200, 200), np.uint8)
    mask[60:140, 50:150] = 255  # lungs well inside the 12% band and the 20% corners
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rec = Record(tmp_path / "img.png", "normal", "test", "g", mask=tmp_path / "mask.png")
    spec = Preprocessing(size=64, lung_mask="crop")
    d = load_audit_data([rec], spec, CLASSES, masks="dataset")
    base, blanked = variant(d, "baseline"), variant(d, "border_blanked")
    np.testing.assert_array_equal(base[0], preprocess(img, spec, mask))
    np.testing.assert_array_equal(blanked, base)  # nothing of the lung box was blanked
    # a full-image model sees the blanked border (about the band's share of its input is black)
    full = load_audit_data([rec], Preprocessing(size=64), CLASSES, masks="dataset")
    black = (variant(full, "border_blanked")[0] == 0).mean()
    assert black > 0.3 and (variant(full, "baseline")[0] == 0).mean() == 0


def test_the_shipped_model_is_named_by_its_run_and_id_not_its_folder() -> None:
    ckpt = Path(__file__).resolve().parents[1] / "src" / "xraydx" / "weights" / "default.safetensors"
    meta = read_metadata(ckpt)
    assert model_name(ckpt, meta) == meta["config"]["name"]
    label = audit_name(
        {"checkpoint": str(ckpt), "name": model_name(ckpt, meta), "model_id": "m-1", "lung_mask": "crop"}
    )
    assert (
        label.startswith(f"{meta['config']['name']} [m-1]")
        and "xraydx" not in label
        and "weights" not in label
    )
    assert audit_name({"checkpoint": "runs/x/checkpoints/best.safetensors", "lung_mask": "none"}).startswith(
        "best"
    )


def _audit(
    base: float, hidden: float, border: float, only: float, share: float, ci: float = 0.05, n: int = 300
) -> dict:
    def v(b: float) -> dict:
        return {
            "balanced_accuracy": b,
            "accuracy": b,
            "macro_f1": b,
            "ci": {"balanced_accuracy": [b - ci, b + ci]},
        }

    return {
        "chance": 1 / 3,
        "n": n,
        "variants": {
            "baseline": v(base),
            "lungs_hidden": v(hidden),
            "border_blanked": v(border),
            "lungs_only": v(only),
        },
        "saliency": {"mean_lung_share": share, "mean_lung_share_ci": [share - ci, share + ci]},
        "lung_field": {"dataset": 10},
    }


def test_verdict_rules() -> None:
    chance = 1 / 3
    far = chance + HIDDEN_MARGIN + 0.1
    r = verdict(_audit(0.9, far, 0.88, 0.85, 0.7))
    assert r["level"] == "shortcut" and r["text"].startswith(
        "Reads shortcuts: with the lungs hidden it still scores"
    )
    assert "far above chance 0.33" in r["text"]
    r = verdict(_audit(0.9, 0.35, 0.9 - BORDER_DROP - 0.05, 0.85, 0.7))
    assert r["level"] == "shortcut" and "border and corners" in r["text"]
    r = verdict(_audit(0.9, 0.35, 0.88, 0.85, 0.3))
    assert r["level"] == "possible" and "Grad-CAM" in r["text"]
    r = verdict(_audit(0.9, far, 0.88, 0.85, 0.7, ci=0.2))  # above chance, but the CI reaches down to it
    assert r["level"] == "possible"
    r = verdict(_audit(0.9, 0.36, 0.87, 0.86, 0.7))
    assert r["level"] == "none_found" and r["text"].startswith("No shortcut found")
    assert verdict(_audit(0.36, 0.34, 0.33, 0.33, 0.7))["level"] == "inconclusive"


def test_verdicts_need_intervals_that_do_not_overlap() -> None:
    # n = 15: drops and shares beyond every threshold, but the intervals overlap -> no verdict from them
    wide = _audit(0.8, 0.5, 0.8 - BORDER_DROP - 0.05, 0.6, 0.45, ci=0.25, n=15)
    r = verdict(wide)
    assert r["level"] == "none_found", r
    assert "Not judged, because at n = 15 the 95% intervals overlap" in r["text"]
    assert "border and corners (0.80 to 0.60)" in r["text"] and "Grad-CAM" in r["text"]
    # the same point estimates with narrow intervals do fire
    assert verdict(_audit(0.8, 0.5, 0.8 - BORDER_DROP - 0.05, 0.6, 0.45, ci=0.03))["level"] == "shortcut"
    # no interval for the baseline at all: inconclusive, not a verdict from point estimates
    none = _audit(0.9, 0.9, 0.3, 0.3, 0.1)
    none["variants"]["baseline"]["ci"]["balanced_accuracy"] = None
    assert verdict(none)["level"] == "inconclusive"


# ---- the planted shortcut --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def marked_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample with a white block in a corner that depends on the class (a planted shortcut),
    as a CSV manifest whose every image has a lung mask (the two-ellipse prior, as a dataset mask)."""
    root = tmp_path_factory.mktemp("marked")
    (root / "img").mkdir()
    Image.fromarray(prior_lung_mask(224, 224)).save(root / "lungs.png")
    rows = []
    for split in ("train", "val", "test"):
        for c in CLASSES:
            for p in sample_images(split, c):
                img = read_image(p).copy()
                h, w = img.shape
                bottom, right = CORNERS[c]
                y0 = h - MARK - 3 if bottom else 3
                x0 = w - MARK - 3 if right else 3
                img[y0 : y0 + MARK, x0 : x0 + MARK] = 255
                name = f"{split}_{p.name}"
                Image.fromarray(img).save(root / "img" / name)
                rows.append([f"img/{name}", c, split, p.name.split("__")[0], "lungs.png"])
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "source", "mask"])
        w.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def marked_runs(marked_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny models on the marked data: one sees the whole image, one only the lungs."""
    from xraydx.train import run_training

    runs = tmp_path_factory.mktemp("marked_runs")
    out = {}
    for lung_mask, epochs in (("none", 8), ("mask", 2)):
        cfg = tiny_config(marked_data, runs, epochs=epochs, augment="none", threads=1)
        cfg.name = f"lung-{lung_mask}"
        cfg.data.lung_mask = lung_mask
        out[lung_mask] = run_training(cfg, progress=False) / "checkpoints" / "best.safetensors"
    return out


def test_audit_catches_a_planted_corner_marker(marked_runs: dict[str, Path], marked_data: Path) -> None:
    a = run_audit(marked_runs["none"], marked_data, "test", n_boot=300, masks="dataset")
    v = a["variants"]
    assert v["baseline"]["balanced_accuracy"] > 0.85  # the marker is easy to learn
    assert v["lungs_hidden"]["balanced_accuracy"] > 0.6  # it is outside the lungs (chance: 0.33)
    assert v["border_blanked"]["balanced_accuracy"] < v["baseline"]["balanced_accuracy"] - 0.3
    assert a["verdict"]["level"] == "shortcut" and a["verdict"]["text"].startswith("Reads shortcuts")
    assert a["lung_field"] == {"dataset": 30, "segmenter": 0, "prior": 0}
    assert 0.0 <= a["saliency"]["mean_lung_share"] <= 1.0
    assert a["n"] == 30 and set(a["examples"]) >= {"baseline", "lungs_hidden", "gradcam"}


def test_lung_only_model_is_trained_on_masks_and_does_not_read_the_marker(
    marked_runs: dict[str, Path], marked_data: Path
) -> None:
    meta = read_metadata(marked_runs["mask"])
    assert meta["preprocessing"]["lung_mask"] == "mask"
    a = run_audit(marked_runs["mask"], marked_data, "test", n_boot=300, masks="dataset")
    # with its input masked to the lungs it never saw the marker: hiding the border changes nothing
    assert a["variants"]["border_blanked"]["agreement_with_baseline"] > 0.9
    assert a["verdict"]["level"] != "shortcut"
    # at inference without a mask it needs the segmenter; without one it says so
    pred = Predictor(marked_runs["mask"], "cpu")
    img = read_image(sample_images("test")[0])
    if load_lung_segmenter() is None:
        with pytest.raises(ImageReadError, match="lung_mask=mask.*segmenter"):
            pred.prepare(img)
    else:
        assert pred.prepare(img).shape == (64, 64)
    assert pred.prepare(img, prior_lung_mask(*img.shape)).shape == (64, 64)


def test_audit_cli_compares_two_checkpoints(
    marked_runs: dict[str, Path], marked_data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "audit"
    args = ["audit", "--checkpoint", str(marked_runs["none"]), "--checkpoint", str(marked_runs["mask"]),
            "--data", str(marked_data), "--out", str(out), "--n-boot", "200", "-q"]  # fmt: skip
    assert main(args) == EXIT_OK
    doc = json.loads((out / "audit.json").read_text())
    assert [a["lung_mask"] for a in doc["audits"]] == ["none", "mask"]
    assert [a["name"] for a in doc["audits"]] == ["lung-none", "lung-mask"]  # the runs' names
    assert all(
        a["model_id"] and a["settings"]["border_blanked_on"].startswith("the original") for a in doc["audits"]
    )
    assert all("examples" not in a for a in doc["audits"])  # the images live in the HTML only
    html = (out / "audit.html").read_text()
    assert "<section id=audit>" in html and "Reads shortcuts" in html
    assert html.count('src="data:image/png;base64,') >= 10  # the examples of both models, not the first only
    assert "What is shown to model 1" in html and "What is shown to model 2" in html
    assert "in the <b>original</b> image" in html
    err = capfd.readouterr().err
    assert "Warning" not in err and "sklearn" not in err, err  # no library warning leaks into the output
    before = (out / "audit.json").read_bytes()
    assert main(args) != EXIT_OK  # refuses to overwrite
    assert (out / "audit.json").read_bytes() == before
