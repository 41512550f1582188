"""The OpenAI-compatible routes, driven by the official `openai` package against a real server on loopback."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import LoadedModel
from tests.live_server import serve_in_thread
from tests.openai_server import KEY_A, KEY_B, MAX_NEW_TOKENS, TASK


def native_generate(server_url: str, key: str = KEY_A, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server_url}/v1/generate", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_list_shows_base_and_own_tasks(oai: openai.OpenAI, server_url: str, loaded: LoadedModel) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == loaded.name and TASK in ids
    assert oai.models.retrieve(TASK).id == TASK
    with openai.OpenAI(base_url=f"{server_url}/v1", api_key=KEY_B, max_retries=0) as other:
        assert [m.id for m in other.models.list()] == [loaded.name]  # tenant B never sees A's task
        with pytest.raises(openai.NotFoundError):
            other.completions.create(model=TASK, prompt="hi", max_tokens=2)


def test_served_model_names_are_the_base_model_and_no_task_may_take_one(
    loaded: LoadedModel, tmp_path: Path, server_url: str
) -> None:
    """--served-model-name: the names clients were set up with (a Hugging Face id) name the base model, the
    first listed; the model's own name no longer does; a task may not be uploaded under one (it could never be
    reached by ``model``), nor under the base model's name on a server without the flag."""
    config = ServeConfig(store=f"disk://{tmp_path / 'store'}", served_model_name="org/tiny-chat, tiny")
    with serve_in_thread(create_app(config, model=loaded)) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            cards = client.models.list().data
            assert [c.id for c in cards] == ["org/tiny-chat", "tiny"]
            card = cards[0].model_dump()
            assert card["max_model_len"] == loaded.max_context and card["created"] > 1_700_000_000
            texts = {
                name: client.completions.create(model=name, prompt="Hello", max_tokens=4, temperature=0)
                for name in ("org/tiny-chat", "tiny")
            }
            assert texts["org/tiny-chat"].choices[0].text == texts["tiny"].choices[0].text
            assert texts["tiny"].model == "tiny"
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=loaded.name, prompt="Hello", max_tokens=2)
        r = httpx.put(
            f"{url}/v1/prefixes/tiny", content=b"anything", headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code == 422 and r.json()["error"]["param"] == "task_id", r.text
        assert "--served-model-name" in r.json()["error"]["message"]
    r = httpx.put(
        f"{server_url}/v1/prefixes/{loaded.name}",
        content=b"anything",
        headers={"authorization": f"Bearer {KEY_A}", "content-type": "application/octet-stream"},
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "task_id", r.text


@pytest.mark.parametrize("use_task", [True, False])
def test_completion_equals_native_generate(
    oai: openai.OpenAI, server_url: str, loaded: LoadedModel, use_task: bool
) -> None:
    prompt = "The quick brown fox jumps over"
    native = native_generate(
        server_url, task_id=TASK if use_task else None, prompt=prompt, max_new_tokens=12, temperature=0
    )
    model = TASK if use_task else loaded.name
    got = oai.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.model == model
    assert got.choices[0].text == native["text"] and native["text"]
    assert got.choices[0].finish_reason == ("length" if native["finish_reason"] == "length" else "stop")
    assert got.usage is not None
    usage = native["usage"]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_min_p_of_one_keeps_only_the_likeliest_token(oai: openai.OpenAI, server_url: str) -> None:
    """vLLM's min_p, on both routes: at 1 only tokens as likely as the likeliest are drawn, so a hot sampled
    request gives the greedy text; at 0 the same seed gives another."""
    request = {"model": TASK, "prompt": "The quick brown fox", "max_tokens": 16}
    greedy = oai.completions.create(**request, temperature=0).choices[0].text
    hot = {"temperature": 2.0, "seed": 5}
    assert oai.completions.create(**request, **hot, extra_body={"min_p": 1.0}).choices[0].text == greedy
    assert oai.completions.create(**request, **hot, extra_body={"min_p": 0.0}).choices[0].text != greedy
    native = native_generate(
        server_url, task_id=TASK, prompt="The quick brown fox", max_new_tokens=16, min_p=1.0, **hot
    )
    assert native["text"] == greedy


def test_completion_default_max_tokens_is_16(oai: openai.OpenAI, server_url: str) -> None:
    # temperature 0 so eos cannot end it at a random point; OpenAI's default of 16 applies.
    native = native_generate(server_url, task_id=TASK, prompt="Once", max_new_tokens=16, temperature=0)
    got = oai.completions.create(model=TASK, prompt="Once", temperature=0)
    assert got.usage is not None and got.usage.completion_tokens == native["usage"]["completion_tokens"]


def test_completion_stream_concatenates_and_reports_usage(oai: openai.OpenAI) -> None:
    request = {"model": TASK, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    full = oai.completions.create(**request)
    chunks = list(oai.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    plain = list(oai.completions.create(**request, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason is not None


def test_stream_ends_with_done(server_url: str) -> None:
    body = {"model": TASK, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{server_url}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY_A}"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_equals_native_messages(oai: openai.OpenAI, server_url: str, loaded: LoadedModel) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fox?"}]
    native = native_generate(server_url, task_id=TASK, messages=messages, max_new_tokens=10, temperature=0)
    got = oai.chat.completions.create(model=TASK, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == native["text"]
    assert got.usage is not None and got.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    # content parts and the newer max_completion_tokens give the same request
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "What is a fox?"}]}]
    again = oai.chat.completions.create(model=TASK, messages=parts, max_completion_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert again.choices[0].message.content == native["text"]


def test_chat_stream(oai: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": TASK,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    full = oai.chat.completions.create(**request)
    chunks = list(oai.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == [full.choices[0].finish_reason]
    streamed_usage = chunks[-1].usage
    assert streamed_usage is not None and full.usage is not None
    # The same counts; the repeat may take its prompt's head from the prompt cache (and say so).
    assert streamed_usage.model_dump(exclude={"prompt_tokens_details"}) == full.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )


def test_stop_and_seed(oai: openai.OpenAI) -> None:
    base = {"model": TASK, "prompt": "Count with me: one two three", "max_tokens": 24, "temperature": 0}
    text = oai.completions.create(**base).choices[0].text
    assert len(text) > 6
    cut = oai.completions.create(**base, stop=text[3:6]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(text[3:6])]
    listed = oai.completions.create(**base, stop=["\u2603", text[3:6]]).choices[0]
    assert listed.text == cut.text
    sampled = {**base, "temperature": 1.0, "seed": 1234}
    assert oai.completions.create(**sampled).choices[0].text == oai.completions.create(**sampled).choices[0].text


def test_native_logprobs_streamed_and_not(server_url: str) -> None:
    body = {"task_id": TASK, "prompt": "The sea is", "max_new_tokens": 8, "temperature": 0, "logprobs": 3}
    full = native_generate(server_url, **body)
    entries = full["logprobs"]
    assert [e["token_id"] for e in entries] == full["token_ids"] and len(entries) == 8
    for e in entries:
        top = e["top_logprobs"]
        assert len(top) == 3 and top[0]["token_id"] == e["token_id"]  # greedy: the sampled token is the likeliest
        assert e["logprob"] == top[0]["logprob"] <= 0 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
    assert native_generate(server_url, **{**body, "logprobs": None})["logprobs"] is None
    with httpx.stream(
        "POST", f"{server_url}/v1/generate", json={**body, "stream": True}, headers={"authorization": f"Bearer {KEY_A}"}
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["logprob"] for e in events] == entries
    r = httpx.post(
        f"{server_url}/v1/generate", json={**body, "logprobs": 21}, headers={"authorization": f"Bearer {KEY_A}"}
    )
    assert r.status_code == 422, r.text


def test_completion_logprobs_are_the_native_ones(oai: openai.OpenAI, server_url: str) -> None:
    prompt = "The quick brown fox"
    native = native_generate(server_url, task_id=TASK, prompt=prompt, max_new_tokens=10, temperature=0, logprobs=2)
    request: dict[str, Any] = {"model": TASK, "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 2}
    got = oai.completions.create(**request).choices[0].logprobs
    assert got is not None and got.token_logprobs == [e["logprob"] for e in native["logprobs"]]
    assert got.tokens == [e["token"] for e in native["logprobs"]]
    first_wins = [{t["token"]: t["logprob"] for t in reversed(e["top_logprobs"])} for e in native["logprobs"]]
    assert got.top_logprobs == first_wins
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
    streamed = [c.choices[0].logprobs for c in oai.completions.create(**request, stream=True) if c.choices]
    assert [lp for chunk in streamed if chunk for lp in chunk.token_logprobs] == got.token_logprobs
    assert [o for chunk in streamed if chunk for o in chunk.text_offset] == got.text_offset
    assert oai.completions.create(**{**request, "logprobs": None}).choices[0].logprobs is None


def test_penalties_act_and_match_the_native_api(oai: openai.OpenAI, server_url: str) -> None:
    body = {"task_id": TASK, "prompt": "Once upon a time", "max_new_tokens": 16, "temperature": 0}
    plain = native_generate(server_url, **body)
    penalties = {"presence_penalty": 2.0, "frequency_penalty": 1.0}
    penalized = native_generate(server_url, **body, **penalties, repetition_penalty=1.5)
    assert penalized["token_ids"] != plain["token_ids"]  # the tiny random model repeats itself without them
    assert len(set(penalized["token_ids"])) > len(set(plain["token_ids"]))
    got = oai.completions.create(
        model=TASK,
        prompt="Once upon a time",
        max_tokens=16,
        temperature=0,
        extra_body={"repetition_penalty": 1.5},  # vLLM's extension
        **penalties,
    ).choices[0]
    assert got.text == penalized["text"]
    chat = {"model": TASK, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    native_chat = native_generate(
        server_url, task_id=TASK, messages=chat["messages"], max_new_tokens=8, temperature=0, presence_penalty=1.0
    )
    assert oai.chat.completions.create(**chat, presence_penalty=1.0).choices[0].message.content == native_chat["text"]


def test_logit_bias_forces_and_bans_tokens(oai: openai.OpenAI, server_url: str, loaded: LoadedModel) -> None:
    body = {"task_id": TASK, "prompt": "Once upon a time", "max_new_tokens": 6, "temperature": 0}
    plain = native_generate(server_url, **body)["token_ids"]
    forced = native_generate(server_url, **body, logit_bias={"1234": 100})["token_ids"]
    assert forced == [1234] * 6
    banned = native_generate(server_url, **body, logit_bias={str(t): -100 for t in plain})["token_ids"]
    assert not set(banned) & set(plain)
    got = oai.completions.create(
        model=TASK, prompt="Once upon a time", max_tokens=6, temperature=0, logit_bias={"1234": 100}
    )
    assert got.choices[0].text == loaded.tokenizer.decode([1234] * 6)
    vocab = loaded.fingerprint.vocab_size
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.completions.create(model=TASK, prompt="hi", max_tokens=2, logit_bias={str(vocab): 1})
    r = httpx.post(
        f"{server_url}/v1/generate",
        json={**body, "logit_bias": {"5": 101}},
        headers={"authorization": f"Bearer {KEY_A}"},
    )
    assert r.status_code == 422 and "logit_bias" in r.text


def test_n_choices_are_seeded_requests_streamed_or_not(oai: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": TASK, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0}
    got = oai.completions.create(**request, n=3, seed=41, logprobs=1)
    assert [c.index for c in got.choices] == [0, 1, 2]
    singles = [oai.completions.create(**request, seed=41 + i, logprobs=1).choices[0] for i in range(3)]
    assert [c.text for c in got.choices] == [c.text for c in singles]
    assert len({c.text for c in got.choices}) > 1  # sampled with different seeds
    for choice, single in zip(got.choices, singles, strict=True):
        assert choice.logprobs is not None and single.logprobs is not None
        # Batched with its siblings, a row's float sums may run in another order than alone.
        assert choice.logprobs.token_logprobs == pytest.approx(single.logprobs.token_logprobs, abs=1e-4)
        assert choice.logprobs.text_offset == single.logprobs.text_offset
    assert got.usage is not None and got.usage.completion_tokens == 3 * 8
    one = oai.completions.create(**request, seed=41)
    assert one.usage is not None and got.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once

    chunks = list(oai.completions.create(**request, n=3, seed=41, stream=True, stream_options={"include_usage": True}))
    texts = ["", "", ""]
    finished = set()
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finished.add(c.index)
    assert texts == [c.text for c in got.choices] and finished == {0, 1, 2}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3 * 8

    chat = {"model": TASK, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "seed": 5}
    whole = oai.chat.completions.create(**chat, n=2)
    streamed = list(oai.chat.completions.create(**chat, n=2, stream=True))
    roles = [c.choices[0].index for c in streamed if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    contents = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            contents[c.index] += c.delta.content or ""
    assert contents == [c.message.content for c in whole.choices]

    scored = oai.completions.create(model=TASK, prompt="Once upon a time", max_tokens=0, echo=True, n=2)
    assert [c.text for c in scored.choices] == ["Once upon a time"] * 2


def _prompt_cache_hits(server_url: str) -> float:
    text = httpx.get(f"{server_url}/metrics").text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("prefix_serve_prompt_cache_hit")
    )


def test_later_choices_take_the_first_ones_prompt_from_the_cache(oai: openai.OpenAI, server_url: str) -> None:
    """n choices of a long prompt: the later ones start once the first has its first token, and take its
    prompt's K/V from the prompt cache; each still equals a single request with its seed."""
    prompt = " ".join(f"word{i}" for i in range(40))  # ~120 tokens: 7 whole blocks of 16
    request: dict[str, Any] = {"model": TASK, "prompt": prompt, "max_tokens": 5, "temperature": 1.0}
    before = _prompt_cache_hits(server_url)
    got = oai.completions.create(**request, n=4, seed=77)
    hits = _prompt_cache_hits(server_url) - before
    assert got.usage is not None and hits >= 3 * (got.usage.prompt_tokens - 16), hits
    singles = [oai.completions.create(**request, seed=77 + i).choices[0].text for i in range(4)]
    assert [c.text for c in got.choices] == singles


def test_stop_token_ids_min_tokens_and_ignore_eos(oai: openai.OpenAI, server_url: str, loaded: LoadedModel) -> None:
    body = {"task_id": TASK, "prompt": "Once upon a time", "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    plain = native_generate(server_url, **body)["token_ids"]
    stopped = native_generate(server_url, **body, stop_token_ids=[plain[2]])
    assert stopped["token_ids"] == plain[:3] and stopped["finish_reason"] == "stop"
    assert stopped["text"] == loaded.tokenizer.decode(plain[:2])  # the stop token's text is not part of it
    held = native_generate(server_url, **body, stop_token_ids=[plain[1]], min_tokens=4)["token_ids"]
    assert held[0] == plain[0] and plain[1] not in held[:4] and len(held) >= 4
    request: dict[str, Any] = {"model": TASK, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    extra = {"ignore_eos": True, "stop_token_ids": [plain[2]]}
    got = oai.completions.create(**request, extra_body=extra).choices[0]
    assert got.text == stopped["text"] and got.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        oai.completions.create(**request, extra_body={"min_tokens": 9})
    vocab = loaded.fingerprint.vocab_size
    with pytest.raises(openai.BadRequestError, match="stop_token_ids"):
        oai.completions.create(**request, extra_body={"stop_token_ids": [vocab]})


def test_several_prompts_in_one_completion_request(oai: openai.OpenAI, loaded: LoadedModel) -> None:
    """Choice p * n + c is choice c of prompt p (vLLM's order), text or token ids; lm-evaluation-harness sends its
    batches of log-likelihood requests this way (token ids, echo, logprobs 1, max_tokens 1)."""
    texts = ["Once upon a time", "The quick brown fox jumps"]
    request: dict[str, Any] = {"model": TASK, "max_tokens": 5, "temperature": 1.0, "seed": 7}
    got = oai.completions.create(**request, prompt=texts, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for p, text in enumerate(texts):
        for c in range(2):
            single = oai.completions.create(**{**request, "seed": 7 + c}, prompt=text).choices[0].text
            assert got.choices[p * 2 + c].text == single, (p, c)
    assert got.usage is not None and got.usage.completion_tokens == 4 * 5
    singles = [oai.completions.create(**request, prompt=t).usage for t in texts]
    assert got.usage.prompt_tokens == sum(u.prompt_tokens for u in singles if u is not None)  # each prompt once

    ids = [loaded.tokenizer(t).input_ids for t in texts]
    scoring = {"model": TASK, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    batch = oai.completions.create(**scoring, prompt=ids).choices
    for p, prompt_ids in enumerate(ids):
        alone = oai.completions.create(**scoring, prompt=prompt_ids).choices[0].logprobs
        assert batch[p].logprobs is not None and alone is not None
        assert batch[p].logprobs.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
        assert batch[p].text.startswith(loaded.tokenizer.decode(prompt_ids))
    streamed = list(oai.completions.create(**scoring, prompt=ids, stream=True))
    echoed = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            echoed[c.index] += c.text
    assert echoed == [c.text for c in batch]


def test_native_prompt_logprobs_streamed_and_not(server_url: str, loaded: LoadedModel) -> None:
    body = {"task_id": TASK, "prompt": "The sea is deep and", "max_new_tokens": 3, "temperature": 0}
    full = native_generate(server_url, **body, prompt_logprobs=2)
    ids = full["prompt_token_ids"]
    assert ids == loaded.tokenizer("The sea is deep and").input_ids and len(ids) == full["usage"]["prompt_tokens"]
    entries = full["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token_id, e in zip(ids[1:], entries[1:], strict=True):
        assert e["token_id"] == token_id and e["token"] == loaded.tokenizer.decode([token_id])
        top = e["top_logprobs"]
        assert len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"] and e["logprob"] <= top[0]["logprob"] <= 0
    assert full["text"] == native_generate(server_url, **body)["text"]  # scoring the prompt changes nothing
    plain = native_generate(server_url, **body)
    assert plain["prompt_logprobs"] is None and plain["prompt_token_ids"] is None
    with httpx.stream(
        "POST",
        f"{server_url}/v1/generate",
        json={**body, "prompt_logprobs": 2, "stream": True},
        headers={"authorization": f"Bearer {KEY_A}"},
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[0]["prompt_logprobs"] == entries and events[0]["prompt_token_ids"] == ids
    assert all(e["prompt_logprobs"] is None for e in events[1:])


def test_echo_scores_the_generated_tokens_as_they_were_generated(oai: openai.OpenAI, loaded: LoadedModel) -> None:
    """lm-evaluation-harness's log-likelihood request: prompt token ids, echo, logprobs, max_tokens 0. Scoring a
    prompt followed by what the model generated after it gives the generated tokens' own log-probabilities."""
    prompt = "The quick brown fox"
    generated = oai.completions.create(model=TASK, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    gen = generated.choices[0].logprobs
    assert gen is not None
    prompt_ids = loaded.tokenizer(prompt).input_ids
    continuation = loaded.tokenizer(generated.choices[0].text, add_special_tokens=False).input_ids
    scored = oai.completions.create(
        model=TASK, prompt=prompt_ids + continuation, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    choice = scored.choices[0]
    assert choice.text == prompt + generated.choices[0].text and choice.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    assert scored.usage.prompt_tokens == len(prompt_ids) + len(continuation)
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens == [loaded.tokenizer.decode([t]) for t in prompt_ids + continuation]
    assert lp.token_logprobs[len(prompt_ids) :] == pytest.approx(gen.token_logprobs, abs=1e-4)
    # Greedy: each generated token is the likeliest after what precedes it, as lm-eval's is_greedy checks.
    for token, top in zip(lp.tokens[len(prompt_ids) :], lp.top_logprobs[len(prompt_ids) :], strict=True):
        assert max(top, key=top.get) == token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_echo_without_logprobs_and_streamed(oai: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": TASK, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    plain = oai.completions.create(**request).choices[0].text
    echoed = oai.completions.create(**request, echo=True).choices[0]
    assert echoed.text == "Once upon a time" + plain and echoed.logprobs is None
    chunks = [c.choices[0] for c in oai.completions.create(**request, echo=True, logprobs=1, stream=True)]
    assert chunks[0].text == "Once upon a time" and chunks[0].logprobs is not None
    assert chunks[0].logprobs.token_logprobs is not None and chunks[0].logprobs.token_logprobs[0] is None
    assert "".join(c.text for c in chunks) == echoed.text
    whole = oai.completions.create(**request, echo=True, logprobs=1).choices[0].logprobs
    assert whole is not None
    assert [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs or []] == whole.token_logprobs
    only_prompt = list(oai.completions.create(**{**request, "max_tokens": 0}, echo=True, stream=True))
    assert [c.choices[0].text for c in only_prompt] == ["Once upon a time"]
    assert only_prompt[0].choices[0].finish_reason == "length"


def test_token_id_prompts(oai: openai.OpenAI, loaded: LoadedModel) -> None:
    ids = loaded.tokenizer("The quick brown fox").input_ids
    by_text = oai.completions.create(model=TASK, prompt="The quick brown fox", max_tokens=5, temperature=0)
    for prompt in (ids, [ids]):
        by_ids = oai.completions.create(model=TASK, prompt=prompt, max_tokens=5, temperature=0)
        assert by_ids.choices[0].text == by_text.choices[0].text
    vocab = loaded.fingerprint.vocab_size
    with pytest.raises(openai.BadRequestError, match="token ids"):
        oai.completions.create(model=TASK, prompt=[5, vocab], max_tokens=2)


def test_chat_logprob_bytes_are_each_tokens_own(loaded: LoadedModel) -> None:
    """A token holding part of a character reads as U+FFFD alone, but its ``bytes`` are its own (they were
    U+FFFD's): joined, a reply's tokens' bytes are its text, which is what OpenAI gives them for."""
    from server.api import logprobs as token_logprobs
    from server.sampling import TokenLogprob

    text = "日本語で 🦊!"
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    texts = token_logprobs.TokenTexts(loaded.tokenizer)
    assert "\ufffd" in "".join(texts(i) for i in ids)  # some tokens are parts of characters
    content = token_logprobs.chat([(i, TokenLogprob(-1.0, ((i, -1.0),))) for i in ids], texts)["content"]
    assert b"".join(bytes(entry["bytes"]) for entry in content).decode() == text
    assert [entry["top_logprobs"][0]["bytes"] for entry in content] == [entry["bytes"] for entry in content]


def test_chat_logprobs_are_the_native_ones(oai: openai.OpenAI, server_url: str) -> None:
    messages = [{"role": "user", "content": "What is a fox?"}]
    native = native_generate(server_url, task_id=TASK, messages=messages, max_new_tokens=8, temperature=0, logprobs=2)
    request: dict[str, Any] = {"model": TASK, "messages": messages, "max_tokens": 8, "temperature": 0}
    got = oai.chat.completions.create(**request, logprobs=True, top_logprobs=2).choices[0].logprobs
    assert got is not None and got.content is not None
    assert [(c.token, c.logprob) for c in got.content] == [(e["token"], e["logprob"]) for e in native["logprobs"]]
    for c, e in zip(got.content, native["logprobs"], strict=True):
        assert c.bytes == list(c.token.encode("utf-8"))  # whole characters: their text's bytes
        assert [(t.token, t.logprob) for t in c.top_logprobs] == [(t["token"], t["logprob"]) for t in e["top_logprobs"]]
    chunks = oai.chat.completions.create(**request, logprobs=True, stream=True)
    streamed = [
        c
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content or []
    ]
    assert [(c.token, c.logprob, c.top_logprobs) for c in streamed] == [(c.token, c.logprob, []) for c in got.content]
    assert oai.chat.completions.create(**request).choices[0].logprobs is None


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "medium", "large"]}},
    "required": ["ok", "size"],
    "additionalProperties": False,
}


def _fits_schema(text: str) -> None:
    value = json.loads(text)
    assert (
        set(value) == {"ok", "size"}
        and isinstance(value["ok"], bool)
        and value["size"] in SCHEMA["properties"]["size"]["enum"]
    )


def test_json_schema_output_on_both_apis_streamed_or_not(oai: openai.OpenAI, server_url: str) -> None:
    """A random tiny model writes JSON that fits the schema when held to it: the same tokens through OpenAI's
    response_format (chat), vLLM's structured_outputs (completions) and the native grammar, streamed or not."""
    messages = [{"role": "user", "content": "Describe the order as JSON."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA, "strict": True}}
    chat = oai.chat.completions.create(
        model=TASK, messages=messages, max_tokens=40, temperature=0, response_format=response_format
    )
    content = chat.choices[0].message.content
    assert content is not None and chat.choices[0].finish_reason == "stop"
    _fits_schema(content)
    chunks = oai.chat.completions.create(
        model=TASK, messages=messages, max_tokens=40, temperature=0, response_format=response_format, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    native = native_generate(
        server_url, task_id=TASK, messages=messages, max_new_tokens=40, grammar={"type": "json", "value": SCHEMA}
    )
    assert native["text"] == content and native["finish_reason"] == "eos"
    completion = oai.completions.create(
        model=TASK, prompt="Order:", max_tokens=40, temperature=0, extra_body={"structured_outputs": {"json": SCHEMA}}
    )
    _fits_schema(completion.choices[0].text)
    sampled = oai.completions.create(
        model=TASK,
        prompt="Order:",
        max_tokens=40,
        temperature=1.0,
        seed=7,
        n=3,
        extra_body={"structured_outputs": {"json": SCHEMA}},
    )
    for choice in sampled.choices:
        assert choice.finish_reason == "stop", choice.text
        _fits_schema(choice.text)
    # Any JSON object: a random model writes keys that go on and on, so only its start is sure to be JSON's.
    free = oai.completions.create(
        model=TASK,
        prompt="Order:",
        max_tokens=8,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},  # vLLM takes it on completions too
    )
    text = free.choices[0].text
    assert text.startswith('{"') if free.choices[0].finish_reason == "length" else isinstance(json.loads(text), dict)


def test_regex_choice_and_ebnf_outputs(oai: openai.OpenAI, server_url: str) -> None:
    regex = native_generate(
        server_url,
        task_id=TASK,
        prompt="Code:",
        max_new_tokens=20,
        grammar={"type": "regex", "value": "[A-F]{3}-[0-9]{2}"},
    )
    assert re.fullmatch("[A-F]{3}-[0-9]{2}", regex["text"]) and regex["finish_reason"] == "eos", regex
    choices = ["yes", "no", "maybe later"]
    legacy = oai.completions.create(  # vLLM's older field names
        model=TASK, prompt="Answer:", max_tokens=10, temperature=0, extra_body={"guided_choice": choices}
    )
    assert legacy.choices[0].text in choices
    legacy = oai.completions.create(
        model=TASK, prompt="Code:", max_tokens=10, temperature=0, extra_body={"guided_regex": "[A-F]{3}"}
    )
    assert re.fullmatch("[A-F]{3}", legacy.choices[0].text)
    for temperature in (0, 1.0):
        picked = oai.completions.create(
            model=TASK,
            prompt="Answer:",
            max_tokens=10,
            temperature=temperature,
            seed=3,
            extra_body={"structured_outputs": {"choice": choices}},
        )
        assert picked.choices[0].text in choices
    ebnf = 'root ::= "[" num ("," num)* "]"\nnum ::= [1-9] [0-9]?'
    listed = native_generate(server_url, prompt="Numbers:", max_new_tokens=40, grammar={"type": "ebnf", "value": ebnf})
    if listed["finish_reason"] == "eos":  # complete: the text is the grammar's
        assert re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]", listed["text"]), listed
    else:  # the random model kept the list going: still a prefix of one
        assert re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?)*,?[1-9]?", listed["text"]), listed


def test_bad_constraints_are_refused_on_both_apis(oai: openai.OpenAI, server_url: str) -> None:
    headers = {"authorization": f"Bearer {KEY_A}"}
    for grammar, message in [  # the native API answers bad input with 422, the OpenAI routes with 400
        ({"type": "regex", "value": "[a-"}, "invalid regex"),
        ({"type": "json", "value": {"type": "nonsense"}}, "invalid JSON schema"),
        ({"type": "ebnf", "value": "root ::= missing"}, "invalid EBNF grammar"),
        ({"type": "regex", "value": ["a"]}, "takes a string"),
        ({"type": "choice", "value": []}, "at least one string"),
        ({"type": "xml", "value": "a"}, "type"),
    ]:
        r = httpx.post(
            f"{server_url}/v1/generate", json={"prompt": "hi", "max_new_tokens": 4, "grammar": grammar}, headers=headers
        )
        assert r.status_code == 422 and message in r.json()["error"]["message"], (grammar, r.text)
    r = httpx.post(
        f"{server_url}/v1/generate",
        json={"prompt": "hi", "max_new_tokens": 4, "ignore_eos": True, "grammar": {"type": "regex", "value": "a+"}},
        headers=headers,
    )
    assert r.status_code == 422 and "cannot be combined with ignore_eos" in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError, match="invalid JSON schema"):
        oai.chat.completions.create(
            model=TASK,
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def test_tool_calls_by_name_and_required_streamed_or_not(oai: openai.OpenAI) -> None:
    """A named tool_choice holds the reply to that function's parameters and returns one call; 'required'
    returns one or more calls of the tools; streamed, each call opens with its name, then its arguments stream."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    got = oai.chat.completions.create(
        model=TASK, messages=messages, tools=[WEATHER, TIME], tool_choice=named, max_tokens=40, temperature=0
    )
    choice = got.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    named_arguments = call.function.arguments
    arguments = json.loads(named_arguments)
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert arguments["city"] in ("Paris", "Rome", "Oslo") and arguments["unit"] in ("celsius", "fahrenheit")

    chunks = list(
        oai.chat.completions.create(
            model=TASK,
            messages=messages,
            tools=[WEATHER, TIME],
            tool_choice=named,
            max_tokens=40,
            temperature=0,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    opening = deltas[0][0]  # the call's id and name first, then its arguments piece by piece
    assert opening.id and opening.id.startswith("call_") and opening.function.name == "get_weather"
    assert opening.function.arguments == "" and len(deltas) > 3
    assert all(d[0].index == 0 and d[0].id is None for d in deltas[1:])
    assert "".join(d[0].function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"

    asked: dict[str, Any] = {
        "model": TASK,
        "messages": messages,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "max_tokens": 48,
        "temperature": 1.0,
        "seed": 3,
        "parallel_tool_calls": False,
    }
    required = oai.chat.completions.create(**asked)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    assert len(choice.message.tool_calls) == 1  # parallel_tool_calls false: one call
    call = choice.message.tool_calls[0]
    streamed = list(oai.chat.completions.create(**asked, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant" and streamed[0].choices[0].delta.content is None
    deltas = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == call.function.name and deltas[0].function.arguments == ""
    assert len(deltas) > 3 and all(d.index == 0 and d.id is None for d in deltas[1:])  # arguments piece by piece
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    assert call.function.name in ("get_weather", "get_time")
    assert set(json.loads(call.function.arguments)) == (
        {"city", "unit"} if call.function.name == "get_weather" else {"zone"}
    )

    # Cut short by max_tokens: the call's arguments are cut short too, finish_reason "length", as OpenAI's.
    request: dict[str, Any] = {"model": TASK, "messages": messages, "tools": [WEATHER], "tool_choice": named}
    cut = oai.chat.completions.create(**request, max_tokens=3, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is not None
    partial = cut.choices[0].message.tool_calls[0].function.arguments
    assert named_arguments.startswith(partial) and partial != named_arguments
    chunks = list(oai.chat.completions.create(**request, max_tokens=3, temperature=0, stream=True))
    pieces = [
        c.choices[0].delta.tool_calls[0].function.arguments
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    ]
    assert "".join(pieces) == partial and chunks[-1].choices[0].finish_reason == "length"
    # A list of calls cut short: the calls whose names are complete come back (the last one's arguments as
    # written), never the list's own text; before the first name, nothing at all.
    request = {**request, "tool_choice": "required"}
    whole = oai.chat.completions.create(**request, max_tokens=48, temperature=0)
    assert whole.usage is not None and whole.choices[0].message.tool_calls is not None
    (whole_call,) = whole.choices[0].message.tool_calls
    cut = oai.chat.completions.create(**request, max_tokens=whole.usage.completion_tokens - 1, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content is None
    (cut_call,) = cut.choices[0].message.tool_calls or []
    assert cut_call.function.name == whole_call.function.name == "get_weather"
    # Stop strings do not act on a forced call: it ends where its grammar ends, its arguments whole JSON (a stop
    # string inside them cut them mid-JSON, under finish_reason "tool_calls").
    for choice, whole_arguments, reason in (
        ("required", whole_call.function.arguments, "tool_calls"),
        (named, named_arguments, "stop"),
    ):
        stop = [whole_arguments[1:5], whole_arguments[-4:-1]]
        asked = {**request, "tool_choice": choice, "max_tokens": 48, "temperature": 0, "stop": stop}
        stopped = oai.chat.completions.create(**asked)
        assert stopped.choices[0].finish_reason == reason, stopped
        assert [c.function.arguments for c in stopped.choices[0].message.tool_calls or []] == [whole_arguments]
        chunks = list(oai.chat.completions.create(**asked, stream=True))
        pieces = [d.function.arguments for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert "".join(pieces) == whole_arguments and chunks[-1].choices[0].finish_reason == reason
    for stream in (False, True):
        cut = oai.chat.completions.create(**request, max_tokens=3, temperature=0, stream=stream)
        if stream:
            chunks = list(cut)
            assert all(not c.choices or not c.choices[0].delta.tool_calls for c in chunks)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
            assert cut.choices[0].message.content == ""

    # The conversation goes on with the call and the tool's answer in the history.
    history = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    after = oai.chat.completions.create(
        model=TASK, messages=history, max_tokens=4, temperature=0, tools=[WEATHER], tool_choice="none"
    )
    assert after.choices[0].message.content and after.choices[0].message.tool_calls is None


def test_tool_choice_auto_answers_in_text_when_the_model_calls_nothing(oai: openai.OpenAI) -> None:
    """With tools and no tool_choice (OpenAI's 'auto') the model is told about the tools in a system message (the
    tiny model's template ignores them) and may answer in text: the tiny random model never opens a call, so the
    reply is its text, streamed or not alike; an unreadable tool schema is the client's error."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    request: dict[str, Any] = {"model": TASK, "messages": messages, "max_tokens": 12, "temperature": 0}
    shown = oai.chat.completions.create(**request, tools=[WEATHER])
    choice = shown.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    ignored = oai.chat.completions.create(**request, tools=[WEATHER], tool_choice="none")
    assert shown.usage is not None and ignored.usage is not None
    assert shown.usage.prompt_tokens > ignored.usage.prompt_tokens + 50  # the tools and the call format, told
    chunks = list(oai.chat.completions.create(**request, tools=[WEATHER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content and chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": 1}}}}
    with pytest.raises(openai.BadRequestError, match="invalid tool schema"):
        oai.chat.completions.create(**request, tools=[bad])
    # Arguments are an object (keyword arguments), whichever tool_choice: a string's schema is refused, as OpenAI does.
    for choice in ("auto", "required", "none"):
        text = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
        with pytest.raises(openai.BadRequestError, match="type 'object'") as info:
            oai.chat.completions.create(**request, tools=[text], tool_choice=choice)
        assert _error_of(info.value)["param"] == "tools.0.function.parameters"


def test_tools_beside_a_response_format_call_or_answer_in_it(oai: openai.OpenAI) -> None:
    """OpenAI lets tools and response_format go together (agents with tools and an output type send both): with
    'auto' the reply either calls a tool or answers in the format; a forced call's reply is the call; 'none'
    answers in the format. A tool without parameters takes none (OpenAI: an empty parameter list)."""
    answer = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "degrees": {"type": "integer"}},
        "required": ["city", "degrees"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": answer}}
    bare = {"type": "function", "function": {"name": "now"}}  # no parameters
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    request: dict[str, Any] = {"model": TASK, "messages": messages, "max_tokens": 48, "temperature": 0}
    replies = [
        oai.chat.completions.create(**request, tools=[TIME, bare], response_format=response_format, seed=seed)
        for seed in range(3)
    ] + [
        oai.chat.completions.create(
            **{**request, "temperature": 1.0}, tools=[TIME, bare], response_format=response_format, seed=seed
        )
        for seed in range(6)
    ]
    kinds = set()
    for reply in replies:
        message = reply.choices[0].message
        kinds.add("call" if message.tool_calls else "answer")
        if message.tool_calls:  # a call of one of the tools, its arguments held to its schema
            assert reply.choices[0].finish_reason in ("tool_calls", "length")
            for call in message.tool_calls:
                assert call.function.name in ("get_time", "now")
                if reply.choices[0].finish_reason == "tool_calls" and call.function.name == "now":
                    assert json.loads(call.function.arguments) == {}
        elif reply.choices[0].finish_reason == "stop":  # else an answer in the format, whole once it ended
            assert set(json.loads(message.content or "")) == {"city", "degrees"}, message.content
    assert kinds == {"call", "answer"}  # these seeds give both (the tiny model's draws, fixed by the seeds)
    # Forced: the reply is the call, whatever the format says; a tool without parameters gets "{}".
    forced = oai.chat.completions.create(
        **request,
        tools=[WEATHER, bare],
        tool_choice={"type": "function", "function": {"name": "now"}},
        response_format=response_format,
    )
    (call,) = forced.choices[0].message.tool_calls or []
    assert call.function.name == "now" and json.loads(call.function.arguments) == {}
    required = oai.chat.completions.create(
        **request, tools=[bare], tool_choice="required", parallel_tool_calls=False, response_format=response_format
    )
    (call,) = required.choices[0].message.tool_calls or []
    assert call.function.name == "now" and json.loads(call.function.arguments) == {}
    # 'none': the tools are only shown; the answer is in the format. Without tools, 'none' asks for nothing.
    for extra in ({"tools": [WEATHER], "tool_choice": "none"}, {"tool_choice": "none"}):
        plain = oai.chat.completions.create(**request, **extra, response_format=response_format)
        if plain.choices[0].finish_reason == "stop":
            assert set(json.loads(plain.choices[0].message.content or "")) == {"city", "degrees"}
        assert plain.choices[0].message.tool_calls is None


def _error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_unknown_model_is_404_in_openai_shape(oai: openai.OpenAI) -> None:
    for model in ("no-such-task", "../etc/passwd"):
        with pytest.raises(openai.NotFoundError) as info:
            oai.completions.create(model=model, prompt="hi", max_tokens=2)
        error = _error_of(info.value)
        assert error["param"] == "model" and error["code"] == "model_not_found" and model in error["message"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


@pytest.mark.parametrize(
    ("endpoint", "extra", "param"),
    [
        ("completions", {"n": 17}, "n"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"logit_bias": {"fifty": -100}}, "logit_bias"),
        ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("completions", {"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ("completions", {"max_tokens": MAX_NEW_TOKENS + 1}, "max_tokens"),
        ("completions", {"temperature": 2.5}, "temperature"),
        ("chat", {"n": 17}, "n"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            "chat",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ("chat", {"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),  # names must be distinct
        ("chat", {"response_format": {"type": "json_schema"}}, "response_format"),  # no schema
        (
            "chat",
            {"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
            "structured_outputs",
        ),
        ("completions", {"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
        (
            "completions",
            {"extra_body": {"structured_outputs": {"regex": "a"}, "guided_json": {"type": "object"}}},
            "structured_outputs",
        ),
    ],
)
def test_unsupported_parameters_are_400(oai: openai.OpenAI, endpoint: str, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            oai.completions.create(model=TASK, prompt="hi", **{"max_tokens": 2, **extra})
        else:
            messages = [{"role": "user", "content": "hi"}]
            oai.chat.completions.create(model=TASK, messages=messages, **{"max_tokens": 2, **extra})  # type: ignore[arg-type]
    error = _error_of(info.value)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_other_bad_input_is_400(oai: openai.OpenAI, server_url: str) -> None:
    with pytest.raises(openai.BadRequestError, match="prompt list is empty"):
        oai.completions.create(model=TASK, prompt=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        oai.completions.create(model=TASK, prompt=["x"] * 33, n=2, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=TASK, prompt="hi", extra_body={"no_such_field": 1})
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=TASK, messages=[{"role": "function", "content": "x", "name": "f"}])
    with pytest.raises(openai.BadRequestError, match="content is missing"):
        oai.chat.completions.create(model=TASK, messages=[{"role": "user"}])  # type: ignore[list-item]
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=TASK, messages=[image])  # type: ignore[list-item]
    broken = httpx.post(
        f"{server_url}/v1/completions",
        content=b'{"model": "x",',
        headers={"authorization": f"Bearer {KEY_A}", "content-type": "application/json"},
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"


def test_bad_key_is_authentication_error(server_url: str) -> None:
    with openai.OpenAI(base_url=f"{server_url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert _error_of(info.value)["type"] == "authentication_error"


def test_native_routes_keep_native_error_shape(server_url: str) -> None:
    r = httpx.post(
        f"{server_url}/v1/generate",
        json={"task_id": "no-such-task", "prompt": "hi", "max_new_tokens": 2},
        headers={"authorization": f"Bearer {KEY_A}"},
    )
    assert r.status_code == 404
    assert r.json() == {"error": {"type": "not_found", "message": r.json()["error"]["message"]}}
