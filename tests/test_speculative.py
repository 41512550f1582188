"""Speculative decoding by prompt lookup: the n-gram index, and the engine's tokens with drafts verified in its
decode steps equal to the PEFT oracle's in every engine mode, alone and batched, whatever ends the rows."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from prometheus_client import CollectorRegistry

from server.engine import GenerationRequest
from server.metrics import EngineMetrics
from server.sampling import SamplingParams
from server.speculative import (
    DEFAULT_CPU_SPECULATIVE_TOKENS,
    PREDICTION_DRAFT_TOKENS,
    NgramIndex,
    Prediction,
    RowSpeculation,
    SpeculativeConfig,
    TaskHistory,
    TaskOutputs,
    accepted,
    expected_accepted,
    next_draft_len,
    plan,
    speculates,
)
from tests import test_engine
from tests.test_engine import collect, make_engine, prompt, together_and_staggered, tokens_of
from tests.tiny_models import oracle_greedy, peft_prefix_model, prefix_kv_of, tiny_llama

mode = test_engine.mode  # the engine tests' four engine modes, a fixture

# Single tokens count as matches too, and drafts cost nothing (every row drafts whatever its acceptance rate):
# the tiny random model's output repeats often, so drafts are plentiful, and many are rejected (both paths get
# exercised).
EAGER = SpeculativeConfig(tokens=4, max_rows=8, ngram_max=3, ngram_min=1, draft_cost=0.0, verify_overhead=0.0)


def test_the_longest_matching_suffix_proposes_what_followed_its_latest_occurrence() -> None:
    index = NgramIndex([1, 2, 3, 9, 9, 1, 2, 4, 5, 6], ngram_min=1, ngram_max=3)
    index.extend([7, 1, 2])  # ... 7 1 2: "1 2" occurred twice, last followed by 4 5 6
    assert index.propose(3) == [4, 5, 6]
    assert index.propose(10) == [4, 5, 6, 7, 1, 2], "a proposal runs up to the end of the context"
    index.extend([3])  # "1 2 3" occurred once, at the start: the longer match wins over "2 3" / "3"
    assert index.propose(2) == [9, 9]
    assert index.propose(0) == []
    assert len(index) == 14


def test_no_proposal_without_an_earlier_occurrence_of_a_long_enough_suffix() -> None:
    index = NgramIndex([5, 6, 7, 8], ngram_min=2, ngram_max=4)
    assert index.propose(4) == [], "no suffix of two or more tokens occurred before"
    index.extend([5, 6])
    assert index.propose(4) == [7, 8, 5, 6]
    single = NgramIndex([5, 6, 7, 8, 5], ngram_min=2, ngram_max=4)
    assert single.propose(4) == [], "one token matching is below ngram_min"
    with pytest.raises(ValueError):
        NgramIndex([1], ngram_min=0, ngram_max=2)


def test_a_prediction_drafts_from_where_the_output_follows_it() -> None:
    """OpenAI's predicted outputs: drafts read on from the output's place in the guess; once the output strays,
    from after where its last tokens occur in the guess (the unchanged rest of an edit), or none."""
    config = SpeculativeConfig(tokens=4, ngram_min=2, ngram_max=3)
    guess = Prediction([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], config)
    prompt = [1, 2, 3]
    assert guess.following(prompt, [], 3) == [10, 11, 12], "nothing written yet: the guess from its start"
    assert guess.following([*prompt, 10, 11], [10, 11], 3) == [12, 13, 14]
    out = [10, 11, 99, 98]  # strays: no suffix of the output occurs in the guess
    assert guess.following([*prompt, *out], out, 3) == []
    out += [14, 15]  # back on the guess's text, past the changed part
    assert guess.following([*prompt, *out], out, 3) == [16, 17, 18]
    out += [16, 17, 18, 19]
    assert guess.following([*prompt, *out], out, 3) == [], "the guess is used up"


def test_a_row_with_a_prediction_looks_it_up_first_and_drafts_further() -> None:
    config = SpeculativeConfig(tokens=4, ngram_min=2, ngram_max=3)
    prompt = [5, 6, 7, 8, 5, 6]  # its own context would propose 7, 8, 5, 6
    assert RowSpeculation(prompt, config).proposal([], 10) == [7, 8, 5, 6]
    row = RowSpeculation(prompt, config, prediction=list(range(100, 140)))
    assert row.proposal([], 10) == [100, 101, 102, 103], "the prediction first, k drafts to begin with"
    for _ in range(10):
        row.verified(row.draft_len, row.draft_len)  # every draft stood
    assert row.draft_len == PREDICTION_DRAFT_TOKENS > config.tokens
    assert row.proposal([100, 101], 100) == list(range(102, 102 + PREDICTION_DRAFT_TOKENS))
    assert RowSpeculation(prompt, config).most == config.tokens


def test_a_task_keeps_its_recent_outputs_for_lookup() -> None:
    config = SpeculativeConfig(tokens=4, ngram_min=2, ngram_max=3)
    outputs = TaskOutputs(config, budget=20)
    outputs.add([7, 8, 9, 50, 51], [60, 61, 62, 63, 64])  # kept after the prompt's last 2 tokens
    assert outputs.following([1, 50, 51], 3) == [60, 61, 62], "an output's first tokens follow its prompt's tail"
    assert outputs.following([2, 61, 62], 9) == [63, 64], "a continuation stops at the end of its output"
    outputs.add([50, 51], [60, 61, 70, 71])
    assert outputs.following([60, 61], 2) == [70, 71], "the latest output with the n-gram wins"
    assert outputs.following([5, 64, 50], 3) == [], "no n-gram across two outputs"
    outputs.add([1, 2], [90, 91, 92, 93, 94, 95])  # past the budget: a new generation, the first kept as previous
    assert outputs.previous is not None and outputs.following([62, 63], 1) == [64]
    outputs.add([1, 2], list(range(80, 90)))  # the current generation fills: the first goes
    assert outputs.following([62, 63], 1) == [], "two generations back: gone"
    assert outputs.following([91, 92], 2) == [93, 94]


def test_task_histories_are_per_tenant_and_task_and_bounded() -> None:
    history = TaskHistory(SpeculativeConfig(tokens=4), tasks=2)
    history.of("a", "t").add([1, 2, 3], [4, 5, 6])
    assert history.of("b", "t").following([2, 3, 4], 2) == [], "another tenant's task of the same name"
    assert history.of("a", "t").following([2, 3, 4], 2) == [5, 6]
    history.of("b", "t").add([7], [8, 9, 10])
    history.of("a", "u")  # a third task: a would hold 2 of 2 (past its share, 1), so its own ("a", "t") goes
    assert len(history) == 2 and history.of("b", "t").following([8, 9], 1) == [10]
    assert history.of("a", "t").following([3, 4], 1) == [], "a's first task went"


def test_a_tenant_cycling_through_tasks_drops_its_own() -> None:
    """One tenant running more tasks than are kept evicts its own task histories, not the one another keeps."""
    history = TaskHistory(SpeculativeConfig(tokens=4), tasks=8)
    history.of("a", "t").add([1, 2, 3], [4, 5, 6])
    for i in range(64):
        history.of("c", f"task{i}").add([1, 2, 3], [i, i + 1])
    assert len(history) == 8 and history.of("a", "t").following([2, 3, 4], 2) == [5, 6]
    assert history.of("c", "task63").following([3, 63], 1) == [64]
    assert history.of("c", "task0").following([3, 0], 1) == [], "c's oldest went"


def test_tenants_within_their_share_give_up_the_least_recently_used_task() -> None:
    history = TaskHistory(SpeculativeConfig(tokens=4), tasks=3)
    for tenant in ("x", "y", "z"):
        history.of(tenant, "t").add([1, 2, 3], [4, 5])
    history.of("x", "t")  # x's is now the most recently used
    history.of("w", "t")  # w holds nothing yet: the least recently used of all (y's) goes
    assert history.of("x", "t").following([2, 3], 2) == [4, 5] and history.of("y", "t").following([2, 3], 1) == []


def test_drafts_stand_while_they_equal_the_greedy_tokens() -> None:
    assert accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert accepted([4, 5, 6], [8, 5, 6, 7]) == 0
    assert accepted([], [8]) == 0


def test_a_row_proposes_more_after_full_acceptance_and_fewer_after_a_miss() -> None:
    assert next_draft_len(4, drafted=4, kept=4, most=6) == 6
    assert next_draft_len(6, drafted=2, kept=2, most=6) == 6, "never past the configured most"
    assert next_draft_len(4, drafted=4, kept=3, most=6) == 3
    assert next_draft_len(1, drafted=1, kept=0, most=6) == 1, "never below one"


def test_a_row_tracks_how_often_its_drafts_stand() -> None:
    config = SpeculativeConfig(tokens=4, max_rows=8, ngram_max=2, ngram_min=1)
    row = RowSpeculation([1, 2, 3, 1, 2, 3], config)  # 1 2 3 repeats: "3" was followed by "1 2 3"
    assert row.proposal([], room=10) == [1, 2, 3] and row.acceptance == 0.5
    for _ in range(4):
        row.verified(drafted=3, kept=0)
    assert row.acceptance < 0.15 and row.draft_len == 1
    low = row.acceptance
    row.skipped()
    assert low < row.acceptance < 0.5, "a row not drafting drifts back toward the prior"
    row.verified(drafted=1, kept=1)
    assert row.draft_len == 3 and row.acceptance > low
    assert row.proposal([1], room=2) == [2, 3], "within the room the request has left"


def test_a_step_drafts_only_as_far_as_it_pays() -> None:
    cost = SpeculativeConfig(tokens=4)
    free = SpeculativeConfig(tokens=4, draft_cost=0.0, verify_overhead=0.0)
    assert plan([[1, 2, 3, 4]], [0.8], cost) == 4, "a lone row at good odds takes all its drafts"
    assert plan([[1, 2, 3, 4]], [0.5], cost) == 3, "at even odds the fourth draft is not worth its cost"
    assert plan([[1, 2, 3, 4]], [0.02], cost) == 0, "rarely right: a plain step is cheaper"
    assert plan([[1, 2, 3, 4]], [0.5], free) == 4
    # Six rows, one with a proposal: only that row feeds its drafts, but a verifying step beside others costs
    # more: worth it at very good odds, not at fair ones.
    assert plan([[1, 2, 3, 4], [], [], [], [], []], [0.9] * 6, cost) > 0
    assert plan([[1, 2, 3, 4], [], [], [], [], []], [0.5] * 6, cost) == 0
    # Six rows all drafting at high odds: worth it, though not as far as a lone row goes.
    assert 0 < plan([[1, 2, 3, 4]] * 6, [0.7] * 6, cost) < 4
    assert plan([[], []], [0.9, 0.9], cost) == 0
    assert abs(expected_accepted(0.5, 3) - 0.875) < 1e-9


def test_rows_whose_state_follows_their_tokens_do_not_speculate() -> None:
    assert speculates(SamplingParams())
    assert speculates(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3))
    assert speculates(SamplingParams(stop=("x",), stop_token_ids=(3,), ignore_eos=True))
    for params in (
        SamplingParams(logprobs=0),
        SamplingParams(repetition_penalty=1.2),
        SamplingParams(logit_bias=((3, 1.0),)),
        SamplingParams(min_tokens=2, held_back=(0,)),
    ):
        assert not speculates(params), params


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def prefixes(base):
    return [peft_prefix_model(copy.deepcopy(base), p, seed=900 + i) for i, p in enumerate([3, 6])]


def counters(metrics: EngineMetrics) -> tuple[float, float]:
    """Draft tokens proposed and accepted so far."""
    return metrics.speculative_draft_tokens._value.get(), metrics.speculative_accepted_tokens._value.get()


async def test_speculation_changes_no_token(base, prefixes, mode) -> None:
    """Rows of two prefixes and none, alone, together and joining one another, with drafts verified in their
    decode steps: every token equals the PEFT oracle's, some drafts were accepted and some rejected, and each
    row still gets exactly max_new_tokens tokens (drafts never run past it)."""
    metrics = EngineMetrics(CollectorRegistry())
    engine = make_engine(base, metrics=metrics, speculative=EAGER, **mode)
    models = [prefixes[0], prefixes[1], base]
    lengths = [23, 9, 17, 30, 2, 11]

    def request(i: int) -> GenerationRequest:
        which = i % 3
        kv = None if which == 2 else prefix_kv_of(models[which])
        pid = None if which == 2 else f"p{which}"
        return GenerationRequest(prompt(40 + i, 4 + i), SamplingParams(max_new_tokens=lengths[i]), kv, pid)

    requests = [request(i) for i in range(6)]
    try:
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        drafted_alone, accepted_alone = counters(metrics)
        together, staggered = await together_and_staggered(engine, requests)
    finally:
        engine.shutdown()
    for i, r in enumerate(requests):
        assert alone[i] == oracle_greedy(models[i % 3], list(r.prompt_ids), lengths[i])[0], f"request {i}"
    assert [tokens_of(e) for e in together] == alone == [tokens_of(e) for e in staggered]
    assert 0 < accepted_alone < drafted_alone, "drafts must be both accepted and rejected alone"
    drafted, kept = counters(metrics)
    assert 0 < kept - accepted_alone < drafted - drafted_alone, "and with several rows speculating at once"


async def test_a_task_drafts_from_its_earlier_outputs_for_its_own_tenant_only(base, prefixes) -> None:
    """A request whose own context offers nothing drafts from what the same tenant's same task wrote before: asked
    again, it takes most of its tokens from drafts, still the oracle's; another tenant's request of the same
    prefix and prompt gets none of it."""
    metrics = EngineMetrics(CollectorRegistry())
    config = SpeculativeConfig(tokens=4, max_rows=8, ngram_max=3, ngram_min=2, draft_cost=0.0, verify_overhead=0.0)
    engine = make_engine(base, metrics=metrics, speculative=config)
    ids = prompt(130, 6)

    def request(tenant: str) -> GenerationRequest:
        return GenerationRequest(ids, SamplingParams(max_new_tokens=24), prefix_kv_of(prefixes[1]), "p1", tenant)

    try:
        first = tokens_of(await collect(engine, request("a")))
        before = counters(metrics)
        other = tokens_of(await collect(engine, request("b")))
        after_other = counters(metrics)
        again = tokens_of(await collect(engine, request("a")))
        after_again = counters(metrics)
    finally:
        engine.shutdown()
    assert first == other == again == oracle_greedy(prefixes[1], ids, 24)[0]
    from_history = after_again[1] - after_other[1]
    assert from_history >= 12, "the repeat takes most of its tokens from its earlier output"
    assert after_other == (2 * before[0], 2 * before[1]), "tenant b drafted exactly as a's first request did"


def inter_token_gaps(metrics: EngineMetrics) -> float:
    """How many inter-token latencies the histogram has observed so far."""
    samples = metrics.inter_token_latency.collect()[0].samples
    return next(sample.value for sample in samples if sample.name.endswith("_count"))


async def test_a_step_of_accepted_drafts_is_one_inter_token_gap(base, prefixes) -> None:
    """The tokens one step gives a request (its accepted drafts and the step's own) reach the client together:
    one gap in the inter-token latency histogram, as vLLM counts it, not a zero gap for each (which pulled the
    dashboard's ITL quantiles to 0 with speculation on)."""
    metrics = EngineMetrics(CollectorRegistry())
    config = SpeculativeConfig(tokens=4, max_rows=8, ngram_max=3, ngram_min=2, draft_cost=0.0, verify_overhead=0.0)
    engine = make_engine(base, metrics=metrics, speculative=config)
    ids = prompt(130, 6)

    def request() -> GenerationRequest:
        return GenerationRequest(ids, SamplingParams(max_new_tokens=24), prefix_kv_of(prefixes[1]), "p1", "a")

    try:
        await collect(engine, request())  # its output is the next one's drafts
        gaps, (_, accepted) = inter_token_gaps(metrics), counters(metrics)
        assert len(tokens_of(await collect(engine, request()))) == 24
        steps_gaps, steps_accepted = inter_token_gaps(metrics) - gaps, counters(metrics)[1] - accepted
    finally:
        engine.shutdown()
    assert steps_accepted >= 12, "most tokens came as accepted drafts"
    # 24 tokens: the first from the prefill, the others from decode steps of 1 + that step's accepted drafts.
    assert steps_gaps == 24 - 1 - steps_accepted


async def test_a_prediction_changes_no_token_and_drafts_what_it_got_right(base, prefixes, mode) -> None:
    """A request with its own output as the prediction takes most of its tokens from drafts; with a guess half
    wrong, or wrong throughout, it still decodes exactly the oracle's tokens, alone and beside others."""
    config = SpeculativeConfig(tokens=4, max_rows=8, ngram_max=3, ngram_min=2)  # the planner's costs apply
    metrics = EngineMetrics(CollectorRegistry())
    engine = make_engine(base, metrics=metrics, speculative=config, **mode)
    ids = prompt(150, 7)
    want = oracle_greedy(prefixes[0], ids, 30)[0]
    edited = [t if i % 6 < 3 else (t + 1) % 256 for i, t in enumerate(want)]
    guesses = {"right": want, "edited": edited, "wrong": [(t * 7 + 3) % 256 for t in want]}

    def request(guess: list[int]) -> GenerationRequest:
        kv = prefix_kv_of(prefixes[0])
        return GenerationRequest(ids, SamplingParams(max_new_tokens=30), kv, "p0", prediction=tuple(guess))

    try:
        before = counters(metrics)
        right = tokens_of(await collect(engine, request(guesses["right"])))
        after = counters(metrics)
        together = await asyncio.gather(*(collect(engine, request(g)) for g in guesses.values()))
    finally:
        engine.shutdown()
    assert right == want and [tokens_of(e) for e in together] == [want] * 3
    assert after[1] - before[1] >= 20, "the right guess gives most of the 30 tokens as accepted drafts"


async def test_a_row_ends_inside_a_step_of_drafts(base) -> None:
    """EOS and a stop token id that the oracle yields mid-output end the row there, even when they come with
    accepted drafts: the tokens after them are dropped, and the finish reason is the right one."""
    ids = prompt(61, 6)
    oracle = oracle_greedy(base, ids, 24)[0]
    # A token the oracle yields late (after a repeat, so that it may arrive inside a step of accepted drafts).
    late = next(t for i, t in enumerate(oracle) if i >= 6 and t not in oracle[:i])
    cut = oracle.index(late)
    metrics = EngineMetrics(CollectorRegistry())
    engine = make_engine(base, metrics=metrics, speculative=EAGER, eos_token_ids=[late])
    try:
        by_eos = await collect(engine, GenerationRequest(ids, SamplingParams(max_new_tokens=24)))
        by_stop_id = await collect(
            engine, GenerationRequest(ids, SamplingParams(max_new_tokens=24, ignore_eos=True, stop_token_ids=(late,)))
        )
    finally:
        engine.shutdown()
    assert tokens_of(by_eos) == oracle[: cut + 1] and by_eos[-1].finish_reason == "eos"
    assert tokens_of(by_stop_id) == oracle[: cut + 1] and by_stop_id[-1].finish_reason == "stop"
    assert counters(metrics)[1] > 0, "drafts were accepted on the way"


async def test_sampled_rows_draw_what_they_draw_without_speculation(base, prefixes, mode) -> None:
    """Seeded sampling rows (temperature, top-k, top-p) verify drafts by drawing at each query what they would
    have drawn at that step: their tokens equal those of an engine that never speculates, alone and together,
    and drafts were accepted on the way."""
    metrics = EngineMetrics(CollectorRegistry())
    engine = make_engine(base, metrics=metrics, speculative=EAGER, **mode)
    plain = make_engine(base, **mode)
    settings = [
        {"temperature": 0.6, "seed": 1},
        {"temperature": 1.0, "top_k": 8, "seed": 2},
        {"temperature": 0.8, "top_p": 0.7, "seed": 3},
        {},  # greedy beside them
    ]
    requests = [
        GenerationRequest(
            prompt(120 + i, 5 + i),
            SamplingParams(max_new_tokens=24, **params),
            None if i % 2 else prefix_kv_of(prefixes[0]),
            None if i % 2 else "p0",
        )
        for i, params in enumerate(settings)
    ]
    try:
        reference = [tokens_of(await collect(plain, r)) for r in requests]
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        accepted_alone = counters(metrics)[1]
        together = await asyncio.gather(*(collect(engine, r) for r in requests))
    finally:
        engine.shutdown()
        plain.shutdown()
    assert alone == reference == [tokens_of(e) for e in together]
    assert len({tuple(t) for t in reference}) == len(reference)
    assert accepted_alone > 0 and counters(metrics)[1] > accepted_alone


async def test_no_speculation_beside_rows_that_cannot_or_past_max_rows(base) -> None:
    """No speculative step ever holds a row that asks for log-probabilities, or more rows than ``max_rows``
    (every verifying step is recorded); such rows still get the oracle's tokens, and a row alone speculates."""
    greedy = [GenerationRequest(prompt(70 + i, 5), SamplingParams(max_new_tokens=20)) for i in range(3)]
    scored = GenerationRequest(prompt(75, 5), SamplingParams(max_new_tokens=20, logprobs=1))
    metrics = EngineMetrics(CollectorRegistry())
    limited = SpeculativeConfig(tokens=4, max_rows=2, ngram_max=3, ngram_min=1, draft_cost=0.0, verify_overhead=0.0)
    engine = make_engine(base, metrics=metrics, speculative=limited)
    verified: list[tuple[int, bool]] = []  # every speculative step's rows, and whether one asked for logprobs
    step = engine.runner.speculative_step

    def recorded(groups, drafts):
        asked = any(a >= 0 for g in groups for a in g.sampling.logprobs_asked)
        verified.append((sum(len(g) for g in groups), asked))
        return step(groups, drafts)

    engine.runner.speculative_step = recorded
    try:
        mixed = await asyncio.gather(*(collect(engine, r) for r in [greedy[0], scored]))
        crowd = await asyncio.gather(*(collect(engine, r) for r in greedy))
        alone = tokens_of(await collect(engine, greedy[1]))
    finally:
        engine.shutdown()
    assert verified, "alone (at least), rows speculate"
    assert max(rows for rows, _ in verified) <= 2
    assert not any(asked for _, asked in verified)
    assert all(e.logprob is not None for e in mixed[1] if e.token_id is not None)
    assert tokens_of(mixed[0]) == oracle_greedy(base, list(greedy[0].prompt_ids), 20)[0]
    for r, events in zip(greedy, crowd, strict=True):
        assert tokens_of(events) == oracle_greedy(base, list(r.prompt_ids), 20)[0]
    assert tokens_of(crowd[1]) == alone


def test_a_speculative_step_writes_only_the_accepted_columns_as_real(base) -> None:
    """After a step verifying drafts of two rows, the batch invariant holds: each row's real columns equal its
    next position, the group grew by 1 + the most drafts any row accepted, and a row that accepted fewer has the
    rest as padding."""
    from server.model_loading import probe_kv_shape
    from server.runner import ModelRunner, NewRequest

    runner = ModelRunner(base, *probe_kv_shape(base), static_decode=False)
    ids = [prompt(80, 7), prompt(81, 4)]
    batch, first = runner.prefill([NewRequest(f"r{i}", p, SamplingParams()) for i, p in enumerate(ids)])
    oracles = [oracle_greedy(base, p, 4)[0] for p in ids]
    assert first.tolist() == [o[0] for o in oracles]
    width, positions = batch.width, batch.next_positions.tolist()
    # Row 0 proposes its true next 3 tokens, row 1 a wrong first draft.
    drafts = [[oracles[0][1:4], [(oracles[1][1] + 1) % runner.vocab_size, 5]]]
    with torch.inference_mode():
        yielded = runner.speculative_step([batch], drafts)
    assert yielded == [[*oracles[0][1:4], yielded[0][-1]], [oracles[1][1]]]
    assert yielded[0][-1] == oracle_greedy(base, ids[0], 5)[0][4]
    batch.check()
    assert batch.width == width + 4
    assert batch.next_positions.tolist() == [positions[0] + 4, positions[1] + 1]
    assert batch.attention_mask[1, width:].tolist() == [1, 0, 0, 0]
    assert batch.next_input_ids.tolist() == [yielded[0][-1], oracles[1][1]]


def test_padding_left_by_rows_that_accept_less_is_squeezed_out(base) -> None:
    """Two rows taking turns accepting every draft and none: the group widens by 5 a step while each row grows by
    3 on average, until the padding between rows' real columns passes a quarter of the width and the group is
    compacted (every row's real columns right-aligned, in order). Decoding on, both rows still give the
    oracle's tokens."""
    from server.model_loading import probe_kv_shape
    from server.runner import MIN_COMPACTED_COLUMNS, ModelRunner, NewRequest

    runner = ModelRunner(base, *probe_kv_shape(base), static_decode=False)
    ids = [prompt(90, 5), prompt(91, 8)]
    steps = 12
    oracles = [oracle_greedy(base, p, 5 * steps + 4)[0] for p in ids]
    batch, first = runner.prefill([NewRequest(f"r{i}", p, SamplingParams()) for i, p in enumerate(ids)])
    got = [[token] for token in first.tolist()]
    compactions = 0
    with torch.inference_mode():
        for step in range(steps):
            width = batch.width
            drafts = []
            for row in (0, 1):
                done, truth = len(got[row]), oracles[row]
                wrong = [(truth[done] + 1) % runner.vocab_size] * 4
                drafts.append(truth[done : done + 4] if row == step % 2 else wrong)
            for row, tokens in enumerate(runner.speculative_step([batch], [drafts])):
                got[row] += tokens
            batch.check()
            compactions += batch.width < width + 5
            assert batch.inner_padding <= max(MIN_COMPACTED_COLUMNS, batch.width // 4)
        for _ in range(3):  # plain steps after the compaction
            for row, token in enumerate(runner.decode(batch).tolist()):
                got[row].append(token)
    assert compactions > 0, "the padding must have reached the threshold within the steps"
    for row in (0, 1):
        assert got[row] == oracles[row][: len(got[row])]
    assert sorted(len(g) for g in got) == [1 + 3 * steps + 3] * 2


@pytest.mark.parametrize(("flag", "expected"), [(None, DEFAULT_CPU_SPECULATIVE_TOKENS), (0, 0), (6, 6)])
def test_a_cpu_server_speculates_unless_told_otherwise(
    flag: int | None, expected: int, tiny_model_dir, tmp_path
) -> None:
    from server.config import ServeConfig
    from tests.server_state import built_state

    config = ServeConfig(store=f"disk://{tmp_path}", speculative_tokens=flag, speculative_max_rows=3)
    with built_state(config, tiny_model_dir) as state:
        assert state.engine.speculative == SpeculativeConfig(expected, 3)
        assert state.engine.speculative.enabled == (expected > 0)


def test_cuda_does_not_speculate_by_default() -> None:
    """Not measured on a GPU yet, where a speculating step also gives up launching ahead of the last one."""
    from server.api.app import _speculative
    from server.config import ServeConfig

    assert _speculative(ServeConfig(), torch.device("cuda")).tokens == 0
    assert _speculative(ServeConfig(speculative_tokens=3), torch.device("cuda")).tokens == 3
