"""Work done ahead on a background thread: the one bounded producer/consumer queue of the package.

Used where the next items can be made while the current one is consumed: decoding image files ahead of
inference (:func:`xraydx.predict.decode_ahead`) and gathering training batches ahead of the model
(:func:`xraydx.batches.iter_batches`). Items come out in order; an exception raised while making one is
raised in the consumer at that point; closing (or abandoning) the iterator stops the thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["ahead"]

T = TypeVar("T")
_END = object()


def ahead(items: Iterable[T], depth: int, name: str = "xraydx-ahead") -> Iterator[T]:
    """The items of ``items``, made on a daemon thread at most ``depth`` (>= 1) ahead of the consumer."""
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # delivered to the consumer, raised there
            put(exc)
            return
        put(_END)

    th = threading.Thread(target=producer, name=name, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):  # free what was made ahead (e.g. pinned batches)
            while True:
                q.get_nowait()
        th.join(timeout=5)
