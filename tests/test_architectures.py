"""Every verified architecture serves prefixes exactly: tiny random configs through the runner and the real Engine.

Two oracles, both uncached greedy loops of full forwards:
* PEFT's prefix-tuning forward (the training semantics) for every architecture PEFT can run;
* "own KV": the model's cache of a real text T used as the prefix (P = len(T)) must equal prompting with T + X
  without a prefix. Real tokens start at P, where T left off; this is the only oracle for falcon's multi-query
  attention, for which PEFT's own prefix forward fails on this stack.

Sliding-window models get a window of 8 while prefixes (up to 9) plus prompts (up to 12) run past it.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, PreTrainedModel

from server import kv_groups
from server.architectures import VERIFIED_ARCHITECTURES
from server.cli import main as cli_main
from server.engine import GenerationEvent, GenerationRequest
from server.model_loading import ModelLoadError, check_architecture, load_model, prepare_model, probe_kv_shape
from server.runner import ModelRunner, NewRequest
from server.sampling import SamplingParams
from tests.test_engine import make_engine, tokens_of
from tests.tiny_models import VOCAB, oracle_greedy, peft_prefix_model, prefix_kv_of

# PEFT's forward still passes the cache as `past_key_values`; that warning is PEFT's business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

STEPS = 6  # greedy tokens per batched request
LONG_STEPS = 32  # the request that is already decoding when the others join
WINDOW = 8
CASES = [(2, 5), (0, 12), (5, 3), (9, 10), (0, 4)]  # (prefix length P, prompt length): mixed P and no prefix

_GQA = {"num_attention_heads": 4, "num_key_value_heads": 2}
_LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 256}

# test id -> (model_type, tiny config). GQA wherever the architecture has it; sliding windows small enough to bite.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "llama": ("llama", {**_LLAMA_LIKE, **_GQA}),
    "mistral-window": ("mistral", {**_LLAMA_LIKE, **_GQA, "sliding_window": WINDOW}),
    # Layer 0 full attention, layer 1 sliding: the model looks its masks up by layer type.
    "qwen2-window": (
        "qwen2",
        {**_LLAMA_LIKE, **_GQA, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3": ("qwen3", {**_LLAMA_LIKE, **_GQA, "head_dim": 16}),
    "gpt_neox-partial-rotary": ("gpt_neox", {**_LLAMA_LIKE, "num_attention_heads": 4, "rotary_pct": 0.25}),
    "opt": (
        "opt",
        {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 64}
        | {"max_position_embeddings": 256},
    ),
    "phi3-window": (
        "phi3",
        {**_LLAMA_LIKE, **_GQA, "original_max_position_embeddings": 256, "sliding_window": WINDOW},
    ),
    "gemma-mqa": ("gemma", {**_LLAMA_LIKE, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16}),
    "gemma2-window": ("gemma2", {**_LLAMA_LIKE, **_GQA, "head_dim": 16, "sliding_window": WINDOW}),
    "bloom-alibi": ("bloom", {"hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "gptj-partial-rotary": ("gptj", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8}),
    "falcon-mqa": ("falcon", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "alibi": False}),
    "falcon-mqa-alibi": (
        "falcon",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "alibi": True},
    ),
}
# PEFT 0.21.2 builds num_attention_heads KV heads for falcon's single MQA head and its forward fails.
NO_PEFT_ORACLE = {"falcon-mqa", "falcon-mqa-alibi"}
SLIDING = [name for name in ARCHITECTURES if name.endswith("-window")]


def make_model(name: str, **overrides: Any) -> PreTrainedModel:
    model_type, kwargs = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **(kwargs | overrides)
    )
    return AutoModelForCausalLM.from_config(config).eval()


@dataclass(frozen=True)
class Case:
    prompt: list[int]
    prefix_kv: torch.Tensor | None  # [L, 2, H_kv, P, d]
    tokens: list[int]  # the oracle's greedy tokens
    logits: list[torch.Tensor]  # the oracle's logits per step [V]


def _random_ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, VOCAB - 3, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def own_kv(model: PreTrainedModel, text: list[int]) -> torch.Tensor:
    """The model's own K/V of ``text`` as a prefix [L, 2, H_kv, P, d] (keys already rotated to positions 0..P-1)."""
    # A config-less cache keeps every position in every layer; the default one would trim sliding layers.
    out = model(input_ids=torch.tensor([text]), cache=DynamicCache(), use_cache=True)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in out.cache.layers])


def _peft_case(base: PreTrainedModel, p: int, prompt: list[int], seed: int, steps: int) -> Case:
    if p == 0:
        return Case(prompt, None, *oracle_greedy(base, prompt, steps))
    peft = peft_prefix_model(copy.deepcopy(base), p, seed=seed)
    return Case(prompt, prefix_kv_of(peft), *oracle_greedy(peft, prompt, steps))


def _own_kv_case(base: PreTrainedModel, p: int, prompt: list[int], seed: int, steps: int) -> Case:
    text = _random_ids(seed, p)
    return Case(prompt, own_kv(base, text) if p else None, *oracle_greedy(base, text + prompt, steps))


@dataclass(frozen=True)
class Setup:
    base: PreTrainedModel
    own_kv_cases: list[Case]
    peft_cases: list[Case] | None  # None where PEFT cannot run the architecture
    long: Case  # LONG_STEPS tokens, P = 5

    @property
    def engine_cases(self) -> list[Case]:
        return self.peft_cases if self.peft_cases is not None else self.own_kv_cases


@functools.cache
def setup(name: str) -> Setup:
    """The model and its oracles, computed once per architecture and shared by the tests below."""
    base = make_model(name)
    make_case = _own_kv_case if name in NO_PEFT_ORACLE else _peft_case
    specs = [(i, p, _random_ids(100 + i, n)) for i, (p, n) in enumerate(CASES)]  # same prompts for both oracles
    own = [_own_kv_case(base, p, prompt, 200 + i, STEPS) for i, p, prompt in specs]
    peft = None if name in NO_PEFT_ORACLE else [_peft_case(base, p, prompt, 300 + i, STEPS) for i, p, prompt in specs]
    long = make_case(base, 5, _random_ids(400, 7), 401, LONG_STEPS)
    return Setup(base, own, peft, long)


def _prefix_id(case: Case, name: str) -> str | None:
    return None if case.prefix_kv is None else name


def runner_for(model: PreTrainedModel) -> ModelRunner:
    return ModelRunner(model, *probe_kv_shape(model))


def run_batched(runner: ModelRunner, cases: list[Case]) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """All cases prefilled together, then decoded together for STEPS tokens, greedily."""
    requests = [
        NewRequest(f"r{i}", c.prompt, SamplingParams(max_new_tokens=STEPS), c.prefix_kv, _prefix_id(c, f"t{i}"))
        for i, c in enumerate(cases)
    ]
    # The runner's private forward, as in test_runner_oracle: its public API returns sampled tokens, not logits.
    batch, logits = runner._prefill_forward(requests)
    batch.next_input_ids = logits.argmax(-1)
    logits_steps = [logits]
    for _ in range(STEPS - 1):
        mask = torch.cat([batch.attention_mask, torch.ones(len(batch), 1, dtype=batch.attention_mask.dtype)], 1)
        logits, batch.keys, batch.values = runner._forward(
            batch.next_input_ids[:, None], mask, batch.next_positions[:, None], batch.keys, batch.values
        )
        batch.attention_mask, batch.next_positions = mask, batch.next_positions + 1
        batch.next_input_ids = logits.argmax(-1)
        batch.check()
        logits_steps.append(logits)
    per_row_logits = [[step[i] for step in logits_steps] for i in range(len(cases))]
    return [[int(row.argmax()) for row in rows] for rows in per_row_logits], per_row_logits


def assert_matches(cases: list[Case], tokens: list[list[int]], logits: list[list[torch.Tensor]]) -> None:
    for i, case in enumerate(cases):
        for step, (got, want) in enumerate(zip(logits[i], case.logits, strict=True)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, i=i, s=step: f"row {i} {s}: {m}")
        assert tokens[i] == case.tokens, f"row {i}"


def test_every_verified_architecture_is_tested() -> None:
    assert {model_type for model_type, _ in ARCHITECTURES.values()} == set(VERIFIED_ARCHITECTURES)


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in NO_PEFT_ORACLE])
def test_mixed_prefix_batch_matches_peft_forward(name: str) -> None:
    s = setup(name)
    assert s.peft_cases is not None
    assert_matches(s.peft_cases, *run_batched(runner_for(s.base), s.peft_cases))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_own_kv_prefix_equals_prompting_with_its_text(name: str) -> None:
    s = setup(name)
    if "mqa" in name:  # really one KV head shared by all query heads
        assert probe_kv_shape(s.base)[1] == 1
    assert_matches(s.own_kv_cases, *run_batched(runner_for(s.base), s.own_kv_cases))


@pytest.mark.parametrize(
    "mode",
    [
        {"prefill_chunk_tokens": 0},
        {"prefill_chunk_tokens": 3},
        {"prefill_chunk_tokens": 0, "static_decode": True, "overlap_steps": True},
        {"prefill_chunk_tokens": 3, "static_decode": True, "overlap_steps": True},
    ],
    ids=[
        "separate-prefill",
        "fused-chunks-of-3-in-3-groups",
        "overlapped-static-decode",
        "overlapped-static-in-3-groups",
    ],
)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
async def test_engine_mixed_batch_and_mid_decode_join_equal_oracle(
    name: str, mode: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chunks on, fusing architectures prefill inside decode steps and keep rows in groups
    (tests/test_fused_step.py); with static decode, they decode at fixed shapes as CUDA graphs replay them
    (server/static_decode.py). Others ignore both. No slack: rows of any two lengths may start groups."""
    monkeypatch.setattr(kv_groups, "SLACK_COLUMNS", 0)
    s = setup(name)
    engine = make_engine(s.base, kv_groups=3, **mode)
    try:
        order: list[str] = []  # arrival of events, to show the join happened while the long request decoded
        started = asyncio.Event()

        async def run(tag: str, case: Case, max_new: int) -> list[int]:
            params = SamplingParams(max_new_tokens=max_new)
            request = GenerationRequest(case.prompt, params, case.prefix_kv, _prefix_id(case, tag))
            events: list[GenerationEvent] = []
            async for event in engine.generate(request):
                events.append(event)
                order.append(tag)
                if tag == "long" and len(events) == 4:
                    started.set()
            return tokens_of(events)

        long_task = asyncio.create_task(run("long", s.long, LONG_STEPS))
        await started.wait()
        # Unequal lengths, so rows leave at different steps and the batch is filtered while others decode.
        budgets = [STEPS - i % 3 for i in range(len(s.engine_cases))]
        late = await asyncio.gather(*(run(f"r{i}", c, budgets[i]) for i, c in enumerate(s.engine_cases)))
        assert await long_task == s.long.tokens
        for i, case in enumerate(s.engine_cases):
            assert late[i] == case.tokens[: budgets[i]], f"request {i}"
        first_late = min(order.index(f"r{i}") for i in range(len(late)))
        assert order.index("long") < first_late < len(order) - 1 - order[::-1].index("long"), "no mid-decode join"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_window_bites(name: str) -> None:
    """The tests above run past the window: with it opened up, the same weights give other logits."""
    case = setup(name).engine_cases[1]  # no prefix, a 12-token prompt against a window of 8
    assert case.prefix_kv is None and len(case.prompt) > WINDOW
    _, wide_logits = oracle_greedy(make_model(name, sliding_window=4096), case.prompt, 1)
    assert (wide_logits[0] - case.logits[0]).abs().max() > 1e-3


# ----- startup refusal ---------------------------------------------------------------------------------------------


def _config_only_dir(tmp_path: Path, model_type: str, **kwargs: Any) -> Path:
    """A model directory holding just config.json: enough to be refused before any weights are read."""
    AutoConfig.for_model(model_type, **kwargs).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    return tmp_path


def test_default_architecture_is_supported() -> None:
    check_architecture(LlamaConfig())


@pytest.mark.parametrize("model_type", ["pegasus", "marian"])
def test_unverified_encoder_decoder_is_refused_even_with_override(tmp_path: Path, model_type: str) -> None:
    model_dir = _config_only_dir(tmp_path, model_type)
    for allow in (False, True):
        with pytest.raises(ModelLoadError, match=r"encoder-decoder model that is not verified.*bart.*t5"):
            load_model(str(model_dir), device="cpu", allow_unverified=allow)


def test_unverified_architecture_is_refused_unless_overridden(tmp_path: Path, caplog) -> None:
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    model_dir = _config_only_dir(tmp_path, "olmo", vocab_size=VOCAB, eos_token_id=2, **tiny)
    with pytest.raises(ModelLoadError, match=r"'olmo' is not verified.*gpt2.*llama.*--allow-unverified-architecture"):
        load_model(str(model_dir), device="cpu")
    # With the override the architecture check passes; this directory then fails for lack of a tokenizer.
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(model_dir), device="cpu", allow_unverified=True)

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    with pytest.raises(ModelLoadError, match="not verified"):
        prepare_model(model, None, "olmo-tiny")
    with caplog.at_level(logging.WARNING, logger="server.model_loading"):
        loaded = prepare_model(model, None, "olmo-tiny", allow_unverified=True)
    assert loaded.fingerprint.architecture == "olmo"
    assert "unverified architecture 'olmo'" in caplog.text


def test_serve_cli_refuses_and_flag_overrides(tmp_path: Path, capsys, monkeypatch) -> None:
    model_dir = _config_only_dir(tmp_path, "olmo", vocab_size=VOCAB, eos_token_id=2, num_hidden_layers=1)
    monkeypatch.delenv("PREFIX_SERVE_ALLOW_UNVERIFIED_ARCHITECTURE", raising=False)
    assert cli_main(["serve", "--model", str(model_dir)]) == 2
    assert "'olmo' is not verified" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(model_dir), "--allow-unverified-architecture"]) == 2
    assert "cannot load" in capsys.readouterr().err  # past the architecture check: no tokenizer here
