"""DICOM pixels through the whole prediction pipeline (issue 16 item 9, issue 17 item 9): an 8-bit DICOM gives
the probabilities of the same pixels as a PNG; a 16-bit DICOM without a window whose few extreme pixels would
wash a min-max stretch out predicts like the clean image; PresentationLUTShape INVERSE is read as the viewer
shows it. The shipped default model, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from badfiles import dx_dataset
from dicomfiles import DEFAULT_CHECKPOINT
from PIL import Image

from conftest import sample_images


def _dcm(path: Path, arr: np.ndarray, bits_stored: int, **elements: object) -> Path:
    ds = dx_dataset()
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def predictor():  # -> xraydx.predict.Predictor
    from xraydx.predict import Predictor

    return Predictor(DEFAULT_CHECKPOINT, "cpu")


def _probs(predictor, paths: list[Path]) -> list[np.ndarray]:
    preds = list(predictor.predict_files(paths, progress=False))
    assert all(p.probs is not None for p in preds), [p.status for p in preds]
    return [np.asarray(p.probs) for p in preds]


def test_same_pixels_as_png_and_8bit_dicom_give_the_same_probabilities(predictor, tmp_path: Path) -> None:
    src = sample_images("test", "normal")[0]
    low = (np.asarray(Image.open(src).convert("L"), dtype=np.uint8) // 2 + 40).astype(np.uint8)  # not 0..255
    png = tmp_path / "low.png"
    Image.fromarray(low).save(png)
    dcm = _dcm(tmp_path / "low.dcm", low, 8)
    p_png, p_dcm = _probs(predictor, [png, dcm])
    np.testing.assert_allclose(p_dcm, p_png, atol=1e-6)


def test_16bit_dicom_without_window_and_extreme_pixels_predicts_like_the_clean_image(
    predictor, tmp_path: Path
) -> None:
    results = []
    for src in [sample_images("test", c)[0] for c in ("covid", "non_covid", "normal")]:
        d12 = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 16
        spiked = d12.copy()
        spiked[:2, :8] = 65535  # a burnt-in marker / dead line far above the chest's values
        results.append(
            _probs(predictor, [_dcm(tmp_path / "c.dcm", d12, 12), _dcm(tmp_path / "s.dcm", spiked, 16)])
        )
    for clean, spiked in results:
        assert np.abs(spiked - clean).max() < 0.1, (clean, spiked)


def test_presentation_lut_inverse_dicom_is_a_chest_xray(predictor, tmp_path: Path) -> None:
    src = sample_images("test", "normal")[0]
    d12 = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 16
    upright = _dcm(tmp_path / "upright.dcm", d12, 12)
    inverse = _dcm(tmp_path / "inverse.dcm", 4095 - d12, 12, PresentationLUTShape="INVERSE")
    preds = list(predictor.predict_files([upright, inverse], progress=False))
    assert [p.status for p in preds] == ["ok", "ok"]
    np.testing.assert_allclose(preds[1].probs, preds[0].probs, atol=0.02)


def test_guard_rejection_of_a_dicom_without_window_points_at_windowing(predictor, tmp_path: Path) -> None:
    from xraydx.ood import DEFAULT_WINDOW_HINT

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 4096, (128, 128)).astype(np.uint16)  # not a chest X-ray whatever the window
    Image.fromarray((noise // 16).astype(np.uint8)).save(tmp_path / "noise.png")
    paths = [
        _dcm(tmp_path / "nowindow.dcm", noise, 12),
        _dcm(tmp_path / "window.dcm", noise, 12, WindowCenter=2048, WindowWidth=4096),
        tmp_path / "noise.png",
    ]
    preds = list(predictor.predict_files(paths, progress=False))
    assert [p.status for p in preds] == ["not_cxr"] * 3
    hinted = [DEFAULT_WINDOW_HINT in p.extra["ood"]["reasons"] for p in preds]
    assert hinted == [True, False, False]
