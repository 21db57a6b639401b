"""Lung-field segmentation: a small U-Net on an ImageNet-pretrained encoder, shipped in the package.

The model (:class:`LungUNet`) is the feature stages of a timm MobileNetV2 (or EfficientNet-Lite0)
with a light decoder: at each of four steps the coarser map is upsampled x2, concatenated with the
encoder's map of that resolution and passed through two 3x3 conv-BN-ReLU layers; a 1x1 conv gives
one logit map at half the input resolution, upsampled bilinearly to the input. Input: the gray
image resized (aspect not kept, like the classifier's preprocessing) to ``S x S`` (256 by default)
and normalised with the encoder's ImageNet statistics. Loss: BCE + soft Dice.

Post-processing (:func:`postprocess`): threshold the probability at 0.5, keep the two largest
connected components (the second only if it is at least :data:`SECOND_COMPONENT_MIN` of the
first: one lung may be hidden by a white-out), fill holes; the cleaned probability map is then
resized to the input image's own size and thresholded, so the mask lines up with the image at any
size.

Training, evaluation and the mask writer are in :mod:`xraydx.segment_train` (layer L4); this module
is the model and its inference only.

Checkpoints are safetensors files with the JSON metadata of :mod:`xraydx.models` (``format``
``xraydx-checkpoint``) and ``"kind": "lung-segmenter"``; :func:`load_segmenter` reads them (never
unpickling). :func:`xraydx.models.load_checkpoint` refuses them with a CheckpointError (their
architecture is not a timm classifier).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraydx.checkpoint import load_weights, read_metadata
from xraydx.constants import DEFAULT_SEGMENTER, SEGMENTER_ENCODERS
from xraydx.errors import SegmenterError
from xraydx.fsutil import file_sha256
from xraydx.models import create_model
from xraydx.transforms import resize_uint8

__all__ = [
    "DEFAULT_SEGMENTER",
    "SEG_KIND",
    "LungSegmenter",
    "LungUNet",
    "SegAnalysis",
    "SegmenterError",
    "dice_iou",
    "load_segmenter",
    "postprocess",
]

SEG_KIND = "lung-segmenter"
ENCODERS = SEGMENTER_ENCODERS
DECODER_CHANNELS = (96, 48, 32, 16)
THRESHOLD = 0.5
SECOND_COMPONENT_MIN = 0.05  # the second lung is kept if its area is at least this share of the first's


# ---- model ---------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class LungUNet(nn.Module):
    """U-Net-style segmenter over the feature stages of a timm MobileNetV2 / EfficientNet-Lite."""

    def __init__(
        self,
        encoder: str = "mobilenetv2_100",
        pretrained: str = "none",
        decoder_channels: Sequence[int] = DECODER_CHANNELS,
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise SegmenterError(f"encoder must be one of {', '.join(ENCODERS)}; got {encoder!r}")
        base = create_model(encoder, 3, in_chans=1, pretrained=pretrained)  # head dropped below
        info = base.feature_info  # timm: the blocks where resolution halves (reductions 2, 4, 8, 16, 32)
        idx = [int(f["module"].split(".")[1]) for f in info]
        chs = [int(f["num_chs"]) for f in info]
        if len(idx) != 5 or len(decoder_channels) != 4:
            raise SegmenterError(f"{encoder}: expected 5 feature stages and 4 decoder widths")
        self.encoder_name = encoder
        self.stem = nn.Sequential(base.conv_stem, base.bn1)
        self.blocks = nn.Sequential(*list(base.blocks)[: idx[-1] + 1])
        self.skip_at = tuple(idx)
        self.feature_channels = tuple(chs)
        dec: list[nn.Module] = []
        cin = chs[-1]
        for skip_ch, cout in zip(reversed(chs[:-1]), decoder_channels, strict=True):
            dec.append(nn.Sequential(_conv_bn_relu(cin + skip_ch, cout), _conv_bn_relu(cout, cout)))
            cin = cout
        self.decoder = nn.ModuleList(dec)
        self.head = nn.Conv2d(cin, 1, 1)
        self.decoder_channels = tuple(int(c) for c in decoder_channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.stem(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.skip_at:
                feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = feats[-1]
        for blk, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat([x, skip], 1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), (x.shape[-2], x.shape[-1]))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self.encode(x)
        return self.decode(feats, (x.shape[-2], x.shape[-1])), feats


# ---- post-processing and metrics -----------------------------------------------------------------


def postprocess(prob: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Cleaned probability map: components other than the two largest zeroed, holes set to 1.

    ``prob``: float (H, W) in [0, 1]. Thresholding the result at ``threshold`` gives a mask with at
    most two components and no holes; resizing it first (bilinear) gives smooth edges at any size.
    """
    from scipy import ndimage

    fg = prob > threshold
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros_like(prob, dtype=np.float32)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    order = np.argsort(areas)[::-1]
    keep = [int(order[0]) + 1]
    if n > 1 and areas[order[1]] >= SECOND_COMPONENT_MIN * areas[order[0]]:
        keep.append(int(order[1]) + 1)
    kept = np.isin(lab, keep)
    filled = ndimage.binary_fill_holes(kept)
    out = np.where(kept, prob, 0.0).astype(np.float32)
    out[filled & ~kept] = 1.0
    return out


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks (any truthy foreground). Both empty counts as perfect."""
    p, t = pred > 0, truth > 0
    inter = float(np.logical_and(p, t).sum())
    ps, ts = float(p.sum()), float(t.sum())
    if ps + ts == 0:
        return 1.0, 1.0
    union = ps + ts - inter
    return 2 * inter / (ps + ts), inter / union


# ---- checkpoint ----------------------------------------------------------------------------------


def read_segmenter_metadata(path: str | Path) -> dict[str, Any]:
    meta = read_metadata(path)
    if meta.get("kind") != SEG_KIND:
        raise SegmenterError(
            f"{path}: an xraydx checkpoint, but not a lung segmenter (kind={meta.get('kind', 'classifier')!r})"
        )
    return meta


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[LungUNet, dict[str, Any]]:
    """Rebuild a :class:`LungUNet` from a lung-segmenter checkpoint (weights cast to float32)."""

    meta = read_segmenter_metadata(path)
    arch = meta.get("architecture", {})
    try:
        model = LungUNet(
            str(arch.get("encoder", "")), pretrained="none", decoder_channels=tuple(arch["decoder_channels"])
        )
    except (KeyError, TypeError) as exc:
        raise SegmenterError(f"{path}: segmenter metadata lacks a usable architecture ({exc})") from exc
    load_weights(
        model, path, SegmenterError, "the segmenter"
    )  # load_state_dict casts half weights to float32
    model.to(device).eval()
    return model, meta


# ---- inference -----------------------------------------------------------------------------------


@dataclass
class SegAnalysis:
    """One image's segmentation: the mask at the image's size and what the OOD guard reads."""

    mask: np.ndarray  # uint8 (H, W), 0 or 255
    prob: np.ndarray  # float32 (S, S): the raw probability at the model's input size
    clean: np.ndarray  # float32 (S, S): after post-processing
    features: np.ndarray  # float32 (D,): pooled encoder features (see LungSegmenter.pooled_features)
    variants: np.ndarray | None = None  # float32 (4, D): the same for the input rotated 90/180/270, inverted


_DEFAULT_CACHE: dict[tuple[str, str], LungSegmenter] = {}
_DEFAULT_LOCK = threading.Lock()


class LungSegmenter:
    """A loaded lung segmenter: uint8 gray images in, uint8 {0, 255} lung masks of the same size out."""

    def __init__(
        self,
        model: LungUNet,
        meta: dict[str, Any],
        device: str | torch.device = "cpu",
        path: Path | None = None,
        engines: tuple[Any, Any] | None = None,
    ) -> None:
        """engines: (segmenter, guard features), each an object with ``run(x) -> [outputs]`` on float32
        (B, 1, S, S) normalised input (:mod:`xraydx.engines`: torch or onnxruntime); None: eager torch here."""
        self.model = model.eval()
        self.meta = meta
        self.device = torch.device(device)
        self.path = path
        self.engines = engines
        self.size = int(meta["input_size"])
        norm = meta["normalization"]
        self.mean, self.std = float(norm["mean"]), float(norm["std"])
        self.threshold = float(meta.get("threshold", THRESHOLD))
        self._identity: str | None = None

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> LungSegmenter:
        model, meta = load_segmenter(path, device)
        return cls(model, meta, device, Path(path))

    @classmethod
    def default(cls, device: str | torch.device = "cpu") -> LungSegmenter:
        """The segmenter shipped in the package (loaded once per device and shared)."""
        if not DEFAULT_SEGMENTER.is_file():
            raise SegmenterError(
                f"{DEFAULT_SEGMENTER}: the shipped lung segmenter is missing from this installation; train one"
                " with `xraydx segment train --data PATH --out DIR` and load it with LungSegmenter.load(path)"
            )
        key = (str(DEFAULT_SEGMENTER), str(torch.device(device)))
        with _DEFAULT_LOCK:
            if key not in _DEFAULT_CACHE:
                _DEFAULT_CACHE[key] = cls.load(DEFAULT_SEGMENTER, device)
            return _DEFAULT_CACHE[key]

    @property
    def identity(self) -> str:
        """A short id of the weights (sha256 of the checkpoint file), for cache keys and OOD statistics."""
        if self._identity is None:
            self._identity = "unsaved" if self.path is None else file_sha256(self.path)[:16]
        return self._identity

    @property
    def cache_tag(self) -> str:
        """Read by xraydx.cache when this segmenter is the ``mask_fn``: cached masked images are keyed by it."""
        return f"lungseg-{self.identity}-t{self.threshold:g}"

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """Same as :meth:`predict_mask`, so the segmenter itself can be passed as ``mask_fn``."""
        return self.predict_mask(img)

    def with_engines(self, segmenter: Any, features: Any) -> LungSegmenter:
        """The same segmenter running its two networks on the given engines (see ``__init__``)."""
        other = LungSegmenter(self.model, self.meta, self.device, self.path, (segmenter, features))
        other._identity = self._identity
        return other

    def input_batch(self, imgs: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 gray images (any size) -> float32 (B, 1, S, S): resized to S x S, (x / 255 - mean) / std."""
        arr = np.stack(
            [
                _check_gray(im)
                if im.shape == (self.size, self.size)
                else resize_uint8(_check_gray(im), self.size)
                for im in imgs
            ]
        )
        x = arr[:, None].astype(np.float32) / np.float32(255.0)
        return (x - np.float32(self.mean)) / np.float32(self.std)

    def variants(self, x: np.ndarray) -> list[np.ndarray]:
        """The normalised batch rotated by 90, 180 and 270 degrees, and inverted (the OOD orientation test)."""
        inv = (
            np.float32(1.0) - (x * np.float32(self.std) + np.float32(self.mean)) - np.float32(self.mean)
        ) / np.float32(self.std)
        return [np.ascontiguousarray(np.rot90(x, k, axes=(2, 3))) for k in (1, 2, 3)] + [inv]

    def _run(self, x: np.ndarray, variants: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Mask logits (B, S, S), pooled features (B, D) and, with ``variants``, their features (B, 4, D)."""
        if self.engines is not None:
            full, feats = self.engines
            logits, pooled = full.run(x)
            var = [feats.run(v)[0] for v in self.variants(x)] if variants else None
        else:
            with torch.inference_mode():
                t = torch.from_numpy(x).to(self.device)
                lg, fm = self.model.forward_with_features(t)
                logits, pooled = lg.float().cpu().numpy(), self.pooled_features(fm).cpu().numpy()
                var = None
                if variants:
                    encode = self.model.encode
                    var = [
                        self.pooled_features(encode(torch.from_numpy(v).to(self.device))).cpu().numpy()
                        for v in self.variants(x)
                    ]
        return logits[:, 0], pooled, np.stack(var, 1) if var is not None else None

    def analyze_many(
        self, imgs: Sequence[np.ndarray], batch_size: int = 16, variants: bool = False
    ) -> list[SegAnalysis]:
        """Masks, cleaned probabilities and pooled encoder features; with ``variants``, also the features of
        the input rotated by 90, 180 and 270 degrees and inverted (four more encoder passes, for the OOD
        guard's orientation test)."""
        out: list[SegAnalysis] = []
        for i in range(0, len(imgs), batch_size):
            chunk = imgs[i : i + batch_size]
            logits, pooled, vf = self._run(self.input_batch(chunk), variants)
            probs = torch.sigmoid(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))).numpy()
            var: list[np.ndarray | None] = list(vf) if vf is not None else [None] * len(chunk)
            for im, p, f, v in zip(chunk, probs, pooled, var, strict=True):
                clean = postprocess(p, self.threshold)
                out.append(SegAnalysis(self._to_size(clean, im.shape), p, clean, f, v))
        return out

    def analyze(self, img: np.ndarray) -> SegAnalysis:
        return self.analyze_many([img])[0]

    def predict_mask(self, img: np.ndarray) -> np.ndarray:
        """uint8 (H, W) gray image -> uint8 (H, W) mask, 255 = lung."""
        return self.analyze(img).mask

    def predict_masks(self, imgs: Sequence[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
        return [a.mask for a in self.analyze_many(imgs, batch_size)]

    @staticmethod
    def pooled_features(feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, D) descriptor: global mean of the /16 and /32 encoder maps, and the /32 map averaged over a
        2 x 2 grid (so where things are counts, not only what they are)."""
        f16, f32 = feats[-2].float(), feats[-1].float()
        return torch.cat([f16.mean(dim=(2, 3)), f32.mean(dim=(2, 3)), _grid_means(f32, 2)], 1)

    def _to_size(self, clean: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        h, w = int(shape[0]), int(shape[1])
        if (h, w) == clean.shape:
            big = clean
        else:
            t = torch.from_numpy(clean)[None, None]
            big = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        return np.where(big > self.threshold, 255, 0).astype(np.uint8)


def _grid_means(x: torch.Tensor, n: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, n).flatten(1)`` written as slices (cells [floor(i*h/n), ceil((i+1)*h/n)),
    as adaptive pooling takes them), so the ONNX exporter takes it at any map size (7 x 7 into 2 x 2)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    rows = [(i * h // n, -(-(i + 1) * h // n)) for i in range(n)]
    cols = [(j * w // n, -(-(j + 1) * w // n)) for j in range(n)]
    cells = [x[:, :, a:b, c:d].mean(dim=(2, 3)) for a, b in rows for c, d in cols]
    return torch.stack(cells, 2).flatten(1)


def _check_gray(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype != np.uint8:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"expected a 2-D uint8 gray image, got {desc}")
    return img
