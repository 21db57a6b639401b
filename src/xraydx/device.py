"""Where computation runs: the torch device for a ``--device`` name, the CPUs this process may use,
and the few ``torch.distributed`` helpers training needs (DDP under ``torchrun``).

torch is imported inside the functions, so the layers that only need :func:`available_cpus` (and
``xraydx --help``) do not load it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xraydx.errors import DeviceError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a DeviceError otherwise."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available")
    return dev


# ---- CPUs ----------------------------------------------------------------------------------------


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity (taskset, cpusets), capped by a cgroup CPU quota
    (``docker --cpus``, Kubernetes limits), which ``os.cpu_count()`` ignores."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota + 0.5)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup v2 ``cpu.max`` (or v1 ``cpu.cfs_quota_us``) of this process, if limited."""
    candidates = [
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ]
    for quota_path, period_path in candidates:
        try:
            text = Path(quota_path).read_text().split()
            if period_path is None:
                if text and text[0] != "max":
                    return int(text[0]) / int(text[1])
            else:
                q, per = int(text[0]), int(Path(period_path).read_text().split()[0])
                if q > 0 and per > 0:
                    return q / per
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


# ---- distributed ---------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), device


def gather_concat(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate a CPU tensor across ranks (rank order)."""
    if not d.active:
        return x
    import torch
    import torch.distributed as dist

    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


def broadcast_obj(obj: Any, d: Dist) -> Any:
    if not d.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
