"""Prompt cache: the KV of prompt heads already computed, reused by later requests of the same prefix.

Requests of one task often start alike: a system prompt, a chat template's opening, few-shot examples, a shared
document. Their K/V after the task's prefix depend only on the prefix and those tokens, so a later request that
starts with the same tokens can take them instead of computing them (vLLM's automatic prefix caching). Since a
trained prefix is itself K/V placed before the prompt, a cache hit simply makes the row's context longer: its
first m prompt tokens' K/V are copied in after the prefix, and only the rest of the prompt is computed, from
position P + m on.

The cache holds blocks of ``block_tokens`` prompt tokens, each keyed by its tokens and the block before it (the
first by the prefix's id, which names tenant, task, version and content hash), so a key matches only the exact
same prefix and token history; dictionary lookups compare the tokens themselves, never a hash of them. Blocks are
kept within a byte budget, least recently used first out, from the tenant whose blocks hold the most bytes: one
tenant sending many distinct prompts evicts its own blocks once it holds the most, not the few another tenant keeps
(nor can it tell, from another's evictions, how busy the others are). A hit refreshes its blocks last to first, so
that a chain's first blocks, which every longer prompt needs, go last. A block that goes takes the blocks after it
(unreachable without it) along.

Only the engine thread uses it: a lookup when a request is admitted, a store when its prompt is all in the KV.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prefix_store.lru import victim

DEFAULT_BLOCK_TOKENS = 16

# A block's key: (the key of the block before it, or the prefix's key for the first block; its tokens).
BlockKey = tuple[object, tuple[int, ...]]


@dataclass
class _Block:
    number: int  # unique for the cache's life: the next block's key refers to it
    kv: torch.Tensor  # [L, 2, H_kv, block_tokens, d]
    owner: str  # the tenant whose request computed it (every block of a chain has its first block's)
    children: set[BlockKey] = field(default_factory=set)
    parent: BlockKey | None = None


@dataclass(frozen=True)
class CachedPrompt:
    """The cached head of a prompt: its first ``tokens`` tokens' K/V, block by block."""

    tokens: int
    blocks: tuple[torch.Tensor, ...]  # each [L, 2, H_kv, block_tokens, d]


class PromptCache:
    def __init__(self, max_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if max_bytes <= 0 or block_tokens <= 0:
            raise ValueError("a prompt cache needs a positive byte budget and block size")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens taken from the cache instead of computed, since start
        self._blocks: dict[BlockKey, _Block] = {}
        self._order: OrderedDict[BlockKey, None] = OrderedDict()  # every block's key, least recently used first
        # Per tenant: its blocks' keys, least recently used first, and their bytes.
        self._owned: dict[str, OrderedDict[BlockKey, None]] = {}
        self._owned_bytes: dict[str, int] = {}
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, prefix_key: str, prompt: Sequence[int]) -> CachedPrompt | None:
        """The longest cached head of ``prompt`` that leaves at least one token to compute (the last prompt
        token's logits give the first generated token), or None."""
        chain, _ = self._cached_chain(prefix_key, prompt, (len(prompt) - 1) // self.block_tokens)
        if not chain:
            return None
        for key in reversed(chain):  # the first block ends most recently used: it goes last
            self._order.move_to_end(key)
            self._owned[self._blocks[key].owner].move_to_end(key)
        tokens = len(chain) * self.block_tokens
        self.hit_tokens += tokens
        return CachedPrompt(tokens, tuple(self._blocks[key].kv for key in chain))

    def store(
        self, prefix_key: str, prompt: Sequence[int], kv_of: Callable[[int, int], torch.Tensor], owner: str = ""
    ) -> None:
        """Keep the whole blocks of ``prompt`` not cached yet (those a hit took are there already, unless evicted
        since), as ``owner``'s (the request's tenant). ``kv_of(start, end)`` gives the K/V of prompt tokens
        [start, end) as [L, 2, H_kv, end - start, d]."""
        size = self.block_tokens
        whole = len(prompt) // size
        cached, parent = self._cached_chain(prefix_key, prompt, whole)
        if len(cached) == whole:
            return
        start = len(cached) * size
        parent_key = cached[-1] if cached else None
        kv = kv_of(start, whole * size)  # [L, 2, H_kv, M, d]: one copy out of the batch's buffers
        chain: list[tuple[BlockKey, _Block]] = []
        for j, piece in enumerate(kv.split(size, dim=3)):
            key = (parent, tuple(prompt[start + j * size : start + (j + 1) * size]))
            block = _Block(next(self._numbers), piece.clone(), owner, parent=parent_key)
            chain.append((key, block))
            parent, parent_key = block.number, key
        owned = self._owned.setdefault(owner, OrderedDict())
        for key, block in reversed(chain):  # the chain's first block ends most recently used
            self._blocks[key] = block
            self._order[key] = None
            owned[key] = None
            size = block.kv.numel() * block.kv.element_size()
            self.bytes += size
            self._owned_bytes[owner] = self._owned_bytes.get(owner, 0) + size
        for key, block in chain:
            if block.parent is not None and block.parent in self._blocks:
                self._blocks[block.parent].children.add(key)
        self._evict(owner)

    def _cached_chain(self, prefix_key: str, prompt: Sequence[int], blocks: int) -> tuple[list[BlockKey], object]:
        """The keys of the cached blocks ``prompt`` starts with (at most ``blocks``), and what the key of the
        block after them refers to."""
        size = self.block_tokens
        chain: list[BlockKey] = []
        parent: object = prefix_key
        for j in range(blocks):
            key = (parent, tuple(prompt[j * size : (j + 1) * size]))
            block = self._blocks.get(key)
            if block is None:
                break
            chain.append(key)
            parent = block.number
        return chain, parent

    def clear(self) -> None:
        self._blocks.clear()
        self._order.clear()
        self._owned.clear()
        self._owned_bytes.clear()
        self.bytes = 0

    def _evict(self, owner: str) -> None:
        """Back within budget after ``owner`` stored blocks: from its own least recently used while it holds more
        than its share (the budget ÷ the tenants holding blocks), so one tenant's many distinct prompts do not
        flush the few another keeps (nor tell it how busy others are); else the least recently used of all (the
        prefix caches' rule: prefix_store/lru.py)."""
        while self.bytes > self.max_bytes and self._blocks:
            self._drop(victim(owner, 0, self.max_bytes, self._order, self._owned, self._owned_bytes))

    def _drop(self, key: BlockKey) -> None:
        block = self._blocks.pop(key, None)
        if block is None:
            return
        size = block.kv.numel() * block.kv.element_size()
        self.bytes -= size
        del self._order[key]
        owned = self._owned[block.owner]
        del owned[key]
        self._owned_bytes[block.owner] -= size
        if not owned:
            del self._owned[block.owner], self._owned_bytes[block.owner]
        if block.parent is not None and block.parent in self._blocks:
            self._blocks[block.parent].children.discard(key)
        for child in list(block.children):  # unreachable without this block
            self._drop(child)
