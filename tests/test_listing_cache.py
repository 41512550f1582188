"""Parsed listing headers (prefix_store/listing_cache.py): one parse per distinct header, bounded, errors kept out."""

from __future__ import annotations

import pytest
import torch

from prefix_store.artifact import encode_artifact, read_metadata
from prefix_store.errors import InvalidPrefix
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.listing_cache import ListingCache

FP = ModelFingerprint("llama", num_layers=2, num_kv_heads=2, head_dim=8, vocab_size=128)


def header(task_id: str, version: int = 1) -> bytes:
    """A stored artifact's first bytes: its 8-byte length and header (what a listing reads)."""
    blob = encode_artifact(torch.zeros(2, 2, 2, 3, 8), task_id=task_id, tenant="acme", version=version, fingerprint=FP)
    return blob[: 8 + int.from_bytes(blob[:8], "little")]


def test_each_distinct_header_is_parsed_once() -> None:
    cache = ListingCache()
    a, a2 = header("a"), header("a", version=2)
    assert cache.metadata(a) == read_metadata(a)
    assert cache.metadata(bytes(a)) is cache.metadata(a)  # equal bytes, one parse
    assert cache.parses == 1
    assert cache.metadata(a2).version == 2  # a new version is a new header
    assert cache.parses == 2


def test_the_least_recently_listed_go_first() -> None:
    cache = ListingCache(max_entries=2)
    a, b, c = header("a"), header("b"), header("c")
    cache.metadata(a)
    cache.metadata(b)
    cache.metadata(a)  # a listed again: b is now the oldest
    cache.metadata(c)
    assert cache.parses == 3
    cache.metadata(a)
    assert cache.parses == 3  # kept
    cache.metadata(b)
    assert cache.parses == 4  # was dropped for c


def test_an_unreadable_header_raises_every_time_and_is_not_kept() -> None:
    cache = ListingCache()
    for _ in range(2):
        with pytest.raises(InvalidPrefix):
            cache.metadata(b"not a header")
    assert cache.parses == 0
