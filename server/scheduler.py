"""Admission bookkeeping: which waiting requests join the running batch. Ids and numbers only, no tensors.

Waiting requests queue per tenant. When rows are scarce, the tenant holding the fewest running rows is offered
the next one (ties go round-robin), so a tenant that floods the server delays the others by at most one freed
row, not by its whole backlog. ``reserved_rows`` are rows beyond ``max_batch_size`` that the tenant holding the
most rows may not take: while one tenant fills the batch, another tenant's request starts at the next step
instead of waiting for one of the flood's rows to finish, and a tenant alone still has the whole batch.
``reserved_queue`` does the same for waiting slots beyond ``max_queue``: a flood that fills the queue leaves other
tenants room to queue. A
per-step prefill budget spreads a burst of newcomers over several steps, so running streams never stall for all
of them at once.
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
    # Prompt tokens one step may prefill, padding included (rows x longest prompt); 0 = no limit.
    # The first request of a step is admitted whatever its size, so no prompt starves.
    max_prefill_tokens: int = 0
    # Rows beyond max_batch_size that the tenant holding the most running rows may not take, so that another
    # tenant's request starts at once while one tenant fills the batch.
    reserved_rows: int = 0
    # Waiting slots beyond max_queue that the tenant with the most waiting requests may not take: while one tenant
    # fills the queue, another's request still queues (and is admitted first: it holds fewer rows) instead of 429.
    reserved_queue: int = 0
    # Prompt tokens fused into one decode step (chunked prefill, server/fused_step.py): admitted requests enter
    # the batch chunk by chunk inside decode steps instead of in a prefill forward of their own. 0 = off.
    # Only for runners that can (``ModelRunner.fuses_prefill``); others always prefill separately.
    prefill_chunk_tokens: int = 0
    # With chunks: while every prefilling prompt can still finish within this many seconds of its submission,
    # steps carry fewer prompt tokens than ``prefill_chunk_tokens`` (server/prefill_pacing.py). 0 = off.
    prefill_deadline_s: float = 0.0
    # With fused steps, the running rows are kept in up to this many padded groups of similar lengths, so that
    # less of their KV is padding (server/kv_groups.py). Without fused steps there is always one.
    kv_groups: int = 1


@dataclass(frozen=True)
class Running:
    """One running row, as admission sees it."""

    max_len: int  # KV slots the row may reach
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class _Waiting:
    max_len: int
    prefill_tokens: int


class QueueFull(Exception):
    """The waiting queue is at capacity; the caller should retry later."""


class Scheduler:
    """Fewest-rows-first admission across tenants (FIFO within one) under row, token and prefill budgets."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        # tenant -> (request id -> its needs), each in arrival order
        self._queues: dict[str, OrderedDict[str, _Waiting]] = {}
        self._tenant_of: dict[str, str] = {}  # request id -> tenant, for every waiting request
        # Tenants with waiting requests, in turn order: ties on running rows go to the earliest.
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

    def add(self, request_id: str, max_len: int, tenant: str = DEFAULT_TENANT, prefill_tokens: int = 1) -> None:
        """Queue a request that may reach ``max_len`` KV slots and whose prompt is ``prefill_tokens`` long."""
        waiting = len(self._tenant_of)
        if waiting >= self.config.max_queue:
            mine = self.waiting_for(tenant)
            holds_most = mine > 0 and mine == max(len(queue) for queue in self._queues.values())
            if holds_most:
                raise QueueFull(f"the queue is full ({waiting} waiting requests, {mine} of them this tenant's)")
            if waiting >= self.config.max_queue + self.config.reserved_queue:
                raise QueueFull(
                    f"the queue is full ({waiting} waiting requests, with the {self.config.reserved_queue} slots kept"
                    " for tenants other than the one with the most waiting)"
                )
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = OrderedDict()
            self._turns.append(tenant)  # a tenant that was idle waits behind those already waiting
        queue[request_id] = _Waiting(max_len, prefill_tokens)
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

    def admit(self, running: Iterable[Running]) -> list[str]:
        """Pop the waiting requests that join the running ones this step.

        Each turn goes to the waiting tenant with the fewest running rows (the earliest
        in turn order on a tie), which then goes to the back of the line. That tenant's
        head either fits or stops admission for this step: a large request is never
        overtaken forever, and its tenant keeps the turn.
        """
        config = self.config
        rows_of: dict[str, int] = {}
        rows = longest = 0
        for row in running:
            rows_of[row.tenant] = rows_of.get(row.tenant, 0) + 1
            rows, longest = rows + 1, max(longest, row.max_len)
        admitted: list[str] = []
        widest_prompt = 0
        while self._turns:
            tenant = min(self._turns, key=lambda t: rows_of.get(t, 0))  # min keeps the earliest on a tie
            queue = self._queues[tenant]
            request_id, need = next(iter(queue.items()))
            new_longest = max(longest, need.max_len)
            new_widest = max(widest_prompt, need.prefill_tokens)
            held = rows_of.get(tenant, 0)
            holds_most = held > 0 and held == max(rows_of.values())  # ties: each of them holds the most
            row_limit = config.max_batch_size + (0 if holds_most else config.reserved_rows)
            if rows + 1 > row_limit or (rows + 1) * new_longest > config.max_batch_tokens:
                break
            over_prefill = 0 < config.max_prefill_tokens < (len(admitted) + 1) * new_widest
            if admitted and over_prefill:
                break
            admitted.append(request_id)
            rows, longest, widest_prompt = rows + 1, new_longest, new_widest
            rows_of[tenant] = rows_of.get(tenant, 0) + 1
            del queue[request_id]
            del self._tenant_of[request_id]
            self._turns.remove(tenant)
            if queue:
                self._turns.append(tenant)  # this tenant goes to the back of the line
            else:
                del self._queues[tenant]
        return admitted

    def _drop_tenant(self, tenant: str) -> None:
        del self._queues[tenant]
        self._turns.remove(tenant)
