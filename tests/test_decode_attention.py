"""The decode-attention kernel (server/decode_attention.py) against SDPA under the same mask.

Without a GPU the kernel runs in Triton's interpreter (numpy on the CPU), which the tests switch on before the
kernel is first defined; without Triton installed they skip (the server then never uses the kernel).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton's first import (tests/conftest.py sets it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from server.decode_attention import decode_attention
from server.fused_step import decode_rows_attention
from server.model_loading import probe_kv_shape
from server.runner import ModelRunner
from tests.test_static_decode import STEPS, _requests
from tests.tiny_models import tiny_llama

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(rows: int, heads: int, kv_heads: int, head_dim: int, capacity: int, column: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + heads * 100 + column)
    query = torch.randn(rows, heads, head_dim, generator=gen).to(DEVICE, dtype)
    keys = torch.randn(rows, kv_heads, capacity, head_dim, generator=gen).to(DEVICE, dtype)
    values = torch.randn(rows, kv_heads, capacity, head_dim, generator=gen).to(DEVICE, dtype)
    # Past the step's column the buffers hold NaN: a kernel that read them would return NaN.
    keys[:, :, column + 1 :] = float("nan")
    values[:, :, column + 1 :] = float("nan")
    mask = torch.zeros(rows, capacity, dtype=torch.bool, device=DEVICE)
    for r in range(rows):
        start = (r * 7) % (column + 1)  # left padding of different widths; the last row may keep only ``column``
        mask[r, start : column + 1] = True
    mask[-1, :column] = False
    keys[-1, :, :column] = float("nan")  # masked columns of a row are never read either
    values[-1, :, :column] = float("nan")
    return query, keys, values, mask, torch.tensor([column], device=DEVICE)


def _reference(query, keys, values, mask, column, scale):
    end = int(column) + 1  # SDPA over the columns up to the step's: NaN past them would poison its sums
    k, v = keys[:, :, :end].float(), values[:, :, :end].float()
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)  # masked columns: weight 0 under the mask
    return decode_rows_attention(query.float(), k, v, mask[:, None, None, :end], scale)


@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "head_dim", "capacity", "column"),
    [
        (3, 4, 2, 16, 100, 70),  # G = 2, columns over two tiles, free columns after
        (2, 8, 2, 32, 64, 63),  # the step's column the last of a full tile
        (4, 6, 2, 16, 200, 128),  # G = 3 (padded to 16 rows), the column opening a third tile
        (2, 4, 4, 16, 40, 5),  # G = 1 (MHA), one short tile
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_equals_sdpa_under_the_mask(rows, heads, kv_heads, head_dim, capacity, column, dtype) -> None:
    query, keys, values, mask, col = _case(rows, heads, kv_heads, head_dim, capacity, column, dtype)
    scale = head_dim**-0.5
    got = decode_attention(query, keys, values, mask, col, scale)
    assert got.shape == query.shape and got.dtype == dtype
    assert torch.isfinite(got).all()
    want = _reference(query, keys, values, mask, col, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)


def test_a_strided_query_view_is_read_as_it_lies() -> None:
    """The step passes a view [B, H_q, d] of a [1, H_q, B, d] tensor (rows not adjacent in memory)."""
    query, keys, values, mask, col = _case(3, 4, 2, 16, 80, 40, torch.float32)
    strided = query.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    got = decode_attention(strided, keys, values, mask, col, 0.25)
    torch.testing.assert_close(got, _reference(query, keys, values, mask, col, 0.25), rtol=1e-5, atol=1e-5)


def test_fixed_shape_steps_with_the_kernel_equal_the_eager_decode() -> None:
    """Through the runner: prefixes and prompts of different lengths, buffer growth, a row leaving."""
    base = tiny_llama(seed=5)
    shape = probe_kv_shape(base)
    eager = ModelRunner(copy.deepcopy(base), *shape, static_decode=False)
    static = ModelRunner(base, *shape, static_decode=True, onednn_linear=False)
    static.static_decoder.kernel = True  # what supported() turns on with CUDA; here the interpreter runs it
    requests = _requests(base)
    batches = [runner.prefill(requests)[0] for runner in (eager, static)]
    for step in range(STEPS):
        if step == STEPS // 2:
            batches = [b.filter(["r0", "r2", "r3"]) for b in batches]
        assert torch.equal(static.decode(batches[1]), eager.decode(batches[0])), f"step {step}"
    assert static.static_decoder._step.layout.kernel
