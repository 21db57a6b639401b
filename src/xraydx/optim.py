"""The optimiser, learning-rate schedule and per-epoch log that both trainers share (the classifier in
:mod:`xraydx.train`, the lung segmenter in :mod:`xraydx.segment_train`).

- AdamW over two parameter groups: weight decay on matrices and convolution kernels, none on biases
  and normalisation weights (parameters with at most one dimension); frozen parameters left out.
- A per-step multiplier of the base learning rate: linear warmup ``(step + 1) / warmup`` for
  ``warmup`` steps, then (``schedule``, ``train.schedule``) ``cosine``: cosine decay from 1 to ``floor`` at
  ``total`` steps (and ``floor`` after); ``constant``: 1 (SWAD's schedule for dense weight averaging,
  Cha et al. 2021); ``hold``: the cosine until step ``hold``, then held at its value there (the SWA
  schedule, Izmailov et al. 2018: anneal, then average at a constant rate).
- ``log.csv``: one row per epoch, rewritten whole (atomically) after every epoch.
- The optimiser and scheduler state for ``--resume``: safetensors tensors plus JSON (never pickled).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from xraydx.constants import SCHEDULES
from xraydx.fsutil import CsvDictWriter, atomic_write_text, atomic_write_with

__all__ = [
    "load_train_state",
    "lr_lambda",
    "make_optimizer",
    "param_groups",
    "save_train_state",
    "write_log",
]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on parameters with more than one dimension, none on the rest."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(
    total_steps: int, warmup_steps: int, floor: float = 0.01, *, schedule: str = "cosine", hold_step: int = 0
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at ``step``: linear warmup, then ``schedule`` (module doc)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")

    def cosine(step: int) -> float:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        if schedule == "hold":
            return cosine(min(step, max(hold_step, warmup_steps)))
        return cosine(step)

    return f


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    floor: float = 0.01,
    schedule: str = "cosine",
    hold_step: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its per-step warmup + ``schedule`` (:func:`lr_lambda`)."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    f = lr_lambda(total_steps, warmup_steps, floor, schedule=schedule, hold_step=hold_step)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)


def write_log(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """The per-epoch log as CSV, written whole and atomically (``columns``: default the first row's keys)."""
    buf = io.StringIO()
    w = CsvDictWriter(buf, fieldnames=list(columns if columns is not None else rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def save_train_state(path: Path, opt: torch.optim.Optimizer, sched: Any, info: dict[str, Any]) -> None:
    """Optimiser + scheduler state and ``info`` (JSON), for resuming: tensors as safetensors, no pickle."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    doc = {
        "param_groups": sd["param_groups"],
        "scalars": scalars,
        "scheduler": sched.state_dict(),
        "info": info,
    }
    if not tensors:
        tensors["_empty"] = torch.zeros(1)
    atomic_write_with(
        path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata={"state": json.dumps(doc)})
    )


def load_train_state(path: Path, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """Restore what :func:`save_train_state` wrote into ``opt`` and ``sched``; returns its ``info``."""
    with safe_open(str(path), framework="pt") as fh:
        doc = json.loads(fh.metadata()["state"])
        state: dict[int, dict[str, Any]] = {}
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            if key == "_empty":
                continue
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = fh.get_tensor(key)
    for idx, sc in doc["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    sched.load_state_dict(doc["scheduler"])
    return doc["info"]
