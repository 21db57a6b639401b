"""The xraydx checkpoint format: one header format for every kind of checkpoint.

A checkpoint is one ``.safetensors`` file: tensors (a model's state dict, or the OOD guard's
statistics), plus a JSON document stored in the safetensors header under the key ``"xraydx"``:
``{"format": "xraydx-checkpoint", "format_version": 1, ...}`` followed by the writer's metadata
(classes, architecture, input size, preprocessing, calibration, training-data summary, metrics, tool
version). ``"kind"`` tells the three kinds apart: absent for a classifier, ``"lung-segmenter"``,
``"ood-guard"``.

Rules: writes are atomic (temp file + rename, :mod:`xraydx.fsutil`); reading never unpickles (a
pickle or zip file is refused by its first bytes, before any parser sees it); the header is read
without loading the tensors; a ``format_version`` newer than :data:`FORMAT_VERSION` is refused.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from xraydx.errors import CheckpointError
from xraydx.fsutil import atomic_write_with

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "load_tensors",
    "load_weights",
    "model_state",
    "read_metadata",
    "save",
]

FORMAT = "xraydx-checkpoint"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 2**20


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` on the CPU (unwrapped from DDP and torch.compile)."""
    module = model.module if hasattr(model, "module") else model
    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    return {k: v.detach() for k, v in module.state_dict().items()}


def save(path: str | Path, weights: nn.Module | Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``weights`` (a model, or named tensors) and ``meta`` atomically as one checkpoint file."""
    tensors = model_state(weights) if isinstance(weights, nn.Module) else weights
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    header = {"xraydx": json.dumps(doc, default=str)}
    atomic_write_with(Path(path), lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read the JSON metadata of a checkpoint without loading its tensors."""
    p = Path(path)
    header = _read_safetensors_header(p)
    raw = (header.get("__metadata__") or {}).get("xraydx")
    if raw is None:
        raise CheckpointError(f"{p}: a safetensors file, but not an xraydx checkpoint (no 'xraydx' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}: checkpoint metadata is not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unknown checkpoint format {meta.get('format')!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {meta['format_version']} is newer than this xraydx"
        )
    return meta


def _read_safetensors_header(p: Path) -> dict[str, Any]:
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
            if len(head) < 9:
                raise CheckpointError(f"{p}: not a checkpoint (file too short)")
            if head[8:9] != b"{":  # safetensors: 8-byte header length, then the JSON header
                if (head[:1] == b"\x80" and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04":
                    raise CheckpointError(
                        f"{p}: refusing a pickle/zip file (torch.save format); xraydx only loads safetensors"
                        " checkpoints, because unpickling can run arbitrary code"
                    )
                raise CheckpointError(f"{p}: not a safetensors checkpoint")
            (n,) = struct.unpack("<Q", head[:8])
            size = p.stat().st_size
            if n <= 1 or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{p}: not a safetensors checkpoint (bad header length)")
            blob = b"{" + fh.read(n - 1)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{p}: checkpoint not found") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{p}: is a directory, not a checkpoint file") from exc
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: not a safetensors checkpoint (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors checkpoint")
    return header


def load_tensors(
    path: str | Path, error: type[Exception] = CheckpointError, what: str = "the weights"
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, on the CPU; a failure becomes ``error`` naming the file."""
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from exc


def load_weights(model: nn.Module, path: str | Path, error: type[Exception], what: str) -> None:
    """Load a checkpoint's tensors into ``model`` (strict); failures become ``error`` naming the file."""
    state = load_tensors(path, error, "weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise error(f"{path}: weights do not match {what}: {str(exc)[:300]}") from exc
