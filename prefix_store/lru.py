"""An LRU map bounded by the total size of its values (not thread-safe; callers lock)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int]) -> None:
        self.capacity_bytes = capacity_bytes
        self._size_of = size_of
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.used_bytes = 0
        self.evictions = 0  # entries dropped to make room (explicit pops are not evictions)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        item = self._entries.get(key)
        if item is None:
            return None
        self._entries.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V) -> bool:
        """Insert (evicting least recently used entries); False if `value` alone exceeds capacity."""
        self.pop(key)
        size = self._size_of(value)
        if size > self.capacity_bytes:
            return False
        while self.used_bytes + size > self.capacity_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self.used_bytes -= evicted_size
            self.evictions += 1
        self._entries[key] = (value, size)
        self.used_bytes += size
        return True

    def pop(self, key: K) -> V | None:
        item = self._entries.pop(key, None)
        if item is None:
            return None
        self.used_bytes -= item[1]
        return item[0]

    def ordered_keys(self) -> list[K]:
        """Keys from least to most recently used."""
        return list(self._entries)
