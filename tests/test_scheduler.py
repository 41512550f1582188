"""Scheduler bookkeeping, with no model: row limit, token budget, FIFO order, queue bound."""

from __future__ import annotations

import pytest

from server.scheduler import QueueFull, Scheduler, SchedulerConfig


def test_admits_in_arrival_order_up_to_row_limit() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_batch_tokens=10_000, max_queue=10))
    for i in range(5):
        s.add(f"r{i}", 10)
    assert s.admit([10]) == ["r0", "r1"]  # one row already running
    assert s.admit([10, 10, 10]) == []
    assert s.admit([]) == ["r2", "r3", "r4"]
    assert s.num_waiting == 0


def test_token_budget_counts_rows_times_longest() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=100, max_batch_tokens=1000, max_queue=10))
    s.add("short", 100)
    s.add("long", 400)
    s.add("short2", 100)
    # running: 1 row of 100. +short -> 2 x 100 = 200 ok; +long -> 3 x 400 = 1200 > 1000: stop (FIFO, no overtaking).
    assert s.admit([100]) == ["short"]
    assert s.admit([100]) == ["long"]  # 2 x 400 = 800
    assert s.admit([100, 400]) == []  # 3 x 400 = 1200
    assert s.fits_alone(1000) and not s.fits_alone(1001)


def test_queue_bound_and_removal() -> None:
    s = Scheduler(SchedulerConfig(max_queue=2))
    s.add("a", 1)
    s.add("b", 1)
    with pytest.raises(QueueFull):
        s.add("c", 1)
    assert s.remove("a") and not s.remove("a")
    s.add("c", 1)
    assert s.admit([]) == ["b", "c"]
