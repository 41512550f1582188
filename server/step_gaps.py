"""Background CPU work runs between the engine's steps, not during them (CPU serving).

On a CPU the engine's intra-op threads (OpenMP) take every core, and each of the hundreds of parallel regions
of a step ends at a barrier. Another busy thread (unpacking and verifying a prefix that was just fetched,
~9 ms for 9 MB here) deschedules one of them, and the whole team waits at the next barrier: measured in
process, a load every ~60 ms made batch-16 decode steps 40-70% slower, far more than the load's own CPU time.
Run between two steps instead, the same work delays one step by its own duration and no more.

The engine wraps each step in ``step()``; a worker wraps its CPU-bound section in ``between_steps()``, which
waits while a step runs. When a step ends, the workers then waiting are owed the gap: the next step starts once
they are done. Once the engine asks for its next step, no other worker starts, so a worker that keeps coming
back cannot starve it. While the engine is idle, workers run at once. Network waits must stay outside
``between_steps()``: the engine would idle through them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The longest a worker waits for a gap: past it, it runs during the step. Keeps the gaps an optimisation and
# never a dependency: a step held up for long (a long prompt, or a step waiting on something the worker would
# bring) cannot hold the work up with it.
MAX_WAIT_S = 1.0


class StepGaps:
    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._stepping = False
        self._waiting = 0  # workers waiting for the running step to end
        self._owed = 0  # workers that were waiting when the last step ended and have not started yet
        self._inside = 0  # workers running between steps
        self.gaps_given = 0  # steps that waited for workers (tests read it)

    @contextmanager
    def step(self) -> Iterator[None]:
        """The engine's side: one step, started once the workers owed a gap and those inside are done."""
        with self._cond:
            self._stepping = True  # from now on only workers owed a gap may start
            if self._owed or self._inside:
                self.gaps_given += 1
                self._cond.wait_for(lambda: self._owed == 0 and self._inside == 0)
        try:
            yield
        finally:
            with self._cond:
                self._stepping = False
                self._owed = self._waiting
                self._cond.notify_all()

    @contextmanager
    def between_steps(self) -> Iterator[None]:
        """A worker's side: run the block while no step runs (waits for the running step to end, at most
        ``max_wait_s``)."""
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._stepping or self._owed > 0, timeout=self.max_wait_s)
            self._waiting -= 1
            self._owed = max(0, self._owed - 1)
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()
