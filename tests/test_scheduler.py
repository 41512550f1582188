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


# ----- fairness across tenants -----------------------------------------------------------------


def test_round_robin_across_tenants() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=100, max_batch_tokens=10_000, max_queue=100))
    for i in range(6):
        s.add(f"a{i}", 10, "A")
    s.add("b0", 10, "B")
    s.add("b1", 10, "B")
    s.add("c0", 10, "C")
    assert s.admit([]) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_a_late_tenant_overtakes_a_flood_when_one_row_frees() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=10_000, max_queue=300))
    for i in range(200):
        s.add(f"a{i}", 10, "A")
    assert s.admit([]) == ["a0", "a1", "a2", "a3"]
    s.add("b0", 10, "B")
    # One row frees per step: B's request is admitted within the next two.
    first, second = s.admit([10, 10, 10]), s.admit([10, 10, 10])
    assert "b0" in first + second
    assert s.waiting_for("B") == 0 and s.waiting_for("A") == 195


def test_turn_is_kept_by_a_head_that_does_not_fit() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=10, max_batch_tokens=1000, max_queue=10))
    s.add("big", 400, "A")
    s.add("small", 10, "B")
    # 2 running rows of 100: +big -> 3 x 400 = 1200 > 1000, so nothing is admitted, not even B's small one,
    # and A keeps its turn: big goes first once it fits.
    assert s.admit([100, 100]) == []
    assert s.admit([100]) == ["big"]  # 2 x 400 = 800; small would make it 3 x 400
    assert s.admit([400]) == ["small"]


def test_removal_and_queue_bound_across_tenants() -> None:
    s = Scheduler(SchedulerConfig(max_queue=3))
    s.add("a0", 1, "A")
    s.add("b0", 1, "B")
    s.add("a1", 1, "A")
    with pytest.raises(QueueFull):
        s.add("c0", 1, "C")  # the bound counts every tenant's waiting requests
    assert s.remove("b0") and not s.remove("b0") and s.waiting_for("B") == 0
    s.add("c0", 1, "C")
    assert s.remove("a0") and s.remove("a1") and s.num_waiting == 1
    assert s.admit([]) == ["c0"] and s.num_waiting == 0
    s.add("d", 1)  # the default tenant
    assert s.waiting_for("default") == 1 and s.admit([]) == ["d"]
