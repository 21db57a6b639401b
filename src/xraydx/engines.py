"""Inference engines: the three networks of the pipeline on PyTorch or onnxruntime, behind one interface.

The networks (each takes the *normalised* float image ``image``: float32 (B, 1, S, S) =
(uint8 / 255 - mean) / std, batch axis dynamic):

==================  =====================================================  ==========================
network             outputs                                                what the pipeline reads
==================  =====================================================  ==========================
``classifier``      ``logits`` (B, C)                                      softmax(logits / T)
``segmenter``       ``mask_logits`` (B, 1, S, S), ``features`` (B, D)      sigmoid(mask_logits), features
``guard-features``  ``features`` (B, D): the segmenter's encoder, pooled   features
==================  =====================================================  ==========================

An :class:`Engine` runs one network: ``run(x) -> [outputs]`` (float32 numpy in, float32 numpy out,
in the order above). :class:`TorchEngine` is eager PyTorch; :class:`~xraydx.onnxio.OnnxEngine` is onnxruntime
(:mod:`xraydx.onnxio`: the session, and the metadata of an ONNX file). :func:`make_engine` gives
either for a :class:`Network`; with ``onnx`` the network is exported once per checkpoint and cached
(see :func:`onnx_cache_dir`: ``<kind>-<sha256 of the checkpoint>-<export settings>.onnx``), so the
second run only loads the file.

**Parity: one probe, one tolerance.** Every export, cached or written by ``xraydx export``, is
checked by :func:`check_parity` before it is used: the same real chest X-rays go through eager
PyTorch (CPU, float32) and onnxruntime, and for every quantity the pipeline reads (the right column
above) the largest difference must satisfy

    max |onnx - torch|  <=  PARITY_TOLERANCE * max(1, max |torch|)        (PARITY_TOLERANCE = 1e-4)

For the probabilities (classifier, segmenter mask) that is an absolute 1e-4, the tolerance the
classifier export always had; for the unbounded guard features it is relative to their largest
value, so float32 rounding that grows with magnitude passes while a real mismatch (a wrong op,
normalisation or weight: differences of 1e-2 and more) fails. Random noise is not a probe: it is
far from anything the networks see. The probe images are the real X-rays shipped in
``weights/probe__*.png`` (8 images of the bundled sample's test split) (``xraydx export --check-images DIR`` may give others); the result is stored in
the ONNX file's metadata (key ``"xraydx"``) with the rest of the checkpoint's metadata.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from xraydx import tta as _tta
from xraydx.abstention import members_agree
from xraydx.constants import ENGINES, WEIGHTS_DIR
from xraydx.errors import ExportError
from xraydx.fsutil import file_sha256
from xraydx.io import ImageReadError, read_image
from xraydx.onnxio import (
    META_KEY,
    OnnxEngine,
    is_onnx_file,
    read_onnx_doc,
    read_onnx_metadata,
    require_onnx,
    with_metadata,
)

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
INPUT_NAME = "image"
PROBE_GLOB = "probe__*.png"  # real chest X-rays shipped in weights/ (8 of data/sample/test)
EXPORT_VERSION = 2  # bump when the exported graphs change, so cached files are made again (2: member_logp)
PARITY_BATCH = 16

Readout = Callable[[list[np.ndarray]], dict[str, np.ndarray]]


# ---- networks ----------------------------------------------------------------------------------------


@dataclass
class Network:
    """One network of the pipeline: a torch module and what is needed to export, probe and cache it."""

    kind: str  # classifier | segmenter | guard-features
    module: nn.Module  # float32 (B, 1, S, S) -> one tensor or a tuple, in ``outputs`` order
    size: int
    mean: float
    std: float
    outputs: tuple[str, ...]
    readout: Readout  # raw outputs -> what the pipeline reads (what parity compares)
    probe_prepare: Callable[[np.ndarray], np.ndarray]  # a raw gray image -> uint8 (S, S) input
    source: Path | None = None  # the checkpoint (its sha256 keys the ONNX cache)
    meta: dict[str, Any] = field(default_factory=dict)  # stored in the ONNX file
    info: dict[str, Any] = field(default_factory=dict)  # more of the file's "onnx" metadata
    autocast: bool = False  # bfloat16 autocast of the torch engine on CUDA (the classifier, as trained)

    def normalise(self, u8: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S) -> float32 (N, 1, S, S) = (u8 / 255 - mean) / std."""
        return normalise(u8, self.mean, self.std)


class _MembersGraph(nn.Module):
    """An ensemble (:class:`xraydx.models.SeedEnsemble`) as the graph the engines run: its output and each
    member's calibrated log-probabilities, from one pass (what the ``members_disagree`` rule reads)."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ensemble.forward_members(x)  # type: ignore[operator,no-any-return]


def classifier_graph(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """The module an engine runs for a classifier and its output names: ``logits`` (B, C), and for an
    ensemble also ``member_logp`` (B, M, C)."""
    if hasattr(model, "forward_members"):
        return _MembersGraph(model), ("logits", "member_logp")
    return model, ("logits",)


def classifier_network(model: nn.Module, meta: dict[str, Any], source: Path | None = None) -> Network:
    """A timm classifier and its checkpoint metadata (``source``: the checkpoint file, for the cache)."""
    from xraydx.transforms import Preprocessing, preprocess

    spec = Preprocessing.from_dict(meta["preprocessing"])
    t = float((meta.get("calibration") or {}).get("temperature", 1.0))
    # parity is about the network: no lung mask (these are still real X-rays, resized as the model expects)
    plain = Preprocessing.from_dict({**spec.to_dict(), "lung_mask": "none"})
    module, outputs = classifier_graph(model)
    n = len(meta["classes"])
    info: dict[str, Any] = {"output": {"name": "logits", "shape": ["batch", n], "kind": "logits"}}
    if len(outputs) > 1:
        info["member_output"] = {
            "name": "member_logp", "shape": ["batch", len(getattr(model, "members", [])), n],
            "kind": "each member's log softmax(logits / its temperature)",
        }  # fmt: skip

    def readout(out: list[np.ndarray]) -> dict[str, np.ndarray]:
        got = {"probs": softmax(out[0], t)}
        if len(out) > 1:
            got["member_probs"] = np.exp(out[1])
        return got

    return Network(
        "classifier", module, spec.size, spec.mean, spec.std, outputs, readout, lambda img: preprocess(img, plain),
        source, meta, info, autocast=True,
    )  # fmt: skip


class _SegmenterGraph(nn.Module):
    def __init__(self, unet: nn.Module, pool: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        super().__init__()
        self.unet, self.pool = unet, pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.unet.forward_with_features(x)
        return logits, self.pool(feats)


class _FeatureGraph(nn.Module):
    def __init__(self, unet: nn.Module, pool: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        super().__init__()
        self.unet, self.pool = unet, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.unet.encode(x))


def segmenter_networks(seg: Any) -> tuple[Network, Network]:
    """The segmenter (mask + pooled features) and the guard's feature network (encoder + pooling) of a
    :class:`xraydx.segment.LungSegmenter`."""
    from xraydx.transforms import resize_uint8

    def prep(img: np.ndarray) -> np.ndarray:
        return resize_uint8(img, seg.size)

    meta = {
        "kind": "lung-segmenter",
        "architecture": seg.meta.get("architecture"),
        "threshold": seg.threshold,
    }
    common = {"size": seg.size, "mean": seg.mean, "std": seg.std, "probe_prepare": prep, "source": seg.path}
    full = Network(
        "segmenter", _SegmenterGraph(seg.model, seg.pooled_features).eval(), outputs=("mask_logits", "features"),
        readout=lambda out: {"mask_probability": _sigmoid(out[0]), "features": out[1]}, meta=meta, **common,
    )  # fmt: skip
    feats = Network(
        "guard-features", _FeatureGraph(seg.model, seg.pooled_features).eval(), outputs=("features",),
        readout=lambda out: {"features": out[0]}, meta=meta, **common,
    )  # fmt: skip
    return full, feats


def normalise(u8: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 (N, S, S) -> float32 (N, 1, S, S) = (u8 / 255 - mean) / std, as transforms.normalize does on
    tensors (read-only arrays such as memmaps are fine)."""
    x = np.asarray(u8, dtype=np.float32)[:, None] / np.float32(255.0)
    return (x - np.float32(mean)) / np.float32(std)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, float32 (the probabilities every engine reports)."""
    z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)) / float(temperature)
    return torch.softmax(z, dim=-1).numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return torch.sigmoid(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


# ---- engines -----------------------------------------------------------------------------------------


class Engine(Protocol):
    name: str

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """float32 (B, 1, S, S) normalised images -> the network's outputs, float32, in order."""
        ...


class TorchEngine:
    """Eager PyTorch (``torch.inference_mode``; with ``autocast``, bfloat16 autocast on CUDA)."""

    name = "torch"

    def __init__(self, module: nn.Module, device: str | torch.device = "cpu", autocast: bool = True) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.autocast = autocast and self.device.type == "cuda"

    @torch.inference_mode()
    def run(self, x: np.ndarray) -> list[np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            y = self.module(t)
        return [o.float().cpu().numpy() for o in (y if isinstance(y, (tuple, list)) else (y,))]


def run_batched(engine: Engine, x: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """``engine.run`` over ``x`` in chunks of ``batch_size``, outputs concatenated."""
    parts = [engine.run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if not parts:
        raise ValueError("no input")
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


# ---- export ----------------------------------------------------------------------------------------


def export_onnx(net: Network, *, opset: int = DEFAULT_OPSET) -> bytes:
    """The network as ONNX bytes (TorchScript exporter, dynamic batch), checked by onnx.checker."""
    onnx, _ = require_onnx()
    module = net.module.to("cpu").eval()
    dummy = torch.zeros((2, 1, net.size, net.size), dtype=torch.float32)
    axes = {n: {0: "batch"} for n in (INPUT_NAME, *net.outputs)}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                module, (dummy,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=list(net.outputs), dynamic_axes=axes, do_constant_folding=True,
            )  # fmt: skip
    except Exception as exc:  # the exporter raises many types; all mean "this network cannot be exported"
        name = (net.meta.get("architecture") or {}).get("name", net.kind)
        raise ExportError(f"ONNX export of {name} failed: {exc}") from exc
    data = buf.getvalue()
    try:
        onnx.checker.check_model(onnx.load_from_string(data))
    except Exception as exc:
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    return data


# ---- parity ------------------------------------------------------------------------------------------


def probe_images(net: Network, paths: Sequence[Path] | None = None, limit: int = 64) -> np.ndarray:
    """Up to ``limit`` readable real images from ``paths`` (default: the shipped probe X-rays), prepared
    as ``net`` takes them: uint8 (N, S, S)."""
    if paths is None:
        paths = sorted(WEIGHTS_DIR.glob(PROBE_GLOB))
    arrs = []
    for p in paths:
        if len(arrs) >= limit:
            break
        try:
            arrs.append(net.probe_prepare(read_image(p)))
        except (ImageReadError, ValueError):
            continue
    return np.stack(arrs) if arrs else np.zeros((0, net.size, net.size), np.uint8)


def check_parity(
    net: Network, engine: Engine, images: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> dict[str, Any]:
    """The one parity probe: ``images`` (uint8 (N, S, S), real X-rays) through eager PyTorch (CPU, float32)
    and ``engine``; every readout compared by the one rule (module doc). Returns the differences and
    ``passed``."""
    if not len(images):
        raise ExportError("no readable real images to check ONNX parity on")
    x = net.normalise(images)
    ref_raw = run_batched(TorchEngine(net.module, "cpu"), x, PARITY_BATCH)
    got_raw = run_batched(engine, x, PARITY_BATCH)
    ref, got = net.readout(ref_raw), net.readout(got_raw)
    report: dict[str, Any] = {"n_images": int(len(images)), "tolerance": tolerance, "rule": _RULE}
    worst = 0.0
    for name in ref:
        diff = float(np.abs(ref[name] - got[name]).max())
        scale = max(1.0, float(np.abs(ref[name]).max()))
        report[f"max_abs_diff_{name}"] = diff
        worst = max(worst, diff / scale)
    for name, r, g in zip(net.outputs, ref_raw, got_raw, strict=True):
        report.setdefault(f"max_abs_diff_{name}", float(np.abs(r - g).max()))
    if "probs" in ref:
        report["argmax_agreement"] = float((ref["probs"].argmax(1) == got["probs"].argmax(1)).mean())
    report["error"] = worst
    report["passed"] = bool(worst <= tolerance)
    return report


_RULE = "max|onnx - torch| <= tolerance * max(1, max|torch|) for every readout, on real X-rays"


# ---- the ONNX cache ----------------------------------------------------------------------------------


def onnx_cache_dir() -> Path:
    """Where exported networks are kept: ``$XRAYDX_CACHE_DIR/onnx``, else ``$XDG_CACHE_HOME/xraydx/onnx``,
    else ``~/.cache/xraydx/onnx``."""
    root = os.environ.get("XRAYDX_CACHE_DIR")
    if root:
        return Path(root) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "xraydx" / "onnx"


def cache_path(net: Network, opset: int = DEFAULT_OPSET) -> Path | None:
    """``<kind>-<sha256[:16] of the checkpoint>-<settings[:8]>.onnx``; None for a network without a file."""
    if net.source is None:
        return None
    settings = f"v{EXPORT_VERSION}-opset{opset}-torch{torch.__version__}-tol{PARITY_TOLERANCE:g}-s{net.size}"
    tag = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return onnx_cache_dir() / f"{net.kind}-{file_sha256(net.source)[:16]}-{tag}.onnx"


def export_checked(
    net: Network, images: np.ndarray, *, opset: int = DEFAULT_OPSET, tolerance: float = PARITY_TOLERANCE,
    threads: int = 0,
) -> tuple[bytes, dict[str, Any]]:  # fmt: skip
    """Export ``net`` and run the parity probe on ``images``: (ONNX bytes with the metadata, parity report).
    The bytes are only meant to be used where ``report["passed"]``."""
    graph = export_onnx(net, opset=opset)
    parity = check_parity(net, OnnxEngine(graph, threads=threads), images, tolerance)
    extra = {
        "network": net.kind, "input": {"name": INPUT_NAME, "shape": ["batch", 1, net.size, net.size],
        "dtype": "float32", "normalisation": "(uint8 / 255 - mean) / std", "mean": net.mean, "std": net.std},
        "outputs": list(net.outputs), "opset": opset, "torch_version": torch.__version__, "parity": parity,
        "exported_from": net.source.name if net.source is not None else None, **net.info,
    }  # fmt: skip
    desc = (
        f"xraydx {net.kind}: input '{INPUT_NAME}' float32 (B,1,{net.size},{net.size}) = (uint8/255 - mean)/std;"
        f" outputs {', '.join(net.outputs)}; metadata as JSON in metadata_props['{META_KEY}']"
    )
    return with_metadata(graph, {**net.meta, "onnx": extra}, desc), parity


def onnx_engine(net: Network, *, threads: int = 0, device: str | torch.device = "cpu") -> OnnxEngine:
    """``net`` on onnxruntime: the cached export when there is one, else exported, probed and cached
    (an ExportError, and nothing cached, when the probe fails)."""
    from xraydx.fsutil import atomic_write_bytes

    path = cache_path(net)
    if path is not None and path.is_file():
        try:
            doc = read_onnx_doc(path)
            if (doc.get("onnx") or {}).get("parity", {}).get("passed") is True:
                return OnnxEngine(path.read_bytes(), source=str(path), threads=threads, device=device)
        except ExportError:
            pass  # a damaged cache file: made again below
    data, parity = export_checked(net, probe_images(net), threads=threads)
    if not parity["passed"]:
        raise ExportError(
            f"the ONNX export of the {net.kind} disagrees with PyTorch on real X-rays (error"
            f" {parity['error']:.2e} > {parity['tolerance']:g}); use --engine torch"
        )
    if path is not None:
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:  # a read-only home: the export is used from memory this time
            warnings.warn(f"cannot cache the ONNX export in {path.parent} ({exc})", stacklevel=2)
    return OnnxEngine(data, source=str(path or f"<{net.kind}>"), threads=threads, device=device)


def make_engine(
    net: Network, name: str = "torch", *, device: str | torch.device = "cpu", threads: int = 0
) -> Engine:
    """``net`` on ``torch`` or ``onnx``."""
    if name == "torch":
        return TorchEngine(net.module, device, net.autocast)
    if name == "onnx":
        return onnx_engine(net, threads=threads, device=device)
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {name!r}")


# ---- the classifier ----------------------------------------------------------------------------------


def batch_logits(
    model: nn.Module, images: np.ndarray | torch.Tensor, spec: Any, device: torch.device, batch_size: int = 64
) -> torch.Tensor:
    """Logits (N, C) on CPU of a torch classifier for preprocessed uint8 images (N, S, S)."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    if not len(images):
        return torch.zeros((0, 0))
    eng = TorchEngine(model, device)
    return torch.from_numpy(spec_logits(lambda x: eng.run(x)[0], images, spec, batch_size))


def batch_outputs(
    model: nn.Module, images: np.ndarray, spec: Any, device: torch.device, batch_size: int = 64
) -> tuple[torch.Tensor, np.ndarray | None]:
    """:func:`batch_logits` and, for an ensemble, whether its members agree on each image ((N,) bool;
    None for a single network), from one pass."""
    module, outputs = classifier_graph(model)
    if len(outputs) == 1 or not len(images):
        return batch_logits(model, images, spec, device, batch_size), None
    eng = TorchEngine(module, device)
    wide = spec_logits(lambda x: joined(eng.run(x)), images, spec, batch_size)
    logits, agree = split_outputs(wide, int(model.num_classes))
    return torch.from_numpy(logits), agree


def joined(out: list[np.ndarray]) -> np.ndarray:
    """A classifier engine's outputs as one (B, C [+ M * C]) matrix: logits, then the members'
    log-probabilities where there are any, so that test-time views average both alike."""
    if len(out) == 1:
        return out[0]
    return np.concatenate([out[0], out[1].reshape(len(out[1]), -1)], axis=1)


def split_outputs(wide: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`joined`'s matrix -> (logits (N, C), the members' agreement (N,) bool or None)."""
    if wide.shape[1] == n_classes:
        return wide, None
    return wide[:, :n_classes], members_agree(wide[:, n_classes:].reshape(len(wide), -1, n_classes))


def spec_logits(
    forward: Callable[[np.ndarray], np.ndarray], images: np.ndarray, spec: Any, batch_size: int = 64
) -> np.ndarray:
    """``forward`` (normalised float32 (B, 1, S, S) -> logits (B, C)) over preprocessed uint8 (N, S, S)
    images in batches, normalised by ``spec`` and averaged over its test-time views (:mod:`xraydx.tta`)."""

    def run(u8: np.ndarray) -> np.ndarray:
        out = [
            forward(normalise(u8[i : i + batch_size], spec.mean, spec.std))
            for i in range(0, len(u8), batch_size)
        ]
        return np.concatenate(out)

    return _tta.mean_logits(run, images, spec.tta)


class Classifier:
    """A classifier on one engine: preprocessed uint8 images (N, S, S) in, logits or calibrated
    probabilities out.

    ``source``: an xraydx checkpoint (``.safetensors``) on either engine; with ``engine="onnx"`` also an
    exported ``.onnx`` file or its bytes (then ``model`` is None: no Grad-CAM)."""

    def __init__(
        self, source: str | Path | bytes, engine: str = "torch", *, device: str | torch.device = "cpu",
        threads: int = 0, tta: str | None = None,
    ) -> None:  # fmt: skip
        from xraydx.models import load_checkpoint
        from xraydx.transforms import Preprocessing

        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
        self.device = torch.device(device)
        self.model: nn.Module | None = None
        self.source = "<bytes>" if isinstance(source, bytes) else str(source)
        if isinstance(source, bytes) or is_onnx_file(Path(source)):
            if engine != "onnx":
                raise ExportError(f"{self.source}: an ONNX model runs with engine onnx only")
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            self.meta = read_onnx_metadata(data if isinstance(source, bytes) else Path(source))
            self.engine: Engine = OnnxEngine(data, source=self.source, threads=threads, device=device)
        else:
            self.model, self.meta = load_checkpoint(source, "cpu")
            net = classifier_network(self.model, self.meta, Path(source))
            self.engine = make_engine(net, engine, device=device, threads=threads)
            self.model.to(self.device)
        self.classes: list[str] = list(self.meta["classes"])
        self.spec = Preprocessing.from_dict(self.meta["preprocessing"])
        if tta is not None:  # override the checkpoint's test-time augmentation (xraydx.tta)
            self.spec = Preprocessing.from_dict({**self.spec.to_dict(), "tta": _tta.check_mode(tta)})
        self.temperature = float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    def use_model(self, model: nn.Module) -> None:
        """Classify with ``model`` from now on (same architecture and metadata: e.g. a copy whose
        BatchNorm statistics were adapted, :mod:`xraydx.bnadapt`); torch engine only."""
        if not isinstance(self.engine, TorchEngine):
            raise ExportError(f"{self.source}: only the torch engine can swap its network")
        self.model = model.to(self.device).eval()
        self.engine = make_engine(classifier_network(model, self.meta), "torch", device=self.device)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (B, 1, S, S) normalised images -> float32 (B, C) logits."""
        return self.engine.run(x)[0]

    def outputs(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed uint8 (N, S, S) images -> ((N, C) logits, averaged over the test-time views where
        the checkpoint's preprocessing asks for them (:mod:`xraydx.tta`); for an ensemble, whether its
        members' top classes agree on each image ((N,) bool), else None)."""
        if not len(images):
            return np.zeros((0, len(self.classes)), dtype=np.float32), None
        wide = spec_logits(lambda x: joined(self.engine.run(x)), images, self.spec, batch_size)
        return split_outputs(wide, len(self.classes))

    def batch_logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """:meth:`outputs`' logits."""
        return self.outputs(images, batch_size)[0]

    def probs(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities softmax(logits / temperature), (N, C)."""
        return self.probs_agree(images, batch_size)[0]

    def probs_agree(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`probs` and the members' agreement of :meth:`outputs` (None for a single network)."""
        logits, agree = self.outputs(images, batch_size)
        return softmax(logits, self.temperature), agree


# ---- the lung segmenter ------------------------------------------------------------------------------

_SEGMENTERS: dict[tuple[str, str, int], Any] = {}
_SEG_LOCK = threading.Lock()


def lung_segmenter(engine: str = "torch", device: str | torch.device = "cpu", threads: int = 0) -> Any:
    """The shipped :class:`xraydx.segment.LungSegmenter` with its two networks (segmenter, guard features)
    on ``engine``; made once per process and shared (the OOD guard and the lung masks use the same one)."""
    from xraydx.segment import LungSegmenter

    key = (engine, str(torch.device(device)), int(threads))
    with _SEG_LOCK:
        if key not in _SEGMENTERS:
            seg = LungSegmenter.default(device)
            full, feats = segmenter_networks(seg)
            run = [make_engine(n, engine, device=device, threads=threads) for n in (full, feats)]
            _SEGMENTERS[key] = seg.with_engines(*run)
        return _SEGMENTERS[key]
