"""Chunked prefill fused into the decode step: one forward pass for the running rows and new prompts.

A separate prefill forward reads every weight once more and stalls every running stream for its whole
length. Instead, the tokens of one step are laid out flat, as a single sequence of S = B + sum(n_c) tokens:

    [ decode token of row 0 | ... | decode token of row B-1 | chunk 0 (n_0 prompt tokens) | chunk 1 | ... ]

The model's linear layers, norms and rotary embedding are per token, so they run on this [1, S] input as on
any other. Attention is the only place where tokens of different rows meet, so the attention function
(registered by server/attention.py; this module holds its fused branch) splits the sequence again:

* the B decode tokens write their K/V into column T of the running batch's buffers [B, H_kv, C, d] and attend,
  one query per row, to the row's real columns (the batch's padding mask plus the new column);
* each chunk writes its n tokens' K/V into its own one-row buffers [1, H_kv, C, d] after the columns already
  filled (the row's prefix and earlier chunks) and attends causally to them.

The layout reaches the attention function as a keyword argument of the model's forward, which transformers
passes unchanged to every attention call. No ``Cache`` object is involved: the function writes K/V itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention

# The keyword argument carrying the layout through the model's forward to the attention function.
LAYOUT_KWARG = "prefix_serve_layout"


@dataclass(frozen=True)
class ChunkSlot:
    """Where one prompt chunk's tokens go: a one-row KV whose first ``start`` columns are filled."""

    keys: list[torch.Tensor]  # per layer [1, H_kv, C, d], C >= start + length
    values: list[torch.Tensor]
    start: int  # columns already in the KV: the row's prefix and its earlier chunks
    length: int  # n, this chunk's tokens


@dataclass(frozen=True)
class FusedLayout:
    """What the flat token sequence of one step is made of."""

    decode_keys: list[torch.Tensor]  # per layer [B, H_kv, C, d], C > T; empty when no row decodes
    decode_values: list[torch.Tensor]
    decode_width: int  # T: the decode tokens' K/V go to column T
    decode_mask: torch.Tensor | None  # [B, 1, 1, T + 1] bool, True where a row's query may look
    chunks: list[ChunkSlot]

    @property
    def decode_rows(self) -> int:
        return 0 if self.decode_mask is None else self.decode_mask.shape[0]


def fused_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H_q, S, d]
    key: torch.Tensor,  # [1, H_kv, S, d], rotary already applied
    value: torch.Tensor,  # [1, H_kv, S, d]
    layout: FusedLayout,
    scaling: float | None,
) -> torch.Tensor:
    """Attention output [1, S, H_q, d] for a flat step; writes the step's K/V into the layout's buffers."""
    layer = module.layer_idx
    heads, head_dim = query.shape[1], query.shape[3]
    kv_heads = key.shape[1]
    groups = heads // kv_heads  # query heads per KV head; those of one group are adjacent
    parts: list[torch.Tensor] = []  # per segment [tokens, H_q, d]

    rows = layout.decode_rows
    if rows:
        width = layout.decode_width
        keys, values = layout.decode_keys[layer], layout.decode_values[layer]
        keys[:, :, width] = key[0, :, :rows].transpose(0, 1)  # [B, H_kv, d]
        values[:, :, width] = value[0, :, :rows].transpose(0, 1)
        # One query per row; the G queries of a KV head's group attend together: [B, H_kv, G, d].
        q = query[0, :, :rows].transpose(0, 1).reshape(rows, kv_heads, groups, head_dim)
        out = scaled_dot_product_attention(
            q,
            keys[:, :, : width + 1],
            values[:, :, : width + 1],
            attn_mask=layout.decode_mask,
            scale=scaling,
        )
        parts.append(out.reshape(rows, heads, head_dim))

    offset = rows
    for chunk in layout.chunks:
        start, n = chunk.start, chunk.length
        end = start + n
        keys, values = chunk.keys[layer], chunk.values[layer]
        keys[0, :, start:end] = key[0, :, offset : offset + n]
        values[0, :, start:end] = value[0, :, offset : offset + n]
        # [1, H_q, n, d] -> [1, H_kv, G·n, d]: query i of every head in a group sees columns [0, start + i].
        q = query[:, :, offset : offset + n].reshape(1, kv_heads, groups * n, head_dim)
        columns = torch.arange(end, device=query.device)
        visible = columns[None, :] <= columns[start:, None]  # [n, start + n]
        mask = visible.repeat(groups, 1)[None, None]  # [1, 1, G·n, start + n]
        out = scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask, scale=scaling)
        parts.append(out.reshape(heads, n, head_dim).transpose(0, 1))
        offset += n

    return torch.cat(parts)[None]
