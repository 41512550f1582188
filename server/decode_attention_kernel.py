"""The Triton kernel of server/decode_attention.py (imported only where Triton is installed).

One program per (row, KV head): the G query heads of the KV head (padded to ``GROUP_PAD`` >= 16 rows, what tl.dot
needs) against the row's K and V, tile by tile of ``BLOCK_N`` columns up to the step's column, with an online
softmax in float32. The two products of a tile are tensor-core dots on bf16/fp16 inputs (float32 accumulation);
with ``DOT_FP32`` (float32 models, and Triton's interpreter, whose bf16 dot is wrong) they run in float32 without
tf32, so a float32 model's results stay float32-exact.

A first version summed broadcast products ([G, N, d] in registers) instead of dots: on an H100, in the compiled
step at batch 64, it took 82.5 µs a layer where SDPA took 21.7; this one made that step 11% shorter than with SDPA
(bench/RESULTS.md, fourteenth session).
"""

import triton
import triton.language as tl

# Tiles of 32 to 128 columns, 4 or 8 warps, 2 or 3 stages of loads in flight: picked by timing on the first call
# for each head shape (before any CUDA graph capture: the fixed-shape step runs eagerly first). The kernel only
# writes its output, so the timing runs on the real inputs harmlessly.
CONFIGS = [
    triton.Config({"BLOCK_N": block}, num_warps=warps, num_stages=stages)
    for block, warps, stages in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 2), (128, 8, 3))
]


@triton.jit
def decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    column_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kc,
    stride_vb,
    stride_vh,
    stride_vc,
    stride_mb,
    stride_ob,
    stride_oh,
    scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    heads = tl.arange(0, GROUP_PAD)  # this KV head's query heads, padded to a power of two
    dims = tl.arange(0, HEAD_DIM)
    real_head = heads < GROUP
    q_offsets = row * stride_qb + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=real_head[:, None], other=0.0)  # [GP, d]
    if DOT_FP32:
        q = q.to(tl.float32)
    end = tl.load(column_ptr) + 1  # columns [0, end): the row's KV and the step's own column
    k_row = k_ptr + row * stride_kb + kv_head * stride_kh
    v_row = v_ptr + row * stride_vb + kv_head * stride_vh
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.full([GROUP_PAD], 0.0, tl.float32)
    acc = tl.full([GROUP_PAD, HEAD_DIM], 0.0, tl.float32)
    for start in range(0, end, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        keep = tl.load(mask_ptr + row * stride_mb + columns, mask=columns < end, other=0) != 0  # [N]
        k = tl.load(k_row + columns[:, None] * stride_kc + dims[None, :], mask=keep[:, None], other=0.0)
        if DOT_FP32:  # noqa: SIM108 (a constexpr branch: Triton compiles one side)
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")  # [GP, N]
        else:
            scores = tl.dot(q, tl.trans(k))  # float32 accumulation
        scores = scores * scale
        scores = tl.where(keep[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # A tile with nothing kept leaves the max at -inf: shift by 0 then (every weight is exp(-inf) = 0).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp(scores - shift[:, None])  # [GP, N]
        rescale = tl.exp(running_max - shift)
        v = tl.load(v_row + columns[:, None] * stride_vc + dims[None, :], mask=keep[:, None], other=0.0)
        if DOT_FP32:  # noqa: SIM108 (a constexpr branch: Triton compiles one side)
            part = tl.dot(weights, v.to(tl.float32), input_precision="ieee")  # [GP, d]
        else:
            part = tl.dot(weights.to(v.dtype), v)
        acc = acc * rescale[:, None] + part
        running_sum = running_sum * rescale + tl.sum(weights, 1)
        running_max = new_max
    out = acc / running_sum[:, None]
    out_offsets = row * stride_ob + (kv_head * GROUP + heads)[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=real_head[:, None])


# What the server launches on a GPU. Triton's interpreter (tests on a CPU) has no driver to time configs with,
# so there the plain kernel runs with INTERPRETER_CONFIG.
tuned_decode_attention_kernel = triton.autotune(configs=CONFIGS, key=["HEAD_DIM", "GROUP_PAD"])(decode_attention_kernel)
INTERPRETER_CONFIG = {"BLOCK_N": 32}
