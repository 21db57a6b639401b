"""ONNX export with a parity check against PyTorch, and an onnxruntime inference engine.

The exported graph takes the *normalised* float image, ``image``: float32 (B, 1, S, S) =
(uint8 / 255 - mean) / std with the checkpoint's preprocessing, and returns ``logits``: float32
(B, C); the batch axis is dynamic. Probabilities are softmax(logits / temperature). Everything
needed to use the file alone (classes, preprocessing, mean/std, temperature, architecture, the
whole checkpoint metadata, the parity result) is stored as JSON in the model's
``metadata_props`` under the key ``"xraydx"``; ``read_onnx_metadata`` returns it.

``xraydx export --checkpoint CKPT --out model.onnx`` exports, then runs the same real images
through PyTorch and onnxruntime and prints the max absolute difference of the probabilities; above
the tolerance (default 1e-4) it exits 1 and writes nothing. ``xraydx predict --engine onnx`` runs
prediction through onnxruntime (see :class:`OnnxEngine`).
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xraydx.constants import checkpoint_or_default, sample_dir
from xraydx.errors import EXIT_FATAL, EXIT_OK, ExportError, UsageError
from xraydx.models import load_checkpoint
from xraydx.transforms import Preprocessing, normalize, preprocess

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
META_KEY = "xraydx"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"ONNX support needs the optional packages onnx and onnxruntime ({exc.name} is missing):"
            " pip install 'xraydx[export]'"
        ) from exc
    return onnx, onnxruntime


# ---- export ----------------------------------------------------------------------------------------


def export_graph(model: nn.Module, meta: dict[str, Any], *, opset: int = DEFAULT_OPSET) -> bytes:
    """The model as ONNX bytes (no xraydx metadata yet); input (B, C, S, S) float32, dynamic batch."""
    onnx, _ = _require_onnx()
    c, s = int(meta["input_size"][0]), int(meta["input_size"][-1])
    model = model.to("cpu").eval()
    dummy = torch.zeros((2, c, s, s), dtype=torch.float32)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (dummy,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )  # fmt: skip
    except Exception as exc:  # the exporter raises many types; all mean "this model cannot be exported"
        raise ExportError(f"ONNX export of {meta['architecture']['name']} failed: {exc}") from exc
    data = buf.getvalue()
    try:
        onnx.checker.check_model(onnx.load_from_string(data))
    except Exception as exc:
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    return data


def with_metadata(data: bytes, meta: dict[str, Any], extra: dict[str, Any]) -> bytes:
    """Store the checkpoint metadata (+ ``extra``, e.g. the parity result) in the model's metadata_props."""
    onnx, _ = _require_onnx()
    proto = onnx.load_from_string(data)
    doc = {**meta, "onnx": extra}
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(doc, default=str)
    proto.producer_name = "xraydx"
    proto.producer_version = str(meta.get("tool_version", ""))
    proto.doc_string = (
        f"xraydx {meta['architecture']['name']}: input '{INPUT_NAME}' float32 (B,1,S,S) = (uint8/255 - mean)/std,"
        f" output '{OUTPUT_NAME}' (B,{len(meta['classes'])}); probabilities = softmax(logits / temperature);"
        f" full metadata as JSON in metadata_props['{META_KEY}']"
    )
    return proto.SerializeToString()


def read_onnx_metadata(source: str | Path | bytes) -> dict[str, Any]:
    """The xraydx metadata stored in an exported model."""
    onnx, _ = _require_onnx()
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
        meta = json.loads(props[META_KEY])
    except json.JSONDecodeError as exc:
        raise ExportError(f"{name}: the xraydx metadata is not valid JSON ({exc})") from exc
    for key in ("classes", "preprocessing", "architecture"):
        if key not in meta:
            raise ExportError(f"{name}: the xraydx metadata has no {key!r}")
    return meta


# ---- onnxruntime engine ----------------------------------------------------------------------------


def _is_onnx_file(p: Path) -> bool:
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


class OnnxEngine:
    """An xraydx model in onnxruntime.

    ``source``: an exported ``.onnx`` file, its bytes, or an xraydx checkpoint (``.safetensors``),
    which is exported in memory first (a few seconds; nothing is written next to the checkpoint).
    ``logits(x)`` takes float32 (B, 1, S, S) normalised input; ``batch_logits(u8)`` takes the
    preprocessed uint8 (N, S, S) images the torch path takes and normalises them the same way.
    """

    def __init__(
        self,
        source: str | Path | bytes,
        *,
        threads: int = 0,
        device: str | torch.device = "cpu",
        opset: int = DEFAULT_OPSET,
    ) -> None:
        _, ort = _require_onnx()
        self.model: nn.Module | None = None  # the torch model, when built from a checkpoint
        if isinstance(source, bytes):
            data, self.meta = source, read_onnx_metadata(source)
            self.source = "<bytes>"
        else:
            path = Path(source)
            self.source = str(path)
            if _is_onnx_file(path):
                self.meta = read_onnx_metadata(path)
                data = path.read_bytes()
            else:
                self.model, meta = load_checkpoint(path, "cpu")
                data, self.meta = export_graph(self.model, meta, opset=opset), meta
        self.classes: list[str] = list(self.meta["classes"])
        self.spec = Preprocessing.from_dict(self.meta["preprocessing"])
        self.temperature = float((self.meta.get("calibration") or {}).get("temperature", 1.0))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=providers)
        except Exception as exc:
            raise ExportError(f"{self.source}: onnxruntime cannot load the model ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (B, 1, S, S) normalised images -> float32 (B, C) logits."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected (B, 1, S, S) float32 input, got shape {x.shape}")
        return self.session.run(None, {self.input_name: x})[0]

    def batch_logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Preprocessed uint8 (N, S, S) images -> (N, C) logits (same normalisation as the torch path)."""
        out = [
            self.logits(
                normalize(
                    torch.as_tensor(np.array(images[i : i + batch_size])), self.spec.mean, self.spec.std
                ).numpy()
            )
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def probs(self, images: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.batch_logits(images)) / self.temperature, dim=1).numpy()


# ---- parity ----------------------------------------------------------------------------------------


def parity_images(paths: Sequence[Path], spec: Preprocessing, limit: int) -> tuple[np.ndarray, list[Path]]:
    """Up to ``limit`` readable images, preprocessed as the model expects (resize only where the model
    needs a lung mask: parity is about the network, and these are still real X-rays)."""
    from xraydx.io import ImageReadError, read_image

    plain = Preprocessing.from_dict({**spec.to_dict(), "lung_mask": "none"})
    arrs, used = [], []
    for p in paths:
        if len(arrs) >= limit:
            break
        try:
            arrs.append(preprocess(read_image(p), plain))
            used.append(p)
        except (ImageReadError, ValueError):
            continue
    if not arrs:
        return np.zeros((0, spec.size, spec.size), dtype=np.uint8), []
    return np.stack(arrs), used


def check_parity(model: nn.Module, engine: OnnxEngine, images: np.ndarray) -> dict[str, Any]:
    """Max absolute differences between PyTorch (eager, float32, CPU) and onnxruntime on ``images``."""
    from xraydx.predict import batch_logits

    t = engine.temperature
    ref = batch_logits(
        model.to("cpu").eval(), images, engine.spec, torch.device("cpu"), batch_size=16
    ).numpy()
    got = engine.batch_logits(images, batch_size=16)
    pr = torch.softmax(torch.from_numpy(ref) / t, 1).numpy()
    pg = torch.softmax(torch.from_numpy(got) / t, 1).numpy()
    return {
        "n_images": int(len(images)),
        "max_abs_diff_probs": float(np.abs(pr - pg).max()) if len(images) else None,
        "max_abs_diff_logits": float(np.abs(ref - got).max()) if len(images) else None,
        "argmax_agreement": float((pr.argmax(1) == pg.argmax(1)).mean()) if len(images) else None,
    }


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    check_images: Sequence[Path] = (),
    max_images: int = 64,
    opset: int = DEFAULT_OPSET,
    tolerance: float = PARITY_TOLERANCE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export, check parity on ``check_images``, and write ``out`` atomically if within ``tolerance``.

    Returns a report {"out", "written", "parity": {...}, "seconds"}; nothing is written on a parity failure."""
    from xraydx.fsutil import atomic_write_bytes, refuse_overwrite

    out = Path(out)
    refuse_overwrite(out, overwrite)
    t0 = time.perf_counter()
    model, meta = load_checkpoint(checkpoint, "cpu")
    graph = export_graph(model, meta, opset=opset)
    engine = OnnxEngine(with_metadata(graph, meta, {}))
    images, used = parity_images(check_images, engine.spec, max_images)
    if not used:
        raise ExportError("no readable images to check parity on (pass --check-images DIR)")
    parity = check_parity(model, engine, images)
    parity["tolerance"] = tolerance
    parity["passed"] = bool(parity["max_abs_diff_probs"] <= tolerance)
    report: dict[str, Any] = {"out": str(out), "written": False, "parity": parity}
    if parity["passed"]:
        extra = {
            "input": {"name": INPUT_NAME, "shape": ["batch", *meta["input_size"]], "dtype": "float32",
                      "normalisation": "(uint8 / 255 - mean) / std", "mean": engine.spec.mean, "std": engine.spec.std},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", len(meta["classes"])], "kind": "logits"},
            "opset": opset, "exported_from": Path(checkpoint).name, "torch_version": torch.__version__,
            "parity": parity,
        }  # fmt: skip
        atomic_write_bytes(out, with_metadata(graph, meta, extra))
        report["written"] = True
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


# ---- CLI -------------------------------------------------------------------------------------------


def _default_check_dir() -> Path | None:
    d = sample_dir() / "test"
    return d if d.is_dir() else None


def cmd_export(args: argparse.Namespace) -> int:
    from xraydx.predict import expand_inputs

    ckpt = checkpoint_or_default(args.checkpoint)
    check_dir = Path(args.check_images) if args.check_images else _default_check_dir()
    if check_dir is None:
        raise UsageError("no images to check parity on: pass --check-images DIR (real X-rays, any layout)")
    if not check_dir.exists():
        raise UsageError(f"{check_dir}: --check-images folder not found")
    if args.opset < 9:
        raise UsageError(f"--opset must be at least 9; got {args.opset}")
    paths, _ = expand_inputs([check_dir])
    report = export_checkpoint(
        ckpt, args.out, check_images=paths, max_images=args.max_images, opset=args.opset,
        tolerance=args.tolerance, overwrite=args.overwrite,
    )  # fmt: skip
    par = report["parity"]
    print(
        f"parity on {par['n_images']} real images from {check_dir} (PyTorch eager vs onnxruntime, CPU, float32):"
    )
    print(
        f"  max |difference| of probabilities  {par['max_abs_diff_probs']:.3e}   (tolerance {par['tolerance']:.0e})"
    )
    print(f"  max |difference| of logits         {par['max_abs_diff_logits']:.3e}")
    print(f"  same predicted class               {par['argmax_agreement'] * 100:.1f}%")
    if not report["written"]:
        print(f"xraydx: error: parity check failed; {args.out} not written", flush=True)
        return EXIT_FATAL
    print(
        f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB, opset {args.opset}) in {report['seconds']:.1f}s"
    )
    return EXIT_OK


def add_cli(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX and check parity with PyTorch on real images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("--checkpoint", help="xraydx checkpoint (.safetensors)")
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    ex.add_argument(
        "--check-images",
        metavar="DIR",
        help="real images for the parity check (default: the bundled sample's test split)",
    )
    ex.add_argument("--max-images", type=int, default=64, help="at most this many parity images (default 64)")
    ex.add_argument(
        "--tolerance", type=float, default=PARITY_TOLERANCE,
        help=f"max allowed |difference| of probabilities (default {PARITY_TOLERANCE:g})",
    )  # fmt: skip
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.add_argument(
        "-q", "--quiet", action="store_true", help="(accepted for symmetry; export prints a short report)"
    )
    ex.set_defaults(func=cmd_export)
