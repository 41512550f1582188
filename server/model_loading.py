"""Loading the frozen base model and tokenizer, and describing its KV shape."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


@torch.inference_mode()
def probe_kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, KV heads, head size), read off the cache of a one-token forward.

    Reading the real cache avoids per-architecture config arithmetic (GQA, MQA,
    models whose config names differ).
    """
    device = next(model.parameters()).device
    out = model(input_ids=torch.zeros(1, 1, dtype=torch.int64, device=device), use_cache=True)
    layers = out.cache.layers
    _, heads, _, head_dim = layers[0].keys.shape  # [1, H_kv, 1, d]
    return len(layers), heads, head_dim
