"""Chunked prefill fused into the decode step: one forward pass for the running rows and new prompts.

A separate prefill forward reads every weight once more and stalls every running stream for its whole
length. Instead, the tokens of one step are laid out flat, as a single sequence of S = B + sum(n_c) tokens:

    [ decode tokens of group 0 (its B_0 rows) | group 1 | ... | chunk 0 (n_0 prompt tokens) | chunk 1 | ... ]

The model's linear layers, norms and rotary embedding are per token, so they run on this [1, S] input as on
any other. Attention is the only place where tokens of different rows meet, so the attention function
(registered by server/attention.py; this module holds its fused branch) splits the sequence again:

* the B decode tokens write their K/V into column T of the running batch's buffers [B, H_kv, C, d] and attend,
  one query per row, to the row's real columns (the batch's padding mask plus the new column). The running
  rows may be split into several padded groups of similar lengths (server/kv_groups.py), each with its own
  buffers and width: the decode tokens come group after group, and each group attends on its own;
* each chunk writes its n tokens' K/V into its own one-row buffers [1, H_kv, C, d] after the columns already
  filled (the row's prefix and earlier chunks) and attends causally to them.

A speculative step (server/speculative.py) gives each row of a group its input token and its drafts, n_r <= q
queries: the group's tokens come row after row (sum n_r of them), write columns T .. T + n_r - 1 and attend
causally among themselves after the row's real columns. Only attention lays them out padded, [B_g, q]: the
linear layers, which cost a step most, see each row's real queries only.

The layout reaches the attention function as a keyword argument of the model's forward, which transformers
passes unchanged to every attention call. No ``Cache`` object is involved: the function writes K/V itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.functional import scaled_dot_product_attention

# The keyword argument carrying the layout through the model's forward to the attention function.
LAYOUT_KWARG = "prefix_serve_layout"


def placeholder_mask(device: torch.device) -> torch.Tensor:
    """An ``attention_mask`` for forwards whose attention reads a layout instead: [1, 1, 1, 1], never read.

    transformers returns a 4D mask as it is. Given none, it would build a [1, 1, S, S] mask nobody reads, after
    checking the flat position ids for packed sequences with a host sync (``.all()``) every step.
    """
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


@dataclass(frozen=True)
class ChunkSlot:
    """Where one prompt chunk's tokens go: a one-row KV whose first ``start`` columns are filled."""

    keys: list[torch.Tensor]  # per layer [1, H_kv, C, d], C >= start + length
    values: list[torch.Tensor]
    start: int  # columns already in the KV: the row's prefix and its earlier chunks
    length: int  # n, this chunk's tokens


@dataclass(frozen=True)
class DecodeSlot:
    """Where one group of running rows writes and reads: padded [B_g, H_kv, C, d] buffers, T columns in use."""

    keys: list[torch.Tensor]  # per layer [B_g, H_kv, C, d], C >= T + q
    values: list[torch.Tensor]
    width: int  # T: the rows' decode tokens' K/V go to columns T .. T + q - 1
    mask: torch.Tensor  # [B_g, 1, q, T + q] bool, True where a row's query may look
    queries: int = 1  # q, tokens per row: 1, or at most the input token and q - 1 drafts in a speculative step
    # A speculative step's real queries: their indices [sum n_r] int64 in the [B_g·q] layout (row r's query i at
    # r·q + i), in order; None when every row has q.
    real_queries: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def tokens(self) -> int:
        """The group's tokens in the step's flat sequence."""
        if self.real_queries is not None:
            return self.real_queries.shape[0]
        return self.rows * self.queries


@dataclass(frozen=True)
class FusedLayout:
    """What the flat token sequence of one step is made of: decode groups, then prompt chunks."""

    decodes: list[DecodeSlot]
    chunks: list[ChunkSlot]
    # Each chunk's attention mask, the same in every layer: built by the first layer, reused by the others.
    chunk_masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    # Likewise each decode group's additive mask, where decode attention runs as batched matmuls (CPU).
    decode_biases: dict[int, torch.Tensor] = field(default_factory=dict)
    # And each speculative group's mask repeated for the G query heads of a KV head; as a bias on the CPU.
    decode_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    speculative_biases: dict[int, torch.Tensor] = field(default_factory=dict)

    def decode_bias(self, index: int, kv_heads: int, like: torch.Tensor) -> torch.Tensor:
        """Decode group ``index``'s mask as an additive bias [B_g·H_kv, 1, T + 1] in ``like``'s dtype: 0 where a
        row's query may look, -inf elsewhere, repeated per KV head (the batch axis of ``decode_rows_attention``)."""
        if index not in self.decode_biases:
            mask = self.decodes[index].mask  # [B_g, 1, 1, T + 1] bool
            rows, width = mask.shape[0], mask.shape[-1]
            bias = torch.zeros(rows, 1, width, dtype=like.dtype, device=like.device)
            bias.masked_fill_(~mask.view(rows, 1, width), -torch.inf)
            self.decode_biases[index] = bias.expand(rows, kv_heads, width).reshape(rows * kv_heads, 1, width)
        return self.decode_biases[index]

    def speculative_mask(self, index: int, q_per_kv: int) -> torch.Tensor:
        """Speculative group ``index``'s mask as [B_g, 1, G·q, T + q]: query i of each of the G heads sharing a KV
        head sees what the row's query i sees (the heads' queries are laid out head-major, as in ``chunk_mask``)."""
        if index not in self.decode_masks:
            self.decode_masks[index] = self.decodes[index].mask.repeat(1, 1, q_per_kv, 1)
        return self.decode_masks[index]

    def speculative_bias(self, index: int, kv_heads: int, q_per_kv: int, like: torch.Tensor) -> torch.Tensor:
        """The same mask as an additive bias [B_g·H_kv, G·q, T + q] in ``like``'s dtype (0 where a query may look,
        -inf elsewhere), repeated per KV head: the batch axis of the matmuls ``_speculative_rows_attention`` runs
        on a CPU."""
        if index not in self.speculative_biases:
            mask = self.speculative_mask(index, q_per_kv)  # [B_g, 1, G·q, T + q]
            bias = torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(~mask, -torch.inf)
            self.speculative_biases[index] = bias.expand(-1, kv_heads, -1, -1).flatten(0, 1)
        return self.speculative_biases[index]

    def chunk_mask(self, index: int, q_per_kv: int, like: torch.Tensor) -> torch.Tensor | None:
        """The additive mask [1, 1, G·n, start + n] of chunk ``index`` (in ``like``'s dtype and device): query i of
        every head in a KV group sees columns [0, start + i]. None for a one-token chunk, which sees them all."""
        if index not in self.chunk_masks:
            chunk = self.chunks[index]
            start, n = chunk.start, chunk.length
            mask = None
            if n > 1:
                columns = torch.arange(start + n, device=like.device)
                hidden = columns[None, :] > columns[start:, None]  # [n, start + n]
                mask = torch.zeros(hidden.shape, dtype=like.dtype, device=like.device).masked_fill_(hidden, -torch.inf)
                mask = mask.repeat(q_per_kv, 1)[None, None]
            self.chunk_masks[index] = mask
        return self.chunk_masks[index]


def matmul_decode_attention(query: torch.Tensor) -> bool:
    """Whether decode rows attend through ``decode_rows_attention``'s batched matmuls rather than SDPA.

    On a CPU, SDPA's flash kernel spends most of a one-query step on set-up: at 16 rows of 30 columns it took
    108 µs per layer against 45 µs for baddbmm, softmax and bmm, and at 32 rows of 768 columns 2.4 ms against
    2.1 ms (bench/RESULTS.md, ninth session). Only float32: SDPA keeps a bf16 softmax in float32, bmm would not.
    """
    return query.device.type == "cpu" and query.dtype == torch.float32


def decode_rows_attention(
    queries: torch.Tensor,  # [B_g, H_q, d]: one query per row
    keys: torch.Tensor,  # [B_g, H_kv, T, d]
    values: torch.Tensor,  # [B_g, H_kv, T, d]
    mask: torch.Tensor,  # [B_g, 1, 1, T] bool
    scaling: float | None,
    bias: torch.Tensor | None = None,  # the same mask as FusedLayout.decode_bias makes it: [B_g·H_kv, 1, T]
) -> torch.Tensor:
    """Each row's one query against its own KV: [B_g, H_q, d]. The G query heads sharing a KV head (adjacent)
    attend together, as [B_g, H_kv, G, d], so K and V are never repeated per query head.

    Given ``bias``, as batched matmuls over the B_g·H_kv (row, KV head) pairs: scores [B_g·H_kv, G, T] =
    bias + scale · q Kᵀ, then softmax, then · V. K and V stay views of the batch's buffers (their row and head
    axes merge without a copy when the buffers are contiguous).
    """
    rows, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    if bias is None:
        q = queries.reshape(rows, kv_heads, heads // kv_heads, head_dim)
        out = scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(rows, heads, head_dim)
    scale = head_dim**-0.5 if scaling is None else scaling
    q = queries.reshape(rows * kv_heads, heads // kv_heads, head_dim)
    scores = torch.baddbmm(bias, q, keys.flatten(0, 1).transpose(1, 2), alpha=scale)
    out = torch.bmm(torch.softmax(scores, dim=-1), values.flatten(0, 1))  # [B_g·H_kv, G, d]
    return out.reshape(rows, heads, head_dim)


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
    q_per_kv = heads // kv_heads  # G, query heads per KV head; those sharing one are adjacent
    parts: list[torch.Tensor] = []  # per segment [tokens, H_q, d]

    matmuls = matmul_decode_attention(query)
    offset = 0
    for index, group in enumerate(layout.decodes):
        if group.queries > 1:
            parts.append(_speculative_rows_attention(query, key, value, offset, layout, index, layer, scaling))
            offset += group.tokens
            continue
        rows, width = group.rows, group.width
        keys, values = group.keys[layer], group.values[layer]
        keys[:, :, width] = key[0, :, offset : offset + rows].transpose(0, 1)  # [B_g, H_kv, d]
        values[:, :, width] = value[0, :, offset : offset + rows].transpose(0, 1)
        queries = query[0, :, offset : offset + rows].transpose(0, 1)  # [B_g, H_q, d]
        visible = slice(0, width + 1)
        bias = layout.decode_bias(index, kv_heads, query) if matmuls else None
        parts.append(
            decode_rows_attention(queries, keys[:, :, visible], values[:, :, visible], group.mask, scaling, bias)
        )
        offset += rows

    for index, chunk in enumerate(layout.chunks):
        start, n = chunk.start, chunk.length
        end = start + n
        keys, values = chunk.keys[layer], chunk.values[layer]
        keys[0, :, start:end] = key[0, :, offset : offset + n]
        values[0, :, start:end] = value[0, :, offset : offset + n]
        # [1, H_q, n, d] -> [1, H_kv, G·n, d]: the G query heads sharing a KV head attend together.
        q = query[:, :, offset : offset + n].reshape(1, kv_heads, q_per_kv * n, head_dim)
        mask = layout.chunk_mask(index, q_per_kv, query)
        out = scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask, scale=scaling)
        parts.append(out.reshape(heads, n, head_dim).transpose(0, 1))
        offset += n

    return torch.cat(parts)[None]


def _speculative_rows_attention(
    query: torch.Tensor,  # [1, H_q, S, d]
    key: torch.Tensor,  # [1, H_kv, S, d]
    value: torch.Tensor,
    offset: int,  # where the group's B_g·q tokens start in the flat sequence
    layout: FusedLayout,
    index: int,
    layer: int,
    scaling: float | None,
) -> torch.Tensor:
    """A speculative group's attention output [sum n_r, H_q, d], row after row; writes row r's K/V at
    T .. T + n_r - 1 (its columns up to T + q - 1 stay as they were: no real query sees them, padding)."""
    group = layout.decodes[index]
    rows, width, q = group.rows, group.width, group.queries
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[3]
    span = slice(offset, offset + group.tokens)
    step_query, step_key, step_value = query[0, :, span], key[0, :, span], value[0, :, span]  # [H, sum n_r, d]
    keys, values = group.keys[layer], group.values[layer]
    if group.real_queries is None:
        keys[:, :, width : width + q] = step_key.unflatten(1, (rows, q)).transpose(0, 1)  # [B_g, H_kv, q, d]
        values[:, :, width : width + q] = step_value.unflatten(1, (rows, q)).transpose(0, 1)
    else:  # row r's n_r tokens to its columns T .. T + n_r - 1, and its queries to its q slots: [H_q, B_g·q, d]
        row, column = group.real_queries // q, width + group.real_queries % q
        keys[row, :, column] = step_key.transpose(0, 1)  # [sum n_r, H_kv, d]
        values[row, :, column] = step_value.transpose(0, 1)
        padded = step_query.new_zeros(heads, rows * q, head_dim)
        padded[:, group.real_queries] = step_query
        step_query = padded
    # [H_q, B_g·q, d] -> [B_g, H_kv, G·q, d]: the G query heads sharing a KV head attend together.
    queries = step_query.unflatten(1, (rows, q)).transpose(0, 1).reshape(rows, kv_heads, -1, head_dim)
    visible = slice(0, width + q)
    if matmul_decode_attention(query):  # as decode_rows_attention: batched matmuls over (row, KV head) pairs
        bias = layout.speculative_bias(index, kv_heads, heads // kv_heads, query)
        scale = head_dim**-0.5 if scaling is None else scaling
        scores = torch.baddbmm(
            bias, queries.flatten(0, 1), keys[:, :, visible].flatten(0, 1).transpose(1, 2), alpha=scale
        )
        out = torch.bmm(torch.softmax(scores, dim=-1), values[:, :, visible].flatten(0, 1))  # [B_g·H_kv, G·q, d]
    else:
        mask = layout.speculative_mask(index, heads // kv_heads)
        out = scaled_dot_product_attention(
            queries, keys[:, :, visible], values[:, :, visible], attn_mask=mask, scale=scaling
        )  # [B_g, H_kv, G·q, d]
    out = out.reshape(rows, heads, q, head_dim).transpose(1, 2).reshape(rows * q, heads, head_dim)
    return out if group.real_queries is None else out[group.real_queries]
