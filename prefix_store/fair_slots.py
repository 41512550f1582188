"""A counting semaphore that hands freed slots to waiting owners in turn (round robin), not first come first served.

The registry loads prefixes from the store a few at a time. With a plain semaphore, a tenant that sends 200
requests for cold prefixes queues every other tenant's load behind all 200 of its own. Here each owner
(tenant) waits in its own line, and a freed slot goes to the next owner in the rotation: another tenant's
load waits for at most one load per tenant ahead of it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class FairSlots:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._lock = threading.Lock()
        self._free = capacity
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
            self._release()

    def waiting(self) -> int:
        with self._lock:
            return sum(len(line) for line in self._waiting.values())

    def _acquire(self, owner: Hashable) -> None:
        with self._lock:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                return
            handed_over = threading.Event()
            self._waiting.setdefault(owner, deque()).append(handed_over)
        handed_over.wait()  # _release gave us its slot: the count was not raised in between

    def _release(self) -> None:
        with self._lock:
            if not self._waiting:
                self._free += 1
                return
            owner, line = next(iter(self._waiting.items()))
            handed_over = line.popleft()
            if line:
                self._waiting.move_to_end(owner)
            else:
                del self._waiting[owner]
        handed_over.set()
