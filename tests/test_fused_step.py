"""Chunked prefill fused into decode steps (server/fused_step.py) equals the PEFT oracle, for every row.

Rows join a batch that keeps decoding while their prompts go in chunk by chunk; chunks of several prompts
share steps; finished rows leave. Logits of every step must match PEFT's uncached forward.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from server import fused_step, kv_groups
from server.batch import Batch
from server.engine import CHUNK_OVERHEAD_TOKENS, ROW_START_TOKENS, Engine, GenerationRequest
from server.fused_projections import is_fused
from server.metrics import ServerMetrics
from server.model_loading import probe_kv_shape
from server.runner import ModelRunner, NewRequest, PendingPrefill
from server.sampling import SamplingParams
from tests.test_architectures import (
    ARCHITECTURES,
    LONG_STEPS,
    STEPS,
    Case,
    _prefix_id,
    assert_matches,
    make_model,
    runner_for,
    setup,
)
from tests.test_engine import collect, make_engine, tokens_of
from tests.tiny_models import oracle_greedy

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

# Architectures whose runner fuses prompt chunks into decode steps: GQA/MQA on our attention, no sliding window.
FUSING = {"llama", "qwen3", "gemma-mqa"}


def test_which_architectures_fuse() -> None:
    fusing = {name for name in ARCHITECTURES if runner_for(setup(name).base).fuses_prefill}
    assert fusing == FUSING


@torch.inference_mode()  # as fused_step does around this private forward
def run_fused(
    runner: ModelRunner, cases: list[Case], budget: int, admit_per_step: int, max_groups: int = 1
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Admit cases a few per step; each step feeds the oldest prompts ``budget`` tokens and decodes the rest.

    Finished prompts join the running rows as the engine places them, in up to ``max_groups`` groups.
    """
    requests = [
        NewRequest(f"r{i}", c.prompt, SamplingParams(max_new_tokens=STEPS), c.prefix_kv, _prefix_id(c, f"t{i}"))
        for i, c in enumerate(cases)
    ]
    logits: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in requests}
    waiting = list(requests)
    pending: list[tuple[str, PendingPrefill]] = []
    groups: list[Batch] = []
    saw_shared_step = False  # a step holding decode rows and chunks of two prompts
    most_groups = 0
    while waiting or pending or groups:
        for request in waiting[:admit_per_step]:
            pending.append((request.request_id, runner.begin_prefill(request)))
        waiting = waiting[admit_per_step:]
        chunks, left = [], budget
        for _, p in pending:
            if left == 0:
                break
            chunks.append((p, min(p.remaining, left)))
            left -= chunks[-1][1]
        saw_shared_step |= bool(groups) and len(chunks) >= 2
        most_groups = max(most_groups, len(groups))
        step = runner._fused_forward(groups, chunks)  # [B + finished prompts, V]
        rows = 0
        for batch in groups:
            for row, row_logits in zip(batch.rows, step[rows : rows + len(batch)], strict=True):
                logits[row.request_id].append(row_logits)
            batch.next_input_ids = step[rows : rows + len(batch)].argmax(-1)
            batch.check()
            rows += len(batch)
        joining = []
        for p, _ in chunks:
            if p.remaining:
                continue
            request_id = next(r for r, q in pending if q is p)
            pending = [(r, q) for r, q in pending if q is not p]
            logits[request_id].append(step[rows])
            p.batch.next_input_ids = step[rows : rows + 1].argmax(-1)
            p.batch.check()
            joining.append(p.batch)
            rows += 1
        groups = [g.filter([r.request_id for r in g.rows if len(logits[r.request_id]) < STEPS]) for g in groups]
        groups = kv_groups.join([g for g in groups if g is not None], joining, max_groups)
    assert saw_shared_step or budget == 1, "the schedule never mixed decode rows with two prompts' chunks"
    assert most_groups == max_groups, f"{most_groups} groups decoded together at most, {max_groups} allowed"
    per_row = [logits[r.request_id] for r in requests]
    return [[int(x.argmax()) for x in rows] for rows in per_row], per_row


@pytest.mark.parametrize("budget", [1, 3, 7, 64])
@pytest.mark.parametrize("name", sorted(FUSING))
def test_fused_steps_match_peft_forward(name: str, budget: int) -> None:
    s = setup(name)
    assert s.peft_cases is not None
    cases = s.peft_cases + s.peft_cases[:2]  # more rows than steps of one prompt: joins overlap decodes
    # Whole prompts fit one step at 64: admitting two per step puts two prompts in one step.
    admit_per_step = 2 if budget == 64 else 1
    assert_matches(cases, *run_fused(runner_for(s.base), cases, budget, admit_per_step))


@pytest.mark.parametrize("budget", [3, 64])
@pytest.mark.parametrize("name", sorted(FUSING))
def test_rows_in_several_groups_match_peft_forward(name: str, budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of different lengths decode in separate padded groups of one forward: every row still equals PEFT.
    No slack: the cases' lengths differ by a few columns, and each difference should start a group."""
    monkeypatch.setattr(kv_groups, "SLACK_COLUMNS", 0)
    s = setup(name)
    assert s.peft_cases is not None
    cases = s.peft_cases + s.peft_cases[:2]
    assert_matches(cases, *run_fused(runner_for(s.base), cases, budget, admit_per_step=2, max_groups=3))


@pytest.mark.parametrize("name", sorted(FUSING))
def test_sdpa_decode_attention_matches_peft_forward(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDPA branch of decode attention (what a GPU runs) against PEFT, with the matmul branch switched off."""
    monkeypatch.setattr(fused_step, "matmul_decode_attention", lambda query: False)
    s = setup(name)
    assert s.peft_cases is not None
    cases = s.peft_cases + s.peft_cases[:2]
    assert_matches(cases, *run_fused(runner_for(s.base), cases, 3, admit_per_step=1))


@pytest.mark.parametrize("name", sorted(FUSING))
def test_fused_steps_on_fused_projections_match_peft_forward(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a GPU serves by default: q/k/v and gate/up fused (server/fused_projections.py), prompt chunks in decode
    steps, rows in several groups, SDPA decode attention. Every row still equals PEFT's forward."""
    monkeypatch.setattr(fused_step, "matmul_decode_attention", lambda query: False)
    monkeypatch.setattr(kv_groups, "SLACK_COLUMNS", 0)
    s = setup(name)
    assert s.peft_cases is not None
    # The same seeded weights, built afresh: the shared base's dense weights may have become placeholders behind
    # packed oneDNN copies (other tests' runners), and it stays as built.
    served = make_model(name)
    runner = ModelRunner(served, *probe_kv_shape(served), onednn_linear=False, fuse_projections=True)
    assert any(is_fused(module) for module in served.modules())
    cases = s.peft_cases + s.peft_cases[:2]
    assert_matches(cases, *run_fused(runner, cases, 3, admit_per_step=2, max_groups=3))


def test_matmul_decode_attention_equals_sdpa_and_ignores_hidden_columns() -> None:
    """Rows with hidden columns (left padding, holes) give SDPA's output, and what a hidden column holds does not
    change it: the additive bias must hide exactly what the boolean mask hides, per row and KV head."""
    torch.manual_seed(0)
    rows, kv_heads, q_per_kv, width, head_dim = 5, 3, 3, 11, 8
    queries = torch.randn(rows, kv_heads * q_per_kv, head_dim)
    keys = torch.randn(rows, kv_heads, width + 4, head_dim)[:, :, :width]  # a view of wider buffers, as served
    values = torch.randn(rows, kv_heads, width + 4, head_dim)[:, :, :width]
    mask = torch.rand(rows, 1, 1, width) > 0.4
    mask[..., -1] = True  # a row's new column is always visible
    layout = fused_step.FusedLayout([fused_step.DecodeSlot([keys], [values], width - 1, mask)], [])
    bias = layout.decode_bias(0, kv_heads, queries)
    assert bias.shape == (rows * kv_heads, 1, width)
    assert fused_step.matmul_decode_attention(queries)
    matmuls = fused_step.decode_rows_attention(queries, keys, values, mask, 0.3, bias)
    sdpa = fused_step.decode_rows_attention(queries, keys, values, mask, 0.3)
    torch.testing.assert_close(matmuls, sdpa)
    hidden = ~mask[:, 0, 0]  # [rows, width]
    keys.masked_fill_(hidden[:, None, :, None], 1e4)
    values.masked_fill_(hidden[:, None, :, None], -1e4)
    torch.testing.assert_close(fused_step.decode_rows_attention(queries, keys, values, mask, 0.3, bias), matmuls)


def test_chunk_must_fit_the_prompt() -> None:
    runner = runner_for(setup("llama").base)
    pending = runner.begin_prefill(NewRequest("r", [5, 6, 7], SamplingParams()))
    with pytest.raises(ValueError, match="3 left"), torch.inference_mode():
        runner._fused_forward([], [(pending, 4)])


async def decoding_streams(engine: Engine, case: Case, n: int) -> list[asyncio.Task[list[int]]]:
    """Start ``n`` requests for ``case`` and return once each has its first two tokens; each task's result is its
    tokens."""
    decoding = asyncio.Semaphore(0)

    async def stream() -> list[int]:
        tokens: list[int] = []
        request = GenerationRequest(case.prompt, SamplingParams(max_new_tokens=LONG_STEPS), case.prefix_kv, "t")
        async for event in engine.generate(request):
            if event.token_id is not None:
                tokens.append(event.token_id)
            if len(tokens) == 2:
                decoding.release()
        return tokens

    streams = [asyncio.create_task(stream()) for _ in range(n)]
    for _ in streams:
        await decoding.acquire()
    return streams


async def test_engine_feeds_prompts_in_budgeted_chunks_while_streams_decode() -> None:
    """Budget 8: a 30-token prompt takes 6 steps, every one of which also decodes the running request. Each
    chunk pays its overhead out of the budget: 2 tokens, 3 for the one that makes the row (no prefix)."""
    assert (CHUNK_OVERHEAD_TOKENS, ROW_START_TOKENS) == (2, 1)
    s = setup("llama")
    engine = make_engine(s.base, prefill_chunk_tokens=8)
    steps: list[tuple[int, list[int]]] = []  # per forward: (decode rows, chunk sizes)
    fused_step = engine.runner.fused_step

    def recording(groups, chunks):
        steps.append((sum(len(g) for g in groups), [n for _, n in chunks]))
        return fused_step(groups, chunks)

    engine.runner.fused_step = recording  # type: ignore[method-assign]
    try:
        long_case = s.long
        long_prompt = list(range(3, 33))  # 30 tokens
        started = asyncio.Event()
        long_tokens: list[int] = []

        async def stream() -> None:
            params = SamplingParams(max_new_tokens=LONG_STEPS)
            request = GenerationRequest(long_case.prompt, params, long_case.prefix_kv, "t")
            async for event in engine.generate(request):
                if event.token_id is not None:
                    long_tokens.append(event.token_id)
                if len(long_tokens) == 2:
                    started.set()

        task = asyncio.create_task(stream())
        await started.wait()
        before = len(steps)
        newcomer = await collect(engine, GenerationRequest(long_prompt, SamplingParams(max_new_tokens=3)))
        await task
        assert tokens_of(newcomer) == oracle_greedy(s.base, long_prompt, 3)[0]
        chunk_steps = [(rows, sizes) for rows, sizes in steps[before:] if sizes]
        assert [sizes for _, sizes in chunk_steps] == [[5]] + [[6]] * 4 + [[1]]
        assert all(rows == 1 for rows, _ in chunk_steps), "the running stream decoded in every chunk step"
        assert long_tokens == long_case.tokens
    finally:
        engine.shutdown()


async def test_a_burst_admitted_at_once_gets_its_rows_as_its_chunks_go_in() -> None:
    """Budget 3 while four streams decode: four 3-token prompts admitted in one step get a chunk, and their row
    (prefix copy and KV buffers), one step after another, not all in the step that admitted them."""
    s = setup("llama")
    engine = make_engine(s.base, prefill_chunk_tokens=3)
    events: list[str] = []  # in order: "row" per row made, "step" per fused forward
    begin_prefill, fused_step = engine.runner.begin_prefill, engine.runner.fused_step

    def recording_begin(request):
        events.append("row")
        return begin_prefill(request)

    def recording_step(groups, chunks):
        events.append("step")
        return fused_step(groups, chunks)

    engine.runner.begin_prefill = recording_begin  # type: ignore[method-assign]
    engine.runner.fused_step = recording_step  # type: ignore[method-assign]
    try:
        case = s.long
        streams = await decoding_streams(engine, case, 4)
        events.clear()  # as many rows decode as the burst has prompts: the chunk budget stays at 3
        prompts = [[7 + i, 8 + i, 9 + i] for i in range(4)]
        burst = await asyncio.gather(
            *(collect(engine, GenerationRequest(p, SamplingParams(max_new_tokens=2))) for p in prompts)
        )
        for tokens in await asyncio.gather(*streams):
            assert tokens == case.tokens
        for prompt, result in zip(prompts, burst, strict=True):
            assert tokens_of(result) == oracle_greedy(s.base, prompt, 2)[0]
        rows_made_before_each_step = "".join("r" if e == "row" else "|" for e in events).split("|")
        assert [len(rows) for rows in rows_made_before_each_step if rows] == [1, 1, 1, 1], events
    finally:
        engine.shutdown()


def _entry(
    tenant: str,
    remaining: int,
    prefix_len: int = 0,
    started: bool = False,
    submitted_at: float = 0.0,
    cached_tokens: int = 0,
) -> SimpleNamespace:
    """What ``Engine._next_chunks`` reads of a prefilling request: its row exists once ``started``; a prompt head
    of ``cached_tokens`` from the prompt cache is copied into it after the prefix."""
    request = SimpleNamespace(tenant=tenant, prefix_len=prefix_len)
    pending = SimpleNamespace() if started else None
    cached = SimpleNamespace(tokens=cached_tokens) if cached_tokens else None
    tracked = SimpleNamespace(request=request, submitted_at=submitted_at, cached=cached)
    return SimpleNamespace(tracked=tracked, remaining=remaining, tenant=tenant, pending=pending)


def test_prompts_of_tenants_holding_fewer_rows_are_fed_first() -> None:
    """A flood's prompts were admitted first, but another tenant's prompt gets the step's chunk budget first.
    Budget 12; each new row's chunk pays 3 tokens of overhead."""
    engine = make_engine(setup("llama").base, prefill_chunk_tokens=12)
    try:
        engine._groups = [range(12)]  # type: ignore[list-item]  # more rows decode than prompts wait: the budget holds
        engine._prefilling = [_entry("flood", 20), _entry("flood", 20), _entry("b", 4), _entry("c", 9)]  # type: ignore[list-item]
        chunks = engine._next_chunks({"flood": 12, "b": 1, "c": 1})
        assert [(p.tenant, n) for p, n in chunks] == [("b", 4), ("c", 2)]
        chunks = engine._next_chunks({})  # equal holdings: oldest first
        assert [(p.tenant, n) for p, n in chunks] == [("flood", 9)]
    finally:
        engine._groups, engine._prefilling = [], []
        engine.shutdown()


def test_chunks_pay_their_overhead_out_of_the_budget_while_rows_decode() -> None:
    """A burst of one-token prompts with long prefixes: each chunk costs its token, 2 for the chunk, and for its
    new row 1 plus one per 100 prefix columns. With no row decoding, nobody's latency is at stake: all go in."""
    engine = make_engine(setup("llama").base, prefill_chunk_tokens=16)
    try:
        engine._prefilling = [_entry(f"t{i}", 1, prefix_len=250) for i in range(4)]  # type: ignore[list-item]
        engine._groups = [range(12)]  # type: ignore[list-item]
        assert [n for _, n in engine._next_chunks({})] == [1, 1]  # 2 x (1 + 2 + 1 + 2) = 12; a third makes 18
        engine._prefilling = [_entry("a", 30, started=True), _entry("b", 30, prefix_len=400)]  # type: ignore[list-item]
        assert [n for _, n in engine._next_chunks({})] == [14]  # 14 + 2: nothing left for b's 7 of overhead
        engine._prefilling.reverse()
        assert [n for _, n in engine._next_chunks({})] == [9]  # 9 + 7 of overhead: nothing left for a
        engine._prefilling = [_entry("c", 30, prefix_len=100, cached_tokens=300)]  # type: ignore[list-item]
        assert [n for _, n in engine._next_chunks({})] == [9]  # a cached head is copied in too: 1 + 2 + 4
        engine._groups = []
        engine._prefilling = [_entry(f"t{i}", 1, prefix_len=250) for i in range(4)]  # type: ignore[list-item]
        assert [n for _, n in engine._next_chunks({})] == [1, 1, 1, 1]
    finally:
        engine._groups, engine._prefilling = [], []
        engine.shutdown()


@pytest.mark.parametrize(
    ("decoding", "max_prefill_tokens", "fed"),
    [
        (0, 0, [20, 20, 4]),  # nothing decodes: every waiting token (no admission limit)
        (0, 30, [20, 10]),  # nothing decodes: admission's limit
        (0, 3, [6]),  # never less than the chunk size
        # While rows decode, the chunk pays 2 of overhead out of the budget:
        (1, 0, [16]),  # three prompts wait per decoding row: three chunks' worth (18)
        (1, 10, [8]),  # ... capped by admission's limit
        (2, 0, [7]),  # 6 * 3 // 2
    ],
)
def test_a_burst_outnumbering_the_decoding_rows_gets_a_bigger_budget(
    decoding: int, max_prefill_tokens: int, fed: list[int]
) -> None:
    """Fewer rows decode than prompts wait: the chunk budget grows with prompts per decoding row, up to
    max_prefill_tokens; with nothing decoding, it is max_prefill_tokens (0: all). Never below the chunk size.
    As many rows decoding as prompts waiting: the chunk size (less the chunk's overhead)."""
    engine = make_engine(setup("llama").base, prefill_chunk_tokens=6, max_prefill_tokens=max_prefill_tokens)
    try:
        prompts = [_entry("a", 20, started=True), _entry("a", 20, started=True), _entry("b", 4, started=True)]
        engine._prefilling = prompts  # type: ignore[assignment]
        engine._groups = [range(decoding)] if decoding else []  # type: ignore[list-item]
        assert [n for _, n in engine._next_chunks({})] == fed
        engine._groups = [range(3)]  # type: ignore[list-item]
        assert [n for _, n in engine._next_chunks({})] == [4]
    finally:
        engine._groups, engine._prefilling = [], []
        engine.shutdown()


@pytest.mark.parametrize(
    ("deadline_s", "submitted_ago_s", "fed"),
    [
        (0.0, 0.0, [62]),  # no pacing: the whole budget, less the chunk's overhead of 2
        (60.0, 0.0, [14]),  # plenty of time: the floor, a quarter of the budget
        (5.0, 0.0, [17]),  # 99 steps of 0.05 s left for 3 x (598 + 2) = 1800 tokens: 19 a step
        (5.0, 4.97, [62]),  # the deadline is too close: the whole budget again
    ],
)
def test_paced_chunks_are_the_least_that_meets_the_deadline(
    deadline_s: float, submitted_ago_s: float, fed: list[int]
) -> None:
    """With ``prefill_deadline_s``, steps carry no more prompt tokens than every prompt needs to finish in time
    (counting each chunk's overhead), at least a quarter of the budget, at most all of it."""
    engine = make_engine(setup("llama").base, prefill_chunk_tokens=64, prefill_deadline_s=deadline_s)
    try:
        engine._groups = [range(12)]  # type: ignore[list-item]  # more rows decode than prompts wait
        submitted = time.perf_counter() - submitted_ago_s
        engine._prefilling = [_entry(f"t{i}", 598, started=True, submitted_at=submitted) for i in range(3)]  # type: ignore[list-item]
        engine._step_clock.step_s = 0.05
        assert [n for _, n in engine._next_chunks({})] == fed
    finally:
        engine._groups, engine._prefilling = [], []
        engine.shutdown()


async def test_a_paced_burst_joins_one_prompt_a_step_and_decodes_as_alone() -> None:
    """Budget 40, floor 10, deadline far away: while four streams decode, each 5-token prompt of a burst costs
    8 of the budget with its new row's overhead, so one joins per step (unpaced, all four fit in one step).
    Streams and newcomers decode what they decode alone."""
    s = setup("llama")
    metrics = ServerMetrics()
    engine = make_engine(s.base, prefill_chunk_tokens=40, prefill_deadline_s=60.0, metrics=metrics.engine)
    chunk_steps: list[list[int]] = []
    fused_step = engine.runner.fused_step

    def recording(groups, chunks):
        if chunks:
            chunk_steps.append([n for _, n in chunks])
        return fused_step(groups, chunks)

    engine.runner.fused_step = recording  # type: ignore[method-assign]
    try:
        case = s.long
        streams = await decoding_streams(engine, case, 4)
        assert engine._step_clock.step_s is not None  # steps ran back to back: the clock has a step time
        chunk_steps.clear()
        fed_beside_rows = metrics.registry.get_sample_value("prefix_serve_step_prompt_tokens_sum")
        steps_beside_rows = metrics.registry.get_sample_value("prefix_serve_step_prompt_tokens_count")
        prompts = [[7 + i, 8 + i, 9 + i, 10 + i, 11 + i] for i in range(4)]
        burst = await asyncio.gather(
            *(collect(engine, GenerationRequest(p, SamplingParams(max_new_tokens=2))) for p in prompts)
        )
        assert chunk_steps == [[5]] * 4
        # The metric shows it: four steps beside the decoding streams, 5 prompt tokens each (overheads not counted).
        get = metrics.registry.get_sample_value
        assert get("prefix_serve_step_prompt_tokens_count") - steps_beside_rows == 4
        assert get("prefix_serve_step_prompt_tokens_sum") - fed_beside_rows == 20
        for tokens in await asyncio.gather(*streams):
            assert tokens == case.tokens
        for prompt, result in zip(prompts, burst, strict=True):
            assert tokens_of(result) == oracle_greedy(s.base, prompt, 2)[0]
    finally:
        engine.shutdown()
