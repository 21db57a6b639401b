"""The training loop: AdamW + warmup/cosine, class balancing, validation every epoch, best-by-macro-F1,
early stopping, resume from the last epoch, and DDP under ``torchrun`` (gloo on CPU, NCCL on GPU).

Only rank 0 writes files. Each epoch's data order, augmentation and dropout are seeded from
(seed, epoch), so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import io as _io
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from xraydx import mixstyle, mixup, probe
from xraydx.acqaug import AcquisitionAugment
from xraydx.align import WithFeatures, align_sources
from xraydx.ampmix import AmplitudeMix
from xraydx.checkpoint import save as save_checkpoint
from xraydx.config import Config
from xraydx.config import parse_overrides as parse_overrides  # moved to config; importable here as before
from xraydx.config import validate as validate_config
from xraydx.dann import source_head, train_source_ids
from xraydx.data import CLASSES, Manifest, Record, discover, hold_out_source
from xraydx.data.membership import resume_manifest
from xraydx.device import Dist, available_cpus, broadcast_obj, init_distributed
from xraydx.device import gather_concat as gather_concat  # moved to device; importable here as before
from xraydx.device import resolve_device as resolve_device  # moved to device; importable here as before
from xraydx.errors import TrainError
from xraydx.finish import finish_run
from xraydx.fsutil import atomic_write_bytes, csv_writer, printable_path
from xraydx.groupdro import GroupDRO, group_ids
from xraydx.metrics import compute_metrics
from xraydx.models import check_model, count_parameters, create_model, normalization_for
from xraydx.optim import make_optimizer, save_train_state, write_log
from xraydx.predict import batch_logits
from xraydx.resume import resume_where_it_stopped
from xraydx.runchecks import best_on_disk, check_leaks, new_run_dir, refuse_divergence
from xraydx.sam import SAM
from xraydx.step import Trainer, train_one_epoch, training_views
from xraydx.step import training_input as training_input  # moved to step; importable here as before
from xraydx.trainset import SplitData, build_meta, epoch_order, load_split, sampling_weights
from xraydx.transforms import AugmentSpec, BatchAugment, Preprocessing
from xraydx.weightavg import BN_IMAGES, RAW_FILE, WeightAverage

ADVERSARY_FILE = "last.adversary.safetensors"  # the source head (train.adversary), for --resume
LOG_COLUMNS = [
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
    "val_balanced_acc", "val_macro_auc", "seconds", "best",
]  # fmt: skip


def run_training(cfg: Config | None, *, resume: Path | None = None, progress: bool = True) -> Path:
    if resume is not None:
        resume = Path(resume)
        if not (resume / "config.yaml").is_file():
            raise TrainError(f"{resume}: not a run folder (no config.yaml)")
        cfg = Config.load(resume / "config.yaml")
    if cfg is None:
        raise TrainError("no config given")
    validate_config(cfg)
    check_model(cfg.model.name, cfg.model.pretrained)  # exit 2 before any image is read or folder made
    d, device = init_distributed(cfg.train.device)
    try:
        return _run(cfg, d, device, resume, progress and d.main)
    finally:
        if d.active and dist.is_initialized():
            dist.destroy_process_group()


def _open_run(
    cfg: Config, d: Dist, resume: Path | None, progress: bool
) -> tuple[Path, Callable[[str], None]]:
    """The run folder (new, or the one resumed; config.yaml saved) and the run's logger (rank 0 writes)."""
    run = Path(resume if resume is not None else broadcast_obj(str(new_run_dir(cfg)) if d.main else None, d))
    reused = resume is None and (run / "config.yaml").is_file()
    if d.main:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        if resume is None:
            (run / "skipped.csv").unlink(missing_ok=True)  # an earlier failed attempt's, if any
            cfg.save(run / "config.yaml")

    def log(msg: str) -> None:
        if d.main:
            msg = printable_path(msg)  # file names that are not UTF-8: \xNN, not a UnicodeEncodeError
            tqdm.write(msg) if progress else print(msg, flush=True)
            with open(run / "train.log", "a", encoding="utf-8") as fh:
                fh.write(f"{datetime.now().isoformat(timespec='seconds')} {msg}\n")

    if reused:
        log(f"reusing run folder {run}: an earlier attempt stopped before its first checkpoint")
    return run, log


def load_data(
    cfg: Config, d: Dist, run: Path, log: Callable[[str], None], progress: bool, resumed: bool = False
) -> tuple[Manifest, Preprocessing, dict[str, SplitData]]:
    """The manifest (written to the run; on resume, the run's own manifest.csv), the preprocessing, and
    every split's images (cached)."""
    if resumed and ((run / "manifest.csv").is_file() or any((run / "checkpoints").glob("*.safetensors"))):
        manifest, _ = resume_manifest(run / "manifest.csv", cfg.data.path, holdout=cfg.data.holdout_source)
    else:
        manifest = discover(
            cfg.data.path, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
            seed=cfg.data.split_seed,
        )  # fmt: skip
        if cfg.data.holdout_source:
            manifest = hold_out_source(manifest, cfg.data.holdout_source)
        if d.main:
            manifest.to_csv(run / "manifest.csv")
    if d.main:
        for note in manifest.notes:
            log(f"data: {note}")
    mean, std = normalization_for(cfg.model.name, cfg.model.pretrained)
    spec = Preprocessing(
        size=cfg.data.image_size, lung_mask=cfg.data.lung_mask, mean=mean, std=std,
        intensity=cfg.data.intensity, base_size=cfg.data.base_size, tta=cfg.data.tta,
    )  # fmt: skip
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.runs_dir) / ".cache"
    splits: dict[str, SplitData] = {}
    skipped: list[tuple[Record, str]] = []
    for name in ("train", "val", "test", "external"):
        recs = manifest.split(name)
        if not recs:
            continue
        if d.active and not d.main:
            dist.barrier()  # wait for rank 0 to fill the cache; then every entry is a hit
        splits[name], bad = load_split(recs, spec, cache_dir, name, progress)
        if d.active and d.main:
            dist.barrier()
        skipped += bad
    for rec, reason in skipped:
        log(f"skipped unreadable {rec.path}: {reason}")
    if d.main and skipped:
        buf = _io.StringIO()
        w = csv_writer(buf)
        w.writerow(["path", "split", "reason"])
        w.writerows([[str(r.path), r.split, reason] for r, reason in skipped])
        atomic_write_bytes(run / "skipped.csv", buf.getvalue().encode("utf-8", "surrogateescape"))
    refusal = None
    if d.main:  # rank 0 checks; every rank stops together where --strict-data refuses
        try:
            check_leaks(cfg, manifest, [(s.records, s.images) for s in splits.values()], log)
        except TrainError as exc:
            refusal = str(exc)
    refusal = broadcast_obj(refusal, d)
    if refusal:
        raise TrainError(refusal)
    for name in ("train", "val"):
        if name not in splits or len(splits[name].labels) == 0:
            raise TrainError(f"{cfg.data.path}: no readable {name} images")
    missing = [c for i, c in enumerate(CLASSES) if not (splits["train"].labels == i).any()]
    if missing:
        raise TrainError(f"{cfg.data.path}: the train split has no images of class {', '.join(missing)}")
    return manifest, spec, splits


def setup(cfg: Config, d: Dist, device: torch.device, resume: Path | None, progress: bool) -> Trainer:
    """Seeds and threads, the run folder, the data, the model, optimiser and augmentation; resumed state."""
    threads = cfg.train.threads or available_cpus()
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads // d.world))
    torch.manual_seed(cfg.train.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    run, log = _open_run(cfg, d, resume, progress)
    manifest, spec, splits = load_data(cfg, d, run, log, progress, resumed=resume is not None)
    tr, va = splits["train"], splits["val"]
    model = create_model(
        cfg.model.name, len(CLASSES), in_chans=cfg.model.in_chans, pretrained=cfg.model.pretrained,
        drop_rate=cfg.model.drop_rate,
    ).to(device)  # fmt: skip
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.mixstyle > 0:
        mixstyle.attach(model, cfg.train.mixstyle, cfg.train.mixstyle_alpha)
        log(
            f"MixStyle after {', '.join(mixstyle.stages(model))}: p={cfg.train.mixstyle},"
            f" alpha={cfg.train.mixstyle_alpha}"
        )
    aug_spec = AugmentSpec.preset(cfg.train.augment)
    # each augmented batch is consumed (forward + backward) before the next is made, so on a CPU the fused
    # kernel may write every batch into the same buffer
    augment = (
        BatchAugment(aug_spec, cfg.train.augment_interpolation, reuse_output=device.type == "cpu")
        if aug_spec
        else None
    )
    acquisition = AcquisitionAugment(cfg.train.acquisition) if cfg.train.acquisition > 0 else None
    if cfg.train.probe != "none":
        linear_probe(
            cfg,
            d,
            model,
            tr,
            va,
            spec,
            device,
            log,
            fit=resume is None or not (run / "checkpoints" / "last.safetensors").is_file(),
            views=training_views(spec, augment, acquisition, device, cfg.train.seed),
        )
    log(
        f"model {cfg.model.name} ({count_parameters(model) / 1e6:.2f} M params, pretrained={cfg.model.pretrained})"
        f" on {device}{f' x{d.world} ranks' if d.active else ''}; train {len(tr.labels)}, val {len(va.labels)},"
        f" test {len(splits['test'].labels) if 'test' in splits else 0} images at {spec.size} px"
    )
    adversary, sources, source_names = (
        source_head(cfg, model, [r.source for r in tr.records], spec.size, device, log)
        if cfg.train.adversary > 0
        else (None, None, [])
    )
    if cfg.train.align > 0:
        sources, source_names = align_sources(cfg, [r.source for r in tr.records], log)
    if cfg.train.ampmix > 0 and sources is None:  # the same ids, where no other option made them
        sources, source_names = train_source_ids(cfg, [r.source for r in tr.records], "train.ampmix")
    train_model: nn.Module = (
        adversary if adversary is not None else WithFeatures(model) if cfg.train.align > 0 else model
    )
    if d.active:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    counts = np.bincount(tr.labels, minlength=len(CLASSES)).astype(np.float64)
    weight = None
    if cfg.train.balance == "loss":
        weight = torch.tensor(counts.sum() / (len(CLASSES) * counts), dtype=torch.float32, device=device)
    steps_per_epoch = math.ceil(
        math.ceil((cfg.train.epoch_size or len(tr.labels)) / d.world) / cfg.train.batch_size
    )
    total_steps = steps_per_epoch * cfg.train.epochs
    average_step = int(cfg.train.average_start * total_steps)  # where the averaging starts (and `hold` holds)
    opt, sched = make_optimizer(
        adversary if adversary is not None else model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, total_steps=total_steps,
        warmup_steps=int(cfg.train.warmup_epochs * steps_per_epoch), schedule=cfg.train.schedule,
        hold_step=average_step,
    )  # fmt: skip
    if cfg.train.schedule != "cosine":
        log(f"learning-rate schedule after the warmup: {cfg.train.schedule}")
    t = Trainer(cfg, d, device, run, log, manifest, spec, splits, model, train_model, opt, sched, augment,
                acquisition, weight, adversary=adversary, sources=sources, source_names=source_names,
                total_steps=total_steps)  # fmt: skip
    if cfg.train.objective == "group_dro":
        by = cfg.train.dro_groups
        t.groups, t.group_names = group_ids(tr.labels.tolist(), [r.source for r in tr.records], CLASSES, by)
        t.dro = GroupDRO(len(t.group_names), cfg.train.dro_eta, device, distributed=d.active)
        kind = "(class, source) cells" if by == "class_source" else "sources"
        log(f"objective: Group DRO over {len(t.group_names)} {kind}, step size {cfg.train.dro_eta}")
    t.mix = mixup.from_config(cfg.train, len(CLASSES))
    if t.mix is not None:
        log(f"batch mixing: {t.mix.describe()}")
    if cfg.train.ampmix > 0:
        t.ampmix = AmplitudeMix(cfg.train.ampmix)
        log(t.ampmix.describe())
    if cfg.train.sam > 0:
        t.sam = SAM(t.train_model.parameters(), cfg.train.sam)
        log(f"sharpness-aware minimisation (xraydx.sam): radius {cfg.train.sam}, two passes per step")
    if cfg.train.average != "none":
        t.average = WeightAverage(model, cfg.train.average, average_step, cfg.train.ema_decay)
        log(
            f"{t.average.describe()} of {t.total_steps}; validated and checkpointed from the first epoch that"
            f" ends with an average, its BatchNorm statistics re-estimated on up to {BN_IMAGES} of the epoch's draws"
        )
    if resume is not None:
        resume_where_it_stopped(t, steps_per_epoch)
    return t


def linear_probe(
    cfg: Config, d: Dist, model: nn.Module, tr: SplitData, va: SplitData, spec: Preprocessing,
    device: torch.device, log: Callable[[str], None], fit: bool, views: Callable[[np.ndarray], torch.Tensor],
) -> None:  # fmt: skip
    """``train.probe``: the head fitted on the frozen features (rank 0; DDP hands its weights to every rank)
    unless a resumed checkpoint will replace them; with ``lp`` the rest of the network frozen."""
    try:
        probe.linear_head(model)
    except TypeError as exc:
        raise TrainError(f"train.probe={cfg.train.probe}: {exc}") from exc
    if fit and d.main:
        w = sampling_weights(tr.labels, [r.source for r in tr.records], cfg.train.balance)
        if w is None and cfg.train.balance == "loss":
            w = 1.0 / np.bincount(tr.labels, minlength=len(CLASSES)).astype(np.float64)[tr.labels]
        info = probe.fit_probe(
            model, tr.images, tr.labels, w, va.images, va.labels, spec, device, len(CLASSES), prepare=views
        )
        log(
            f"linear probe ({cfg.train.probe}): logistic regression on {info['features']} frozen features, C={info['C']}"
            f" (val macro-F1 by C: {info['val_macro_f1_by_C']}; BatchNorm statistics of {info['batchnorm_layers']} layers"
            f" re-estimated on the augmented training images first), augmented train accuracy {info['train_accuracy']:.3f},"
            f" {info['seconds']:.0f}s"
        )
    if cfg.train.probe == "lp":
        n = probe.freeze_backbone(model)
        log(
            f"linear probe (lp): {n / 1e6:.2f} M parameters frozen, BatchNorm statistics kept; the head alone trains"
        )


def evaluated_model(t: Trainer, epoch: int) -> nn.Module:
    """The network this epoch validates and checkpoints: the weight average once it holds a step (its
    BatchNorm statistics first re-estimated on the epoch's draws, the same on every rank), else the
    trained one."""
    a = t.average
    if a is None or a.count == 0:
        return t.model
    tr = t.splits["train"]
    order = epoch_order(len(tr.labels), tr.labels, t.cfg, epoch, Dist(), [r.source for r in tr.records])
    views = training_views(t.spec, t.augment, t.acquisition, t.device, t.cfg.train.seed * 1_000 + epoch)
    n = a.refresh_statistics(tr.images[np.sort(order[:BN_IMAGES])], t.spec, t.device, views)
    t.log(
        f"weight average of {a.count} steps"
        + (f": BatchNorm statistics re-estimated on {n} of epoch {epoch}'s training draws" if n else "")
    )
    return a.module


def validate(t: Trainer, model: nn.Module | None = None) -> tuple[dict[str, Any], float]:
    """Val metrics (uncalibrated) and val loss of ``model`` (default: the one training) as it is now."""
    va = t.splits["val"]
    val_logits = eval_logits(t.model if model is None else model, va.images, t.spec, t.device, t.d)
    vm = compute_metrics(va.labels, torch.softmax(val_logits, 1).numpy(), CLASSES)
    return vm, float(F.cross_entropy(val_logits, torch.from_numpy(va.labels)))


def end_epoch(
    t: Trainer, epoch: int, stats: torch.Tensor, vm: dict[str, Any], val_loss: float, t0: float,
    net: nn.Module | None = None,
) -> bool:  # fmt: skip
    """Best/patience bookkeeping, the log row, checkpoints (of ``net``, the network validated: default
    the one training) and train state; True when stopping early."""
    cfg, net = t.cfg, t.model if net is None else net
    improved = vm["macro_f1"] > t.best_f1 + 1e-6
    if improved:
        t.best_f1, t.best_epoch, t.bad_epochs = vm["macro_f1"], epoch, 0
    else:
        t.bad_epochs += 1
    row = {
        "epoch": epoch, "lr": f"{t.sched.get_last_lr()[0]:.3e}",
        "train_loss": round(float(stats[0] / stats[2]), 5), "train_acc": round(float(stats[1] / stats[2]), 5),
        "val_loss": round(val_loss, 5), "val_acc": round(vm["accuracy"], 5),
        "val_macro_f1": round(vm["macro_f1"], 5), "val_balanced_acc": round(vm["balanced_accuracy"] or 0.0, 5),
        "val_macro_auc": round(vm["macro_roc_auc"] or 0.0, 5), "seconds": round(time.perf_counter() - t0, 2),
        "best": int(improved),
    }  # fmt: skip
    t.rows.append(row)
    stopped = t.bad_epochs >= cfg.train.patience and epoch < cfg.train.epochs
    if t.d.main:
        extra: dict[str, Any] = {"epoch": epoch, "val_metrics": vm}
        if t.average is not None:
            extra["average"] = {"mode": t.average.mode, "steps": t.average.count if net is not t.model else 0}
        meta = build_meta(cfg, t.spec, t.manifest, extra)
        if improved and best_on_disk(t.ckdir / "best.safetensors") < epoch:  # never an earlier epoch over it
            save_checkpoint(t.ckdir / "best.safetensors", net, meta)
        save_checkpoint(t.ckdir / "last.safetensors", net, meta)
        if net is not t.model:  # last.safetensors holds the average: the weights being trained, for --resume
            save_checkpoint(t.ckdir / RAW_FILE, t.model, {"kind": "trained-weights", "epoch": epoch})
        info = {"epoch": epoch, "best_f1": t.best_f1, "best_epoch": t.best_epoch, "bad_epochs": t.bad_epochs,
                "rows": t.rows, "stopped": stopped}  # fmt: skip
        if t.dro is not None:
            info["dro_q"] = t.dro.state()
            t.log(f"Group DRO: heaviest groups {t.dro.top(t.group_names)}")
        if t.adversary is not None:  # for --resume only: checkpoints hold the classifier alone
            save_checkpoint(
                t.ckdir / ADVERSARY_FILE, t.adversary.adversary, {"kind": "adversary", "epoch": epoch}
            )
        save_train_state(t.ckdir / "last.state.safetensors", t.opt, t.sched, info)
        write_log(t.run / "log.csv", t.rows, LOG_COLUMNS)
    t.log(
        f"epoch {epoch}/{cfg.train.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} macro-F1 {row['val_macro_f1']:.3f}"
        f"{' (best)' if improved else ''} | {row['seconds']:.1f}s"
    )
    if stopped:
        t.log(
            f"early stopping: no better val macro-F1 for {cfg.train.patience} epochs (best {t.best_f1:.4f} at {t.best_epoch})"
        )
    return stopped


def _run(cfg: Config, d: Dist, device: torch.device, resume: Path | None, progress: bool) -> Path:
    t = setup(cfg, d, device, resume, progress)
    epochs_bar = tqdm(
        range(t.start_epoch, cfg.train.epochs + 1), desc="epochs", disable=not progress, unit="ep",
        initial=t.start_epoch - 1, total=cfg.train.epochs,
    )  # fmt: skip
    for epoch in epochs_bar:
        t0 = time.perf_counter()
        stats = train_one_epoch(t, epoch, progress)
        net = evaluated_model(t, epoch)
        vm, val_loss = validate(t, net)
        refuse_divergence(t.run, t.cfg, epoch, float(stats[0] / max(1.0, float(stats[2]))), val_loss)
        if end_epoch(t, epoch, stats, vm, val_loss, t0, net):
            break
    epochs_bar.close()
    if d.active:
        dist.barrier()
    if d.main:
        finish_run(t.run, cfg, t.spec, t.manifest, t.splits, device, t.log, t.best_epoch)
    if d.active:
        dist.barrier()
    return t.run


def eval_logits(
    model: nn.Module, images: np.ndarray, spec: Preprocessing, device: torch.device, d: Dist
) -> torch.Tensor:
    """Validation logits for all images, computed in shards across ranks and gathered in order."""
    if not d.active:
        return batch_logits(model, images, spec, device)
    idx = np.arange(d.rank, len(images), d.world)
    part = batch_logits(model, images[idx], spec, device)
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, (idx, part))
    out = torch.zeros((len(images), parts[0][1].shape[1]))
    for ix, lg in parts:
        if len(ix):
            out[torch.as_tensor(ix)] = lg
    return out
