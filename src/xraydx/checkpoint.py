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

Integrity: :func:`save` stores :func:`tensors_digest` of the tensors in the metadata
(``"tensors_sha256"``, the last key) and :func:`load_tensors` recomputes and compares it, so a file
whose tensor bytes were damaged or altered is refused (naming the file) instead of predicting NaN.
A classifier written before the digest existed loads with a warning (``scripts/add_tensor_digest.py``
adds one). The shipped lung segmenter and OOD guard predate it and are kept byte for byte: their
file's SHA-256 is their identity, recorded by the guard and by every classifier trained on its masks
(and checked when they are loaded), so rewriting them would orphan those records. The metadata document is
refused when nested deeper than :data:`MAX_DEPTH`; a classifier's fields are checked by
:func:`validate_classifier_meta` (the CLI, the server and the ONNX loader all call it).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
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
    "DIGEST_KEY",
    "load_tensors",
    "load_weights",
    "model_state",
    "read_metadata",
    "save",
    "tensors_digest",
    "validate_classifier_meta",
]

FORMAT = "xraydx-checkpoint"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 2**20
DIGEST_KEY = "tensors_sha256"
#: the deepest nesting of the metadata JSON accepted (the real documents are at most ~6 deep)
MAX_DEPTH = 64


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor, by name in sorted order: name, dtype, shape, then the raw bytes (C order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` on the CPU (unwrapped from DDP and torch.compile)."""
    module = model.module if hasattr(model, "module") else model
    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    return {k: v.detach() for k, v in module.state_dict().items()}


def save(path: str | Path, weights: nn.Module | Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``weights`` (a model, or named tensors) and ``meta`` atomically as one checkpoint file."""
    tensors = model_state(weights) if isinstance(weights, nn.Module) else weights
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    rest = {k: v for k, v in meta.items() if k not in ("format", "format_version", DIGEST_KEY)}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **rest, DIGEST_KEY: tensors_digest(state)}
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
    except RecursionError:
        raise CheckpointError(
            f"{p}: checkpoint metadata is nested too deeply (over {MAX_DEPTH} levels)"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: checkpoint metadata is not a JSON object")
    if _depth(meta) > MAX_DEPTH:
        raise CheckpointError(f"{p}: checkpoint metadata is nested too deeply (over {MAX_DEPTH} levels)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unknown checkpoint format {meta.get('format')!r}")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{p}: checkpoint format_version must be an integer, not {version!r:.40}")
    if version > FORMAT_VERSION:
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
    except RecursionError:
        raise CheckpointError(f"{p}: not a safetensors checkpoint (header nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors checkpoint")
    return header


def load_tensors(
    path: str | Path, error: type[Exception] = CheckpointError, what: str = "the weights"
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, on the CPU, checked against the digest its metadata stores; a
    failure becomes ``error`` naming the file."""
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from exc
    try:
        meta = read_metadata(path)
    except CheckpointError as exc:
        raise error(str(exc)) from exc
    stored = meta.get(DIGEST_KEY)
    if stored is None:
        if meta.get("kind") is not None:  # the shipped segmenter and guard: see the module doc
            return tensors
        warnings.warn(
            f"{path}: checkpoint has no tensor digest (written before xraydx stored one); its weights cannot"
            " be checked for damage (re-save it with scripts/add_tensor_digest.py)",
            stacklevel=2,
        )
    elif stored != tensors_digest(tensors):
        raise error(
            f"{path}: {what} do not match the digest stored in the checkpoint: the file is damaged or was"
            " modified; restore it from its source"
        )
    return tensors


def load_weights(model: nn.Module, path: str | Path, error: type[Exception], what: str) -> None:
    """Load a checkpoint's tensors into ``model`` (strict); failures become ``error`` naming the file."""
    state = load_tensors(path, error, "weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise error(f"{path}: weights do not match {what}: {str(exc)[:300]}") from exc


def _depth(doc: Any) -> int:
    """The nesting depth of a parsed JSON document (iterative: no recursion limit)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((c, d + 1) for c in children)
    return deepest


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_classifier_meta(meta: Mapping[str, Any], source: str | Path) -> None:
    """Refuse (CheckpointError naming ``source``, one line) a classifier's metadata that cannot be used:
    ``architecture`` an object with a ``name``; ``classes`` at least two distinct names; ``preprocessing``
    an object with an integer ``size``; a calibration ``temperature`` finite and > 0; an abstention
    ``threshold`` in (0, 1]. The same rule for predict, evaluate, explain, serve and the DICOM node."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: invalid checkpoint metadata: {what}")

    kind = meta.get("kind")
    if kind not in (None, "classifier"):
        raise CheckpointError(f"{source}: a {str(kind)[:40]} checkpoint, not a classifier")
    arch = meta.get("architecture")
    if not isinstance(arch, Mapping):
        raise bad(
            "no 'architecture' object"
            if arch is None
            else f"'architecture' is {type(arch).__name__}, not an object"
        )
    if not isinstance(arch.get("name"), str) or not arch["name"]:
        raise bad("'architecture.name' must be a non-empty string")
    chans = arch.get("in_chans", 1)
    if isinstance(chans, bool) or not isinstance(chans, int) or chans < 1:
        raise bad(f"'architecture.in_chans' must be a positive integer, not {chans!r:.40}")
    temps = arch.get("member_temperatures")
    if temps is not None and (
        not isinstance(temps, list) or len(temps) < 2 or not all(_number(t) and t > 0 for t in temps)
    ):
        raise bad(
            "'architecture.member_temperatures' must list two or more finite numbers > 0 (one per member)"
        )
    classes = meta.get("classes")
    if (
        not isinstance(classes, list) or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes)
    ):  # fmt: skip
        raise bad("'classes' must be a list of at least two distinct non-empty names")
    prep = meta.get("preprocessing")
    if not isinstance(prep, Mapping):
        raise bad("no 'preprocessing' object")
    size = prep.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise bad(f"'preprocessing.size' must be an integer in [8, 4096], not {size!r:.40}")
    for key in ("mean", "std"):
        if key in prep and not _number(prep[key]):
            raise bad(f"'preprocessing.{key}' must be a finite number, not {prep[key]!r:.40}")
    if "std" in prep and prep["std"] <= 0:
        raise bad("'preprocessing.std' must be > 0")
    cal = meta.get("calibration")
    if cal is not None:
        if not isinstance(cal, Mapping):
            raise bad("'calibration' must be an object")
        t = cal.get("temperature", 1.0)
        if not _number(t) or t <= 0:
            raise bad(f"calibration temperature must be a finite number > 0, not {t!r:.40}")
    ab = meta.get("abstention")
    if ab:
        if not isinstance(ab, Mapping):
            raise bad("'abstention' must be an object")
        t = ab.get("threshold")
        if t is not None and (not _number(t) or not 0 < t <= 1):
            raise bad(f"abstention threshold must be a number in (0, 1], not {t!r:.40}")
        md = ab.get("members_disagree")
        if md is not None and not isinstance(md, bool):
            raise bad(f"abstention members_disagree must be true or false, not {md!r:.40}")
        if md and not arch.get("member_temperatures"):
            raise bad("abstention members_disagree is for an ensemble, and this checkpoint is one network")
