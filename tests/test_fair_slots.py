"""FairSlots: freed slots go to waiting owners in turn, and an owner holds at most its share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from prefix_store.fair_slots import FairSlots


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class _Holders:
    """Threads that each take a slot, note it, and hold it until told to let go."""

    def __init__(self, slots: FairSlots) -> None:
        self.slots = slots
        self.order: list[str] = []  # who got a slot, in order
        self._go: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []

    def start(self, owner: str, name: str) -> None:
        self._go[name] = threading.Event()

        def hold() -> None:
            with self.slots.slot(owner):
                self.order.append(name)
                assert self._go[name].wait(10)

        thread = threading.Thread(target=hold)
        thread.start()
        self._threads.append(thread)

    def let_go(self, name: str) -> None:
        self._go[name].set()

    def join(self) -> None:
        for event in self._go.values():
            event.set()
        for thread in self._threads:
            thread.join()


def test_freed_slots_go_to_owners_in_turn() -> None:
    holders = _Holders(FairSlots(1))
    holders.start("flood", "f0")
    _until(lambda: holders.order == ["f0"])
    for i in range(1, 4):
        holders.start("flood", f"f{i}")
        _until(lambda i=i: holders.slots.waiting() == i)
    holders.start("calm", "c0")
    _until(lambda: holders.slots.waiting() == 4)
    for name in ("f0", "f1", "c0", "f2"):
        _until(lambda name=name: name in holders.order)
        holders.let_go(name)
    holders.join()
    assert holders.order == ["f0", "f1", "c0", "f2", "f3"]


def test_an_owner_holds_at_most_its_share_while_others_take_the_rest() -> None:
    holders = _Holders(FairSlots(2, per_owner=1))
    holders.start("flood", "f0")
    holders.start("flood", "f1")
    _until(lambda: holders.slots.waiting() == 1)
    assert holders.order == ["f0"]  # the second slot is free, but not for flood
    holders.start("calm", "c0")
    _until(lambda: "c0" in holders.order)  # takes the free slot at once
    holders.let_go("f0")
    _until(lambda: "f1" in holders.order)
    holders.join()
    assert holders.order == ["f0", "c0", "f1"]
    assert holders.slots._free == 2 and not holders.slots._held


def test_capacity_and_share_must_be_positive() -> None:
    for bad in ({"capacity": 0}, {"capacity": 2, "per_owner": 0}):
        with pytest.raises(ValueError):
            FairSlots(**bad)
