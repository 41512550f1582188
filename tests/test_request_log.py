"""Structured request logs: one line per finished request, JSON with --log-format json, no secrets or prompts."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import load_model
from server.request_log import JsonFormatter, RequestRecord, access_log
from tests.live_server import write_key_file
from tests.server_process import running_server
from tests.test_metrics import native_blob

KEY = "sk-test-secret-key-123"
PROMPT = "a very private prompt"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The access logger's lines, formatted by the JSON formatter `--log-format json` installs."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    old_level = access_log.level
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    try:
        yield out
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(old_level)


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_one_json_line_per_request(tiny_model_dir: Path, tmp_path: Path, captured: io.StringIO) -> None:
    keys = write_key_file(tmp_path / "keys.json", {KEY: "acme"})
    config = ServeConfig(store=f"disk://{tmp_path / 'store'}", api_keys=str(keys))
    auth = {"authorization": f"Bearer {KEY}"}
    with TestClient(create_app(config, model=load_model(str(tiny_model_dir)))) as client:
        upload = client.put(
            "/v1/prefixes/alpha",
            content=native_blob(4),
            headers={**auth, "content-type": "application/octet-stream"},
        )
        assert upload.status_code == 201, upload.text
        body = {"task_id": "alpha", "prompt": PROMPT, "max_new_tokens": 5}
        done = client.post("/v1/generate", json=body, headers={**auth, "x-request-id": "client-id-1"})
        assert done.status_code == 200, done.text
        assert done.headers["x-request-id"] == "client-id-1"
        with client.stream("POST", "/v1/generate", json={**body, "stream": True}, headers=auth) as stream:
            assert stream.status_code == 200
            stream.read()
            streamed_id = stream.headers["x-request-id"]
        missing = client.post("/v1/generate", json={**body, "task_id": "nope"}, headers=auth)
        assert missing.status_code == 404
        unauthorized = client.post("/v1/generate", json=body, headers={"x-request-id": "bad id with spaces"})
        assert unauthorized.status_code == 401
        assert unauthorized.headers["x-request-id"] != "bad id with spaces"  # not echoed: made fresh
        assert client.delete("/v1/prefixes/a%0D%0Aforged", headers=auth).status_code == 422
        choices = {"model": "alpha", "prompt": PROMPT, "max_tokens": 3, "n": 3}
        usage = client.post("/v1/completions", json=choices, headers=auth).json()["usage"]
        scoring = {"model": "alpha", "prompt": PROMPT, "max_tokens": 0, "echo": True}
        scored = client.post("/v1/completions", json=scoring, headers=auth).json()["usage"]

    text = captured.getvalue()
    assert KEY not in text and PROMPT not in text
    lines = lines_of(text)  # every line is JSON
    assert [line["status"] for line in lines] == [201, 200, 200, 404, 401, 422, 200, 200]
    assert all(line["event"] == "request" and line["logger"] == "prefix_serve.access" for line in lines)
    put, plain, streamed, not_found, refused, bad_id, three_choices, scoring_line = lines
    # Three choices of one prompt: its tokens once, as the usage the client is billed by counts them.
    assert (three_choices["prompt_tokens"], three_choices["generated_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    # Scoring a prompt (echo, max_tokens 0): the token its forward samples is dropped, and counted by neither.
    assert scored["completion_tokens"] == 0
    assert (scoring_line["prompt_tokens"], scoring_line["generated_tokens"]) == (scored["prompt_tokens"], 0)
    # An invalid id in the path is logged quoted: its line break would start a forged line of a text log.
    assert bad_id["task_id"] == repr("a\r\nforged")
    assert put["task_id"] == "alpha" and put["tenant"] == "acme" and put["method"] == "PUT"
    assert put["endpoint"] == "/v1/prefixes/{task_id}"
    for line, request_id in ((plain, "client-id-1"), (streamed, streamed_id)):
        assert line["request_id"] == request_id
        assert line["endpoint"] == "/v1/generate"
        assert line["tenant"] == "acme" and line["task_id"] == "alpha"
        assert line["prompt_tokens"] > 0 and 1 <= line["generated_tokens"] <= 5
        assert 0 < line["ttft_s"] <= line["duration_s"]
        assert line["finish_reason"] in ("length", "eos", "stop")
    assert plain["generated_tokens"] == done.json()["usage"]["completion_tokens"]
    assert not_found["tenant"] == "acme" and "generated_tokens" not in not_found and "ttft_s" not in not_found
    assert "tenant" not in refused and len(refused["request_id"]) == 32
    assert len({line["request_id"] for line in lines}) == len(lines)


def test_record_parses_task_from_prefix_id() -> None:
    from server.engine import GenerationRequest
    from server.sampling import SamplingParams

    record = RequestRecord("r", "POST", "/v1/generate")
    record.note_generation(GenerationRequest([1, 2, 3], SamplingParams(), None, "acme/my-task@7", tenant="acme"))
    assert (record.tenant, record.task_id, record.prompt_tokens) == ("acme", "my-task", 3)


def test_record_adds_up_the_engine_requests_of_one_http_request() -> None:
    """OpenAI's n and prompt lists: one HTTP request, several engine requests; the line counts all their tokens."""
    from server.engine import GenerationEvent, GenerationRequest
    from server.sampling import SamplingParams

    record = RequestRecord("r", "POST", "/v1/completions")
    first = GenerationRequest([1, 2, 3], SamplingParams(), tenant="acme")
    second = GenerationRequest([4, 5], SamplingParams(), tenant="acme")
    record.note_generation(first)
    record.note_generation(second)
    record.note_event(first, GenerationEvent(7, "a", prompt_tokens=3, completion_tokens=1))
    record.note_event(second, GenerationEvent(8, "b", prompt_tokens=2, completion_tokens=1))
    record.note_event(first, GenerationEvent(9, "c", "length", prompt_tokens=3, completion_tokens=2))
    assert (record.prompt_tokens, record.generated_tokens) == (5, 3)
    # Another choice of the first prompt (a copy of its request, sharing its token list): no new prompt tokens.
    another = dataclasses.replace(first, params=SamplingParams(seed=1))
    record.note_generation(another)
    record.note_event(another, GenerationEvent(5, "d", prompt_tokens=3, completion_tokens=1))
    assert (record.prompt_tokens, record.generated_tokens) == (5, 4)


def test_serve_log_format_json_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`prefix-serve serve --log-format json`: every line the process writes is JSON, one request line each."""
    args = ["--model", str(tiny_model_dir), "--store", f"disk://{tmp_path / 'store'}", "--log-format", "json"]
    with running_server(args, tmp_path / "server.log") as server:
        reply = httpx.post(server.url + "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 3}, timeout=60)
        assert reply.status_code == 200, reply.text
        request_id = reply.headers["x-request-id"]
    text = server.log()
    lines = lines_of(text)  # raises on any non-JSON line
    assert PROMPT not in text
    assert any("listening on http://" in line.get("message", "") for line in lines)
    requests = [line for line in lines if line.get("event") == "request" and line["endpoint"] == "/v1/generate"]
    assert len(requests) == 1
    (line,) = requests
    assert line["request_id"] == request_id and line["status"] == 200 and line["tenant"] == "default"
    assert line["generated_tokens"] == reply.json()["usage"]["completion_tokens"]
    assert "task_id" not in line  # no prefix: the base model


def test_serve_rejects_unknown_log_format(tmp_path: Path) -> None:
    from server.cli import main

    assert main(["serve", "--log-format", "xml", "--store", f"disk://{tmp_path}"]) == 2


def test_json_logs_turn_off_the_progress_bars_of_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' GGUF conversion draws tqdm bars itself (10 non-JSON lines as the default model loaded)."""
    import subprocess
    import sys

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    script = (
        "from server.request_log import configure_logging\n"
        "configure_logging('info', 'json')\n"
        "from tqdm.auto import tqdm\n"
        "for _ in tqdm(range(3), desc='Converting and de-quantizing GGUF tensors...'): pass\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "de-quantizing" not in done.stderr + done.stdout, done.stderr
