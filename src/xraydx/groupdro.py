"""Group DRO over (class, source) cells: the training objective ``train.objective=group_dro``.

Distributionally robust optimisation over groups (Sagawa et al., "Distributionally Robust Neural Networks
for Group Shifts", ICLR 2020), written from the paper's description: instead of the mean loss over the
batch, the model minimises a weighted sum of per-group mean losses, where the weights ``q`` (a
distribution over groups) are pushed towards the groups with the highest loss by an exponentiated-gradient
step after every batch::

    q_g <- q_g * exp(eta * loss_g)   for every group g present in the batch;   q <- q / sum(q)
    loss = sum_g q_g * loss_g / sum_{g in batch} q_g

By default (``train.dro_groups=class_source``) a group is one (class, source) cell of the train split:
"COVID-19 from ieee8023", "normal from Shenzhen", ... A model that does well on average by reading one
collection's look, and badly on the cells where that look is absent, is penalised on exactly those cells.
With ``train.dro_groups=source`` a group is one source whole, as in the paper's domains: the weights then
follow the collection the model does worst on, whatever its classes, and there are fewer groups (each with
more images per batch, so its mean loss is less noisy). ``eta`` is ``train.dro_eta``.

The weights are kept identical on every rank (the per-group losses are summed over ranks before the update)
and are saved with the train state, so ``--resume`` continues with the same ``q``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["GroupDRO", "group_ids"]


def group_ids(
    labels: Sequence[int], sources: Sequence[str], class_names: Sequence[str], by: str = "class_source"
) -> tuple[torch.Tensor, list[str]]:
    """One integer per record for its group, and the groups' names, in order of first appearance.

    ``by="class_source"``: (class, source) cells, named ``"class:source"``; ``by="source"``: sources,
    named by the source. Records without a source share one source, ``""``."""
    if by not in ("class_source", "source"):
        raise ValueError(f"Group DRO groups are class_source or source; got {by!r}")
    names: dict[tuple[int, str], int] = {}
    ids = []
    for y, s in zip(labels, sources, strict=True):
        key = (int(y) if by == "class_source" else -1, s or "")
        ids.append(names.setdefault(key, len(names)))
    order = sorted(names, key=names.__getitem__)
    return torch.tensor(ids, dtype=torch.long), [s if y < 0 else f"{class_names[y]}:{s}" for y, s in order]


class GroupDRO:
    """The adversarial group weights and the robust loss (see the module docstring)."""

    def __init__(self, n_groups: int, eta: float, device: torch.device, distributed: bool = False) -> None:
        if n_groups < 1:
            raise ValueError("GroupDRO needs at least one group")
        if not eta > 0:
            raise ValueError(f"the Group DRO step size must be > 0; got {eta}")
        self.eta = float(eta)
        self.distributed = distributed
        self.q = torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float64, device=device)

    def loss(self, per_sample: torch.Tensor, groups: torch.Tensor, update: bool = True) -> torch.Tensor:
        """The robust loss of one batch (``per_sample``: unreduced losses; ``groups``: their group ids);
        updates ``q`` from this batch's per-group mean losses first, as in the paper's algorithm
        (``update=False``: with the weights as they are, for a second pass over the same batch)."""
        n = self.q.numel()
        groups = groups.to(per_sample.device)
        sums = torch.zeros(n, dtype=per_sample.dtype, device=per_sample.device).index_add_(
            0, groups, per_sample
        )
        counts = torch.bincount(groups, minlength=n).to(per_sample.dtype)
        if update:
            self._update(sums, counts)
        local = counts > 0
        mean_loss = sums / counts.clamp(min=1)
        w = self.q.to(per_sample.device, per_sample.dtype) * local
        total = w.sum()
        if not total > 0:  # cannot happen for a non-empty batch; kept finite for an empty one
            return per_sample.sum() * 0.0
        return (w * mean_loss).sum() / total

    @torch.no_grad()
    def _update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """The exponentiated-gradient step from one batch's per-group loss sums and counts (over all ranks)."""
        g_sums, g_counts = sums.detach().double(), counts.double()
        if self.distributed:
            stacked = torch.stack([g_sums, g_counts]).to(self.q.device)
            dist.all_reduce(stacked)
            g_sums, g_counts = stacked[0], stacked[1]
        present = g_counts.to(self.q.device) > 0
        means = torch.where(present, g_sums.to(self.q.device) / g_counts.to(self.q.device).clamp(min=1), 0.0)
        self.q = self.q * torch.exp(self.eta * means * present)
        self.q = self.q / self.q.sum()

    def state(self) -> list[float]:
        """``q`` as plain floats (JSON, for the train state)."""
        return [float(v) for v in self.q.cpu()]

    def load_state(self, q: Sequence[float]) -> None:
        if len(q) != self.q.numel():
            raise ValueError(
                f"the saved Group DRO weights have {len(q)} groups; this train split has {self.q.numel()}"
            )
        self.q = torch.tensor(list(q), dtype=torch.float64, device=self.q.device)

    def top(self, names: Sequence[str], k: int = 3) -> str:
        """The ``k`` heaviest groups, for the log (``"0:ieee8023 0.21, ..."``)."""
        vals, idx = torch.sort(self.q.cpu(), descending=True)
        return ", ".join(f"{names[int(i)]} {float(v):.2f}" for v, i in zip(vals[:k], idx[:k], strict=True))
