"""The one checkpoint format (xraydx.checkpoint) for classifier, lung segmenter and OOD guard: the shipped
files are reproduced byte for byte by re-saving what is read from them, the header rules hold for every
kind, and the old import paths name the same functions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from xraydx import checkpoint
from xraydx.constants import DEFAULT_CHECKPOINT, DEFAULT_GUARD, DEFAULT_SEGMENTER
from xraydx.errors import CheckpointError

SHIPPED = [DEFAULT_CHECKPOINT, DEFAULT_SEGMENTER, DEFAULT_GUARD]


def _header(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_resaving_a_shipped_checkpoint_gives_the_same_bytes(path: Path, tmp_path: Path) -> None:
    """What checkpoint.save writes today is what the shipped files are: the format has not moved."""
    assert path.is_file(), f"shipped checkpoint missing: {path}"
    meta = checkpoint.read_metadata(path)
    assert meta["format"] == checkpoint.FORMAT and meta["format_version"] == checkpoint.FORMAT_VERSION == 1
    tensors = checkpoint.load_tensors(path)
    rest = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    out = tmp_path / path.name
    checkpoint.save(out, tensors, rest)
    if checkpoint.DIGEST_KEY in meta:
        assert out.read_bytes() == path.read_bytes()
    else:  # the segmenter and the guard predate the digest (checkpoint.py says why they keep their bytes)
        again = checkpoint.read_metadata(out)
        assert again.pop(checkpoint.DIGEST_KEY) == checkpoint.tensors_digest(tensors) and again == meta
        head, new = _header(path), _header(out)
        assert {k: v for k, v in head.items() if k != "__metadata__"} == {
            k: v for k, v in new.items() if k != "__metadata__"
        }


def test_the_three_kinds_share_one_header(tmp_path: Path) -> None:
    kinds = {checkpoint.read_metadata(p).get("kind", "classifier") for p in SHIPPED}
    assert kinds == {"classifier", "lung-segmenter", "ood-guard"}
    model = torch.nn.Linear(3, 2)
    checkpoint.save(tmp_path / "m.safetensors", model, {"kind": "test", "note": "x"})
    head = _header(tmp_path / "m.safetensors")
    doc = json.loads(head["__metadata__"]["xraydx"])  # type: ignore[index]
    assert list(doc)[:4] == ["format", "format_version", "kind", "note"]
    back = torch.nn.Linear(3, 2)
    checkpoint.load_weights(back, tmp_path / "m.safetensors", CheckpointError, "the test model")
    assert torch.equal(back.weight, model.weight) and torch.equal(back.bias, model.bias)
    with pytest.raises(CheckpointError, match="weights do not match the other model"):
        checkpoint.load_weights(
            torch.nn.Linear(4, 2), tmp_path / "m.safetensors", CheckpointError, "the other model"
        )


def test_newer_format_and_unreadable_tensors_are_refused(tmp_path: Path) -> None:
    class Mine(CheckpointError):
        pass

    p = tmp_path / "new.safetensors"
    checkpoint.save(p, {"a": torch.zeros(2)}, {"kind": "x"})
    raw = p.read_bytes().replace(b'\\"format_version\\": 1', b'\\"format_version\\": 2')
    p.write_bytes(raw)
    with pytest.raises(CheckpointError, match="format version 2 is newer"):
        checkpoint.read_metadata(p)
    bad = tmp_path / "torn.safetensors"
    bad.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(Mine, match=r"torn.safetensors: cannot read the statistics"):
        checkpoint.load_tensors(bad, Mine, "the statistics")


def test_old_import_paths_name_the_same_functions() -> None:
    from xraydx import models, ood, segment

    assert models.read_metadata is checkpoint.read_metadata
    assert models.save_checkpoint is checkpoint.save and models.load_weights is checkpoint.load_weights
    assert models.FORMAT == checkpoint.FORMAT and models.FORMAT_VERSION == checkpoint.FORMAT_VERSION
    assert segment.read_metadata is checkpoint.read_metadata and ood.read_metadata is checkpoint.read_metadata


# ---- integrity and metadata rules (issue 16 item 6; item 14's last sentence) ------------------------


def _tiny(path: Path, **meta_changes: object) -> Path:
    """A tiny classifier checkpoint (timm's test network, 64 px), its metadata changed as given."""
    from conftest import TINY_MODEL
    from xraydx.models import create_model

    torch.manual_seed(0)
    meta: dict[str, object] = {
        "classes": ["covid", "non_covid", "normal"], "architecture": {"name": TINY_MODEL, "in_chans": 1},
        "preprocessing": {"size": 64, "lung_mask": "none", "mean": 0.5, "std": 0.25},
        "calibration": {"method": "temperature", "temperature": 1.0}, "abstention": {"threshold": 0.5},
    }  # fmt: skip
    meta.update(meta_changes)
    checkpoint.save(path, create_model(TINY_MODEL, 3, pretrained="none"), meta)
    return path


def _rewrite_metadata(path: Path, doc_text: str) -> None:
    """Replace the checkpoint's xraydx metadata by ``doc_text`` verbatim (tensors untouched)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    head["__metadata__"]["xraydx"] = doc_text
    blob = json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_the_shipped_default_model_carries_a_verified_tensor_digest() -> None:
    meta = checkpoint.read_metadata(DEFAULT_CHECKPOINT)
    assert meta[checkpoint.DIGEST_KEY] == checkpoint.tensors_digest(
        checkpoint.load_tensors(DEFAULT_CHECKPOINT)
    )


def test_damaged_tensors_are_refused_on_load(tmp_path: Path) -> None:
    """4 KB overwritten inside the tensor data: refused naming the file, not a NaN prediction."""
    p = _tiny(tmp_path / "m.safetensors")
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + 1000
    raw[start : start + 4096] = b"\xff" * 4096
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"m.safetensors: the weights do not match the digest"):
        checkpoint.load_tensors(p, what="the weights")


def test_a_checkpoint_without_digest_loads_with_a_warning(tmp_path: Path) -> None:
    p = _tiny(tmp_path / "old.safetensors")
    meta = checkpoint.read_metadata(p)
    del meta[checkpoint.DIGEST_KEY]
    _rewrite_metadata(p, json.dumps(meta))
    with pytest.warns(UserWarning, match="no tensor digest"):
        checkpoint.load_tensors(p)


def test_add_tensor_digest_script_keeps_the_tensors_byte_identical(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "add_tensor_digest", Path(__file__).resolve().parents[1] / "scripts" / "add_tensor_digest.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p = _tiny(tmp_path / "old.safetensors")
    meta = checkpoint.read_metadata(p)
    del meta[checkpoint.DIGEST_KEY]
    _rewrite_metadata(p, json.dumps(meta))
    before = mod._tensor_part(p)
    assert mod.add_digest(p).startswith("digest added")
    assert mod._tensor_part(p) == before and checkpoint.DIGEST_KEY in checkpoint.read_metadata(p)


BAD_META = {
    "temperature nan": {"calibration": {"temperature": float("nan")}},
    "temperature 0": {"calibration": {"temperature": 0}},
    "temperature negative": {"calibration": {"temperature": -1.0}},
    "temperature a string": {"calibration": {"temperature": "1.0"}},
    "threshold 0": {"abstention": {"threshold": 0.0}},
    "threshold above 1": {"abstention": {"threshold": 1.5}},
    "threshold nan": {"abstention": {"threshold": float("nan")}},
    "architecture missing": {"architecture": None},
    "architecture a string": {"architecture": "resnet"},
    "classes a string": {"classes": "covid"},
    "size a string": {"preprocessing": {"size": "64", "lung_mask": "none"}},
}


@pytest.mark.parametrize("case", BAD_META, ids=list(BAD_META))
def test_invalid_metadata_is_refused(case: str, tmp_path: Path) -> None:
    from xraydx.models import load_checkpoint

    changes = dict(BAD_META[case])
    p = _tiny(tmp_path / "m.safetensors", **changes)
    if changes.get("architecture", "") is None:
        meta = checkpoint.read_metadata(p)
        del meta["architecture"]
        _rewrite_metadata(p, json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"m.safetensors: invalid checkpoint metadata"):
        load_checkpoint(p)


def test_deeply_nested_metadata_is_refused_in_one_line(tmp_path: Path) -> None:
    p = _tiny(tmp_path / "deep.safetensors")
    _rewrite_metadata(p, '{"format": "xraydx-checkpoint", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError, match=r"deep.safetensors: checkpoint metadata is nested too deeply"):
        checkpoint.read_metadata(p)


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_predict_and_serve_refuse_bad_metadata_alike(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line, exit 1, from both commands, for the same checkpoints."""
    if command == "serve":
        pytest.importorskip("fastapi")
    from conftest import sample_images
    from xraydx.cli import main

    img = str(sample_images("test")[0])
    for name, changes in {"t": BAD_META["temperature nan"], "a": BAD_META["threshold above 1"]}.items():
        p = _tiny(tmp_path / f"{name}.safetensors", **changes)
        args = [img, "--out", str(tmp_path / "o.csv")] if command == "predict" else ["--port", "0"]
        capsys.readouterr()
        assert main([command, *args, "--checkpoint", str(p)]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"{name}.safetensors: invalid checkpoint metadata" in err[0], err
    deep = _tiny(tmp_path / "deep.safetensors")
    _rewrite_metadata(deep, '{"format": "xraydx-checkpoint", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    args = [img, "--out", str(tmp_path / "o.csv")] if command == "predict" else ["--port", "0"]
    assert main([command, *args, "--checkpoint", str(deep)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "nested too deeply" in err[0], err


def test_non_finite_output_is_an_error_never_a_class(tmp_path: Path) -> None:
    """Weights that give NaN (saved with a valid digest): every row an error, in predict and serve."""
    from conftest import sample_images
    from xraydx.models import create_model
    from xraydx.predict import NONFINITE, Predictor

    model = create_model("test_resnet", 3, pretrained="none")
    with torch.no_grad():
        for prm in model.parameters():
            prm.fill_(float("nan"))
    p = tmp_path / "nan.safetensors"
    meta = checkpoint.read_metadata(_tiny(tmp_path / "ok.safetensors"))
    checkpoint.save(p, model, {k: v for k, v in meta.items() if k not in ("format", "format_version")})
    pred = Predictor(p, "cpu", ood=False)
    rows = list(pred.predict_files(sample_images("test")[:2], progress=False))
    assert [r.status for r in rows] == [f"error: {NONFINITE}"] * 2 and all(r.probs is None for r in rows)
    fastapi = pytest.importorskip("fastapi")
    assert fastapi
    from fastapi.testclient import TestClient

    from xraydx import serve

    with TestClient(serve.create_app(p), raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        img = sample_images("test")[0]
        r = c.post("/api/predict", files={"file": (img.name, img.read_bytes(), "image/png")})
    assert r.status_code == 500 and NONFINITE in r.json()["detail"] and "predicted_class" not in r.json()
