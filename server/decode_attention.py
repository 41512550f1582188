"""Attention of a fixed-shape decode step as one Triton kernel: each row's query heads against its own KV, reading
only the columns up to the step's own.

The fixed-shape step (server/static_decode.py) attends over all C columns of a group's [B, H_kv, C, d] buffers
under a mask, so that a CUDA graph can replay it while the batch grows a column per step. With SDPA that means
reading the free columns too (up to half the buffer after a growth), and SDPA's memory-efficient kernel, given
the G query heads of a KV head as G query rows, works on 64-row tiles of which G are used: on an H100 at batch 64
it took 21.5 µs a layer where the bytes it had to read needed 4.3 (bench/RESULTS.md, fourteenth session).

Here one program per (row, KV head) loads the row's G query heads once, walks the KV columns in tiles up to the
step's column (read from a device tensor at run time, so a replayed graph reads as far as the batch has grown, no
further), skips the loads of masked columns (left padding), and keeps an online softmax (running max and sum) in
float32: one pass over the K and V the row really has. Masked columns get no weight, exactly as under SDPA's mask;
sums run in another order, so results match SDPA up to float rounding. On an H100 (1B Llama shape, batch 64,
compiled step) it made the step 11% shorter than SDPA did.

It is a ``torch.library`` custom op, so torch.compile keeps it as one opaque call and CUDA graphs capture it like
any kernel. Triton is imported on first use: CPUs (tests, CI) never need it, except the kernel's own tests, which
run it in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch


def supported(device: torch.device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel serves these shapes on this device: CUDA, Triton importable, a power-of-two head size
    (tl.arange needs one) from 16 to 128 (tl.dot's inner size), and H_q a multiple of H_kv, at most 16 query
    heads per KV head (the padded rows of a dot)."""
    if device.type != "cuda" or head_dim & (head_dim - 1) or not 16 <= head_dim <= 128 or heads % kv_heads:
        return False
    if heads // kv_heads > 16:
        return False
    return _triton_available()


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.library.custom_op("prefix_serve::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor,  # [B, H_q, d]: one query token per row
    keys: torch.Tensor,  # [B, H_kv, C, d], a view of the group's buffers (last stride 1)
    values: torch.Tensor,  # [B, H_kv, C, d]
    mask: torch.Tensor,  # [B, C] bool: the columns each row attends to (its own, and the step's column)
    column: torch.Tensor,  # [1] int64: the step's column; nothing past it is read
    scale: float,
) -> torch.Tensor:
    """Attention output [B, H_q, d] in the query's dtype."""
    rows, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    query = query if query.stride(-1) == 1 else query.contiguous()
    out = torch.empty(rows, heads, head_dim, dtype=query.dtype, device=query.device)
    if rows == 0:
        return out
    kernel, config, interpreted = _kernel()
    kernel[(rows, kv_heads)](
        query,
        keys,
        values,
        mask,
        column,
        out,
        *query.stride()[:2],
        *keys.stride()[:3],
        *values.stride()[:3],
        mask.stride(0),
        *out.stride()[:2],
        scale,
        GROUP=group,
        GROUP_PAD=max(16, 1 << (group - 1).bit_length()),  # tl.dot needs 16 rows, tl.arange a power of two
        HEAD_DIM=head_dim,
        DOT_FP32=interpreted or query.dtype == torch.float32,
        **config,
    )
    return out


@decode_attention.register_fake
def _(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    column: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return query.new_empty(query.shape)


@functools.cache
def _kernel() -> tuple[Any, dict[str, int], bool]:
    """The Triton kernel, the launch options it needs, and whether it is interpreted; imported on first use
    (``triton.jit`` reads TRITON_INTERPRET when it decorates): autotuned on a GPU, one fixed config in Triton's
    interpreter."""
    from server import decode_attention_kernel as module

    if os.environ.get("TRITON_INTERPRET") == "1":
        return module.decode_attention_kernel, module.INTERPRETER_CONFIG, True
    return module.tuned_decode_attention_kernel, {}, False
