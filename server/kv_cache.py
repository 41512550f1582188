"""The one place where the engine's KV layout meets transformers' ``Cache`` objects.

The engine keeps, per layer, keys and values as plain tensors of shape
[B, H_kv, T, d] (rows left-padded, a row's prefix slots are its first real
columns). A forward pass needs a ``Cache``; these helpers wrap the tensors
without copying them and read them back after the model appended the new step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

KV = tuple[list[torch.Tensor], list[torch.Tensor]]


class _BorrowedLayer(DynamicLayer):
    """A ``DynamicLayer`` that starts from existing tensors instead of copying them in."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        # keys/values: [B, H_kv, T, d]; the model's update() appends [B, H_kv, q, d].
        self.keys = keys
        self.values = values
        self.device = keys.device
        self.is_initialized = True


def build_cache(keys: list[torch.Tensor], values: list[torch.Tensor]) -> Cache:
    """Wrap per-layer [B, H_kv, T, d] tensors as a cache the model can extend."""
    return Cache(layers=[_BorrowedLayer(k, v) for k, v in zip(keys, values, strict=True)])


def read_cache(cache: Cache) -> KV:
    """Per-layer keys and values after a forward pass: each [B, H_kv, T + q, d]."""
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return keys, values
