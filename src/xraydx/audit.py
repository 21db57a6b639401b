"""Shortcut audit: does the model read the lungs, or markers, borders and source style?

``xraydx audit --checkpoint CKPT [--checkpoint CKPT2] --data PATH [--split test] --out DIR`` writes
``audit.json`` and a self-contained ``audit.html``. For every checkpoint it measures, on one split:

a. saliency: the share of Grad-CAM mass (of the predicted class) inside the lung field;
b. balanced accuracy / accuracy / macro-F1 with everything outside the lungs blacked out
   (``lungs_only``) and with the lungs blacked out (``lungs_hidden``);
c. the same with a border band (``BORDER`` of the side) and the corners (``CORNER`` squares) of the
   *original* image blacked out before the model's own preprocessing (``border_blanked``); plus the
   unmodified ``baseline``.

``lungs_only`` and ``lungs_hidden`` are edits of the preprocessed image, exactly what the model sees.
``border_blanked`` is not: for a ``lung_mask=crop`` model the preprocessed image is already the lung box,
and blanking its border would cut lung, not the markers and borders of the radiograph. So the border
of the original image is blanked and the model's own preprocessing (lung crop / mask with the same lung
mask as the baseline, equalisation, resize) follows. Intervals: :func:`xraydx.metrics.confidence_intervals`
(Wilson / Jeffreys, honest at small n); a verdict needs intervals that do not overlap. The lung field is, per
image: the dataset's lung mask (Record.mask) where there is one; else the trained segmenter of
``xraydx.segment`` where it is installed with a shipped model; else a fixed anatomical prior (two
ellipses, :data:`PRIOR_ELLIPSES`). The verdict rules and thresholds are below and in docs/trust.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xraydx.constants import AUDIT_BORDER, AUDIT_CORNER, CROPPING_MODES
from xraydx.data import checkpoint_split
from xraydx.errors import AuditError
from xraydx.fsutil import file_sha256
from xraydx.render import gray_png, heat_overlay, outline, png_bytes, png_uri
from xraydx.transforms import Preprocessing, apply_lung_mask, resize_uint8

# Two ellipses (centre x, centre y, radius x, radius y) as fractions of the image width / height, for a
# frontal CXR as displayed (the patient's right lung on the image's left). Fitted to the 250 lung masks
# of ../shared/data/lungseg by moments (median over images of each lung's centroid and 2 x standard
# deviation); Dice with those masks: mean 0.77 (docs/trust.md has the command).
PRIOR_ELLIPSES: tuple[tuple[float, float, float, float], ...] = (
    (0.28, 0.46, 0.19, 0.34),
    (0.71, 0.48, 0.19, 0.37),
)

BORDER = AUDIT_BORDER  # border band width, fraction of the side
CORNER = AUDIT_CORNER  # corner squares, fraction of the side
VARIANTS = ("baseline", "lungs_only", "lungs_hidden", "border_blanked")

# Verdict thresholds (balanced accuracy; chance = 1 / number of classes)
HIDDEN_MARGIN = 0.15  # lungs hidden: the 95% CI's lower bound above chance + this -> reads shortcuts
BORDER_DROP = 0.15  # border and corners blanked: a drop larger than this -> reads shortcuts
LUNGS_ONLY_DROP = 0.15  # only the lungs visible: a drop larger than this -> possible shortcuts
SALIENCY_MIN = 0.5  # mean Grad-CAM share inside the lung field below this -> possible shortcuts
BASELINE_MARGIN = 0.05  # baseline CI lower bound within chance + this -> inconclusive


def prior_lung_mask(h: int, w: int) -> np.ndarray:
    """The anatomical prior lung field for an (h, w) frontal CXR: uint8, 255 inside the two ellipses."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xx = (xx + 0.5) / w
    yy = (yy + 0.5) / h
    out = np.zeros((h, w), dtype=bool)
    for cx, cy, rx, ry in PRIOR_ELLIPSES:
        out |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return out.astype(np.uint8) * 255


def border_mask(size: int | tuple[int, int], border: float = BORDER, corner: float = CORNER) -> np.ndarray:
    """True where the border-and-corners variant blanks an image of ``size`` (side, or (h, w)): a band of
    ``border`` of each side's length along every edge and four corner squares of ``corner`` of the shorter side."""
    h, w = (size, size) if isinstance(size, int) else size
    bh, bw = int(round(border * h)), int(round(border * w))
    c = int(round(corner * min(h, w)))
    m = np.zeros((h, w), dtype=bool)
    if bh:
        m[:bh], m[-bh:] = True, True
    if bw:
        m[:, :bw], m[:, -bw:] = True, True
    if c:
        m[:c, :c], m[:c, -c:], m[-c:, :c], m[-c:, -c:] = True, True, True, True
    return m


def _fg(mask: np.ndarray) -> np.ndarray:
    return mask > 127 if mask.dtype == np.uint8 and mask.max() > 1 else mask > 0


def aligned_lungs(mask: np.ndarray, image_shape: tuple[int, int], spec: Preprocessing) -> np.ndarray:
    """The lung mask carried through the same geometry as ``preprocess`` (lung crop, resize): bool (S, S)."""
    m = _fg(mask).astype(np.uint8) * 255
    if m.shape != tuple(image_shape):
        m = resize_uint8(m, image_shape)
    if spec.lung_mask in CROPPING_MODES:
        m = apply_lung_mask(m, m, "crop")
    return resize_uint8(m, spec.size) > 127


@dataclass
class AuditData:
    images: np.ndarray  # uint8 (N, S, S), preprocessed as the model expects
    blanked: np.ndarray  # uint8 (N, S, S): the original's border and corners blanked, then preprocessed
    lungs: np.ndarray  # bool (N, S, S), the lung field in the same geometry
    labels: np.ndarray  # int (N,)
    paths: list[str]
    lung_field: dict[str, int]  # how many images got their lung field from: dataset / segmenter / prior
    failures: list[tuple[str, str]]


def load_audit_data(
    records: Sequence[Any],
    spec: Preprocessing,
    classes: Sequence[str],
    progress: bool = False,
    masks: str = "segmenter",
    border: float = BORDER,
    corner: float = CORNER,
) -> AuditData:
    """``masks``: ``segmenter`` (default) makes every lung mask with the shipped segmenter, as predict and
    serve do (the deployed pipeline); ``dataset`` takes the dataset's own where it has one. ``border`` /
    ``corner``: what ``border_blanked`` blanks of the original image."""
    from tqdm.auto import tqdm

    from xraydx.io import ImageReadError, read_image
    from xraydx.predict import load_lung_segmenter
    from xraydx.transforms import preprocess

    own = masks == "dataset"
    segmenter = None if own and all(r.mask is not None for r in records) else load_lung_segmenter()
    s = spec.size
    images = np.zeros((len(records), s, s), dtype=np.uint8)
    blanked = np.zeros((len(records), s, s), dtype=np.uint8)
    lungs = np.zeros((len(records), s, s), dtype=bool)
    keep: list[int] = []
    counts = {"dataset": 0, "segmenter": 0, "prior": 0}
    failures: list[tuple[str, str]] = []
    for i, r in enumerate(tqdm(records, desc="audit: load", unit="img", disable=not progress, leave=False)):
        try:
            img = read_image(r.path)
        except ImageReadError as exc:
            failures.append((str(r.path), exc.reason))
            continue
        mask, kind = None, "prior"
        if own and r.mask is not None:
            try:
                m = read_image(r.mask)
                if _fg(m).any():
                    mask, kind = m, "dataset"
            except ImageReadError:
                mask = None
        if mask is None and segmenter is not None:
            try:
                m = np.asarray(segmenter.predict_mask(img))
                if _fg(m).any():
                    mask, kind = m, "segmenter"
            except (ValueError, RuntimeError):
                mask = None
        if mask is None:
            mask = prior_lung_mask(*img.shape)
        use = mask if spec.lung_mask != "none" else None
        try:
            images[i] = preprocess(img, spec, use)
            # the same preprocessing (and lung mask) on the original with its border and corners blanked
            blank = border_mask(img.shape, border, corner)
            blanked[i] = preprocess(np.where(blank, 0, img).astype(np.uint8), spec, use)
        except ValueError as exc:
            failures.append((str(r.path), str(exc)))
            continue
        lungs[i] = aligned_lungs(mask, img.shape, spec)
        counts[kind] += 1
        keep.append(i)
    return AuditData(
        images=images[keep],
        blanked=blanked[keep],
        lungs=lungs[keep],
        labels=np.array([list(classes).index(records[i].label) for i in keep], dtype=int),
        paths=[str(records[i].path) for i in keep],
        lung_field=counts,
        failures=failures,
    )


def variant(data: AuditData, name: str, sel: slice = slice(None)) -> np.ndarray:
    """The images of ``sel`` as the model is shown them in check ``name``."""
    images, lungs = data.images[sel], data.lungs[sel]
    if name == "baseline":
        return images
    if name == "lungs_only":
        return np.where(lungs, images, 0).astype(np.uint8)
    if name == "lungs_hidden":
        return np.where(lungs, 0, images).astype(np.uint8)
    if name == "border_blanked":
        return data.blanked[sel]
    raise ValueError(f"unknown audit variant {name!r}")


def _mean_ci(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> list[float] | None:
    """Percentile-bootstrap interval of a mean (None for fewer than two values)."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 50 * (1 - level))), float(np.percentile(means, 50 * (1 + level)))]


def audit_arrays(
    model: torch.nn.Module,
    spec: Preprocessing,
    data: AuditData,
    classes: Sequence[str],
    *,
    temperature: float = 1.0,
    device: torch.device | None = None,
    border: float = BORDER,
    corner: float = CORNER,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The audit's measurements on loaded arrays (see the module docstring); adds ``verdict``."""
    from xraydx.explain import GradCAM, lung_share
    from xraydx.metrics import compute_metrics, confidence_intervals
    from xraydx.predict import batch_logits

    if len(data.labels) == 0:
        raise AuditError("no readable images to audit")
    dev = device or next(model.parameters()).device
    k = len(classes)
    out: dict[str, Any] = {"n": len(data.labels), "classes": list(classes), "chance": 1.0 / k, "variants": {}}
    base_pred = None
    for name in VARIANTS:
        probs_all = []
        for i in range(0, len(data.labels), batch_size):
            x = variant(data, name, slice(i, i + batch_size))
            lg = batch_logits(model, x, spec, dev, batch_size)
            probs_all.append(torch.softmax(lg / temperature, 1).numpy())
        probs = np.concatenate(probs_all)
        preds = probs.argmax(axis=1)
        m = compute_metrics(data.labels, probs, classes)
        ci = confidence_intervals(data.labels, probs, classes, n_boot=n_boot, seed=seed)
        if base_pred is None:
            base_pred = preds
        out["variants"][name] = {
            "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "macro_f1": m["macro_f1"],
            "ci": {key: ci[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")},
            "agreement_with_baseline": float((preds == base_pred).mean()),
            "predicted_counts": {c: int((preds == j).sum()) for j, c in enumerate(classes)},
        }
    cam = GradCAM(model, spec, temperature=temperature)
    shares = []
    for i in range(0, len(data.labels), batch_size):
        heats, _ = cam.batch(data.images[i : i + batch_size])
        shares += [lung_share(h, m) for h, m in zip(heats, data.lungs[i : i + batch_size], strict=True)]
    sh = np.array(shares, dtype=np.float64)
    ok = np.isfinite(sh)
    out["saliency"] = {
        "method": "Grad-CAM of the predicted class, last feature map, upsampled bilinearly",
        "n": int(ok.sum()),
        "n_empty": int((~ok).sum()),
        "mean_lung_share": float(sh[ok].mean()) if ok.any() else None,
        "mean_lung_share_ci": _mean_ci(sh[ok], n_boot, seed),
        "median_lung_share": float(np.median(sh[ok])) if ok.any() else None,
        "share_of_images_below_half": float((sh[ok] < 0.5).mean()) if ok.any() else None,
        "lung_area": float(data.lungs.mean()),
    }
    out["settings"] = {
        "border": border,
        "corner": corner,
        "border_blanked_on": "the original image, before the model's own preprocessing (same lung mask)",
        "intervals": "metrics.confidence_intervals; a verdict needs intervals that do not overlap",
        "n_boot": n_boot,
        "seed": seed,
        "fill": 0,
        "thresholds": {
            "hidden_margin": HIDDEN_MARGIN,
            "border_drop": BORDER_DROP,
            "lungs_only_drop": LUNGS_ONLY_DROP,
            "saliency_min": SALIENCY_MIN,
            "baseline_margin": BASELINE_MARGIN,
        },
    }
    out["lung_field"] = dict(data.lung_field)
    out["verdict"] = verdict(out)
    return out


def _lung_field_text(lf: dict[str, int]) -> str:
    parts = []
    if lf.get("dataset"):
        parts.append(f"{lf['dataset']} dataset masks")
    if lf.get("segmenter"):
        parts.append(f"{lf['segmenter']} from the lung segmenter")
    if lf.get("prior"):
        parts.append(f"{lf['prior']} from the two-ellipse prior")
    return ", ".join(parts) or "none"


def verdict(a: dict[str, Any]) -> dict[str, Any]:
    """Plain-language verdict from an audit's measurements; the rules are the constants above, applied to
    the 95% intervals: a drop counts only where the variant's interval lies wholly below the baseline's,
    a score above chance only where its interval lies wholly above chance (no verdict when they overlap)."""
    chance = float(a["chance"])
    v = a["variants"]

    def bal(name: str) -> float:
        return float(v[name]["balanced_accuracy"] or 0.0)

    def ci(name: str) -> list[float] | None:
        c = v[name]["ci"].get("balanced_accuracy")
        return [float(c[0]), float(c[1])] if c else None

    def lo(name: str) -> float:
        c = ci(name)
        return c[0] if c else bal(name)

    def hi(name: str) -> float:
        c = ci(name)
        return c[1] if c else bal(name)

    def ci_text(name: str) -> str:
        return f"95% CI {lo(name):.2f}\u2013{hi(name):.2f}"

    def below_baseline(name: str) -> bool:  # the variant's interval wholly below the baseline's
        return ci(name) is not None and hi(name) < lo("baseline")

    base, hid, bor, only = bal("baseline"), bal("lungs_hidden"), bal("border_blanked"), bal("lungs_only")
    sal = a["saliency"]
    share, share_ci = sal["mean_lung_share"], sal.get("mean_lung_share_ci")
    n = a.get("n")
    lf = a.get("lung_field", {})
    caveat = ""
    if lf.get("prior"):
        caveat = (
            " The lung field of "
            + ("all" if not (lf.get("dataset") or lf.get("segmenter")) else f"{lf['prior']} of the")
            + " images is a fixed two-ellipse prior (Dice about 0.77 with real masks), so some lung can stay"
            " visible when 'hidden'."
        )
    if ci("baseline") is None:
        return {
            "level": "inconclusive",
            "text": f"Inconclusive: no confidence interval for the model's own balanced accuracy ({base:.2f}) on"
            f" these {n} images, so no check can be judged.",
        }
    if lo("baseline") <= chance + BASELINE_MARGIN:
        return {
            "level": "inconclusive",
            "text": f"Inconclusive: the model itself scores {base:.2f} balanced accuracy ({ci_text('baseline')}),"
            f" close to chance {chance:.2f}; there is little to audit.",
        }
    unresolved: list[str] = []  # effects the point estimates show but the intervals cannot separate
    strong = []
    if lo("lungs_hidden") > chance + HIDDEN_MARGIN:
        strong.append(
            f"with the lungs hidden it still scores {hid:.2f} balanced accuracy ({ci_text('lungs_hidden')}),"
            f" far above chance {chance:.2f}"
        )
    if base - bor > BORDER_DROP:
        if below_baseline("border_blanked"):
            strong.append(
                f"blanking the border and corners of the original image drops its balanced accuracy from"
                f" {base:.2f} ({ci_text('baseline')}) to {bor:.2f} ({ci_text('border_blanked')})"
            )
        else:
            unresolved.append(f"blanking the border and corners ({base:.2f} to {bor:.2f})")
    if strong:
        return {"level": "shortcut", "text": "Reads shortcuts: " + "; ".join(strong) + "." + caveat}
    soft = []
    if hid > chance + HIDDEN_MARGIN:
        if lo("lungs_hidden") > chance:
            soft.append(
                f"with the lungs hidden it scores {hid:.2f} balanced accuracy (chance {chance:.2f}), though the"
                f" 95% CI reaches down to {lo('lungs_hidden'):.2f}"
            )
        else:
            unresolved.append(f"the score with the lungs hidden ({hid:.2f}; its interval reaches chance)")
    if share is not None and share < SALIENCY_MIN:
        if share_ci is not None and share_ci[1] < SALIENCY_MIN:
            soft.append(
                f"only {share:.0%} of its Grad-CAM mass lies inside the lung field (95% CI"
                f" {share_ci[0]:.0%}\u2013{share_ci[1]:.0%})"
            )
        else:
            unresolved.append(f"the Grad-CAM mass inside the lungs ({share:.0%})")
    if base - only > LUNGS_ONLY_DROP:
        if below_baseline("lungs_only"):
            soft.append(
                f"with only the lungs visible its balanced accuracy drops from {base:.2f} to {only:.2f}"
                f" ({ci_text('lungs_only')})"
            )
        else:
            unresolved.append(f"showing only the lungs ({base:.2f} to {only:.2f})")
    tail = ""
    if unresolved:
        tail = f" Not judged, because at n = {n} the 95% intervals overlap: " + "; ".join(unresolved) + "."
    if soft:
        return {"level": "possible", "text": "Possible shortcuts: " + "; ".join(soft) + "." + tail + caveat}
    share_txt = f"{share:.0%}" if share is not None else "n/a"
    return {
        "level": "none_found",
        "text": f"No shortcut found by these checks: with the lungs hidden it scores {hid:.2f} balanced accuracy"
        f" (chance {chance:.2f}), blanking the border and corners of the original image changes it by"
        f" {bor - base:+.2f}, and {share_txt} of its Grad-CAM mass lies inside the lung field. These checks"
        " cannot rule out shortcuts inside the lungs (source-specific contrast, processing or patient age)."
        + tail
        + caveat,
    }


def _examples(data: AuditData, model: Any, spec: Preprocessing, temperature: float) -> dict[str, str]:
    """Base64 PNGs of the first image under each variant, and its Grad-CAM with the lung field outlined."""
    from xraydx.explain import GradCAM

    first = slice(0, 1)
    out = {name: png_uri(gray_png(variant(data, name, first)[0])) for name in VARIANTS}
    img, lung = data.images[0], data.lungs[0]
    heat, _ = GradCAM(model, spec, temperature=temperature)(img)
    rgb = outline(heat_overlay(img, heat), lung)  # the lung field's outline, in white
    out["gradcam"] = png_uri(png_bytes(rgb))
    return out


def run_audit(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    *,
    device: str = "auto",
    border: float = BORDER,
    corner: float = CORNER,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    examples: bool = True,
    masks: str = "segmenter",
) -> dict[str, Any]:
    """Audit one checkpoint on one split of a dataset. Returns a JSON-ready dict (``examples``, where
    asked, holds data: URIs of illustration images for the HTML). ``masks``: see :func:`load_audit_data`."""
    from xraydx.predict import Predictor

    pred = Predictor(checkpoint, device)
    recs = checkpoint_split(pred.meta.get("config", {}).get("data", {}), data, split)
    if not recs:
        raise AuditError(f"{data}: no images in split {split!r}")
    d = load_audit_data(
        recs, pred.spec, pred.classes, progress=progress, masks=masks, border=border, corner=corner
    )
    if len(d.labels) == 0:
        raise AuditError(f"{data}: none of the {len(recs)} images in split {split!r} could be read")
    a = audit_arrays(
        pred.model, pred.spec, d, pred.classes, temperature=pred.temperature, device=pred.device, border=border,
        corner=corner, n_boot=n_boot, seed=seed, batch_size=batch_size,
    )  # fmt: skip
    notes = []
    if pred.spec.lung_mask != "none" and d.lung_field.get("prior"):
        notes.append(
            f"the model was trained with lung_mask={pred.spec.lung_mask}; for {d.lung_field['prior']} images without"
            " a dataset mask its own input was masked with the two-ellipse prior"
        )
    arch = pred.meta.get("architecture", {}).get("name")
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "name": model_name(checkpoint, pred.meta),
        "model_id": getattr(pred, "model_id", None)
        or f"{arch or 'unknown'}-{file_sha256(Path(checkpoint))[:12]}",
        "architecture": arch,
        "lung_mask": pred.spec.lung_mask,
        "data": str(data),
        "split": split,
        **a,
        "lung_field_text": _lung_field_text(d.lung_field),
        "unreadable": [{"path": p, "reason": r} for p, r in d.failures],
        "notes": notes,
    }
    if examples:
        result["examples"] = _examples(d, pred.model, pred.spec, pred.temperature)
    return result


def model_name(checkpoint: str | Path, meta: dict[str, Any]) -> str:
    """What to call a checkpoint in a report: its training run's name (the config's ``name``, e.g.
    ``default-model`` for the shipped one), else the file's stem; never the folder it happens to sit in."""
    name = (meta.get("config") or {}).get("name") if isinstance(meta.get("config"), dict) else None
    return str(name) if name else Path(checkpoint).stem
