"""Test-time BatchNorm adaptation (AdaBN; Li et al., 2016; Schneider et al., NeurIPS 2020).

A network trained on some hospitals normalises every layer's activations with the mean and variance it
measured on *their* images. A new hospital's films (another detector, another exposure, another
processing) shift those statistics, and every later layer reads the shift. AdaBN re-estimates each
BatchNorm layer's running mean and variance on the new site's own images, unlabelled, and leaves every
learned weight alone: the network then reads the new site's images relative to that site's average, as
it read its training images relative to theirs.

What it needs, and what it cannot do:

- a set of images from one site (``MIN_IMAGES`` or more), predicted together: a user adapts to a folder
  of a hospital's films (``xraydx predict --adapt-bn W``, :func:`adapt_predictor_to_files`; ``xraydx
  evaluate --adapt-bn W``, :func:`adapt_predictor`), a crossval fold to each held-out source
  (``xraydx crossval --set data.adapt_bn=W``);
- a mix of classes like the training mix: the statistics are the site's *average*, so a site that sends
  only normals moves "its normal" to the middle of what the network knows. The crossval's normal-only
  sites measure exactly this cost.

The re-estimate: every BatchNorm's running statistics are reset and accumulated as the plain mean over
batches of the batch statistics (``momentum=None``), with the layers in training mode and everything
else (dropout) in eval mode, no gradients; then the whole network is back in eval mode. ``weight`` < 1
keeps part of the training statistics: mean and variance become ``weight`` x the site's + (1 - ``weight``)
x the training ones (the prior of Schneider et al.), a middle way for a site whose class mix is unlike
the training mix. ``first`` = K adapts only each network's first K BatchNorm layers: the early layers
carry the image's "style" (exposure, detector, processing), the late ones its class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xraydx.engines import normalise
from xraydx.errors import UsageError

#: fewer images than this give per-channel statistics too noisy to replace the training ones
MIN_IMAGES = 16


def check_request(weight: float, first: int, engine: str = "torch") -> None:
    """Refuse settings no adaptation can run with (before anything is loaded or read): ``weight`` 0 is
    off, else it must be in (0, 1]; ``first`` >= 0 and only with a weight; the torch engine only."""
    if not 0.0 <= weight <= 1.0:
        raise UsageError(f"--adapt-bn must be in (0, 1] (0: off); got {weight}")
    if first < 0 or (first and not weight):
        raise UsageError("--adapt-bn-layers K: K >= 0, and only with --adapt-bn W")
    if weight and engine != "torch":
        raise UsageError("--adapt-bn needs the PyTorch engine (--engine torch) and a .safetensors checkpoint")


def batchnorms(model: nn.Module, first: int = 0) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` in forward order; ``first`` > 0: only the first ``first`` of each
    network (of each member of an ensemble)."""
    nets = list(getattr(model, "members", None) or [model])
    out: list[nn.modules.batchnorm._BatchNorm] = []
    for net in nets:
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        out += bns[:first] if first > 0 else bns
    return out


def rebatch(chunks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Chunks of images (any lengths) -> batches of ``size`` in order, the last one shorter; a last batch
    of one image goes into the batch before it (a batch of one has no variance)."""
    buf: list[np.ndarray] = []
    held = 0
    pending: np.ndarray | None = None
    for c in chunks:
        if not len(c):
            continue
        buf.append(np.asarray(c))
        held += len(c)
        while held >= size:
            joined = np.concatenate(buf)
            if pending is not None:
                yield pending
            pending, rest = joined[:size], joined[size:]
            buf, held = ([rest] if len(rest) else []), len(rest)
    rest = np.concatenate(buf) if buf else None
    if rest is not None and len(rest) < 2 and pending is not None:
        pending, rest = np.concatenate([pending, rest]), None
    if pending is not None:
        yield pending
    if rest is not None:
        yield rest


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module,
    images: np.ndarray | Iterable[np.ndarray],
    spec: object,
    device: torch.device,
    batch_size: int = 64,
    what: str = "these images",
    weight: float = 1.0,
    first: int = 0,
    prepare: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> tuple[int, int]:
    """Re-estimate ``model``'s BatchNorm statistics (in place) on preprocessed uint8 (N, S, S) ``images``
    (one array, or an iterable of such arrays: a stream, never held at once) normalised by ``spec`` (its
    ``mean`` / ``std``); returns (the number of layers adapted, the number of images). ``model`` is left in eval mode, with its
    statistics as they were where this raises. ``weight``: the share of the new statistics (1: theirs
    only; see the module). ``first`` > 0: only each network's first ``first`` BatchNorm layers (the early,
    "style" layers; the later ones keep the training statistics). ``prepare``: how a uint8 batch becomes
    the network's input (default: normalised by ``spec``). Refuses a model without BatchNorm and
    fewer than :data:`MIN_IMAGES` images."""
    if not 0.0 < weight <= 1.0:
        raise UsageError(
            f"data.adapt_bn: the weight of the site's statistics must be in (0, 1]; got {weight}"
        )
    layers = batchnorms(model, first)
    if not layers:
        raise UsageError("data.adapt_bn: this model has no BatchNorm layers to adapt")
    if batch_size < 2:
        raise UsageError("data.adapt_bn: batch size must be at least 2")
    if isinstance(images, np.ndarray):
        images = [images]
    model.eval()
    momenta = [m.momentum for m in layers]
    trained = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())  # type: ignore[union-attr]
        for m in layers
    ]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative mean over the batches
        m.train()
    done = False
    try:
        n = 0
        for batch in rebatch(images, batch_size):
            if prepare is None:
                x = torch.from_numpy(normalise(batch, spec.mean, spec.std)).to(device)  # type: ignore[attr-defined]
            else:
                x = prepare(batch)
            model(x)
            n += len(batch)
        if n < MIN_IMAGES:
            raise UsageError(
                f"data.adapt_bn: {what}: {n} image(s); adapting BatchNorm needs at least {MIN_IMAGES}"
                " images from the site, predicted together"
            )
        if weight < 1.0:
            for m, (mean, var, _) in zip(layers, trained, strict=True):
                m.running_mean.mul_(weight).add_(mean, alpha=1.0 - weight)  # type: ignore[union-attr]
                m.running_var.mul_(weight).add_(var, alpha=1.0 - weight)  # type: ignore[union-attr]
        done = True
    finally:
        for m, mom, (mean, var, nb) in zip(layers, momenta, trained, strict=True):
            m.momentum = mom
            if not done:
                m.running_mean.copy_(mean)  # type: ignore[union-attr]
                m.running_var.copy_(var)  # type: ignore[union-attr]
                m.num_batches_tracked.copy_(nb)  # type: ignore[union-attr]
        model.eval()
    return len(layers), n


def adapt_predictor(
    pred: Any, images: np.ndarray | Iterable[np.ndarray], weight: float = 1.0, first: int = 0,
    what: str = "these images", batch_size: int = 32,
) -> dict[str, Any]:  # fmt: skip
    """Adapt a :class:`xraydx.predict.Predictor` (in place) to prepared uint8 images (one array, or a
    stream of arrays): a copy of the network re-estimates its BatchNorm statistics on them; from then
    on that copy classifies (and Grad-CAM explains), the rows' ``model_id`` reads
    ``<arch>+adabn<W>[l<K>]-<sha>``; the source-shift score keeps the network as trained. ``first``: only
    each network's first K BatchNorm layers. Torch engine only."""
    import copy

    check_request(weight, first, pred.engine if pred.model is not None else "onnx")
    if pred.adapted is not None:
        raise UsageError("this predictor is already adapted; load the checkpoint again to adapt anew")
    adapted = copy.deepcopy(pred.model)
    layers, n = adapt_batchnorm(
        adapted, images, pred.spec, pred.device, batch_size=max(2, batch_size), weight=weight,
        what=what, first=first,
    )  # fmt: skip
    pred.classifier.use_model(adapted)
    pred.model = adapted
    name, digest = pred.model_id.rsplit("-", 1)
    pred.model_id = f"{name}+adabn{weight:g}{f'l{first}' if first else ''}-{digest}"
    pred.adapted = {"images": n, "layers": layers, "weight": float(weight), "first": int(first)}
    return pred.adapted


def adapt_predictor_to_files(
    pred: Any, paths: Sequence[Path], weight: float = 1.0, batch_size: int = 32, progress: bool = True,
    first: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """:func:`adapt_predictor` to these files: each is read, checked and preprocessed as for
    prediction, and the images the checks accept (status ``ok``: unreadable files and ``not_cxr`` ones
    are left out) are streamed into the adaptation."""
    from tqdm.auto import tqdm

    from xraydx.predict import Checked, Decoded, decode_ahead

    paths = list(paths)
    bar = tqdm(total=len(paths), desc="adapt BatchNorm", unit="img", disable=not progress, leave=False)
    want_colour = pred.ood_guard() is not None

    def accepted() -> Iterator[np.ndarray]:
        pending: list[Decoded] = []
        # decoded on a thread ahead, never all held: a None at the end flushes the last batch
        for d in chain(decode_ahead(paths, depth=2 * batch_size, colour=want_colour), [None]):
            if d is not None:
                bar.update(1)
                if d.image is not None:
                    pending.append(d)
            if pending and (d is None or len(pending) >= batch_size):
                got = pred.check(
                    [p.image for p in pending if p.image is not None],
                    [p.colour for p in pending], [p.window for p in pending], [p.view for p in pending],
                )  # fmt: skip
                ok = [c.prepared for c in got if isinstance(c, Checked) and c.status == "ok"]
                pending.clear()
                if ok:
                    yield np.stack(ok)

    what = f"the {len(paths)} input file(s) (the images the checks accept)"
    try:
        return adapt_predictor(pred, accepted(), weight, first, what, batch_size)
    finally:
        bar.close()


__all__ = [
    "MIN_IMAGES",
    "adapt_batchnorm",
    "check_request",
    "adapt_predictor",
    "adapt_predictor_to_files",
    "batchnorms",
    "rebatch",
]
