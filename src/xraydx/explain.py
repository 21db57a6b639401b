"""Grad-CAM saliency maps, written on PyTorch autograd (no pytorch-grad-cam dependency), and overlays.

Grad-CAM (Selvaraju et al., ICCV 2017): take the last convolutional feature map A (C, h, w) and the
gradient of the chosen class's logit with respect to it; weight each channel by its mean gradient,
sum over channels, keep the positive part, upsample to the input size (bilinear) and divide by the
maximum, giving a heat map in [0, 1]. For timm models the feature map is ``forward_features``' output
(``forward_head`` then gives the logits, exactly as ``model(x)`` does); ViT-style token outputs are
folded back into their patch grid; other models get a forward hook on their last ``Conv2d``, or on a
module named with ``target_layer``.

Overlays are drawn on the preprocessed image (what the model saw, at the model's input size).

``xraydx explain --checkpoint CKPT INPUTS... --out DIR`` writes ``<stem>__<class>.png`` for the
predicted class of each image (``--all-classes``: one per class) and an index ``explain.csv``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraydx.errors import printable
from xraydx.fsutil import csv_writer
from xraydx.render import COLORMAP as COLORMAP
from xraydx.render import heat_overlay as overlay
from xraydx.render import heat_overlay_png as overlay_png
from xraydx.render import heat_png as heat_png
from xraydx.transforms import Preprocessing, normalize, resize_uint8

__all__ = ["GradCAM", "heat_png", "lung_share", "overlay", "overlay_png", "with_heatmaps"]


def _last_conv(model: nn.Module) -> nn.Module:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    if last is None:
        raise ValueError("Grad-CAM needs a convolutional feature map: the model has no Conv2d layer")
    return last


class GradCAM:
    """Grad-CAM for a classifier taking normalised (B, 1, S, S) input.

    ``cam(img)`` -> (heat float32 (S, S) in [0, 1], probs (K,)) for the predicted class, or for
    ``class_idx``. ``probs`` are softmax(logits / temperature) (pass the checkpoint's temperature to
    get the calibrated probabilities Predictor reports). A heat map that is zero everywhere (no
    positive evidence in the feature map) is returned as zeros."""

    def __init__(
        self,
        model: nn.Module,
        spec: Preprocessing,
        *,
        temperature: float = 1.0,
        target_layer: str | nn.Module | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.temperature = float(temperature)
        if isinstance(target_layer, str):
            mods = dict(model.named_modules())
            if target_layer not in mods:
                raise ValueError(f"no module named {target_layer!r} in the model")
            target_layer = mods[target_layer]
        self._layer: nn.Module | None = target_layer
        if self._layer is None and not (
            hasattr(model, "forward_features") and hasattr(model, "forward_head")
        ):
            self._layer = _last_conv(model)
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")

    # -- feature map and logits --------------------------------------------------------------------

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layer is None:
            feats = self.model.forward_features(x)  # type: ignore[operator]
            if feats.ndim in (3, 4):
                return feats, self.model.forward_head(feats)  # type: ignore[operator]
            self._layer = _last_conv(self.model)  # pooled features: fall back to a hook
        box: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            box["a"] = out[0] if isinstance(out, tuple) else out

        h = self._layer.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            h.remove()
        if "a" not in box:
            raise RuntimeError("the Grad-CAM target layer was not run in the forward pass")
        return box["a"], logits

    def _grid(self, a: torch.Tensor) -> torch.Tensor:
        """Feature activations (or their gradients) as (B, C, h, w)."""
        if a.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC" and self._layer is None:
                return a.permute(0, 3, 1, 2)
            return a
        if a.ndim == 3:  # tokens (B, N, C): drop class / register tokens, fold the rest into a square
            n_prefix = int(getattr(self.model, "num_prefix_tokens", 0))
            t = a[:, n_prefix:]
            side = int(round(t.shape[1] ** 0.5))
            if side * side != t.shape[1]:
                raise ValueError(f"cannot fold {t.shape[1]} tokens into a square grid for Grad-CAM")
            return t.transpose(1, 2).reshape(a.shape[0], a.shape[2], side, side)
        raise ValueError(f"unsupported feature shape {tuple(a.shape)} for Grad-CAM")

    # -- public ------------------------------------------------------------------------------------

    def batch(
        self, images: np.ndarray, class_idx: int | Sequence[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Heat maps (N, S, S) float32 in [0, 1] and probabilities (N, K) for uint8 images (N, S, S).

        class_idx: None = each image's predicted class; an int = that class for all; a sequence = one
        class per image."""
        arr = np.asarray(images)
        if arr.ndim != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected preprocessed uint8 images (N, S, S); got {arr.dtype} {arr.shape}")
        n, s = arr.shape[0], arr.shape[1]
        if n == 0:
            return np.zeros((0, s, s), np.float32), np.zeros((0, 0), np.float32)
        self.model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            x = normalize(
                torch.from_numpy(np.array(arr, dtype=np.uint8)).to(self.device), self.spec.mean, self.spec.std
            )
            x.requires_grad_(True)  # a graph to the features even if every weight is frozen
            feats, logits = self._forward(x)
            logits = logits.float()
            probs = torch.softmax(logits.detach() / self.temperature, dim=1)
            if class_idx is None:
                target = logits.detach().argmax(dim=1)
            elif isinstance(class_idx, (int, np.integer)):
                target = torch.full((n,), int(class_idx), dtype=torch.long, device=logits.device)
            else:
                target = torch.as_tensor(np.asarray(class_idx), dtype=torch.long, device=logits.device)
                if target.shape != (n,):
                    raise ValueError(
                        f"class_idx must give one class per image; got shape {tuple(target.shape)}"
                    )
            k = logits.shape[1]
            if bool(((target < 0) | (target >= k)).any()):
                raise ValueError(f"class_idx out of range for {k} classes")
            # in eval mode the images are independent, so d(sum of chosen logits)/dA is per-image
            chosen = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, feats)
        a = self._grid(feats.detach().float())
        g = self._grid(grad.float())
        cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=(s, arr.shape[2]), mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
        cam = torch.where(peak > 1e-12, cam / peak, torch.zeros_like(cam)).clamp_(0, 1)
        return cam.cpu().numpy().astype(np.float32), probs.cpu().numpy().astype(np.float32)

    def __call__(self, img: np.ndarray, class_idx: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if img.ndim != 2:
            raise ValueError(f"expected one preprocessed uint8 image (S, S); got shape {img.shape}")
        heat, probs = self.batch(img[None], class_idx)
        return heat[0], probs[0]

    def all_classes(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One heat map per class for one image: (K, S, S) and probs (K,)."""
        _, probs = self(img)
        k = len(probs)
        heats, _ = self.batch(np.repeat(img[None], k, axis=0), np.arange(k))
        return heats, probs


# ---- drawing -------------------------------------------------------------------------------------


def lung_share(heat: np.ndarray, lung_mask: np.ndarray) -> float:
    """Share of the saliency mass inside the lung mask (any size: resized to the heat map).

    NaN when the heat map is zero everywhere. Masks may be bool, 0/1 or 0/255."""
    m = np.asarray(lung_mask)
    fg = m > 127 if m.dtype == np.uint8 and m.max() > 1 else m > 0
    if fg.shape != heat.shape:
        fg = resize_uint8(fg.astype(np.uint8) * 255, heat.shape[:2]) > 127
    total = float(np.asarray(heat, dtype=np.float64).sum())
    if total <= 0:
        return float("nan")
    return float(np.asarray(heat, dtype=np.float64)[fg].sum() / total)


# ---- files ---------------------------------------------------------------------------------------


def safe_stem(path: str | Path) -> str:
    return re.sub(r"[^\w.\-]+", "_", Path(path).stem).strip("._") or "image"


class _Names:
    """Unique output stems within one run (two inputs called a.png in different folders)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, path: str | Path) -> str:
        base = safe_stem(path)
        stem, i = base, 2
        while stem in self.used:
            stem, i = f"{base}-{i}", i + 1
        self.used.add(stem)
        return stem


def _write_png(path: Path, data: bytes, overwrite: bool) -> None:
    from xraydx.fsutil import atomic_write_bytes, refuse_overwrite

    refuse_overwrite(path, overwrite)
    atomic_write_bytes(path, data)


def with_heatmaps(
    predictor: Any, preds: Iterable[Any], out_dir: Path, *, overwrite: bool = False, alpha: float = 0.45
) -> Iterator[Any]:
    """Pass predictions through, writing a Grad-CAM overlay of each one's predicted class to
    ``out_dir/<stem>__<class>.png`` and naming it in ``extra["heatmap"]`` (used by predict --heatmaps)."""
    from xraydx.io import ImageReadError, read_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cam = GradCAM(predictor.model, predictor.spec, temperature=predictor.temperature)
    names = _Names()
    for p in preds:
        if p.probs is not None:
            try:
                img = predictor.prepare(read_image(p.path))
            except (ImageReadError, ValueError) as exc:
                p.extra["heatmap"] = f"error: {exc.reason if isinstance(exc, ImageReadError) else exc}"
            else:
                k = int(np.argmax(p.probs))
                heat, _ = cam(img, k)
                name = f"{names(p.path)}__{predictor.classes[k]}.png"
                _write_png(out_dir / name, overlay_png(img, heat, alpha), overwrite)
                p.extra["heatmap"] = name
        yield p


def explain_files(
    checkpoint: str | Path,
    inputs: Sequence[str],
    out_dir: Path,
    *,
    all_classes: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    alpha: float = 0.45,
    progress: bool = True,
) -> dict[str, int]:
    """Grad-CAM overlays for files / folders / list files; returns counts {"ok": images explained, "error":
    unreadable, "overlays": PNG files written (one per image, or one per class with ``all_classes``)}."""
    from tqdm.auto import tqdm

    from xraydx import schema
    from xraydx.fsutil import atomic_open, refuse_overwrite
    from xraydx.predict import NONFINITE, Predictor, decode_ahead, expand_inputs, finite

    out_dir = Path(out_dir)
    index = out_dir / "explain.csv"
    refuse_overwrite(index, overwrite)
    paths, missing = expand_inputs(inputs)
    if not paths and not missing:
        raise ValueError("no image files found in the inputs given")
    pred = Predictor(checkpoint, device)
    cam = GradCAM(pred.model, pred.spec, temperature=pred.temperature)
    classes = pred.classes
    cols = schema.columns(classes, "explain")
    names = _Names()
    counts = {"ok": 0, "error": 0, "overlays": 0}
    out_dir.mkdir(parents=True, exist_ok=True)

    def error(path: Any, reason: str) -> list[str]:
        counts["error"] += 1
        print(f"xraydx: {printable(path)}: {printable(reason)}", file=sys.stderr)
        return schema.csv_cells(
            schema.error_row(str(path), classes, reason, model=pred.model_id, kind="explain"), cols
        )

    with atomic_open(index, "w", encoding="utf-8", newline="") as fh:
        w = csv_writer(fh)
        w.writerow(cols)
        for p, reason in missing:
            w.writerow(error(p, reason))
        decoded = decode_ahead(paths, colour=pred.ood_guard() is not None)
        for d in tqdm(
            decoded, total=len(paths), desc="explain", unit="img", disable=not progress, leave=False
        ):
            # the same per-image check (view rule, OOD guard, lung mask, preprocessing) as predict and serve
            checked = (
                pred.check([d.image], [d.colour], [d.window], [d.view])[0] if d.image is not None else d.error
            )
            if isinstance(checked, str):
                w.writerow(error(d.path, checked))
                continue
            img = checked.prepared
            stem = names(d.path)
            heats, probs = cam.all_classes(img) if all_classes else cam(img)
            if not finite(probs):
                w.writerow(error(d.path, NONFINITE))
                continue
            k = int(np.argmax(probs))
            if all_classes:
                for j, c in enumerate(classes):
                    _write_png(out_dir / f"{stem}__{c}.png", overlay_png(img, heats[j], alpha), overwrite)
                    counts["overlays"] += 1
            else:
                _write_png(out_dir / f"{stem}__{classes[k]}.png", overlay_png(img, heats, alpha), overwrite)
                counts["overlays"] += 1
            counts["ok"] += 1
            if checked.status == "not_cxr":
                print(
                    f"xraydx: {printable(d.path)}: does not look like a frontal chest X-ray"
                    f" ({printable(checked.reason or '')}); flagged, heatmap not trustworthy",
                    file=sys.stderr,
                )
            ex = checked.extra()
            if pred.members_rule:  # an ensemble's rule also reads its members' agreement (one more pass)
                agree = pred.probs_agree(img[None])[1]
                checked.agree = None if agree is None else bool(agree[0])
            row = schema.make_row(
                str(d.path), classes, [float(v) for v in probs], checked.status, model=pred.model_id,
                flag=pred.flag(probs, checked.shift, checked.agree), ood_score=ex["ood_score"], ood_reason=ex["ood_reason"],
                shift_score=ex["shift_score"], kind="explain", extra={"overlay": f"{stem}__{classes[k]}.png"},
            )  # fmt: skip
            w.writerow(schema.csv_cells(row, cols))
    return counts
