"""Leave-one-source-out cross-validation: how a training recipe does at a hospital it has never seen.

For each fold (one source, or several joined with ``+``), the same recipe is trained with that fold's
sources removed from train and validation (their images go to a split ``external`` that the run never
trains, selects or calibrates on); the fold's best checkpoint then predicts the held-out images through
the deployed pipeline (``Predictor.predict_files``: the file is read, segmented, checked by the OOD
guard and classified exactly as ``xraydx predict`` would). Every image of a held-out source is thus
predicted by a model that never saw that source: the pooled out-of-source predictions estimate what a
new hospital gets, which a random split of the same sources cannot.

A crossval run folder::

    <runs>/<name>/config.yaml          the recipe (resolved config)
    <runs>/<name>/crossval.json        the folds and their state (for --resume)
    <runs>/<name>/folds/<k>-<src>.csv  fold k's manifest (held-out sources in split 'external')
    <runs>/<name>/folds/<k>-<src>/     fold k's training run (config, log, checkpoints, metrics)
    <runs>/<name>/folds/<k>-<src>/oos_predictions.csv   its held-out images, predicted
    <runs>/<name>/predictions.csv      the pooled out-of-source predictions (column ``fold``)
    <runs>/<name>/metrics.json         summary: pooled + per source + per fold + the flag's coverage
    <runs>/<name>/report.html          the same, as a page
    <runs>/<name>/crossval.log

Copies: public collections re-distribute each other's images, so before any fold the whole manifest is
searched for exact and near duplicates (as ``xraydx data inspect``); a held-out image's copies in other
sources are left out of its fold (``crossval.json`` ``copies`` and ``copies_left_out``; ``metrics.json``
``copies_left_out``), so "never saw its source" also means "never saw this radiograph".

Resumable per fold: a fold with its predictions is skipped, a fold whose training was killed resumes
from its last checkpoint, a fold trained but not yet predicted is predicted.

``trained_from`` (``--reuse-folds RUN``): a new run folder that predicts with another run's fold models
instead of training its own, for settings that change prediction only (:data:`PREDICTION_KEYS`, e.g.
``data.tta``: test-time augmentation); every other recipe setting must be the other run's.

``data.adapt_bn`` (:mod:`xraydx.bnadapt`): before predicting, a copy of the fold model re-estimates its
BatchNorm statistics on each held-out source's images (unlabelled), one source at a time, as a hospital
would adapt to its own films; the source-shift score is computed with the fold model as trained.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from xraydx.config import Config, validate
from xraydx.crossval_folds import (
    FOLD_SEP,
    JOIN,
    Fold,
    cross_source_copies,
    fold_manifest,
    held_out_copies,
    parse_folds,
)
from xraydx.crossval_metrics import fold_training_coverage, in_source_test, one_source_lines, summarize
from xraydx.data import CLASSES, Manifest, discover
from xraydx.errors import OutputExistsError, UsageError
from xraydx.fsutil import atomic_write_json, csv_unescape, printable_path

PIPELINES = ("cached", "deployed")
#: config keys a ``--reuse-folds`` run may change: they do not touch training
PREDICTION_KEYS = (
    "name", "runs_dir", "data.tta", "data.adapt_bn", "data.adapt_bn_layers", "data.cache_dir",
    "train.device", "train.threads",
)  # fmt: skip


class CrossVal:
    """One crossval run folder: plans the folds, trains and predicts each, pools, summarises."""

    def __init__(
        self, run: Path, cfg: Config, folds: list[Fold], progress: bool = True, pipeline: str = "cached",
        trained_from: Path | None = None,
    ) -> None:  # fmt: skip
        if pipeline not in PIPELINES:
            raise UsageError(f"--oos-pipeline must be one of {', '.join(PIPELINES)}; got {pipeline!r}")
        if pipeline == "deployed" and cfg.data.adapt_bn:
            raise UsageError("data.adapt_bn: only with --oos-pipeline cached (it adapts per held-out source)")
        self.run, self.cfg, self.folds, self.progress, self.pipeline = run, cfg, folds, progress, pipeline
        self.fold_dir = run / "folds"
        #: another crossval run whose fold models this one predicts with (None: train its own)
        self.trained_from = trained_from

    # ---- the run folder -------------------------------------------------------------------------
    @classmethod
    def create(
        cls, cfg: Config, folds_spec: str | None, progress: bool = True, pipeline: str = "cached",
        trained_from: Path | None = None,
    ) -> CrossVal:  # fmt: skip
        from xraydx.models import check_model

        validate(cfg)
        check_model(cfg.model.name, cfg.model.pretrained)  # exit 2 before any image is read
        manifest = _discover(cfg)
        if trained_from is not None:
            folds_spec = _check_reuse(Path(trained_from), cfg, folds_spec)
        folds = parse_folds(folds_spec, manifest)
        for f in folds:
            fold_manifest(manifest, f)  # refuse an impossible fold before any training
        name = cfg.name or f"crossval-{cfg.model.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        run = Path(cfg.runs_dir) / name
        if run.exists() and any(run.iterdir()):
            raise OutputExistsError(
                f"{run}: already exists; use --resume {run} to continue it, or another --name"
            )
        copies = cross_source_copies(manifest, progress)  # reads every image: after the cheap refusals
        left_out = {f.name: len(held_out_copies(manifest, f, copies)) for f in folds}
        run.mkdir(parents=True, exist_ok=True)
        cfg.save(run / "config.yaml")
        atomic_write_json(
            run / "crossval.json",
            {
                "data": cfg.data.path,
                "by": "source",
                "pipeline": pipeline,
                "folds": [list(f.sources) for f in folds],
                **({"trained_from": str(Path(trained_from).resolve())} if trained_from else {}),
                "copies": copies,
                "copies_left_out": left_out,
            },
        )
        cv = cls(run, cfg, folds, progress, pipeline, Path(trained_from).resolve() if trained_from else None)
        cv._write_fold_manifests(manifest, copies, left_out)
        return cv

    @classmethod
    def open(cls, run: Path, progress: bool = True) -> CrossVal:
        run = Path(run)
        if not (run / "crossval.json").is_file() or not (run / "config.yaml").is_file():
            raise UsageError(f"{printable_path(str(run))}: not a crossval run folder (no crossval.json)")
        cfg = Config.load(run / "config.yaml")
        info = json.loads((run / "crossval.json").read_text(encoding="utf-8"))
        folds = [Fold(i + 1, tuple(s)) for i, s in enumerate(info["folds"])]
        src = info.get("trained_from")
        return cls(run, cfg, folds, progress, info.get("pipeline", "cached"), Path(src) if src else None)

    def _write_fold_manifests(
        self, manifest: Manifest, copies: list[list[str]], left_out: dict[str, int]
    ) -> None:
        self.fold_dir.mkdir(exist_ok=True)
        for f in self.folds:
            fold_manifest(manifest, f, copies).to_csv(self.fold_dir / f"{f.name}.csv")
            if left_out[f.name]:
                self.log(
                    f"fold {f.name}: {left_out[f.name]} copies of its held-out images in other sources left out"
                    " of the fold"
                )

    def log(self, msg: str) -> None:
        msg = printable_path(msg)
        print(f"crossval: {msg}", flush=True)
        with open(self.run / "crossval.log", "a", encoding="utf-8") as fh:
            fh.write(f"{datetime.now().isoformat(timespec='seconds')} {msg}\n")

    # ---- one fold -------------------------------------------------------------------------------
    def fold_config(self, f: Fold) -> Config:
        cfg = copy.deepcopy(self.cfg)
        cfg.name = f.name
        cfg.runs_dir = str(self.fold_dir)
        cfg.data.path = str(self.fold_dir / f"{f.name}.csv")
        cfg.data.holdout_source = ""
        # one cache for every fold (and for later crossvals beside this one): an image decoded once
        cfg.data.cache_dir = self.cfg.data.cache_dir or str(Path(self.cfg.runs_dir) / ".cache")
        return cfg

    def trained_run(self, f: Fold) -> Path:
        """The training run of fold ``f``: this run's own, or (``trained_from``) the other run's."""
        return (self.trained_from or self.run) / "folds" / f.name

    def train_fold(self, f: Fold) -> Path:
        from xraydx.train import run_training

        run = self.trained_run(f)
        best = run / "checkpoints" / "best.safetensors"
        if (run / "metrics.json").is_file() and best.is_file():
            return run
        if self.trained_from is not None:  # another run's fold models are never trained from here
            raise UsageError(
                f"{printable_path(str(run))}: fold {f.name} of {self.trained_from} has not finished"
                f" training; finish that run first (xraydx crossval --resume {self.trained_from})"
            )
        if (run / "config.yaml").is_file():
            self.log(f"fold {f.name}: resuming its training")
            return run_training(None, resume=run, progress=self.progress)
        self.log(f"fold {f.name}: training without {', '.join(f.sources)}")
        return run_training(self.fold_config(f), progress=self.progress)

    def predict_fold(self, f: Fold, run: Path) -> Path:
        """The fold's held-out images, predicted by its best checkpoint into ``oos_predictions.csv``.

        pipeline ``cached``: the images as the training cache holds them, i.e. exactly the model inputs
        ``xraydx predict`` makes (the one preprocessing function, the shipped segmenter's lung box);
        ``deployed``: every file through ``Predictor.predict_files`` (read, segment, OOD guard, classify),
        slower, and the guard's ``not_cxr`` status counts in the flag."""
        from xraydx.predwrite import write_predictions

        out = self.fold_dir / f.name / "oos_predictions.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_file() and (self.pipeline == "deployed" or _has_column(out, "shift_score")):
            return out
        held = [
            r for r in Manifest.from_csv(self.fold_dir / f"{f.name}.csv").records if r.split == "external"
        ]
        ckpt = run / "checkpoints" / "best.safetensors"
        info = {str(r.path): r for r in held}
        if self.pipeline == "deployed":
            from xraydx.predict import Predictor

            pred = Predictor(ckpt, self.cfg.train.device, tta=self.cfg.data.tta)
            stream: Any = pred.predict_files([r.path for r in held], progress=self.progress, total=len(held))
        else:
            stream = self._cached_predictions(ckpt, held)

        def rows() -> Any:
            for p in stream:
                r = info[p.path]
                p.extra.update(label=r.label, source=r.source, group=r.group, fold=f.name)
                yield p

        from xraydx.checkpoint import read_metadata
        from xraydx.schema import model_id

        write_predictions(
            rows(),
            out,
            CLASSES,
            overwrite=True,
            kind="crossval",
            model_id=model_id(ckpt, read_metadata(ckpt)),
        )
        return out

    def _cached_predictions(self, ckpt: Path, held: list[Any]) -> Any:
        import torch

        from xraydx.device import resolve_device
        from xraydx.metrics import rule_flags, softmax
        from xraydx.models import load_checkpoint
        from xraydx.predict import UNCERTAIN_FLAG, Prediction, batch_outputs
        from xraydx.trainset import load_split
        from xraydx.transforms import Preprocessing

        device = resolve_device(self.cfg.train.device)
        model, meta = load_checkpoint(ckpt, device)
        # this run's test-time augmentation (the fold's own, unless the run reuses another's folds)
        spec = Preprocessing.from_dict({**meta["preprocessing"], "tta": self.cfg.data.tta})
        cache = Path(self.fold_config(self.folds[0]).data.cache_dir)
        data, bad = load_split(held, spec, cache, "held-out", self.progress)
        shift = self._shift_scores(ckpt.parent.parent, model, spec, cache, data.images, device)
        with torch.no_grad():
            if self.cfg.data.adapt_bn:
                out, agree = self._adapted_outputs(model, data, spec, device)
            else:
                out, agree = batch_outputs(model, data.images, spec, device)
        probs = softmax(out.numpy(), float(meta.get("calibration", {}).get("temperature", 1.0)))
        flags = rule_flags(probs, meta.get("abstention"), agree)
        for r, reason in bad:
            yield Prediction(str(r.path), None, f"error: {reason}")
        for r, p, fl, sh in zip(data.records, probs, flags, shift, strict=True):
            extra = {"flag": UNCERTAIN_FLAG if fl else "", "shift_score": f"{sh:.4f}"}
            yield Prediction(str(r.path), [float(v) for v in p], "ok", extra)

    def _adapted_outputs(self, model: Any, data: Any, spec: Any, device: Any) -> Any:
        """:func:`batch_outputs` with a copy of ``model`` adapted (AdaBN) to each held-out source's images."""
        import numpy as np
        import torch

        from xraydx.bnadapt import adapt_batchnorm
        from xraydx.predict import batch_outputs

        sources = np.array([r.source for r in data.records])
        w, k = float(self.cfg.data.adapt_bn), int(self.cfg.data.adapt_bn_layers)
        out = None
        agree = None
        for src in sorted(set(sources)):
            idx = np.flatnonzero(sources == src)
            adapted = copy.deepcopy(model)
            n, _ = adapt_batchnorm(
                adapted, data.images[idx], spec, device, what=f"held-out source {src}", weight=w, first=k
            )
            self.log(f"adapted {n} BatchNorm layers to {len(idx)} images of {src} (weight {w:g})")
            o, a = batch_outputs(adapted, data.images[idx], spec, device)
            if out is None:
                out = torch.empty((len(sources), o.shape[1]), dtype=o.dtype)
            out[torch.from_numpy(idx)] = o
            if a is not None:
                agree = np.ones(len(sources), dtype=bool) if agree is None else agree
                agree[idx] = a
        if out is None:
            out = torch.empty((0, len(CLASSES)))
        return out, agree

    def _shift_scores(
        self, run: Path, model: Any, spec: Any, cache: Path, held_images: Any, device: Any
    ) -> Any:
        """The source-shift score (:mod:`xraydx.shift`) of the held-out images under this fold's model:
        k-NN feature distance to the fold's training images, in units of its validation quantile."""
        from xraydx.shift import ShiftScore, batch_features
        from xraydx.trainset import load_split

        recs = Manifest.from_csv(run / "manifest.csv").records
        feats = {}
        for split in ("train", "val"):
            d, _ = load_split([r for r in recs if r.split == split], spec, cache, split, self.progress)
            feats[split] = batch_features(model, d.images, spec, device)
        score = ShiftScore.fit(feats["train"], feats["val"], seed=self.cfg.train.seed)
        return score.score(batch_features(model, held_images, spec, device))

    # ---- all folds ------------------------------------------------------------------------------
    def run_all(self) -> Path:
        main = int(os.environ.get("RANK", "0")) == 0  # under torchrun: rank 0 predicts and pools
        for f in self.folds:
            run = self.train_fold(f)
            if main:
                self.predict_fold(f, run)
                self.log(f"fold {f.name}: done ({run})")
        if main:
            self.finish()
        return self.run

    def _copies_left_out(self) -> dict[str, int] | None:
        """Per fold: copies of held-out images in other sources that the fold models never saw; None where
        the models' run predates the check (they may have trained on such copies)."""
        try:
            info = json.loads(((self.trained_from or self.run) / "crossval.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        got = info.get("copies_left_out")
        return {str(k): int(v) for k, v in got.items()} if isinstance(got, dict) else None

    def pooled_rows(self) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        for f in self.folds:
            with open(self.fold_dir / f.name / "oos_predictions.csv", encoding="utf-8", newline="") as fh:
                rows += [{k: csv_unescape(v) for k, v in r.items()} for r in csv.DictReader(fh)]
        return rows

    def finish(self) -> dict[str, Any]:
        from xraydx.fsutil import CsvDictWriter, atomic_open
        from xraydx.report import write_html
        from xraydx.report_crossval import crossval_page

        rows = self.pooled_rows()
        with atomic_open(self.run / "predictions.csv", "w", encoding="utf-8", newline="") as fh:
            w = CsvDictWriter(fh, fieldnames=list(rows[0]) if rows else ["path"])
            w.writeheader()
            w.writerows(rows)
        in_source = {f.name: in_source_test(self.trained_run(f)) for f in self.folds}
        coverage = {  # what each fold model learned each class from: its training run's fold manifest
            f.name: fold_training_coverage(self.trained_run(f).parent / f"{f.name}.csv", CLASSES)
            for f in self.folds
        }
        summary = summarize(
            rows, CLASSES, folds=[f.name for f in self.folds], in_source=in_source, coverage=coverage
        )
        summary["recipe"] = {"data": self.cfg.data.path, "config": "config.yaml", **_recipe(self.cfg)}
        if self.trained_from is not None:
            summary["recipe"]["trained_from"] = str(self.trained_from)
        summary["copies_left_out"] = self._copies_left_out()
        atomic_write_json(self.run / "metrics.json", summary)
        write_html(self.run / "report.html", crossval_page(summary, title=f"xraydx crossval {self.run.name}"),
                   overwrite=True)  # fmt: skip
        p = summary["pooled"]
        self.log(
            f"pooled out-of-source: n={p['n']}, balanced accuracy {p['balanced_accuracy']:.3f} "
            f"[{p['ci']['balanced_accuracy'][0]:.3f}-{p['ci']['balanced_accuracy'][1]:.3f}], "
            f"macro-F1 {p['macro_f1']:.3f}; errors flagged {summary['flag']['errors_flagged']:.0%}"
        )
        for line in one_source_lines(summary):
            self.log(line)
        self.log(f"run folder: {self.run}")
        return summary


def _has_column(path: Path, name: str) -> bool:
    with open(path, encoding="utf-8", newline="") as fh:
        return name in next(csv.reader(fh), [])


def _discover(cfg: Config) -> Manifest:
    return discover(
        cfg.data.path, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
        seed=cfg.data.split_seed,
    )  # fmt: skip


def _recipe(cfg: Config) -> dict[str, Any]:
    return {
        "model": cfg.model.name, "image_size": cfg.data.image_size, "lung_mask": cfg.data.lung_mask,
        "intensity": cfg.data.intensity, "base_size": cfg.data.base_size, "epochs": cfg.train.epochs,
        "augment": cfg.train.augment, "balance": cfg.train.balance, "acquisition": cfg.train.acquisition,
        "epoch_size": cfg.train.epoch_size, "objective": cfg.train.objective,
        "dro_groups": cfg.train.dro_groups if cfg.train.objective == "group_dro" else None, "tta": cfg.data.tta,
        "adapt_bn": cfg.data.adapt_bn, "adapt_bn_layers": cfg.data.adapt_bn_layers,
        "mixstyle": cfg.train.mixstyle, "adversary": cfg.train.adversary,
        "align": cfg.train.align, "sam": cfg.train.sam, "probe": cfg.train.probe,
        "average": cfg.train.average, "average_start": cfg.train.average_start,
        "schedule": cfg.train.schedule, "mixup": cfg.train.mixup, "ampmix": cfg.train.ampmix, "mixup_alpha": cfg.train.mixup_alpha,
        "cutmix_alpha": cfg.train.cutmix_alpha,
    }  # fmt: skip


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_reuse(src: Path, cfg: Config, folds_spec: str | None) -> str:
    """Refuse to reuse ``src``'s fold models for a recipe that trains differently; its folds spec."""
    if not (src / "crossval.json").is_file() or not (src / "config.yaml").is_file():
        raise UsageError(
            f"--reuse-folds {printable_path(str(src))}: not a crossval run folder (no crossval.json)"
        )
    info = json.loads((src / "crossval.json").read_text(encoding="utf-8"))
    if info.get("trained_from"):
        raise UsageError(
            f"--reuse-folds {printable_path(str(src))}: it reuses {info['trained_from']}; name that run"
        )
    theirs, ours = _flat(Config.load(src / "config.yaml").to_dict()), _flat(cfg.to_dict())
    differ = sorted(
        k for k in set(theirs) | set(ours) if k not in PREDICTION_KEYS and theirs.get(k) != ours.get(k)
    )
    if differ:
        raise UsageError(
            f"--reuse-folds {printable_path(str(src))}: its fold models were trained with other settings ("
            + ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ[:4])
            + f"); only {', '.join(PREDICTION_KEYS[2:])} may differ"
        )
    spec = FOLD_SEP.join(JOIN.join(g) for g in info["folds"])
    if folds_spec and folds_spec.replace(" ", "") != spec:
        raise UsageError(f"--reuse-folds: --folds must be that run's folds ({spec!r}) or left out")
    return spec


def run_crossval(
    cfg: Config | None,
    *,
    folds: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
    pipeline: str = "cached",
    trained_from: Path | None = None,
) -> Path:
    """Run (or, with ``resume``, continue) a leave-source-out crossval; returns its run folder.
    ``trained_from``: predict with that crossval run's fold models instead of training (see the module)."""
    if resume is not None:
        cv = CrossVal.open(Path(resume), progress)
    elif cfg is not None:
        cv = CrossVal.create(cfg, folds, progress, pipeline, trained_from)
    else:
        raise UsageError("crossval: give a config or --resume RUN")
    return cv.run_all()


__all__ = [
    "CrossVal",
    "Fold",
    "cross_source_copies",
    "fold_manifest",
    "held_out_copies",
    "parse_folds",
    "run_crossval",
]
