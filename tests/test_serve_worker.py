"""The serve package's parts that need no web framework: the micro-batching inference thread
(xraydx.serve.worker) with fake engines, and what importing the package loads."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from xraydx.errors import ServeError
from xraydx.serve.worker import InferenceWorker


class _RecordingEngine:
    name = "fake"

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def probs_agree(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.entered.set()
        self.gate.wait(10)
        self.sizes.append(len(batch))
        v = batch.reshape(len(batch), -1)[:, 0].astype(np.float64)
        return np.stack([v, -v, v * 0], axis=1), v > 50  # each row identifies its input


def test_worker_groups_queued_requests_and_keeps_order() -> None:
    eng = _RecordingEngine()
    heat_calls: list[tuple[int, list[int]]] = []

    def heat_fn(images: np.ndarray, classes: list[int]) -> np.ndarray:
        heat_calls.append((len(images), classes))
        return images.astype(np.float32) + np.asarray(classes, np.float32)[:, None, None]

    w = InferenceWorker(eng, max_batch=4, window_s=0.0, heat_fn=heat_fn)
    try:
        first = w.submit_probs(np.full((4, 4), 1, np.uint8))
        assert eng.entered.wait(10)
        # the engine is blocked on the first batch; these queue up meanwhile
        futs = [w.submit_probs(np.full((4, 4), i, np.uint8)) for i in range(2, 12)]
        heats = [w.submit_heat(np.full((4, 4), 10 * i, np.uint8), i) for i in range(3)]
        call = w.submit_call(lambda: "exclusive")
        later = w.submit_probs(np.full((4, 4), 99, np.uint8))
        eng.gate.set()
        assert first.result(10)[0][0] == 1 and first.result(10)[1] is False
        assert [int(f.result(10)[0][0]) for f in futs] == list(range(2, 12))
        assert [float(h.result(10)[0, 0]) for h in heats] == [0.0, 11.0, 22.0]
        assert call.result(10) == "exclusive"
        assert later.result(10)[0][0] == 99 and later.result(10)[1] is True  # agreement per image, as bool
    finally:
        w.stop()
    assert eng.sizes[0] == 1
    assert max(eng.sizes) == 4  # queued requests were grouped, never beyond max_batch
    assert sum(eng.sizes) == 12
    assert heat_calls == [(3, [0, 1, 2])]  # the heat maps ran as one batch of their own, classes in order
    assert w._thread is None  # stopped


def test_worker_delivers_engine_errors() -> None:
    class Failing:
        name = "fail"

        def probs_agree(self, batch: np.ndarray) -> tuple[np.ndarray, None]:
            raise ValueError("engine broke")

    w = InferenceWorker(Failing(), max_batch=2)
    try:
        with pytest.raises(ValueError, match="engine broke"):
            w.submit_probs(np.zeros((4, 4), np.uint8)).result(10)
        assert w.submit_call(lambda: 5).result(10) == 5  # the thread survives
    finally:
        w.stop()


def test_worker_refuses_bad_settings() -> None:
    with pytest.raises(ServeError, match="max_batch"):
        InferenceWorker(_RecordingEngine(), max_batch=0)
    with pytest.raises(ServeError, match="window"):
        InferenceWorker(_RecordingEngine(), window_s=-0.001)
    with pytest.raises(ServeError, match="heatmap"):
        InferenceWorker(_RecordingEngine()).submit_heat(np.zeros((4, 4), np.uint8), 0)


def test_imports_stay_light() -> None:
    """``import xraydx.serve`` (what the command line does) loads neither the web framework nor torch, and
    the service, worker, uploads and security modules never import FastAPI or Starlette."""
    code = (
        "import sys\n"
        "import xraydx.serve\n"
        "heavy = {'fastapi', 'starlette', 'uvicorn', 'torch'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "import xraydx.serve.service, xraydx.serve.worker, xraydx.serve.uploads, xraydx.serve.security\n"
        "web = {m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette'}\n"
        "assert not web, web\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
