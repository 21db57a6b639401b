"""The inference thread: one thread owns the model(s) and runs micro-batches of concurrent requests."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from xraydx.errors import ServeError

T = TypeVar("T")
HeatFn = Callable[[np.ndarray, list[int]], np.ndarray]  # (N, S, S) uint8, classes -> (N, S, S) heat


class Engine(Protocol):
    """What the worker runs batches of probabilities on (:class:`xraydx.predict.Predictor`, or a test's fake)."""

    def probs_agree(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities (N, C) for preprocessed uint8 images (N, S, S), and an ensemble's members'
        agreement per image ((N,) bool; None: one network)."""
        ...


@dataclass
class _Job:
    fut: concurrent.futures.Future[Any]
    kind: str  # "probs" and "heat" are batched; "call" runs alone; "stop" ends the thread
    image: np.ndarray | None = None
    arg: Any = None
    call: Callable[[], Any] | None = None


class InferenceWorker:
    """One thread owns the model(s). Jobs of one batchable kind (probabilities, Grad-CAM) that arrive within
    ``window_s`` of the first one in a batch are stacked and run together (at most ``max_batch``, in
    arrival order); any other call runs alone. Results go back through concurrent futures."""

    def __init__(
        self, engine: Engine, *, max_batch: int = 16, window_s: float = 0.005, heat_fn: HeatFn | None = None
    ) -> None:
        if max_batch < 1:
            raise ServeError(f"max_batch must be >= 1; got {max_batch}")
        if window_s < 0:
            raise ServeError(f"batch window must be >= 0; got {window_s}")
        self.engine = engine
        self.heat_fn = heat_fn
        self.max_batch = int(max_batch)
        self.window_s = float(window_s)
        self._q: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # probability batches run
        self.images = 0  # images in them

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="xraydx-inference", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None and t.is_alive():
            self._q.put(_Job(concurrent.futures.Future(), "stop"))
            t.join(timeout)

    def _submit(self, job: _Job) -> concurrent.futures.Future[Any]:
        self.start()
        self._q.put(job)
        return job.fut

    def submit_probs(self, image: np.ndarray) -> concurrent.futures.Future[tuple[np.ndarray, bool | None]]:
        """(calibrated probabilities, whether an ensemble's members agree: None for one network)."""
        return self._submit(_Job(concurrent.futures.Future(), "probs", image=image))

    def submit_heat(self, image: np.ndarray, class_idx: int) -> concurrent.futures.Future[np.ndarray]:
        if self.heat_fn is None:
            raise ServeError("no heatmap function configured")
        return self._submit(_Job(concurrent.futures.Future(), "heat", image=image, arg=int(class_idx)))

    def submit_call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        return self._submit(_Job(concurrent.futures.Future(), "call", call=fn))

    def _run(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending if pending is not None else self._q.get()
            pending = None
            if job.kind == "stop":
                return
            if job.kind == "call":
                self._exec_call(job)
                continue
            batch = [job]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt.kind != job.kind:
                    pending = nxt  # handled next, in order
                    break
                batch.append(nxt)
            self._exec_batch(batch)

    @staticmethod
    def _exec_call(job: _Job) -> None:
        if not job.fut.set_running_or_notify_cancel():
            return
        assert job.call is not None
        try:
            job.fut.set_result(job.call())
        except BaseException as exc:  # delivered to the awaiting request
            job.fut.set_exception(exc)

    def _exec_batch(self, batch: list[_Job]) -> None:
        live = [j for j in batch if j.fut.set_running_or_notify_cancel()]
        if not live:
            return
        kind = live[0].kind
        try:
            arr = np.stack([j.image for j in live])  # type: ignore[misc]
            if kind == "probs":
                probs, agree = self.engine.probs_agree(arr)
                out = [
                    (np.asarray(p, dtype=np.float64), None if agree is None else bool(a))
                    for p, a in zip(probs, agree if agree is not None else [None] * len(probs), strict=True)
                ]
            else:
                assert self.heat_fn is not None
                out = self.heat_fn(arr, [int(j.arg) for j in live])
        except BaseException as exc:
            for j in live:
                j.fut.set_exception(exc)
            return
        if kind == "probs":
            self.batches += 1
            self.images += len(live)
        for j, p in zip(live, out, strict=True):
            j.fut.set_result(p if kind == "probs" else np.asarray(p, dtype=np.float32))
