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


# Both scripts: a response's size no longer counted against its tenant (KEYS[3]: sizes, KEYS[4]: their sum).
_FORGET = """
local function forget(id)
  local size = redis.call('HGET', KEYS[3], id)
  if size then
    redis.call('DECRBY', KEYS[4], size)
    redis.call('HDEL', KEYS[3], id)
  end
end
"""

# KEYS: the response, the tenant's index (ZSET id -> expiry, ms), its sizes (HASH id -> bytes), their sum (STRING).
# ARGV: id, the response's JSON, TTL (ms), the tenant's count and byte bounds, this response's size, the prefix of
# response keys ("ps:{T}:resp:"), of item keys ("ps:{T}:item:"), then the ids of its items.
# Forgets what has expired, writes the response and its item pointers, then drops the tenant's oldest responses
# while it is past a bound. Returns the tenant's bytes after. Redis's clock, not the replicas': they may disagree.
_PUT_SCRIPT = (
    _FORGET
    + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do forget(id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
forget(ARGV[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], string.format('%.0f', now + ttl), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[6])
redis.call('INCRBY', KEYS[4], ARGV[6])
for i = 9, #ARGV do redis.call('SET', ARGV[8] .. ARGV[i], ARGV[1], 'PX', ttl) end
local count, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
while redis.call('ZCARD', KEYS[2]) > count or tonumber(redis.call('GET', KEYS[4]) or '0') > budget do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then
    redis.call('SET', KEYS[4], 0)  -- sizes of responses Redis evicted by itself: nothing left to drop
    break
  end
  redis.call('DEL', ARGV[7] .. oldest[1])
  forget(oldest[1])
end
for i = 2, 4 do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return tonumber(redis.call('GET', KEYS[4]) or '0')
"""
)

# KEYS: the response, the tenant's index, sizes and their sum. ARGV: the id. Returns the number of keys deleted.
_DELETE_SCRIPT = (
    _FORGET
    + """
local deleted = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
forget(ARGV[1])
return deleted
"""
)

# What an item pointer costs Redis beyond its key and value (its entry, expiry, allocation), counted against the
# tenant's bytes: a response of many tiny input items writes as many pointers.
_POINTER_OVERHEAD = 64


class RedisResponseStore:
    """Each tenant's responses in the Redis of the prefix store, expiring ``ttl_s`` after they were written, and
    within the same bounds per tenant as in memory (its oldest dropped first, never another tenant's):

        ps:{T}:resp:<id>     STRING  the response and its conversation (JSON), with a TTL
        ps:{T}:resps         ZSET    the tenant's response ids, scored by expiry (ms): the oldest is dropped first
        ps:{T}:resp-sizes    HASH    id -> bytes counted against the tenant (its JSON and its item pointers)
        ps:{T}:resp-bytes    STRING  their sum
        ps:{T}:item:<id>     STRING  the id of the last stored response that held this item (what an
                                     ``item_reference`` names), with the same TTL: a pointer, not a copy

    T = tenant: the hash tag keeps a tenant's keys in one Redis Cluster slot, so each write is one script. An item
    is found while the last response stored with it is (deleting that response makes its items unfindable, even
    where an earlier response held them too). Redis's own eviction (``maxmemory-policy volatile-lru``) still bounds
    all tenants together, dropping responses before it would drop a prefix (prefix keys have no TTL). Reads do not
    count as use here (in memory they do): the oldest written goes first. Redis unreachable: the backend's
    StoreUnavailable (503 with Retry-After), as for prefixes.
    """

    def __init__(
        self,
        backend: RedisBackend,
        ttl_s: int,
        capacity: int = MAX_STORED_RESPONSES,
        tenant_bytes: int = MAX_STORED_BYTES_PER_TENANT,
    ) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        self._backend = backend
        self.ttl_s = ttl_s
        self.capacity = capacity
        self.tenant_bytes = tenant_bytes
        self._put_script = backend.register_script(_PUT_SCRIPT)
        self._delete_script = backend.register_script(_DELETE_SCRIPT)

    @staticmethod
    def _tag(tenant: str) -> str:
        return f"ps:{{{validate_tenant(tenant)}}}"

    def _bookkeeping(self, tenant: str) -> list[str]:
        tag = self._tag(tenant)
        return [f"{tag}:resps", f"{tag}:resp-sizes", f"{tag}:resp-bytes"]

    def put(self, tenant: str, response_id: str, stored: StoredResponse) -> None:
        """The response and a pointer to it under each of its items' ids, then the tenant's bounds: one script,
        all keys in the tenant's slot."""
        tag = self._tag(tenant)
        document = _encode(stored)
        item_ids = list(
            dict.fromkeys(
                item["id"]
                for item in stored.items
                if isinstance(item.get("id"), str) and len(item["id"]) <= _MAX_ITEM_ID
            )
        )
        pointers = sum(len(f"{tag}:item:{i}") + len(response_id) + _POINTER_OVERHEAD for i in item_ids)
        size = len(document.encode()) + pointers
        if size > self.tenant_bytes:
            logger.warning(
                "response %s not kept: %d bytes, over the %d kept per tenant", response_id, size, self.tenant_bytes
            )
            return
        keys = [f"{tag}:resp:{response_id}", *self._bookkeeping(tenant)]
        args = [
            response_id,
            document,
            self.ttl_s * 1000,
            self.capacity,
            self.tenant_bytes,
            size,
            f"{tag}:resp:",
            f"{tag}:item:",
            *item_ids,
        ]
        self._backend.call("storing a response", lambda: self._put_script(keys=keys, args=args))

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        if not _RESPONSE_ID.fullmatch(response_id):
            return None
        key = f"{self._tag(tenant)}:resp:{response_id}"
        data = self._backend.call("reading a response", lambda: self._backend.client.get(key))
        return None if data is None else _decode(data)

    def delete(self, tenant: str, response_id: str) -> bool:
        if not _RESPONSE_ID.fullmatch(response_id):
            return False
        keys = [f"{self._tag(tenant)}:resp:{response_id}", *self._bookkeeping(tenant)]
        deleted = self._backend.call("deleting a response", lambda: self._delete_script(keys=keys, args=[response_id]))
        return bool(deleted)

    def find_items(self, tenant: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Two reads: the pointers, then the responses they name (each once)."""
        ids = [i for i in dict.fromkeys(item_ids) if len(i) <= _MAX_ITEM_ID]
        if not ids:
            return {}
        tag = self._tag(tenant)
        holders = self._backend.call(
            "reading items", lambda: self._backend.client.mget([f"{tag}:item:{i}" for i in ids])
        )
        wanted: dict[str, list[str]] = {}  # response id -> the item ids it is to give
        for item_id, holder in zip(ids, holders, strict=True):
            if holder is not None and _RESPONSE_ID.fullmatch(holder := holder.decode()):
                wanted.setdefault(holder, []).append(item_id)
        if not wanted:
            return {}
        keys = [f"{tag}:resp:{r}" for r in wanted]
        documents = self._backend.call("reading items", lambda: self._backend.client.mget(keys))
        found: dict[str, dict[str, Any]] = {}
        for item_ids_held, data in zip(wanted.values(), documents, strict=True):
            if data is None:  # deleted, expired or dropped since the pointer was written
                continue
            held = set(item_ids_held)
            for item in _decode(data).items:
                item_id = item.get("id")  # a client's input item may carry any JSON as its id
                if isinstance(item_id, str) and item_id in held:
                    found.setdefault(item_id, item)
        return found


def _decode(data: bytes | str) -> StoredResponse:
    document = json.loads(data)
    return StoredResponse(document["items"], document["response"])
