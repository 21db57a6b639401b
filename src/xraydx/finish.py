"""The end of a training run (:func:`finish_run`): the best checkpoint calibrated on val (temperature
scaling), its abstention threshold chosen on val (or given), the test split evaluated (also with the
shipped segmenter's lung masks where the dataset's were used), a held-out source measured, and
``metrics.json``, ``report.html`` and ``predictions.csv`` written. Shared by :mod:`xraydx.train` and
:mod:`xraydx.train_ensemble`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xraydx import schema
from xraydx.calibration import calibrate
from xraydx.checkpoint import save as save_checkpoint
from xraydx.config import Config
from xraydx.data import CLASSES, Manifest, Record
from xraydx.evaluate import evaluate_split, write_split_predictions
from xraydx.fsutil import atomic_write_json
from xraydx.metrics import compute_metrics, confidence_intervals, format_metrics
from xraydx.predict import batch_logits, batch_outputs
from xraydx.trainset import SplitData, load_split
from xraydx.transforms import Preprocessing

__all__ = ["finish_run"]


def _deployed_metrics(
    cfg: Config,
    spec: Preprocessing,
    records: Sequence[Record],
    model: nn.Module,
    device: torch.device,
    t: float,
) -> dict[str, Any]:
    """Test metrics with every lung mask made by the shipped segmenter, as predict and serve make them."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.runs_dir) / ".cache"
    sd, _ = load_split(
        [replace(r, mask=None) for r in records], spec, cache_dir, "test (segmenter masks)", False
    )
    probs = torch.softmax(batch_logits(model, sd.images, spec, device) / t, 1).numpy()
    m = compute_metrics(sd.labels, probs, CLASSES)
    m["ci"] = confidence_intervals(sd.labels, probs, CLASSES)
    m["masks"] = "segmenter (as deployed)"
    return m


def finish_run(
    run: Path,
    cfg: Config,
    spec: Preprocessing,
    manifest: Manifest,
    splits: dict[str, SplitData],
    device: torch.device,
    log: Any,
    best_epoch: int | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Calibrate the best checkpoint on val, choose its abstention threshold on val, evaluate it on test,
    write metrics.json (with ``extra``'s keys), report.html and predictions.csv. ``best_epoch`` None: the
    checkpoint was not trained by this run (an ensemble of finished runs, :mod:`xraydx.train_ensemble`)."""
    from xraydx.metrics import choose_abstention
    from xraydx.models import load_checkpoint, read_metadata

    best_path = run / "checkpoints" / "best.safetensors"
    model, meta = load_checkpoint(best_path, device)
    va = splits["val"]
    # an ensemble's rule also flags where its members disagree (val_agree: None for one network)
    val_logits, val_agree = batch_outputs(model, va.images, spec, device)
    temperature, check = 1.0, None
    if cfg.train.calibrate:
        check = calibrate(val_logits.numpy(), va.labels)  # T = 1 where scaling makes held-out NLL worse
        temperature = check["temperature"]
    val_before = compute_metrics(va.labels, torch.softmax(val_logits, 1).numpy(), CLASSES)
    val_after = compute_metrics(va.labels, torch.softmax(val_logits / temperature, 1).numpy(), CLASSES)
    meta = read_metadata(best_path)
    meta["calibration"] = {
        "method": "temperature" if cfg.train.calibrate and temperature != 1.0 else "none",
        "temperature": temperature,
        "fit_on": "val",
        "val_nll_before": val_before["nll"],
        "val_nll_after": val_after["nll"],
        "val_ece_before": val_before["ece"],
        "val_ece_after": val_after["ece"],
        **(check or {}),
    }
    if check is not None and val_after["ece"] > val_before["ece"] + 1e-9:
        check["warnings"].append(
            f"temperature scaling made val ECE worse ({val_before['ece']:.3f} -> {val_after['ece']:.3f})"
        )
    for w in (check or {}).get("warnings", []):
        log(f"WARNING: {w}")
    meta["val_metrics"] = val_after
    val_probs = torch.softmax(val_logits / temperature, 1).numpy()
    meta["abstention"] = choose_abstention(va.labels, val_probs, agree=val_agree)
    if cfg.train.abstention_threshold > 0:
        # a threshold chosen outside this run, e.g. on a crossval's out-of-source predictions (flag.oos_threshold):
        # val figures are still reported for it, but val did not choose it
        t = float(cfg.train.abstention_threshold)
        kept = (val_probs.max(1) >= t) & (val_agree if val_agree is not None else True)
        meta["abstention"].update(
            threshold=t, chosen_on="given (train.abstention_threshold)", target_reached=None, flag_all=False,
            reason=None, best_unreached=None, val_coverage=float(kept.mean()),
            val_accuracy_accepted=float((val_probs.argmax(1) == va.labels)[kept].mean()) if kept.any() else 0.0,
        )  # fmt: skip
    ab = meta["abstention"]
    if ab.get("flag_all"):
        log(f"WARNING: abstention: {ab['reason']}")
    else:
        also = " or where the ensemble's members disagree" if ab.get("members_disagree") else ""
        log(
            f"abstention: flag 'uncertain' below top probability {ab['threshold']:.3f}{also} (on val: keeps "
            f"{ab['val_coverage']:.0%} at accuracy {ab['val_accuracy_accepted']:.3f})"
        )
    results: dict[str, Any] = {"best_epoch": best_epoch, "val": val_after, "calibration": meta["calibration"],
                               "abstention": meta["abstention"], **(extra or {})}  # fmt: skip
    which = "ensemble" if best_epoch is None else f"best epoch {best_epoch}"

    def log_table(m: dict[str, Any], title: str) -> None:
        for line in format_metrics(m, title=title).splitlines():
            log(line)  # one log line each: log() escapes a newline (a file name's) as \x0a

    # report.html describes the test split (or val, calibrated on itself, when there is no test split)
    has_test = "test" in splits and len(splits["test"].labels) > 0
    rep_name, rep = ("test", splits["test"]) if has_test else ("val", va)
    rep_out = (val_logits, val_agree) if rep_name == "val" else batch_outputs(model, rep.images, spec, device)
    rep_logits, rep_agree = rep_out[0].numpy(), rep_out[1]
    tm = evaluate_split(
        model, spec, rep.images, rep.records, run, device=device, temperature=temperature,
        abstention=meta["abstention"], logits=rep_logits, agree=rep_agree, predictions=False,
        title=f"xraydx run {run.name}: {rep_name} split",
        meta={"run": str(run), "data": cfg.data.path, "split": rep_name,
              "best epoch": best_epoch if best_epoch is not None else "none (an ensemble of finished runs)"},
    )  # fmt: skip
    if rep_name == "test":
        results["test"] = tm
        meta["test_metrics"] = {k: v for k, v in tm.items() if k not in ("roc_curves", "coverage_curve")}
        log_table(tm, f"test split ({which}, temperature {temperature:.3f})")
        if spec.lung_mask != "none" and any(r.mask is not None for r in rep.records):
            dep = _deployed_metrics(cfg, spec, rep.records, model, device, temperature)
            results["test_deployed"] = meta["test_metrics_deployed"] = dep
            log(
                "note: this run cropped with the dataset's lung masks; predict, serve and evaluate crop with the "
                f"shipped segmenter's. Test with the dataset's masks: accuracy {tm['accuracy']:.3f}, macro-F1 "
                f"{tm['macro_f1']:.3f}; with the segmenter's (as deployed): accuracy {dep['accuracy']:.3f}, "
                f"macro-F1 {dep['macro_f1']:.3f} (metrics.json test_deployed)"
            )
    else:
        results["val_report"] = tm
    if "external" in splits and len(splits["external"].labels):
        ex = splits["external"]
        probs = torch.softmax(batch_logits(model, ex.images, spec, device) / temperature, 1).numpy()
        xm = compute_metrics(ex.labels, probs, CLASSES)
        xm["ci"] = confidence_intervals(ex.labels, probs, CLASSES)  # 95%, as for the test split
        xm["source"] = cfg.data.holdout_source
        results["external"] = meta["external_metrics"] = xm
        log_table(xm, f"held-out source {cfg.data.holdout_source!r} (never seen in training)")
    save_checkpoint(best_path, model, meta)
    if rep_name == "test":  # after the save: its rows name the final checkpoint's model_id
        write_split_predictions(
            run / "predictions.csv", rep.records, rep_logits, classes=CLASSES, temperature=temperature,
            abstention=meta["abstention"], model_id=schema.model_id(best_path, meta), agree=rep_agree,
        )  # fmt: skip
    atomic_write_json(run / "metrics.json", results)
    log(f"run folder: {run}")
