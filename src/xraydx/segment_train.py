"""Training and evaluating the lung segmenter, and writing masks for files (layer L4 over :mod:`xraydx.segment`).

Data: image/mask pairs from lungseg-style manifests (``image,mask[,patientid]`` CSV, split here by
patient, seeded) and from any dataset :func:`xraydx.data.discover` reads that has lung masks (its own
splits and groups). Training (:func:`train_segmenter`): AdamW with warmup then cosine decay, a paired
random affine on image and mask (:class:`SegAugment`), BCE + soft Dice, the best epoch by val Dice kept
and evaluated with the full pipeline (post-processing, mask at the image's own size) on the
test split, which is patient-held-out only where the data has patient ids (:func:`describe_split` says
what it is, in the log, metrics.json and the checkpoint). A best val Dice below :data:`USABLE_DICE` is
warned about. :func:`segment_files` writes ``masks/``, ``overlays/`` and ``segment.csv``.

CLI::

    xraydx segment train --data /work/shared/data/lungseg [--data COVID-QU-Ex] --out runs/lungseg
    xraydx segment [--checkpoint SEG] INPUTS... --out DIR      # masks/ and overlays/ PNGs + segment.csv
"""

from __future__ import annotations

import io as _io
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xraydx.checkpoint import save as save_checkpoint
from xraydx.data import SegSample, collect_samples
from xraydx.errors import SegmenterError, printable
from xraydx.fsutil import atomic_write_json, atomic_write_text, csv_writer, refuse_overwrite
from xraydx.io import ImageReadError, read_image
from xraydx.models import normalization_for
from xraydx.optim import make_optimizer, write_log
from xraydx.predict import expand_inputs
from xraydx.render import mask_overlay, save_png
from xraydx.segment import (
    SECOND_COMPONENT_MIN,
    SEG_KIND,
    THRESHOLD,
    LungSegmenter,
    LungUNet,
    dice_iou,
)
from xraydx.transforms import resize_uint8

__all__ = [
    "SegAugment",
    "evaluate_segmenter",
    "patient_bootstrap",
    "seg_loss",
    "segment_files",
    "train_segmenter",
]


# ---- training data (pairs: xraydx.data.lungseg) -------------------------------------------------


def _load_pairs(samples: Sequence[SegSample], size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    imgs = np.zeros((len(samples), size, size), np.uint8)
    masks = np.zeros((len(samples), size, size), np.uint8)
    bad: list[str] = []
    for i, s in enumerate(samples):
        try:
            im, mk = read_image(s.image), read_image(s.mask)
        except ImageReadError as exc:
            bad.append(str(exc))
            continue
        imgs[i] = resize_uint8(im, size)
        masks[i] = resize_uint8(np.where(mk > 127, 255, 0).astype(np.uint8), size) > 127
    return imgs, masks, bad


# ---- training ------------------------------------------------------------------------------------


class SegAugment:
    """One random affine (rotation, anisotropic scale, shift) applied identically to image and mask,
    then gamma / contrast / brightness on the image only. No left-right flip (see xraydx.transforms)."""

    def __init__(
        self,
        rotate_deg: float = 10.0,
        scale: tuple[float, float] = (0.88, 1.12),
        translate: float = 0.06,
        gamma: tuple[float, float] = (0.75, 1.33),
        contrast: float = 0.2,
        brightness: float = 0.1,
    ) -> None:
        self.rotate_deg, self.scale, self.translate = rotate_deg, scale, translate
        self.gamma, self.contrast, self.brightness = gamma, contrast, brightness

    def __call__(
        self, img: torch.Tensor, mask: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img uint8 (B, 1, S, S), mask {0,1} (B, 1, S, S) -> float image in [0, 1], float mask {0, 1}."""
        b = img.shape[0]

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(b, generator=gen) * (hi - lo) + lo

        ang = u(-self.rotate_deg, self.rotate_deg) * (math.pi / 180)
        sx, sy = u(*self.scale), u(*self.scale)
        tx, ty = u(-self.translate, self.translate) * 2, u(-self.translate, self.translate) * 2
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack(
            [torch.stack([cos / sx, -sin / sx, tx], 1), torch.stack([sin / sy, cos / sy, ty], 1)], 1
        )
        x = torch.cat([img.float() / 255.0, mask.float()], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        im, mk = x[:, :1], (x[:, 1:] > 0.5).float()
        gam = torch.exp(u(math.log(self.gamma[0]), math.log(self.gamma[1]))).view(b, 1, 1, 1)
        im = im.clamp(0, 1).pow(gam)
        mean = im.mean(dim=(1, 2, 3), keepdim=True)
        con = u(1 - self.contrast, 1 + self.contrast).view(b, 1, 1, 1)
        bri = u(-self.brightness, self.brightness).view(b, 1, 1, 1)
        return ((im - mean) * con + mean + bri).clamp(0, 1), mk


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice), Dice per image then averaged."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return bce + (1 - dice).mean()


@torch.inference_mode()
def _val_dice(model: LungUNet, imgs: np.ndarray, masks: np.ndarray, mean: float, std: float) -> float:
    model.eval()
    scores = []
    for i in range(0, len(imgs), 16):
        x = (torch.from_numpy(imgs[i : i + 16]).unsqueeze(1).float() / 255.0 - mean) / std
        pred = (torch.sigmoid(model(x)) > THRESHOLD).numpy()[:, 0]
        scores += [dice_iou(p, t)[0] for p, t in zip(pred, masks[i : i + 16], strict=True)]
    return float(np.mean(scores)) if scores else float("nan")


def evaluate_segmenter(seg: LungSegmenter, samples: Sequence[SegSample]) -> dict[str, Any]:
    """Dice / IoU of the full pipeline (post-processing, mask at the image's own size) against each mask file."""
    dices, ious, per = [], [], []
    for s in samples:
        img, truth = read_image(s.image), read_image(s.mask)
        if truth.shape != img.shape:
            truth = resize_uint8(np.where(truth > 127, 255, 0).astype(np.uint8), img.shape)
        d, j = dice_iou(seg.predict_mask(img), truth > 127)
        dices.append(d)
        ious.append(j)
        per.append({"image": str(s.image), "group": s.group, "dice": round(d, 5), "iou": round(j, 5)})
    arr = np.array(dices) if dices else np.array([np.nan])
    return {
        "n": len(dices),
        "patients": len({s.group for s in samples}),
        "dice_mean": float(np.mean(arr)),
        "dice_median": float(np.median(arr)),
        "dice_min": float(np.min(arr)),
        "iou_mean": float(np.mean(ious)) if ious else float("nan"),
        "dice_ci95": patient_bootstrap(per, "dice"),
        "iou_ci95": patient_bootstrap(per, "iou"),
        "per_image": per,
    }


def patient_bootstrap(
    per_image: Sequence[dict[str, Any]], key: str, n: int = 5000, seed: int = 0
) -> list[float]:
    """95% interval of the mean of ``key`` over images, resampling whole patients (``group``) with replacement."""
    by: dict[str, list[float]] = {}
    for r in per_image:
        by.setdefault(str(r["group"]), []).append(float(r[key]))
    if not by:
        return [float("nan"), float("nan")]
    groups = sorted(by)
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n):
        vals = [v for g in rng.choice(len(groups), len(groups)) for v in by[groups[g]]]
        means.append(float(np.mean(vals)))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def train_segmenter(
    data: Sequence[str | Path],
    out: Path,
    *,
    encoder: str = "mobilenetv2_100",
    pretrained: str = "offline",
    size: int = 256,
    epochs: int = 40,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    threads: int = 0,
    half: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Train, keep the best epoch by val Dice, evaluate it on the held-out test split, write
    ``out/lungseg.safetensors``, ``out/log.csv``, ``out/split.csv`` and ``out/metrics.json``."""
    out = Path(out)
    ckpt = out / "lungseg.safetensors"
    refuse_overwrite(ckpt, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or max(1, min(4, os.cpu_count() or 1)))
    torch.manual_seed(seed)

    def log(msg: str) -> None:
        line = f"{datetime.now().isoformat(timespec='seconds')} {msg}"
        print(line, flush=True)
        with open(out / "train.log", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    samples, notes = collect_samples(data, seed, val_fraction, test_fraction)
    for n in notes:
        log(f"data: {n}")
    by = {s: [x for x in samples if x.split == s] for s in ("train", "val", "test")}
    if not by["train"] or not by["val"]:
        raise SegmenterError(
            f"need train and val images with masks; got {[(k, len(v)) for k, v in by.items()]}"
        )
    leaked = {x.group for x in by["train"]} & ({x.group for x in by["val"]} | {x.group for x in by["test"]})
    if leaked:
        raise SegmenterError(
            f"{len(leaked)} patient groups are in train and in val/test, e.g. {sorted(leaked)[0]}"
        )
    split_kind = describe_split(samples)
    log(f"data: split: {split_kind}")
    buf = _io.StringIO()
    w = csv_writer(buf)
    w.writerow(["image", "mask", "group", "split", "source"])
    w.writerows([[s.image, s.mask, s.group, s.split, s.source] for s in samples])
    atomic_write_text(out / "split.csv", buf.getvalue())

    t0 = time.perf_counter()
    tr_x, tr_y, bad_tr = _load_pairs(by["train"], size)
    va_x, va_y, bad_va = _load_pairs(by["val"], size)
    for b in bad_tr + bad_va:
        log(f"skipped unreadable {b}")
    log(
        f"loaded {len(tr_x)} train, {len(va_x)} val, {len(by['test'])} test pairs at {size} px "
        f"in {time.perf_counter() - t0:.1f}s"
    )

    mean, std = normalization_for(encoder, pretrained)
    model = LungUNet(encoder, pretrained=pretrained)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"LungUNet({encoder}, pretrained={pretrained}): {n_params / 1e6:.2f} M parameters")
    steps = math.ceil(len(tr_x) / batch_size)  # one epoch of warmup, then cosine down to 2% of lr
    opt, sched = make_optimizer(
        model, lr=lr, weight_decay=weight_decay, total_steps=steps * epochs, warmup_steps=steps, floor=0.02
    )
    aug = SegAugment()
    best, best_epoch = -1.0, 0
    best_state: dict[str, torch.Tensor] = {}
    rows = []
    for epoch in range(1, epochs + 1):
        te = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        order = torch.randperm(len(tr_x), generator=gen).numpy()
        loss_sum = 0.0
        for i in range(0, len(order), batch_size):
            idx = np.sort(order[i : i + batch_size])
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            xi = torch.from_numpy(tr_x[idx]).unsqueeze(1)
            yi = torch.from_numpy(tr_y[idx]).unsqueeze(1)
            x, y = aug(xi, yi, gen)
            loss = seg_loss(model((x - mean) / std), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
        vd = _val_dice(model, va_x, va_y, mean, std)
        improved = vd > best
        if improved:
            best, best_epoch = vd, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rows.append(
            {
                "epoch": epoch,
                "lr": f"{sched.get_last_lr()[0]:.3e}",
                "train_loss": round(loss_sum / len(tr_x), 5),
                "val_dice": round(vd, 5),
                "seconds": round(time.perf_counter() - te, 1),
                "best": int(improved),
            }
        )
        log(
            f"epoch {epoch}/{epochs}: train loss {rows[-1]['train_loss']:.4f} | val Dice {vd:.4f}"
            f"{' (best)' if improved else ''} | {rows[-1]['seconds']:.0f}s"
        )
        write_log(out / "log.csv", rows)

    warnings = []
    if best < USABLE_DICE:
        warnings.append(
            f"the best epoch ({best_epoch}) has val Dice {best:.3f}, far below a usable lung mask (Dice >= "
            f"{USABLE_DICE:g}): this segmenter finds little or no lung; train longer or check the masks"
        )
        log(f"WARNING: {warnings[-1]}")
    model.load_state_dict(best_state)
    model.eval()
    if half:
        model.half()
    meta: dict[str, Any] = {
        "kind": SEG_KIND,
        "tool": "xraydx",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": ["lung"],
        "architecture": {
            "name": f"lungunet-{encoder}",
            "encoder": encoder,
            "decoder_channels": list(model.decoder_channels),
            "pretrained": pretrained,
            "parameters": n_params,
            "dtype": "float16" if half else "float32",
        },
        "input_size": size,
        "normalization": {"mean": mean, "std": std},
        "threshold": THRESHOLD,
        "postprocess": {"components": 2, "second_component_min": SECOND_COMPONENT_MIN, "fill_holes": True},
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "best_epoch": best_epoch,
            "loss": "BCE + soft Dice",
            "augment": vars(aug),
        },
        "training_data": {
            "sources": [str(p) for p in data],
            "notes": notes,
            "counts": {k: len(v) for k, v in by.items()},
            "split": split_kind,
        },
        "warnings": warnings,
        "val_metrics": {"dice_mean_at_input_size": best},
        "command": command,
    }
    save_checkpoint(ckpt, model, meta)
    seg = LungSegmenter.load(ckpt)
    results: dict[str, Any] = {"best_epoch": best_epoch, "val_dice_at_input_size": best, "split": split_kind,
                               "warnings": warnings}  # fmt: skip
    results["val"] = evaluate_segmenter(seg, by["val"])
    if by["test"]:
        results["test"] = evaluate_segmenter(seg, by["test"])
        meta["test_metrics"] = {k: v for k, v in results["test"].items() if k != "per_image"}
    meta["val_metrics"].update({k: v for k, v in results["val"].items() if k != "per_image"})
    save_checkpoint(ckpt, model, meta)
    atomic_write_json(out / "metrics.json", results)
    te_m = results.get("test", {})
    log(
        f"best epoch {best_epoch}; test (n={te_m.get('n', 0)}; {split_kind}): Dice {te_m.get('dice_mean', float('nan')):.4f}"
        f" IoU {te_m.get('iou_mean', float('nan')):.4f}; wrote {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB)"
    )
    return results


#: the val Dice below which a trained segmenter is warned about (the shipped one: about 0.95 on test)
USABLE_DICE = 0.5


def describe_split(samples: Sequence[SegSample]) -> str:
    """What the train/val/test split is, in words: by patient only where the data has patient ids (some
    group holds more than one image); otherwise by image, which is not patient-held-out (COVID-QU-Ex's
    official split, for one, has no patient ids)."""
    sizes: dict[str, int] = {}
    for x in samples:
        sizes[x.group] = sizes.get(x.group, 0) + 1
    if any(n > 1 for n in sizes.values()):
        return "patient-held-out (no patient group in more than one split)"
    return (
        "by image, NOT patient-held-out: the data has no patient ids (e.g. COVID-QU-Ex's official split), "
        "so images of one patient may be in train and in test"
    )


# ---- writing masks and overlays ------------------------------------------------------------------


def _out_names(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = p.stem or "image"
        k = seen.get(stem, 0)
        seen[stem] = k + 1
        names.append(stem if k == 0 else f"{stem}-{k + 1}")
    return names


def segment_files(
    seg: LungSegmenter,
    inputs: Sequence[str],
    out: Path,
    *,
    overlays: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Write ``out/masks/<stem>.png`` (0/255, the input's size), ``out/overlays/<stem>.png`` and
    ``out/segment.csv`` (path, mask, overlay, lung_fraction, status). Returns {"ok": n, "error": n}."""
    from tqdm.auto import tqdm

    paths, missing = expand_inputs(inputs)
    if not paths and not missing:
        raise SegmenterError("no image files found in the inputs given")
    names = _out_names(paths)
    refuse_overwrite(out / "segment.csv", overwrite)
    for n in names:
        refuse_overwrite(out / "masks" / f"{n}.png", overwrite)
        if overlays:
            refuse_overwrite(out / "overlays" / f"{n}.png", overwrite)
    rows = [[str(p), "", "", "", f"error: {why}"] for p, why in missing]
    counts = {"ok": 0, "error": len(missing)}
    for p, n in tqdm(list(zip(paths, names, strict=True)), desc="segment", disable=not progress, leave=False):
        try:
            img = read_image(p)
        except ImageReadError as exc:
            rows.append([str(p), "", "", "", f"error: {exc.reason}"])
            counts["error"] += 1
            print(f"xraydx: {printable(exc)}", file=sys.stderr)
            continue
        mask = seg.predict_mask(img)
        mpath = out / "masks" / f"{n}.png"
        save_png(mpath, mask)
        opath = ""
        if overlays:
            save_png(out / "overlays" / f"{n}.png", mask_overlay(img, mask))
            opath = str(out / "overlays" / f"{n}.png")
        rows.append([str(p), str(mpath), opath, f"{float((mask > 0).mean()):.4f}", "ok"])
        counts["ok"] += 1
    buf = _io.StringIO()
    w = csv_writer(buf)
    w.writerow(["path", "mask", "overlay", "lung_fraction", "status"])
    w.writerows(rows)
    atomic_write_text(out / "segment.csv", buf.getvalue())
    return counts
