"""The fixed-shape decode step (what CUDA graphs replay) equals the eager decode, step for step."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from server.fused_projections import is_fused
from server.kv_cache import HEADROOM_COLUMNS
from server.model_loading import probe_kv_shape
from server.runner import ModelRunner, NewRequest
from server.sampling import SamplingParams
from tests.tiny_models import peft_prefix_model, prefix_kv_of, tiny_llama

# More steps than a fresh buffer's headroom, so the buffers grow (new addresses) while decoding.
STEPS = HEADROOM_COLUMNS + 16


def _requests(base) -> list[NewRequest]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for i, (p, n) in enumerate([(3, 5), (0, 7), (6, 2), (1, 9)]):
        prompt = torch.randint(3, 250, (n,), generator=gen).tolist()
        kv = prefix_kv_of(peft_prefix_model(copy.deepcopy(base), p, seed=30 + i)) if p else None
        out.append(NewRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=STEPS), kv, f"t{i}" if p else None))
    return out


def test_static_decode_equals_eager_decode_through_growth_and_filtering() -> None:
    base = tiny_llama(seed=5)
    shape = probe_kv_shape(base)
    eager, static = ModelRunner(base, *shape, static_decode=False), ModelRunner(base, *shape, static_decode=True)
    assert eager.static_decoder is None and static.static_decoder is not None
    assert not static.static_decoder.use_graphs  # on a CPU the step always runs eagerly
    requests = _requests(base)
    batches = [runner.prefill(requests)[0] for runner in (eager, static)]
    for step in range(STEPS):
        if step == STEPS // 2:  # a row leaves: new buffers, so a new fixed-shape step
            batches = [b.filter(["r0", "r2", "r3"]) for b in batches]
        want, got = eager.decode(batches[0]), static.decode(batches[1])
        assert torch.equal(got, want), f"step {step}"
        batches[1].check()
    e, s = batches
    assert torch.equal(e.attention_mask, s.attention_mask)
    assert torch.equal(e.next_positions, s.next_positions)
    width = e.width
    for k_e, k_s, v_e, v_s in zip(e.keys, s.keys, e.values, s.values, strict=True):
        torch.testing.assert_close(k_s[:, :, :width], k_e[:, :, :width])
        torch.testing.assert_close(v_s[:, :, :width], v_e[:, :, :width])


def test_reserved_buffers_never_grow_and_keep_their_room_through_leaves_and_joins() -> None:
    """``reserve_decode`` (the default with the decode-attention kernel): a batch's buffers hold every decode step
    its rows may take, so the fixed-shape step keeps its buffers (on CUDA: its graph) from the first step to the
    last, through more steps than the default headroom; a row leaving and a row joining keep the room the rows
    still need. The tokens stay the growing eager decode's."""
    from server.batch import Batch

    base = tiny_llama(seed=5)
    shape = probe_kv_shape(base)
    eager = ModelRunner(base, *shape, static_decode=False)
    reserved = ModelRunner(base, *shape, static_decode=True, reserve_decode=True)
    assert not eager.reserve_decode
    requests = _requests(base)
    batches = [runner.prefill(requests)[0] for runner in (eager, reserved)]
    assert batches[1].keeps_room and batches[1].room == STEPS
    late = NewRequest("late", [9, 8, 7], SamplingParams(max_new_tokens=STEPS + 5))
    late_rows = [runner.prefill([late])[0] for runner in (eager, reserved)]
    decoder = reserved.static_decoder
    steps_seen: list[object] = []  # the fixed-shape steps, held (an id() of a freed one could come back)
    for step in range(STEPS):
        if step == STEPS // 2:  # a row leaves
            batches = [b.filter(["r0", "r2", "r3"]) for b in batches]
            assert batches[1].room == STEPS - step
        if step == STEPS // 2 + 3:  # a row joins with more steps to go than the others: its room is kept
            assert late_rows[1].room == STEPS + 5
            batches = [Batch.concatenate([b, row]) for b, row in zip(batches, late_rows, strict=True)]
            assert batches[1].keeps_room and batches[1].room == STEPS + 5
            late_rows = []
        want, got = eager.decode(batches[0]), reserved.decode(batches[1])
        assert torch.equal(got, want), f"step {step}"
        if not steps_seen or steps_seen[-1] is not decoder._step:
            steps_seen.append(decoder._step)
        batches[1].check()
    # One fixed-shape step per set of buffers: the first, after the leave, after the join. No growth.
    assert len(steps_seen) == 3
    assert batches[1].room == STEPS + 5 - (STEPS - (STEPS // 2 + 3))
    assert batches[0].room < batches[1].room  # the eager buffers grew by the default policy instead


def test_reserved_room_is_capped() -> None:
    """A request that may run to the server's 2,048 new tokens reserves RESERVED_DECODE_COLUMNS, not 2,048 columns
    a row from its first step; past them its buffers grow as others do."""
    from server.kv_cache import RESERVED_DECODE_COLUMNS

    base = tiny_llama(seed=5)
    reserved = ModelRunner(base, *probe_kv_shape(base), static_decode=True, reserve_decode=True)
    long = NewRequest("long", [5, 6, 7], SamplingParams(max_new_tokens=RESERVED_DECODE_COLUMNS + 1000))
    batch, _ = reserved.prefill([long])
    assert batch.room == RESERVED_DECODE_COLUMNS
    batch.keys = [k[:, :, : batch.width + 1] for k in batch.keys]  # as if the room were spent
    batch.values = [v[:, :, : batch.width + 1] for v in batch.values]
    reserved.decode(batch)
    reserved.decode(batch)  # no room left: grows (by half), as without reservation
    assert batch.room > 0


def test_a_failed_capture_leaves_the_steps_eager_and_right(caplog) -> None:
    """Graph capture fails on a CPU (no CUDA streams): the decoder says so once, stays eager, loses nothing."""
    base = tiny_llama(seed=5)
    shape = probe_kv_shape(base)
    eager, static = ModelRunner(base, *shape, static_decode=False), ModelRunner(base, *shape, static_decode=True)
    static.static_decoder.use_graphs = True
    requests = _requests(base)
    batches = [runner.prefill(requests)[0] for runner in (eager, static)]
    for step in range(12):
        assert torch.equal(static.decode(batches[1]), eager.decode(batches[0])), f"step {step}"
    assert not static.static_decoder.use_graphs and static.static_decoder.captures == 0
    assert [r.message for r in caplog.records].count("CUDA graph capture failed; decode steps stay eager") == 1


async def test_an_idle_engine_lets_go_of_the_last_batch() -> None:
    """The fixed-shape step holds the batch's KV buffers (and on CUDA its graph): released when nothing runs."""
    from server.engine import GenerationRequest
    from tests.test_engine import collect, make_engine, tokens_of

    base = tiny_llama(seed=5)
    engine = make_engine(base, static_decode=True)
    try:
        decoder = engine.runner.static_decoder
        events = await collect(engine, GenerationRequest([5, 6, 7], SamplingParams(max_new_tokens=6)))
        assert len(tokens_of(events)) == 6
        for _ in range(200):
            if decoder._step is None:
                break
            await asyncio.sleep(0.01)
        assert decoder._step is None
    finally:
        engine.shutdown()


def test_static_decode_of_groups_equals_the_fused_step() -> None:
    """Rows in several padded groups (server/kv_groups.py): a step without prompt chunks decodes them at fixed
    shapes, group after group in one forward, with the tokens and KV of the eager fused step."""
    base = tiny_llama(seed=5)
    shape = probe_kv_shape(base)
    eager, static = ModelRunner(base, *shape, static_decode=False), ModelRunner(base, *shape, static_decode=True)
    requests = _requests(base)
    # Three groups of unequal widths and sizes: [r0, r1], [r2], [r3].
    parts = (requests[:2], requests[2:3], requests[3:])
    groups = [[runner.prefill(part)[0] for part in parts] for runner in (eager, static)]
    for step in range(STEPS):
        want, firsts = eager.fused_step(groups[0], [])
        got, no_firsts = static.fused_step(groups[1], [])
        assert firsts == no_firsts == []
        for g, (w, t) in enumerate(zip(want, got, strict=True)):
            assert torch.equal(t, w), f"step {step}, group {g}"
    for e, s in zip(*groups, strict=True):
        s.check()
        assert torch.equal(e.attention_mask, s.attention_mask)
        width = e.width
        for k_e, k_s in zip(e.keys, s.keys, strict=True):
            torch.testing.assert_close(k_s[:, :, :width], k_e[:, :, :width])


@pytest.mark.parametrize(
    ("fuse_projections", "kernel"),
    [(False, False), (True, False), (True, True)],
    ids=["stock-layers", "fused-projections", "fused-projections-decode-kernel"],
)
def test_compiled_static_decode_equals_eager_decode(fuse_projections: bool, kernel: bool) -> None:
    """``compile_decode``: the fixed-shape step through torch.compile (Inductor, dynamic shapes) gives the eager
    step's greedy tokens, through growth and a row leaving, and for rows in three groups. The server's startup
    compiles (one per number of groups) cover them all: nothing compiles under traffic. With fused projections
    and the decode-attention kernel (the defaults on CUDA; here the kernel runs in Triton's interpreter, a custom
    op inside the compiled step) the compiled step gives the stock layers' eager tokens."""
    from torch._dynamo.utils import counters

    if kernel:
        pytest.importorskip("triton")

    base = tiny_llama(seed=5)
    shape = probe_kv_shape(base)
    served = copy.deepcopy(base) if fuse_projections else base
    eager = ModelRunner(base, *shape, static_decode=False, fuse_projections=False)  # the stock layers
    compiled = ModelRunner(served, *shape, static_decode=True, compile_decode=True, fuse_projections=fuse_projections)
    assert is_fused(served.model.layers[0].mlp) == fuse_projections
    assert compiled.static_decoder is not None and compiled.static_decoder.compiled
    compiled.static_decoder.kernel = kernel  # what decode_attention.supported() turns on with CUDA
    compiled.compile_decode_steps(3)  # what the server does at startup: dummy rows, then the step is let go
    assert compiled.static_decoder._step is None
    graphs = counters["stats"]["unique_graphs"]
    requests = _requests(base)
    with torch.inference_mode():  # as in the engine, whose steps (filters and joins too) run in inference mode
        batches = [runner.prefill(requests)[0] for runner in (eager, compiled)]
        for step in range(STEPS):
            if step == STEPS // 2:
                batches = [b.filter(["r0", "r2", "r3"]) for b in batches]
            assert torch.equal(compiled.decode(batches[1]), eager.decode(batches[0])), f"step {step}"
        assert compiled.static_decoder._step.layout.kernel is kernel  # the attention the steps ran with
        parts = (requests[:2], requests[2:3], requests[3:])  # a group of one row runs uncompiled
        parts_of_two = (requests[:2], requests[2:])
        for grouping in (parts, parts_of_two):
            groups = [[runner.prefill(part)[0] for part in grouping] for runner in (eager, compiled)]
            for step in range(8):
                want, got = eager.fused_step(groups[0], [])[0], compiled.fused_step(groups[1], [])[0]
                for g, (w, t) in enumerate(zip(want, got, strict=True)):
                    assert torch.equal(t, w), f"step {step}, group {g}"
    assert counters["stats"]["unique_graphs"] == graphs, "a step compiled again after startup"


def test_a_failed_compile_leaves_the_steps_uncompiled_and_right(caplog) -> None:
    """If torch.compile cannot handle the forward, the decoder says so once and serves the step uncompiled."""
    base = tiny_llama(seed=5)
    shape = probe_kv_shape(base)
    eager, static = ModelRunner(base, *shape, static_decode=False), ModelRunner(base, *shape, static_decode=True)
    decoder = static.static_decoder

    def unsupported(*args, **kwargs):
        raise RuntimeError("dynamo cannot trace this")

    decoder.compiled, decoder._step_forward = True, unsupported  # what a failing compile looks like
    requests = _requests(base)
    batches = [runner.prefill(requests)[0] for runner in (eager, static)]
    for step in range(12):
        assert torch.equal(static.decode(batches[1]), eager.decode(batches[0])), f"step {step}"
    assert not decoder.compiled
    messages = [r.message for r in caplog.records]
    assert messages.count("torch.compile of the decode step failed; decode steps run uncompiled") == 1


def test_a_failing_uncompiled_step_is_an_error_not_a_failed_compile() -> None:
    """A step that runs uncompiled (here: a group of one row) and fails raises; compiling stays on."""
    base = tiny_llama(seed=5)
    static = ModelRunner(base, *probe_kv_shape(base), static_decode=True)
    decoder = static.static_decoder

    def unsupported(*args, **kwargs):
        raise RuntimeError("dynamo cannot trace this")

    def broken(*args, **kwargs):
        raise ValueError("a real failure")

    decoder.compiled, decoder._step_forward, decoder._forward = True, unsupported, broken
    (batch, _) = static.prefill(_requests(base)[:1])
    with pytest.raises(ValueError, match="a real failure"):
        static.decode(batch)
    assert decoder.compiled
