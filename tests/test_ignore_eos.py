"""`ignore_eos` on /v1/generate: EOS does not end the request, so fixed-length runs get max_new_tokens tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import LoadedModel, load_model

PROMPT = "The quick brown fox"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def make_client(model: LoadedModel, store: Path) -> TestClient:
    config = ServeConfig(store=f"disk://{store}", max_new_tokens=64, max_prompt_tokens=200)
    return TestClient(create_app(config, model=model))


@pytest.fixture(scope="module")
def eos_first(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, list[int]]:
    """The tiny model with its EOS set to the greedy first token of PROMPT, and its greedy tokens without EOS."""
    with make_client(loaded, tmp_path_factory.mktemp("store")) as c:
        body = c.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}).json()
    tokens = body["token_ids"]
    assert len(tokens) == NEW_TOKENS
    return dataclasses.replace(loaded, eos_token_ids=[tokens[0]]), tokens


def test_eos_ends_the_request_by_default(eos_first, tmp_path_factory: pytest.TempPathFactory) -> None:
    model, tokens = eos_first
    with make_client(model, tmp_path_factory.mktemp("store")) as c:
        body = c.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS}).json()
    assert body["finish_reason"] == "eos"
    assert body["token_ids"] == tokens[:1]


def test_ignore_eos_runs_to_max_new_tokens(eos_first, tmp_path_factory: pytest.TempPathFactory) -> None:
    model, tokens = eos_first
    request = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    with make_client(model, tmp_path_factory.mktemp("store")) as c:
        body = c.post("/v1/generate", json=request).json()
        with c.stream("POST", "/v1/generate", json={**request, "stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert body["finish_reason"] == "length"
    assert body["token_ids"] == tokens
    assert body["usage"]["completion_tokens"] == NEW_TOKENS
    assert lines, "the stream sent no events"
