"""The engine end to end on a tiny model: oracle tokens, batch invariance, joins, sampling, cancellation."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from server import kv_groups
from server.engine import Engine, GenerationEvent, GenerationRequest
from server.errors import InvalidInput, Overloaded
from server.metrics import EngineMetrics
from server.model_loading import probe_kv_shape
from server.prompt_cache import PromptCache
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.scheduler import SchedulerConfig
from server.speculative import SpeculativeConfig
from server.step_gaps import StepGaps
from tests.tiny_models import oracle_greedy, peft_prefix_model, prefix_kv_of, tiny_llama

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def prefixes(base):
    """Five PEFT prefixes of different lengths: (kv [L,2,H,P,d], peft model)."""
    out = []
    for i, p in enumerate([2, 5, 1, 9, 4]):
        peft = peft_prefix_model(copy.deepcopy(base), p, seed=100 + i)
        out.append((prefix_kv_of(peft), peft))
    return out


@pytest.fixture(
    params=[
        {"prefill_chunk_tokens": 0},
        {"prefill_chunk_tokens": 3, "kv_groups": 3},
        {"prefill_chunk_tokens": 0, "static_decode": True, "overlap_steps": True},
        {"prefill_chunk_tokens": 3, "kv_groups": 3, "static_decode": True, "overlap_steps": True, "reserve": True},
    ],
    ids=[
        "separate-prefill",
        "fused-chunks-of-3-in-3-groups",
        "overlapped-static-decode",
        "overlapped-static-in-3-groups-reserved",
    ],
)
def mode(request, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Every engine test runs with prefill forwards of their own, with prompts fused into decode steps and
    the running rows kept in up to 3 padded groups, and with the fixed-shape decode step that CUDA graphs
    replay (eager here: server/static_decode.py), on one batch and on groups (steps without prompt chunks),
    each step launched before the last one's tokens are handed out (``overlap_steps``, the default on CUDA),
    the last with KV buffers that reserve their rows' decode steps (``reserve_decode``, CUDA's default too).
    The tiny prompts differ by fewer columns than the groups' slack, so it is off: any difference in length
    starts a group."""
    monkeypatch.setattr(kv_groups, "SLACK_COLUMNS", 0)
    return request.param


def make_engine(
    model,
    static_decode: bool | None = None,
    step_gaps: StepGaps | None = None,
    overlap_steps: bool | None = None,
    metrics: EngineMetrics | None = None,
    eos_token_ids: list[int] | None = None,
    prompt_cache: PromptCache | None = None,
    speculative: SpeculativeConfig | None = None,
    reserve: bool = False,
    **config,
) -> Engine:
    runner = ModelRunner(model, *probe_kv_shape(model), static_decode=static_decode, reserve_decode=reserve)
    engine = Engine(
        runner,
        None,
        eos_token_ids=eos_token_ids or [],
        max_context=512,
        config=SchedulerConfig(**config),
        metrics=metrics,
        step_gaps=step_gaps,
        overlap_steps=overlap_steps,
        prompt_cache=prompt_cache,
        speculative=speculative,
    )
    engine.start()
    return engine


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationEvent]:
    return [event async for event in engine.generate(request)]


async def together_and_staggered(
    engine: Engine, requests: list[GenerationRequest]
) -> tuple[list[list[GenerationEvent]], list[list[GenerationEvent]]]:
    """Each request's events when all are submitted at once, and when each joins a batch already running the
    ones before it (10 ms apart)."""
    together = await asyncio.gather(*(collect(engine, r) for r in requests))
    staggered = []
    for r in requests:
        staggered.append(asyncio.ensure_future(collect(engine, r)))
        await asyncio.sleep(0.01)
    return list(together), list(await asyncio.gather(*staggered))


def tokens_of(events: list[GenerationEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(i)
    return torch.randint(3, 250, (n,), generator=g).tolist()


async def test_mixed_batch_equals_peft_oracle_and_running_alone(base, prefixes, mode) -> None:
    engine = make_engine(base, **mode)
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        requests = []
        for i in range(8):
            kv = None if i % 3 == 2 else prefixes[i % len(prefixes)][0]
            requests.append(GenerationRequest(prompt(i, 3 + 2 * i), params, kv, None if kv is None else f"p{i % 5}"))
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        together = await asyncio.gather(*(collect(engine, r) for r in requests))
        assert [tokens_of(e) for e in together] == alone
        for i, req in enumerate(requests):
            model = base if req.prefix_kv is None else prefixes[i % len(prefixes)][1]
            want, _ = oracle_greedy(model, list(req.prompt_ids), NEW_TOKENS)
            assert alone[i] == want, f"request {i}"
            assert together[i][-1].finish_reason == "length"
            assert together[i][-1].completion_tokens == NEW_TOKENS
    finally:
        engine.shutdown()


async def test_logprobs_equal_the_peft_oracle_batched(base, prefixes, mode) -> None:
    """Each token's log-probability and top alternatives, in a mixed batch, are log-softmax of PEFT's uncached
    forward logits; a request that asks for none gets none (its batch-mates compute them)."""
    engine = make_engine(base, **mode)
    try:
        asks = [2, None, 0, 4]
        requests = [
            GenerationRequest(
                prompt(30 + i, 3 + 2 * i),
                SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=asked),
                prefixes[i][0],
                f"p{i}",
            )
            for i, asked in enumerate(asks)
        ]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        for i, (events, asked) in enumerate(zip(results, asks, strict=True)):
            want_tokens, want_logits = oracle_greedy(prefixes[i][1], list(requests[i].prompt_ids), NEW_TOKENS)
            events = [e for e in events if e.token_id is not None]
            assert [e.token_id for e in events] == want_tokens, f"request {i}"
            if asked is None:
                assert all(e.logprob is None for e in events)
                continue
            for step, (event, logits) in enumerate(zip(events, want_logits, strict=True)):
                want = torch.log_softmax(logits, dim=-1)
                assert event.logprob is not None and len(event.logprob.top) == asked
                assert event.logprob.logprob == pytest.approx(want[event.token_id].item(), abs=1e-4), (i, step)
                top_ids = [token for token, _ in event.logprob.top]
                assert top_ids == want.argsort(descending=True)[:asked].tolist(), (i, step)
                assert [v for _, v in event.logprob.top] == pytest.approx(want[top_ids].tolist(), abs=1e-4)
    finally:
        engine.shutdown()


async def test_prompt_logprobs_equal_the_peft_oracle_batched(base, prefixes, mode) -> None:
    """Each prompt token's log-probability after the first, and its top alternatives, in a mixed batch (prompts
    longer than a chunk, so they enter over several fused steps), are log-softmax of PEFT's forward logits at
    the position before it; the first token has none; requests that do not ask get none, and every request's
    generated tokens are the oracle's."""
    engine = make_engine(base, **mode)
    try:
        asks = [3, None, 0, 1, 2]
        requests = [
            GenerationRequest(
                prompt(50 + i, 1 if i == 3 else 4 + 3 * i),  # request 3: a one-token prompt, nothing to score
                SamplingParams(max_new_tokens=3, prompt_logprobs=asked, logprobs=1 if i == 4 else None),
                None if i == 2 else prefixes[i][0],
                None if i == 2 else f"p{i}",
            )
            for i, asked in enumerate(asks)
        ]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        for i, (events, asked) in enumerate(zip(results, asks, strict=True)):
            peft = base if i == 2 else prefixes[i][1]
            ids = list(requests[i].prompt_ids)
            want_tokens, _ = oracle_greedy(peft, ids, 3)
            tokens = [e for e in events if e.token_id is not None]
            assert [e.token_id for e in tokens] == want_tokens, f"request {i}"
            assert all(e.prompt_logprobs is None for e in tokens[1:]), "only the first token carries them"
            got = tokens[0].prompt_logprobs
            if asked is None:
                assert got is None
                continue
            assert got is not None and len(got) == len(ids) and got[0] is None, f"request {i}"
            with torch.no_grad():
                logits = peft(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0]
            want = torch.log_softmax(logits.float(), dim=-1)  # row j predicts prompt token j + 1
            for j in range(1, len(ids)):
                entry = got[j]
                assert entry is not None and len(entry.top) == asked, (i, j)
                assert entry.logprob == pytest.approx(want[j - 1, ids[j]].item(), abs=1e-4), (i, j)
                top_ids = [token for token, _ in entry.top]
                assert top_ids == want[j - 1].argsort(descending=True)[:asked].tolist(), (i, j)
                assert [v for _, v in entry.top] == pytest.approx(want[j - 1, top_ids].tolist(), abs=1e-4)
        assert results[4][0].logprob is not None, "generated tokens' log-probabilities still come"
    finally:
        engine.shutdown()


def oracle_penalized(model, ids: list[int], steps: int, params: SamplingParams) -> list[int]:
    """Greedy tokens from PEFT's uncached forward with the penalties applied token by token, as vLLM documents
    them: repetition on every token seen (prompt and generated), then frequency x count and presence on
    generated ones."""
    ids, generated = list(ids), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0, -1]
        logits = logits.float().clone()
        r = params.repetition_penalty
        for token in set(ids):
            logits[token] = logits[token] / r if logits[token] > 0 else logits[token] * r
        for token in set(generated):
            logits[token] -= params.frequency_penalty * generated.count(token) + params.presence_penalty
        for token, bias in params.logit_bias:
            logits[token] += bias
        if len(generated) < params.min_tokens:
            for token in params.held_back:
                logits[token] = -torch.inf
        token = int(logits.argmax())
        generated.append(token)
        ids.append(token)
    return generated


async def test_penalties_equal_the_oracle_in_a_mixed_batch(base, prefixes, mode) -> None:
    """Rows with repetition, frequency and presence penalties and logit biases next to rows without, joining and
    leaving one another's batches: each row's greedy tokens are the adjusted oracle's, alone or together."""
    steps = 12
    banned = oracle_greedy(prefixes[0][1], prompt(75, 13), 1)[0][0]  # what request 5 would take first
    penalties = [
        SamplingParams(max_new_tokens=steps, repetition_penalty=1.8),
        SamplingParams(max_new_tokens=steps),
        SamplingParams(max_new_tokens=steps, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(max_new_tokens=steps // 2, repetition_penalty=0.7, presence_penalty=-0.5),
        SamplingParams(max_new_tokens=steps, frequency_penalty=2.0, logprobs=1),
        SamplingParams(max_new_tokens=steps, logit_bias=((banned, -100.0), (7, 0.5), (11, -0.25))),
    ]
    requests = [
        GenerationRequest(prompt(70 + i, 3 + 2 * i), params, prefixes[i % 5][0], f"p{i % 5}")
        for i, params in enumerate(penalties)
    ]
    engine = make_engine(base, **mode)
    try:
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        together, staggered = await together_and_staggered(engine, requests)
    finally:
        engine.shutdown()
    assert [tokens_of(e) for e in together] == alone == [tokens_of(e) for e in staggered]
    changed = 0
    for i, request in enumerate(requests):
        params = request.params
        peft = prefixes[i % 5][1]
        want = oracle_penalized(peft, list(request.prompt_ids), params.max_new_tokens, params)
        assert alone[i] == want, f"request {i}"
        changed += want != oracle_greedy(peft, list(request.prompt_ids), params.max_new_tokens)[0]
    assert changed >= 4, "the adjustments must change what these rows generate"
    assert banned not in alone[5]
    # Log-probabilities stay the raw logits': the penalised row's chosen tokens need not be the likeliest.
    assert all(e.logprob is not None for e in together[4] if e.token_id is not None)


async def test_min_tokens_and_stop_token_ids(base, prefixes, mode) -> None:
    """The oracle's second greedy token is made EOS: a plain request ends there; with min_tokens 5 it cannot be
    sampled for 5 tokens (the oracle with its logit at -inf that long); a stop token ends a request like EOS."""
    ids = prompt(90, 7)
    peft = prefixes[0][1]
    want, _ = oracle_greedy(peft, ids, 8)
    eos = want[1]
    engine = make_engine(base, eos_token_ids=[eos], **mode)

    def request(**params) -> GenerationRequest:
        return GenerationRequest(ids, SamplingParams(max_new_tokens=8, **params), prefixes[0][0], "p0")

    try:
        plain, held, stopped, both = await asyncio.gather(
            collect(engine, request()),
            collect(engine, request(min_tokens=5)),
            collect(engine, request(stop_token_ids=(want[2],), ignore_eos=True)),
            collect(engine, request(min_tokens=4, stop_token_ids=(want[2],), ignore_eos=True)),
        )
    finally:
        engine.shutdown()
    assert tokens_of(plain) == want[:2] and plain[-1].finish_reason == "eos"
    expected = oracle_penalized(peft, ids, 8, SamplingParams(max_new_tokens=8, min_tokens=5, held_back=(eos,)))
    held_tokens = tokens_of(held)
    assert eos not in held_tokens[:5] and held_tokens == expected[: len(held_tokens)]
    assert len(held_tokens) >= 5 and (held_tokens[-1] == eos or len(held_tokens) == 8)
    assert tokens_of(stopped) == want[:3] and stopped[-1].finish_reason == "stop"
    assert stopped[-1].text == "" and stopped[-1].completion_tokens == 3
    # ignore_eos: EOS neither ends nor is held back; the stop token is held back for 4 tokens.
    expected = oracle_penalized(peft, ids, 8, SamplingParams(max_new_tokens=8, min_tokens=4, held_back=(want[2],)))
    assert tokens_of(both)[:4] == expected[:4] and want[2] not in tokens_of(both)[:4]


def test_a_scored_prompt_gets_a_separate_prefill_forward_of_its_own() -> None:
    """Its forward keeps every position's logits ([1, N, V]): the rows around it stay in forwards that keep one."""
    from server.batch import NewRequest
    from server.runner import _prefill_parts

    scored = {2, 3, 7}
    requests = [NewRequest(f"r{i}", [1], SamplingParams(prompt_logprobs=1 if i in scored else None)) for i in range(9)]
    parts = _prefill_parts(requests, 2)
    assert [(p.start, p.stop) for p in parts] == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7), (7, 8), (8, 9)]
    assert _prefill_parts(requests[4:7], 5) == [slice(0, 3)]


async def test_prompt_token_ids_outside_the_vocabulary_are_refused(base) -> None:
    """Checked at submit: in a step, the embedding lookup would fail every row of the batch."""
    engine = make_engine(base)
    try:
        for bad in ([5, base.config.vocab_size], [-1, 5]):
            with pytest.raises(InvalidInput, match="prompt token ids"):
                await collect(engine, GenerationRequest(bad, SamplingParams()))
    finally:
        engine.shutdown()


async def test_prompt_logprobs_out_of_range_are_refused(base) -> None:
    engine = make_engine(base)
    try:
        for bad in (-1, 21):
            with pytest.raises(InvalidInput, match="prompt_logprobs"):
                await collect(engine, GenerationRequest([5, 6], SamplingParams(prompt_logprobs=bad)))
    finally:
        engine.shutdown()


async def test_prefill_budget_spreads_admission_and_changes_no_token(base, prefixes) -> None:
    """A budget below any two prompts admits one request per step: the burst joins over many steps."""
    engine = make_engine(base, max_prefill_tokens=4)  # prefill forwards of their own, which the test counts
    prefills: list[int] = []
    prefill = engine.runner.prefill

    def counting_prefill(requests):  # the real prefill, counted: how many requests each step admitted
        prefills.append(len(requests))
        return prefill(requests)

    engine.runner.prefill = counting_prefill  # type: ignore[method-assign]
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        requests = [GenerationRequest(prompt(60 + i, 3 + i), params, prefixes[i % 5][0], f"p{i % 5}") for i in range(6)]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        assert prefills == [1] * 6
        for i, events in enumerate(results):
            want, _ = oracle_greedy(prefixes[i % 5][1], list(requests[i].prompt_ids), NEW_TOKENS)
            assert tokens_of(events) == want, f"request {i}"
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("prompt_lengths", "new_tokens"),
    [([5] * 7, [3, 14, 5, 20, 9, 2, 11]), ([11, 9, 7, 5, 3, 2], [2, 4, 6, 9, 12, 15])],
    ids=["same-lengths", "longest-first"],
)
async def test_rows_leaving_early_change_nobody(base, prefixes, mode, prompt_lengths, new_tokens) -> None:
    """Rows that end early leave their slots to the last rows (Batch.drop moves them within the buffers): every
    request still decodes exactly what it decodes alone.

    same-lengths: no column is ever padding in every kept row, so rows only move. longest-first: the longest
    prompts end first; where rows joined one by one (prompt chunks), the columns before the others' real ones
    then become padding in every kept row, and drop also cuts them off as views of the same buffers (with
    separate prefills the padding sits between prefix and prompt: filter). With the moves skipped, the first case
    fails in every mode and the second in the chunked ones."""
    engine = make_engine(base, **mode)
    try:
        requests = [
            GenerationRequest(prompt(80 + i, n), SamplingParams(max_new_tokens=m), prefixes[1][0], "p1")
            for i, (n, m) in enumerate(zip(prompt_lengths, new_tokens, strict=True))
        ]
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        together = await asyncio.gather(*(collect(engine, r) for r in requests))
        assert [tokens_of(e) for e in together] == alone
        assert [len(t) for t in alone] == new_tokens
    finally:
        engine.shutdown()


async def test_requests_joining_mid_decode_change_nobody(base, prefixes, mode) -> None:
    engine = make_engine(base, **mode)
    try:
        long = GenerationRequest(prompt(50, 6), SamplingParams(max_new_tokens=40), prefixes[3][0], "p3")
        late = [
            GenerationRequest(prompt(51 + i, 4 + i), SamplingParams(max_new_tokens=6), prefixes[i][0], f"p{i}")
            for i in range(3)
        ]
        want_long = tokens_of(await collect(engine, long))
        want_late = [tokens_of(await collect(engine, r)) for r in late]

        seen_tokens = asyncio.Event()

        async def run_long() -> list[int]:
            out = []
            async for event in engine.generate(long):
                out.append(event.token_id)
                if len(out) == 5:
                    seen_tokens.set()
            return [t for t in out if t is not None]

        long_task = asyncio.create_task(run_long())
        await seen_tokens.wait()  # the long request is decoding; now others join
        late_results = await asyncio.gather(*(collect(engine, r) for r in late))
        assert await long_task == want_long
        assert [tokens_of(e) for e in late_results] == want_late
    finally:
        engine.shutdown()


async def test_seeded_sampling_is_batch_invariant(base, prefixes, mode) -> None:
    engine = make_engine(base, **mode)
    try:
        sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
        request = GenerationRequest(prompt(7, 5), sampled, prefixes[1][0], "p1")
        alone = tokens_of(await collect(engine, request))
        others = [
            GenerationRequest(prompt(8 + i, 3 + i), SamplingParams(max_new_tokens=10, temperature=0.7, seed=i), kv, "x")
            for i, (kv, _) in enumerate(prefixes)
        ]
        results = await asyncio.gather(collect(engine, request), *(collect(engine, r) for r in others))
        assert tokens_of(results[0]) == alone
        other_seed = tokens_of(
            await collect(
                engine,
                GenerationRequest(
                    prompt(7, 5),
                    sampled.__class__(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=99),
                    prefixes[1][0],
                    "p1",
                ),
            )
        )
        assert other_seed != alone  # the seed matters (10 tokens over a 256 vocabulary)
    finally:
        engine.shutdown()


async def test_top_k_one_equals_greedy(base, prefixes, mode) -> None:
    engine = make_engine(base, **mode)
    try:
        p = prompt(9, 6)
        greedy = tokens_of(
            await collect(engine, GenerationRequest(p, SamplingParams(max_new_tokens=8), prefixes[0][0]))
        )
        top1 = SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=5)
        assert tokens_of(await collect(engine, GenerationRequest(p, top1, prefixes[0][0]))) == greedy
        tiny_p = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=5)
        assert tokens_of(await collect(engine, GenerationRequest(p, tiny_p, prefixes[0][0]))) == greedy
    finally:
        engine.shutdown()


async def test_cancel_frees_row_and_others_continue(base, prefixes, mode) -> None:
    engine = make_engine(base, **mode)
    try:
        keep = GenerationRequest(prompt(20, 5), SamplingParams(max_new_tokens=30), prefixes[2][0], "p2")
        want = tokens_of(await collect(engine, keep))
        victim = GenerationRequest(prompt(21, 5), SamplingParams(max_new_tokens=400), prefixes[4][0], "p4")

        async def consume_some() -> None:
            n = 0
            async for _ in engine.generate(victim):
                n += 1
                if n == 3:
                    return  # leaving the generator cancels the request

        keep_task = asyncio.create_task(collect(engine, keep))
        await consume_some()
        for _ in range(200):
            if engine.num_running <= 1:
                break
            await asyncio.sleep(0.01)
        assert engine.num_running <= 1, "the cancelled row was not freed"
        assert tokens_of(await keep_task) == want
    finally:
        engine.shutdown()


async def test_a_request_aborted_as_it_is_admitted_still_ends(base, mode) -> None:
    """An abort that lands between admission (under the lock) and the step's look at what was cancelled finds the
    request out of the queue, so it only marks it: the step then dropped it without an event, and its caller (a
    drain's abort at the deadline) waited for ever. It ends as cancelled."""
    engine = make_engine(base, **mode)
    admit = engine.scheduler.admit

    def admit_then_abort(running):  # type: ignore[no-untyped-def]
        admitted = admit(running)
        for request_id in admitted:
            engine._tracked[request_id].cancelled = True  # abort()'s effect once remove() finds nothing queued
        return admitted

    try:
        engine.scheduler.admit = admit_then_abort  # type: ignore[method-assign]
        request = GenerationRequest(prompt(30, 5), SamplingParams(max_new_tokens=8))
        events = await asyncio.wait_for(collect(engine, request), 10)
        assert [e.finish_reason for e in events] == ["cancelled"]
        engine.scheduler.admit = admit  # type: ignore[method-assign]
        assert len(await collect(engine, request)) == 8  # the engine serves on
        assert not engine._tracked
    finally:
        engine.shutdown()


async def test_queue_full_is_overloaded(base, mode) -> None:
    engine = make_engine(base, max_queue=2, max_batch_size=1, **mode)
    try:
        blockers = [
            engine.generate(GenerationRequest(prompt(i, 4), SamplingParams(max_new_tokens=50))) for i in range(3)
        ]
        first = await blockers[0].__anext__()  # one running
        assert first.token_id is not None
        second, third = (asyncio.create_task(b.__anext__()) for b in blockers[1:])
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            async for _ in engine.generate(GenerationRequest(prompt(9, 4), SamplingParams(max_new_tokens=2))):
                pass
        for task in (second, third):
            task.cancel()
        await asyncio.gather(second, third, return_exceptions=True)
        await blockers[0].aclose()
        for _ in range(200):  # every cancelled request left the engine
            if engine.num_running == 0 and engine.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.num_running == 0 and engine.num_waiting == 0
    finally:
        engine.shutdown()


async def test_a_step_wakes_each_event_loop_once(base, mode) -> None:
    """The events of one step reach the event loop in one call_soon_threadsafe, not one per row: each is a
    write to the loop's wake-up pipe, and at 128 rows those writes took 16% of the engine thread."""
    engine = make_engine(base, **mode)
    loop = asyncio.get_running_loop()
    steps = wakeups = 0
    step, call_soon_threadsafe = engine._step, loop.call_soon_threadsafe

    def counted_step() -> None:
        nonlocal steps
        steps += 1
        step()

    def counted_call_soon_threadsafe(*args, **kwargs):
        nonlocal wakeups
        wakeups += 1
        return call_soon_threadsafe(*args, **kwargs)

    engine._step = counted_step
    loop.call_soon_threadsafe = counted_call_soon_threadsafe
    try:
        requests = [GenerationRequest(prompt(40 + i, 3 + i), SamplingParams(max_new_tokens=12)) for i in range(8)]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        events = sum(len(r) for r in results)
        assert all(len(tokens_of(r)) == 12 and r[-1].finish_reason == "length" for r in results)
        assert 0 < wakeups <= steps < events / 2, (wakeups, steps, events)
    finally:
        del loop.call_soon_threadsafe
        engine.shutdown()


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
async def test_overlapped_steps_hand_out_a_step_after_launching_the_next(base, overlap: bool) -> None:
    """With ``overlap_steps`` a decode step is launched before the previous step's tokens are handed out; a row
    that ends by EOS rides one step more, whose token is dropped. The tokens are those of steps taken in turn."""
    runner = ModelRunner(base, *probe_kv_shape(base), static_decode=True)
    ended = GenerationRequest(prompt(60, 4), SamplingParams(max_new_tokens=12))
    other = GenerationRequest(prompt(61, 6), SamplingParams(max_new_tokens=12))
    alone = make_engine(base)
    try:
        free_run = tokens_of(await collect(alone, ended))
        other_alone = tokens_of(await collect(alone, other))
    finally:
        alone.shutdown()
    eos = free_run[4]
    want = free_run[: free_run.index(eos) + 1]  # the first occurrence of that token ends the request
    engine = Engine(runner, None, eos_token_ids=[eos], max_context=512, overlap_steps=overlap)
    calls: list[str] = []
    decode, settle = runner.decode, engine._settle

    def logged_decode(batch):
        calls.append(f"decode {len(batch)}")
        return decode(batch)

    def logged_settle(launched):  # a decode step's tokens handed out (a prefill's go through _consume)
        calls.append(f"hand out {sum(len(rows) for rows in launched.rows)}")
        return settle(launched)

    runner.decode, engine._settle = logged_decode, logged_settle
    # Both requests wait before the engine thread starts, so they are admitted in one step and every later
    # step is a decode step: the pattern of calls below cannot depend on thread timing.
    tasks = [asyncio.create_task(collect(engine, r)) for r in (ended, other)]
    for _ in range(100):
        if engine.num_waiting == 2:
            break
        await asyncio.sleep(0.01)
    engine.start()
    try:
        ended_events, other_events = await asyncio.gather(*tasks)
    finally:
        engine.shutdown()
    assert len(want) < 12 and tokens_of(ended_events) == want and ended_events[-1].finish_reason == "eos"
    other_want = other_alone[: other_alone.index(eos) + 1] if eos in other_alone else other_alone
    assert tokens_of(other_events) == other_want
    decodes = [i for i, c in enumerate(calls) if c.startswith("decode")]
    hand_outs_after_first_decode = [i for i, c in enumerate(calls) if c.startswith("hand out") and i > decodes[0]]
    if overlap:  # each decode step's tokens come out after the next step was launched
        assert calls[decodes[0] + 1].startswith("decode"), calls[:8]
        assert len(hand_outs_after_first_decode) == len(decodes)  # every step's tokens, the extra ones too
    else:
        assert all(calls[i + 1].startswith("hand out") for i in decodes), calls[:8]


async def test_every_forward_is_observed_with_its_prompt_chunks(base) -> None:
    """Batch metrics count every forward pass and every row in it: steps that only feed prompt chunks too, and
    rows still prefilling in a step that also decodes."""
    from server.metrics import ServerMetrics

    metrics = ServerMetrics()
    runner = ModelRunner(base, *probe_kv_shape(base))
    # max_prefill_tokens: with no row decoding, a prompt would otherwise go in whole, in one step.
    config = SchedulerConfig(prefill_chunk_tokens=3, max_prefill_tokens=3)
    engine = Engine(runner, None, eos_token_ids=[], max_context=512, config=config, metrics=metrics.engine)
    forwards = 0  # the runner's two forward entry points in fused mode (an idle wake-up runs a step without one)
    decode, fused_step = runner.decode, runner.fused_step

    def counted(forward):
        def call(*args):
            nonlocal forwards
            forwards += 1
            return forward(*args)

        return call

    runner.decode, runner.fused_step = counted(decode), counted(fused_step)
    engine.start()
    try:
        # 9 prompt tokens in chunks of 3: two steps of chunks alone, then the third completes the prompt (and
        # samples the first token); 3 decode steps follow for the other tokens.
        events = await collect(engine, GenerationRequest(prompt(70, 9), SamplingParams(max_new_tokens=4)))
    finally:
        engine.shutdown()
    assert len(tokens_of(events)) == 4
    get = metrics.registry.get_sample_value
    assert get("prefix_serve_batch_size_count") == forwards == 6
    assert get("prefix_serve_batch_size_sum") == 6  # one row in each
    assert get("prefix_serve_batch_padding_ratio_sum") == 0.0  # a single row never pads
