"""ONNX files and onnxruntime: what :mod:`xraydx.engines` needs of ONNX that is not about a torch network.

* :func:`require_onnx`: the optional packages onnx and onnxruntime, or an ExportError saying how to
  install them;
* :class:`OnnxEngine`: one exported network in an onnxruntime session (all graph optimisations,
  intra-op threads = the CPUs this process may use, no spin-waiting; CPU, CUDA where asked for and
  available), with the :class:`xraydx.engines.Engine` interface;
* the xraydx metadata of an exported file, JSON in ``metadata_props[META_KEY]``: written by
  :func:`with_metadata`, read by :func:`read_onnx_doc` (any exported network) and
  :func:`read_onnx_metadata` (a classifier, checked as a checkpoint's metadata is);
* :func:`is_onnx_file`: whether a model file is ONNX rather than safetensors.

Exporting a network, the parity probe against PyTorch and the cache of exports are in
:mod:`xraydx.engines`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xraydx.device import available_cpus
from xraydx.errors import ExportError

META_KEY = "xraydx"


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or an ExportError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"ONNX support needs the optional packages onnx and onnxruntime ({exc.name} is missing):"
            " pip install 'xraydx[export]'"
        ) from exc
    return onnx, onnxruntime


class OnnxEngine:
    """onnxruntime on one exported network (CPU; CUDA where asked for and available)."""

    name = "onnx"

    def __init__(
        self, data: bytes, *, source: str = "<bytes>", threads: int = 0, device: str | torch.device = "cpu"
    ) -> None:
        _, ort = require_onnx()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads) if threads else available_cpus()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        # no busy-waiting between runs: three sessions, a decode thread and torch's post-processing share
        # the cores (measured on 2 shared cores: 27% less CPU, same or better wall time; docs/performance.md)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.source = source
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types for every way a model is unusable
            raise ExportError(f"{source}: onnxruntime cannot load the model ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected (B, 1, S, S) float32 input, got shape {x.shape}")
        return list(self.session.run(None, {self.input_name: x}))


# ---- the ONNX file's metadata ---------------------------------------------------------------------


def with_metadata(data: bytes, doc: dict[str, Any], description: str = "") -> bytes:
    """ONNX bytes with ``doc`` stored as JSON in ``metadata_props[META_KEY]`` (replacing what was there)."""
    onnx, _ = require_onnx()
    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(doc, default=str)
    proto.producer_name = "xraydx"
    proto.producer_version = str(doc.get("tool_version", ""))
    proto.doc_string = description
    return proto.SerializeToString()


def read_onnx_doc(source: str | Path | bytes) -> dict[str, Any]:
    """The xraydx metadata stored in an exported model (an ExportError naming the file otherwise)."""
    onnx, _ = require_onnx()
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    except FileNotFoundError as exc:
        raise ExportError(f"{name}: ONNX model not found") from exc
    except Exception as exc:
        raise ExportError(f"{name}: not a readable ONNX model ({exc})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ExportError(f"{name}: an ONNX model, but not one exported by xraydx (no '{META_KEY}' metadata)")
    try:
        return dict(json.loads(props[META_KEY]))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{name}: the xraydx metadata is not valid JSON ({exc})") from exc


def read_onnx_metadata(source: str | Path | bytes) -> dict[str, Any]:
    """The metadata of an exported *classifier* (classes, preprocessing, architecture, ... and ``onnx``)."""
    meta = read_onnx_doc(source)
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    for key in ("classes", "preprocessing", "architecture"):
        if key not in meta:
            raise ExportError(f"{name}: the xraydx metadata has no {key!r}")
    from xraydx.checkpoint import validate_classifier_meta

    validate_classifier_meta(meta, name)  # the same rule as for a .safetensors checkpoint
    return meta


def is_onnx_file(p: Path) -> bool:
    """A ``.onnx`` name, or content that is not safetensors (8-byte length, then '{') but starts like an
    ONNX protobuf (field 1, ir_version, as a varint)."""
    if p.suffix.lower() == ".onnx":
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return head[8:9] != b"{" and head[:1] == b"\x08"
