"""The HTTP API through the real app and its lifespan, on a tiny model with the real tokenizer."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import load_model
from tests.tiny_models import oracle_greedy, peft_prefix_model

MAX_UPLOAD = 256 * 1024


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def client(loaded, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store")
    config = ServeConfig(store=f"disk://{store}", max_upload_bytes=MAX_UPLOAD, max_new_tokens=64, max_prompt_tokens=200)
    with TestClient(create_app(config, model=loaded)) as c:
        yield c


@pytest.fixture(scope="module")
def peft_checkpoint(loaded, tmp_path_factory: pytest.TempPathFactory):
    """A PEFT prefix checkpoint written by PEFT's own save_pretrained, and the PEFT model (the oracle)."""
    import copy

    peft = peft_prefix_model(copy.deepcopy(loaded.model), num_virtual_tokens=6, seed=11)
    out = tmp_path_factory.mktemp("peft-ckpt")
    peft.save_pretrained(out)
    return out, peft


def upload_peft(client: TestClient, task_id: str, ckpt: Path):
    files = {
        "adapter_config.json": ("adapter_config.json", (ckpt / "adapter_config.json").read_bytes()),
        "adapter_model.safetensors": ("adapter_model.safetensors", (ckpt / "adapter_model.safetensors").read_bytes()),
    }
    return client.put(f"/v1/prefixes/{task_id}", files=files)


def native_blob(layers: int = 2, heads: int = 2, p: int = 4, head_dim: int = 16, fill: float | None = None) -> bytes:
    g = torch.Generator().manual_seed(layers * 100 + p)
    tensors = {}
    for layer in range(layers):
        for name in ("key", "value"):
            t = torch.randn(heads, p, head_dim, generator=g)
            if fill is not None:
                t[0, 0, 0] = fill
            tensors[f"layers.{layer}.{name}"] = t
    return save(tensors)


def plain_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The native usage of a request that took nothing from the prompt cache and brought no prediction."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }


def put_native(client: TestClient, task_id: str, blob: bytes):
    return client.put(f"/v1/prefixes/{task_id}", content=blob, headers={"content-type": "application/octet-stream"})


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body
    for word in words:
        assert word in body["error"]["message"], body


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_peft_upload_then_generate_matches_oracle(client: TestClient, loaded, peft_checkpoint) -> None:
    ckpt, peft = peft_checkpoint
    r = upload_peft(client, "summarize", ckpt)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["task_id"] == "summarize" and info["num_virtual_tokens"] == 6 and info["version"] >= 1

    prompt = "The quick brown fox jumps over"
    r = client.post("/v1/generate", json={"task_id": "summarize", "prompt": prompt, "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_ids = loaded.tokenizer(prompt).input_ids
    want, _ = oracle_greedy(peft, prompt_ids, 8)
    got = body["token_ids"]
    # eos may end it early; then the oracle's first tokens match and the last is eos.
    assert got == want[: len(got)] and (len(got) == 8 or got[-1] in loaded.eos_token_ids)
    assert body["prefix_version"] == info["version"]
    assert body["usage"] == plain_usage(len(prompt_ids), len(got))

    base = client.post("/v1/generate", json={"task_id": None, "prompt": prompt, "max_new_tokens": 8}).json()
    want_base, _ = oracle_greedy(loaded.model, prompt_ids, 8)
    assert base["token_ids"] == want_base[: len(base["token_ids"])]
    assert base["prefix_version"] is None
    assert base["token_ids"] != got  # the prefix changes the output


def test_stream_concatenates_to_text(client: TestClient) -> None:
    assert put_native(client, "streamer", native_blob(p=5)).status_code == 201
    request = {"task_id": "streamer", "prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0}
    full = client.post("/v1/generate", json=request).json()
    events = []
    with client.stream("POST", "/v1/generate", json={**request, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    assert "".join(e["text"] for e in events) == full["text"]
    assert [e["token_id"] for e in events] == full["token_ids"]
    assert events[-1]["finish_reason"] == full["finish_reason"] and events[-1]["usage"] == full["usage"]
    assert all(e["finish_reason"] is None for e in events[:-1])


def test_stop_string_cuts_text(client: TestClient) -> None:
    request = {"prompt": "Count with me: one two three", "max_new_tokens": 30}
    full = client.post("/v1/generate", json=request).json()
    text = full["text"]
    assert len(text) > 6, full
    stop = text[3:6]
    cut = client.post("/v1/generate", json={**request, "stop": [stop]}).json()
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.index(stop)]


def test_messages_use_chat_template(client: TestClient, loaded) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    chat = client.post("/v1/generate", json={"messages": messages, "max_new_tokens": 4}).json()
    rendered = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["usage"]["prompt_tokens"] == len(loaded.tokenizer(rendered, add_special_tokens=False).input_ids)


def test_versions_list_get_delete(client: TestClient) -> None:
    first = put_native(client, "versioned", native_blob(p=3)).json()
    second = put_native(client, "versioned", native_blob(p=7)).json()
    assert second["version"] == first["version"] + 1 and second["num_virtual_tokens"] == 7
    assert client.get("/v1/prefixes/versioned").json()["version"] == second["version"]
    listed = {p["task_id"]: p for p in client.get("/v1/prefixes").json()["data"]}
    assert listed["versioned"]["version"] == second["version"]
    gen = client.post("/v1/generate", json={"task_id": "versioned", "prompt": "x", "max_new_tokens": 2}).json()
    assert gen["prefix_version"] == second["version"]
    # OpenAI's bodies have no field for it: a header says which upload answered (each route, streamed or not).
    version = str(second["version"])
    completion = {"model": "versioned", "prompt": "x", "max_tokens": 2}
    chat = {"model": "versioned", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    responses = {"model": "versioned", "input": "x", "max_output_tokens": 2}
    for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat), ("/v1/responses", responses)):
        for stream in (False, True):
            r = client.post(path, json={**body, "stream": stream})
            assert r.status_code == 200 and r.headers["x-prefix-version"] == version, (path, stream, r.headers)
    base = {**completion, "model": client.get("/v1/models").json()["data"][0]["id"]}
    assert base["model"] != "versioned" and "x-prefix-version" not in client.post("/v1/completions", json=base).headers
    assert client.delete("/v1/prefixes/versioned").status_code == 204
    assert_error(client.get("/v1/prefixes/versioned"), 404)
    assert_error(client.delete("/v1/prefixes/versioned"), 404)
    assert_error(client.post("/v1/generate", json={"task_id": "versioned", "prompt": "x"}), 404)


def test_uploads_and_deletes_ask_for_a_heap_trim(client: TestClient) -> None:
    """Each prefix write gives the heap's freed pages back soon after (server/heap_trim.py), on glibc."""
    trimmer = client.app.state.server.heap_trimmer
    if not trimmer.enabled:
        pytest.skip("no malloc_trim in this C library")
    for action in (
        lambda: put_native(client, "trimmed", native_blob(p=5)),
        lambda: client.delete("/v1/prefixes/trimmed"),
    ):
        before = trimmer.trims
        assert action().status_code in (201, 204)
        deadline = time.monotonic() + 5  # at most one trim per second: the next may wait that long
        while trimmer.trims == before:
            assert time.monotonic() < deadline, "no trim after a prefix write"
            time.sleep(0.01)


def test_bad_input_is_a_clear_4xx(client: TestClient) -> None:
    assert_error(client.post("/v1/generate", json={"task_id": "nope", "prompt": "hi"}), 404, "nope")
    assert_error(put_native(client, "wrong-model", native_blob(layers=3)), 422, "num_layers")
    assert_error(put_native(client, "wrong-heads", native_blob(heads=3)), 422, "num_kv_heads")
    assert_error(put_native(client, "wrong-dim", native_blob(head_dim=8)), 422, "head_dim")
    assert_error(put_native(client, "nan", native_blob(fill=float("nan"))), 422, "finite")
    assert_error(put_native(client, "inf", native_blob(fill=float("inf"))), 422, "finite")
    assert_error(put_native(client, "garbage", b"not a safetensors file at all"), 422)
    bad_json = client.post("/v1/generate", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["message"].startswith("the request body is not valid JSON: Expecting")
    assert_error(put_native(client, "bad..id", native_blob()), 422)
    assert_error(put_native(client, "-leading-dash", native_blob()), 422)
    assert_error(put_native(client, "a/b", native_blob()), 422, "task id")  # not a bare 404 from the router
    assert_error(client.get("/v1/prefixes/a/b"), 422, "task id")
    assert_error(client.delete("/v1/prefixes/a/b"), 422, "task id")
    # A trailing newline is part of the id, which it makes invalid: it did not act on task "nl" (the router's '$'
    # matched before the newline).
    assert put_native(client, "nl", native_blob()).status_code == 201
    for method in ("PUT", "GET", "DELETE"):
        assert_error(client.request(method, "/v1/prefixes/nl%0A", content=native_blob()), 422, "task id")
    assert client.get("/v1/prefixes/nl").json()["version"] == 1
    for bad_id in (
        put_native(client, ".bad", native_blob()),
        client.post("/v1/generate", json={"task_id": "../x", "prompt": "hi"}),
    ):
        assert bad_id.json()["error"]["param"] == "task_id"  # the field at fault, as every other 422 names it
    assert_error(client.post("/v1/generate", json={"prompt": "word " * 400}), 422, "prompt")
    assert_error(client.put("/v1/prefixes/huge", content=b"\0" * (MAX_UPLOAD + 1)), 413)
    assert_error(client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 0}), 422)
    assert_error(client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 65}), 422, "max_new_tokens")
    both = {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}
    both_error = client.post("/v1/generate", json=both).json()["error"]
    assert both_error["message"] == "give exactly one of 'prompt' or 'messages'" and "param" not in both_error
    assert_error(client.post("/v1/generate", json={"prompt": "hi", "temperature": -1}), 422)
    assert (
        client.post("/v1/generate", json={"prompt": "hi", "temperature": -1}).json()["error"]["param"] == "temperature"
    )
    assert_error(client.post("/v1/generate", json={"prompt": "hi", "bogus": 1}), 422)
    assert_error(client.get("/v1/no-such-route"), 404)
    # ...and the server keeps serving.
    assert client.post("/v1/generate", json={"prompt": "still alive?", "max_new_tokens": 2}).status_code == 200


def test_failed_upload_keeps_previous_version(client: TestClient) -> None:
    good = put_native(client, "keeper", native_blob(p=4)).json()
    assert_error(put_native(client, "keeper", native_blob(p=4, fill=float("nan"))), 422)
    assert_error(put_native(client, "keeper", native_blob(layers=5)), 422)
    # Finite as float64, infinite in the float32 the model runs in: its logits would all be NaN.
    overflow = {name: t.double() for name, t in load(native_blob(p=4)).items()}
    overflow["layers.1.value"][0, 2, 3] = 1e300
    assert_error(put_native(client, "keeper", save(overflow)), 422, "out of the range of float32")
    assert client.get("/v1/prefixes/keeper").json() == good
    gen = client.post("/v1/generate", json={"task_id": "keeper", "prompt": "x", "max_new_tokens": 2})
    assert gen.status_code == 200 and gen.json()["prefix_version"] == good["version"]


def test_a_seq2seq_checkpoint_is_refused_on_a_decoder_only_model(client: TestClient, peft_checkpoint) -> None:
    ckpt, _ = peft_checkpoint
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config.update(num_transformer_submodules=2, task_type="SEQ_2_SEQ_LM")
    files = {
        "adapter_config.json": ("adapter_config.json", json.dumps(config).encode()),
        "adapter_model.safetensors": ("adapter_model.safetensors", (ckpt / "adapter_model.safetensors").read_bytes()),
    }
    assert_error(client.put("/v1/prefixes/s2s", files=files), 422, "encoder-decoder")
    assert client.get("/v1/prefixes/s2s").status_code == 404


def test_multipart_needs_both_files(client: TestClient, peft_checkpoint) -> None:
    ckpt, _ = peft_checkpoint
    files = {"adapter_config.json": ("adapter_config.json", io.BytesIO((ckpt / "adapter_config.json").read_bytes()))}
    assert_error(client.put("/v1/prefixes/half", files=files), 400, "adapter_model.safetensors")


def test_reupload_after_delete_is_a_new_prefix(client: TestClient) -> None:
    """A re-upload after a delete is a new version (numbers only grow), and a new engine prefix id (the device
    cache's key)."""
    import asyncio

    from server.api.auth import DEFAULT_TENANT, Principal
    from server.api.generate import prepare_generation
    from server.sampling import SamplingParams

    def engine_prefix_id() -> str | None:
        prepared = prepare_generation(
            client.app.state.server,
            Principal(DEFAULT_TENANT, admin=True),
            task_id="reborn",
            prompt="Once upon a time",
            messages=None,
            params=SamplingParams(max_new_tokens=8),
            response_id="test",
        )
        return asyncio.run(prepared).request.prefix_id

    request = {"task_id": "reborn", "prompt": "Once upon a time", "max_new_tokens": 8}
    first = put_native(client, "reborn", native_blob(p=3)).json()
    first_id, first_out = engine_prefix_id(), client.post("/v1/generate", json=request).json()
    assert client.delete("/v1/prefixes/reborn").status_code == 204
    second = put_native(client, "reborn", native_blob(p=7)).json()
    second_id, second_out = engine_prefix_id(), client.post("/v1/generate", json=request).json()
    assert put_native(client, "reborn-twin", native_blob(p=7)).status_code == 201
    twin_out = client.post("/v1/generate", json={**request, "task_id": "reborn-twin"}).json()

    assert second["version"] > first["version"]
    assert first_id is not None and second_id is not None and first_id != second_id
    assert second_out["token_ids"] == twin_out["token_ids"] != first_out["token_ids"]


@pytest.mark.parametrize(("chunk_tokens", "groups"), [(64, 3), (0, 1)])
def test_compile_decode_compiles_at_startup_for_each_number_of_groups(
    loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_tokens: int, groups: int
) -> None:
    """--compile-decode: the app compiles the decode step before serving, once per number of KV groups the
    engine can keep (one without fused steps). On a CPU the step is not compiled, so the call is recorded."""
    from server.runner import ModelRunner

    calls: list[int] = []
    monkeypatch.setattr(ModelRunner, "compile_decode_steps", lambda self, max_groups: calls.append(max_groups))
    config = ServeConfig(
        store=f"disk://{tmp_path}", compile_decode=True, kv_groups=3, prefill_chunk_tokens=chunk_tokens
    )
    with TestClient(create_app(config, model=loaded)) as c:
        assert calls == [groups]
        r = c.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_stock_linear_serves_on_torchs_default_kernel(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--stock-linear: the app's runner leaves the linear layers on torch's default kernel (by default it switches
    them to oneDNN), and the greedy tokens are those of the default setting."""
    from tests.tiny_models import onednn_switched, running_linears

    body = {"prompt": "hello there", "max_new_tokens": 8, "ignore_eos": True}
    texts = []
    for stock in (True, False):
        model = load_model(str(tiny_model_dir))
        config = ServeConfig(store=f"disk://{tmp_path / str(stock)}", stock_linear=stock)
        with TestClient(create_app(config, model=model)) as c:
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            texts.append(r.json()["text"])
            assert onednn_switched(model.model) == ([] if stock else running_linears(model.model))
    assert texts[0] == texts[1]


def test_a_prefix_made_for_another_model_is_listed_as_such_and_not_offered(loaded, tmp_path: Path) -> None:
    """A store kept while the server's model changed: its old prefixes are listed with fits_model false (to be
    deleted), left out of /v1/models (no client should pick them), and refused when named."""
    from prefix_store.backends import DiskBackend
    from prefix_store.fingerprint import ModelFingerprint
    from prefix_store.registry import PrefixRegistry

    other = ModelFingerprint("gpt2", num_layers=3, num_kv_heads=4, head_dim=8, vocab_size=500)
    PrefixRegistry(DiskBackend(tmp_path), other).upload("default", "old", torch.randn(3, 2, 4, 2, 8))
    with TestClient(create_app(ServeConfig(store=f"disk://{tmp_path}"), model=loaded)) as c:
        assert put_native(c, "new", native_blob(p=3)).json()["fits_model"] is True
        listed = {p["task_id"]: p["fits_model"] for p in c.get("/v1/prefixes").json()["data"]}
        assert listed == {"old": False, "new": True} and c.get("/v1/prefixes/old").json()["fits_model"] is False
        assert [m["id"] for m in c.get("/v1/models").json()["data"]][1:] == ["new"]
        assert_error(c.post("/v1/generate", json={"task_id": "old", "prompt": "x"}), 422, "does not fit this model")
        assert c.delete("/v1/prefixes/old").status_code == 204


def test_tokenizing_a_prompt_never_holds_the_event_loop(loaded, tmp_path: Path, monkeypatch) -> None:
    """Rendering and tokenizing run off the event loop: while one request's prompt is being tokenized (held here
    until /health has answered: megabytes take seconds), the server answers others. On the loop, /health could
    not answer until the hold timed out."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from server.api import generate as generate_module
    from tests.live_server import serve_in_thread

    held, release = threading.Event(), threading.Event()
    real = generate_module.tokenize

    def slow_tokenize(*args, **kwargs):  # type: ignore[no-untyped-def]
        held.set()
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "tokenize", slow_tokenize)
    app = create_app(ServeConfig(store=f"disk://{tmp_path}"), model=loaded)
    with serve_in_thread(app) as url, ThreadPoolExecutor(1) as pool:
        body = {"prompt": "a long document", "max_new_tokens": 2}
        slow = pool.submit(httpx.post, f"{url}/v1/generate", json=body, timeout=60)
        assert held.wait(20)
        try:
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        finally:
            release.set()
        assert slow.result().status_code == 200


def test_bodies_that_stop_arriving_get_408_and_hold_nothing_else(loaded, tmp_path: Path, monkeypatch) -> None:
    """A client that announces a body and stops sending it (declared length or chunked, an upload or a JSON
    request) gets 408 once a piece is overdue, instead of holding its connection and buffer for as long as it
    likes; another tenant's upload meanwhile goes through; and a stream running far longer than the wait is not
    cut (the wait is over once the body is in)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    import httpx

    from server.api import body_limit
    from tests.live_server import serve_in_thread

    monkeypatch.setattr(body_limit, "BODY_IDLE_S", 0.3)
    app = create_app(ServeConfig(store=f"disk://{tmp_path}", max_new_tokens=400), model=loaded)
    with serve_in_thread(app) as url:
        parts = urlsplit(url)

        def stalled(method: str, path: str, headers: str, first: bytes) -> bytes:
            with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
                sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + first)
                answer = sock.recv(4096)
                head, _, rest = answer.partition(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head)[1])  # type: ignore[index]
                while len(rest) < length:
                    rest += sock.recv(4096)
                return head + b"\r\n\r\n" + rest

        blob = native_blob(p=4)
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(stalled, "PUT", "/v1/prefixes/slow", f"Content-Length: {len(blob)}\r\n", blob[:100])
            other = httpx.put(
                f"{url}/v1/prefixes/quick",
                content=blob,
                headers={"content-type": "application/octet-stream", "x-prefix-serve-tenant": "bob"},
            )
            assert other.status_code == 201  # bob's upload is not held up by default's
            answer = held.result()
        assert answer.startswith(b"HTTP/1.1 408") and b"stopped arriving" in answer, answer
        json_head = "Content-Type: application/json\r\nContent-Length: 100\r\n"
        assert stalled("POST", "/v1/generate", json_head, b'{"prompt": ').startswith(b"HTTP/1.1 408")
        chunked_head = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        assert stalled("POST", "/v1/generate", chunked_head, b'5\r\n{"pro\r\n').startswith(b"HTTP/1.1 408")
        assert httpx.get(f"{url}/v1/prefixes/slow").status_code == 404

        started = time.monotonic()
        body = {"prompt": "Once", "max_new_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert time.monotonic() - started > 0.3, "the stream must outlast the wait for this test to say anything"
        assert json.loads(events[-1][6:])["finish_reason"] == "length" and len(events) == 400


def test_a_prompt_longer_than_any_tokenization_of_the_limit_is_refused_untokenized(
    client: TestClient, loaded, monkeypatch
) -> None:
    """More characters than max_prompt_tokens tokens can hold (the longest token's characters, with a margin) is
    refused before tokenizing: megabytes cost seconds of CPU beside the engine. A prompt under that bound is
    tokenized and judged by its tokens."""
    from server.api import generate as generate_module

    calls = []
    real = generate_module.tokenize
    monkeypatch.setattr(generate_module, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    bound = 200 * loaded.longest_token_chars * 2  # the client fixture's max_prompt_tokens is 200
    assert loaded.longest_token_chars == max(len(t) for t in loaded.tokenizer.get_vocab())
    r = client.post("/v1/generate", json={"prompt": "x" * (bound + 1)})
    assert_error(r, 422, "characters, more than 200 tokens")
    chat = {"messages": [{"role": "user", "content": "x" * (bound + 1)}]}
    assert_error(client.post("/v1/generate", json=chat), 422, "characters")
    assert calls == []
    assert_error(client.post("/v1/generate", json={"prompt": "word " * 300}), 422, "tokens; the limit is 200")
    assert calls == [1]


def test_a_lone_surrogate_in_a_string_is_refused_by_field(client: TestClient) -> None:
    """JSON can escape half a UTF-16 pair alone ("\\ud800"): no encoder turns it into text, and it was a 500 on
    every route that tokenized, matched or echoed it. Refused by name; a whole pair (an escaped emoji) is text."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    lone = "\\ud800x"
    cases = {
        "/v1/generate": (f'{{"prompt": "{lone}", "max_new_tokens": 2}}', 422, "prompt"),
        "/v1/completions": (f'{{"model": "{model}", "prompt": "hi", "stop": ["{lone}"]}}', 400, "stop.0"),
        "/v1/chat/completions": (
            f'{{"model": "{model}", "messages": [{{"role": "user", "content": "{lone}"}}]}}',
            400,
            "messages.0.content",
        ),
        "/v1/responses": (f'{{"model": "{model}", "input": "{lone}"}}', 400, "input"),
        "/tokenize": (f'{{"model": "{model}", "prompt": "{lone}"}}', 400, "prompt"),
    }
    for path, (body, status, param) in cases.items():
        response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert_error(response, status, "surrogate")
        assert response.json()["error"]["param"] == param, (path, response.text)
    pair = json.dumps({"prompt": "smile \U0001f600", "max_new_tokens": 2})  # ensure_ascii: "\ud83d\ude00"
    assert "\\ud83d\\ude00" in pair
    assert client.post("/v1/generate", content=pair, headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("depth", [990, 5000])
def test_a_lone_surrogate_nested_deep_is_a_clear_error(client: TestClient, depth: int) -> None:
    """Nested near the decoder's limit (990: the walk that looks for surrogates recursed past Python's limit) or
    past it (5000: the decoder itself), a body with a lone surrogate in it was a 500."""
    body = '{"prompt": ' + "[" * depth + '"\\ud800"' + "]" * depth + ', "max_new_tokens": 2}'
    response = client.post("/v1/generate", content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text[:300]
    assert client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_a_top_k_past_the_vocabulary_is_off(client: TestClient) -> None:
    """It keeps every token; from 2**63 up it overflowed the sampler's int64 tensor (a 500, and with
    --prefill-chunk-tokens 0 for every request admitted beside it)."""
    base = {"prompt": "hi", "max_new_tokens": 6, "temperature": 1.0, "seed": 3}
    off = client.post("/v1/generate", json=base)
    assert off.status_code == 200
    for top_k in (10**6, 2**63, 2**70):
        r = client.post("/v1/generate", json={**base, "top_k": top_k})
        assert r.status_code == 200 and r.json()["text"] == off.json()["text"], (top_k, r.text)
    model = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, "top_k": 2**64})
    assert r.status_code == 200, r.text


def test_stop_strings_count_once_min_tokens_are_written(client: TestClient) -> None:
    """As vLLM: a stop string ends the text only once more than min_tokens tokens exist (it is searched for in
    what came after, plus a look-back for one straddling that moment). One in the first token's text ended the
    request after one token though min_tokens asked for 4."""
    tokenizer = client.app.state.server.model.tokenizer  # type: ignore[attr-defined]
    free = client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 16, "ignore_eos": True}).json()
    text, ids = free["text"], free["token_ids"]
    first = tokenizer.decode(ids[:1])
    stop = next(c for c in first if not c.isspace())
    head = tokenizer.decode(ids[:4])  # the first min_tokens tokens' text
    at = next((i for i in range(len(text)) if text.startswith(stop, i) and i + len(stop) > len(head)), None)
    body = {"prompt": "hello", "max_new_tokens": 16, "ignore_eos": True, "stop": [stop]}
    cut = client.post("/v1/generate", json=body).json()
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"
    held = client.post("/v1/generate", json={**body, "min_tokens": 4}).json()
    assert held["text"] == (text if at is None else text[:at]), (stop, text, held)
    assert len(held["token_ids"]) > 4 > len(cut["token_ids"])


def test_completions_top_logprobs_always_hold_the_chosen_token(client: TestClient) -> None:
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements"; a sampled token outside the top ones was left out."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "hello", "max_tokens": 16, "temperature": 1.5, "seed": 1, "logprobs": 1}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    outside = 0
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert top[token] == value and len(top) <= 2
        outside += len(top) == 2
    assert outside > 0  # sampled hot: some chosen tokens were not the likeliest (else this checks nothing)


def test_a_body_that_is_not_a_json_object_says_so(client: TestClient) -> None:
    """`curl -d '{...}'` sends JSON as a form (its default Content-Type): the message said "Input should be a valid
    dictionary or object to extract fields from", which names neither the body nor its Content-Type."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    form = {"content-type": "application/x-www-form-urlencoded"}
    for path, body in (("/v1/generate", {"prompt": "hi"}), ("/v1/completions", {"model": model, "prompt": "hi"})):
        r = client.post(path, content=json.dumps(body), headers=form)
        assert r.status_code in (400, 422), r.text
        assert "Content-Type: application/json" in r.json()["error"]["message"], r.text
        for not_an_object in ([body], "hi"):  # JSON, but not an object
            r = client.post(path, json=not_an_object)
            assert r.json()["error"]["message"] == "the request body must be a JSON object", r.text


def test_a_prefix_must_leave_room_in_the_context(loaded, tmp_path: Path) -> None:
    """A prefix as long as the context (512 here) could be stored and never serve: uploads are held to the context
    minus a prompt token and a generated one."""
    assert loaded.max_context == 512
    with TestClient(create_app(ServeConfig(store=f"disk://{tmp_path}"), model=loaded)) as c:
        assert_error(put_native(c, "whole-context", native_blob(p=511)), 422, "between 1 and 510")
        assert put_native(c, "fits", native_blob(p=510)).status_code == 201
        done = c.post("/v1/completions", json={"model": "fits", "prompt": [5], "max_tokens": 1})
        assert done.status_code == 200, done.text
        assert (done.json()["usage"]["prompt_tokens"], done.json()["usage"]["completion_tokens"]) == (1, 1)
