"""Encoder-decoder prefix-tuning (BART, T5) against PEFT's uncached forward: import, batching, joins, engine, HTTP."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import PreTrainedModel

from prefix_store.peft_import import key_values_from_peft_dir
from server.api.app import create_app
from server.architectures import VERIFIED_ENCODER_DECODER
from server.batch import NewRequest
from server.config import ServeConfig
from server.engine import Engine, GenerationRequest
from server.model_loading import load_model, probe_kv_shape
from server.sampling import SamplingParams
from server.seq2seq_batch import Seq2SeqBatch
from server.seq2seq_runner import Seq2SeqRunner
from tests.test_http_api import plain_usage
from tests.tiny_seq2seq import BOS, oracle_greedy_seq2seq, peft_seq2seq_prefix_model, tiny_bart, tiny_t5

STEPS = 8
MODELS: dict[str, Callable[[], PreTrainedModel]] = {"bart": tiny_bart, "t5": tiny_t5}


class Family:
    """A tiny base model, two PEFT prefixes of different lengths (their PEFT models are the oracles), a runner."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.base = MODELS[name]()
        self.start = int(self.base.config.decoder_start_token_id)
        self.peft = []
        self.kv = []
        for i, length in enumerate((3, 6)):
            peft = peft_seq2seq_prefix_model(copy.deepcopy(self.base), length, seed=40 + i)
            peft.save_pretrained(tmp_path / f"prefix{i}")
            self.peft.append(peft)
            self.kv.append(key_values_from_peft_dir(tmp_path / f"prefix{i}"))  # the real import path
        self.runner = Seq2SeqRunner(self.base, *probe_kv_shape(self.base))

    def oracle(self, row: int | None, prompt: list[int], steps: int = STEPS) -> tuple[list[int], list[torch.Tensor]]:
        model = self.base if row is None else self.peft[row]
        return oracle_greedy_seq2seq(model, prompt, self.start, steps)

    def request(self, rid: str, row: int | None, prompt: list[int], steps: int = STEPS) -> NewRequest:
        kv = None if row is None else self.kv[row]
        return NewRequest(rid, prompt, SamplingParams(max_new_tokens=steps), kv, None if row is None else f"p{row}")


@pytest.fixture(scope="module", params=sorted(MODELS))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def test_every_verified_encoder_decoder_is_tested() -> None:
    assert set(MODELS) == set(VERIFIED_ENCODER_DECODER)


def prompt(seed: int, n: int, eos: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [*torch.randint(5, 250, (n - 1,), generator=g).tolist(), eos]


def test_import_places_each_slot_where_peft_puts_it(family: Family) -> None:
    """Our [L, 2, H, P, d] from a PEFT save_pretrained equals the decoder self-attention cache PEFT's forward uses."""
    for peft, kv in zip(family.peft, family.kv, strict=True):
        cache = peft.get_prompt(batch_size=1)
        layers = cache.self_attention_cache.layers
        assert len(layers) == kv.shape[0]
        for layer, (k, v) in zip(layers, kv, strict=True):
            assert torch.equal(layer.keys[0], k) and torch.equal(layer.values[0], v)
        # PEFT resets the cross-attention cache: the prefix must not reach cross-attention.
        assert len(cache.cross_attention_cache.layers) == 0


def test_mixed_batch_equals_peft_forward(family: Family) -> None:
    """Two prefixes of different lengths and a no-prefix row, prompts of unequal length, in one batch."""
    eos = int(family.base.config.eos_token_id)
    shared = prompt(1, 7, eos)
    cases = [(0, shared), (1, shared), (None, shared), (1, prompt(2, 4, eos)), (0, prompt(3, 11, eos))]
    expected = [family.oracle(row, p) for row, p in cases]
    batch, logits = family.runner.prefill_logits([family.request(f"r{i}", r, p) for i, (r, p) in enumerate(cases)])
    got_logits = [[row] for row in logits]
    got_tokens = [[t] for t in logits.argmax(dim=-1).tolist()]
    for _ in range(STEPS - 1):
        batch.check()
        batch.decoder.next_input_ids = torch.tensor([tokens[-1] for tokens in got_tokens])
        logits = family.runner.decode_logits(batch)
        for i, row in enumerate(logits):
            got_logits[i].append(row)
            got_tokens[i].append(int(row.argmax()))
    for i, (want_tokens, want_logits) in enumerate(expected):
        want = torch.stack(want_logits)
        # fp32 summation order differs at other batch shapes. T5 does not scale attention scores, so its logits
        # are large (tens) and so is their rounding noise: the tolerance is relative to the logits' scale.
        scale = float(want.abs().max())
        torch.testing.assert_close(torch.stack(got_logits[i]), want, rtol=0, atol=5e-5 * scale)
        assert got_tokens[i] == want_tokens, f"row {i}"
    # The same prompt under two prefixes and none: three different distributions (prefixes do act, per row).
    first = [torch.stack(want_logits)[0] for _, want_logits in expected[:3]]
    assert min((first[a] - first[b]).abs().max() for a, b in ((0, 1), (0, 2), (1, 2))) > 1e-2


def test_a_forced_first_token_starts_every_decoder_row(tmp_path: Path) -> None:
    """BART's summarisation checkpoints force <s> first (generation_config.forced_bos_token_id): rows decode after
    the start token and <s>, as generate() and training have it, and <s> is not one of the generated tokens."""
    base = tiny_bart()
    base.generation_config.forced_bos_token_id = BOS
    peft = peft_seq2seq_prefix_model(copy.deepcopy(base), 4, seed=41)
    peft.save_pretrained(tmp_path / "prefix")
    kv = key_values_from_peft_dir(tmp_path / "prefix")
    runner = Seq2SeqRunner(base, *probe_kv_shape(base))
    start = (int(base.config.decoder_start_token_id), BOS)
    assert runner.detokenizer_context([5, 6]) == list(start)
    eos = int(base.config.eos_token_id)
    cases = [(kv, prompt(1, 7, eos)), (None, prompt(2, 5, eos))]
    requests = [
        NewRequest(f"r{i}", p, SamplingParams(max_new_tokens=STEPS), k, None if k is None else "p")
        for i, (k, p) in enumerate(cases)
    ]
    batch, first = runner.prefill(requests)
    got = [[t] for t in first.tolist()]
    for _ in range(STEPS - 1):
        for row, token in zip(got, runner.decode(batch).tolist(), strict=True):
            row.append(token)
    assert got[0] == oracle_greedy_seq2seq(peft, cases[0][1], start, STEPS)[0]
    assert got[1] == oracle_greedy_seq2seq(base, cases[1][1], start, STEPS)[0]
    # transformers' generate() forces the token itself, then decodes on: the same tokens after it.
    generated = base.generate(torch.tensor([cases[1][1]]), max_new_tokens=STEPS + 1, do_sample=False)[0].tolist()
    assert generated[:2] == list(start) and generated[2:] == got[1]
    # Without the forced token the model's own first choice differs here: the setting is what changes the output.
    assert oracle_greedy_seq2seq(base, cases[1][1], start[0], STEPS)[0] != got[1]


def test_rows_joining_and_leaving_keep_their_outputs(family: Family) -> None:
    """Prefill a second batch mid-decode, concatenate, drop a finished row: nobody's tokens change."""
    eos = int(family.base.config.eos_token_id)
    runner = family.runner
    first = [("a", 0, prompt(10, 5, eos), STEPS), ("b", None, prompt(11, 9, eos), 4)]
    later = [("c", 1, prompt(12, 13, eos), STEPS), ("d", 0, prompt(13, 3, eos), STEPS)]
    want = {rid: family.oracle(row, p, steps)[0] for rid, row, p, steps in first + later}
    limit = {rid: steps for rid, _, _, steps in first + later}
    got: dict[str, list[int]] = {}

    def record(batch: Seq2SeqBatch, tokens: torch.Tensor) -> Seq2SeqBatch | None:
        for rid, token in zip(batch.request_ids, tokens.tolist(), strict=True):
            got.setdefault(rid, []).append(token)
        keep = [rid for rid in batch.request_ids if len(got[rid]) < limit[rid]]
        filtered = batch.filter(keep)
        if filtered is not None:
            filtered.check()
        return filtered

    batch = record(*runner.prefill([family.request(rid, row, p, s) for rid, row, p, s in first]))
    for _ in range(2):
        assert batch is not None
        batch = record(batch, runner.decode(batch))
    assert batch is not None
    joined, tokens = runner.prefill([family.request(rid, row, p, s) for rid, row, p, s in later])
    batch = Seq2SeqBatch.concatenate([batch, record(joined, tokens)])  # type: ignore[list-item]
    batch.check()
    assert batch.encoder_mask.shape[1] == 13  # right-padded to the longest prompt
    while batch is not None:
        batch = record(batch, runner.decode(batch))
    assert got == want
    assert set(got) == {"a", "b", "c", "d"}


async def test_engine_serves_seq2seq_requests_joining_mid_decode(family: Family) -> None:
    eos = int(family.base.config.eos_token_id)
    engine = Engine(family.runner, None, eos_token_ids=[], max_context=256)
    engine.start()
    try:

        async def run(row: int | None, p: list[int], delay_tokens: int = 0) -> list[int]:
            request = GenerationRequest(p, SamplingParams(max_new_tokens=STEPS), *_prefix(family, row))
            return [e.token_id async for e in engine.generate(request) if e.token_id is not None]

        first = asyncio.create_task(run(0, prompt(20, 6, eos)))
        await asyncio.sleep(0.05)  # the first request is decoding when the others join
        rest = await asyncio.gather(run(1, prompt(21, 10, eos)), run(None, prompt(22, 3, eos)))
        outputs = [await first, *rest]
    finally:
        engine.shutdown()
    assert outputs == [
        family.oracle(0, prompt(20, 6, eos))[0],
        family.oracle(1, prompt(21, 10, eos))[0],
        family.oracle(None, prompt(22, 3, eos))[0],
    ]


async def test_engine_seq2seq_logprobs_equal_the_oracle(family: Family) -> None:
    """Log-probabilities take the decoder-only path (the batch's sampling call): here against log-softmax of the
    uncached PEFT forward's logits, next to a row that asks for none."""
    eos = int(family.base.config.eos_token_id)
    engine = Engine(family.runner, None, eos_token_ids=[], max_context=256)
    engine.start()
    asking, plain = prompt(30, 5, eos), prompt(31, 8, eos)
    try:

        async def run(row: int | None, p: list[int], logprobs: int | None) -> list:
            request = GenerationRequest(
                p, SamplingParams(max_new_tokens=STEPS, logprobs=logprobs), *_prefix(family, row)
            )
            return [e async for e in engine.generate(request) if e.token_id is not None]

        got, others = await asyncio.gather(run(1, asking, 2), run(None, plain, None))
    finally:
        engine.shutdown()
    want_tokens, want_logits = family.oracle(1, asking)
    assert [e.token_id for e in got] == want_tokens and all(e.logprob is None for e in others)
    for event, logits in zip(got, want_logits, strict=True):
        want = torch.log_softmax(logits.float(), dim=-1)
        tolerance = 5e-5 * float(logits.abs().max())  # T5's logits are large, and so is their rounding noise
        assert event.logprob is not None and event.logprob.logprob == pytest.approx(
            want[event.token_id].item(), abs=tolerance
        )
        assert [token for token, _ in event.logprob.top] == want.topk(2).indices.tolist()


def _prefix(family: Family, row: int | None) -> tuple[torch.Tensor | None, str | None]:
    return (None, None) if row is None else (family.kv[row], f"p{row}")


# ----- the HTTP API on a tiny BART with the real SmolLM2 tokenizer ------------------------------------------------


@pytest.fixture(scope="module")
def bart_dir(smol_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from tests.conftest import SMOL_VOCAB

    out = tmp_path_factory.mktemp("tiny-bart")
    # pad, bos, eos: SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>
    model = tiny_bart(seed=5, vocab_size=SMOL_VOCAB, pad=0, bos=1, eos=2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smol_tokenizer_dir).save_pretrained(out)
    return out


def test_http_peft_seq2seq_upload_then_generate(bart_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(bart_dir), device="cpu")
    assert loaded.is_encoder_decoder and loaded.fingerprint.architecture == "bart"
    peft = peft_seq2seq_prefix_model(copy.deepcopy(loaded.model), 5, seed=9)
    peft.save_pretrained(tmp_path / "ckpt")
    files = {
        name: (name, (tmp_path / "ckpt" / name).read_bytes())
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    text = "Table: name | Alice ; city | Paris"
    prompt_ids = loaded.tokenizer(text).input_ids
    config = ServeConfig(store=f"disk://{tmp_path / 'store'}", max_new_tokens=64)
    with TestClient(create_app(config, model=loaded)) as client:
        r = client.put("/v1/prefixes/summarize", files=files)
        assert r.status_code == 201, r.text
        assert r.json()["num_virtual_tokens"] == 5
        request = {"task_id": "summarize", "prompt": text, "max_new_tokens": STEPS}
        body = client.post("/v1/generate", json=request).json()
        base = client.post("/v1/generate", json={**request, "task_id": None}).json()
        with client.stream("POST", "/v1/generate", json={**request, "stream": True}) as r:
            assert r.status_code == 200
            events = [json.loads(line[len("data: ") :]) for line in r.iter_lines() if line.startswith("data: ")]
        chat = client.post(
            "/v1/completions", json={"model": "summarize", "prompt": text, "max_tokens": STEPS, "temperature": 0}
        )
        # The encoder reads the prompt: nothing predicts its tokens, so scoring it is refused, not faked.
        scored = client.post("/v1/generate", json={**request, "prompt_logprobs": 1})
        echoed = client.post(
            "/v1/completions", json={"model": "summarize", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1}
        )
        echoed_text = client.post(
            "/v1/completions", json={"model": "summarize", "prompt": text, "max_tokens": 2, "echo": True}
        )
        begun = [{"role": "user", "content": text}, {"role": "assistant", "content": "Alice lives"}]
        continued = client.post(
            "/v1/chat/completions",
            json={"model": "summarize", "messages": begun, "continue_final_message": True, "max_tokens": 2},
        )
    want = oracle_greedy_seq2seq(peft, prompt_ids, loaded.model.config.decoder_start_token_id, STEPS)[0]
    want_base = oracle_greedy_seq2seq(loaded.model, prompt_ids, loaded.model.config.decoder_start_token_id, STEPS)[0]
    got = body["token_ids"]
    assert got == want[: len(got)] and (len(got) == STEPS or got[-1] in loaded.eos_token_ids), (got, want)
    assert base["token_ids"] == want_base[: len(base["token_ids"])]
    assert got != base["token_ids"]  # the prefix acts
    assert body["usage"] == plain_usage(len(prompt_ids), len(got))
    assert body["text"] == loaded.tokenizer.decode(got, skip_special_tokens=True)
    assert "".join(e["text"] for e in events) == body["text"]
    assert [e["token_id"] for e in events] == got
    assert chat.status_code == 200 and chat.json()["choices"][0]["text"] == body["text"]
    assert scored.status_code == 422 and "decoder-only" in scored.json()["error"]["message"]
    assert echoed.status_code == 400 and "decoder-only" in echoed.json()["error"]["message"]
    assert echoed_text.status_code == 200 and echoed_text.json()["choices"][0]["text"].startswith(text)
    # The messages are the encoder's: a reply begun by the client cannot be gone on with (it was a fresh reply).
    assert continued.status_code == 400 and continued.json()["error"]["param"] == "continue_final_message"


def test_train_says_it_trains_decoder_only_models(
    bart_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prefix-serve train` on an encoder-decoder: one clear line and exit 1 (it was a traceback)."""
    from server.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Summarise: cats sleep a lot.", "completion": " Cats sleep."}) + "\n")
    code = main(["train", str(data), "--model", str(bart_dir), "--output", str(tmp_path / "out"), "--steps", "1"])
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' weight-loading progress
    assert code == 1 and last.startswith("error: ") and "encoder-decoder" in last and "SEQ_2_SEQ_LM" in last, last
    assert not (tmp_path / "out").exists()


def test_a_decoder_shallower_than_its_encoder_takes_peft_checkpoints(smol_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Distilled summarisers keep more encoder layers than decoder ones (distilbart-cnn-12-6). PEFT sizes their
    prefixes by the encoder's depth and gives the decoder's layers the first groups of slots: the upload is
    taken (it was refused: 'prefix has 4, model has 2'), and greedy output equals PEFT's forward."""
    from transformers import AutoTokenizer

    from tests.conftest import SMOL_VOCAB

    model = tiny_bart(seed=6, vocab_size=SMOL_VOCAB, pad=0, bos=1, eos=2, encoder_layers=4, decoder_layers=2)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(smol_tokenizer_dir).save_pretrained(tmp_path / "model")
    loaded = load_model(str(tmp_path / "model"), device="cpu")
    peft = peft_seq2seq_prefix_model(copy.deepcopy(loaded.model), 4, seed=12)
    assert peft.peft_config["default"].num_layers == 4 and loaded.num_layers == 2
    peft.save_pretrained(tmp_path / "ckpt")
    files = {
        name: (name, (tmp_path / "ckpt" / name).read_bytes())
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    text = "Table: name | Bob ; city | Rome"
    config = ServeConfig(store=f"disk://{tmp_path / 'store'}", max_new_tokens=64)
    with TestClient(create_app(config, model=loaded)) as client:
        r = client.put("/v1/prefixes/distilled", files=files)
        assert r.status_code == 201, r.text
        got = client.post("/v1/generate", json={"task_id": "distilled", "prompt": text, "max_new_tokens": STEPS})
        base = client.post("/v1/generate", json={"prompt": text, "max_new_tokens": STEPS})
    want = oracle_greedy_seq2seq(
        peft, loaded.tokenizer(text).input_ids, loaded.model.config.decoder_start_token_id, STEPS
    )[0]
    tokens = got.json()["token_ids"]
    assert tokens == want[: len(tokens)] and (len(tokens) == STEPS or tokens[-1] in loaded.eos_token_ids), (
        tokens,
        want,
    )
    assert tokens != base.json()["token_ids"]  # the prefix acts
