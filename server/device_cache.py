"""The device tier of the prefix cache: prefixes already copied to the accelerator, LRU-bounded in bytes.

Only the engine thread touches it (between decode steps, when new requests are
prefilled). On CPU the host copy already is the device copy, so the tier is
off and prefixes are used in place.
"""

from __future__ import annotations

import torch

from prefix_store.lru import ByteLRU

DEFAULT_DEVICE_CACHE_BYTES = 1 << 30


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DevicePrefixCache:
    def __init__(self, device: torch.device, dtype: torch.dtype, capacity_bytes: int = DEFAULT_DEVICE_CACHE_BYTES):
        self.device = device
        self.dtype = dtype
        self.enabled = device.type != "cpu"
        # A tenant past its share of the budget evicts its own prefixes ("tenant/task@version#sha256-prefix").
        self._lru: ByteLRU[str, torch.Tensor] = ByteLRU(capacity_bytes, _nbytes, lambda id_: id_.split("/", 1)[0])
        self.hits = 0
        self.misses = 0

    def get(self, prefix_id: str | None, host_kv: torch.Tensor) -> torch.Tensor:
        """The prefix [L, 2, H_kv, P, d] on the model's device and dtype, copied at most once while cached.

        ``prefix_id`` names a version ("tenant/task@version#sha256-prefix"), so a new upload is a new entry and an old
        version simply ages out; None means an anonymous prefix that is never cached.
        """
        if not self.enabled or prefix_id is None:
            return host_kv.to(device=self.device, dtype=self.dtype)
        cached = self._lru.get(prefix_id)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        on_device = host_kv.to(device=self.device, dtype=self.dtype, non_blocking=True)
        self._lru.put(prefix_id, on_device)  # refused (not cached) when larger than the whole budget
        return on_device

    def stats(self) -> dict[str, int]:
        return {
            "device_cache_entries": len(self._lru),
            "device_cache_bytes": self._lru.used_bytes,
            "device_cache_capacity_bytes": self._lru.capacity_bytes,
            "device_cache_hits": self.hits,
            "device_cache_misses": self.misses,
            "device_cache_evictions": self._lru.evictions,
        }
