"""xraydx.engines: the three networks on onnxruntime give what PyTorch gives, to the one tolerance, and the
default pipeline (segmenter + OOD guard + classifier) predicts the same with ``--engine onnx``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import xraydx.engines as engines
import xraydx.onnxio as onnxio
from conftest import SAMPLE, sample_images
from xraydx.cli import main
from xraydx.constants import DEFAULT_CHECKPOINT
from xraydx.engines import PARITY_TOLERANCE, check_parity, lung_segmenter, probe_images, segmenter_networks
from xraydx.errors import ExportError
from xraydx.io import read_image
from xraydx.ood import OODGuard

pytest.importorskip("onnxruntime")


def _within(a: np.ndarray, b: np.ndarray) -> bool:
    """The one rule: max |a - b| <= tolerance * max(1, max |a|)."""
    return float(np.abs(a - b).max()) <= PARITY_TOLERANCE * max(1.0, float(np.abs(a).max()))


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [read_image(p) for p in sample_images("test") + sample_images("val")]


def test_segmenter_masks_match_on_onnx(images: list[np.ndarray]) -> None:
    ref = lung_segmenter("torch").analyze_many(images, variants=True)
    got = lung_segmenter("onnx").analyze_many(images, variants=True)
    for r, g in zip(ref, got, strict=True):
        assert _within(r.prob, g.prob) and _within(r.features, g.features)
        assert r.variants is not None and g.variants is not None and _within(r.variants, g.variants)
        # a mask pixel may only differ where the torch probability is within the tolerance of the threshold
        differ = r.mask != g.mask
        assert differ.sum() <= 0.001 * differ.size, int(differ.sum())


def test_guard_scores_match_on_onnx(images: list[np.ndarray]) -> None:
    ref = OODGuard.default(engine="torch").check_many(images)
    got = OODGuard.default(engine="onnx").check_many(images)
    for r, g in zip(ref, got, strict=True):
        assert abs(r.score - g.score) <= PARITY_TOLERANCE * max(1.0, abs(r.score))
        assert r.is_cxr == g.is_cxr and r.reasons == g.reasons


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_predict_onnx_gives_the_same_numbers_on_the_sample(tmp_path: Path) -> None:
    """The shipped model's default pipeline over the whole bundled sample, torch vs onnx."""
    got = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        assert main(["predict", str(SAMPLE), "--out", str(out), "-q", "--engine", engine]) == 0
        got[engine] = _rows(out)
    t, o = got["torch"], got["onnx"]
    assert len(t) == len(list(SAMPLE.rglob("*.png"))) and t.keys() == o.keys()
    probs = [k for k in next(iter(t.values())) if k.startswith("prob_")]
    for p in t:
        assert o[p]["prediction"] == t[p]["prediction"], p
        assert o[p]["status"] == t[p]["status"] and o[p]["flag"] == t[p]["flag"], p
        for k in probs:
            assert abs(float(o[p][k]) - float(t[p][k])) <= PARITY_TOLERANCE, (p, k)
        # ood_score is written with 3 decimals: one unit of the last one apart at most
        assert abs(float(o[p]["ood_score"]) - float(t[p]["ood_score"])) <= 1e-3 + 1e-9, p


def test_the_probe_fails_a_network_that_is_off() -> None:
    """The parity probe catches a feature network whose outputs are off by a little (not noise-level)."""
    seg = lung_segmenter("torch")
    _, feats = segmenter_networks(seg)
    onnx = onnxio.OnnxEngine(engines.export_onnx(feats))
    x = probe_images(feats)
    assert len(x) == 8
    assert check_parity(feats, onnx, x)["passed"]

    class Off:
        name = "onnx"

        def run(self, batch: np.ndarray) -> list[np.ndarray]:
            out = onnx.run(batch)
            return [out[0] * (1 + 1e-3)]

    bad = check_parity(feats, Off(), x)
    assert not bad["passed"] and bad["error"] > PARITY_TOLERANCE


def test_exported_once_then_loaded_from_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XRAYDX_CACHE_DIR", str(tmp_path))
    seg = lung_segmenter("torch")
    full, _ = segmenter_networks(seg)
    first = engines.onnx_engine(full)
    cached = engines.cache_path(full)
    assert cached is not None and cached.is_file() and cached.parent == tmp_path / "onnx"
    assert onnxio.read_onnx_doc(cached)["onnx"]["parity"]["passed"] is True

    def no_export(*a: object, **k: object) -> bytes:
        raise AssertionError("exported again")

    monkeypatch.setattr(engines, "export_onnx", no_export)
    again = engines.onnx_engine(full)
    x = full.normalise(probe_images(full)[:2])
    assert all(np.array_equal(a, b) for a, b in zip(first.run(x), again.run(x), strict=True))


def test_a_failed_probe_is_an_error_and_caches_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XRAYDX_CACHE_DIR", str(tmp_path))
    _, feats = segmenter_networks(lung_segmenter("torch"))
    real = onnxio.OnnxEngine.run
    monkeypatch.setattr(onnxio.OnnxEngine, "run", lambda self, x: [o + 0.1 for o in real(self, x)])
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        engines.onnx_engine(feats)
    assert not (tmp_path / "onnx").exists() or not list((tmp_path / "onnx").iterdir())


def test_predict_keeps_input_order_with_errors_between_batches(tmp_path: Path) -> None:
    from xraydx.predict import Predictor

    good = sample_images("test")[:5]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = [good[0], bad, good[1], good[2], tmp_path / "missing.png", good[3], good[4]]
    pred = Predictor(DEFAULT_CHECKPOINT, "cpu")
    rows = list(pred.predict_files(paths, batch_size=2, progress=False))
    assert [r.path for r in rows] == [str(p) for p in paths]
    assert [r.probs is None for r in rows] == [False, True, False, False, True, False, False]
    assert rows[1].status.startswith("error: ") and rows[4].status.startswith("error: ")
    alone = next(pred.predict_files([good[2]], progress=False))
    assert alone.probs == pytest.approx(rows[3].probs, abs=1e-6)
