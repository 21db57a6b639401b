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
    assert out.read_bytes() == path.read_bytes()


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
