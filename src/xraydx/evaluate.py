"""Evaluating a classifier on one split: the runner behind ``xraydx evaluate`` and the end of training.

:func:`evaluate_split` takes the split's preprocessed images and records and a loaded model, and
writes ``report.html`` and ``predictions.csv`` (path, one probability column per class, label, source,
the abstention flag; unreadable files as error rows); it returns the metrics (:mod:`xraydx.metrics`'s
:func:`~xraydx.metrics.evaluation_summary`) for the caller's ``metrics.json``. The computing happens
here, the Grad-CAM of the worst errors included (:func:`error_thumbnails`); :mod:`xraydx.report`
only renders what it is given.

:func:`evaluate_checkpoint` is ``xraydx evaluate``: a checkpoint, a dataset and a split (split as
the checkpoint's training run split it), optionally the shortcut audit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xraydx.cache import load_many
from xraydx.constants import CLASSES, UNCERTAIN_FLAG
from xraydx.data import Record
from xraydx.data.membership import checked_split
from xraydx.errors import DatasetError, UsageError
from xraydx.explain import GradCAM
from xraydx.fsutil import atomic_write_json, refuse_overwrite
from xraydx.metrics import evaluation_summary, rule_flags, softmax
from xraydx.predict import Prediction, Predictor, batch_outputs
from xraydx.predwrite import write_predictions
from xraydx.render import gray_png, heat_overlay_png
from xraydx.report import render_report, write_html
from xraydx.transforms import Preprocessing

__all__ = [
    "error_thumbnails", "evaluate_and_report", "evaluate_checkpoint", "evaluate_split", "write_split_predictions",
]  # fmt: skip


def error_thumbnails(
    model: nn.Module, spec: Preprocessing, images: np.ndarray, m: dict[str, Any], temperature: float = 1.0
) -> list[tuple[bytes, bytes | None]]:
    """(image PNG, Grad-CAM overlay PNG of the predicted class) for each of m["worst_errors"]."""
    errs = m.get("worst_errors") or []
    if not errs:
        return []
    idx = np.array([e["index"] for e in errs])
    imgs = np.asarray(images[idx])
    classes = list(m["classes"])
    heats, _ = GradCAM(model, spec, temperature=temperature).batch(
        imgs, [classes.index(e["prediction"]) for e in errs]
    )
    return [(gray_png(im), heat_overlay_png(im, h)) for im, h in zip(imgs, heats, strict=True)]


def evaluate_and_report(
    *,
    model: nn.Module,
    spec: Preprocessing,
    images: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    classes: Sequence[str],
    temperature: float = 1.0,
    paths: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    abstention: dict[str, Any] | None = None,
    title: str = "xraydx evaluation",
    meta: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    agree: np.ndarray | None = None,
) -> tuple[dict[str, Any], str]:
    """metrics.json content and report.html text for one evaluated split (``agree``: an ensemble's
    members' agreement per image, for its abstention rule)."""
    m = evaluation_summary(
        labels, logits, classes, temperature=temperature, sources=sources, paths=paths, abstention=abstention,
        n_boot=n_boot, seed=seed, agree=agree,
    )  # fmt: skip
    thumbs = error_thumbnails(model, spec, images, m, temperature)
    return m, render_report(m, title=title, meta=meta, thumbs=thumbs, audit=audit)


def evaluate_split(
    model: nn.Module,
    spec: Preprocessing,
    images: np.ndarray,
    records: Sequence[Record],
    out: Path,
    *,
    device: torch.device,
    classes: Sequence[str] = CLASSES,
    temperature: float = 1.0,
    abstention: dict[str, Any] | None = None,
    title: str = "xraydx evaluation",
    meta: dict[str, Any] | None = None,
    logits: np.ndarray | None = None,
    agree: np.ndarray | None = None,
    failures: Sequence[tuple[Record, str]] = (),
    audit: dict[str, Any] | None = None,
    predictions: bool = True,
    model_id: str = "",
    order: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on one split's images (``records`` in the same order; ``failures``: records that
    could not be read); write ``out/report.html`` and, with ``predictions``, ``out/predictions.csv``
    (:func:`write_split_predictions`: ``model_id`` of the checkpoint, rows in ``order``).
    ``logits`` / ``agree``: already computed (:func:`xraydx.predict.batch_outputs`), else computed here.
    Returns the metrics (the caller writes metrics.json)."""
    if logits is None:
        computed, agree = batch_outputs(model, images, spec, device)
        logits = computed.numpy()
    labels = np.array([list(classes).index(r.label) for r in records], dtype=np.int64)
    m, html = evaluate_and_report(
        model=model, spec=spec, images=images, labels=labels, logits=logits, classes=classes,
        temperature=temperature, paths=[str(r.path) for r in records], sources=[r.source for r in records],
        abstention=abstention, title=title, meta=meta, audit=audit, agree=agree,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if predictions:
        if not model_id:
            raise ValueError("evaluate_split: predictions.csv needs the model_id of the checkpoint")
        write_split_predictions(
            out / "predictions.csv", records, logits, classes=classes, temperature=temperature,
            abstention=abstention, model_id=model_id, failures=failures, order=order, agree=agree,
        )  # fmt: skip
    write_html(out / "report.html", html, overwrite=True)
    return m


def write_split_predictions(
    path: Path, records: Sequence[Record], logits: np.ndarray, *, classes: Sequence[str], temperature: float,
    abstention: dict[str, Any] | None, model_id: str, failures: Sequence[tuple[Record, str]] = (),
    order: Sequence[str] | None = None, agree: np.ndarray | None = None,
) -> None:  # fmt: skip
    """``predictions.csv`` of an evaluated split: one :mod:`xraydx.schema` row per record (label and source
    added), unreadable ones as error rows, in ``order`` (the split's paths) where given."""
    probs = softmax(logits, temperature)
    flags = rule_flags(probs, abstention, agree)
    rows = [
        Prediction(str(r.path), [float(v) for v in p], "ok",
                   {"label": r.label, "source": r.source, "flag": UNCERTAIN_FLAG if f else ""})
        for r, p, f in zip(records, probs, flags, strict=True)
    ] + [Prediction(str(r.path), None, f"error: {why}", {"label": r.label, "source": r.source})
         for r, why in failures]  # fmt: skip
    if order is not None:
        pos = {p: i for i, p in enumerate(order)}
        rows.sort(key=lambda r: pos.get(r.path, len(pos)))
    write_predictions(rows, path, classes, overwrite=True, kind="evaluate", model_id=model_id)


def evaluate_checkpoint(
    checkpoint: Path, data: str, split: str, out: Path, *, device: str = "auto", overwrite: bool = False,
    progress: bool = True, audit: bool = False, allow_changed_data: bool = False, masks: str = "segmenter",
    adapt_bn: float = 0.0, adapt_bn_layers: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate on one split of a dataset; write metrics.json, report.html and predictions.csv into ``out``.

    The split is made as the checkpoint's training run made it and checked against the membership the
    checkpoint recorded: where the data no longer gives it, ``split="test"`` is refused (images the model
    trained on may now be in it) unless ``allow_changed_data``; other splits go on with a warning.

    ``masks`` (for a lung_mask=crop|mask model): ``segmenter`` (default) crops every image with the shipped
    segmenter's mask, as predict and serve do, so the figures are those of the deployed pipeline;
    ``dataset`` uses the dataset's own lung masks where it has them (the segmenter's elsewhere).

    ``adapt_bn`` > 0: the network's BatchNorm statistics are first adapted to the split's readable images
    as one set (:func:`xraydx.bnadapt.adapt_predictor`, weight ``adapt_bn``, ``adapt_bn_layers``: each network's
    first K layers only), as ``predict --adapt-bn`` adapts to its inputs: for a labelled folder of one
    site. Not with ``audit`` (the audit would read the network as trained)."""
    if masks not in MASK_SOURCES:
        raise UsageError(f"--masks must be one of {', '.join(MASK_SOURCES)}; got {masks!r}")
    from xraydx.bnadapt import check_request

    check_request(adapt_bn, adapt_bn_layers)
    if adapt_bn and audit:
        raise UsageError("--adapt-bn and --audit: the audit reads the network as trained; run them apart")
    refuse_overwrite(out / "metrics.json", overwrite)
    refuse_overwrite(out / "report.html", overwrite)
    pred = Predictor(checkpoint, device)
    recs, change, kind = checked_split(pred.meta, data, split)
    split_check = _split_check(checkpoint, data, split, change, kind, allow_changed_data)
    if not recs:
        raise UsageError(f"{data}: no images in split {split!r} (as the checkpoint's training run split it)")
    uses_masks = pred.spec.lung_mask != "none"
    mask_files = [r.mask if masks == "dataset" else None for r in recs] if uses_masks else None
    arr, failures = load_many(
        [r.path for r in recs], pred.spec, cache_dir=None, masks=mask_files, progress=progress,
        desc=f"load {split}", mask_fn=pred.lung_mask if uses_masks else None,
    )  # fmt: skip
    bad = {i for i, _ in failures}
    keep = [i for i in range(len(recs)) if i not in bad]
    if adapt_bn:
        from xraydx.bnadapt import adapt_predictor

        adapt_predictor(pred, arr[keep], adapt_bn, adapt_bn_layers, what=f"{data} [{split}]")
    audit_result = None
    if audit:
        from xraydx.audit import run_audit  # audit is a sibling runner (L4)

        audit_result = run_audit(checkpoint, data, split, device=device, progress=progress, masks=masks)
    metrics = evaluate_split(
        pred.model, pred.spec, arr[keep], [recs[i] for i in keep], out, device=pred.device, classes=pred.classes,
        temperature=pred.temperature, abstention=pred.abstention, audit=audit_result,
        title=f"xraydx evaluation: {Path(str(data)).name} [{split}]",
        meta={"checkpoint": str(checkpoint), "data": str(data), "split": split, "split check": split_check,
              "lung masks": _masks_text(uses_masks, masks),
              **({"BatchNorm adapted": f"to the split's {pred.adapted['images']} images (weight {adapt_bn:g})"}
                 if pred.adapted else {})},  # fmt: skip
        failures=[(recs[i], r) for i, r in failures], model_id=pred.model_id, order=[str(r.path) for r in recs],
    )  # fmt: skip
    if audit_result is not None:
        metrics["audit"] = {k: v for k, v in audit_result.items() if k != "examples"}
    metrics["split"] = split
    metrics["split_check"] = split_check
    metrics["masks"] = masks if uses_masks else "none (the model uses no lung mask)"
    metrics["data"] = str(data)
    metrics["checkpoint"] = str(checkpoint)
    metrics["adapted"] = pred.adapted  # None: the network as trained
    metrics["unreadable"] = [{"path": str(recs[i].path), "reason": r} for i, r in failures]
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


#: where evaluate's lung masks come from: the deployed pipeline's segmenter (default), or the dataset's
MASK_SOURCES = ("segmenter", "dataset")


def _masks_text(uses_masks: bool, masks: str) -> str:
    if not uses_masks:
        return "none (the model uses no lung mask)"
    if masks == "segmenter":
        return "the shipped segmenter's, as predict and serve crop (the deployed pipeline)"
    return "the dataset's own where it has them (--masks dataset; predict and serve use the segmenter's)"


def _split_check(checkpoint: Path, data: str, split: str, change: str | None, kind: str, allow: bool) -> str:
    """The split check in words (metrics.json, report.html); refuses a changed test split of the training
    dataset unless ``allow``."""
    if kind == "other":
        return "another dataset than the checkpoint was trained on: its split is not the training run's"
    if kind == "none":
        text = "not checked: the checkpoint records no split membership (made before xraydx recorded it)"
        print(f"xraydx: warning: {text}; the {split} split is re-made from the run's fractions and seed",
              file=sys.stderr)  # fmt: skip
        return text
    if change is None:
        return "the data gives exactly the checkpoint's recorded split"
    own = checkpoint.parent.parent / "manifest.csv" if checkpoint.parent.name == "checkpoints" else None
    hint = f"; the run's own split is {own} (give it as --data)" if own is not None and own.is_file() else ""
    text = f"{data}: the data no longer matches the checkpoint's recorded {split} split ({change}){hint}"
    if split == "test" and not allow:
        raise DatasetError(
            f"{text}; images the model trained on may now be in it: refused (--allow-changed-data to evaluate anyway)"
        )
    print(f"xraydx: warning: {text}", file=sys.stderr)
    return f"CHANGED: {text}"
