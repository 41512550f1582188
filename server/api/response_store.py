"""Responses kept for ``previous_response_id`` and GET/DELETE /v1/responses/{id} (OpenAI stores them unless
``store: false``): per tenant, in this process's memory, the least recently used dropped past a bound.

Each keeps its conversation as Responses items (the previous ones', its input, its output), so a request that
continues it reads exactly what that response's turn read, plus its own input. Kept in memory, a response is
known to the replica that made it only: behind a load balancer, clients that chain responses need sticky
sessions (or send the whole conversation as ``input``, which every replica serves).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# Responses kept per server (all tenants): a turn's items are text, a few KB each.
MAX_STORED_RESPONSES = 4096


@dataclass(frozen=True)
class StoredResponse:
    items: list[dict[str, Any]]  # the conversation up to and including this response's output
    response: dict[str, Any]  # the response object as it was returned


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._stored: OrderedDict[tuple[str, str], StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, tenant: str, response_id: str, stored: StoredResponse) -> None:
        with self._lock:
            self._stored[(tenant, response_id)] = stored
            self._stored.move_to_end((tenant, response_id))
            while len(self._stored) > self.capacity:
                self._stored.popitem(last=False)

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The tenant's response (None when unknown, another tenant's, deleted or dropped)."""
        with self._lock:
            stored = self._stored.get((tenant, response_id))
            if stored is not None:
                self._stored.move_to_end((tenant, response_id))
            return stored

    def delete(self, tenant: str, response_id: str) -> bool:
        with self._lock:
            return self._stored.pop((tenant, response_id), None) is not None

    def __len__(self) -> int:
        return len(self._stored)
