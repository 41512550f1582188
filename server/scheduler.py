"""Admission bookkeeping: which waiting requests join the running batch. Ids and numbers only, no tensors.

Waiting requests queue per tenant; admission takes the head of each tenant's
queue in turn (round-robin), so a tenant that floods the server delays the
others by at most one admission per turn, not by its whole backlog.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    # Bound on the batch's KV memory, in token slots: rows x longest row the batch may reach.
    max_batch_tokens: int = 65536
    max_queue: int = 256


class QueueFull(Exception):
    """The waiting queue is at capacity; the caller should retry later."""


class Scheduler:
    """Round-robin admission across tenants (FIFO within one) under a row limit and a token budget."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        # tenant -> (request id -> max length it can reach), each in arrival order
        self._queues: dict[str, OrderedDict[str, int]] = {}
        self._tenant_of: dict[str, str] = {}  # request id -> tenant, for every waiting request
        # Tenants with waiting requests; the first one is offered the next free row.
        self._turns: deque[str] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._tenant_of)

    def waiting_for(self, tenant: str) -> int:
        """How many of ``tenant``'s requests are waiting."""
        queue = self._queues.get(tenant)
        return 0 if queue is None else len(queue)

    def fits_alone(self, max_len: int) -> bool:
        return max_len <= self.config.max_batch_tokens

    def add(self, request_id: str, max_len: int, tenant: str = DEFAULT_TENANT) -> None:
        if len(self._tenant_of) >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests)")
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = OrderedDict()
            self._turns.append(tenant)  # a tenant that was idle waits behind those already waiting
        queue[request_id] = max_len
        self._tenant_of[request_id] = tenant

    def remove(self, request_id: str) -> bool:
        """Forget a waiting request (cancelled). False if it is not waiting."""
        tenant = self._tenant_of.pop(request_id, None)
        if tenant is None:
            return False
        queue = self._queues[tenant]
        del queue[request_id]
        if not queue:
            self._drop_tenant(tenant)
        return True

    def admit(self, running_max_lens: Iterable[int]) -> list[str]:
        """Pop the waiting requests that fit beside the running ones, one per tenant per turn.

        The head of the tenant whose turn it is either fits or stops admission: a
        large request is never overtaken forever, and its tenant keeps the turn.
        """
        lens = list(running_max_lens)
        rows, longest = len(lens), max(lens, default=0)
        admitted: list[str] = []
        while self._turns:
            tenant = self._turns[0]
            queue = self._queues[tenant]
            request_id, max_len = next(iter(queue.items()))
            new_longest = max(longest, max_len)
            if rows + 1 > self.config.max_batch_size or (rows + 1) * new_longest > self.config.max_batch_tokens:
                break
            admitted.append(request_id)
            rows, longest = rows + 1, new_longest
            del queue[request_id]
            del self._tenant_of[request_id]
            if queue:
                self._turns.rotate(-1)  # this tenant goes to the back of the line
            else:
                self._drop_tenant(tenant)
        return admitted

    def _drop_tenant(self, tenant: str) -> None:
        del self._queues[tenant]
        self._turns.remove(tenant)
