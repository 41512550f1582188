"""The OpenAI routes take what OpenAI's own clients send and what vLLM's clients add: replies sent back as the
openai package dumps them, OpenAI's fields that change nothing here, and vLLM's chat, text and usage fields;
what the server cannot do is refused by name. Driven by the `openai` package against a real server."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from server.model_loading import LoadedModel
from tests.openai_server import KEY_A, TASK

USER = [{"role": "user", "content": "Name a colour."}]


def raw_chat(server_url: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server_url}/v1/chat/completions",
        json={"model": TASK, "messages": USER, "max_tokens": 4, **body},
        headers={"authorization": f"Bearer {KEY_A}"},
        timeout=60,
    )


def test_a_reply_goes_back_as_the_openai_package_dumps_it(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(model=TASK, messages=USER, max_tokens=6, temperature=0)
    dumped = first.choices[0].message.model_dump()  # refusal, annotations, audio, function_call: all None
    assert {"refusal", "audio", "function_call"} <= set(dumped)
    history = [*USER, dumped, {"role": "user", "content": "Another."}]
    again = oai.chat.completions.create(model=TASK, messages=history, max_tokens=6, temperature=0)
    by_hand = [*USER, {"role": "assistant", "content": first.choices[0].message.content}, history[-1]]
    plain = oai.chat.completions.create(model=TASK, messages=by_hand, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == plain.choices[0].message.content
    assert again.usage is not None and plain.usage is not None
    assert (again.usage.prompt_tokens, again.usage.completion_tokens) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
    )


def test_openai_fields_that_change_nothing_here_are_accepted(oai: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": TASK, "messages": USER, "max_tokens": 8, "temperature": 0}
    plain = oai.chat.completions.create(**request)
    dressed = oai.chat.completions.create(
        **request,
        store=False,
        metadata={"run": "test"},
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="user-1",
        prediction={"type": "content", "content": [{"type": "text", "text": "Blue is a colour."}]},
        reasoning_effort="low",
        modalities=["text"],
    )
    assert dressed.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
        (
            {"messages": [{"role": "assistant", "content": None, "function_call": {"name": "f"}}]},
            "messages.0.function_call",
        ),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        ({"definitely_not_a_field": 1}, "definitely_not_a_field"),
        ({"prediction": {"type": "text", "content": "x"}}, "prediction.type"),
        ({"prediction": {"type": "content", "content": [{"type": "image_url"}]}}, "prediction.content"),
        ({"messages": [*USER, {"role": "tool", "content": "noon"}]}, "messages.1.tool_call_id"),
    ],
)
def test_what_cannot_be_done_is_refused_by_name(server_url: str, body: dict[str, Any], param: str) -> None:
    r = raw_chat(server_url, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_continue_final_message_goes_on_writing_the_reply(
    oai: openai.OpenAI, loaded: LoadedModel, server_url: str
) -> None:
    """The last (assistant) message left open: the reply goes on from it, as a completion of the template's text
    does (vLLM's continue_final_message; add_generation_prompt false implied)."""
    messages = [*USER, {"role": "assistant", "content": "My favourite colour is"}]
    got = oai.chat.completions.create(
        model=TASK, messages=messages, max_tokens=8, temperature=0, extra_body={"continue_final_message": True}
    )
    assert loaded.tokenizer is not None
    text = loaded.tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert text.endswith("My favourite colour is")
    want = oai.completions.create(model=TASK, prompt=text, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.choices[0].text
    assert got.usage is not None and want.usage is not None and got.usage.prompt_tokens == want.usage.prompt_tokens
    # The template's variables pass through (this template ignores one it does not know).
    kwargs = {"continue_final_message": True, "chat_template_kwargs": {"enable_thinking": False}}
    same = oai.chat.completions.create(model=TASK, messages=messages, max_tokens=8, temperature=0, extra_body=kwargs)
    assert same.choices[0].message.content == got.choices[0].message.content


def test_include_stop_str_in_output_keeps_the_stop_string(oai: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": TASK, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}
    whole = oai.completions.create(**request).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert stop and stop in whole
    cut = oai.completions.create(**request, stop=[stop]).choices[0].text
    kept = oai.completions.create(**request, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert cut == whole[: whole.index(stop)] and kept.choices[0].text == cut + stop
    assert kept.choices[0].finish_reason == "stop"


def test_skip_special_tokens_false_shows_them(oai: openai.OpenAI, loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    assert tokenizer is not None and tokenizer.eos_token
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    # EOS forced and not ending the request: three special tokens in a row.
    request: dict[str, Any] = {"model": TASK, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
    forced = {"ignore_eos": True}
    silent = oai.completions.create(**request, logit_bias={str(eos): 100}, extra_body=forced)
    shown = oai.completions.create(
        **request, logit_bias={str(eos): 100}, extra_body={**forced, "skip_special_tokens": False}
    )
    assert silent.choices[0].text == "" and shown.choices[0].text == tokenizer.eos_token * 3


def test_continuous_usage_stats_count_as_they_go(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model=TASK,
            messages=USER,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
            extra_body={"ignore_eos": True},
        )
    )
    usages = [c.usage for c in chunks]
    assert all(u is not None for u in usages)
    counts = [u.completion_tokens for u in usages if u is not None]
    assert counts == sorted(counts) and counts[0] <= 1 and counts[-1] == 6  # the role's chunk comes with token 1
    assert len({u.prompt_tokens for u in usages if u is not None}) == 1
    assert chunks[-1].choices == []  # the last chunk is the usage's, as with include_usage alone


def test_truncate_prompt_tokens_keeps_the_prompts_end(oai: openai.OpenAI) -> None:
    ids = list(range(200, 230))
    request: dict[str, Any] = {"model": TASK, "max_tokens": 6, "temperature": 0}
    cut = oai.completions.create(**request, prompt=ids, extra_body={"truncate_prompt_tokens": 10})
    tail = oai.completions.create(**request, prompt=ids[-10:])
    assert cut.usage is not None and cut.usage.prompt_tokens == 10
    assert cut.choices[0].text == tail.choices[0].text


def test_usage_reports_the_prompt_tokens_the_cache_gave(oai: openai.OpenAI) -> None:
    """OpenAI's usage.prompt_tokens_details.cached_tokens (the Responses API's input_tokens_details): 0 for the
    first request with a long system prompt, the shared head's blocks for the next one."""
    system = {"role": "system", "content": "You keep the lighthouse's log, in short entries. " * 6}
    first, second = (
        oai.chat.completions.create(
            model=TASK, messages=[system, {"role": "user", "content": text}], max_tokens=2, temperature=0
        )
        for text in ("Any ships?", "Any storms?")
    )
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 16 <= cached < second.usage.prompt_tokens and cached % 16 == 0
    third = oai.responses.create(
        model=TASK, input=[system, {"role": "user", "content": "Any whales?"}], max_output_tokens=2, temperature=0
    )
    assert third.usage is not None and third.usage.input_tokens_details.cached_tokens == cached


def test_usage_says_how_much_of_a_prediction_stood(oai: openai.OpenAI) -> None:
    """With OpenAI's prediction, usage.completion_tokens_details counts the drafts taken from it that stood and
    that did not; the reply is the same. Without one, no such details."""
    request: dict[str, Any] = {"model": TASK, "messages": USER, "max_tokens": 24, "temperature": 0}
    plain = oai.chat.completions.create(**request)
    answer = plain.choices[0].message.content
    assert answer and plain.usage is not None and plain.usage.completion_tokens_details is None
    guessed = oai.chat.completions.create(**request, prediction={"type": "content", "content": answer})
    assert guessed.choices[0].message.content == answer and guessed.usage is not None
    details = guessed.usage.completion_tokens_details
    assert details is not None and details.accepted_prediction_tokens is not None
    assert 0 < details.accepted_prediction_tokens < guessed.usage.completion_tokens
    assert details.rejected_prediction_tokens is not None and details.rejected_prediction_tokens >= 0


def test_native_usage_says_how_much_of_a_prediction_stood(server_url: str) -> None:
    def generate(**extra: Any) -> dict[str, Any]:
        body = {"task_id": TASK, "prompt": "The quick brown fox", "max_new_tokens": 24, **extra}
        r = httpx.post(f"{server_url}/v1/generate", json=body, headers={"authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 200, r.text
        return r.json()

    plain = generate()
    assert plain["usage"]["accepted_prediction_tokens"] == plain["usage"]["rejected_prediction_tokens"] == 0
    guessed = generate(prediction=plain["text"])
    assert guessed["text"] == plain["text"]
    assert 0 < guessed["usage"]["accepted_prediction_tokens"] < guessed["usage"]["completion_tokens"]
    assert guessed["usage"]["rejected_prediction_tokens"] >= 0


def test_unknown_openai_routes_answer_in_openai_shape(server_url: str) -> None:
    """A path under /v1 an OpenAI client was after (not the native /v1/generate or /v1/prefixes) gets its error
    in OpenAI's shape, as every other answer on those routes."""
    headers = {"authorization": f"Bearer {KEY_A}"}
    for method, path, status in [("GET", "/v1/embeddings", 404), ("GET", "/v1/chat/completions", 405)]:
        r = httpx.request(method, f"{server_url}{path}", headers=headers, timeout=30)
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    native = httpx.get(f"{server_url}/v1/prefixes/a/b", headers=headers, timeout=30).json()["error"]
    assert "code" not in native  # the native API keeps its own shape
