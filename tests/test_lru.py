"""ByteLRU: bounded in bytes, least recently used first, and with owners, a flooding owner evicts its own."""

from __future__ import annotations

from prefix_store.lru import ByteLRU


def _lru(capacity: int, owners: bool = True) -> ByteLRU[tuple[str, str], int]:
    return ByteLRU(capacity, lambda size: size, (lambda key: key[0]) if owners else None)


def test_bounded_in_bytes_least_recently_used_first() -> None:
    lru = _lru(10, owners=False)
    for name, size in [("a", 4), ("b", 4), ("c", 2)]:
        assert lru.put(("t", name), size)
    assert lru.get(("t", "a")) == 4  # a becomes the most recent
    assert lru.put(("t", "d"), 3)  # evicts b (4 bytes), the least recent
    assert lru.ordered_keys() == [("t", "c"), ("t", "a"), ("t", "d")]
    assert lru.used_bytes == 9 and lru.evictions == 1
    assert not lru.put(("t", "huge"), 11) and ("t", "huge") not in lru
    assert lru.pop(("t", "c")) == 2 and lru.used_bytes == 7 and lru.evictions == 1


def test_a_flooding_owner_evicts_its_own_entries() -> None:
    lru = _lru(10)
    for name in ("a1", "a2", "a3"):
        lru.put(("calm", name), 1)
    for i in range(20):
        lru.put(("flood", f"f{i}"), 1)
    # Once it held more than half (two owners), flood made room from its own oldest entries.
    assert [key for key in lru.ordered_keys() if key[0] == "calm"] == [("calm", "a1"), ("calm", "a2"), ("calm", "a3")]
    assert [key[1] for key in lru.ordered_keys() if key[0] == "flood"] == [f"f{i}" for i in range(13, 20)]
    assert lru.used_bytes == 10 and lru.evictions == 13


def test_without_a_flood_it_is_a_plain_lru_across_owners() -> None:
    lru = _lru(3)
    for owner in ("o1", "o2", "o3"):
        lru.put((owner, "p"), 1)
    lru.get(("o1", "p"))
    lru.put(("o4", "p"), 1)  # o4 holds nothing yet: the least recent of all goes (o2's)
    assert lru.ordered_keys() == [("o3", "p"), ("o1", "p"), ("o4", "p")]
    # Owners under their share keep trading places by recency, whoever they are.
    lru.put(("o5", "p"), 1)
    assert ("o3", "p") not in lru and len(lru) == 3


def test_an_owner_within_its_share_still_evicts_the_least_recent_of_all() -> None:
    lru = _lru(12)
    for i in range(8):
        lru.put(("a", f"a{i}"), 1)
    for i in range(4):
        lru.put(("b", f"b{i}"), 1)
    lru.put(("b", "b4"), 1)  # full; b would hold 5 of its share of 6: the least recent of all goes, a's
    lru.put(("b", "b5"), 1)  # 6 of 6: again
    assert ("a", "a0") not in lru and ("a", "a1") not in lru and ("b", "b0") in lru
    lru.put(("b", "b6"), 1)  # b would hold 7 > 6: its own oldest goes
    assert ("b", "b0") not in lru and ("a", "a2") in lru


def test_owners_accounting_follows_pops_and_replacements() -> None:
    lru = _lru(10)
    lru.put(("a", "x"), 3)
    lru.put(("a", "x"), 5)  # replaced: counted once
    lru.put(("b", "y"), 2)
    assert lru._owned_bytes == {"a": 5, "b": 2}
    lru.pop(("a", "x"))
    assert lru._owned_bytes == {"b": 2} and list(lru._owned) == ["b"]
