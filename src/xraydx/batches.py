"""Batches for training from decoded images: a uint8 (N, S, S) array (in RAM or the memmap that
:func:`xraydx.cache.load_many` returns) gathered batch by batch onto the device.

* :func:`gather_batch`: ``images[idx]`` as a uint8 (B, 1, S, S) CPU tensor in one copy (page-locked or
  into a caller's buffer).
* :func:`iter_batches`: the training loop's batches in a given order, gathered ahead on a background
  thread; :class:`BatchBuffers` is the ring of gather buffers it can recycle across epochs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from xraydx.ahead import ahead


def gather_batch(
    images: np.ndarray, idx: np.ndarray, pin: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 (B, 1, S, S) CPU tensor of ``images[idx]`` (page-locked if ``pin``), one copy; into ``out``
    (a contiguous uint8 tensor of at least B images of that size: its first B are returned) if given."""
    b, s1, s2 = len(idx), images.shape[1], images.shape[2]
    if out is None:
        buf = torch.empty((b, 1, s1, s2), dtype=torch.uint8, pin_memory=pin)
    else:
        buf = out[:b]
        if buf.shape != (b, 1, s1, s2) or buf.dtype != torch.uint8 or not buf.is_contiguous():
            raise ValueError(f"out must be a contiguous uint8 tensor of at least {b} images of {s1}x{s2}")
    np.take(images, idx, axis=0, out=buf.numpy().reshape(b, s1, s2))
    return buf


class BatchBuffers:
    """Gather buffers that :func:`iter_batches` (``reuse=``) recycles; keep one across epochs so that no
    epoch starts by faulting in fresh memory."""

    def __init__(self) -> None:
        self._ring: list[torch.Tensor] = []

    def ring(self, count: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
        if len(self._ring) != count or tuple(self._ring[0].shape) != shape:
            self._ring = [torch.empty(shape, dtype=torch.uint8) for _ in range(count)]
        return self._ring


def iter_batches(
    images: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    batch_size: int,
    device: torch.device,
    *,
    prefetch: int = 1,
    reuse: bool | BatchBuffers = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (uint8 (B, 1, S, S), int64 (B,)) on ``device``, in ``order`` (sorted within each batch).

    A background thread gathers up to ``prefetch`` batches ahead (from RAM or a memmap) while the
    model runs; on CUDA into page-locked memory, copied with ``non_blocking=True``.

    ``reuse=True`` or a :class:`BatchBuffers` kept across epochs (CPU only; what train uses): the images
    are gathered into a ring of ``prefetch + 2`` buffers, so a batch is only valid until the next one is
    asked for. A fresh multi-MB buffer per batch costs hundreds of page faults, which measured as much as
    the augmentation itself."""
    pin = device.type == "cuda"
    starts = range(0, len(order), batch_size)
    ring: list[torch.Tensor] = []
    if reuse and device.type == "cpu" and len(order):
        shape = (min(batch_size, len(order)), 1, images.shape[1], images.shape[2])
        # the consumer holds one batch, the queue up to `prefetch`, the producer fills one more
        ring = (reuse if isinstance(reuse, BatchBuffers) else BatchBuffers()).ring(
            max(0, prefetch) + 2, shape
        )

    def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(order[i : i + batch_size])
        y = torch.from_numpy(np.ascontiguousarray(labels[idx]))
        out = ring[(i // batch_size) % len(ring)] if ring else None
        return gather_batch(images, idx, pin, out=out), (y.pin_memory() if pin else y)

    def to_dev(xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return xy[0].to(device, non_blocking=True), xy[1].to(device, non_blocking=True)

    if prefetch <= 0:
        for i in starts:
            yield to_dev(make(i))
        return
    for xy in ahead((make(i) for i in starts), prefetch, name="xraydx-prefetch"):
        yield to_dev(xy)
