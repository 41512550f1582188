"""The device tier: copies once per prefix version, bounded in bytes, off on CPU."""

from __future__ import annotations

import torch

from server.device_cache import DevicePrefixCache


def kv(p: int, fill: float) -> torch.Tensor:
    return torch.full((2, 2, 2, p, 4), fill)  # [L, 2, H_kv, P, d]: 32 * P elements


def test_cpu_uses_the_host_copy_and_caches_nothing() -> None:
    cache = DevicePrefixCache(torch.device("cpu"), torch.float32, capacity_bytes=10_000)
    host = kv(3, 1.0)
    assert cache.get("t/a@1", host) is host
    assert not cache.enabled and cache.stats()["device_cache_entries"] == 0
    assert cache.get("t/a@1", host).dtype == torch.float32
    assert DevicePrefixCache(torch.device("cpu"), torch.bfloat16).get("t/a@1", host).dtype == torch.bfloat16


def test_lru_by_bytes_when_enabled() -> None:
    # The "meta" device stands in for an accelerator: no data, real shapes, real byte accounting.
    cache = DevicePrefixCache(torch.device("meta"), torch.float16, capacity_bytes=3 * 128 * 2)  # 3 fp16 prefixes of P=4
    for i in range(3):
        out = cache.get(f"t/p{i}@1", kv(4, float(i)))
        assert out.device.type == "meta" and out.dtype == torch.float16
    assert cache.stats()["device_cache_misses"] == 3
    cache.get("t/p0@1", kv(4, 0.0))  # hit: p0 becomes most recent
    cache.get("t/p3@1", kv(4, 3.0))  # evicts p1, the least recently used
    stats = cache.stats()
    assert stats["device_cache_hits"] == 1 and stats["device_cache_evictions"] == 1
    assert stats["device_cache_entries"] == 3 and stats["device_cache_bytes"] == 3 * 128 * 2
    cache.get("t/p1@1", kv(4, 1.0))
    assert cache.stats()["device_cache_misses"] == 5  # p1 had to be copied again
    cache.get(None, kv(4, 9.0))  # anonymous prefixes are never cached
    assert cache.stats()["device_cache_entries"] == 3


def test_a_tenants_flood_evicts_its_own_copies() -> None:
    cache = DevicePrefixCache(torch.device("meta"), torch.float16, capacity_bytes=4 * 128 * 2)  # 4 of P=4
    cache.get("calm/hot@1#00", kv(4, 0.0))
    for i in range(10):
        cache.get(f"flood/c{i}@1#00", kv(4, 1.0))
    cache.get("calm/hot@1#00", kv(4, 0.0))
    stats = cache.stats()
    assert stats["device_cache_hits"] == 1 and stats["device_cache_misses"] == 11
    assert stats["device_cache_entries"] == 4 and stats["device_cache_evictions"] == 7  # all flood's own
