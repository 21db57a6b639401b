"""xraydx.ahead: items in order, at most ``depth`` made ahead, the producer's error raised at its place,
and an abandoned iterator stops its thread (what decode_ahead and iter_batches rely on)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from xraydx.ahead import ahead


def test_items_come_in_order_and_at_most_depth_ahead() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for i in range(20):
            made.append(i)
            yield i

    it = ahead(items(), depth=3)
    assert next(it) == 0
    time.sleep(0.3)  # the producer runs until the queue is full
    # consumed 1; the queue holds 3; the producer holds one more it cannot put
    assert len(made) <= 1 + 3 + 1
    assert [0, *it] == list(range(20))


def test_an_error_is_raised_where_it_happened() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("bad file 3")

    it = ahead(items(), depth=8)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="bad file 3"):
        next(it)


def test_closing_stops_the_thread() -> None:
    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    it = ahead(endless(), depth=2, name="xraydx-test-ahead")
    assert next(it) == 0
    assert any(t.name == "xraydx-test-ahead" for t in threading.enumerate())
    it.close()
    assert not any(t.name == "xraydx-test-ahead" and t.is_alive() for t in threading.enumerate())
    assert threading.active_count() <= before
