"""ONNX export of a real (tiny) trained checkpoint, parity on real images, and the onnx predict engine."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import xraydx.export as export_mod
from conftest import sample_images
from xraydx.cli import main
from xraydx.export import ExportError, OnnxEngine, read_onnx_metadata
from xraydx.io import read_image
from xraydx.models import load_checkpoint, read_metadata
from xraydx.predict import batch_logits
from xraydx.transforms import Preprocessing, preprocess


@pytest.fixture(scope="module")
def onnx_file(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


def _real_batch(spec: Preprocessing) -> np.ndarray:
    return np.stack([preprocess(read_image(p), spec) for p in sample_images("test") + sample_images("val")])


def test_export_reports_parity_on_real_images(onnx_file: tuple[Path, str]) -> None:
    out, text = onnx_file
    assert out.is_file()
    m = re.search(r"max \|difference\| of probabilities\s+([0-9.e+-]+)", text)
    assert m, text
    assert float(m.group(1)) < 1e-4
    assert "parity on 30 real images" in text


def test_onnx_matches_torch_on_real_images(onnx_file: tuple[Path, str], checkpoint: Path) -> None:
    model, meta = load_checkpoint(checkpoint)
    eng = OnnxEngine(onnx_file[0])
    x = _real_batch(eng.spec)
    ref = batch_logits(model, x, eng.spec, torch.device("cpu"))
    got = torch.from_numpy(eng.batch_logits(x))
    t = float(meta["calibration"]["temperature"])
    diff = (torch.softmax(ref / t, 1) - torch.softmax(got / t, 1)).abs().max().item()
    assert diff < 1e-4
    assert np.allclose(eng.probs(x), torch.softmax(ref / t, 1).numpy(), atol=1e-4)
    # dynamic batch axis
    xn = ((x[:5].astype(np.float32) / 255 - eng.spec.mean) / eng.spec.std)[:, None]
    assert eng.logits(xn[:1]).shape == (1, 3) and eng.logits(xn).shape == (5, 3)


def test_metadata_makes_the_onnx_file_self_describing(onnx_file: tuple[Path, str], checkpoint: Path) -> None:
    meta = read_onnx_metadata(onnx_file[0])
    ck = read_metadata(checkpoint)
    assert meta["classes"] == ck["classes"] and meta["preprocessing"] == ck["preprocessing"]
    assert meta["calibration"]["temperature"] == ck["calibration"]["temperature"]
    assert meta["architecture"] == ck["architecture"]
    info = meta["onnx"]
    assert info["input"]["name"] == "image" and info["output"]["name"] == "logits"
    assert info["parity"]["n_images"] == 30 and info["parity"]["passed"] is True
    assert info["parity"]["max_abs_diff_probs"] < 1e-4


def test_export_refuses_to_overwrite(
    onnx_file: tuple[Path, str], checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = onnx_file[0]
    before = out.read_bytes()
    rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err  # an existing output is bad usage
    assert out.read_bytes() == before


def test_parity_failure_writes_nothing(
    onnx_file: tuple[Path, str],
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import xraydx.engines as engines
    import xraydx.onnxio as onnxio

    graph = onnx_file[0].read_bytes()  # skip re-tracing: the same graph (its metadata is replaced anyway)
    monkeypatch.setattr(engines, "export_onnx", lambda net, opset=17: graph)
    real = onnxio.OnnxEngine.run

    def off_by_a_bit(self: onnxio.OnnxEngine, x: np.ndarray) -> list[np.ndarray]:
        out = real(self, x)
        out[0][:, 0] += 0.5
        return out

    monkeypatch.setattr(onnxio.OnnxEngine, "run", off_by_a_bit)
    out = tmp_path / "bad.onnx"
    rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert rc == 1 and not out.exists()
    assert "parity check failed" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def _probs(path: Path) -> dict[str, list[float]]:
    with open(path) as fh:
        return {r["path"]: [float(r[k]) for k in r if k.startswith("prob_")] for r in csv.DictReader(fh)}


def test_predict_engine_onnx_matches_torch(
    onnx_file: tuple[Path, str], checkpoint: Path, tmp_path: Path
) -> None:
    test_dir = str(sample_images("test")[0].parents[1])
    runs = {
        "torch": ["--checkpoint", str(checkpoint)],
        "onnx": ["--checkpoint", str(checkpoint), "--engine", "onnx"],
        "onnx-file": ["--checkpoint", str(onnx_file[0]), "--engine", "onnx"],
    }
    got = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.csv"
        assert main(["predict", test_dir, "--out", str(out), "-q", *extra]) == 0
        got[name] = _probs(out)
    assert len(got["torch"]) == 30
    for name in ("onnx", "onnx-file"):
        assert got[name].keys() == got["torch"].keys()
        diff = max(
            abs(a - b) for k in got["torch"] for a, b in zip(got["torch"][k], got[name][k], strict=True)
        )
        assert diff <= 1e-4, name


def test_bad_onnx_inputs_name_the_file(tmp_path: Path, checkpoint: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ExportError, match="junk.onnx"):
        OnnxEngine(junk)
    import onnx

    model, meta = load_checkpoint(checkpoint)
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(export_mod.export_graph(model, meta))  # no xraydx metadata
    with pytest.raises(ExportError, match="not one exported by xraydx"):
        read_onnx_metadata(plain)
    assert onnx.load(str(plain)).graph.input[0].name == "image"
    with pytest.raises(ExportError, match="not found"):
        read_onnx_metadata(tmp_path / "missing.onnx")
