"""An LRU map bounded by the total size of its values (not thread-safe; callers lock).

With ``owner_of`` (the tenant of a key), an owner that holds more than its share of the capacity (capacity ÷
owners holding entries) makes room from its own least recently used entries: one tenant's flood of cold prefixes
no longer flushes every other tenant's resident ones. Any other insert evicts the least recently used entry of all,
so a cache that no one floods (one tenant, or many with a prefix each) is a plain LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def victim(
    owner: Hashable,
    incoming: int,
    capacity: int,
    order: Mapping[K, object],
    owned: Mapping[Hashable, Mapping[K, None]],
    owned_bytes: Mapping[Hashable, int],
) -> K:
    """The entry to evict for `owner`, which brings `incoming` more bytes: its own least recently used while it would
    hold more than its share (`capacity` ÷ the owners holding entries), else the least recently used of all.
    ``order``: every key, least recently used first; ``owned``: each owner's keys, likewise, and their bytes."""
    own = owned.get(owner)
    if own and owned_bytes[owner] + incoming > capacity / len(owned):
        return next(iter(own))
    return next(iter(order))


class ByteLRU(Generic[K, V]):
    def __init__(
        self, capacity_bytes: int, size_of: Callable[[V], int], owner_of: Callable[[K], Hashable] | None = None
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self._size_of = size_of
        self._owner_of = owner_of or (lambda _: None)
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        # Per owner, its keys in LRU order and their bytes (owners without entries are not kept).
        self._owned: dict[Hashable, OrderedDict[K, None]] = {}
        self._owned_bytes: dict[Hashable, int] = {}
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
        self._owned[self._owner_of(key)].move_to_end(key)
        return item[0]

    def put(self, key: K, value: V) -> bool:
        """Insert (evicting entries to make room); False if `value` alone exceeds capacity."""
        self.pop(key)
        size = self._size_of(value)
        if size > self.capacity_bytes:
            return False
        owner = self._owner_of(key)
        while self.used_bytes + size > self.capacity_bytes:
            self._remove(self._victim(owner, size))
            self.evictions += 1
        self._entries[key] = (value, size)
        self._owned.setdefault(owner, OrderedDict())[key] = None
        self._owned_bytes[owner] = self._owned_bytes.get(owner, 0) + size
        self.used_bytes += size
        return True

    def pop(self, key: K) -> V | None:
        if key not in self._entries:
            return None
        return self._remove(key)

    def ordered_keys(self) -> list[K]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def _victim(self, owner: Hashable, size: int) -> K:
        return victim(owner, size, self.capacity_bytes, self._entries, self._owned, self._owned_bytes)

    def _remove(self, key: K) -> V:
        value, size = self._entries.pop(key)
        owner = self._owner_of(key)
        owned = self._owned[owner]
        del owned[key]
        self._owned_bytes[owner] -= size
        if not owned:
            del self._owned[owner], self._owned_bytes[owner]
        self.used_bytes -= size
        return value
