"""Which base-model architectures the server serves exactly, and the one place where they differ: attention masks.

Every architecture listed in ``VERIFIED_ARCHITECTURES`` is checked by
tests/test_architectures.py on a tiny random config: mixed prefixes of
different lengths in one batch equal the uncached PEFT forward (or, where PEFT
cannot run, prompting with the text whose KV became the prefix).

Sliding-window attention is the only place where the runner's padded layout
needs help. transformers derives the window from a key's *column* in the cache,
but a row's columns hold padding before its prefix and, after a prefill of
prompts of unequal length, between its prefix and its prompt; filtering a batch
also drops columns. So for sliding-window models we build the 4-D mask
ourselves from positions: a row's k-th real column holds position k (prefix
slot j is position j, exactly where PEFT's forward places it in the cache), and
a query at position q sees a key at position k iff k <= q and q - k < window.
The window therefore counts prefix slots, as PEFT's forward does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PretrainedConfig

# model_type -> what is special about it (the README's support table says the same).
VERIFIED_ARCHITECTURES: dict[str, str] = {
    "gpt2": "learned absolute positions, MHA",
    "llama": "rotary, GQA (the default model)",
    "mistral": "rotary, GQA, sliding window (exact beyond the window)",
    "qwen2": "rotary, GQA, optional sliding window on upper layers (exact)",
    "qwen3": "rotary, GQA, q/k norm, optional sliding window (exact)",
    "gpt_neox": "partial rotary (rotary_pct), MHA",
    "opt": "learned positions with offset 2, MHA",
    "phi3": "rotary, GQA, optional sliding window (exact)",
    "gemma": "rotary, MQA (1 KV head)",
    "gemma2": "rotary, GQA, alternating sliding window (exact), logit soft-capping",
    "bloom": "ALiBi, MHA",
    "gptj": "partial rotary (rotary_dim), MHA",
    "falcon": "multi-query (1 KV head), rotary or ALiBi; native prefixes only (PEFT cannot run MQA falcon)",
}

# Encoder-decoder models, served with PEFT's seq2seq prefix placement (server/seq2seq_runner.py).
VERIFIED_ENCODER_DECODER: dict[str, str] = {
    "bart": "encoder-decoder, learned positions (per-row decoder positions); prefix in decoder self-attention",
    "t5": "encoder-decoder, relative position buckets; prefix in decoder self-attention",
}

# A prepared attention mask: the runner's 2-D [B, T + q] mask, a 4-D additive [B, 1, q, T + q] mask, or per layer type.
AttentionMask = torch.Tensor | dict[str, torch.Tensor]
MaskBuilder = Callable[[torch.Tensor, torch.Tensor], AttentionMask]


def supported_list() -> str:
    return ", ".join(sorted(VERIFIED_ARCHITECTURES | VERIFIED_ENCODER_DECODER))


def sliding_window_of(config: PretrainedConfig) -> int | None:
    """The window of the model's sliding-window layers, or None when every layer attends to the full context."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # e.g. qwen2 whose max_window_layers covers every layer
    return window


def mask_builder(config: PretrainedConfig, dtype: torch.dtype) -> MaskBuilder:
    """What the runner passes as ``attention_mask`` given its 2-D padding mask and the query positions.

    Models without sliding windows get the 2-D mask unchanged: transformers builds the causal mask itself
    (that path is verified for every architecture above, ALiBi included, since bloom derives ALiBi positions
    from the 2-D mask).
    """
    window = sliding_window_of(config)
    if window is None:
        return lambda mask, positions: mask
    layer_types = getattr(config.get_text_config(), "layer_types", None)

    def build(mask: torch.Tensor, positions: torch.Tensor) -> AttentionMask:
        full, sliding = _position_masks(mask, positions, window, dtype)
        if layer_types is None:  # mistral, phi3: every layer slides and the model takes one 4-D mask
            return sliding
        # qwen2, qwen3, gemma2: the model looks up each layer's mask by its layer type.
        return {"full_attention": full, "sliding_attention": sliding}

    return build


def _position_masks(
    mask: torch.Tensor,  # [B, T + q] int, 1 over real columns
    positions: torch.Tensor,  # [B, q] position of each query
    window: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive 4-D masks [B, 1, q, T + q] (0 = attend) for full and sliding-window layers."""
    key_pos = mask.cumsum(dim=1) - 1  # a row's k-th real column holds position k (batch invariant)
    real = mask.bool()[:, None, :]  # [B, 1, T + q]
    distance = positions[:, :, None] - key_pos[:, None, :]  # [B, q, T + q]
    full = real & (distance >= 0)
    sliding = full & (distance < window)
    # A large negative, not -inf: a padding query row that sees nothing must stay finite (uniform attention),
    # or its NaN would leak through 0-weight products into real rows.
    low = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return (
        torch.where(full, zero, low)[:, None],
        torch.where(sliding, zero, low)[:, None],
    )
