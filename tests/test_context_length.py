"""Prefix, prompt and the tokens asked for must fit in the model's context: a request that does not is refused
(OpenAI's ``context_length_exceeded``), never cut short where the context ends; a limit left to its default is
lowered to the room there is. Errors found after the request was read name the field at fault."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import LoadedModel, load_model
from tests.live_server import serve_in_thread, write_peft_checkpoint

CONTEXT = 64  # the tiny model's context, cut down so that short prompts can overflow it
TASK, P = "short", 5
PROMPT = list(range(100, 140))  # 40 token ids


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return dataclasses.replace(load_model(str(tiny_model_dir)), max_context=CONTEXT)


@pytest.fixture(scope="module")
def url(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("context-server")
    config = ServeConfig(store=f"disk://{root / 'store'}", max_new_tokens=48)
    with serve_in_thread(create_app(config, model=loaded)) as base:
        write_peft_checkpoint(loaded, root / "ckpt", num_virtual_tokens=P, seed=1)
        files = {n: (n, (root / "ckpt" / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")}
        assert httpx.put(f"{base}/v1/prefixes/{TASK}", files=files).status_code == 201
        yield base


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_a_limit_past_the_context_is_refused(url: str, loaded: LoadedModel) -> None:
    # 40 prompt tokens + 30 asked for > 64.
    r = post(url, "/v1/completions", {"model": loaded.name, "prompt": PROMPT, "max_tokens": 30})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "context_length_exceeded",
        "max_tokens",
        "invalid_request_error",
    )
    assert "context is 64 tokens" in error["message"] and "needs 70" in error["message"]
    # The task's prefix counts: 40 + 5 + 20 > 64, where 40 + 20 fits.
    assert post(url, "/v1/completions", {"model": loaded.name, "prompt": PROMPT, "max_tokens": 20}).status_code == 200
    r = post(url, "/v1/completions", {"model": TASK, "prompt": PROMPT, "max_tokens": 20})
    assert r.status_code == 400 and "5 in the task's prefix" in r.json()["error"]["message"]
    # Native: the same rule, in the native shape (422), naming the native field.
    r = post(url, "/v1/generate", {"prompt": "word " * 40, "max_new_tokens": 40})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "max_new_tokens" and "context" in r.json()["error"]["message"]


def test_a_prompt_that_fills_the_context_names_the_prompt(url: str, loaded: LoadedModel) -> None:
    r = post(url, "/v1/completions", {"model": loaded.name, "prompt": list(range(100, 100 + CONTEXT))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    chat = {"model": loaded.name, "messages": [{"role": "user", "content": "word " * CONTEXT}]}
    r = post(url, "/v1/chat/completions", chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("model", ["base", TASK])
def test_a_default_limit_is_lowered_to_the_room_left(url: str, loaded: LoadedModel, model: str) -> None:
    """Chat's default (256, capped by the server's 48) and the native default (64) run to the context's end."""
    model = loaded.name if model == "base" else model
    room = CONTEXT - len(PROMPT) - (P if model == TASK else 0)
    body = {"model": model, "prompt": PROMPT, "ignore_eos": True, "temperature": 0}
    r = post(url, "/v1/completions", {**body, "max_tokens": None})
    assert r.status_code == 200, r.text  # completions' default of 16 fits
    assert r.json()["usage"]["completion_tokens"] == 16
    native = {"prompt": "word " * 40, "ignore_eos": True, "task_id": None if model == loaded.name else model}
    r = post(url, "/v1/generate", native)
    assert r.status_code == 200, r.text
    used = r.json()["usage"]["prompt_tokens"] + (P if model == TASK else 0)
    assert r.json()["usage"]["completion_tokens"] == CONTEXT - used and r.json()["finish_reason"] == "length"
    messages = [{"role": "user", "content": "word " * 10}]
    r = post(url, "/v1/chat/completions", {"model": model, "messages": messages, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == CONTEXT - usage["prompt_tokens"] - (P if model == TASK else 0)
    assert r.json()["choices"][0]["finish_reason"] == "length" and room > 0


@pytest.mark.parametrize(
    ("path", "field", "body", "param"),
    [
        ("/v1/completions", "logit_bias", {"logit_bias": {"999999": 1.0}}, "logit_bias"),
        ("/v1/completions", "stop_token_ids", {"stop_token_ids": [-1]}, "stop_token_ids"),
        ("/v1/completions", "stop", {"stop": [str(i) for i in range(17)]}, "stop"),
        ("/v1/completions", "min_tokens", {"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ("/v1/completions", "prompt", {"prompt": [10**7]}, "prompt"),
        (
            "/v1/chat/completions",
            "grammar",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
        ),
        ("/v1/generate", "grammar", {"grammar": {"type": "regex", "value": "(unclosed"}}, "grammar"),
        ("/v1/generate", "logit_bias", {"logit_bias": {"999999": 1.0}}, "logit_bias"),
    ],
)
def test_errors_found_late_name_their_field(
    url: str, loaded: LoadedModel, path: str, field: str, body: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = {"prompt": "hello"}
    if path == "/v1/chat/completions":
        base = {"messages": [{"role": "user", "content": "hello"}]}
    if path != "/v1/generate":
        base["model"] = loaded.name
    r = post(url, path, {**base, "max_tokens" if path != "/v1/generate" else "max_new_tokens": 4, **body})
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["param"] == param, (field, r.json())


def test_a_prompt_over_the_servers_prompt_limit_is_a_context_length_error(loaded: LoadedModel, tmp_path: Path) -> None:
    """Past --max-prompt-tokens (below the model's context), a prompt gets OpenAI's context_length_exceeded too:
    clients trim their history on that code, and on a default server a prompt between 4,096 tokens and the
    context got a plain invalid_request that they would not act on."""
    config = ServeConfig(store=f"disk://{tmp_path / 'store'}", max_prompt_tokens=20)
    with serve_in_thread(create_app(config, model=loaded)) as base:
        for prompt in (PROMPT, "word " * 30, "w" * 10_000):  # ids; tokenized; refused by its characters alone
            r = post(base, "/v1/completions", {"model": loaded.name, "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 400, r.text
            assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("context_length_exceeded", "prompt")
