"""One training step and one epoch of them: the batch as the network sees it (acquisition cues
randomised, augmented, normalised), the loss of a batch (cross-entropy or Group DRO's, the source head's
or the alignment's term), SAM's second pass, the weight average's update; and :class:`Trainer`, what a
run holds between epochs. :mod:`xraydx.train` builds the run and drives the epochs.

Each epoch's data order, augmentation and dropout are seeded from (seed, epoch), so a resumed run
repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from xraydx import mixup, probe
from xraydx.acqaug import AcquisitionAugment
from xraydx.align import class_source_scatter
from xraydx.ampmix import AmplitudeMix
from xraydx.batches import BatchBuffers, iter_batches
from xraydx.config import Config
from xraydx.dann import WithAdversary, ramp
from xraydx.data import Manifest
from xraydx.device import Dist
from xraydx.groupdro import GroupDRO
from xraydx.sam import SAM
from xraydx.trainset import SplitData, epoch_order
from xraydx.transforms import BatchAugment, Preprocessing
from xraydx.weightavg import WeightAverage

__all__ = ["Trainer", "batch_loss", "train_one_epoch", "training_input", "training_views"]


@dataclass
class Trainer:
    """Everything one training run holds between epochs (built by :func:`xraydx.train.setup`)."""

    cfg: Config
    d: Dist
    device: torch.device
    run: Path
    log: Callable[[str], None]
    manifest: Manifest
    spec: Preprocessing
    splits: dict[str, SplitData]
    model: nn.Module
    train_model: nn.Module  # the model as trained: wrapped in DDP and/or torch.compile where asked
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    augment: BatchAugment | None
    acquisition: AcquisitionAugment | None
    class_weight: torch.Tensor | None
    dro: GroupDRO | None = None  # train.objective=group_dro: the group weights
    groups: torch.Tensor | None = None  # the (class, source) cell of each train record
    group_names: list[str] = field(default_factory=list)
    adversary: WithAdversary | None = None  # train.adversary > 0: the classifier with its source head
    sources: torch.Tensor | None = None  # the source id of each train record (adversary, align, ampmix)
    source_names: list[str] = field(default_factory=list)
    average: WeightAverage | None = None  # train.average: the running average of the weights
    mix: mixup.BatchMixup | None = None  # train.mixup: Mixup / CutMix of each batch
    sam: SAM | None = None  # train.sam: sharpness-aware minimisation's second pass
    ampmix: AmplitudeMix | None = None  # train.ampmix: Fourier amplitude mixing across sources
    total_steps: int = 0
    start_epoch: int = 1
    best_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    buffers: BatchBuffers = field(default_factory=BatchBuffers)

    @property
    def ckdir(self) -> Path:
        return self.run / "checkpoints"


def training_input(
    xb: torch.Tensor, gen: torch.Generator, spec: Preprocessing, augment: BatchAugment | None,
    acquisition: AcquisitionAugment | None,
) -> torch.Tensor:  # fmt: skip
    """A uint8 (B, 1, S, S) batch as a training epoch feeds it to the network: acquisition cues
    randomised, augmented, normalised (the training loop and the linear probe's views)."""
    if acquisition is not None:
        xb = acquisition(xb, gen)
    if augment is not None:
        return augment(xb, gen, norm=(spec.mean, spec.std))
    return xb.float().div_(255.0).sub_(spec.mean).div_(spec.std)


def training_views(
    spec: Preprocessing, augment: BatchAugment | None, acquisition: AcquisitionAugment | None,
    device: torch.device, seed: int,
) -> Callable[[np.ndarray], torch.Tensor]:  # fmt: skip
    """uint8 (N, S, S) -> :func:`training_input`, seeded; each batch is consumed before the next is made
    (as in training)."""
    gen = torch.Generator().manual_seed(seed * 104_729 + 1)

    def views(batch: np.ndarray) -> torch.Tensor:
        xb = torch.from_numpy(np.array(batch, dtype=np.uint8)[:, None]).to(device)
        return training_input(xb, gen, spec, augment, acquisition)

    return views


def train_one_epoch(t: Trainer, epoch: int, progress: bool) -> torch.Tensor:
    """One pass over this rank's share of the epoch; (loss sum, correct, seen) summed over ranks."""
    cfg, spec, device, tr = t.cfg, t.spec, t.device, t.splits["train"]
    torch.manual_seed(cfg.train.seed * 1_000 + epoch)
    gen = torch.Generator().manual_seed(cfg.train.seed * 7_919 + epoch)
    order = epoch_order(len(tr.labels), tr.labels, cfg, epoch, t.d, [r.source for r in tr.records])
    bs = cfg.train.batch_size
    use_amp = device.type == "cuda" and cfg.train.amp
    t.train_model.train()
    if cfg.train.probe == "lp":
        probe.hold_statistics(t.model)
    loss_sum, correct, seen, pos = 0.0, 0, 0, 0
    adv_right, adv_counts, align_sum = 0, torch.zeros(len(t.source_names), dtype=torch.long), 0.0
    # one batch gathered ahead in a thread; pinned memory + non_blocking copies on CUDA; on a CPU into
    # reused buffers (each batch is augmented into a new tensor before the next is asked for)
    batches = tqdm(
        iter_batches(tr.images, tr.labels, order, bs, device, reuse=t.buffers), total=math.ceil(len(order) / bs),
        desc=f"epoch {epoch}", leave=False, disable=not progress, unit="b",
    )  # fmt: skip
    if t.mix is not None:
        t.mix.seed_epoch(cfg.train.seed, epoch)
    # with train.mixup the targets are soft and carry the label smoothing themselves
    smoothing = cfg.train.label_smoothing if t.mix is None else 0.0
    for xb, yb in batches:
        batch_idx = np.sort(order[pos : pos + len(yb)])  # the batch's records, as iter_batches gathers them
        if t.ampmix is not None and t.sources is not None:  # another source's look, before the rest
            xb = t.ampmix(xb, t.sources[batch_idx], gen)
        x = training_input(xb, gen, spec, t.augment, t.acquisition)
        target = yb
        if t.mix is not None:
            x, target = t.mix(x, yb)
        if device.type == "cuda" and cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if t.adversary is not None:
            t.adversary.coeff = ramp(cfg.train.adversary, t.sched.last_epoch / max(1, t.total_steps))
        loss, logits, extra, penalty = batch_loss(t, x, target, yb, batch_idx, smoothing, use_amp)
        if t.adversary is not None and extra is not None and t.sources is not None:
            sb = t.sources[batch_idx]
            adv_right += int((extra.detach().argmax(1).cpu() == sb).sum())
            adv_counts += torch.bincount(sb, minlength=len(t.source_names))
        align_sum += float(penalty) * len(yb)
        pos += len(yb)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.sam is not None:  # train.sam: the gradient again at the worst nearby weights, then back
            t.sam.ascend()
            with t.sam.second_pass(t.model):
                t.opt.zero_grad(set_to_none=True)
                batch_loss(t, x, target, yb, batch_idx, smoothing, use_amp, second=True)[0].backward()
            t.sam.descend()
        t.opt.step()
        t.sched.step()
        if t.average is not None:
            t.average.step(t.model, t.sched.last_epoch)
        loss_sum += float(loss.detach()) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        batches.set_postfix(loss=f"{loss_sum / seen:.3f}")
    if t.adversary is not None and seen:
        t.log(t.adversary.report(epoch, adv_right, adv_counts))
    if cfg.train.align > 0 and seen:
        t.log(
            f"epoch {epoch}: class-within-source scatter share {align_sum / seen:.4f} (train.align, this rank)"
        )
    stats = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
    if t.d.active:
        dist.all_reduce(stats)
    return stats


def batch_loss(
    t: Trainer,
    x: torch.Tensor,
    target: torch.Tensor,
    yb: torch.Tensor,
    batch_idx: np.ndarray,
    smoothing: float,
    use_amp: bool,
    second: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """One batch's training loss: (loss, class logits, the wrapper's second output or None, the alignment
    penalty's value). ``second``: SAM's perturbed pass (Group DRO's weights are not updated again)."""
    cfg, device = t.cfg, t.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = t.train_model(x)
        logits, extra = out if isinstance(out, tuple) else (out, None)
        per = F.cross_entropy(
            logits.float(), target, weight=t.class_weight, label_smoothing=smoothing,
            reduction="none" if t.dro is not None else "mean",
        )  # fmt: skip
        loss = per if t.dro is None else t.dro.loss(per, t.groups[batch_idx], update=not second)
        penalty = 0.0
        if t.adversary is not None and extra is not None and t.sources is not None:  # the source head,
            loss = loss + F.cross_entropy(extra.float(), t.sources[batch_idx].to(device))  # reversed
        elif extra is not None and t.sources is not None:  # train.align: each class across sources
            pen = class_source_scatter(extra, yb, t.sources[batch_idx])
            loss = loss + cfg.train.align * pen
            penalty = 0.0 if second else float(pen.detach())  # (a host sync: first pass only)
    return loss, logits, extra, penalty
