"""Admission bookkeeping: which waiting requests join the running batch. Ids and numbers only, no tensors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    # Bound on the batch's KV memory, in token slots: rows x longest row the batch may reach.
    max_batch_tokens: int = 65536
    max_queue: int = 256


class QueueFull(Exception):
    """The waiting queue is at capacity; the caller should retry later."""


class Scheduler:
    """FIFO admission under a row limit and a token budget (rows x padded length)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: OrderedDict[str, int] = OrderedDict()  # request id -> max length it can reach

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def fits_alone(self, max_len: int) -> bool:
        return max_len <= self.config.max_batch_tokens

    def add(self, request_id: str, max_len: int) -> None:
        if len(self._waiting) >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests)")
        self._waiting[request_id] = max_len

    def remove(self, request_id: str) -> bool:
        """Forget a waiting request (cancelled). False if it is not waiting."""
        return self._waiting.pop(request_id, None) is not None

    def admit(self, running_max_lens: Iterable[int]) -> list[str]:
        """Pop, in arrival order, the waiting requests that fit beside the running ones."""
        lens = list(running_max_lens)
        rows, longest = len(lens), max(lens, default=0)
        admitted: list[str] = []
        for request_id, max_len in self._waiting.items():
            new_longest = max(longest, max_len)
            if rows + 1 > self.config.max_batch_size or (rows + 1) * new_longest > self.config.max_batch_tokens:
                break  # strict FIFO: a large request at the head is not overtaken forever
            admitted.append(request_id)
            rows, longest = rows + 1, new_longest
        for request_id in admitted:
            del self._waiting[request_id]
        return admitted
