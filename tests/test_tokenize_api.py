"""vLLM's /tokenize, /detokenize and /version through the real app and lifespan on the tiny model: ids equal
what a generation prefills, errors in OpenAI's shape, keys enforced."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import httpx
import pytest

from server.model_loading import LoadedModel
from tests.openai_server import KEY_A, KEY_B, TASK

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def post(url: str, path: str, body: dict[str, Any], key: str | None = KEY_A) -> httpx.Response:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("special", [True, False])
def test_prompt_ids_are_the_tokenizers(server_url: str, loaded: LoadedModel, special: bool) -> None:
    text = "The quick brown fox"
    r = post(server_url, "/tokenize", {"model": loaded.name, "prompt": text, "add_special_tokens": special})
    assert r.status_code == 200, r.text
    expected = loaded.tokenizer(text, add_special_tokens=special).input_ids
    assert r.json() == {"count": len(expected), "max_model_len": loaded.max_context, "tokens": expected}


def test_messages_count_is_a_chat_completions_prompt_tokens(server_url: str, loaded: LoadedModel) -> None:
    for model in (loaded.name, TASK):  # a task's prefix adds context, not prompt tokens
        r = post(server_url, "/tokenize", {"model": model, "messages": MESSAGES})
        assert r.status_code == 200, r.text
        chat = post(server_url, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 1})
        assert chat.status_code == 200, chat.text
        assert r.json()["count"] == chat.json()["usage"]["prompt_tokens"] == len(r.json()["tokens"])
    without = post(
        server_url, "/tokenize", {"model": loaded.name, "messages": MESSAGES, "add_generation_prompt": False}
    )
    assert without.json()["count"] < r.json()["count"]  # the assistant's opening left off


def test_detokenize_round_trips(server_url: str, loaded: LoadedModel) -> None:
    text = "Hello, world! 123 tokens."
    ids = post(server_url, "/tokenize", {"model": TASK, "prompt": text}).json()["tokens"]
    r = post(server_url, "/detokenize", {"model": TASK, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": text}


def test_errors_in_openai_shape(server_url: str, loaded: LoadedModel) -> None:
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        assert_openai_error(post(server_url, path, {"model": "no-such-task", **body}), 404, "model", "model_not_found")
        # Another tenant's task is as unknown as a missing one.
        assert_openai_error(post(server_url, path, {"model": TASK, **body}, KEY_B), 404, "model", "model_not_found")
    both = {"model": loaded.name, "prompt": "hi", "messages": MESSAGES}
    assert_openai_error(post(server_url, "/tokenize", both), 400)
    assert_openai_error(post(server_url, "/tokenize", {"model": loaded.name}), 400)
    assert_openai_error(post(server_url, "/tokenize", {"model": loaded.name, "prompt": "hi", "tools": []}), 400)
    assert_openai_error(post(server_url, "/tokenize", {"model": loaded.name, "prompt": "hi", "extra": 1}), 400)
    vocab = len(loaded.tokenizer)
    for bad in (vocab, -1):
        r = post(server_url, "/detokenize", {"model": loaded.name, "tokens": [1, bad]})
        assert_openai_error(r, 400, "tokens")


def test_keys_enforced_but_not_for_version(server_url: str, loaded: LoadedModel) -> None:
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        assert_openai_error(post(server_url, path, {"model": loaded.name, **body}, key=None), 401)
        assert_openai_error(post(server_url, path, {"model": loaded.name, **body}, key="wrong"), 401)
    r = httpx.get(f"{server_url}/version", timeout=60)
    assert r.status_code == 200 and r.json() == {"version": version("prefix-serve")}
    assert httpx.post(f"{server_url}/v1/tokenize", json={"model": loaded.name, "prompt": "hi"}).status_code == 404
