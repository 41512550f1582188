"""Scheduler bookkeeping, with no model: row limit, token and prefill budgets, FIFO order, fairness, queue bound."""

from __future__ import annotations

import pytest

from server.scheduler import QueueFull, Running, Scheduler, SchedulerConfig


def rows(*max_lens: int, tenant: str = "default") -> list[Running]:
    return [Running(n, tenant) for n in max_lens]


def test_admits_in_arrival_order_up_to_row_limit() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_batch_tokens=10_000, max_queue=10))
    for i in range(5):
        s.add(f"r{i}", 10)
    assert s.admit(rows(10)) == ["r0", "r1"]  # one row already running
    assert s.admit(rows(10, 10, 10)) == []
    assert s.admit(rows()) == ["r2", "r3", "r4"]
    assert s.num_waiting == 0


def test_token_budget_counts_rows_times_longest() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=100, max_batch_tokens=1000, max_queue=10))
    s.add("short", 100)
    s.add("long", 400)
    s.add("short2", 100)
    # running: 1 row of 100. +short -> 2 x 100 = 200 ok; +long -> 3 x 400 = 1200 > 1000: stop (FIFO, no overtaking).
    assert s.admit(rows(100)) == ["short"]
    assert s.admit(rows(100)) == ["long"]  # 2 x 400 = 800
    assert s.admit(rows(100, 400)) == []  # 3 x 400 = 1200
    assert s.fits_alone(1000) and not s.fits_alone(1001)


def test_queue_bound_and_removal() -> None:
    s = Scheduler(SchedulerConfig(max_queue=2))
    s.add("a", 1)
    s.add("b", 1)
    with pytest.raises(QueueFull):
        s.add("c", 1)
    assert s.remove("a") and not s.remove("a")
    s.add("c", 1)
    assert s.admit(rows()) == ["b", "c"]


# ----- fairness across tenants -----------------------------------------------------------------


def test_round_robin_across_tenants() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=100, max_batch_tokens=10_000, max_queue=100))
    for i in range(6):
        s.add(f"a{i}", 10, "A")
    s.add("b0", 10, "B")
    s.add("b1", 10, "B")
    s.add("c0", 10, "C")
    assert s.admit(rows()) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_a_late_tenant_overtakes_a_flood_when_one_row_frees() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=10_000, max_queue=300))
    for i in range(200):
        s.add(f"a{i}", 10, "A")
    assert s.admit(rows()) == ["a0", "a1", "a2", "a3"]
    s.add("b0", 10, "B")
    # The first row that frees goes to B, which holds none, not to A, which holds the other three.
    assert s.admit(rows(10, 10, 10, tenant="A")) == ["b0"]
    assert s.admit(rows(10, 10, 10, tenant="A")) == ["a4"]
    assert s.waiting_for("B") == 0 and s.waiting_for("A") == 195


def test_turn_is_kept_by_a_head_that_does_not_fit() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=10, max_batch_tokens=1000, max_queue=10))
    s.add("big", 400, "A")
    s.add("small", 10, "B")
    # 2 running rows of 100: +big -> 3 x 400 = 1200 > 1000, so nothing is admitted, not even B's small one,
    # and A keeps its turn: big goes first once it fits.
    assert s.admit(rows(100, 100)) == []
    assert s.admit(rows(100)) == ["big"]  # 2 x 400 = 800; small would make it 3 x 400
    assert s.admit(rows(400)) == ["small"]


def test_reserved_queue_slots_are_for_tenants_other_than_the_one_with_the_most_waiting() -> None:
    s = Scheduler(SchedulerConfig(max_queue=4, reserved_queue=2))
    for i in range(4):  # a tenant alone has the whole queue
        s.add(f"a{i}", 1, "A")
    with pytest.raises(QueueFull, match="4 of them this tenant's"):
        s.add("a4", 1, "A")
    s.add("b0", 1, "B")  # the queue is full, but B is not the tenant flooding it
    s.add("c0", 1, "C")
    with pytest.raises(QueueFull, match="2 slots kept"):
        s.add("b1", 1, "B")  # the reserve is taken
    assert s.remove("a0") and s.remove("a1") and s.remove("a2")  # A 1, B 1, C 1: 3 waiting
    s.add("b1", 1, "B")
    with pytest.raises(QueueFull, match="2 of them"):
        s.add("b2", 1, "B")  # 4 waiting, and B now holds the most
    assert s.admit(rows()) == ["a3", "b0", "c0", "b1"]


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
    assert s.admit(rows()) == ["c0"] and s.num_waiting == 0
    s.add("d", 1)  # the default tenant
    assert s.waiting_for("default") == 1 and s.admit(rows()) == ["d"]


def test_the_tenant_with_fewest_running_rows_goes_first() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=6, max_batch_tokens=10_000, max_queue=100))
    for i in range(4):
        s.add(f"a{i}", 10, "A")
        s.add(f"b{i}", 10, "B")
    # A holds 3 rows, B 1: B takes free rows until it holds as many as A, then they alternate.
    running = rows(10, 10, 10, tenant="A") + rows(10, tenant="B")
    assert s.admit(running) == ["b0", "b1"]
    assert s.admit(running[:2] + rows(10, 10, tenant="B")) == ["a0", "b2"]  # 2 and 3 rows: A first, then a tie


# ----- prefill budget --------------------------------------------------------------------------


def test_prefill_budget_counts_padded_prompt_tokens() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=100, max_batch_tokens=100_000, max_queue=100, max_prefill_tokens=64))
    for i, n in enumerate([10, 20, 30, 5, 5, 5]):
        s.add(f"r{i}", 100, prefill_tokens=n)
    assert s.admit(rows()) == ["r0", "r1"]  # 2 x 20 = 40 fits; 3 x 30 = 90 > 64
    assert s.admit(rows()) == ["r2", "r3"]  # 2 x 30 = 60; a third row would pad to 3 x 30
    assert s.admit(rows()) == ["r4", "r5"]


def test_prefill_budget_always_admits_one() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=100, max_batch_tokens=100_000, max_queue=100, max_prefill_tokens=8))
    s.add("long", 100, prefill_tokens=500)
    s.add("short", 100, prefill_tokens=2)
    assert s.admit(rows()) == ["long"]  # over the budget alone, admitted alone: nothing starves
    assert s.admit(rows()) == ["short"]


def test_prefill_budget_zero_is_no_limit() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=100, max_batch_tokens=100_000, max_queue=100))
    for i in range(20):
        s.add(f"r{i}", 100, prefill_tokens=1000)
    assert len(s.admit(rows())) == 20


def test_prefill_budget_keeps_round_robin() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=100, max_batch_tokens=100_000, max_queue=100, max_prefill_tokens=20))
    for i in range(6):
        s.add(f"a{i}", 100, "A", prefill_tokens=10)
    s.add("b0", 100, "B", prefill_tokens=10)
    s.add("b1", 100, "B", prefill_tokens=10)
    steps, running = [], []
    while s.num_waiting:
        admitted = s.admit(running)
        steps.append(admitted)
        running += [Running(100, r[0].upper()) for r in admitted]
    assert steps == [["a0", "b0"], ["a1", "b1"], ["a2", "a3"], ["a4", "a5"]]


# ----- reserved rows ---------------------------------------------------------------------------


def test_reserved_rows_go_beyond_the_batch_to_tenants_not_holding_the_most_rows() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=10_000, max_queue=100, reserved_rows=1))
    for i in range(10):
        s.add(f"a{i}", 10, "A")
    assert s.admit(rows()) == ["a0", "a1", "a2", "a3"]  # A alone has the whole batch
    assert s.admit(rows(10, 10, 10, 10, tenant="A")) == []
    s.add("b0", 10, "B")
    s.add("b1", 10, "B")
    assert s.admit(rows(10, 10, 10, 10, tenant="A")) == ["b0"]  # B starts at once, in the reserved row
    # B's second request waits for a free row, and takes it before A, which holds more rows.
    assert s.admit(rows(10, 10, 10, 10, tenant="A") + rows(10, tenant="B")) == []
    assert s.admit(rows(10, 10, 10, tenant="A") + rows(10, tenant="B")) == ["b1"]


def test_a_tenant_holding_fewer_rows_may_use_the_reserved_rows() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=10_000, max_queue=100, reserved_rows=2))
    for i in range(3):
        s.add(f"a{i}", 10, "A")
        s.add(f"b{i}", 10, "B")
    # A holds 3 rows and B 1: B may fill the reserved rows (6 in all); A, holding the most, stops at 4.
    assert s.admit(rows(10, 10, 10, tenant="A") + rows(10, tenant="B")) == ["b0", "b1"]
    # A and B tie at 2 rows: both hold the most, so neither takes a reserved row.
    assert s.admit(rows(10, 10, tenant="A") + rows(10, 10, tenant="B")) == []
    assert s.admit(rows(10, tenant="A") + rows(10, 10, tenant="B")) == ["a0"]


def test_a_tenant_alone_gets_the_batch_and_no_more() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_batch_tokens=10_000, max_queue=10, reserved_rows=2))
    for i in range(5):
        s.add(f"a{i}", 10, "A")
    assert s.admit(rows()) == ["a0", "a1", "a2"]
    assert s.admit(rows(10, 10, 10, tenant="A")) == []
    assert s.admit(rows(10, 10, tenant="A")) == ["a3"]


def test_reserved_rows_stay_within_the_token_budget() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_batch_tokens=20, max_queue=10, reserved_rows=1))
    s.add("b0", 10, "B")
    assert s.admit(rows(10, 10, tenant="A")) == []  # a third row of 10 would need 30 token slots
