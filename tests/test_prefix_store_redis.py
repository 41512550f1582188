"""The Redis backend and the registry's replica/fault behaviour, against real redis-server processes.

Each test starts its own redis-server on a free loopback port; fault tests
kill (or stop) and restart it on the same port.
"""

from __future__ import annotations

import gc
import re
import shutil
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from prefix_store.artifact import decode_artifact
from prefix_store.backends import Invalidation, RedisBackend, open_backend
from prefix_store.backends import redis as redis_backend_module
from prefix_store.backends.redis_url import redact_url
from prefix_store.errors import CorruptPrefix, PrefixNotFound, PrefixStoreError, StoreUnavailable
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.registry import PrefixRegistry
from tests.redis_server import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

FP = ModelFingerprint("llama", num_layers=2, num_kv_heads=2, head_dim=8, vocab_size=128)
PASSWORD = "sekrit-pw"


def make_kv(p: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(FP.num_layers, 2, FP.num_kv_heads, p, FP.head_dim, generator=g)  # [L, 2, H, P, d]


@pytest.fixture
def server(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    return make_redis_server()


@pytest.fixture
def open_registry() -> Iterator[Callable[..., PrefixRegistry]]:
    """Registries on their own RedisBackend each (as separate replicas would have), closed afterwards."""
    backends: list[RedisBackend] = []

    def make(url: str, backend_cls: type[RedisBackend] = RedisBackend, **kwargs: object) -> PrefixRegistry:
        backend = backend_cls(url)
        backends.append(backend)
        return PrefixRegistry(backend, FP, max_virtual_tokens=16, **kwargs)  # type: ignore[arg-type]

    yield make
    for backend in backends:
        backend.close()


@pytest.fixture
def backend(server: RedisServer) -> Iterator[RedisBackend]:
    b = RedisBackend(server.url)
    yield b
    b.close()


def eventually(check: Callable[[], bool], within: float) -> float:
    """Poll `check` until it holds; the seconds it took. Fails after `within` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within} s")
        time.sleep(0.01)
    return time.monotonic() - start


def _version_or_none(registry: PrefixRegistry, task_id: str) -> int | None:
    try:
        return registry.resolve("acme", task_id).metadata.version
    except PrefixNotFound:
        return None


def _commandstats(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()}


# -- the backend ----------------------------------------------------------------


def test_versions_pruning_and_delete(backend: RedisBackend, server: RedisServer) -> None:
    def blob(v: int) -> bytes:
        return f"blob-{v}".encode()

    assert [backend.put("acme", "sum", blob) for _ in range(7)] == list(range(1, 8))
    assert backend.latest_version("acme", "sum") == 7
    assert backend.get("acme", "sum") == b"blob-7"
    assert [backend.get("acme", "sum", v) for v in range(3, 8)] == [blob(v) for v in range(3, 8)]
    for pruned in (1, 2):  # only the newest 5 are kept
        with pytest.raises(PrefixNotFound):
            backend.get("acme", "sum", pruned)
    assert backend.list_tasks("acme") == ["sum"] and backend.list_tasks("other") == []
    # Each version's blob is a string key of its own; pruning removed those of v1 and v2.
    blob_keys = sorted(k.decode() for k in server.client().scan_iter("ps:{acme/sum}:v:*"))
    assert blob_keys == [f"ps:{{acme/sum}}:v:{v}" for v in range(3, 8)]
    assert backend.delete("acme", "sum") is True
    assert backend.delete("acme", "sum") is False
    assert backend.latest_version("acme", "sum") is None and backend.list_tasks("acme") == []
    with pytest.raises(PrefixNotFound):
        backend.get("acme", "sum")
    # Numbers are never reused after a delete, so another replica's cached v7 cannot pass for a new upload.
    assert backend.put("acme", "sum", blob) == 8
    # Every key of the task carries the {tenant/task} hash tag (one Cluster slot); the index is per tenant.
    keys = sorted(k.decode() for k in server.client().scan_iter())
    assert keys == [f"ps:{{acme/sum}}:{s}" for s in ("head", "latest", "seq", "v:8")] + ["ps:{acme}:tasks"]


def test_a_lost_version_counter_never_hands_out_a_stored_number(
    backend: RedisBackend, server: RedisServer, open_registry: Callable[..., PrefixRegistry]
) -> None:
    """The counter evicted (an allkeys-* maxmemory-policy) or edited: INCR would restart at 1, and the upload would
    overwrite a kept version, or be pruned at once as the oldest, or never become the latest (all seen: 201s whose
    prefix was never served). Numbers resume above what is stored."""
    registry = open_registry(server.url)
    for seed in range(3):
        registry.upload("acme", "sum", make_kv(seed=seed))
    client = server.client()
    client.delete(backend._task_keys("acme", "sum")[0])  # its :seq key
    assert registry.upload("acme", "sum", make_kv(seed=9)).version == 4
    assert torch.equal(registry.resolve("acme", "sum").key_values, make_kv(seed=9))
    assert torch.equal(registry.resolve("acme", "sum", version=1).key_values, make_kv(seed=0))  # not overwritten
    for _ in range(6):  # more than are kept: the oldest go
        backend.put("acme", "many", lambda v: f"blob-{v}".encode())
    client.delete(backend._task_keys("acme", "many")[0])
    client.delete(backend._task_keys("acme", "many")[1])  # and the latest pointer: the stored versions still count
    assert backend.put("acme", "many", lambda v: f"blob-{v}".encode()) == 7
    assert backend.get("acme", "many") == b"blob-7"


def test_a_task_whose_key_has_the_wrong_type_is_left_out_of_the_listing(
    backend: RedisBackend, server: RedisServer, open_registry: Callable[..., PrefixRegistry]
) -> None:
    """A key edited by hand into another type spoils its own task: the listing goes on without it (it was a 503 for
    the whole tenant, and so for every upload under a storage quota, which lists)."""
    registry = open_registry(server.url)
    for task in ("good", "bad"):
        registry.upload("acme", task, make_kv(seed=1))
    server.client().set(backend._task_keys("acme", "bad")[2], "not a hash")  # its :head
    assert [m.task_id for m in registry.list("acme")] == ["good"]


def test_an_unreadable_latest_pointer_is_a_store_error_and_an_upload_mends_it(
    backend: RedisBackend, server: RedisServer, open_registry: Callable[..., PrefixRegistry]
) -> None:
    registry = open_registry(server.url, latest_ttl=0.0)
    registry.upload("acme", "sum", make_kv(seed=1))
    server.client().set(backend._task_keys("acme", "sum")[1], "abc")  # was a ValueError: a 500
    with pytest.raises(PrefixStoreError):
        registry.resolve("acme", "sum")
    with pytest.raises(CorruptPrefix, match="latest-version pointer"):
        backend.latest_version("acme", "sum")
    assert registry.upload("acme", "sum", make_kv(seed=2)).version == 2
    assert torch.equal(registry.resolve("acme", "sum").key_values, make_kv(seed=2))


def test_reader_never_sees_a_pointer_without_its_blob(backend: RedisBackend) -> None:
    registry = PrefixRegistry(backend, FP, max_virtual_tokens=16)
    registry.upload("acme", "sum", make_kv(seed=0))
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def reader() -> None:
        try:
            while not stop.is_set():
                before = backend.latest_version("acme", "sum")
                blob = backend.get("acme", "sum")  # raises PrefixNotFound if the pointer ran ahead of the blob
                after = backend.latest_version("acme", "sum")
                meta = decode_artifact(blob).metadata
                assert before is not None and after is not None and before <= meta.version <= after
                reads[0] += 1
        except BaseException as e:
            errors.append(e)

    def writer(seed: int) -> None:
        for i in range(10):
            registry.upload("acme", "sum", make_kv(seed=seed * 100 + i))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[0]
    assert reads[0] > 0 and backend.latest_version("acme", "sum") == 41


def test_listing_uses_the_index_not_keys(backend: RedisBackend, server: RedisServer) -> None:
    registry = PrefixRegistry(backend, FP, max_virtual_tokens=16)
    for task in ("b", "a", "c"):
        registry.upload("acme", task, make_kv())
    registry.upload("umbrella", "z", make_kv())
    client = server.client()
    client.sadd("ps:{acme}:tasks", "ghost")  # an index entry whose task has no versions (an interrupted put)
    assert backend.list_tasks("acme") == ["a", "b", "c"]
    cold = PrefixRegistry(RedisBackend(server.url), FP)
    assert [(m.task_id, m.version) for m in cold.list("acme")] == [("a", 1), ("b", 1), ("c", 1)]
    stats = _commandstats(client)
    assert "keys" not in stats and "scan" not in stats and "sscan" in stats
    cold.backend.close()


def test_listing_reads_the_latest_headers_in_batched_round_trips(
    backend: RedisBackend, server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = PrefixRegistry(backend, FP, max_virtual_tokens=16)
    tasks = [f"t{i}" for i in range(10)]
    for task in tasks:
        registry.upload("acme", task, make_kv())
    registry.upload("acme", "t3", make_kv(seed=1))  # a second version: the latest is listed
    server.client().hset("ps:{acme/t7}:head", "1", b"not a header")  # unreadable: skipped, with a warning
    batches: list[int] = []
    real_execute = redis.client.Pipeline.execute

    def counting_execute(self: redis.client.Pipeline, *args: object, **kwargs: object) -> object:
        batches.append(len(self.command_stack))
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(redis_backend_module, "_LIST_BATCH", 4)
    monkeypatch.setattr(redis.client.Pipeline, "execute", counting_execute)
    headers = backend.latest_headers("acme", [*tasks, "ghost"])  # "ghost" has no version (deleted meanwhile)
    assert batches == [4, 4, 3] and sorted(headers) == sorted(tasks)
    cold = PrefixRegistry(RedisBackend(server.url), FP)
    listed = cold.list("acme")
    assert [(m.task_id, m.version) for m in listed] == [(t, 2 if t == "t3" else 1) for t in tasks if t != "t7"]
    cold.backend.close()


def test_listing_reads_headers_not_blobs(backend: RedisBackend, server: RedisServer) -> None:
    PrefixRegistry(backend, FP, max_virtual_tokens=16).upload("acme", "sum", make_kv(p=16))
    cold_backend = RedisBackend(server.url)
    cold = PrefixRegistry(cold_backend, FP)
    client = server.client()
    client.config_resetstat()
    assert cold.info("acme", "sum").num_virtual_tokens == 16
    # The header is a few hundred bytes; the blob would be > 2 KiB of tensors.
    assert client.info("stats")["total_net_output_bytes"] < 2048
    cold_backend.close()


@pytest.mark.parametrize("offset", [-1, 20])  # a tensor byte; a header byte
def test_corrupt_blob_is_never_served(backend: RedisBackend, server: RedisServer, offset: int) -> None:
    PrefixRegistry(backend, FP, max_virtual_tokens=16).upload("acme", "sum", make_kv())
    client = server.client()
    data = bytearray(client.get("ps:{acme/sum}:v:1"))  # type: ignore[arg-type]
    data[offset] ^= 0x5A
    client.set("ps:{acme/sum}:v:1", bytes(data))
    cold = PrefixRegistry(backend, FP)
    for _ in range(2):  # and not cached after the first failure
        with pytest.raises(CorruptPrefix):
            cold.resolve("acme", "sum")


def test_single_flight_with_redis(backend: RedisBackend, server: RedisServer) -> None:
    PrefixRegistry(backend, FP, max_virtual_tokens=16).upload("acme", "sum", make_kv(p=16))
    cold = PrefixRegistry(RedisBackend(server.url), FP)
    client = server.client()
    opens_before = _commandstats(client).get("strlen", 0)
    barrier = threading.Barrier(8)
    results: list[torch.Tensor] = []

    def worker() -> None:
        barrier.wait()
        results.append(cold.resolve("acme", "sum").key_values)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert _commandstats(client)["strlen"] - opens_before == 1  # one blob read for eight requests
    cold.backend.close()


def test_store_url_and_password_never_shown(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(password=PASSWORD)
    backend = open_backend(server.url)
    assert isinstance(backend, RedisBackend) and PASSWORD not in backend.describe()
    assert backend.put("acme", "sum", lambda v: b"x") == 1
    wrong = RedisBackend(server.url.replace(PASSWORD, "wrong-pw"))
    with pytest.raises(StoreUnavailable) as e:
        wrong.latest_version("acme", "sum")
    assert "wrong-pw" not in str(e.value) and "***" in str(e.value)
    backend.close()
    wrong.close()
    # A password given as a query parameter (redis-py reads it there too) is hidden as well.
    query = RedisBackend(f"redis://127.0.0.1:{server.port}/0?password=wrong-q%40pw")
    assert "wrong-q" not in query.describe() and "password=***" in query.describe()
    with pytest.raises(StoreUnavailable) as e:
        query.latest_version("acme", "sum")
    assert "wrong-q" not in str(e.value) and "password=***" in str(e.value)
    query.close()


def test_urls_are_shown_as_written_but_for_their_passwords() -> None:
    cases = {
        "disk:///var/lib/prefixes": "disk:///var/lib/prefixes",  # rebuilt by urlunsplit it would be disk:/var/...
        "redis://h:6379/0": "redis://h:6379/0",
        "redis://:pw@h:6379/0": "redis://:***@h:6379/0",
        "rediss://app:pw@[::1]:6380/0?ssl_ca_certs=/ca.pem": "rediss://app:***@[::1]:6380/0?ssl_ca_certs=/ca.pem",
        "redis://h:6379/0?username=app&password=pw": "redis://h:6379/0?username=app&password=***",
        "redis+cluster://app:pw@h1:7000,h2:7001": "redis+cluster://app:***@h1:7000,h2:7001",
    }
    assert {url: redact_url(url) for url in cases} == cases


def test_an_acl_user_without_info_is_accepted(server: RedisServer) -> None:
    """The startup check asks INFO whether the server is a Cluster node; a user not allowed INFO still gets in."""
    server.client().execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "~*", "&*", "+@all", "-info")
    backend = open_backend(f"redis://app:app-pw@127.0.0.1:{server.port}/0")
    with pytest.raises(redis.exceptions.NoPermissionError):
        backend.client.info("cluster")
    backend.check()  # no ValueError: the store is usable
    assert backend.put("acme", "sum", lambda v: b"x") == 1
    backend.close()


def test_a_store_that_evicts_keys_is_warned_of(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """allkeys-* policies evict prefixes' keys one by one (a blob without its header, a lost counter): warned of at
    startup; noeviction (the default) and volatile-* are quiet."""
    client = server.client()
    for policy, warned in (("noeviction", False), ("volatile-lru", False), ("allkeys-lru", True)):
        client.config_set("maxmemory-policy", policy)
        caplog.clear()
        backend = open_backend(server.url)
        backend.check()
        backend.close()
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(said) == warned, (policy, said)
    assert "maxmemory-policy allkeys-lru" in said[0] and "noeviction" in said[0]


def test_a_dropped_registry_is_not_kept_alive_by_its_backend(backend: RedisBackend) -> None:
    registry = PrefixRegistry(backend, FP)
    ref = weakref.ref(registry)
    del registry
    gc.collect()
    assert ref() is None


# -- replicas ---------------------------------------------------------------------


class DeafRedisBackend(RedisBackend):
    """A replica that misses every invalidation message."""

    def subscribe(self, callback: Callable[[Invalidation], None]) -> None:
        pass


def test_replicas_see_uploads_and_deletes_via_pubsub(
    server: RedisServer, open_registry: Callable[..., PrefixRegistry]
) -> None:
    a = open_registry(server.url)
    # A long latest-version window: only the invalidation message can tell B in time.
    b = open_registry(server.url, latest_ttl=60.0)
    assert isinstance(b.backend, RedisBackend) and b.backend.wait_subscribed(5)
    a.upload("acme", "sum", make_kv(seed=1))
    assert eventually(lambda: _version_or_none(b, "sum") == 1, within=1.0) < 1.0
    a.upload("acme", "sum", make_kv(seed=2))
    eventually(lambda: _version_or_none(b, "sum") == 2, within=1.0)
    assert torch.equal(b.resolve("acme", "sum").key_values, make_kv(seed=2))
    # The superseded version is dropped when B hears of version 2, within the same second. Not necessarily
    # before B sees version 2: the first upload's message, arriving late, can make B ask the store early.
    eventually(lambda: ("acme", "sum", 1) not in b.cached_keys(), within=1.0)
    a.delete("acme", "sum")
    eventually(lambda: _version_or_none(b, "sum") is None, within=1.0)
    assert b.cached_keys() == []


def test_missed_messages_are_caught_by_the_version_check(
    server: RedisServer, open_registry: Callable[..., PrefixRegistry]
) -> None:
    a = open_registry(server.url)
    b = open_registry(server.url, DeafRedisBackend)  # default latest_ttl (0.5 s)
    a.upload("acme", "sum", make_kv(seed=1))
    assert b.resolve("acme", "sum").metadata.version == 1
    a.upload("acme", "sum", make_kv(seed=2))
    eventually(lambda: _version_or_none(b, "sum") == 2, within=1.0)
    a.delete("acme", "sum")
    eventually(lambda: _version_or_none(b, "sum") is None, within=1.0)
    assert b.cached_keys() == []  # learning of the delete also frees the cached copies


# -- faults -------------------------------------------------------------------------


def test_redis_down_and_back(
    make_redis_server: Callable[..., RedisServer], open_registry: Callable[..., PrefixRegistry]
) -> None:
    server = make_redis_server(persistent=True, password=PASSWORD)
    a = open_registry(server.url)
    b = open_registry(server.url, latest_ttl=0.05)
    events: list[Invalidation] = []
    assert isinstance(b.backend, RedisBackend)
    b.backend.subscribe(events.append)
    a.upload("acme", "hot", make_kv(seed=1))
    a.upload("acme", "cold", make_kv(seed=2))
    assert b.resolve("acme", "hot").metadata.version == 1  # now resident on B

    seen_before_outage = len(events)
    server.kill()
    time.sleep(0.1)  # past B's latest-version window, so B has to ask the (dead) store
    for _ in range(3):
        assert torch.equal(b.resolve("acme", "hot").key_values, make_kv(seed=1))
    assert b.stats()["store_fallbacks"] >= 1 and b.stats()["store_errors"] >= 1  # prefix_serve_store_*_total
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as cold_error:
        b.resolve("acme", "cold")
    assert time.monotonic() - started < 2.0
    assert PASSWORD not in str(cold_error.value)
    errors = b.stats()["store_errors"]
    for _ in range(5):  # refused inside the circuit's second without asking the store: each still counted
        with pytest.raises(StoreUnavailable):
            b.resolve("acme", "cold")
    assert b.stats()["store_errors"] == errors + 5
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        b.upload("acme", "new", make_kv(seed=3))
    assert time.monotonic() - started < 2.0
    with pytest.raises(StoreUnavailable):
        b.list("acme")

    server.start()  # same port, same data (AOF)
    # The failed upload left nothing behind.
    assert b.backend.latest_version("acme", "new") is None
    assert [m.task_id for m in b.list("acme")] == ["cold", "hot"]
    # Same registries, no restart: reads and writes work again.
    assert torch.equal(b.resolve("acme", "cold").key_values, make_kv(seed=2))
    assert b.upload("acme", "new", make_kv(seed=3)).version == 1
    # The subscriber reconnects by itself and announces that messages may have been missed.
    eventually(lambda: Invalidation(None, None, None) in events[seen_before_outage:], within=5.0)
    a.upload("acme", "hot", make_kv(seed=4))
    eventually(lambda: Invalidation("acme", "hot", 2) in events, within=1.0)


@pytest.mark.parametrize("loss", ["restarted empty", "flushed"])
def test_a_version_number_handed_out_again_never_serves_the_old_content(
    make_redis_server: Callable[..., RedisServer], open_registry: Callable[..., PrefixRegistry], loss: str
) -> None:
    """A store that loses its data hands version numbers out again: B, holding v1's old content, must serve the
    new upload under the same number (it did not, for as long as v1 stayed cached)."""
    server = make_redis_server()  # no AOF: a restart comes back empty
    a = open_registry(server.url)
    b = open_registry(server.url)
    events: list[Invalidation] = []
    assert isinstance(b.backend, RedisBackend) and b.backend.wait_subscribed(5)
    b.backend.subscribe(events.append)
    a.upload("acme", "sum", make_kv(seed=1))
    assert torch.equal(b.resolve("acme", "sum").key_values, make_kv(seed=1))  # resident on B
    heard = len(events)
    if loss == "flushed":
        server.client().flushdb()
    else:
        server.kill()
        server.start()
        eventually(lambda: Invalidation(None, None, None) in events[heard:], within=5.0)  # B reconnected
    assert a.upload("acme", "sum", make_kv(p=6, seed=2)).version == 1  # the same number, other content
    eventually(lambda: torch.equal(b.resolve("acme", "sum").key_values, make_kv(p=6, seed=2)), within=1.0)
    assert b.info("acme", "sum").num_virtual_tokens == 6
    # A's own copy of what it uploaded is checked once, not reloaded.
    misses = a.misses
    assert torch.equal(a.resolve("acme", "sum").key_values, make_kv(p=6, seed=2)) and a.misses == misses


def test_a_store_replaced_in_place_without_a_message_is_noticed(
    make_redis_server: Callable[..., RedisServer], open_registry: Callable[..., PrefixRegistry]
) -> None:
    """A Redis demoted in place to a replica of another copy (an old primary rejoining after a failover) swaps its
    data under open connections: no reconnect, no message. The check on use compares the latest version's
    content, not its number, so the replaced bytes stop being served within the check's period."""
    ours, other = make_redis_server(), make_redis_server()
    registry = open_registry(ours.url, latest_ttl=0.2)
    writer = open_registry(other.url)
    for seed in (1, 2, 3):
        registry.upload("acme", "sum", make_kv(seed=seed))
        writer.upload("acme", "sum", make_kv(seed=10 + seed))  # the same numbers, other content
    assert torch.equal(registry.resolve("acme", "sum").key_values, make_kv(seed=3))  # v3, resident
    ours.client().execute_command("REPLICAOF", "127.0.0.1", str(other.port))
    eventually(lambda: ours.client().info("replication")["master_link_status"] == "up", within=10.0)
    eventually(lambda: torch.equal(registry.resolve("acme", "sum").key_values, make_kv(seed=13)), within=1.0)
    assert registry.resolve("acme", "sum").metadata.version == 3
    assert registry.info("acme", "sum").sha256 == writer.info("acme", "sum").sha256


def test_write_interrupted_by_a_crash_leaves_nothing_partial(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(persistent=True)
    backend = RedisBackend(server.url)
    backend.put("acme", "sum", lambda v: b"v1")

    def encode_and_crash(version: int) -> bytes:
        server.kill()  # Redis dies after the version number is allocated, before the write
        return b"never stored"

    with pytest.raises(StoreUnavailable):
        backend.put("acme", "half", encode_and_crash)
    with pytest.raises(StoreUnavailable):
        backend.put("acme", "sum", lambda v: b"v2")
    server.start()
    assert backend.latest_version("acme", "half") is None
    with pytest.raises(PrefixNotFound):
        backend.get("acme", "half")
    assert backend.list_tasks("acme") == ["sum"]  # the index entry it left is ignored
    assert backend.get("acme", "sum") == b"v1" and backend.latest_version("acme", "sum") == 1
    backend.close()


def test_a_password_asked_for_later_is_named_as_the_cause(
    server: RedisServer, open_registry: Callable[..., PrefixRegistry]
) -> None:
    """A password set on the running Redis (the URL has none): the error names the credentials, not only redis-py's
    words about HELLO; served again once the URL's (no) password is accepted again."""
    registry = open_registry(server.url, latest_ttl=0.0)
    registry.upload("acme", "sum", make_kv(seed=1))
    admin = server.client()
    admin.config_set("requirepass", "now-needed")
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")  # connections log in again
    try:
        with pytest.raises(
            StoreUnavailable, match=r"refused our credentials \(the password or user in the store URL\)"
        ):
            registry.info("acme", "sum")
    finally:
        admin.config_set("requirepass", "")
    assert registry.info("acme", "sum").version == 1


def test_an_error_the_store_answers_holds_no_circuit(
    server: RedisServer, open_registry: Callable[..., PrefixRegistry]
) -> None:
    """An error Redis replies with at once (here NOPERM; a cluster failing over says CLUSTERDOWN, a restarted
    Redis LOADING) fails the request and is counted, but the next request asks again: there is no timeout to
    spare it, and it is served as soon as the store is. (A hung store holds the circuit: the test below.)"""
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "~*", "&*", "+@all")
    url = f"redis://app:app-pw@127.0.0.1:{server.port}/0"
    open_registry(url).upload("acme", "cold", make_kv(seed=2))
    registry = open_registry(url, latest_ttl=0.0)
    admin.execute_command("ACL", "SETUSER", "app", "-@all")  # every command now answered NOPERM
    with pytest.raises(StoreUnavailable, match=r"(?i)permission"):
        registry.resolve("acme", "cold")
    assert registry.stats()["store_errors"] == 1
    admin.execute_command("ACL", "SETUSER", "app", "+@all")
    assert registry.resolve("acme", "cold").metadata.version == 1  # at once: not refused for a second


def test_hung_redis_fails_cold_loads_fast(server: RedisServer, open_registry: Callable[..., PrefixRegistry]) -> None:
    a = open_registry(server.url)
    a.upload("acme", "hot", make_kv(seed=1))
    a.upload("acme", "cold", make_kv(seed=2))
    b = open_registry(server.url, latest_ttl=0.0)
    b.resolve("acme", "hot")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=re.escape(f"127.0.0.1:{server.port}")):
            b.resolve("acme", "cold")
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        assert b.resolve("acme", "hot").metadata.version == 1
        assert time.monotonic() - started < 0.1  # the store is known to be down: no second timeout
        # Within the hold window cold loads fail at once instead of waiting out another timeout.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="moments ago"):
            b.resolve("acme", "cold")
        assert time.monotonic() - started < 0.1
    finally:
        server.proc.send_signal(signal.SIGCONT)

    def cold_version() -> int | None:
        try:
            return _version_or_none(b, "cold")
        except StoreUnavailable:
            return None  # still inside the hold window

    assert eventually(lambda: cold_version() == 1, within=3.0) < 3.0
