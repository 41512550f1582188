"""Responses kept for ``previous_response_id`` and GET/DELETE /v1/responses/{id} (OpenAI stores them unless
``store: false``), per tenant.

Each keeps its conversation as Responses items (the previous ones', its input, its output), so a request that
continues it reads exactly what that response's turn read, plus its own input: one read, however long the chain.

Where they live:

- with a Redis prefix store, in that Redis (``RedisResponseStore``), for ``--responses-ttl-s`` (default a day):
  every replica sharing the store knows every response, so a client may continue a response on any of them;
- otherwise (a disk store, or ``--responses-ttl-s 0``) in this process's memory (``MemoryResponseStore``), each
  tenant's least recently used dropped past its bounds: a response is known to the replica that made it only, and
  clients that chain responses behind a load balancer need sticky sessions (or send the whole conversation as
  ``input``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prefix_store.backends import RedisBackend
from prefix_store.ids import validate_tenant

logger = logging.getLogger(__name__)

# Kept in memory, per tenant: its most recently used responses, within a count and a byte budget (a tenant's
# responses never push out another's), and all tenants within a byte budget (admin keys may act for any tenant).
MAX_STORED_RESPONSES = 4096
MAX_STORED_BYTES_PER_TENANT = 64 << 20
MAX_STORED_BYTES = 1 << 30
# Items are found by id up to this long (ids are the client's for its input items; ours are ~28 characters).
_MAX_ITEM_ID = 128
# The ids this server gives responses ("resp_" and 24 hex digits); any other id names no stored response.
_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{24}")


@dataclass(frozen=True)
class StoredResponse:
    items: list[dict[str, Any]]  # the conversation up to and including this response's output
    response: dict[str, Any]  # the response object as it was returned


class ResponseStore(Protocol):
    """Blocking calls (a Redis round trip): the routes run them off the event loop."""

    def put(self, tenant: str, response_id: str, stored: StoredResponse) -> None: ...

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The tenant's response (None when unknown, another tenant's, deleted, expired or dropped)."""
        ...

    def delete(self, tenant: str, response_id: str) -> bool: ...

    def find_items(self, tenant: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The items of the tenant's stored responses with these ids (an ``item_reference`` names one), by id;
        ids no stored response holds are left out."""
        ...


class MemoryResponseStore:
    def __init__(
        self,
        capacity: int = MAX_STORED_RESPONSES,
        tenant_bytes: int = MAX_STORED_BYTES_PER_TENANT,
        total_bytes: int = MAX_STORED_BYTES,
    ) -> None:
        self.capacity = capacity  # responses per tenant
        self.tenant_bytes = tenant_bytes
        self.total_bytes = total_bytes
        # Least recently used first: (tenant, id) -> (response, its size as JSON).
        self._stored: OrderedDict[tuple[str, str], tuple[StoredResponse, int]] = OrderedDict()
        self._count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def put(self, tenant: str, response_id: str, stored: StoredResponse) -> None:
        size = len(_encode(stored))
        if size > self.tenant_bytes:
            logger.warning(
                "response %s not kept: %d bytes, over the %d kept per tenant", response_id, size, self.tenant_bytes
            )
            return
        with self._lock:
            self._drop((tenant, response_id))
            self._stored[(tenant, response_id)] = (stored, size)
            self._count[tenant] = self._count.get(tenant, 0) + 1
            self._bytes[tenant] = self._bytes.get(tenant, 0) + size
            while self._count[tenant] > self.capacity or self._bytes[tenant] > self.tenant_bytes:
                self._drop(next(key for key in self._stored if key[0] == tenant))
            while sum(self._bytes.values()) > self.total_bytes:
                self._drop(next(iter(self._stored)))

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._stored.get((tenant, response_id))
            if entry is None:
                return None
            self._stored.move_to_end((tenant, response_id))
            return entry[0]

    def delete(self, tenant: str, response_id: str) -> bool:
        with self._lock:
            return self._drop((tenant, response_id))

    def find_items(self, tenant: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        wanted, found = set(item_ids), {}
        with self._lock:
            for (owner, _), (stored, _) in reversed(self._stored.items()):  # the newest first
                if owner != tenant:
                    continue
                for item in stored.items:
                    item_id = item.get("id")  # a client's input item may carry any JSON as its id
                    if isinstance(item_id, str) and item_id in wanted:
                        found.setdefault(item_id, item)
                if len(found) == len(wanted):
                    break
        return found

    def _drop(self, key: tuple[str, str]) -> bool:
        entry = self._stored.pop(key, None)
        if entry is None:
            return False
        tenant = key[0]
        self._count[tenant] -= 1
        self._bytes[tenant] -= entry[1]
        if not self._count[tenant]:
            del self._count[tenant], self._bytes[tenant]
        return True

    def __len__(self) -> int:
        return len(self._stored)

    def bytes_of(self, tenant: str) -> int:
        return self._bytes.get(tenant, 0)


def _encode(stored: StoredResponse) -> str:
    return json.dumps({"items": stored.items, "response": stored.response}, separators=(",", ":"))


class RedisResponseStore:
    """One JSON string per response, ``ps:{T}:resp:<id>`` (T = tenant: the hash tag keeps a tenant's responses in
    one Redis Cluster slot, beside its listing index), expiring ``ttl_s`` after it was written; and each of its
    items under ``ps:{T}:item:<id>``, for as long (an item stays findable its TTL after the last response that
    held it was written, deleted or not).

    Bounded by the TTL, not a count: with ``maxmemory-policy volatile-lru`` Redis drops the least recently used
    responses first under memory pressure, and never a prefix (prefix keys have no TTL). Redis unreachable: the
    backend's StoreUnavailable (503 with Retry-After), as for prefixes.
    """

    def __init__(self, backend: RedisBackend, ttl_s: int) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        self._backend = backend
        self.ttl_s = ttl_s

    @staticmethod
    def _key(tenant: str, response_id: str) -> str:
        return f"ps:{{{validate_tenant(tenant)}}}:resp:{response_id}"

    def put(self, tenant: str, response_id: str, stored: StoredResponse) -> None:
        """The response, and each of its items under ``ps:{T}:item:<id>`` (what an ``item_reference`` names), for
        ``ttl_s``: one round trip, all keys in the tenant's slot."""
        pipe = self._backend.client.pipeline(transaction=False)
        pipe.set(self._key(tenant, response_id), _encode(stored), ex=self.ttl_s)
        for item in stored.items:
            item_id = item.get("id")
            if isinstance(item_id, str) and len(item_id) <= _MAX_ITEM_ID:
                pipe.set(self._item_key(tenant, item_id), json.dumps(item, separators=(",", ":")), ex=self.ttl_s)
        self._backend.call("storing a response", pipe.execute)

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        if not _RESPONSE_ID.fullmatch(response_id):
            return None
        key = self._key(tenant, response_id)
        data = self._backend.call("reading a response", lambda: self._backend.client.get(key))
        if data is None:
            return None
        document = json.loads(data)
        return StoredResponse(document["items"], document["response"])

    def delete(self, tenant: str, response_id: str) -> bool:
        if not _RESPONSE_ID.fullmatch(response_id):
            return False
        key = self._key(tenant, response_id)
        return bool(self._backend.call("deleting a response", lambda: self._backend.client.delete(key)))

    def find_items(self, tenant: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        ids = [i for i in dict.fromkeys(item_ids) if len(i) <= _MAX_ITEM_ID]
        if not ids:
            return {}
        keys = [self._item_key(tenant, i) for i in ids]
        values = self._backend.call("reading items", lambda: self._backend.client.mget(keys))
        return {i: json.loads(v) for i, v in zip(ids, values, strict=True) if v is not None}

    @staticmethod
    def _item_key(tenant: str, item_id: str) -> str:
        return f"ps:{{{validate_tenant(tenant)}}}:item:{item_id}"
