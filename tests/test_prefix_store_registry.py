import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prefix_store.backends import DiskBackend, PrefixBackend
from prefix_store.backends.base import Invalidation
from prefix_store.errors import (
    CorruptPrefix,
    InvalidPrefix,
    InvalidTaskId,
    PrefixNotFound,
    PrefixTooLarge,
    StoreUnavailable,
)
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.registry import PrefixRegistry

FP = ModelFingerprint("llama", num_layers=2, num_kv_heads=2, head_dim=8, vocab_size=128)


def make_kv(p: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(FP.num_layers, 2, FP.num_kv_heads, p, FP.head_dim, generator=g)  # [L, 2, H, P, d]


KV_BYTES = make_kv().numel() * 4  # 512


class CountingBackend(PrefixBackend):
    """Wraps a backend, counting reads (and the most at once) and optionally delaying their return (a slow
    transfer) or holding them until ``gate`` is set."""

    def __init__(self, inner: PrefixBackend, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.inner, self.delay, self.gate = inner, delay, gate
        self.reads = self.in_flight = self.most_in_flight = 0
        self.order: list[tuple[str, str]] = []  # (tenant, task_id) of each read, in the order they began
        self.fail_with: Exception | None = None  # raised by reads once set
        self._lock = threading.Lock()

    def put(self, tenant: str, task_id: str, encode: Callable[[int], bytes]) -> int:
        return self.inner.put(tenant, task_id, encode)

    def get(self, tenant: str, task_id: str, version: int | None = None) -> bytes:
        with self._lock:
            self.reads += 1
            self.order.append((tenant, task_id))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            blob = self.inner.get(tenant, task_id, version)
            time.sleep(self.delay)
            if self.gate is not None:
                self.gate.wait(timeout=10)
            if self.fail_with is not None:
                raise self.fail_with
            return blob
        finally:
            with self._lock:
                self.in_flight -= 1

    def get_header(self, tenant: str, task_id: str, version: int | None = None) -> bytes:
        return self.inner.get_header(tenant, task_id, version)  # the check on use: a header, not counted

    def latest_version(self, tenant: str, task_id: str) -> int | None:
        return self.inner.latest_version(tenant, task_id)

    def list_tasks(self, tenant: str) -> list[str]:
        return self.inner.list_tasks(tenant)

    def delete(self, tenant: str, task_id: str) -> bool:
        return self.inner.delete(tenant, task_id)

    def describe(self) -> str:
        return "counting " + self.inner.describe()


@pytest.fixture
def disk(tmp_path: Path) -> DiskBackend:
    return DiskBackend(tmp_path)


@pytest.fixture
def registry(disk: DiskBackend) -> PrefixRegistry:
    return PrefixRegistry(disk, FP, max_virtual_tokens=16)


def test_upload_resolve_info_list_delete(registry: PrefixRegistry) -> None:
    m1 = registry.upload("acme", "sum", make_kv(seed=1))
    m2 = registry.upload("acme", "sum", make_kv(seed=2))
    registry.upload("acme", "chat", make_kv(p=3))
    assert (m1.version, m2.version) == (1, 2)
    assert m2.tenant == "acme" and m2.num_virtual_tokens == 4 and m2.nbytes == KV_BYTES
    art = registry.resolve("acme", "sum")
    assert art.metadata == m2 and torch.equal(art.key_values, make_kv(seed=2))
    assert torch.equal(registry.resolve("acme", "sum", version=1).key_values, make_kv(seed=1))
    assert registry.info("acme", "sum") == m2
    assert [(m.task_id, m.version) for m in registry.list("acme")] == [("chat", 1), ("sum", 2)]
    assert registry.delete("acme", "sum") is True
    assert registry.delete("acme", "sum") is False
    assert all(key[1] != "sum" for key in registry.cached_keys())
    for call in (registry.resolve, registry.info):
        with pytest.raises(PrefixNotFound):
            call("acme", "sum")


def test_a_repeated_listing_parses_only_what_changed(registry: PrefixRegistry) -> None:
    """Listing parses each task's latest header once; the next listing reuses the parse, except for a task with
    a new version, and shows that version."""
    for task in ("a", "b", "c"):
        registry.upload("acme", task, make_kv(seed=ord(task)))
    first = registry.list("acme")
    assert registry._listing.parses == 3
    assert registry.list("acme") == first and registry._listing.parses == 3
    registry.upload("acme", "b", make_kv(seed=9))
    assert [(m.task_id, m.version) for m in registry.list("acme")] == [("a", 1), ("b", 2), ("c", 1)]
    assert registry._listing.parses == 4


def test_tenants_do_not_see_each_other(registry: PrefixRegistry) -> None:
    registry.upload("acme", "sum", make_kv())
    with pytest.raises(PrefixNotFound):
        registry.resolve("umbrella", "sum")
    assert registry.list("umbrella") == []


def test_cold_registry_reads_and_verifies(disk: DiskBackend) -> None:
    PrefixRegistry(disk, FP).upload("acme", "sum", make_kv())
    counting = CountingBackend(disk)
    cold = PrefixRegistry(counting, FP)
    art = cold.resolve("acme", "sum")
    assert torch.equal(art.key_values, make_kv())
    assert cold.resolve("acme", "sum") is art
    assert counting.reads == 1
    assert cold.stats()["host_cache_hits"] == 1 and cold.stats()["host_cache_misses"] == 1


def test_upload_copies_the_tensor(registry: PrefixRegistry) -> None:
    kv = make_kv()
    registry.upload("acme", "sum", kv)
    kv.zero_()
    assert torch.equal(registry.resolve("acme", "sum").key_values, make_kv())


def _corrupt_latest(disk: DiskBackend, tenant: str, task: str, offset: int) -> None:
    path = disk.root / tenant / task / f"v{disk.latest_version(tenant, task):08d}.safetensors"
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset", [-1, 20])  # a tensor byte; a header byte
def test_corrupt_blob_is_never_served(disk: DiskBackend, offset: int) -> None:
    PrefixRegistry(disk, FP).upload("acme", "sum", make_kv())
    _corrupt_latest(disk, "acme", "sum", offset)
    cold = PrefixRegistry(disk, FP)
    for _ in range(2):  # not cached after failing
        with pytest.raises(CorruptPrefix):
            cold.resolve("acme", "sum")
    assert cold.cached_keys() == []


def test_stored_prefix_for_another_model(disk: DiskBackend) -> None:
    PrefixRegistry(disk, FP).upload("acme", "sum", make_kv())
    other = ModelFingerprint("llama", num_layers=30, num_kv_heads=2, head_dim=8, vocab_size=128)
    with pytest.raises(InvalidPrefix, match="num_layers: prefix has 2, model has 30"):
        PrefixRegistry(disk, other).resolve("acme", "sum")


def test_failed_upload_keeps_previous_version(registry: PrefixRegistry) -> None:
    registry.upload("acme", "sum", make_kv(seed=1))
    bad = make_kv(seed=2)
    bad[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidPrefix, match="non-finite"):
        registry.upload("acme", "sum", bad)
    with pytest.raises(InvalidPrefix, match="between 1 and 16"):
        registry.upload("acme", "sum", make_kv(p=17))
    with pytest.raises(InvalidPrefix, match="num_kv_heads: prefix has 1, model has 2"):
        registry.upload("acme", "sum", make_kv()[:, :, :1])
    art = registry.resolve("acme", "sum")
    assert art.metadata.version == 1 and torch.equal(art.key_values, make_kv(seed=1))


def test_too_large_upload(disk: DiskBackend) -> None:
    registry = PrefixRegistry(disk, FP, max_upload_bytes=KV_BYTES - 1)
    with pytest.raises(PrefixTooLarge):
        registry.upload("acme", "sum", make_kv())
    assert disk.latest_version("acme", "sum") is None


@pytest.mark.parametrize("bad", ["../x", "", "a/b", "a" * 129])
def test_invalid_ids(registry: PrefixRegistry, bad: str) -> None:
    for call in (
        lambda: registry.upload("acme", bad, make_kv()),
        lambda: registry.upload(bad, "sum", make_kv()),
        lambda: registry.resolve("acme", bad),
        lambda: registry.info("acme", bad),
        lambda: registry.delete("acme", bad),
        lambda: registry.list(bad),
    ):
        with pytest.raises(InvalidTaskId):
            call()


def test_host_cache_evicts_by_bytes(disk: DiskBackend) -> None:
    counting = CountingBackend(disk)
    registry = PrefixRegistry(counting, FP, host_cache_bytes=int(2.5 * KV_BYTES))
    for task in ("a", "b", "c"):
        registry.upload("acme", task, make_kv())  # uploads warm the cache
    assert registry.cached_keys() == [("acme", "b", 1), ("acme", "c", 1)]
    assert registry.stats()["host_cache_bytes"] == 2 * KV_BYTES
    registry.resolve("acme", "b")  # hit; now "c" is least recently used
    assert counting.reads == 0
    registry.resolve("acme", "a")  # miss evicts "c"
    assert counting.reads == 1
    assert registry.cached_keys() == [("acme", "b", 1), ("acme", "a", 1)]
    assert registry.stats()["host_cache_evictions"] == 2  # "a" by the upload of "c", then "c"
    # A prefix bigger than the whole cache is served but not cached.
    registry.upload("acme", "big", make_kv(p=16))
    registry.resolve("acme", "big")
    assert ("acme", "big", 1) not in registry.cached_keys()
    assert registry.stats()["host_cache_evictions"] == 2  # refusing an oversized entry evicts nothing
    assert registry.stats()["host_cache_bytes"] <= int(2.5 * KV_BYTES)


def test_a_tenants_flood_of_cold_prefixes_leaves_others_resident(disk: DiskBackend) -> None:
    for i in range(10):
        PrefixRegistry(disk, FP).upload("flood", f"c{i}", make_kv(seed=i))
    PrefixRegistry(disk, FP).upload("calm", "hot", make_kv())
    counting = CountingBackend(disk)
    registry = PrefixRegistry(counting, FP, host_cache_bytes=4 * KV_BYTES)
    registry.resolve("calm", "hot")
    for i in range(10):
        registry.resolve("flood", f"c{i}")
    # Once the budget was full, the flood (past half of it: two tenants hold prefixes) evicted its own oldest.
    assert registry.cached_keys() == [("calm", "hot", 1), *(("flood", f"c{i}", 1) for i in (7, 8, 9))]
    registry.resolve("calm", "hot")
    assert counting.reads == 11  # calm's second request was a hit


def test_new_version_is_resolved_after_upload(registry: PrefixRegistry) -> None:
    registry.upload("acme", "sum", make_kv(seed=1))
    first = registry.resolve("acme", "sum")
    registry.upload("acme", "sum", make_kv(seed=2))
    second = registry.resolve("acme", "sum")
    assert (first.metadata.version, second.metadata.version) == (1, 2)
    assert torch.equal(first.key_values, make_kv(seed=1))  # a running request keeps its copy


def _resolve_concurrently(registry: PrefixRegistry, n: int) -> list[object]:
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = registry.resolve("acme", "sum")
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_single_flight(disk: DiskBackend) -> None:
    PrefixRegistry(disk, FP).upload("acme", "sum", make_kv())
    counting = CountingBackend(disk, delay=0.2)
    results = _resolve_concurrently(PrefixRegistry(counting, FP), 8)
    assert counting.reads == 1
    assert all(r is results[0] for r in results)
    assert torch.equal(results[0].key_values, make_kv())  # type: ignore[attr-defined]


def test_single_flight_shares_errors_and_does_not_stick(disk: DiskBackend) -> None:
    PrefixRegistry(disk, FP).upload("acme", "sum", make_kv())
    _corrupt_latest(disk, "acme", "sum", -1)
    counting = CountingBackend(disk, delay=0.2)
    registry = PrefixRegistry(counting, FP)
    results = _resolve_concurrently(registry, 6)
    assert counting.reads == 1
    assert all(isinstance(r, CorruptPrefix) for r in results)
    with pytest.raises(CorruptPrefix):
        registry.resolve("acme", "sum")
    assert counting.reads == 2  # the failure was not cached


def _resolve_tasks_concurrently(registry: PrefixRegistry, tasks: list[str]) -> list[object]:
    results: list[object] = [None] * len(tasks)

    def worker(i: int) -> None:
        try:
            results[i] = registry.resolve("acme", tasks[i])
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize(("limit", "most_at_once"), [(1, 1), (2, 2), (0, 4)])
def test_loads_of_distinct_prefixes_run_at_most_max_concurrent_loads_at_once(
    disk: DiskBackend, limit: int, most_at_once: int
) -> None:
    tasks = ["a", "b", "c", "d"]
    for task in tasks:
        PrefixRegistry(disk, FP).upload("acme", task, make_kv(seed=ord(task)))
    counting = CountingBackend(disk, delay=0.1)
    results = _resolve_tasks_concurrently(PrefixRegistry(counting, FP, max_concurrent_loads=limit), tasks)
    assert counting.reads == 4
    assert counting.most_in_flight == most_at_once
    for task, result in zip(tasks, results, strict=True):
        assert torch.equal(result.key_values, make_kv(seed=ord(task)))  # type: ignore[attr-defined]


def test_queued_loads_do_not_hold_up_resident_prefixes(disk: DiskBackend) -> None:
    for task in ("hot", "cold1", "cold2"):
        PrefixRegistry(disk, FP).upload("acme", task, make_kv())
    gate = threading.Event()
    counting = CountingBackend(disk, gate=gate)
    registry = PrefixRegistry(counting, FP, max_concurrent_loads=1)
    gate.set()
    registry.resolve("acme", "hot")  # resident from now on
    gate.clear()
    cold = [threading.Thread(target=registry.resolve, args=("acme", t)) for t in ("cold1", "cold2")]
    for t in cold:
        t.start()
    while counting.in_flight == 0:  # one cold load holds the only slot, the other waits for it
        time.sleep(0.01)
    assert registry.resolve("acme", "hot").metadata.task_id == "hot"
    assert counting.reads == 2
    gate.set()
    for t in cold:
        t.join()
    assert counting.reads == 3


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_cold_loads_take_turns_across_tenants(disk: DiskBackend) -> None:
    for i in range(4):
        PrefixRegistry(disk, FP).upload("flood", f"c{i}", make_kv(seed=i))
    PrefixRegistry(disk, FP).upload("calm", "a", make_kv())
    gate = threading.Event()
    counting = CountingBackend(disk, gate=gate)
    registry = PrefixRegistry(counting, FP, max_concurrent_loads=1)
    threads = [threading.Thread(target=registry.resolve, args=("flood", f"c{i}")) for i in range(4)]
    for t in threads:
        t.start()
    _wait_until(lambda: counting.in_flight == 1 and registry.loads_waiting() == 3)
    threads.append(threading.Thread(target=registry.resolve, args=("calm", "a")))
    threads[-1].start()
    _wait_until(lambda: registry.loads_waiting() == 4)
    gate.set()
    for t in threads:
        t.join()
    # The flood's load in flight, then one of its queue, then the calm tenant's (first come first served
    # would have put it last, behind the flood's whole queue).
    assert [tenant for tenant, _ in counting.order[:3]] == ["flood", "flood", "calm"]
    assert sorted(counting.order) == sorted([("flood", f"c{i}") for i in range(4)] + [("calm", "a")])


def test_resolve_resident_answers_only_what_needs_no_store(disk: DiskBackend) -> None:
    registry = PrefixRegistry(disk, FP, latest_ttl=60)
    assert registry.resolve_resident("acme", "sum") is None  # never seen
    registry.upload("acme", "sum", make_kv(seed=1))
    assert registry.resolve_resident("acme", "sum") is None  # no latest-version answer yet
    first = registry.resolve("acme", "sum")
    assert registry.resolve_resident("acme", "sum") is first
    registry.upload("acme", "sum", make_kv(seed=2))  # forgets the latest answer
    assert registry.resolve_resident("acme", "sum") is None
    second = registry.resolve("acme", "sum")
    assert second.metadata.version == 2 and registry.resolve_resident("acme", "sum") is second
    registry.latest_ttl = 0  # the answer expired: a check on use is due
    assert registry.resolve_resident("acme", "sum") is None
    registry.latest_ttl = 60
    registry.resolve("acme", "sum")
    registry.delete("acme", "sum")
    assert registry.resolve_resident("acme", "sum") is None


def test_resolve_resident_leaves_unverified_versions_to_resolve(disk: DiskBackend) -> None:
    registry = PrefixRegistry(disk, FP, latest_ttl=60)
    registry.upload("acme", "sum", make_kv())
    registry.resolve("acme", "sum")
    # An upload announced under a number already cached (a store that lost writes hands numbers out again): the
    # cached copy must be checked against the store before it is served again.
    registry._on_invalidation(Invalidation("acme", "sum", 1))
    assert registry.info("acme", "sum").version == 1  # the latest-version answer is fresh again
    assert registry.resolve_resident("acme", "sum") is None
    assert registry.resolve("acme", "sum").metadata.version == 1  # checked: the store still holds it
    assert registry.resolve_resident("acme", "sum") is not None


def test_loads_queued_behind_a_failed_one_fail_at_once(disk: DiskBackend) -> None:
    for task in ("a", "b", "c"):
        PrefixRegistry(disk, FP).upload("acme", task, make_kv())
    gate = threading.Event()
    counting = CountingBackend(disk, gate=gate)
    counting.fail_with = StoreUnavailable("timed out")
    registry = PrefixRegistry(counting, FP, max_concurrent_loads=1)
    results: list[object] = []
    resolving = threading.Thread(target=lambda: results.extend(_resolve_tasks_concurrently(registry, ["a", "b", "c"])))
    resolving.start()
    while counting.in_flight == 0:
        time.sleep(0.01)
    time.sleep(0.2)  # the other two are queued for the slot by now
    gate.set()  # the first load fails, like a hung store's timeout
    resolving.join()
    assert len(results) == 3 and all(isinstance(r, StoreUnavailable) for r in results)
    assert counting.reads == 1  # the queued loads did not each wait out a timeout of their own


def test_delete_during_load_does_not_cache_stale_prefix(disk: DiskBackend) -> None:
    PrefixRegistry(disk, FP).upload("acme", "sum", make_kv(seed=1))
    counting = CountingBackend(disk, delay=0.3)
    registry = PrefixRegistry(counting, FP)
    loaded = []
    loader = threading.Thread(target=lambda: loaded.append(registry.resolve("acme", "sum")))
    loader.start()
    time.sleep(0.1)  # the loader has read v1 and is still "transferring" it
    registry.delete("acme", "sum")
    loader.join()
    assert torch.equal(loaded[0].key_values, make_kv(seed=1))
    # Another process re-creates the task; version numbers restart at 1 after a delete.
    PrefixRegistry(disk, FP).upload("acme", "sum", make_kv(seed=2))
    assert torch.equal(registry.resolve("acme", "sum").key_values, make_kv(seed=2))


def test_a_replica_that_missed_a_delete_and_reupload_serves_the_new_prefix(tmp_path: Path) -> None:
    """Two replicas on one disk store, with no invalidation between them: B deletes the task and uploads another
    prefix under its id; A, which has the old one cached, serves the new one at its next version check. Version
    numbers only grow across deletes, so the new upload is never mistaken for A's cached version."""
    a = PrefixRegistry(DiskBackend(tmp_path), FP, latest_ttl=0.0)
    b = PrefixRegistry(DiskBackend(tmp_path), FP, latest_ttl=0.0)
    old, new = make_kv(seed=1), make_kv(seed=2)
    first = b.upload("acme", "sum", old)
    assert torch.equal(a.resolve("acme", "sum").key_values, old)  # cached in A
    assert b.delete("acme", "sum")
    again = b.upload("acme", "sum", new)
    assert again.version > first.version
    assert torch.equal(a.resolve("acme", "sum").key_values, new)


def test_upload_must_stay_finite_in_the_serving_dtype(disk: DiskBackend) -> None:
    """1e6 is a float32 but overflows float16; a float64 1e300 overflows float32: either would make the model's
    logits NaN once the prefix is cast to the dtype it runs in. Refused, nothing stored."""
    half = PrefixRegistry(disk, FP, serving_dtype=torch.float16)
    big = make_kv()
    big[0, 1, 0, 0, 0] = 1e6
    with pytest.raises(InvalidPrefix, match=r"out of the range of float16.*largest magnitude 1e\+06"):
        half.upload("acme", "sum", big)
    full = PrefixRegistry(disk, FP, serving_dtype=torch.float32)
    huge = make_kv().double()
    huge[1, 0, 1, 2, 3] = -1e300
    with pytest.raises(InvalidPrefix, match="out of the range of float32"):
        full.upload("acme", "sum", huge)
    assert disk.latest_version("acme", "sum") is None
    assert full.upload("acme", "sum", big).version == 1  # in range for float32
