"""Per-tenant quotas and server limits: 429/409/413/408 naming the limit, counters that always come back to zero,
CORS off by default, docs that can be turned off."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.api.state import ServerState
from server.config import ServeConfig
from server.engine import GenerationEvent, GenerationRequest
from server.errors import Overloaded, RequestTimeout
from server.model_loading import load_model
from server.quotas import RequestGate, TenantQuotas, default_quotas
from server.sampling import SamplingParams
from tests.live_server import serve_in_thread
from tests.test_http_api import assert_error, native_blob

KEYS = {
    "alice": {"tenant": "alice", "key": "k-alice"},  # server defaults only
    "few": {"tenant": "few", "key": "k-few", "quotas": {"max_prefixes": 2}},
    "small": {"tenant": "small", "key": "k-small", "quotas": {"max_stored_bytes": 5000, "max_upload_bytes": 3000}},
    "unlimited": {"tenant": "unlimited", "key": "k-unlimited", "quotas": {"max_prefixes": None}},
    "capped": {"tenant": "capped", "key": "k-capped", "quotas": {"max_concurrent_requests": 2}},
    "queued": {"tenant": "queued", "key": "k-queued", "quotas": {"max_queued_requests": 1}},
}
STEP_DELAY_S = 0.01  # added to every decode step of the live server, so requests stay in flight a while


def hdr(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]['key']}"}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(list(KEYS.values())))
    return path


def config(tmp: Path, key_file: Path, **overrides: object) -> ServeConfig:
    values: dict[str, object] = {
        "store": f"disk://{tmp}",
        "api_keys": str(key_file),
        "max_new_tokens": 400,
        "tenant_max_prefixes": 3,
    }
    return ServeConfig(**{**values, **overrides})  # type: ignore[arg-type]


def put(client: TestClient, tenant: str, task_id: str, p: int):
    headers = {**hdr(tenant), "content-type": "application/octet-stream"}
    return client.put(f"/v1/prefixes/{task_id}", content=native_blob(p=p), headers=headers)


# ----- storage quotas --------------------------------------------------------------------------


def test_storage_quotas(loaded, key_file: Path, tmp_path: Path) -> None:
    with TestClient(create_app(config(tmp_path, key_file), model=loaded)) as client:
        # Default from the server's settings: 3 prefixes.
        for i in range(3):
            assert put(client, "alice", f"t{i}", 2).status_code == 201
        r = put(client, "alice", "t3", 2)
        assert_error(r, 409, "max_prefixes is 3")
        assert r.json()["error"]["type"] == "quota_exceeded"
        assert put(client, "alice", "t0", 3).status_code == 201  # a new version of a stored task is no new prefix
        assert client.delete("/v1/prefixes/t1", headers=hdr("alice")).status_code == 204
        assert put(client, "alice", "t3", 2).status_code == 201

        # Key-file override: 2 prefixes; null lifts the default.
        assert put(client, "few", "a", 2).status_code == 201 and put(client, "few", "b", 2).status_code == 201
        assert_error(put(client, "few", "c", 2), 409, "max_prefixes is 2")
        for i in range(5):
            assert put(client, "unlimited", f"u{i}", 2).status_code == 201

        # Bytes: p=4 is 2 layers x 2 x 2 heads x 4 x 16 x 4 bytes = 2048.
        assert_error(put(client, "small", "big", 6), 413, "max_upload_bytes is 3000")
        assert put(client, "small", "x", 4).status_code == 201
        assert put(client, "small", "y", 4).status_code == 201
        assert_error(put(client, "small", "z", 2), 409, "max_stored_bytes of 5000")
        assert put(client, "small", "x", 2).status_code == 201  # replacing x frees its old bytes: 1024 + 2048
        listed = client.get("/v1/prefixes", headers=hdr("small")).json()["data"]
        assert sorted(p["task_id"] for p in listed) == ["x", "y"] and sum(p["bytes"] for p in listed) == 3072


def test_quota_settings_and_overrides() -> None:
    quotas = default_quotas(ServeConfig(tenant_max_prefixes=7, tenant_max_concurrent_requests=0))
    assert quotas == TenantQuotas(max_prefixes=7)
    assert quotas.with_overrides({"max_prefixes": None, "max_queued_requests": 2}) == TenantQuotas(
        max_queued_requests=2
    )
    with pytest.raises(ValueError, match="unknown quota"):
        TenantQuotas.parse_overrides({"max_things": 1}, "entry 0")
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="non-negative integer"):
            TenantQuotas.parse_overrides({"max_prefixes": bad}, "entry 0")
    # 0 of these would lock the tenant out of generating even on an idle server: said at startup instead.
    with pytest.raises(ValueError, match="'max_queued_requests' 0 would refuse every request"):
        TenantQuotas.parse_overrides({"max_queued_requests": 0}, "entry 0")
    assert TenantQuotas.parse_overrides({"max_concurrent_requests": 0, "max_prefixes": 0}, "e") == {
        "max_concurrent_requests": 0,
        "max_prefixes": 0,
    }


# ----- the request gate, with a scripted engine ------------------------------------------------


class _ScriptedScheduler:
    def __init__(self) -> None:
        self.waiting: dict[str, int] = {}

    def waiting_for(self, tenant: str) -> int:
        return self.waiting.get(tenant, 0)


class _ScriptedEngine:
    """Yields one token per ``tick``; records aborts (a generator closed before its end)."""

    def __init__(self) -> None:
        self.scheduler = _ScriptedScheduler()
        self.tick = asyncio.Event()
        self.aborted = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        finished = False
        try:
            for i in range(request.params.max_new_tokens):
                await self.tick.wait()
                last = i == request.params.max_new_tokens - 1
                finished = last
                yield GenerationEvent(i, "x", "length" if last else None)
        finally:
            if not finished:
                self.aborted += 1


def _request(tenant: str, tokens: int = 3) -> GenerationRequest:
    return GenerationRequest([1, 2], SamplingParams(max_new_tokens=tokens), tenant=tenant)


async def test_gate_counts_come_back_to_zero_however_requests_end() -> None:
    engine = _ScriptedEngine()
    gate = RequestGate(max_open_streams=1, request_timeout_s=0.2)
    quotas = TenantQuotas(max_concurrent_requests=2, max_queued_requests=3)

    first = gate.events(engine, _request("t"), quotas, stream=True)  # type: ignore[arg-type]
    second = gate.events(engine, _request("t"), quotas, stream=False)  # type: ignore[arg-type]
    engine.tick.set()
    assert (await anext(first)).token_id == 0 and (await anext(second)).token_id == 0
    assert gate.in_flight == {"t": 2} and gate.open_streams == 1
    with pytest.raises(Overloaded, match="max_concurrent_requests is 2"):
        await anext(gate.events(engine, _request("t"), quotas, stream=False))  # type: ignore[arg-type]
    with pytest.raises(Overloaded, match="max_open_streams"):
        await anext(gate.events(engine, _request("u"), quotas, stream=True))  # type: ignore[arg-type]
    engine.scheduler.waiting["u"] = 3
    with pytest.raises(Overloaded, match="max_queued_requests is 3"):
        await anext(gate.events(engine, _request("u"), quotas, stream=False))  # type: ignore[arg-type]
    assert gate.in_flight == {"t": 2}  # refused requests took nothing

    assert [e.token_id async for e in first] == [1, 2]  # ran to its end
    await second.aclose()  # the client went away
    assert gate.in_flight == {} and gate.open_streams == 0 and engine.aborted == 1

    engine.tick.clear()  # the engine stalls: the timeout cancels the request
    stalled = gate.events(engine, _request("t"), quotas, stream=True)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"0\.2 s"):
        await anext(stalled)
    assert 0.15 < time.monotonic() - started < 2
    assert gate.in_flight == {} and gate.open_streams == 0 and engine.aborted == 2


# ----- rate quotas and limits over real HTTP ---------------------------------------------------


@pytest.fixture(scope="module")
def live(loaded, key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerState]]:
    cfg = config(
        tmp_path_factory.mktemp("live-store"),
        key_file,
        max_batch_size=1,
        max_open_streams=3,
        # Over 5x the longest request that must finish (40 tokens, 0.5 s unloaded: a busy CI machine took 1.5 s
        # once); under the 390-token ones that must time out (at least 3.9 s of STEP_DELAY_S alone).
        request_timeout_s=3,
    )
    app = create_app(cfg, model=loaded)
    with serve_in_thread(app) as url:
        yield url, slowed(app.state.server)


def slowed(state: ServerState) -> ServerState:
    """``state``, its engine's decode steps each STEP_DELAY_S longer, so that requests stay in flight a while."""
    decode = state.engine.runner.decode

    def slow_decode(batch):  # type: ignore[no-untyped-def]
        time.sleep(STEP_DELAY_S)
        return decode(batch)

    state.engine.runner.decode = slow_decode  # type: ignore[method-assign]
    return state


class _Stream:
    """A streamed generation held open after its first event (reading the rest is up to the test)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()  # kept: a dropped line iterator closes the response when collected

    async def next_event(self) -> dict | None:
        async for line in self.lines:
            if line.startswith("data: "):
                return json.loads(line[6:])
        return None

    async def drain(self) -> list[dict]:
        events = []
        while (event := await self.next_event()) is not None:
            events.append(event)
        await self.response.aclose()
        return events

    async def close(self) -> None:
        await self.response.aclose()


async def _open_stream(client: httpx.AsyncClient, tenant: str, tokens: int) -> _Stream:
    body = {"prompt": "hello there", "max_new_tokens": tokens, "stream": True, "stop": ["\u0000"]}
    request = client.build_request("POST", "/v1/generate", json=body, headers=hdr(tenant))
    response = await client.send(request, stream=True)
    assert response.status_code == 200, await response.aread()
    stream = _Stream(response)
    assert await stream.next_event() is not None
    return stream


async def _settled(state: ServerState) -> None:
    for _ in range(200):
        if not state.gate.in_flight and state.gate.open_streams == 0 and state.engine.num_running == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"counters did not settle: {state.gate.in_flight}, {state.gate.open_streams} streams")


async def test_rate_quotas_and_open_streams_over_http(live, monkeypatch) -> None:
    from server.api import generate as generate_module

    url, state = live
    tokenized = []
    real_tokenize = generate_module.tokenize
    monkeypatch.setattr(generate_module, "tokenize", lambda *a, **k: tokenized.append(1) or real_tokenize(*a, **k))
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        # Two of "capped"'s requests in flight (one running, one queued behind it): a third is refused.
        short = {"prompt": "x", "max_new_tokens": 8}
        a = await _open_stream(client, "capped", 40)
        b = asyncio.ensure_future(client.post("/v1/generate", json=short, headers=hdr("capped")))
        await asyncio.sleep(0.1)
        before = len(tokenized)
        r = await client.post("/v1/generate", json={"prompt": "x"}, headers=hdr("capped"))
        assert_error(r, 429, "max_concurrent_requests is 2")
        assert r.headers["retry-after"]
        r = await client.post("/v1/completions", json={"model": state.model.name, "prompt": "x"}, headers=hdr("capped"))
        assert r.status_code == 429 and "max_concurrent_requests" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert len(tokenized) == before  # refused before their prompts cost anything
        assert (await client.post("/v1/generate", json=short, headers=hdr("alice"))).status_code == 200
        assert (await a.drain())[-1]["finish_reason"] in ("length", "eos")
        assert (await b).status_code == 200
        await _settled(state)

        # "queued" may have one request waiting: with the single row busy, a second waiting one is refused.
        a = await _open_stream(client, "queued", 40)
        b = asyncio.ensure_future(client.post("/v1/generate", json=short, headers=hdr("queued")))
        await asyncio.sleep(0.1)
        assert_error(await client.post("/v1/generate", json={"prompt": "x"}, headers=hdr("queued")), 429, "queued")
        await a.drain()
        assert (await b).status_code == 200
        await _settled(state)

        # At most 3 open streams, server-wide.
        # (a stream counts from its start, also while it waits for a row: one runs, two queue behind it)
        streams = [asyncio.ensure_future(_open_stream(client, "alice", 20)) for _ in range(3)]
        while state.gate.open_streams < 3:
            await asyncio.sleep(0.01)
        request = {"prompt": "x", "stream": True}
        assert_error(await client.post("/v1/generate", json=request, headers=hdr("alice")), 429, "max_open_streams")
        chat = {"model": state.model.name, "messages": [{"role": "user", "content": "x"}], "stream": True}
        assert (await client.post("/v1/chat/completions", json=chat, headers=hdr("few"))).status_code == 429
        first = await streams[0]
        await first.close()  # a disconnect frees its slot at once
        r = await client.post("/v1/generate", json={**request, "max_new_tokens": 2}, headers=hdr("few"))
        assert r.status_code == 200
        for stream in streams[1:]:
            assert (await (await stream).drain())[-1]["finish_reason"] in ("length", "eos")
        await _settled(state)


async def test_a_requests_choices_count_as_one_request(live) -> None:
    """n choices, or a list of prompts, are one request against the tenant's quotas and the open-stream limit:
    a tenant capped at 2 requests, or at 1 waiting, gets its 3 choices, streamed or not (they refused each other:
    a 429 that retrying could never cure, or a stream broken by one after the first choice's tokens)."""
    url, state = live
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        chat = {"model": state.model.name, "messages": [{"role": "user", "content": "x"}], "n": 3, "max_tokens": 12}
        r = await client.post("/v1/chat/completions", json=chat, headers=hdr("capped"))
        assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
        prompts = {"model": state.model.name, "prompt": ["x", "y", "z"], "max_tokens": 12}
        r = await client.post("/v1/completions", json=prompts, headers=hdr("queued"))  # may have 1 waiting
        assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
        body = {"model": state.model.name, "prompt": ["x", "y", "z"], "max_tokens": 12, "stream": True}
        indexes, counted = set(), set()
        async with client.stream("POST", "/v1/completions", json=body, headers=hdr("capped")) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                counted.add(state.gate.in_flight.get("capped"))
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    indexes.update(choice["index"] for choice in chunk["choices"])
        assert indexes == {0, 1, 2} and counted - {None} == {1}  # None: the request over, before its [DONE]
        await _settled(state)


async def _counted(client: httpx.AsyncClient, endpoint: str, status: int) -> float:
    """prefix_serve_requests_total for one route and status, scraped now."""
    text = (await client.get("/metrics")).text
    families = text_string_to_metric_families(text)
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "prefix_serve_requests_total"
        and (sample.labels["endpoint"], sample.labels["status"]) == (endpoint, str(status))
    )


async def test_request_timeout_cancels_and_says_so(live) -> None:
    url, state = live
    routes = ("/v1/generate", "/v1/completions")
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        before = {(route, status): await _counted(client, route, status) for route in routes for status in (200, 408)}
        started = time.monotonic()
        r = await client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 390}, headers=hdr("alice"))
        assert_error(r, 408, "3 s")
        assert r.headers["x-should-retry"] == "false"  # the SDKs retry 408s: it would run as long again, twice
        assert r.json()["error"]["type"] == "timeout" and time.monotonic() - started < 6
        await _settled(state)  # the row was freed

        events = await (await _open_stream(client, "alice", 390)).drain()
        assert events[-1] == {"error": {"type": "timeout", "message": events[-1]["error"]["message"]}}
        await _settled(state)

        body = {"model": state.model.name, "prompt": "x", "max_tokens": 390}
        r = await client.post("/v1/completions", json=body, headers=hdr("alice"))
        assert r.status_code == 408 and r.headers["x-should-retry"] == "false"
        await _settled(state)

        body["stream"] = True
        async with client.stream("POST", "/v1/completions", json=body, headers=hdr("alice")) as response:
            chunks = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert json.loads(chunks[-1][6:])["error"]["code"] == "timeout"
        await _settled(state)
        # The streams failed after their 200 went out: counted (and logged) as the 408s they end with.
        for route in routes:
            assert await _counted(client, route, 408) - before[route, 408] == 2, route
            assert await _counted(client, route, 200) == before[route, 200], route


async def test_a_stream_whose_client_leaves_while_queued_is_dropped(live) -> None:
    """A streamed request waiting for a row is aborted when its client goes away (it was prefilled once the row
    freed, and counted a 200, as its response had not started yet); the running request goes on."""
    url, state = live
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        left = await _counted(client, "/v1/generate", 499)
        running = await _open_stream(client, "alice", 200)  # the only row, for 2 s at least (STEP_DELAY_S)
        body = {"prompt": "x", "max_new_tokens": 8, "stream": True}
        queued = asyncio.ensure_future(client.post("/v1/generate", json=body, headers=hdr("alice")))
        while state.engine.num_waiting == 0:
            await asyncio.sleep(0.01)
        queued.cancel()  # the client gives up: httpx closes the connection
        gone_at = time.monotonic()
        while state.engine.num_waiting:
            assert time.monotonic() - gone_at < 1.0, "the request kept its place in the queue"
            await asyncio.sleep(0.01)
        assert state.engine.num_running == 1  # the stream still holds the row
        await running.drain()
        await _settled(state)
        assert await _counted(client, "/v1/generate", 499) - left == 1


async def test_a_tenant_filling_the_queue_leaves_the_reserved_slots_to_others(
    loaded, key_file: Path, tmp_path: Path
) -> None:
    """--max-queue 2 with --reserved-queue 1: alice fills the queue and is refused; few still queues, in the
    reserved slot, and once it is taken small is refused too. Every queued request is served."""
    cfg = config(tmp_path, key_file, max_batch_size=1, reserved_rows=0, max_queue=2, reserved_queue=1)
    app = create_app(cfg, model=loaded)
    with serve_in_thread(app) as url:
        state = slowed(app.state.server)

        async def waiting(count: int) -> None:
            while state.engine.num_waiting < count:
                await asyncio.sleep(0.01)

        short = {"prompt": "x", "max_new_tokens": 4}
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            running = await _open_stream(client, "alice", 300)  # the only row, for 3 s at least
            queued = [asyncio.ensure_future(client.post("/v1/generate", json=short, headers=hdr("alice")))]
            await waiting(1)
            queued.append(asyncio.ensure_future(client.post("/v1/generate", json=short, headers=hdr("alice"))))
            await waiting(2)
            assert_error(await client.post("/v1/generate", json=short, headers=hdr("alice")), 429, "the queue is full")
            queued.append(asyncio.ensure_future(client.post("/v1/generate", json=short, headers=hdr("few"))))
            await waiting(3)
            assert_error(await client.post("/v1/generate", json=short, headers=hdr("small")), 429, "slots kept")
            await running.close()
            assert [(await r).status_code for r in queued] == [200, 200, 200]
            await _settled(state)


def test_the_cli_writes_a_mid_stream_error_on_a_line_of_its_own(live, capsys: pytest.CaptureFixture[str]) -> None:
    """A stream that fails after some text (here, past the request timeout): the error line was glued to it."""
    from server.cli import main

    url, _ = live
    argv = ["generate", "-", "x", "--stream", "--max-new-tokens", "390", "--url", url, "--api-key", "k-alice"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 1 and out.strip() and out.endswith("\n"), out
    assert err.startswith("error: ") and "3 s" in err and len(err.splitlines()) == 1, err


def test_limits_are_clear_4xx(loaded, key_file: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, key_file, max_new_tokens=16, max_prompt_tokens=50, max_request_bytes=4096)
    with TestClient(create_app(cfg, model=loaded)) as client:
        h = hdr("alice")
        for body, words in [
            ({"prompt": "x", "max_new_tokens": 17}, "max_new_tokens"),
            ({"prompt": "word " * 60, "max_new_tokens": 4}, "limit is 50"),
            ({"prompt": "x", "max_new_tokens": 4, "stop": ["s"] * 17}, "stop strings"),
            ({"prompt": "x", "max_new_tokens": 4, "stop": ["s" * 257]}, "256 characters"),
        ]:
            assert_error(client.post("/v1/generate", json=body, headers=h), 422, words)
        assert_error(client.post("/v1/generate", json={"prompt": "x" * 5000}, headers=h), 413, "4096 bytes")

        def chunked(payload: bytes):  # a body without Content-Length, sent in pieces
            return (payload[i : i + 1000] for i in range(0, len(payload), 1000))

        big = json.dumps({"prompt": "x" * 5000}).encode()
        for path in ("/v1/generate", "/v1/chat/completions", "/v1/responses", "/tokenize"):
            assert_error(client.post(path, content=chunked(big), headers=h), 413, "4096 bytes")  # was a 400
        # Under OpenAI's paths, OpenAI's error shape (its SDKs read the code), with or without a Content-Length.
        for content in (big, chunked(big)):
            error = client.post("/v1/chat/completions", content=content, headers=h).json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "payload_too_large", error
            assert set(error) == {"message", "type", "param", "code"}
        small = json.dumps({"prompt": "x", "max_new_tokens": 2}).encode()
        ok = client.post("/v1/generate", content=chunked(small), headers={**h, "content-type": "application/json"})
        assert ok.status_code == 200, ok.text
        deep = b"[" * 2000 + b"]" * 2000  # past Python's recursion limit, within the 4,096 bytes
        r = client.post("/v1/generate", content=deep, headers={**h, "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] != "internal_error", r.text


def test_cors_off_by_default_and_docs_can_be_disabled(loaded, key_file: Path, tmp_path: Path) -> None:
    origin = {"origin": "https://evil.example"}
    preflight = {**origin, "access-control-request-method": "POST"}
    with TestClient(create_app(config(tmp_path, key_file), model=loaded)) as client:
        r = client.get("/health", headers=origin)
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in client.options("/v1/generate", headers=preflight).headers
        assert all(client.get(p).status_code == 200 for p in ("/docs", "/redoc", "/openapi.json"))
    cfg = config(tmp_path, key_file, disable_docs=True, cors_allow_origins="https://app.example")
    with TestClient(create_app(cfg, model=loaded)) as client:
        assert all(client.get(p).status_code == 404 for p in ("/docs", "/redoc", "/openapi.json"))
        ok = client.get("/health", headers={"origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in client.get("/health", headers=origin).headers


# ----- storage quotas across replicas sharing one store -------------------------------------------------------


def _replica_registries(kind: str, tmp_path: Path, make_redis_server) -> list:  # type: ignore[no-untyped-def]
    from prefix_store.backends import DiskBackend, RedisBackend
    from prefix_store.fingerprint import ModelFingerprint
    from prefix_store.registry import PrefixRegistry

    fp = ModelFingerprint("llama", num_layers=2, num_kv_heads=2, head_dim=8, vocab_size=128)
    if kind == "redis":
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        url = make_redis_server().url
        backends = [RedisBackend(url), RedisBackend(url)]
    else:
        backends = [DiskBackend(tmp_path / "store"), DiskBackend(tmp_path / "store")]
    return [PrefixRegistry(b, fp) for b in backends]


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_two_replicas_cannot_both_take_a_tenants_last_prefix(kind: str, tmp_path: Path, make_redis_server) -> None:
    """Two replicas (registries on backends of their own, one store) upload new tasks for a tenant with room for
    one more at the same moment, ten times: one upload fits each time, the other gets 409, and the tenant never
    holds more than its quota (without the store's tenant lock both often fit)."""
    import threading

    import torch

    from server.errors import QuotaExceeded
    from server.quotas import upload_within_quotas

    registries = _replica_registries(kind, tmp_path, make_redis_server)
    kv = torch.randn(2, 2, 2, 3, 8)  # [L, 2, H_kv, P, d]

    def upload(registry, task: str, quotas: TenantQuotas, start: threading.Barrier, outcomes: list[str]) -> None:  # type: ignore[no-untyped-def]
        start.wait()
        try:
            upload_within_quotas(registry, "acme", task, kv, quotas)
            outcomes.append("stored")
        except QuotaExceeded:
            outcomes.append("refused")

    for round_ in range(10):
        quotas = TenantQuotas(max_prefixes=round_ + 1)  # room for exactly one more each round
        start, outcomes = threading.Barrier(2), []
        threads = [
            threading.Thread(target=upload, args=(r, f"t{round_}-{i}", quotas, start, outcomes))
            for i, r in enumerate(registries)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["refused", "stored"], (round_, outcomes)
        assert len(registries[0].list("acme")) == round_ + 1
    for registry in registries:
        registry.backend.close()


def test_a_tenant_lock_held_elsewhere_is_waited_for_then_given_up(tmp_path: Path, monkeypatch) -> None:
    """A replica that holds the lock past the wait (a hung upload) costs the other a 503, not a hang."""
    import threading

    from prefix_store.backends import DiskBackend
    from prefix_store.backends import disk as disk_module
    from prefix_store.errors import StoreUnavailable

    monkeypatch.setattr(disk_module, "TENANT_LOCK_WAIT_S", 0.3)
    a, b = DiskBackend(tmp_path), DiskBackend(tmp_path)
    released = threading.Event()
    with a.tenant_lock("acme"):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="held"), b.tenant_lock("acme"):
            pass
        assert 0.3 <= time.monotonic() - started < 2
        with b.tenant_lock("other"):  # other tenants are not held up
            released.set()
    with b.tenant_lock("acme"):  # free again
        assert released.is_set()
