"""Only the engine thread runs torch's intra-op pool; I/O threads run torch single-threaded (server/threads.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import ServeConfig
from server.engine import GenerationRequest
from server.model_loading import load_model
from server.sampling import SamplingParams
from server.threads import ENGINE_TORCH_THREADS, io_executor, release_openmp_pool
from tests.test_engine import collect, make_engine, tokens_of
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(ENGINE_TORCH_THREADS < 2, reason="one intra-op thread: nothing to tell apart")


def test_io_threads_run_torch_single_threaded_and_leave_other_threads_alone() -> None:
    with io_executor() as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == ENGINE_TORCH_THREADS  # this thread's own setting is untouched

    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert seen == [1], "a new thread takes the process-wide value the I/O thread left: why the engine pins its own"


async def test_engine_forwards_keep_all_threads_after_io_threads_ran() -> None:
    with io_executor() as pool:  # leaves the process-wide count at 1, as a running server's prefix loads do
        pool.submit(torch.get_num_threads).result()
    engine = make_engine(tiny_llama(seed=1))
    counts: list[int] = []
    decode = engine.runner.decode

    def recording(batch):
        counts.append(torch.get_num_threads())
        return decode(batch)

    engine.runner.decode = recording  # type: ignore[method-assign]
    try:
        events = await collect(engine, GenerationRequest([5, 6, 7], SamplingParams(max_new_tokens=4)))
        assert len(tokens_of(events)) == 4
        assert counts and set(counts) == {ENGINE_TORCH_THREADS}
    finally:
        engine.shutdown()


def test_the_app_runs_blocking_work_on_single_threaded_io_threads(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = ServeConfig(store=f"disk://{tmp_path}")
    with TestClient(create_app(config, model=load_model(str(tiny_model_dir)))) as client:
        assert client.portal.call(asyncio.to_thread, torch.get_num_threads) == 1
        name = client.portal.call(asyncio.to_thread, lambda: threading.current_thread().name)
        assert name.startswith("prefix-serve-io")


_POOL_PROBE = """
import os, torch
from server.threads import release_openmp_pool
def threads(): return len(os.listdir("/proc/self/task"))
before = threads()
torch.ones(10**7).sum()  # a parallel op: this thread gets an OpenMP pool of workers
during = threads()
release_openmp_pool()
print(before, during, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_release_frees_the_calling_threads_openmp_pool() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _POOL_PROBE], env=env, capture_output=True, text=True, check=True)
    before, during, after = map(int, out.stdout.split())
    assert during > before, "the parallel op built no pool: nothing was tested"
    assert after == before


def test_release_is_harmless_where_torch_keeps_working() -> None:
    release_openmp_pool()
    assert torch.ones(10**6).sum().item() == 10**6  # the next parallel op builds a pool again
