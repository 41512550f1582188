"""Prefix lookups on the I/O threads, a few per tenant: one tenant's burst of cold loads leaves other tenants'
lookups a thread (server/tenant_threads.py), and resident prefixes need none (PrefixRegistry.resolve_resident)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from server.api.auth import TENANT_HEADER
from server.config import ServeConfig
from server.model_loading import load_model
from server.tenant_threads import DEFAULT_PER_TENANT, TenantThreads
from tests.live_server import serve_in_thread
from tests.test_http_api import native_blob


async def _until(condition, timeout_s: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class _Held:
    """Blocking calls that wait for ``release``, counting how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = self.most = self.finished = 0
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            assert self.release.wait(10)
            return name
        finally:
            with self._lock:
                self.running -= 1
                self.finished += 1


async def test_a_tenants_calls_beyond_its_share_wait_without_a_thread() -> None:
    threads, held = TenantThreads(per_tenant=2), _Held()
    flood = [asyncio.ensure_future(threads.run("flood", held, f"f{i}")) for i in range(5)]
    await _until(lambda: held.running == 2)
    # Another tenant's call runs at once though the flood's are held.
    assert await asyncio.wait_for(threads.run("calm", lambda: "calm"), 5) == "calm"
    await asyncio.sleep(0.1)
    assert held.running == 2
    held.release.set()
    assert await asyncio.gather(*flood) == [f"f{i}" for i in range(5)]
    assert held.most == 2
    assert not threads._slots and not threads._users  # nothing kept for idle tenants


async def test_a_cancelled_caller_keeps_its_slot_until_its_call_returns() -> None:
    threads, held = TenantThreads(per_tenant=1), _Held()
    running = asyncio.ensure_future(threads.run("t", held, "running"))
    await _until(lambda: held.running == 1)
    waiting = asyncio.ensure_future(threads.run("t", held, "waiting"))
    await asyncio.sleep(0.05)
    running.cancel()  # the client hung up: its call still runs on its thread, and still counts
    waiting.cancel()  # hung up before its turn: it never runs
    await asyncio.sleep(0.1)
    assert held.running == 1
    third = asyncio.ensure_future(threads.run("t", held, "third"))
    await asyncio.sleep(0.1)
    assert held.running == 1 and not third.done()
    held.release.set()
    assert await asyncio.wait_for(third, 5) == "third"
    assert held.most == 1 and held.finished == 2
    assert not threads._slots and not threads._users


async def test_a_call_queued_for_a_thread_runs_and_releases_its_slot_after_its_caller_left() -> None:
    threads, held = TenantThreads(per_tenant=1), _Held()
    loop = asyncio.get_running_loop()
    blockers = [loop.run_in_executor(None, held, "blocker") for _ in range(64)]  # the executor's threads: all taken
    await _until(lambda: held.running > 0)
    queued = asyncio.ensure_future(threads.run("t", lambda: "late"))
    await asyncio.sleep(0.05)
    queued.cancel()
    held.release.set()
    await asyncio.gather(*blockers)
    assert await asyncio.wait_for(threads.run("t", lambda: "next"), 5) == "next"  # the slot came back
    assert not threads._slots and not threads._users


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


def _generate(client: httpx.AsyncClient, tenant: str, task_id: str):  # type: ignore[no-untyped-def]
    body = {"task_id": task_id, "prompt": "x", "max_new_tokens": 1}
    return client.post("/v1/generate", json=body, headers={TENANT_HEADER: tenant})


async def test_one_tenants_cold_burst_leaves_others_lookups_a_thread(loaded, tmp_path: Path) -> None:
    """40 of flood's prefixes are cold and their loads are held; calm's resident prefix, whose check on use is
    due (it needs a thread), is still served. First come first served on the executor queued it behind the
    whole burst."""
    cfg = ServeConfig(store=f"disk://{tmp_path}", max_queue=256)
    burst = 40
    uploading = create_app(cfg, model=loaded)
    with serve_in_thread(uploading) as url, httpx.Client(base_url=url, timeout=30) as client:
        for tenant, task_id in [("calm", "hot"), *(("flood", f"cold{i}") for i in range(burst))]:
            r = client.put(f"/v1/prefixes/{task_id}", content=native_blob(p=4), headers={TENANT_HEADER: tenant})
            assert r.status_code == 201, r.text
    app = create_app(cfg, model=loaded)  # a fresh server on the same store: nothing resident
    with serve_in_thread(app) as url:
        registry = app.state.server.registry
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            assert (await _generate(client, "calm", "hot")).status_code == 200  # resident from now on
            registry.latest_ttl = 0  # every lookup checks the store: calm's needs a thread too
            gate, load = threading.Event(), registry._load

            def held_load(key):  # type: ignore[no-untyped-def]
                assert gate.wait(30)
                return load(key)

            registry._load = held_load
            try:
                flood = [asyncio.ensure_future(_generate(client, "flood", f"cold{i}")) for i in range(burst)]
                # One load holds the slot, the rest of flood's share of threads waits for it.
                await _until(lambda: registry.loads_waiting() >= DEFAULT_PER_TENANT - 1)
                await asyncio.sleep(0.2)
                calm = await asyncio.wait_for(_generate(client, "calm", "hot"), 10)
                assert calm.status_code == 200, calm.text
                assert registry.loads_waiting() == DEFAULT_PER_TENANT - 1  # flood never held more threads
            finally:
                gate.set()
            assert [(await r).status_code for r in flood] == [200] * burst


async def test_one_tenants_slow_compiles_leave_others_a_thread_and_a_compile_slot(loaded, tmp_path: Path) -> None:
    """40 of flood's constraints compile (held here, as schemas that take minutes would be): calm's constraint
    still compiles and its request is served. They took every I/O thread, and both compile slots first come first
    served, so calm waited for the whole backlog."""
    app = create_app(ServeConfig(store=f"disk://{tmp_path}", max_queue=256), model=loaded)
    with serve_in_thread(app) as url:
        grammars = app.state.server.grammars
        gate, compile_ = threading.Event(), grammars._compile
        held = [0]

        def held_compile(compiler, spec):  # type: ignore[no-untyped-def]
            if spec.source.startswith("flood"):
                held[0] += 1
                assert gate.wait(30)
            return compile_(compiler, spec)

        grammars._compile = held_compile

        def constrained(tenant: str, pattern: str):  # type: ignore[no-untyped-def]
            body = {"prompt": "x", "max_new_tokens": 1, "grammar": {"type": "regex", "value": pattern}}
            return client.post("/v1/generate", json=body, headers={TENANT_HEADER: tenant})

        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            try:
                flood = [asyncio.ensure_future(constrained("flood", f"flood{i}[a-z]*")) for i in range(40)]
                await _until(lambda: held[0] >= 1)
                await asyncio.sleep(0.3)
                assert held[0] == 1  # one of flood's compiles at a time
                calm = await asyncio.wait_for(constrained("calm", "calm[a-z]*"), 10)
                assert calm.status_code == 200, calm.text
            finally:
                gate.set()
            assert [(await r).status_code for r in flood] == [200] * 40
