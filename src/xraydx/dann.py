"""A source-adversarial head: training option ``train.adversary`` (domain-adversarial training).

Domain-adversarial training (Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML
2015; Ganin et al., JMLR 2016), written from the papers' description and used here for domain
*generalisation* over the training sources: a small head tries to tell from the classifier's penultimate
features which source (hospital / collection) an image came from, and a gradient-reversal layer between
the two turns the head's gradient around before it reaches the network. The head learns to name the
source; the network learns features from which it cannot, while its own loss keeps them useful for the
class. A model that reads "this is Guangzhou" or "this looks like NIH" is penalised for exactly that.

    loss = CE(class head(f), y) + CE(source head(GRL_lambda(f)), source)

``GRL_lambda`` is the identity forward and multiplies the gradient by ``-lambda`` backward; ``lambda``
ramps from 0 to ``train.adversary`` over training as in the paper, ``lambda_p = w (2 / (1 + exp(-10 p)) -
1)`` with ``p`` the share of training steps done, so the head first learns before it pushes back.

The head (:class:`WithAdversary`) wraps the classifier for training only (it is the module DDP wraps, so
the gradients of both are synchronised); checkpoints hold the classifier alone, and the head's weights go
to ``checkpoints/last.adversary.safetensors`` for ``--resume``. The head's accuracy at naming the source
is logged each epoch: near chance means the features no longer carry the source.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from xraydx.errors import ConfigError

__all__ = [
    "WithAdversary", "grad_reverse", "logits_and_pooled", "ramp", "require_timm_parts", "source_head", "source_ids",
    "train_source_ids",
]  # fmt: skip


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; the gradient times ``-coeff`` backward."""
    return _GradReverse.apply(x, float(coeff))  # type: ignore[no-any-return]


def ramp(weight: float, progress: float) -> float:
    """The reversal coefficient at ``progress`` (0-1, share of training steps done): the paper's
    ``weight * (2 / (1 + exp(-10 p)) - 1)``, 0 at the start, ``weight`` at the end."""
    p = min(max(float(progress), 0.0), 1.0)
    return float(weight) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def source_ids(sources: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """One integer per record for its source (sorted names; a record without one is source ``""``)."""
    names = sorted({s or "" for s in sources})
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[s or ""] for s in sources], dtype=torch.long), names


def train_source_ids(cfg: Any, sources: Sequence[str], option: str) -> tuple[torch.Tensor, list[str]]:
    """:func:`source_ids` of the train split for ``option`` (a training option that works across sources);
    a ConfigError where the split has fewer than two sources."""
    ids, names = source_ids(sources)
    if len(names) < 2:
        raise ConfigError(
            f"{option} needs two or more sources in the train split; {cfg.data.path} gives "
            f"{names[0] or 'no source'} only (a manifest's 'source' column names them)"
        )
    return ids, names


def require_timm_parts(model: nn.Module, what: str) -> None:
    """ValueError unless ``model`` has timm's forward_features / forward_head / get_classifier (``what``
    names the option that needs them)."""
    if not all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        raise ValueError(f"{what} needs a timm model (forward_features / forward_head / get_classifier)")


def logits_and_pooled(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm model's class logits and the pooled features they are computed from: pooled once, so both
    come from one dropout mask."""
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    return model.get_classifier()(pooled), pooled  # type: ignore[operator]


def _feature_width(model: nn.Module, in_chans: int, size: int) -> int:
    """Width of ``forward_head(..., pre_logits=True)`` (probed once on a tiny input, in eval mode)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            x = torch.zeros((1, in_chans, size, size), dtype=p.dtype, device=p.device)
            return int(model.forward_head(model.forward_features(x), pre_logits=True).shape[-1])  # type: ignore[operator]
    finally:
        model.train(was)


class WithAdversary(nn.Module):
    """The classifier and its source head, for training: ``forward(x)`` -> (class logits, source logits).

    ``coeff`` is the gradient-reversal coefficient of the next forward (set by the training loop from
    :func:`ramp`)."""

    def __init__(
        self, model: nn.Module, n_sources: int, *, in_chans: int, size: int, hidden: int = 256
    ) -> None:
        super().__init__()
        if n_sources < 2:
            raise ValueError(f"a source-adversarial head needs two or more training sources; got {n_sources}")
        require_timm_parts(model, "a source-adversarial head")
        width = _feature_width(model, in_chans, size)
        self.model = model
        self.adversary = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_sources)
        )
        self.coeff = 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = logits_and_pooled(self.model, x)  # the class and source heads see one dropout mask
        return logits, self.adversary(grad_reverse(pooled, self.coeff))

    def report(self, epoch: int, right: int, counts: torch.Tensor) -> str:
        """The epoch's log line: how often the head named the source, against the most frequent one's share."""
        seen = max(1, int(counts.sum()))
        return (
            f"epoch {epoch}: the source head names the source of {right / seen:.3f} of this rank's images"
            f" (most frequent source: {int(counts.max()) / seen:.3f}); reversal coefficient {self.coeff:.3f}"
        )


def source_head(
    cfg: Any,
    model: nn.Module,
    sources: Sequence[str],
    size: int,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[WithAdversary, torch.Tensor, list[str]]:
    """``train.adversary``: the classifier wrapped with its source head, each train record's source id and
    the sources' names; a ConfigError where the train split has fewer than two sources."""
    ids, names = train_source_ids(cfg, sources, "train.adversary")
    wrapped = WithAdversary(model, len(names), in_chans=cfg.model.in_chans, size=size).to(device)
    log(
        f"source-adversarial head (gradient reversal, xraydx.dann) over {len(names)} train sources"
        f" ({', '.join(names)}), weight {cfg.train.adversary}"
    )
    return wrapped, ids, names
