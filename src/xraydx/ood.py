"""Out-of-distribution guard: is this input a frontal chest X-ray at all?

Method (the shipped lung segmenter, :mod:`xraydx.segment`: one full pass and four encoder passes):

1. **Feature distance.** The segmenter's encoder (ImageNet MobileNetV2, fine-tuned on chest X-rays)
   gives a 1696-d descriptor: the global means of its 1/16 and 1/32 feature maps and the 1/32 map
   averaged over a 2 x 2 grid. The descriptor is standardised and scored by its Mahalanobis distance
   under a probabilistic-PCA model of real chest X-rays (``k`` = 64 principal directions with their own
   variances, one shared variance ``s2`` for the rest): ``m = sum_i y_i^2 / l_i + |residual|^2 / s2``,
   reported as ``d = sqrt(m / D)`` (about 1 for a typical training CXR). Fit on real CXRs (cxr3's fit
   part, split by patient group, plus the lungseg train split); the threshold is the 99.5th percentile
   of ``d`` on a separate calibration part of real CXRs.
2. **Orientation test.** Feature distance is nearly blind to a chest turned upside down or inverted
   (their features are still "chest-like"), so the same distance is computed for the input rotated by
   90, 180 and 270 degrees and inverted: if a turned (or inverted) copy is closer to the real CXRs by
   more than a calibrated gap (the 99.9th / 99.7th percentile of that gap on the calibration CXRs),
   the input is flagged as rotated (inverted).
3. **Lung area** of the segmenter's cleaned mask outside the range of the calibration CXRs (0.1th and
   99.9th percentiles, widened by ``rule_margin``).
4. **Image rules**: an (almost) constant image is blank; where the file is at hand, a *colour*
   image (Hasler-Suesstrunk colourfulness of the file's RGB pixels above :data:`COLOURFUL_MAX`) is
   not a radiograph (gray images saved as RGB have colourfulness 0). :func:`read_image` returns gray,
   so this is read from the file separately (:func:`colourfulness_of_file` /
   :func:`colourfulness_of_bytes`).

``score`` is the largest of the normalised signals, each 1.0 at its threshold: ``d`` over its
threshold, ``1 + (gap - gap threshold) / threshold`` for the orientation gaps, and for a broken rule
its own ratio (at least :data:`RULE_SCORE`). ``is_cxr`` is ``score <= 1``; ``reasons`` says which
signals fired. The lung-field shape (components, side by side) is reported in ``details`` only: as a
rule it rejected about 1% of real CXRs.

An **inverted** chest X-ray (bone dark, air bright) is flagged on purpose: DICOM MONOCHROME1 is
inverted correctly by :mod:`xraydx.io`, so an inverted PNG/JPEG is an unusual export, and the
classifier was never trained on one.

Fit (needs the segmenter and the data; writes ``weights/ood.safetensors``)::

    xraydx ood fit --cxr3 /work/shared/data/cxr3 --lungseg /work/shared/data/lungseg \\
        --out src/xraydx/weights/ood.safetensors

Measured figures: docs/lungs_and_ood.md (``benchmarks/bench_ood.py``).
"""

from __future__ import annotations

import csv
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xraydx import checkpoint
from xraydx.checkpoint import read_metadata
from xraydx.constants import DEFAULT_GUARD
from xraydx.engines import lung_segmenter
from xraydx.errors import CheckpointError, printable
from xraydx.io import ImageReadError, read_image
from xraydx.segment import LungSegmenter, SegAnalysis

__all__ = [
    "DEFAULT_GUARD",
    "OOD_KIND",
    "OODError",
    "OODGuard",
    "OODResult",
    "colourfulness",
    "colourfulness_of_bytes",
    "colourfulness_of_file",
    "fit_guard",
    "fit_guard_files",
    "lung_signals",
]

OOD_KIND = "ood-guard"
COLOURFUL_MAX = 12.0  # Hasler-Suesstrunk "slightly colourful" starts at ~15; a tinted scan stays below
BLANK_STD = 4.0  # gray levels (0-255): standard deviation of a 64 x 64 thumbnail
RULE_SCORE = 1.5  # the least score a broken rule gives, so rule rejections sort after borderline distances
# added to the reasons of a rejected image that xraydx.io read through its default window (a DICOM or 16-bit
# file with no window of its own): then the rendering, not the patient, is the likely cause
DEFAULT_WINDOW_HINT = (
    "the file carries no display window, so xraydx used its default one (0.5th-99.5th percentiles); if it"
    " looks washed out or too dark, windowing is the likely cause: export it with its window (WindowCenter /"
    " WindowWidth or a VOI LUT) or as the 8-bit image the PACS shows"
)


class OODError(CheckpointError):
    pass


@dataclass
class OODResult:
    is_cxr: bool
    score: float  # 1.0 at the threshold; higher = less like a frontal chest X-ray
    reasons: list[str]
    details: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = field(default=None, repr=False)  # the segmenter's lung mask (image size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "is_cxr": self.is_cxr,
            "score": round(self.score, 4),
            "reasons": list(self.reasons),
            "details": {k: round(float(v), 4) for k, v in self.details.items()},
        }


# ---- colour ----------------------------------------------------------------------------------------


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an RGB uint8 array (0 for any gray image)."""
    x = rgb.astype(np.float32)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _pil_colourfulness(im: Any) -> float:
    from PIL import Image

    if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        return 0.0
    if im.format == "JPEG":
        im.draft("RGB", (256, 256))
    im = im.convert("RGB")
    im.thumbnail((256, 256), Image.Resampling.BILINEAR)
    return colourfulness(np.asarray(im))


def colourfulness_of_file(path: str | Path) -> float | None:
    """Colourfulness of an image file's own pixels, or None where Pillow cannot read it (e.g. DICOM)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _pil_colourfulness(im)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def colourfulness_of_bytes(data: bytes) -> float | None:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _pil_colourfulness(im)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


# ---- signals ---------------------------------------------------------------------------------------


def thumb_std(img: np.ndarray) -> float:
    from xraydx.transforms import resize_uint8

    return float(resize_uint8(img, 64).astype(np.float32).std())


def lung_signals(clean: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Shape of the cleaned segmentation at model resolution: area, components, side-by-side-ness."""
    from scipy import ndimage

    fg = clean > threshold
    lab, n = ndimage.label(fg)
    out = {"lung_fraction": float(fg.mean()), "components": float(n), "side_by_side": 0.0, "area_ratio": 0.0}
    if n < 2:
        return out
    h, w = fg.shape
    parts = []
    for i in (1, 2):
        ys, xs = np.nonzero(lab == i)
        parts.append((xs.mean() / w, ys.min() / h, (ys.max() + 1) / h, ys.size))
    (cx_a, t_a, b_a, n_a), (cx_b, t_b, b_b, n_b) = sorted(parts)
    overlap = max(0.0, min(b_a, b_b) - max(t_a, t_b)) / max(1e-6, min(b_a - t_a, b_b - t_b))
    out["side_by_side"] = float(cx_a < 0.5 < cx_b) * overlap
    out["area_ratio"] = min(n_a, n_b) / max(n_a, n_b)
    return out


# ---- the guard -------------------------------------------------------------------------------------

_GUARDS: dict[tuple[str, str, str, int], OODGuard] = {}
_LOCK = threading.Lock()


class OODGuard:
    """Scores uint8 gray images for 'is this a frontal chest X-ray'. See the module doc for the method."""

    def __init__(
        self, segmenter: LungSegmenter, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        self.segmenter = segmenter
        self.meta = meta
        t = {k: v.double().numpy() for k, v in tensors.items()}
        self.mean, self.scale = t["mean"], t["scale"]
        self.components, self.eigvals = t["components"], t["eigenvalues"]
        self.sigma2 = float(meta["sigma2"])
        self.threshold = float(meta["threshold"])
        rules = meta["rules"]
        self.min_lung, self.max_lung = float(rules["min_lung_fraction"]), float(rules["max_lung_fraction"])
        self.rot_gap, self.inv_gap = float(rules["rotation_gap"]), float(rules["inversion_gap"])
        want = meta.get("segmenter_sha256_16")
        if want and segmenter.path is not None and segmenter.identity != want:
            raise OODError(
                f"OOD statistics were fit on segmenter {want}, but the segmenter loaded is {segmenter.identity};"
                " refit them with `python -m xraydx.ood fit`"
            )

    @classmethod
    def load(
        cls, path: str | Path, segmenter: LungSegmenter | None = None, device: str | torch.device = "cpu"
    ) -> OODGuard:
        meta = read_metadata(path)
        if meta.get("kind") != OOD_KIND:
            raise OODError(
                f"{path}: an xraydx file, but not OOD-guard statistics (kind={meta.get('kind')!r})"
            )
        tensors = checkpoint.load_tensors(path, OODError, "the statistics")
        missing = {"mean", "scale", "components", "eigenvalues"} - set(tensors)
        if missing:
            raise OODError(f"{path}: statistics missing {sorted(missing)}")
        return cls(segmenter or LungSegmenter.default(device), tensors, meta)

    @classmethod
    def default(cls, device: str | torch.device = "cpu", engine: str = "torch", threads: int = 0) -> OODGuard:
        """The shipped guard (shipped segmenter + statistics), loaded once per device and engine; its
        networks (segmenter, feature network) run on ``engine`` (:func:`xraydx.engines.lung_segmenter`)."""
        if not DEFAULT_GUARD.is_file():
            raise OODError(
                f"{DEFAULT_GUARD}: the shipped OOD statistics are missing from this installation; fit them with"
                " `python -m xraydx.ood fit` (see docs/lungs_and_ood.md)"
            )
        key = (str(DEFAULT_GUARD), str(torch.device(device)), engine, int(threads))
        with _LOCK:
            if key not in _GUARDS:
                _GUARDS[key] = cls.load(DEFAULT_GUARD, lung_segmenter(engine, device, threads), device)
            return _GUARDS[key]

    # -- scoring --

    def distance(self, features: np.ndarray) -> np.ndarray:
        """sqrt(PPCA Mahalanobis / D) of (N, D) descriptors; about 1 for typical training CXRs."""
        z = (np.atleast_2d(features).astype(np.float64) - self.mean) / self.scale
        y = z @ self.components.T
        inside = (y**2 / self.eigvals).sum(1)
        resid = np.maximum((z**2).sum(1) - (y**2).sum(1), 0.0)
        return np.sqrt((inside + resid / self.sigma2) / z.shape[1])

    def _result(
        self, img: np.ndarray, a: SegAnalysis, colour: float | None, window: str | None = None
    ) -> OODResult:
        reasons: list[str] = []
        scores: list[float] = []
        det: dict[str, float] = {}
        thr = self.threshold
        d = float(self.distance(a.features)[0])
        det["feature_distance"] = d
        scores.append(d / thr)
        if d > thr:
            reasons.append(
                f"looks unlike the chest X-rays the guard was fit on (feature distance {d:.2f}, threshold {thr:.2f})"
            )
        if a.variants is not None:  # orientation test: is a rotated or inverted copy more CXR-like?
            dv = self.distance(a.variants)
            k = int(np.argmin(dv[:3]))
            rot, inv = d - float(dv[k]), d - float(dv[3])
            det["rotation_gap"], det["inversion_gap"] = rot, inv
            scores += [1 + (rot - self.rot_gap) / thr, 1 + (inv - self.inv_gap) / thr]
            if rot > self.rot_gap:
                reasons.append(
                    f"looks rotated: turned by {90 * (k + 1)} degrees it is much closer to the chest X-rays seen"
                    f" (distance {float(dv[k]):.2f} against {d:.2f})"
                )
            if inv > self.inv_gap:
                reasons.append(
                    f"looks inverted (bone dark, air bright): inverted back it is much closer to the chest X-rays"
                    f" seen (distance {float(dv[3]):.2f} against {d:.2f})"
                )
        sd = thumb_std(img)
        det["thumb_std"] = sd
        if sd < BLANK_STD:
            reasons.append(f"blank or nearly constant image (gray-level spread {sd:.1f})")
            scores.append(max(RULE_SCORE, BLANK_STD / max(sd, 0.1)))
        if colour is not None:
            det["colourfulness"] = colour
            if colour > COLOURFUL_MAX:
                reasons.append(f"colour image (colourfulness {colour:.0f}); radiographs are gray")
                scores.append(max(RULE_SCORE, colour / COLOURFUL_MAX))
        sig = lung_signals(a.clean, self.segmenter.threshold)
        det.update(sig)
        f = sig["lung_fraction"]
        if f < self.min_lung:
            reasons.append(
                f"no clear lung fields (lung area {100 * f:.1f}% of the image; chest X-rays:"
                f" {100 * self.min_lung:.0f}-{100 * self.max_lung:.0f}%)"
            )
            scores.append(max(RULE_SCORE, self.min_lung / max(f, 1e-3)))
        elif f > self.max_lung:
            reasons.append(f"lung area {100 * f:.0f}% of the image, more than any chest X-ray seen")
            scores.append(max(RULE_SCORE, f / self.max_lung))
        score = float(max(scores))
        if reasons and score <= 1.0:
            score = RULE_SCORE
        is_cxr = not reasons
        if not is_cxr and window == "default":
            reasons.append(DEFAULT_WINDOW_HINT)
        return OODResult(is_cxr, score, reasons, det, a.mask)

    def check(
        self, img: np.ndarray, colourfulness: float | None = None, window: str | None = None
    ) -> OODResult:
        """Score one uint8 (H, W) gray image; pass the file's colourfulness where known, and ``window``:
        how :func:`xraydx.io.read_image` windowed it (its ``info["window"]``)."""
        return self._result(img, self.segmenter.analyze_many([img], variants=True)[0], colourfulness, window)

    def check_many(
        self,
        imgs: Sequence[np.ndarray],
        colours: Sequence[float | None] | None = None,
        batch_size: int = 16,
        windows: Sequence[str | None] | None = None,
    ) -> list[OODResult]:
        cols = list(colours) if colours is not None else [None] * len(imgs)
        wins = list(windows) if windows is not None else [None] * len(imgs)
        return [
            self._result(im, a, c, w)
            for im, a, c, w in zip(
                imgs, self.segmenter.analyze_many(imgs, batch_size, variants=True), cols, wins, strict=True
            )
        ]

    def check_file(self, path: str | Path) -> OODResult:
        """Read a file (raises ImageReadError) and score it, colour and windowing included."""
        info: dict[str, Any] = {}
        img = read_image(path, info=info)
        return self.check(img, colourfulness_of_file(path), info.get("window"))


# ---- fitting ---------------------------------------------------------------------------------------


@dataclass
class Descriptors:
    """What fitting needs from a set of real CXRs (readable files only)."""

    features: np.ndarray  # (N, D)
    signals: np.ndarray  # (N, 4): lung_fraction, components, side_by_side, area_ratio
    variants: np.ndarray | None  # (N, 4, D) or None


def _features(
    seg: LungSegmenter, paths: Sequence[Path], desc: str, progress: bool = True, variants: bool = False
) -> Descriptors:
    from tqdm.auto import tqdm

    feats, sigs, var = [], [], []
    batch: list[np.ndarray] = []

    def flush() -> None:
        for a in seg.analyze_many(batch, variants=variants):
            feats.append(a.features)
            s = lung_signals(a.clean, seg.threshold)
            sigs.append([s["lung_fraction"], s["components"], s["side_by_side"], s["area_ratio"]])
            if a.variants is not None:
                var.append(a.variants)
        batch.clear()

    for p in tqdm(paths, desc=desc, disable=not progress, leave=False):
        try:
            batch.append(read_image(p))
        except ImageReadError as exc:
            print(f"xraydx: skipped {printable(exc)}", file=sys.stderr)
            continue
        if len(batch) >= 32:
            flush()
    if batch:
        flush()
    return Descriptors(
        np.array(feats, np.float32),
        np.array(sigs, np.float64),
        np.array(var, np.float32) if variants else None,
    )


def cached_features(
    seg: LungSegmenter,
    paths: Sequence[Path],
    desc: str,
    cache: Path | None,
    progress: bool = True,
    variants: bool = False,
) -> Descriptors:
    """:func:`_features`, kept in an ``.npz`` per file list and segmenter (reused when both match)."""
    import hashlib

    key = hashlib.sha1(("\n".join(map(str, paths)) + seg.identity + str(variants)).encode()).hexdigest()[:16]
    f = None if cache is None else Path(cache) / f"{desc}-{key}.npz"
    if f is not None and f.is_file():
        with np.load(f, allow_pickle=False) as z:
            return Descriptors(z["features"], z["signals"], z["variants"] if variants else None)
    got = _features(seg, paths, desc, progress, variants)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp.npz")
        extra = {"variants": got.variants} if got.variants is not None else {}
        np.savez(tmp, features=got.features, signals=got.signals, **extra)
        tmp.replace(f)
    return got


def _group_split3(groups: Sequence[str], seed: int, fractions: tuple[float, float]) -> list[str]:
    """'fit' / 'calib' / 'test' per item, whole groups together (seeded)."""
    rng = np.random.default_rng(seed)
    uniq = sorted(set(groups))
    rng.shuffle(uniq)
    cut1, cut2 = int(round(fractions[0] * len(uniq))), int(round((fractions[0] + fractions[1]) * len(uniq)))
    part = {g: ("fit" if i < cut1 else "calib" if i < cut2 else "test") for i, g in enumerate(uniq)}
    return [part[g] for g in groups]


def cxr3_parts(
    root: Path, seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)
) -> dict[str, list[Path]]:
    """cxr3 (manifest.csv with file, patient_group) split by patient group into fit / calib / test."""
    with open(root / "manifest.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    where = _group_split3([r["patient_group"] for r in rows], seed, fractions)
    out: dict[str, list[Path]] = {"fit": [], "calib": [], "test": []}
    for r, w in zip(rows, where, strict=True):
        out[w].append(root / r["file"])
    return out


def lungseg_parts(root: Path, seed: int = 0) -> dict[str, list[Path]]:
    """The lungseg images by the segmenter's own patient split: train -> fit, val -> calib, test -> test."""
    from xraydx.data import collect_samples

    samples, _ = collect_samples([root], seed=seed)
    names = {"train": "fit", "val": "calib", "test": "test"}
    out: dict[str, list[Path]] = {"fit": [], "calib": [], "test": []}
    for s in samples:
        out[names[s.split]].append(s.image)
    return out


def fit_guard(
    seg: LungSegmenter,
    fit: Descriptors,
    calib: Descriptors,
    *,
    k: int = 64,
    percentile: float = 99.5,
    orientation_percentiles: tuple[float, float] = (99.9, 99.7),
    rule_margin: float = 0.7,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PPCA statistics from the fit descriptors; from the calibration CXRs: the distance threshold
    (``percentile``), the rotation / inversion gap thresholds (``orientation_percentiles``) and the
    lung-area bounds (0.1th and 99.9th percentiles widened by ``rule_margin``)."""
    if calib.variants is None:
        raise OODError("calibration descriptors need their rotated / inverted variants (variants=True)")
    x = fit.features.astype(np.float64)
    mean = x.mean(0)
    sd = x.std(0)
    scale = np.maximum(sd, 0.05 * float(np.median(sd)) + 1e-6)
    z = (x - mean) / scale
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    lam = s**2 / max(1, len(z) - 1)
    k = min(k, len(lam) - 1)
    d = z.shape[1]
    sigma2 = float(lam[k:].sum() / (d - k))
    tensors = {
        "mean": torch.from_numpy(mean.astype(np.float32)),
        "scale": torch.from_numpy(scale.astype(np.float32)),
        "components": torch.from_numpy(vt[:k].astype(np.float32)),
        "eigenvalues": torch.from_numpy(lam[:k].astype(np.float32)),
    }
    rules0 = {"min_lung_fraction": 0.0, "max_lung_fraction": 1.0, "rotation_gap": 0.0, "inversion_gap": 0.0}
    meta: dict[str, Any] = {"sigma2": sigma2, "threshold": 1.0, "rules": rules0}
    probe = OODGuard(seg, tensors, meta)
    dist = probe.distance(calib.features)
    n = len(dist)
    dv = probe.distance(calib.variants.reshape(n * 4, -1)).reshape(n, 4)
    rot_gap, inv_gap = dist - dv[:, :3].min(1), dist - dv[:, 3]
    frac = calib.signals[:, 0]
    rules = {
        "min_lung_fraction": float(np.percentile(frac, 0.1) * rule_margin),
        "max_lung_fraction": float(min(0.95, np.percentile(frac, 99.9) / rule_margin)),
        "rotation_gap": float(np.percentile(rot_gap, orientation_percentiles[0])),
        "inversion_gap": float(np.percentile(inv_gap, orientation_percentiles[1])),
    }
    meta.update(
        {
            "threshold": float(np.percentile(dist, percentile)),
            "rules": rules,
            "k": k,
            "percentile": percentile,
            "orientation_percentiles": list(orientation_percentiles),
            "rule_margin": rule_margin,
            "descriptor_dim": d,
            "fit_n": len(fit.features),
            "calib_n": n,
            "calib_distance_quantiles": {
                str(q): float(np.percentile(dist, q)) for q in (50, 90, 99, 99.5, 99.9, 100)
            },
        }
    )
    return tensors, meta


def save_guard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the guard's statistics as an xraydx checkpoint of kind ``ood-guard``."""
    checkpoint.save(path, tensors, {"kind": OOD_KIND, **meta})


def fit_guard_files(
    out: str | Path,
    cxr3: str | Path,
    *,
    lungseg: str | Path | None = None,
    segmenter: str | Path | None = None,
    k: int = 64,
    percentile: float = 99.5,
    rotation_percentile: float = 99.9,
    inversion_percentile: float = 99.7,
    seed: int = 0,
    threads: int = 2,
    overwrite: bool = False,
    features_cache: str | Path | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Fit the guard on a cxr3-style folder (and a lungseg folder), write it to ``out``; returns its metadata.

    Fit set: cxr3's fit part (+ lungseg's segmenter-train split); calibration: cxr3's calib part (+ lungseg's
    val split). ``features_cache``: a folder to keep the computed descriptors in (reused on a rerun)."""
    from xraydx.fsutil import refuse_overwrite

    out = Path(out)
    refuse_overwrite(out, overwrite)
    torch.set_num_threads(threads)
    seg = LungSegmenter.load(segmenter) if segmenter else LungSegmenter.default()
    sets = {f"cxr3-{k}": v for k, v in cxr3_parts(Path(cxr3), seed).items() if k != "test"}
    if lungseg:
        sets.update({f"lungseg-{k}": v for k, v in lungseg_parts(Path(lungseg), seed).items() if k != "test"})
    cache = Path(features_cache) if features_cache else None
    got = {n: cached_features(seg, p, n, cache, variants=n.endswith("-calib")) for n, p in sets.items()}

    def join(part: str) -> Descriptors:
        ds = [v for n, v in got.items() if n.endswith(part)]
        var = [v.variants for v in ds if v.variants is not None]
        return Descriptors(
            np.concatenate([v.features for v in ds]),
            np.concatenate([v.signals for v in ds]),
            np.concatenate(var) if len(var) == len(ds) else None,
        )

    tensors, meta = fit_guard(
        seg, join("-fit"), join("-calib"), k=k, percentile=percentile,
        orientation_percentiles=(rotation_percentile, inversion_percentile),
    )  # fmt: skip
    meta.update(
        {
            "segmenter_sha256_16": seg.identity,
            "fit_data": {
                "cxr3": str(cxr3),
                "lungseg": str(lungseg or ""),
                "seed": seed,
                "cxr3_split": "patient_group 60/20/20 fit/calib/test",
                "lungseg_split": "segmenter train/val/test",
            },
            "command": command,
        }
    )
    save_guard(out, tensors, meta)
    return meta
