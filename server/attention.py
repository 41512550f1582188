"""Grouped-query attention on the KV heads, registered with transformers' ``AttentionInterface``.

transformers' SDPA path copies each layer's K and V from H_kv to H_q heads (``repeat_kv``) whenever a query
of more than one token comes with a mask, which is every prefill of a batch holding prefixes or prompts of
unequal length. That copy is avoidable: the G = H_q / H_kv query heads sharing a KV head are contiguous
(query head h reads KV head h // G, exactly what ``repeat_kv`` builds), so the queries of a group can be
stacked along the query-length axis and attend to their one KV head:

    Q [B, H_q, q, d] -> [B, H_kv, G·q, d],   mask [B, 1, q, T] -> [B, 1, G·q, T],   K, V [B, H_kv, T, d] as they are

Each output row is the same softmax over the same keys as before, so the result equals stock attention
(up to float summation order). Everything else (one query token, no mask, MHA, soft-capping, attention sinks,
dropout, ALiBi-style position bias) goes to transformers' own SDPA function unchanged: one query token is
already packed that way there, and a missing mask means SDPA's own GQA with ``is_causal``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from server.fused_step import LAYOUT_KWARG, fused_attention_forward
from server.static_decode import StaticDecodeLayout, static_decode_attention

ATTENTION_NAME = "prefix_serve_gqa"

# Architectures whose attention modules call the generic interface with the SDPA contract (query/key/value
# [B, H, len, d], ``num_key_value_groups`` on the module) and that tests/test_architectures.py verifies with
# this function in place. MHA models (gpt2, opt, gpt_neox, gptj) gain nothing; bloom and falcon do not use it.
GQA_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"})

# kwargs that change what attention computes; when one is set, the stock function decides.
_STOCK_ONLY = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")


def gqa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H_q, q, d]
    key: torch.Tensor,  # [B, H_kv, T, d], possibly a strided view of a larger buffer
    value: torch.Tensor,  # [B, H_kv, T, d]
    attention_mask: torch.Tensor | None,  # [B or 1, 1, q, T] bool or additive, or None (causal or single query)
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention output [B, q, H_q, d] (the layout transformers' attention functions return)."""
    layout = kwargs.get(LAYOUT_KWARG)
    if isinstance(layout, StaticDecodeLayout):  # a decode step of fixed shape (server/static_decode.py)
        return static_decode_attention(module, query, key, value, layout, scaling), None
    if layout is not None:  # a flat step of decode rows and prompt chunks (server/fused_step.py)
        return fused_attention_forward(module, query, key, value, layout, scaling), None
    groups = query.shape[1] // key.shape[1]
    q_len = query.shape[2]
    if (
        groups == 1
        or q_len == 1
        or attention_mask is None
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or dropout != 0.0
        or any(kwargs.get(name) for name in _STOCK_ONLY)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    folded = query.reshape(batch, kv_heads, groups * q_len, head_dim)  # a view: heads of a group are adjacent
    mask = attention_mask.expand(-1, groups, -1, -1).reshape(attention_mask.shape[0], 1, groups * q_len, -1)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    # [B, H_kv, G·q, d] -> [B, H_q, q, d] -> [B, q, H_q, d]
    return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``ATTENTION_NAME`` a valid attention implementation, with SDPA's masks (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, gqa_attention_forward)
    # Without a mask function of the same name transformers builds no mask at all for a custom implementation.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def use_gqa_attention(model: PreTrainedModel) -> bool:
    """Switch a loaded model to ``ATTENTION_NAME`` where that is verified exact; returns whether it did."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or str(config.model_type) not in GQA_ARCHITECTURES:
        return False
    if config._attn_implementation != "sdpa":  # eager (e.g. asked for explicitly) or flash: leave it alone
        return False
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    return config._attn_implementation == ATTENTION_NAME
