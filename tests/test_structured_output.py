"""Structured output: compiling constraints, the per-row matchers in a batch, and the engine's constrained greedy
tokens against the PEFT oracle with the same grammar's mask, alone and batched."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time

import pytest
import torch
import xgrammar as xgr

from server.engine import GenerationRequest
from server.errors import InvalidInput
from server.grammar_limits import json_nesting_depth
from server.sampling import SamplingBatch, SamplingParams, sample
from server.structured_output import (
    MAX_CONCURRENT_COMPILES,
    Grammar,
    GrammarCompiler,
    GrammarError,
    GrammarRows,
    GrammarSpec,
)
from tests import test_engine
from tests.test_engine import collect, make_engine, prompt, together_and_staggered, tokens_of
from tests.tiny_models import VOCAB, peft_prefix_model, prefix_kv_of, tiny_llama

EOS = 2
mode = test_engine.mode  # the engine tests' four engine modes, a fixture
CPU = torch.device("cpu")
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["s", "m", "xl"]}},
    "required": ["ok", "size"],
    "additionalProperties": False,
}


def byte_vocab_info() -> xgr.TokenizerInfo:
    """The tiny models' vocabulary read as raw bytes: token i is byte i; token 2 (EOS) ends a grammar."""
    return xgr.TokenizerInfo(
        [bytes([i]) for i in range(VOCAB)], xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[EOS]
    )


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(byte_vocab_info)


def text_of(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t != EOS).decode()


def _nested_arrays(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_schemas_nested_within_the_bound_compile(compiler: GrammarCompiler) -> None:
    assert compiler.compile(GrammarSpec.json_schema(_nested_arrays(255))) is not None  # 256 levels
    assert json_nesting_depth('{"a": "[[[\\" {{", "b": [{}]}') == 3  # brackets in strings do not count


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("regex", "[a-z"), "invalid regex: Regex parsing error at position 5: Unclosed '['"),
        (GrammarSpec("json", "{bad"), "invalid JSON schema: "),
        (GrammarSpec.json_schema({"type": "foo"}), 'invalid JSON schema: Unsupported type "foo"'),
        (
            GrammarSpec("ebnf", "root ::= foo"),
            'invalid EBNF grammar: EBNF parser error at line 1, column 10: Rule "foo"',
        ),
        (GrammarSpec("choice"), "invalid choice: a choice needs at least one string"),
        # Compiled, but nothing satisfies them: every logit would be masked (they were served unconstrained).
        (GrammarSpec("ebnf", "root ::= root"), "invalid EBNF grammar: no text this model can write satisfies it"),
        (GrammarSpec("regex", "[^\\x00-\\U0010FFFF]"), "invalid regex: no text this model can write"),
        # Compile time grows much faster than depth: 900 nested arrays held a core for over a minute.
        (GrammarSpec.json_schema(_nested_arrays(300)), "invalid JSON schema: nested 301 levels deep; at most 256"),
    ],
)
def test_bad_constraints_say_what_is_wrong(compiler: GrammarCompiler, spec: GrammarSpec, message: str) -> None:
    with pytest.raises(GrammarError) as caught:
        compiler.compile(spec)
    assert str(caught.value).startswith(message), str(caught.value)
    assert ".cc:" not in str(caught.value)  # xgrammar's source locations are not the client's business


def masked(matcher: xgr.GrammarMatcher, logits: torch.Tensor) -> None:
    """xgrammar's own masking of one row's logits [1, V], in place: what the server's ``GrammarRows`` must do."""
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    matcher.fill_next_token_bitmask(bitmask)
    xgr.apply_token_bitmask_inplace(logits, bitmask)


def test_the_compiled_constraints_kept_stay_within_their_budget() -> None:
    limit = 1_000_000
    bounded = GrammarCompiler(byte_vocab_info, cache_bytes=limit)
    sizes = []
    for i in range(700):  # distinct schemas, as many clients would send (xgrammar alone passes 1 MB by ~450)
        properties = {f"field_{i}_{j}": {"type": "string", "maxLength": 5 + j} for j in range(6)}
        bounded.compile(GrammarSpec.json_schema({"type": "object", "properties": properties}))
        sizes.append(bounded.cache_bytes)
    assert max(sizes) <= limit and sizes[0] > 0, sizes
    assert max(sizes) >= limit // 2, "the cache must fill up towards its budget, not be emptied every time"


def test_compiled_constraints_are_kept_per_tenant() -> None:
    """A repeat comes from what its tenant compiled before; another tenant's same schema compiles anew, so how quickly
    a request is answered never tells a tenant which schemas (field names, choices) others have sent."""
    compiler = GrammarCompiler(byte_vocab_info)
    xgr_compiler = compiler._ready()
    compiled: list[str] = []

    class Counted:
        def compile_json_schema(self, source, **kwargs):  # type: ignore[no-untyped-def]
            compiled.append(source)
            return xgr_compiler.compile_json_schema(source, **kwargs)

    compiler._compiler = Counted()  # type: ignore[assignment]
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"acquisition_target": {"type": "string"}}})
    first = compiler.compile(spec, "bob")
    assert compiler.compile(GrammarSpec.json_schema(spec.source), "bob") is first  # an equal spec: kept
    assert len(compiled) == 1
    alices = compiler.compile(spec, "alice")
    assert alices is not first and len(compiled) == 2  # compiled again, for her
    assert xgr_compiler.get_cache_size_bytes() == 0  # ... from scratch: xgrammar's own cache (one for all) is off
    assert compiler.compile(spec, "alice") is alices and len(compiled) == 2
    assert compiler.cache_bytes == first.compiled.memory_size_bytes + alices.compiled.memory_size_bytes > 0


def test_a_kept_constraint_waits_for_no_compile() -> None:
    """Both compile slots busy with others' large schemas: a tenant's repeat is answered from what was kept."""
    from concurrent.futures import ThreadPoolExecutor

    compiler = GrammarCompiler(byte_vocab_info)
    spec = GrammarSpec("regex", "[a-c]+")
    first = compiler.compile(spec, "alice")
    with contextlib.ExitStack() as busy, ThreadPoolExecutor(1) as pool:
        for i in range(MAX_CONCURRENT_COMPILES):
            busy.enter_context(compiler._compiling.slot(f"other{i}"))
        assert pool.submit(compiler.compile, spec, "alice").result(timeout=5) is first


@pytest.mark.parametrize(("owners", "at_once"), [(4, 2), (1, 1)])
def test_at_most_two_constraints_compile_at_once_one_per_tenant(owners: int, at_once: int) -> None:
    """Eight requests' schemas at once: two compile while the rest wait their turn (each takes a core; 32 I/O
    threads let 32 compile beside the engine's steps), one per tenant (a tenant's slow schemas held both slots
    while others waited), and every one comes back compiled."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    compiler = GrammarCompiler(byte_vocab_info)
    xgr_compiler = compiler._ready()  # the real xgrammar compiler, watched
    active, most, lock, release = [0], [0], threading.Lock(), threading.Event()

    class Watched:
        def compile_json_schema(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            release.wait(10)
            try:
                return xgr_compiler.compile_json_schema(*args, **kwargs)
            finally:
                with lock:
                    active[0] -= 1

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(xgr_compiler, name)

    compiler._compiler = Watched()  # type: ignore[assignment]
    specs = [
        GrammarSpec.json_schema({"type": "object", "properties": {f"f{i}": {"type": "integer"}}}) for i in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(compiler.compile, spec, f"t{i % owners}") for i, spec in enumerate(specs)]
        deadline = time.monotonic() + 10
        while most[0] < at_once and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # time for another to get in, if it could
        assert active[0] == at_once
        release.set()
        assert all(f.result().spec == spec for f, spec in zip(futures, specs, strict=True))
    assert most[0] == at_once


def allowed(grammar: Grammar, text: str) -> set[int]:
    """The tokens ``grammar`` allows after ``text``."""
    matcher = grammar.matcher()
    for byte in text.encode():
        assert matcher.accept_token(byte), (text, byte)
    logits = torch.zeros(1, VOCAB)
    masked(matcher, logits)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_json_properties_come_in_the_schemas_order(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}}}
    grammar = compiler.compile(GrammarSpec.json_schema({**schema, "required": ["zeta", "alpha"]}))
    assert allowed(grammar, '{"') == {ord("z")}


def test_choices_are_matched_exactly_whatever_their_characters(compiler: GrammarCompiler) -> None:
    choices = ('say "hi"', "back\\slash", "caf\xe9", "a")
    grammar = compiler.compile(GrammarSpec("choice", choices=choices))
    assert allowed(grammar, "") == {ord("s"), ord("b"), ord("c"), ord("a")}
    assert allowed(grammar, "say ") == {ord('"')}
    assert allowed(grammar, "back") == {ord("\\")}
    assert allowed(grammar, "caf") == {0xC3}  # grammars match UTF-8 bytes: é is C3 A9
    assert allowed(grammar, "a") == {EOS}  # complete: only the end remains


def test_rows_keep_their_matchers_through_filter_and_concatenate(compiler: GrammarCompiler) -> None:
    digits = compiler.compile(GrammarSpec("regex", "[0-9]+"))
    letters = compiler.compile(GrammarSpec("regex", "[a-c]+"))
    first = SamplingBatch.from_params([SamplingParams(grammar=digits), SamplingParams()], CPU)
    second = SamplingBatch.from_params([SamplingParams(), SamplingParams(grammar=letters)], CPU)
    batch = SamplingBatch.concatenate([first, second])  # rows: digits, free, free, letters
    assert batch.grammars is not None and batch.grammars.rows == (0, 3)
    batch = batch.filter(torch.tensor([3, 1, 0]), [3, 1, 0])  # letters, free, digits
    assert batch.grammars is not None and batch.grammars.rows == (0, 2)
    logits = torch.zeros(3, VOCAB)
    logits[:, ord("z")] = 5.0  # what every row would take unconstrained
    tokens = sample(logits, batch).tolist()
    assert tokens[1] == ord("z")
    assert chr(tokens[0]) in "abc" and chr(tokens[2]) in "0123456789"


@pytest.mark.parametrize(
    ("constrained", "ended"),
    [((0, 1, 2, 3), False), ((1, 3), False), ((0, 1, 2, 3), True)],
    ids=["every-row", "some-rows", "one-ended"],
)
def test_the_mask_is_xgrammars_row_by_row(compiler: GrammarCompiler, constrained: tuple[int, ...], ended: bool) -> None:
    """The server's CPU masking (numpy-unpacked bits) sets exactly the logits xgrammar's own kernel sets, for
    matchers in different states; an ended matcher masks nothing."""
    grammar = compiler.compile(GrammarSpec("regex", r"[a-c]{1,3}(x|yz)"))
    matchers = [grammar.matcher() for _ in constrained]
    for matcher, text in zip(matchers, [b"", b"ab", b"abc", b"bx"], strict=False):
        for byte in text:
            assert matcher.accept_token(byte)
    if ended:
        assert matchers[3].accept_token(EOS) and matchers[3].is_terminated()
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    want = logits.clone()
    for row, matcher in zip(constrained, matchers, strict=True):
        if not matcher.is_terminated():
            masked(matcher, want[row : row + 1])
    GrammarRows(constrained, matchers).mask(logits)
    assert torch.equal(logits, want)
    assert bool(torch.isinf(logits[constrained[0]]).any())


def test_a_speculative_step_masks_each_query_as_the_drafts_before_it_leave_the_grammar(
    compiler: GrammarCompiler,
) -> None:
    """Each query of a row gets the mask of its grammar after the drafts before it, up to the first draft the
    grammar refuses (later queries: no mask); the matchers are left as they were, and ``advance`` moves them
    past the tokens the rows keep. A free row among them gets no mask."""
    grammar = compiler.compile(GrammarSpec("regex", r"[a-c]{1,3}(x|yz)"))
    rows = GrammarRows((0, 2), [grammar.matcher(), grammar.matcher()])
    drafts = [list(b"ab"), list(b"zz"), list(b"czb")]  # row 2's "z" is refused after "c"
    counts = [1 + len(d) for d in drafts]  # queries per row: 3, 3, 4, row after row
    masks = rows.at_positions(drafts, counts, VOCAB)
    assert masks.rows == (0, 1, 2, 6, 7)  # row 0: before "a", before "b", after both; row 2: before "c" and "z"
    want = torch.zeros(sum(counts), VOCAB)
    for start, kept in ((0, b"ab"), (6, b"c")):
        stepper = grammar.matcher()
        for i in range(len(kept) + 1):
            masked(stepper, want[start + i : start + i + 1])
            if i < len(kept):
                assert stepper.accept_token(kept[i])
    logits = torch.zeros(sum(counts), VOCAB)
    masks.mask(logits)
    assert torch.equal(logits, want)
    now = torch.zeros(3, VOCAB)
    rows.mask(now)  # the matchers as they were before the step
    assert torch.equal(now[0], want[0]) and torch.equal(now[2], want[6])
    rows.advance([list(b"ab"), [], list(b"c")])
    after = torch.zeros(3, VOCAB)
    rows.mask(after)
    assert torch.equal(after[0], want[2]) and torch.equal(after[2], want[7])


def test_log_probabilities_stay_the_raw_logits(compiler: GrammarCompiler) -> None:
    grammar = compiler.compile(GrammarSpec("choice", choices=("b",)))
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    batch = SamplingBatch.from_params([SamplingParams(grammar=grammar, logprobs=2)], CPU)
    raw = logits.clone()
    assert sample(logits, batch).tolist() == [ord("b")]
    assert batch.last_logprobs is not None
    want = torch.log_softmax(raw, dim=-1)
    torch.testing.assert_close(batch.last_logprobs.chosen, want[:, ord("b")])
    torch.testing.assert_close(batch.last_logprobs.top_values, want.topk(2).values)


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=5)


@pytest.fixture(scope="module")
def prefixes(base):
    return [peft_prefix_model(copy.deepcopy(base), p, seed=300 + i) for i, p in enumerate([3, 6])]


@torch.inference_mode()
def oracle_constrained(model, prompt_ids: list[int], steps: int, grammar: Grammar) -> list[int]:
    """PEFT's uncached greedy loop with the grammar's mask on each step's logits; ends at EOS like the engine."""
    matcher = grammar.matcher()
    ids, generated = list(prompt_ids), []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[:, -1].float()  # [1, V]
        masked(matcher, logits)
        token = int(logits.argmax())
        assert matcher.accept_token(token)
        generated.append(token)
        ids.append(token)
        if token == EOS:
            break
    return generated


async def test_constrained_rows_equal_the_oracle_alone_and_batched(base, prefixes, compiler, mode) -> None:
    """Rows held to a regex, a choice, a JSON schema and an EBNF grammar, beside free rows, joining one another's
    batches: each constrained row's greedy tokens are the masked oracle's, and its text matches its constraint."""
    specs = [
        GrammarSpec("regex", r"[a-f]{2,6}-[0-9]{1,3}"),
        GrammarSpec("choice", choices=("north", "south", "east", "west")),
        GrammarSpec.json_schema(SCHEMA),
        GrammarSpec("ebnf", 'root ::= "(" item ("," item)* ")"\nitem ::= [xyz]'),
    ]
    grammars = [compiler.compile(spec) for spec in specs]
    steps = 40  # bytes: the JSON object takes ~27
    params = [SamplingParams(max_new_tokens=steps, grammar=g) for g in grammars]
    params[1:1] = [SamplingParams(max_new_tokens=steps)]  # a free row among them
    params.append(SamplingParams(max_new_tokens=steps, temperature=0.8, seed=4))
    requests = [
        GenerationRequest(prompt(500 + i, 4 + i), p, prefix_kv_of(prefixes[i % 2]), f"p{i % 2}")
        for i, p in enumerate(params)
    ]
    engine = make_engine(base, eos_token_ids=[EOS], **mode)
    try:
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        together, staggered = await together_and_staggered(engine, requests)
    finally:
        engine.shutdown()
    assert [tokens_of(e) for e in together] == alone == [tokens_of(e) for e in staggered]
    finished = 0
    for i, request in enumerate(requests):
        grammar = request.params.grammar
        if grammar is None:
            continue
        want = oracle_constrained(prefixes[i % 2], list(request.prompt_ids), steps, grammar)
        assert alone[i] == want, f"request {i} ({grammar.spec.kind})"
        if want[-1] == EOS:  # complete: the text matches the whole constraint
            finished += 1
            assert together[i][-1].finish_reason == "eos"
            text = text_of(want)
            if grammar.spec.kind == "regex":
                assert re.fullmatch(grammar.spec.source, text), text
            elif grammar.spec.kind == "choice":
                assert text in grammar.spec.choices
            elif grammar.spec.kind == "json":
                value = json.loads(text)
                assert isinstance(value["ok"], bool) and value["size"] in ("s", "m", "xl") and len(value) == 2
            else:
                assert re.fullmatch(r"\([xyz](,[xyz])*\)", text), text
    assert finished >= 3, "most constrained rows should complete within the step budget"
    assert any(
        r.params.grammar is not None and r.params.grammar.spec.kind == "json" and t[-1] == EOS
        for r, t in zip(requests, alone, strict=True)
    )


async def test_constrained_rows_speculate_and_keep_the_oracles_tokens(base, prefixes, compiler, mode) -> None:
    """Rows held to grammars verify drafts (their matchers give each query its mask and go back): alone, together
    and joining one another, their greedy tokens are the masked oracle's and a seeded sampled row's are what an
    engine that never speculates draws; drafts were accepted and rejected on the way."""
    from prometheus_client import CollectorRegistry

    from server.metrics import EngineMetrics
    from tests.test_speculative import EAGER, counters

    specs = [
        GrammarSpec("ebnf", 'root ::= "(" item ("," item)* ")"\nitem ::= [xyz]'),
        GrammarSpec.json_schema(SCHEMA),
        GrammarSpec("regex", r"([a-c][0-9])+;"),
        GrammarSpec("regex", r"([a-c][0-9])+;"),
    ]
    grammars = [compiler.compile(spec) for spec in specs]
    steps = 40
    params = [SamplingParams(max_new_tokens=steps, grammar=g) for g in grammars[:3]]
    params.append(SamplingParams(max_new_tokens=steps, grammar=grammars[3], temperature=0.9, seed=11))
    requests = [
        GenerationRequest(prompt(600 + i, 4 + i), p, prefix_kv_of(prefixes[i % 2]), f"p{i % 2}")
        for i, p in enumerate(params)
    ]
    metrics = EngineMetrics(CollectorRegistry())
    engine = make_engine(base, eos_token_ids=[EOS], metrics=metrics, speculative=EAGER, **mode)
    plain = make_engine(base, eos_token_ids=[EOS], **mode)
    steps_with_grammars = []
    verify = engine.runner.speculative_step

    def recorded(groups, drafts):
        steps_with_grammars.append(any(g.sampling.grammars is not None for g in groups))
        return verify(groups, drafts)

    engine.runner.speculative_step = recorded
    try:
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        drafted, kept = counters(metrics)
        together, staggered = await together_and_staggered(engine, requests)
        reference = tokens_of(await collect(plain, requests[3]))
    finally:
        engine.shutdown()
        plain.shutdown()
    assert [tokens_of(e) for e in together] == alone == [tokens_of(e) for e in staggered]
    for i, request in enumerate(requests[:3]):
        want = oracle_constrained(prefixes[i % 2], list(request.prompt_ids), steps, request.params.grammar)
        assert alone[i] == want, f"request {i} ({specs[i].kind})"
    assert alone[3] == reference
    assert any(steps_with_grammars)
    assert 0 < kept < drafted, "drafts both accepted and rejected"


async def test_a_grammar_cannot_be_combined_with_ignore_eos_or_min_tokens(base, compiler) -> None:
    grammar = compiler.compile(GrammarSpec("regex", "[a-z]+"))
    engine = make_engine(base, eos_token_ids=[EOS])
    try:
        for extra in ({"ignore_eos": True}, {"min_tokens": 2}):
            request = GenerationRequest(prompt(1, 5), SamplingParams(grammar=grammar, **extra))
            with pytest.raises(InvalidInput, match="cannot be combined with ignore_eos or min_tokens"):
                await collect(engine, request)
    finally:
        engine.shutdown()
