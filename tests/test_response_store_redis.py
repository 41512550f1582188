"""The Responses API's store in a real Redis: each tenant's responses bounded in count and bytes, as in memory (a
tenant's flood drops only its own), the bookkeeping kept true through expiry and deletes, and items found through
pointers to the response that holds them."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator

import pytest

from prefix_store.backends import RedisBackend
from server.api.response_store import RedisResponseStore, StoredResponse
from tests.redis_server import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def redis_server(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    return make_redis_server()


@pytest.fixture
def backend(redis_server: RedisServer) -> Iterator[RedisBackend]:
    backend = RedisBackend(redis_server.url)
    yield backend
    backend.close()


def rid(i: int) -> str:
    return f"resp_{i:024x}"


def response(i: int, size: int = 100, items: list[dict[str, object]] | None = None) -> StoredResponse:
    return StoredResponse(items or [{"role": "user", "content": "x" * size}], {"id": rid(i)})


def tenant_bytes(server: RedisServer, tenant: str) -> int:
    return int(server.client().get(f"ps:{{{tenant}}}:resp-bytes") or 0)


def test_a_tenants_flood_drops_only_its_own_oldest_responses(backend: RedisBackend, redis_server: RedisServer) -> None:
    store = RedisResponseStore(backend, ttl_s=60, capacity=3, tenant_bytes=1000)
    store.put("bob", rid(999), response(999))
    for i in range(10):
        store.put("alice", rid(i), response(i))
    assert [i for i in range(10) if store.get("alice", rid(i))] == [7, 8, 9]  # her newest 3
    assert store.get("bob", rid(999)) is not None
    for i in range(20, 23):
        store.put("alice", rid(i), response(i, size=400))  # ~450 bytes each: two fit in 1,000
    assert store.get("alice", rid(20)) is None and store.get("alice", rid(22)) is not None
    assert 0 < tenant_bytes(redis_server, "alice") <= 1000
    store.put("alice", rid(30), response(30, size=5000))  # over a tenant's budget alone: not kept
    assert store.get("alice", rid(30)) is None and store.get("alice", rid(22)) is not None
    client = redis_server.client()
    assert client.zcard("ps:{alice}:resps") == 2 and client.hlen("ps:{alice}:resp-sizes") == 2
    assert store.get("bob", rid(999)) is not None and store.get("bob", rid(22)) is None  # another tenant's


def test_deletes_and_expiry_give_the_tenants_bytes_back(backend: RedisBackend, redis_server: RedisServer) -> None:
    store = RedisResponseStore(backend, ttl_s=60, capacity=10, tenant_bytes=10_000)
    store.put("alice", rid(1), response(1))
    one = tenant_bytes(redis_server, "alice")
    store.put("alice", rid(2), response(2))
    store.put("alice", rid(2), response(2))  # written again: counted once
    assert tenant_bytes(redis_server, "alice") == 2 * one
    assert store.delete("alice", rid(1)) and not store.delete("alice", rid(1))
    assert tenant_bytes(redis_server, "alice") == one
    assert redis_server.client().pttl("ps:{alice}:resps") > 50_000  # bookkeeping expires with the responses

    short = RedisResponseStore(backend, ttl_s=1, capacity=10, tenant_bytes=10_000)
    short.put("carol", rid(3), response(3))
    time.sleep(1.2)
    assert short.get("carol", rid(3)) is None
    short.put("carol", rid(4), response(4))  # what expired is forgotten before the new one is counted
    assert tenant_bytes(redis_server, "carol") == one and redis_server.client().zcard("ps:{carol}:resps") == 1


def test_items_are_found_through_the_last_response_that_held_them(backend: RedisBackend) -> None:
    store = RedisResponseStore(backend, ttl_s=60)
    question = {"type": "message", "id": "msg_q", "role": "user", "content": "Hi"}
    answer = {"type": "message", "id": "msg_a", "role": "assistant", "content": "Hello"}
    odd = {"type": "message", "id": ["not", "a", "string"], "role": "user", "content": "?"}
    store.put("alice", rid(1), response(1, items=[question, odd]))
    store.put("alice", rid(2), response(2, items=[question, odd, answer]))  # continues the first
    assert store.find_items("alice", ["msg_q", "msg_a", "msg_x"]) == {"msg_q": question, "msg_a": answer}
    assert store.find_items("bob", ["msg_q"]) == {}  # another tenant's
    # A pointer is a response id, not a copy: the item's bytes are stored once per response.
    assert backend.client.get("ps:{alice}:item:msg_q") == rid(2).encode()
    store.delete("alice", rid(2))
    assert store.find_items("alice", ["msg_q", "msg_a"]) == {}  # its last holder is gone
