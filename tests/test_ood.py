"""The OOD guard: accepts real chest X-rays, rejects photos, text, noise, blank, rotated and inverted images;
and predict marks flagged inputs ``not_cxr`` with an ``ood_score`` while still reporting probabilities."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import sample_images
from xraydx.io import read_image
from xraydx.ood import (
    COLOURFUL_MAX,
    OODError,
    OODGuard,
    OODResult,
    colourfulness,
    colourfulness_of_bytes,
    colourfulness_of_file,
    lung_signals,
)

GRACE_HOPPER = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
MIN_ACCEPT = 0.95  # of the sample's real test-split CXRs (the full benchmark: docs/lungs_and_ood.md)


@pytest.fixture(scope="module")
def guard() -> OODGuard:
    return OODGuard.default()


def _text_page(w: int = 850, h: int = 1100) -> np.ndarray:
    im = Image.new("L", (w, h), 250)
    dr = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=22)
    for i in range(40):
        dr.text(
            (40, 30 + 26 * i),
            f"line {i}: findings impression no acute cardiopulmonary process",
            fill=10,
            font=font,
        )
    return np.asarray(im)


def test_accepts_real_cxrs(guard: OODGuard) -> None:
    paths = sample_images("test")
    results = guard.check_many([read_image(p) for p in paths], [colourfulness_of_file(p) for p in paths])
    accepted = [r.is_cxr for r in results]
    assert np.mean(accepted) >= MIN_ACCEPT, [
        (p.name, r.reasons) for p, r in zip(paths, results, strict=True) if not r.is_cxr
    ]
    for r in results:
        assert isinstance(r, OODResult) and r.mask is not None
        assert r.is_cxr == (r.score <= 1.0) and r.is_cxr == (not r.reasons)
        d = r.to_dict()
        assert set(d) == {"is_cxr", "score", "reasons", "details"}


def test_rejects_a_photo_in_colour_and_in_gray(guard: OODGuard) -> None:
    col = colourfulness_of_file(GRACE_HOPPER)
    assert col is not None and col > COLOURFUL_MAX
    r = guard.check_file(GRACE_HOPPER)
    assert not r.is_cxr and r.score > 1 and any("colour" in s for s in r.reasons)
    gray = guard.check(read_image(GRACE_HOPPER))  # without the colour signal, the image alone must do
    assert not gray.is_cxr, gray


def test_rejects_text_noise_and_blank(guard: OODGuard) -> None:
    rng = np.random.default_rng(0)
    cases = {
        "text": _text_page(),
        "inverse text": 255 - _text_page(800, 600),
        "uniform noise": rng.integers(0, 256, (512, 512), dtype=np.uint8),
        "gaussian noise": np.clip(rng.normal(128, 40, (300, 400)), 0, 255).astype(np.uint8),
        "blank": np.zeros((256, 256), np.uint8),
        "gray": np.full((400, 400), 128, np.uint8),
    }
    for name, img in cases.items():
        r = guard.check(img)
        assert not r.is_cxr, (name, r)
    assert any("blank" in s for s in guard.check(cases["gray"]).reasons)


def test_rejects_rotated_and_inverted_cxrs(guard: OODGuard) -> None:
    """Inverted (bone dark) is flagged by design: DICOM MONOCHROME1 is already inverted by xraydx.io."""
    imgs = [read_image(p) for p in sample_images("test")[::6]]
    accepted_orig = [r.is_cxr for r in guard.check_many(imgs)]
    variants = [np.ascontiguousarray(np.rot90(i, k)) for i in imgs for k in (1, 2, 3)] + [
        255 - i for i in imgs
    ]
    flagged = [not r.is_cxr for r in guard.check_many(variants)]
    assert sum(accepted_orig) >= len(imgs) - 1
    assert np.mean(flagged) >= 0.9, flagged


def test_colourfulness() -> None:
    gray = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert colourfulness(gray) == 0.0
    red = np.zeros((10, 10, 3), np.uint8)
    red[..., 0] = 255
    assert colourfulness(red) > 50
    assert colourfulness_of_file(sample_images("test")[0]) == 0.0  # 8-bit gray PNG
    assert colourfulness_of_bytes(b"not an image") is None
    assert colourfulness_of_bytes(GRACE_HOPPER.read_bytes()) == pytest.approx(
        colourfulness_of_file(GRACE_HOPPER)
    )


def test_lung_signals() -> None:
    m = np.zeros((100, 100), np.float32)
    m[20:80, 10:40] = 1
    m[20:75, 60:90] = 1
    s = lung_signals(m)
    assert s["components"] == 2 and s["side_by_side"] > 0.9 and 0.3 < s["lung_fraction"] < 0.4
    stacked = np.zeros((100, 100), np.float32)
    stacked[5:40, 20:80] = 1
    stacked[60:95, 20:80] = 1
    assert lung_signals(stacked)["side_by_side"] == 0.0  # one above the other: a rotated chest


def test_guard_refuses_statistics_of_another_segmenter(tmp_path: Path, guard: OODGuard) -> None:
    from safetensors.torch import load_file

    from xraydx.ood import DEFAULT_GUARD, save_guard

    meta = dict(guard.meta)
    meta["segmenter_sha256_16"] = "0" * 16
    bad = tmp_path / "ood.safetensors"
    save_guard(
        bad, load_file(str(DEFAULT_GUARD)), {k: v for k, v in meta.items() if k not in ("format", "kind")}
    )
    with pytest.raises(OODError, match="refit"):
        OODGuard.load(bad, guard.segmenter)
    with pytest.raises(OODError, match="not OOD-guard statistics"):
        OODGuard.load(guard.segmenter.path, guard.segmenter)  # type: ignore[arg-type]


def test_predict_marks_non_cxrs(tmp_path: Path) -> None:
    from xraydx.models import create_model, save_checkpoint
    from xraydx.predict import Predictor
    from xraydx.predwrite import write_predictions
    from xraydx.transforms import Preprocessing

    ck = tmp_path / "clf.safetensors"
    save_checkpoint(
        ck,
        create_model("test_resnet", 3, pretrained="none"),
        {
            "classes": ["covid", "non_covid", "normal"],
            "architecture": {"name": "test_resnet", "in_chans": 1},
            "preprocessing": Preprocessing(size=64).to_dict(),
        },
    )
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)).save(noise)
    real = sample_images("test")[0]
    pred = Predictor(ck, "cpu")
    rows = {Path(p.path).name: p for p in pred.predict_files([real, noise, GRACE_HOPPER], progress=False)}
    assert rows[real.name].status == "ok"
    for name in ("noise.png", GRACE_HOPPER.name):
        p = rows[name]
        assert p.status == "not_cxr" and p.probs is not None and len(p.probs) == 3
        assert float(p.extra["ood_score"]) > 1 and p.extra["ood"]["reasons"]
    out = tmp_path / "pred.csv"
    counts = write_predictions(rows.values(), out, pred.classes, model_id=pred.model_id)
    assert counts["ok"] == 3 and counts["not_cxr"] == 2
    with open(out, encoding="utf-8", newline="") as fh:
        got = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert got["noise.png"]["status"] == "not_cxr" and float(got["noise.png"]["ood_score"]) > 1
    assert got["noise.png"]["prob_covid"] != ""
    # issue 17 item 3: a script that keeps the rows with an empty flag never accepts a non-X-ray
    assert got["noise.png"]["flag"] == got[GRACE_HOPPER.name]["flag"] == "not a frontal chest X-ray"
    assert got["noise.png"]["ood_reason"]
    assert float(got[real.name]["ood_score"]) <= 1
    off = Predictor(ck, "cpu", ood=False)
    assert all(p.status == "ok" for p in off.predict_files([noise], progress=False))
