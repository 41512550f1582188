"""The heap trimmer: requests coalesce into rate-limited trims between engine steps, and with glibc's real
malloc_trim the host cache's RSS stays close to its tensors' bytes across many uploads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from server.api.app import build_state
from server.config import ServeConfig
from server.engine import GenerationRequest
from server.heap_trim import HeapTrimmer, malloc_trim
from server.model_loading import load_model
from server.sampling import SamplingParams
from server.step_gaps import StepGaps


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_requests_coalesce_into_one_trim_per_interval() -> None:
    trimmed_at: list[float] = []
    trimmer = HeapTrimmer(lambda: trimmed_at.append(time.monotonic()), min_interval_s=0.3)
    try:
        first = time.monotonic()
        for _ in range(50):
            trimmer.request()
        wait_for(lambda: len(trimmed_at) == 1)
        assert trimmed_at[0] - first < 0.2  # the first trim comes at once
        for _ in range(50):  # during the interval: one more trim, after it
            trimmer.request()
        wait_for(lambda: len(trimmed_at) == 2)
        assert trimmed_at[1] - trimmed_at[0] >= 0.3
        time.sleep(0.5)
        assert len(trimmed_at) == 2  # no request, no trim
    finally:
        trimmer.close()
    assert trimmer.trims == 2


def test_a_trim_waits_for_the_running_engine_step() -> None:
    gaps = StepGaps()
    order: list[str] = []
    trimmer = HeapTrimmer(lambda: order.append(f"trim on {threading.current_thread().name}"), run=gaps.run)
    try:
        with gaps.step():
            trimmer.request()
            time.sleep(0.2)  # the trimmer has handed the trim over and waits for the step to end
            order.append("step ends")
        wait_for(lambda: len(order) == 2)
    finally:
        trimmer.close()
    # The thread that ran the step (the engine's, in a server) ran the trim as the step ended.
    assert order == ["step ends", f"trim on {threading.current_thread().name}"]


def test_a_trim_waits_for_the_engine_to_go_idle_at_most_max_delay_s() -> None:
    busy = threading.Event()
    trimmed_at: list[float] = []
    trimmer = HeapTrimmer(lambda: trimmed_at.append(time.monotonic()), busy=busy.is_set, max_delay_s=0.6)
    try:
        busy.set()
        trimmer.request()
        time.sleep(0.3)
        assert trimmed_at == [] and trimmer.trims_delayed == 1  # rows are decoding: no trim yet
        idle_at = time.monotonic()
        busy.clear()
        wait_for(lambda: len(trimmed_at) == 1)
        assert trimmed_at[0] - idle_at < 0.3  # soon after the engine went idle
        time.sleep(1.1)  # past min_interval_s
        busy.set()  # busy from now on: the trim comes after max_delay_s all the same
        asked_at = time.monotonic()
        trimmer.request()
        wait_for(lambda: len(trimmed_at) == 2)
        assert trimmed_at[1] - asked_at >= 0.6 and trimmer.trims_delayed == 2
    finally:
        trimmer.close()


async def test_a_servers_trimmer_waits_for_its_engine_to_finish_decoding(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``build_state`` wires the trimmer to the engine: a trim asked for while a request decodes comes after it."""
    state = build_state(ServeConfig(store=f"disk://{tmp_path}"), load_model(str(tiny_model_dir)))
    trimmer = state.heap_trimmer
    try:
        if not trimmer.enabled:
            pytest.skip("no malloc_trim in this C library")
        wait_for(lambda: trimmer.trims == 1)  # the engine went idle at start: its idle hook asked for one
        time.sleep(trimmer.min_interval_s)  # past the interval: the next request is taken up at once
        request = GenerationRequest([5, 6, 7, 8], SamplingParams(max_new_tokens=500, ignore_eos=True))
        tokens = 0
        async for event in state.engine.generate(request):
            tokens += event.token_id is not None
            if tokens == 1 and trimmer.trims_delayed == 0:
                trimmer.request()
                # Blocking here is fine: the engine decodes on its own thread, and its events wait in the queue.
                wait_for(lambda: trimmer.trims_delayed > 0)
                assert (trimmer.trims_delayed, trimmer.trims) == (1, 1)  # rows are decoding: the trim waits
        assert tokens == 500
        wait_for(lambda: trimmer.trims >= 2)  # the engine is idle now
    finally:
        state.engine.shutdown()
        state.registry.backend.close()
        trimmer.close()


async def test_a_server_trims_when_its_engine_goes_idle(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Generations free activations, KV buffers and logits in the heap: once the engine has nothing to run, that
    memory goes back too, with no prefix upload or load to ask for it (a soak left ~85 MiB otherwise)."""
    state = build_state(ServeConfig(store=f"disk://{tmp_path}"), load_model(str(tiny_model_dir)))
    trimmer = state.heap_trimmer
    try:
        if not trimmer.enabled:
            pytest.skip("no malloc_trim in this C library")
        wait_for(lambda: trimmer.trims == 1)  # idle at start
        time.sleep(trimmer.min_interval_s)  # past the interval: a request from now on trims at once
        before = trimmer.trims
        request = GenerationRequest([5, 6, 7, 8], SamplingParams(max_new_tokens=8, ignore_eos=True))
        assert len([e async for e in state.engine.generate(request) if e.token_id is not None]) == 8
        wait_for(lambda: trimmer.trims == before + 1)
    finally:
        state.engine.shutdown()
        state.registry.backend.close()
        trimmer.close()


def test_a_failing_trim_does_not_end_the_thread() -> None:
    calls = []

    def trim() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("no")

    trimmer = HeapTrimmer(trim, min_interval_s=0.0)
    try:
        trimmer.request()
        wait_for(lambda: len(calls) == 1)
        trimmer.request()
        wait_for(lambda: trimmer.trims == 1)
    finally:
        trimmer.close()


def test_without_malloc_trim_requests_start_nothing() -> None:
    trimmer = HeapTrimmer(None)
    before = threading.active_count()
    trimmer.request()
    assert threading.active_count() == before and trimmer.trims == 0
    trimmer.close()


# Uploads of the default model's shape (30 layers, 3 KV heads, 64 dims, P = 10: 460,800 bytes) into a disk-backed
# registry with a large host cache, from 8 threads as the server's I/O executor would, asking for a trim after
# each one as the upload route does. Prints RSS growth over the cached tensors' bytes.
_UPLOADS = textwrap.dedent(
    """
    import re, sys, tempfile, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    import torch
    from prefix_store.backends.disk import DiskBackend
    from prefix_store.fingerprint import ModelFingerprint
    from prefix_store.registry import PrefixRegistry
    from server.heap_trim import HeapTrimmer, malloc_trim

    def rss() -> int:
        return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    trimmer = HeapTrimmer(malloc_trim() if sys.argv[1] == "trim" else None, min_interval_s=0.2)
    fingerprint = ModelFingerprint("llama", 30, 3, 64, 49152)
    # ~680 MB of prefix files: removed on the way out (left behind, each run of this test filled /tmp further)
    with tempfile.TemporaryDirectory() as store:
        registry = PrefixRegistry(DiskBackend(Path(store)), fingerprint, host_cache_bytes=8 << 30)

        def upload(i: int) -> None:
            registry.upload("t", f"task{i}", torch.randn(30, 2, 3, 10, 64))
            trimmer.request()

        before = rss()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(upload, range(1500)))
        trimmer.request()
        time.sleep(0.5)  # the last trim
        cached = registry.stats()["host_cache_bytes"]
        print((rss() - before) / cached)
        trimmer.close()
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or malloc_trim() is None, reason="needs glibc")
def test_host_cache_rss_stays_near_its_tensors_bytes_across_uploads() -> None:
    """Without trims this grew by 1.26-1.51x the cached bytes here (the freed upload temporaries between cached
    tensors stay resident); with them, by ~1.02x."""
    out = subprocess.run(
        [sys.executable, "-c", _UPLOADS, "trim"], capture_output=True, text=True, timeout=300, check=True
    )
    growth = float(out.stdout.strip().splitlines()[-1])
    print(f"\nRSS growth over the cached tensors' bytes, 1,500 uploads with trims: {growth:.3f}x")
    assert growth < 1.12
