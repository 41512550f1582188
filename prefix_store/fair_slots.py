"""A counting semaphore that hands freed slots to waiting owners in turn (round robin), not first come first served.

The registry loads prefixes from the store a few at a time. With a plain semaphore, a tenant that sends 200
requests for cold prefixes queues every other tenant's load behind all 200 of its own. Here each owner
(tenant) waits in its own line, and a freed slot goes to the next owner in the rotation: another tenant's
load waits for at most one load per tenant ahead of it. With ``per_owner``, an owner also holds at most that many
slots at once, so it cannot take every slot while others wait (grammar compiles, which can each take minutes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class FairSlots:
    def __init__(self, capacity: int, per_owner: int | None = None) -> None:
        if capacity < 1 or (per_owner is not None and per_owner < 1):
            raise ValueError("capacity and per_owner must be at least 1")
        self._lock = threading.Lock()
        self._free = capacity
        self._per_owner = per_owner or capacity
        self._held: dict[Hashable, int] = {}  # slots each owner holds (owners holding none are not kept)
        # Waiting owners in rotation order, each with its waiters (oldest first); an owner that is handed a slot
        # moves to the back of the rotation.
        self._waiting: OrderedDict[Hashable, deque[threading.Event]] = OrderedDict()

    @contextmanager
    def slot(self, owner: Hashable) -> Iterator[None]:
        """Hold one slot for the block (waiting for the owner's turn if none is free)."""
        self._acquire(owner)
        try:
            yield
        finally:
            self._release(owner)

    def waiting(self) -> int:
        with self._lock:
            return sum(len(line) for line in self._waiting.values())

    def _acquire(self, owner: Hashable) -> None:
        with self._lock:
            # A free slot means no waiter could take it (releases hand slots to every one that can): take it.
            if self._free > 0 and self._held.get(owner, 0) < self._per_owner:
                self._take(owner)
                return
            handed_over = threading.Event()
            self._waiting.setdefault(owner, deque()).append(handed_over)
        handed_over.wait()  # a release took the slot for us (_take): the count was not raised in between

    def _release(self, owner: Hashable) -> None:
        with self._lock:
            self._held[owner] -= 1
            if not self._held[owner]:
                del self._held[owner]
            self._free += 1
            handed_over = []
            while self._free > 0 and (nxt := self._next_in_turn()) is not None:
                line = self._waiting[nxt]
                handed_over.append(line.popleft())
                if line:
                    self._waiting.move_to_end(nxt)
                else:
                    del self._waiting[nxt]
                self._take(nxt)
        for event in handed_over:
            event.set()

    def _next_in_turn(self) -> Hashable | None:
        """The first waiting owner in the rotation that may hold another slot (lock held)."""
        return next((o for o in self._waiting if self._held.get(o, 0) < self._per_owner), None)

    def _take(self, owner: Hashable) -> None:
        self._free -= 1
        self._held[owner] = self._held.get(owner, 0) + 1
