"""``train --resume``: a run carried on from where it stopped, with what the run folder still holds.

- ``last.safetensors`` + ``last.state.safetensors``: the weights, AdamW's moments, the schedule and the
  bookkeeping as they were after the last finished epoch; the resumed run repeats an uninterrupted one.
- ``last.safetensors`` alone (the state file lost): the weights, the schedule at that step, and the log
  and best-so-far from ``log.csv``; AdamW starts again from zero moments, which the log says. The best
  checkpoint is only replaced by a later, better epoch; ``log.csv`` keeps every earlier row.
- no checkpoint at all (a run that failed before its first epoch ended): training starts at epoch 1.
- anything else (``best.safetensors``, the state or ``log.csv`` without ``last.safetensors``): refused.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file

from xraydx.checkpoint import load_tensors
from xraydx.errors import TrainError
from xraydx.models import read_metadata
from xraydx.optim import load_train_state
from xraydx.weightavg import RAW_FILE

if TYPE_CHECKING:
    from xraydx.step import Trainer

__all__ = ["resume_where_it_stopped"]


def resume_where_it_stopped(t: Trainer, steps_per_epoch: int) -> None:
    """Resume from last.safetensors + last.state.safetensors; from last.safetensors alone (no optimiser
    state, said so) where the state is gone; from scratch where the run never wrote a checkpoint; and
    refuse anything else (a best checkpoint or a log without last.safetensors)."""
    last, state = t.ckdir / "last.safetensors", t.ckdir / "last.state.safetensors"
    if last.is_file() and state.is_file():
        return _resume_full(t)
    if last.is_file():
        return _resume_weights_only(t, steps_per_epoch)
    left = [p.name for p in (t.ckdir / "best.safetensors", state, t.run / "log.csv") if p.is_file()]
    if left:
        raise TrainError(
            f"{last}: missing, but the run has {', '.join(left)}; cannot resume without it "
            "(restore it, or start a new run with another --name)"
        )
    t.log(f"resume {t.run}: no checkpoint was written yet; training starts at epoch 1")


def _resume_weights_only(t: Trainer, steps_per_epoch: int) -> None:
    """last.safetensors without its optimiser state: the weights, the schedule at that step, the log and
    the best-so-far from log.csv; AdamW's moments start again from zero (the run will not repeat an
    uninterrupted one exactly)."""
    last = t.ckdir / "last.safetensors"
    try:
        epoch = int(read_metadata(last)["epoch"])
        t.model.load_state_dict(load_tensors(last, TrainError))
        _resume_average(t, last)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TrainError(f"{last}: cannot resume from it ({str(exc)[:200]})") from exc
    rows = _read_log(t.run / "log.csv")
    if [int(r["epoch"]) for r in rows[:epoch]] != list(range(1, epoch + 1)):
        raise TrainError(
            f"{t.run / 'log.csv'}: does not hold epochs 1-{epoch} of last.safetensors; cannot resume without "
            "last.state.safetensors"
        )
    t.rows = rows[:epoch]
    bests = [r for r in t.rows if r["best"]]
    if not bests:
        raise TrainError(f"{t.run / 'log.csv'}: no epoch is marked best; cannot resume")
    t.best_f1, t.best_epoch = float(bests[-1]["val_macro_f1"]), int(bests[-1]["epoch"])
    t.bad_epochs = epoch - t.best_epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
        t.sched.last_epoch = epoch * steps_per_epoch - 1
        t.sched.step()
    t.start_epoch = epoch + 1
    if t.bad_epochs >= t.cfg.train.patience and epoch < t.cfg.train.epochs:
        t.start_epoch = t.cfg.train.epochs + 1  # it had stopped early
    head_fresh = t.adversary is not None and not _resume_adversary(t)
    t.log(
        f"resumed {t.run} after epoch {epoch} from last.safetensors WITHOUT optimiser state "
        f"(last.state.safetensors is missing): AdamW restarts from zero moments"
        f"{' and Group DRO from equal weights' if t.dro is not None else ''}"
        f"{' and the source head from scratch' if head_fresh else ''}, so the result will differ "
        f"from an uninterrupted run (best val macro-F1 {t.best_f1:.4f} at epoch {t.best_epoch})"
    )


def _read_log(path: Path) -> list[dict[str, Any]]:
    """log.csv's rows, values as written (the resumed run rewrites it with these rows first)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows: list[dict[str, Any]] = list(csv.DictReader(fh))
    except OSError as exc:
        raise TrainError(f"{path}: cannot read the run's log ({exc.strerror}); cannot resume") from exc
    for r in rows:
        for k in ("epoch", "best"):
            r[k] = int(r[k])
    return rows


def _resume_adversary(t: Trainer) -> bool:
    """The source head's weights (train.adversary) as saved after the last epoch; False where none are."""
    from xraydx.train import ADVERSARY_FILE

    path = t.ckdir / ADVERSARY_FILE
    if t.adversary is None or not path.is_file():
        return False
    try:
        t.adversary.adversary.load_state_dict(load_tensors(path, TrainError, "the source head"))
    except RuntimeError as exc:
        raise TrainError(f"{path}: does not fit this run's source head ({str(exc)[:200]})") from exc
    return True


def _resume_average(t: Trainer, last: Path) -> None:
    """train.average: where ``last`` holds the weight average (its metadata counts the steps in it), the
    average from it and the weights being trained from RAW_FILE; else (the average had not begun) nothing."""
    if t.average is None:
        return
    steps = int((read_metadata(last).get("average") or {}).get("steps", 0))
    if steps == 0:
        return
    raw = t.ckdir / RAW_FILE
    if not raw.is_file():
        raise TrainError(
            f"{raw}: missing, and {last.name} holds the weight average of {steps} steps, not the weights being"
            " trained; cannot resume without it"
        )
    t.average.load(t.model.state_dict(), steps)  # last.safetensors was loaded into the model: the average
    t.model.load_state_dict(load_tensors(raw, TrainError, "the weights being trained"))


def _resume_full(t: Trainer) -> None:
    """Model, optimiser, schedule and bookkeeping as they were after the last finished epoch."""
    from safetensors import SafetensorError

    try:  # safetensors only: a planted pickle is refused here, never unpickled
        t.model.load_state_dict(load_file(str(t.ckdir / "last.safetensors"), device=str(t.device)))
        info = load_train_state(t.ckdir / "last.state.safetensors", t.opt, t.sched)
        _resume_average(t, t.ckdir / "last.safetensors")
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as exc:
        raise TrainError(
            f"{t.ckdir}: cannot resume from last.safetensors / last.state.safetensors ({str(exc)[:200]})"
        ) from exc
    t.start_epoch = int(info["epoch"]) + 1
    t.best_f1, t.best_epoch, t.bad_epochs = (
        float(info["best_f1"]),
        int(info["best_epoch"]),
        int(info["bad_epochs"]),
    )
    t.rows = list(info["rows"])
    if t.dro is not None and info.get("dro_q"):
        t.dro.load_state(info["dro_q"])
    _resume_adversary(t)
    t.log(
        f"resumed {t.run} after epoch {info['epoch']} (best val macro-F1 {t.best_f1:.4f} at epoch {t.best_epoch})"
    )
    if info.get("stopped"):
        t.start_epoch = t.cfg.train.epochs + 1
