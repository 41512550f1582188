"""Background CPU work runs between the engine's steps, not during them (CPU serving).

On a CPU the engine's intra-op threads (OpenMP) take every core, and each of the hundreds of parallel regions
of a step ends at a barrier. Another busy thread (unpacking and verifying a prefix that was just fetched,
~9 ms for 9 MB here) deschedules one of them, and the whole team waits at the next barrier: measured in
process, a load every ~60 ms made batch-16 decode steps 40-70% slower, far more than the load's own CPU time.
Run between two steps instead, the same work delays one step by its own duration and no more.

The engine wraps each step in ``step()``. A worker hands its CPU-bound work to ``run(fn)``: if a step is
running, the engine thread itself runs ``fn`` as soon as that step ends, and the worker waits for the result;
if none is, the worker runs it at once and the next step waits for it. The engine running it saves each gap
two thread wake-ups, each of which also waits for the GIL while the event loop is busy sending the step's
tokens: measured in a cold burst, a 3 ms piece of a prefix load held the next step 5-10 ms when a worker ran it.

Once the engine asks for its next step, no worker starts its work itself any more (it hands it over), so a
worker that keeps coming back cannot starve the engine. Network waits must stay outside ``run``: the engine
would idle through them. ``run_held`` is for work that may wait: the worker runs it itself, started as a step
ends, and the next step waits for it at most HOLD_S (a prefix piece's fetch from a store on this machine, whose
CPU, the store's and ours, would otherwise land in a step). Work handed over as the last step ends, when the
engine then goes idle, runs on ``flush`` (the engine's idle hook), not after MAX_WAIT_S.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")

# The longest a worker waits for a gap: past it, it runs during the step. Keeps the gaps an optimisation and
# never a dependency: a step held up for long (a long prompt, or a step waiting on something the worker would
# bring) cannot hold the work up with it.
MAX_WAIT_S = 1.0
# The longest the engine waits in a gap for workers running their own work there (``run_held``).
HOLD_S = 0.01


class _Job(Generic[T]):
    """Work handed to the engine thread, and its outcome."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed back to the worker, never raised on the engine thread
            self.error = e
        finally:
            self.done.set()

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class _Held:
    """A worker waiting to run its own work in a gap (``run_held``): started by the engine, waited for a while."""

    def __init__(self) -> None:
        self.start = threading.Event()
        self.done = threading.Event()


class StepGaps:
    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._stepping = False
        self._inside = 0  # workers running their work themselves (no step was running)
        self.gaps_given = 0  # steps that waited for such work (tests read it)
        self._jobs: list[_Job[object]] = []  # handed over during the running step, run when it ends
        self.jobs_run_by_engine = 0  # (tests read it)
        self._held: list[_Held] = []  # workers waiting for a gap to run their work in (``run_held``)

    @contextmanager
    def step(self) -> Iterator[None]:
        """The engine's side: one step, started once work that workers run themselves is done."""
        with self._cond:
            self._stepping = True  # from now on work is handed over, not started by workers
            if self._inside:
                self.gaps_given += 1
                self._cond.wait_for(lambda: self._inside == 0)
        try:
            yield
        finally:
            self.flush()
            with self._cond:
                self._stepping = False

    def flush(self) -> None:
        """Run the work handed over so far: jobs here, held workers started and waited for up to HOLD_S. As each
        step ends; and as the engine goes idle (its idle hook), for work handed over while its last step ended,
        which would otherwise wait for a step that is not coming (up to MAX_WAIT_S each)."""
        self._run_jobs()
        self._hold_for_workers()

    def _hold_for_workers(self) -> None:
        """The engine's side of ``run_held``: start the waiting workers, and wait a bounded time for them."""
        with self._cond:
            held, self._held = self._held, []
        if not held:
            return
        for job in held:
            job.start.set()
        deadline = time.monotonic() + HOLD_S
        for job in held:
            job.done.wait(max(0.0, deadline - time.monotonic()))

    def _run_jobs(self) -> None:
        """The engine's side of ``run``: the work handed over during the step that just ended. Work handed over
        meanwhile waits for the next step's end: a worker that keeps coming back gets one turn per step."""
        with self._cond:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.run()
            self.jobs_run_by_engine += 1

    def run_held(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this thread, started as the running step ends; the next step waits for it up to HOLD_S.

        For work that may wait on something other than the CPU (a fetch from a store on this machine is mostly
        CPU, the store's and ours: run during a step, it deschedules the engine's threads): the engine never
        waits for it long, and past HOLD_S it goes on during the next step. With no step running it starts
        at once, and the next step does not wait for it (unlike ``run``'s work: a store that hangs would hold
        the engine for as long)."""
        with self._cond:
            if not self._stepping:
                job = None
            else:
                job = _Held()
                self._held.append(job)
        if job is None:
            return fn()
        job.start.wait(self.max_wait_s)
        with self._cond:
            if job in self._held:  # no gap came in time: go on during the step
                self._held.remove(job)
        try:
            return fn()
        finally:
            job.done.set()

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` between two steps: on the engine thread when the running step ends, or here at once while no
        step runs (the next one then waits for it). Waits at most ``max_wait_s`` for a step to end, then runs it
        here during the step. Returns what ``fn`` returns and raises what it raises."""
        with self._cond:
            if not self._stepping:
                self._inside += 1
                job = None
            else:
                job = _Job(fn)
                self._jobs.append(job)  # type: ignore[arg-type]
        if job is None:
            try:
                return fn()
            finally:
                with self._cond:
                    self._inside -= 1
                    self._cond.notify_all()
        if not job.done.wait(self.max_wait_s):
            with self._cond:
                mine = job in self._jobs  # the engine has not taken it: take it back
                if mine:
                    self._jobs.remove(job)  # type: ignore[arg-type]
            if mine:
                return fn()
            job.done.wait()
        return job.outcome()
