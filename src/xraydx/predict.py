"""Batch inference from a checkpoint into a CSV or JSON predictions file.

Inputs are files, folders (searched recursively) or list files (one path per line). Files are read
in a stream, a batch at a time; an unreadable file gets a row with its error in ``status`` and the
rest are still predicted. The rows are written by :mod:`xraydx.predwrite` (atomically; ``--resume`` carries a killed run on).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from xraydx import schema
from xraydx.ahead import ahead
from xraydx.constants import NOT_FRONTAL_FLAG, UNCERTAIN_FLAG
from xraydx.data.inputs import expand_inputs
from xraydx.device import resolve_device
from xraydx.engines import Classifier, batch_logits, batch_outputs, lung_segmenter
from xraydx.errors import ExportError
from xraydx.frontal import view_reason_of_file
from xraydx.fsutil import printable_path
from xraydx.io import ImageReadError, read_image
from xraydx.ood import OODGuard, OODResult, colourfulness_of_file
from xraydx.transforms import Preprocessing, preprocess

__all__ = [
    "NONFINITE",
    "NOT_FRONTAL_FLAG",
    "UNCERTAIN_FLAG",
    "Checked",
    "Prediction",
    "Predictor",
    "batch_logits",
    "batch_outputs",
    "decode_ahead",
    "expand_inputs",
    "printable_path",
    "resolve_device",
]

#: the reason of a row whose probabilities are not finite (a damaged model): never a class
NONFINITE = "model produced non-finite output"


@dataclass
class Prediction:
    path: str
    probs: list[float] | None
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checked:
    """One image after the pipeline's per-image checks: what the classifier sees (``prepared``, uint8
    (S, S)), the OOD guard's verdict (None where the check is off or missing) and the view rule's
    reason (:mod:`xraydx.frontal`: a DICOM header saying lateral, unknown or one-sided; None otherwise)."""

    prepared: np.ndarray
    ood: OODResult | None = None
    shift: float | None = None  # the source-shift score (xraydx.shift), where the checkpoint has one
    view: str | None = None
    agree: bool | None = None  # an ensemble's: do its members' top classes agree (None: one network)

    @property
    def status(self) -> str:
        """``ok``, or ``not_cxr`` where the header's view or the guard says this is not a frontal chest
        X-ray (its probabilities are still reported, for reference only; the flag says not to act on them)."""
        if self.view:
            return "not_cxr"
        return "ok" if self.ood is None or self.ood.is_cxr else "not_cxr"

    @property
    def reason(self) -> str | None:
        """Why the status is ``not_cxr`` (the view first, then the guard's reasons); None where it is ok."""
        if self.status == "ok":
            return None
        why = [self.view] if self.view else []
        if self.ood is not None and not self.ood.is_cxr:
            why += list(self.ood.reasons) or [f"OOD score {self.ood.score:.3g}"]
        return "; ".join(why) or "does not look like a frontal chest X-ray"

    def extra(self) -> dict[str, Any]:
        """The check's columns of a predictions row (``ood_score``, ``ood_reason``, ``shift_score``;
        ``ood``: the guard's whole verdict, for messages)."""
        out: dict[str, Any] = {"ood_score": None if self.ood is None else float(self.ood.score),
                               "ood_reason": self.reason, "shift_score": self.shift}  # fmt: skip
        if self.ood is not None:
            out["ood"] = self.ood.to_dict()
        return out

    def ood_info(self) -> dict[str, Any] | None:
        """The guard's verdict as one JSON-able dict (``status``, ``flagged``, ``score``, ``reasons``,
        ``reason``, ``details``), or None without a check: what an API reports."""
        if self.ood is None and not self.view:
            return None
        info = self.ood.to_dict() if self.ood is not None else {"score": None, "reasons": []}
        if self.view:
            info["reasons"] = [self.view, *info.get("reasons", [])]
        info.update(status=self.status, flagged=self.status != "ok")
        if self.reason:
            info["reason"] = self.reason
        return info


def load_lung_segmenter(engine: str = "torch", threads: int = 0) -> Any | None:
    """The shipped lung segmenter (on the CPU) with its networks on ``engine``, or None where its shipped
    model is missing."""
    try:
        return lung_segmenter(engine, "cpu", threads)
    except ExportError:
        raise  # asked for onnx and it cannot be had: an error, not a pipeline without masks
    except (OSError, ValueError, RuntimeError):
        return None


def abstention_threshold(rule: Any) -> float | None:
    """The threshold of a checkpoint's abstention rule, or None where it has none or an invalid one."""
    if not isinstance(rule, dict) or rule.get("threshold") is None:
        return None
    try:
        t = float(rule["threshold"])
    except (TypeError, ValueError):
        return None
    return t if 0.0 <= t <= 1.0 else None


def load_shift_rule(checkpoint: Path, model: Any) -> Any | None:
    """The checkpoint's source-shift sidecar (:func:`xraydx.shift.sidecar_path`) for its torch model, or
    None where there is none (or no torch model: an exported ``.onnx`` file). An unusable sidecar is an
    error (ShiftError), never silently ignored."""
    from xraydx.shift import load_sidecar, sidecar_path

    side = sidecar_path(checkpoint)
    if model is None or not side.is_file():
        return None
    return load_sidecar(side, model)


class Predictor:
    """A checkpoint loaded once: the lung segmenter, the OOD guard and the classifier, on one engine.

    The one home of the per-image OOD check (:meth:`check`) and of the abstention rule
    (:meth:`uncertain` / :meth:`flag`): predict, explain and serve all use these."""

    def __init__(
        self, checkpoint: str | Path, device: str = "auto", engine: str = "torch", ood: bool = True,
        threads: int = 0, tta: str | None = None,
    ) -> None:  # fmt: skip
        """engine: ``torch`` (default) or ``onnx`` (onnxruntime for every network; ``checkpoint`` may then
        also be an exported ``.onnx`` file). See :mod:`xraydx.engines`. ood: check every image with
        :mod:`xraydx.ood`'s guard (status ``not_cxr`` + ``ood_score``). threads: onnxruntime's intra-op
        threads (0: the CPUs this process may use). tta: ``none`` | ``affine`` overrides the checkpoint's
        test-time augmentation (:mod:`xraydx.tta`); None keeps it."""
        self.device = resolve_device(device)
        self.engine = engine
        self.threads = int(threads)
        self.classifier = Classifier(checkpoint, engine, device=self.device, threads=self.threads, tta=tta)
        self.meta = self.classifier.meta
        self.model = self.classifier.model  # the torch classifier (Grad-CAM); None for a .onnx file
        self.checkpoint = Path(checkpoint)
        #: the ``model_id`` column of every row: ``<architecture>-<sha256[:12]>`` of the checkpoint file
        self.model_id = schema.model_id(self.checkpoint, self.meta)
        self.spec: Preprocessing = self.classifier.spec
        if self.spec.tta != Preprocessing.from_dict(self.meta["preprocessing"]).tta:
            # another test-time augmentation gives other outputs: rows say so (and --resume tells them apart)
            name, digest = self.model_id.rsplit("-", 1)
            self.model_id = f"{name}+tta_{self.spec.tta}-{digest}"
        self.classes: list[str] = list(self.classifier.classes)
        self.temperature = self.classifier.temperature
        self.abstention: dict[str, Any] | None = self.meta.get("abstention") or None  # see docs/trust.md
        self.threshold = abstention_threshold(self.abstention)
        #: the rule flags every prediction: its target accuracy was not reached on validation (the page
        #: and the API show no "within the rule" then; ``abstention["reason"]`` says why)
        self.flag_all = self.threshold is not None and (self.abstention or {}).get("flag_all") is True
        #: an ensemble's rule also flags where its members' top classes differ (``Checked.agree``)
        self.members_rule = (
            self.threshold is not None and (self.abstention or {}).get("members_disagree") is True
        )
        self.n_members = len((self.meta.get("architecture") or {}).get("member_temperatures") or [])
        self._segmenter: Any = None
        self._ood: Any = None if ood else False  # xraydx.ood.OODGuard, loaded on first use; False: no check
        self.shift = load_shift_rule(self.checkpoint, self.model)  # xraydx.shift.ShiftRule or None
        #: the network of the source-shift score: always the model as trained (not an adapted copy)
        self.trained_model = self.model
        #: after :func:`xraydx.bnadapt.adapt_predictor`: {"images", "layers", "weight", "first"}
        self.adapted: dict[str, Any] | None = None

    # -- the abstention rule --

    def uncertain(self, probs: Sequence[float] | np.ndarray, agree: bool | None = None) -> bool | None:
        """Whether the top calibrated probability is below the checkpoint's abstention threshold (chosen
        on validation at the end of training), or, for an ensemble whose rule has ``members_disagree``,
        its members' top classes differ (``agree`` False); None where the checkpoint has no (valid) rule."""
        if self.threshold is None:
            return None
        if self.flag_all or float(np.max(probs)) < self.threshold:
            return True
        return bool(self.members_rule and agree is False)

    def shifted(self, score: float | None) -> bool:
        """Whether a source-shift score is at or above the checkpoint's calibrated shift threshold."""
        return bool(self.shift is not None and score is not None and self.shift.flags(np.array([score]))[0])

    def flag(
        self, probs: Sequence[float] | np.ndarray, shift: float | None = None, agree: bool | None = None
    ) -> str:
        """The predictions' ``flag`` column: UNCERTAIN_FLAG where :meth:`uncertain`, SHIFT_FLAG where
        :meth:`shifted` (both joined by "; "), else ""."""
        from xraydx.shift import SHIFT_FLAG

        parts = [UNCERTAIN_FLAG] if self.uncertain(probs, agree) else []
        if self.shifted(shift):
            parts.append(SHIFT_FLAG)
        return "; ".join(parts)

    def abstention_note(self) -> str:
        """The rule in words (for an API or a report)."""
        t, rule = self.threshold, self.abstention or {}
        if t is None:
            if rule.get("threshold") is not None:
                return "the model's abstention threshold is invalid and was ignored: no uncertainty flag"
            return "this model has no abstention rule, so no prediction is flagged as uncertain"
        if self.flag_all:
            why = rule.get("reason") or "the target accuracy was not reached on validation"
            return f"every prediction is flagged uncertain: {why}"
        note = f"uncertain when the highest calibrated probability is below {t:.3f}"
        if self.members_rule:
            note += f" or the ensemble's {self.n_members} networks do not all pick the same class"
        cov, acc = rule.get("val_coverage"), rule.get("val_accuracy_accepted")
        if isinstance(cov, (int, float)) and isinstance(acc, (int, float)):
            note += f" (chosen on validation: keeps {cov:.0%} of cases, accuracy {acc:.3f} on those"
            target = rule.get("target_accuracy")
            if rule.get("target_reached") is False and isinstance(target, (int, float)):
                note += f"; the {target:.2f} target accuracy was not reached"
            note += ")"
        return note

    # -- lung masks and the OOD guard --

    def segmenter(self) -> Any | None:
        """The shipped lung segmenter on this predictor's engine (None where missing); warns once where the
        checkpoint was trained with masks from another segmenter."""
        if self._segmenter is None:
            self._segmenter = load_lung_segmenter(self.engine, self.threads) or False
            trained = (self.meta.get("lung_segmenter") or {}).get("identity")
            if self._segmenter and trained and trained != self._segmenter.identity:
                warnings.warn(
                    f"{self.checkpoint.name}: trained with lung masks from segmenter {trained}, but the installed"
                    f" segmenter is {self._segmenter.identity}: crops differ, predictions may shift",
                    stacklevel=3,
                )
        return self._segmenter or None

    def lung_mask(self, img: np.ndarray) -> np.ndarray:
        """A lung mask for a model trained with lung_mask=crop|mask: from the shipped segmenter, else an
        ImageReadError saying why none can be made."""
        seg = self.segmenter()
        if seg is None:
            raise ImageReadError(
                None,
                f"this model was trained with lung_mask={self.spec.lung_mask} and needs a lung mask for each image,"
                " but no lung segmenter is available (xraydx.segment with a shipped model); use a dataset with"
                " lung masks, or a model trained with lung_mask=none",
            )
        return seg.predict_mask(img)

    def ood_guard(self) -> OODGuard | None:
        """The shipped OOD guard on this predictor's engine (sharing the segmenter), or None if off or missing."""
        if self._ood is None:
            try:
                self._ood = OODGuard.default("cpu", self.engine, self.threads)
            except ExportError:
                raise
            except (ImportError, OSError, ValueError) as exc:
                print(f"xraydx: warning: no out-of-distribution check ({exc})", file=sys.stderr)
                self._ood = False
        return self._ood or None

    def prepare(self, img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if self.spec.lung_mask != "none" and mask is None:
            mask = self.lung_mask(img)
        return preprocess(img, self.spec, mask)

    def check(
        self,
        imgs: Sequence[np.ndarray],
        colours: Sequence[float | None] | None = None,
        windows: Sequence[str | None] | None = None,
        views: Sequence[str | None] | None = None,
    ) -> list[Checked | str]:
        """The one per-image check, batched: the view rule (``views``: each file's
        :func:`xraydx.frontal.view_reason_of_file`, where known), the OOD guard (whose lung masks are the
        segmenter's, i.e. what :meth:`lung_mask` returns) and the preprocessing. One entry per image: a
        :class:`Checked`, or the reason it cannot be predicted. ``colours``: each file's colourfulness where
        known; ``windows``: how the reader windowed each (``read_image``'s ``info["window"]``), so that a
        rejection can say when the default window is the likely cause."""
        cols = list(colours) if colours is not None else [None] * len(imgs)
        wins = list(windows) if windows is not None else [None] * len(imgs)
        vws = list(views) if views is not None else [None] * len(imgs)
        guard = self.ood_guard()
        needs_mask = self.spec.lung_mask != "none"
        try:
            if guard is not None:
                kw = {"windows": wins} if windows is not None else {}
                oods: list[OODResult | None] = list(
                    guard.check_many(imgs, cols, batch_size=max(1, len(imgs)), **kw)
                )
                masks = [o.mask if needs_mask and o is not None else None for o in oods]
            else:
                oods = [None] * len(imgs)
                seg = self.segmenter() if needs_mask else None
                masks = (
                    seg.predict_masks(list(imgs), max(1, len(imgs)))
                    if seg is not None
                    else [None] * len(imgs)
                )
        except (ImageReadError, ValueError) as exc:
            if len(imgs) > 1:  # one bad image: the others are still predicted
                return [
                    c
                    for img, col, win, v in zip(imgs, cols, wins, vws, strict=True)
                    for c in self.check([img], [col], [win], [v])
                ]
            return [_reason(exc)]
        out: list[Checked | str] = []
        for img, mask, oc, v in zip(imgs, masks, oods, vws, strict=True):
            try:
                out.append(Checked(self.prepare(img, mask), oc, view=v))
            except (ImageReadError, ValueError) as exc:
                out.append(_reason(exc))
        self._score_shift([c for c in out if isinstance(c, Checked)])
        return out

    def _score_shift(self, ok: list[Checked]) -> None:
        """Each prepared image's source-shift score (xraydx.shift), where the checkpoint has a sidecar."""
        if not ok or self.shift is None or self.trained_model is None:
            return
        from xraydx.shift import batch_features

        prepared = np.stack([c.prepared for c in ok])
        feats = batch_features(self.trained_model, prepared, self.spec, self.device)
        for c, sc in zip(ok, self.shift.score.score(feats), strict=True):
            c.shift = float(sc)

    # -- classification --

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, C) for preprocessed uint8 images (N, S, S)."""
        return self.classifier.probs(images)

    def probs_agree(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`probs` and, for an ensemble, whether its members agree on each image (None otherwise)."""
        return self.classifier.probs_agree(images)

    def predict_images(
        self,
        imgs: Sequence[np.ndarray],
        colours: Sequence[float | None] | None = None,
        windows: Sequence[str | None] | None = None,
        views: Sequence[str | None] | None = None,
    ) -> list[tuple[np.ndarray, Checked] | str]:
        """The whole pipeline on decoded gray images: (probabilities, :class:`Checked`) or an error reason
        (:data:`NONFINITE` where the model's output is not finite: never a class)."""
        checked = self.check(imgs, colours, windows, views)
        ok = [c for c in checked if isinstance(c, Checked)]
        probs, agree = (
            self.probs_agree(np.stack([c.prepared for c in ok])) if ok else (np.zeros((0, 0)), None)
        )
        for i, c in enumerate(ok):
            c.agree = None if agree is None else bool(agree[i])
        rows = iter(probs)
        out: list[tuple[np.ndarray, Checked] | str] = []
        for c in checked:
            if isinstance(c, Checked):
                p = next(rows)
                out.append((p, c) if finite(p) else NONFINITE)
            else:
                out.append(c)
        return out

    def prediction(self, path: str, probs: np.ndarray, checked: Checked) -> Prediction:
        """A predictions row: probabilities, status, the flags (abstention, source shift) and the check's
        columns."""
        extra = {"flag": self.flag(probs, checked.shift, checked.agree), **checked.extra()}
        return Prediction(path, [float(v) for v in probs], checked.status, extra)

    def predict_files(
        self, paths: Iterable[Path], batch_size: int = 32, progress: bool = True, total: int | None = None
    ) -> Iterator[Prediction]:
        """Predictions in input order; files are decoded on a thread ahead of inference (a bounded queue)
        and predicted ``batch_size`` at a time; an unreadable file is a row with its error."""
        bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, leave=False)
        want_colour = self.ood_guard() is not None
        pending: list[Decoded] = []

        def flush() -> Iterator[Prediction]:
            good = [d for d in pending if d.image is not None]
            imgs = [d.image for d in good if d.image is not None]
            results = iter(
                self.predict_images(
                    imgs, [d.colour for d in good], [d.window for d in good], [d.view for d in good]
                )
                if good
                else []
            )
            for d in pending:
                r = next(results) if d.image is not None else d.error
                if isinstance(r, tuple):
                    yield self.prediction(str(d.path), *r)
                else:
                    yield Prediction(str(d.path), None, f"error: {r}")
                bar.update(1)
            pending.clear()

        n_ok = 0
        for d in decode_ahead(paths, depth=2 * batch_size, colour=want_colour):
            pending.append(d)
            n_ok += d.image is not None
            if n_ok >= batch_size:
                yield from flush()
                n_ok = 0
        yield from flush()
        bar.close()


def finite(probs: Sequence[float] | np.ndarray) -> bool:
    """Whether every probability is a finite number (a damaged model gives NaN: refused, never a class)."""
    return bool(np.all(np.isfinite(np.asarray(probs, dtype=np.float64))))


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, ImageReadError) else str(exc)


@dataclass
class Decoded:
    path: Path
    image: np.ndarray | None  # uint8 (H, W) gray, or None where unreadable
    colour: float | None = None  # the file's colourfulness (OOD guard), where asked for and readable
    error: str = ""
    window: str | None = None  # how the reader windowed it (read_image's info["window"])
    view: str | None = None  # xraydx.frontal's reason where the file's DICOM header says not frontal


def decode_ahead(paths: Iterable[Path], depth: int = 64, colour: bool = False) -> Iterator[Decoded]:
    """``read_image`` of each path on a background thread, at most ``depth`` images ahead; in input order.
    An unreadable file comes through with its reason; an unexpected error is raised here."""

    def decoded() -> Iterator[Decoded]:
        for p in paths:
            try:
                info: dict[str, Any] = {}
                img = read_image(p, info=info)
                d = Decoded(Path(p), img, colourfulness_of_file(p) if colour else None)
                d.window = info.get("window")
                d.view = view_reason_of_file(p)
            except (ImageReadError, ValueError) as exc:
                d = Decoded(Path(p), None, error=_reason(exc))
            yield d

    return ahead(decoded(), depth, name="xraydx-decode")
