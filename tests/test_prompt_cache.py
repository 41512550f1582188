"""The prompt cache: longest cached heads, keys that only match the same prefix and tokens, a byte budget with
first blocks out last, and the engine's tokens with cache hits equal to the PEFT oracle in every engine mode."""

from __future__ import annotations

import copy

import pytest
import torch
from prometheus_client import CollectorRegistry

from server.engine import GenerationRequest
from server.metrics import EngineMetrics
from server.prompt_cache import PromptCache
from server.sampling import SamplingParams
from tests import test_engine
from tests.test_engine import collect, make_engine, oracle_penalized, prompt, together_and_staggered, tokens_of
from tests.tiny_models import oracle_greedy, peft_prefix_model, prefix_kv_of, tiny_llama

mode = test_engine.mode  # the engine tests' four engine modes, a fixture
BLOCK = 4
LAYERS, HEADS, DIM = 2, 2, 3


def fake_kv(prompt: list[int]):
    """kv_of for the cache: token t's K/V filled with its id (and V with minus it), so blocks can be checked."""
    calls: list[tuple[int, int]] = []

    def kv_of(start: int, end: int) -> torch.Tensor:
        calls.append((start, end))
        ids = torch.tensor(prompt[start:end], dtype=torch.float32)
        kv = ids[None, None, None, :, None].expand(LAYERS, 2, HEADS, end - start, DIM).clone()
        kv[:, 1] *= -1
        return kv

    return kv_of, calls


def block_bytes() -> int:
    return LAYERS * 2 * HEADS * BLOCK * DIM * 4


def test_a_hit_is_the_longest_cached_head_that_leaves_a_token_to_compute() -> None:
    cache = PromptCache(1 << 20, block_tokens=BLOCK)
    first = list(range(10, 23))  # 13 tokens: 3 whole blocks
    kv_of, calls = fake_kv(first)
    assert cache.lookup("task@1", first) is None
    cache.store("task@1", first, kv_of)
    assert calls == [(0, 12)] and len(cache) == 3 and cache.bytes == 3 * block_bytes()
    hit = cache.lookup("task@1", first)  # 13 tokens: 12 cached, 1 left to compute
    assert hit is not None and hit.tokens == 12
    got = torch.cat(hit.blocks, dim=3)
    assert got[0, 0, 0, :, 0].tolist() == first[:12] and got[1, 1, 1, :, 2].tolist() == [-t for t in first[:12]]
    exact = first[:12]  # a prompt of exactly the cached blocks keeps its last block to compute
    hit = cache.lookup("task@1", exact)
    assert hit is not None and hit.tokens == 8
    branch = first[:6] + [99] * 10  # differs inside the second block
    hit = cache.lookup("task@1", branch)
    assert hit is not None and hit.tokens == 4
    assert cache.lookup("task@2", first) is None  # another prefix (version) never matches
    assert cache.lookup("", first) is None
    kv_of, calls = fake_kv(branch)
    cache.store("task@1", branch, kv_of)  # its first block is there: only blocks 2-4 are copied out
    assert calls == [(4, 16)] and len(cache) == 6
    hit = cache.lookup("task@1", [*branch, 5])
    assert hit is not None and hit.tokens == 16
    assert torch.cat(hit.blocks, dim=3)[0, 0, 0, :, 0].tolist() == branch
    assert cache.hit_tokens == 12 + 8 + 4 + 16


def test_the_budget_holds_and_first_blocks_go_last() -> None:
    cache = PromptCache(5 * block_bytes(), block_tokens=BLOCK)
    a = list(range(100, 113))  # 3 blocks
    cache.store("t", a, fake_kv(a)[0])
    b = list(range(200, 213))  # 3 more: one block over the budget
    cache.store("t", b, fake_kv(b)[0])
    assert cache.bytes <= 5 * block_bytes() and len(cache) == 5
    hit = cache.lookup("t", [*a, 1])
    assert hit is not None and hit.tokens == 8, "a's last block went first, its first ones stay"
    c = list(range(300, 313))
    cache.store("t", c, fake_kv(c)[0])  # b's blocks are the least recently used now
    assert cache.lookup("t", [*b, 1]) is None
    assert len(cache) <= 5 and cache.bytes == len(cache) * block_bytes()
    hit = cache.lookup("t", [*c, 1])
    assert hit is not None and hit.tokens == 12


def test_a_dropped_block_takes_the_blocks_after_it() -> None:
    cache = PromptCache(4 * block_bytes(), block_tokens=BLOCK)
    a = list(range(8))
    cache.store("t", [*a, 1], fake_kv([*a, 1])[0])  # 2 blocks
    shared = [0, 1, 2, 3, 50, 51, 52, 53, 54, 55, 56, 57, 9]  # a's first block, then 2 of its own
    cache.store("t", shared, fake_kv(shared)[0])
    assert len(cache) == 4
    other = list(range(400, 409))
    assert cache.lookup("t", [*a, 1]) is not None  # a's chain now the most recently used
    cache.store("t", other, fake_kv(other)[0])  # 2 blocks in: shared's own two go, oldest first
    assert len(cache) == 4 and cache.bytes == 4 * block_bytes()
    hit = cache.lookup("t", shared)
    assert hit is not None and hit.tokens == 4


def test_a_tenant_past_its_share_evicts_its_own_blocks() -> None:
    """A tenant sending many distinct prompts evicts its own blocks, not the few another tenant keeps (which would
    also tell that tenant how busy the others are)."""
    cache = PromptCache(6 * block_bytes(), block_tokens=BLOCK)
    alice = list(range(500, 509))  # 2 blocks
    cache.store("alice/t@1", alice, fake_kv(alice)[0], owner="alice")
    for i in range(12):  # 24 blocks of bob's, each prompt used once
        prompt = list(range(1000 + 10 * i, 1009 + 10 * i))
        cache.store("bob/t@1", prompt, fake_kv(prompt)[0], owner="bob")
    assert cache.bytes <= 6 * block_bytes() and len(cache) == 6
    hit = cache.lookup("alice/t@1", [*alice, 1])
    assert hit is not None and hit.tokens == 8
    assert cache.lookup("bob/t@1", list(range(1000, 1009))) is None  # bob's oldest went
    hit = cache.lookup("bob/t@1", list(range(1110, 1119)))
    assert hit is not None and hit.tokens == 8
    for i in range(3):  # alice now goes past her share (half): her own least recently used go first
        prompt = list(range(2000 + 10 * i, 2009 + 10 * i))
        cache.store("alice/t@1", prompt, fake_kv(prompt)[0], owner="alice")
    assert len(cache) == 6 and cache.lookup("alice/t@1", [*alice, 1]) is None
    assert cache.bytes == len(cache) * block_bytes()


def test_dropping_a_first_block_drops_its_chain() -> None:
    cache = PromptCache(100 * block_bytes(), block_tokens=BLOCK)
    a = list(range(13))
    cache.store("t", a, fake_kv(a)[0])
    cache._drop(next(k for k in cache._blocks if k[0] == "t"))  # the chain's first block
    assert len(cache) == 0 and cache.bytes == 0


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=8)


@pytest.fixture(scope="module")
def prefixes(base):
    return [peft_prefix_model(copy.deepcopy(base), p, seed=700 + i) for i, p in enumerate([4, 7])]


async def test_cache_hits_change_no_token(base, prefixes, mode) -> None:
    """Requests of two prefixes sharing a 20-token head, with their own tails: the first of each prefix fills the
    cache, the rest hit it (alone, together, joining one another's batches) and every greedy token equals the
    PEFT oracle's; the same tokens under the other prefix or none never hit; a repetition penalty still sees
    the whole prompt, and prompt log-probabilities are computed, not cached."""
    head = prompt(800, 20)
    tails = [prompt(810 + i, 2 + i) for i in range(4)]
    cache = PromptCache(64 << 20, block_tokens=BLOCK)
    engine = make_engine(base, prompt_cache=cache, metrics=EngineMetrics(CollectorRegistry()), **mode)

    def request(i: int, which: int | None, **params) -> GenerationRequest:
        kv = None if which is None else prefix_kv_of(prefixes[which])
        pid = None if which is None else f"p{which}"
        return GenerationRequest(head + tails[i], SamplingParams(max_new_tokens=6, **params), kv, pid)

    try:
        firsts = [tokens_of(await collect(engine, request(0, which))) for which in (0, 1, None)]
        assert cache.hit_tokens == 0 and len(cache) > 0
        requests = [request(i, which) for i in (1, 2, 3) for which in (0, 1, None)]
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        hits_alone = cache.hit_tokens
        together, staggered = await together_and_staggered(engine, requests)
        penalized = request(3, 0, repetition_penalty=1.6)
        with_penalty = tokens_of(await collect(engine, penalized))
        scored = await collect(engine, request(2, 1, prompt_logprobs=1))
    finally:
        engine.shutdown()
    assert hits_alone >= 9 * 20 // BLOCK * BLOCK, "each request after the first of its prefix takes the head"
    assert [tokens_of(e) for e in together] == alone == [tokens_of(e) for e in staggered]
    models = [prefixes[0], prefixes[1], base]
    for got, which in zip(firsts, range(3), strict=True):
        assert got == oracle_greedy(models[which], head + tails[0], 6)[0]
    for r, got, which in zip(requests, alone, [0, 1, 2] * 3, strict=True):
        assert got == oracle_greedy(models[which], list(r.prompt_ids), 6)[0]
    assert with_penalty == oracle_penalized(prefixes[0], head + tails[3], 6, penalized.params)
    assert with_penalty != alone[6], "the penalty must change this row's tokens"
    first_event = next(e for e in scored if e.prompt_logprobs is not None)
    assert len(first_event.prompt_logprobs) == len(head + tails[2])


async def test_base_model_prompts_are_cached_per_tenant(base) -> None:
    """Tenants share the base model, not its prompt cache: usage reports cached_tokens, so one tenant would
    otherwise learn how much of a guess matched another tenant's prompt (a confidential memo, 16 tokens at a
    time). The same tenant still hits its own head."""
    head = prompt(900, 24)
    engine = make_engine(base, prompt_cache=PromptCache(64 << 20, block_tokens=BLOCK))

    def request(tenant: str, tail: int) -> GenerationRequest:
        return GenerationRequest(head + prompt(950 + tail, 3), SamplingParams(max_new_tokens=2), tenant=tenant)

    try:
        await collect(engine, request("alice", 0))  # alice's memo fills the cache
        bob = await collect(engine, request("bob", 1))
        alice = await collect(engine, request("alice", 2))
    finally:
        engine.shutdown()
    assert bob[0].cached_tokens == 0
    assert alice[0].cached_tokens >= 24 // BLOCK * BLOCK


def test_tenants_within_their_share_evict_the_least_recently_used_of_all() -> None:
    """Many tenants with a prompt each (no one past its share): a plain LRU, whoever holds the most. Evicting from
    the tenant holding the most dropped an active tenant's long prompt before idle tenants' short ones."""
    cache = PromptCache(8 * block_bytes(), block_tokens=BLOCK)
    long = list(range(700, 717))  # 4 blocks
    cache.store("active/t@1", long, fake_kv(long)[0], owner="active")
    for i in range(4):  # 4 idle tenants with a block each: full
        prompt = list(range(800 + 10 * i, 805 + 10 * i))
        cache.store(f"idle{i}/t@1", prompt, fake_kv(prompt)[0], owner=f"idle{i}")
    assert len(cache) == 8
    assert cache.lookup("active/t@1", [*long, 1]) is not None  # active's prompt is the most recently used
    newcomer = list(range(900, 905))
    cache.store("new/t@1", newcomer, fake_kv(newcomer)[0], owner="new")
    hit = cache.lookup("active/t@1", [*long, 1])
    assert hit is not None and hit.tokens == 16  # the least recently used went: idle0's block
    assert cache.lookup("idle0/t@1", list(range(800, 805))) is None
