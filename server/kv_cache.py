"""The one place where the engine's KV layout meets transformers' ``Cache`` objects.

The engine keeps, per layer, keys and values in preallocated buffers of shape
[B, H_kv, C, d]: the first T columns (T = the batch's width) are the rows'
left-padded KV, the remaining C - T columns are room to grow. A decode step
writes its new column in place instead of concatenating (which would copy
every layer's K and V every step); when the room runs out the buffer grows by
half its size, so copies are amortised.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

KV = tuple[list[torch.Tensor], list[torch.Tensor]]

# Free columns a fresh buffer gets beyond what it holds: a few dozen decode steps before the first growth.
HEADROOM_COLUMNS = 64
# The most decode steps a batch reserves up front where it reserves its rows' steps (Batch.from_requests's
# ``reserve_decode``): a run of 256 new tokens never grows, and a chat request that leaves max_tokens at the
# server's 2,048 does not hold 2,048 columns per row from its first step (most replies end long before: growth,
# once every few hundred steps past this, costs a few percent of a step).
RESERVED_DECODE_COLUMNS = 512


def allocate(
    batch: int, heads: int, columns: int, head_dim: int, *, like: torch.Tensor, room: int = HEADROOM_COLUMNS
) -> torch.Tensor:
    """A zeroed [B, H_kv, columns + room, d] buffer. Zeros, so padding columns are finite (0 x NaN = NaN)."""
    return torch.zeros(batch, heads, columns + room, head_dim, dtype=like.dtype, device=like.device)


class _BufferLayer(DynamicLayer):
    """A cache layer that appends into a preallocated buffer and exposes its first ``length`` columns."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        super().__init__()
        self.key_buffer = key_buffer  # [B, H_kv, C, d]
        self.value_buffer = value_buffer
        self.length = length
        self.keys = key_buffer[:, :, :length]  # [B, H_kv, length, d] views, no copy
        self.values = value_buffer[:, :, :length]
        self.device = key_buffer.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states / value_states: [B, H_kv, q, d], written at columns [length, length + q).
        end = self.length + key_states.shape[2]
        if end > self.key_buffer.shape[2]:
            self._grow(end)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def _grow(self, needed: int) -> None:
        self.key_buffer = with_room(self.key_buffer, self.length, needed)
        self.value_buffer = with_room(self.value_buffer, self.length, needed)


def with_room(buffer: torch.Tensor, used: int, needed: int) -> torch.Tensor:
    """``buffer`` [B, H_kv, C, d] if C >= needed, else a copy of its first ``used`` columns with room to grow."""
    if needed <= buffer.shape[2]:
        return buffer
    capacity = needed + max(HEADROOM_COLUMNS, needed // 2)
    grown = buffer.new_zeros(buffer.shape[0], buffer.shape[1], capacity, buffer.shape[3])
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


def build_cache(key_buffers: list[torch.Tensor], value_buffers: list[torch.Tensor], length: int) -> Cache:
    """Wrap per-layer [B, H_kv, C, d] buffers holding ``length`` columns as a cache the model extends in place."""
    layers = [_BufferLayer(k, v, length) for k, v in zip(key_buffers, value_buffers, strict=True)]
    return Cache(layers=layers)


def read_cache(cache: Cache) -> KV:
    """Per-layer buffers after a forward pass (new tensors only where a buffer had to grow)."""
    keys = [layer.key_buffer for layer in cache.layers]
    values = [layer.value_buffer for layer in cache.layers]
    return keys, values
