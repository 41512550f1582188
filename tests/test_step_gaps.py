"""Background CPU work runs between engine steps (server/step_gaps.py): never during one, and never starved."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from prefix_store.backends import DiskBackend
from prefix_store.registry import PrefixRegistry
from server.engine import GenerationRequest
from server.sampling import SamplingParams
from server.step_gaps import StepGaps
from tests.test_engine import collect, make_engine, tokens_of
from tests.test_prefix_store_registry import FP, make_kv
from tests.tiny_models import oracle_greedy


def _step_then(gaps: StepGaps, order: list[str], in_step: threading.Event, end_step: threading.Event) -> None:
    """The engine's side: one step held open until ``end_step``, then a second one."""
    with gaps.step():
        order.append("step 1")
        in_step.set()
        end_step.wait(5)
    with gaps.step():
        order.append("step 2")


def test_work_run_while_idle_holds_the_next_step_until_it_is_done() -> None:
    gaps = StepGaps()
    order: list[str] = []
    in_work, end_work = threading.Event(), threading.Event()

    def work() -> None:
        order.append("work")
        in_work.set()
        end_work.wait(5)
        order.append("work done")

    worker = threading.Thread(target=lambda: gaps.run(work))
    worker.start()
    assert in_work.wait(5)  # no step running: the worker runs it at once, itself

    def engine() -> None:
        with gaps.step():
            order.append("step")

    engine_thread = threading.Thread(target=engine)
    engine_thread.start()
    assert not engine_thread.join(0.2) and order == ["work"], "the step started during the work"
    end_work.set()
    worker.join(5)
    engine_thread.join(5)
    assert order == ["work", "work done", "step"]
    assert gaps.gaps_given == 1 and gaps.jobs_run_by_engine == 0


def test_the_registry_unpacks_large_loaded_prefixes_between_steps(tmp_path) -> None:
    disk = DiskBackend(tmp_path)
    PrefixRegistry(disk, FP).upload("acme", "sum", make_kv())
    PrefixRegistry(disk, FP).upload("acme", "small", make_kv())
    handed: list[int] = []
    gaps = StepGaps()

    def run(fn):  # counts what the registry hands to the real step gaps
        handed.append(1)
        return gaps.run(fn)

    registry = PrefixRegistry(disk, FP, run_cpu_work=run, cpu_work_min_bytes=1)
    registry.resolve("acme", "sum")  # cold: read, then unpacked between steps
    registry.resolve("acme", "sum")  # resident: nothing to unpack
    assert len(handed) == 1
    # With the default threshold (1 MiB) a small prefix unpacks at once, without waiting for a gap.
    PrefixRegistry(disk, FP, run_cpu_work=run).resolve("acme", "small")
    assert len(handed) == 1


def test_the_registry_fetches_in_the_gaps_when_told_to(tmp_path) -> None:
    """The server's setting for a store on this machine: each piece's read and its unpacking, in a gap."""
    disk = DiskBackend(tmp_path)
    kv = torch.randn(FP.num_layers, 2, FP.num_kv_heads, 512, FP.head_dim)  # 128 KiB: past the first read
    PrefixRegistry(disk, FP).upload("acme", "sum", kv)
    gaps = StepGaps()
    held: list[int] = []
    cpu: list[int] = []

    def run_held(fn):
        held.append(1)
        return gaps.run_held(fn)

    def run(fn):
        cpu.append(1)
        return gaps.run(fn)

    registry = PrefixRegistry(
        disk, FP, run_cpu_work=run, fetch_in=run_held, cpu_work_min_bytes=1, load_piece_bytes=32 * 2**10
    )
    assert torch.equal(registry.resolve("acme", "sum").key_values, kv)
    assert len(held) == 4 and not cpu  # 4 pieces of 32 KiB, each read and unpacked in one gap


def test_run_hands_work_to_the_engine_thread_when_the_step_ends() -> None:
    gaps = StepGaps()
    in_step, end_step = threading.Event(), threading.Event()
    order: list[str] = []
    results: list[object] = []

    def engine() -> None:
        with gaps.step():
            order.append("step 1")
            in_step.set()
            end_step.wait(5)
            order.append("step 1 ends")
        with gaps.step():
            order.append("step 2")

    def work() -> str:
        order.append("work")
        return threading.current_thread().name

    engine_thread = threading.Thread(target=engine, name="engine")
    engine_thread.start()
    in_step.wait(5)
    worker = threading.Thread(target=lambda: results.append(gaps.run(work)), name="worker")
    worker.start()
    assert not worker.join(0.2) and order == ["step 1"], "the work ran during a step"
    end_step.set()
    worker.join(5)
    engine_thread.join(5)
    # The engine thread ran it, after the step and before the next; the worker got its result.
    assert order == ["step 1", "step 1 ends", "work", "step 2"]
    assert results == ["engine"] and gaps.jobs_run_by_engine == 1


def test_work_handed_over_during_a_gap_waits_for_the_next_step_and_errors_come_back() -> None:
    gaps = StepGaps()
    order: list[str] = []
    in_step, end_step, spin = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []
    handing: list[threading.Thread] = []

    def b() -> None:
        order.append("b")
        raise ValueError("bad piece")

    def hand_over_b() -> None:
        try:
            gaps.run(b)
        except ValueError as e:
            errors.append(e)

    def a() -> None:  # runs in step 1's gap and hands more work over meanwhile
        order.append("a")
        handing.append(threading.Thread(target=hand_over_b))
        handing[0].start()
        while not gaps._jobs:  # until b is queued behind us
            spin.wait(0.001)

    engine_thread = threading.Thread(target=_step_then, args=(gaps, order, in_step, end_step))
    engine_thread.start()
    in_step.wait(5)
    worker = threading.Thread(target=lambda: gaps.run(a))
    worker.start()
    end_step.set()
    worker.join(5)
    engine_thread.join(5)
    handing[0].join(5)
    # b came while a's gap was running: it waited for step 2's end, and its error reached its caller.
    assert order == ["step 1", "a", "step 2", "b"]
    assert [str(e) for e in errors] == ["bad piece"] and gaps.jobs_run_by_engine == 2


def test_run_runs_at_once_while_idle_and_takes_work_back_from_a_stuck_step() -> None:
    gaps = StepGaps(max_wait_s=0.2)
    assert gaps.run(lambda: threading.current_thread().name) == threading.current_thread().name
    with gaps.step():  # a step that never ends while the work waits: after max_wait_s the worker runs it
        result: list[str] = []
        worker = threading.Thread(target=lambda: result.append(gaps.run(lambda: "done")))
        worker.start()
        worker.join(5)
        assert result == ["done"]
    assert gaps.jobs_run_by_engine == 0


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
async def test_an_engine_with_step_gaps_never_steps_while_work_runs(tmp_path) -> None:
    from tests.test_architectures import setup

    s = setup("llama")
    gaps = StepGaps()
    engine = make_engine(s.base, step_gaps=gaps)
    in_forward = threading.Event()
    violations: list[str] = []
    for name in ("fused_step", "decode", "prefill"):
        real = getattr(engine.runner, name)

        def spying(*args, _real=real, **kwargs):
            in_forward.set()
            try:
                return _real(*args, **kwargs)
            finally:
                in_forward.clear()

        setattr(engine.runner, name, spying)
    stop = threading.Event()
    entries = 0

    def work() -> None:
        nonlocal entries
        entries += 1
        if in_forward.is_set():
            violations.append("a forward ran during the work")

    def worker() -> None:
        while not stop.is_set():
            gaps.run(work)
            stop.wait(0.002)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        prompt = [5, 6, 7, 8]
        result = await collect(engine, GenerationRequest(prompt, SamplingParams(max_new_tokens=20)))
        assert tokens_of(result) == oracle_greedy(s.base, prompt, 20)[0]
    finally:
        stop.set()
        thread.join(5)
        engine.shutdown()
    assert not violations
    assert entries > 0 and gaps.jobs_run_by_engine > 0  # the engine ran work between its steps


def test_held_work_starts_as_the_step_ends_and_the_next_step_waits_for_it() -> None:
    gaps = StepGaps()
    order: list[str] = []
    in_step, end_step = threading.Event(), threading.Event()
    engine = threading.Thread(target=_step_then, args=(gaps, order, in_step, end_step))
    engine.start()
    in_step.wait(5)
    ran_on: list[str] = []

    def fetch() -> None:
        order.append("fetch")
        ran_on.append(threading.current_thread().name)

    worker = threading.Thread(target=lambda: gaps.run_held(fetch), name="worker")
    worker.start()
    assert not worker.join(0.2) and order == ["step 1"], "held work ran during a step"
    end_step.set()
    worker.join(5)
    engine.join(5)
    assert order == ["step 1", "fetch", "step 2"] and ran_on == ["worker"]  # on its own thread, in the gap


def test_held_work_past_the_hold_goes_on_during_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.step_gaps.HOLD_S", 0.05)
    gaps = StepGaps()
    order: list[str] = []
    in_step, end_step, release = threading.Event(), threading.Event(), threading.Event()
    engine = threading.Thread(target=_step_then, args=(gaps, order, in_step, end_step))
    engine.start()
    in_step.wait(5)

    def slow_fetch() -> None:  # a store that answers slowly: the engine must not wait for it
        order.append("fetch starts")
        release.wait(5)
        order.append("fetch ends")

    worker = threading.Thread(target=lambda: gaps.run_held(slow_fetch))
    worker.start()
    end_step.set()
    engine.join(5)
    assert order == ["step 1", "fetch starts", "step 2"]
    release.set()
    worker.join(5)


@pytest.mark.parametrize("held", [False, True], ids=["run", "run_held"])
def test_work_left_when_the_engine_goes_idle_runs_on_flush_not_after_max_wait(held: bool) -> None:
    """Work handed over while a step's gap runs waits for the next step's end; when no step comes (the engine goes
    idle: its idle hook flushes) it ran only after max_wait_s, a second per piece of a prefix load."""
    gaps = StepGaps(max_wait_s=30)
    done = threading.Event()
    second: list[threading.Thread] = []

    def later() -> None:
        done.set()

    def first() -> None:  # runs in the gap and hands more work over meanwhile, as a load's next piece does
        second.append(threading.Thread(target=lambda: (gaps.run_held if held else gaps.run)(later)))
        second[0].start()
        while not (gaps._held if held else gaps._jobs):
            time.sleep(0.001)

    in_step, end_step = threading.Event(), threading.Event()

    def engine() -> None:
        with gaps.step():
            in_step.set()
            end_step.wait(5)

    engine_thread = threading.Thread(target=engine)
    engine_thread.start()
    in_step.wait(5)
    worker = threading.Thread(target=lambda: (gaps.run_held if held else gaps.run)(first))
    worker.start()
    end_step.set()
    engine_thread.join(5)
    worker.join(5)
    assert not done.is_set()  # left over: no step will end to run it
    started = time.monotonic()
    gaps.flush()  # the engine's idle hook
    assert done.wait(5) and time.monotonic() - started < 5
    second[0].join(5)


def test_held_work_started_while_idle_does_not_hold_the_next_step() -> None:
    """A fetch started while no step runs may wait on its store (one that hangs: up to its socket timeout): the
    step that comes meanwhile starts at once, where ``run``'s CPU work would have held it."""
    gaps = StepGaps()
    started, release = threading.Event(), threading.Event()

    def hanging_fetch() -> None:
        started.set()
        release.wait(5)

    worker = threading.Thread(target=lambda: gaps.run_held(hanging_fetch))
    worker.start()
    assert started.wait(5)
    stepped = threading.Event()

    def engine() -> None:
        with gaps.step():
            stepped.set()

    engine_thread = threading.Thread(target=engine)
    engine_thread.start()
    try:
        assert stepped.wait(1), "the step waited for the held fetch"
    finally:
        release.set()
        worker.join(5)
        engine_thread.join(5)
