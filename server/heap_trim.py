"""Hand freed heap memory back to the OS after prefix uploads, loads and deletes (glibc's ``malloc_trim``).

Cached prefixes are tensors of a few hundred KB to a few MB that live long in the host cache, while the upload
and load paths free temporaries of similar sizes around them (the request body, the safetensors blob, the parsed
tensors). Once glibc's dynamic mmap threshold has risen past those sizes (it does when the first large mapped
block is freed), they all come from the heap, and the freed holes between cached tensors stay resident.
Measured with the default model's 460,800-byte prefixes: 4,000 uploads raised the server's RSS by 2,565 MiB for
1,758 MiB of cached tensors, and in process ``malloc_trim(0)`` brought the excess from ~46% to 2%.

``malloc_trim`` walks every arena under its lock and madvises the free pages away: 91 ms for a 2.6 GB heap with 870
MB free, 4 ms when little is free. So the server asks for a trim after each prefix write or load, and one thread
trims at most once per ``min_interval_s``, between engine steps (the engine's own allocations wait on the arena
locks, and the walk is CPU work on the engine's cores). While rows are decoding, a trim also waits for the engine to
go idle, up to ``max_delay_s``: traced in bursts of cold loads, trims of 3-12 ms came right before the step in 5 of
the 8 slowest inter-token gaps (the two slowest of four rounds). A fixed mmap threshold would avoid the holes
instead, but every large activation would then be mapped and faulted in afresh: prefills took 1.5-1.7x as long.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable

from prefix_store.piecewise import CpuRunner, run_here

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 1.0
MAX_DELAY_S = 10.0  # the longest a wanted trim waits for the engine to go idle
_IDLE_POLL_S = 0.05


def malloc_trim() -> Callable[[], object] | None:
    """``malloc_trim(0)`` of the process's C library, or None where there is none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


class HeapTrimmer:
    """Coalesces trim requests: after a request, one trim within ``min_interval_s``, however many requests came
    (later while the engine is busy, up to ``max_delay_s``)."""

    def __init__(
        self,
        trim: Callable[[], object] | None,
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        run: CpuRunner = run_here,
        busy: Callable[[], bool] | None = None,
        max_delay_s: float = MAX_DELAY_S,
    ) -> None:
        """``trim`` None: requests do nothing. ``run`` runs each trim (the engine's ``StepGaps.run``: between two
        steps); ``busy`` says whether rows are decoding (the trim then waits, at most ``max_delay_s``)."""
        self._trim = trim
        self.min_interval_s = min_interval_s
        self.max_delay_s = max_delay_s
        self._run_trim = run
        self._busy = busy or (lambda: False)
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.trims = 0  # trims done (tests and logs read it)
        self.trims_delayed = 0  # trims that waited for the engine to go idle (tests read it)

    @property
    def enabled(self) -> bool:
        """Whether requests trim (the C library has ``malloc_trim``)."""
        return self._trim is not None

    def request(self) -> None:
        """Ask for a trim soon; cheap enough to call after every upload (thread-safe)."""
        if not self.enabled or self._stopping.is_set():
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prefix-serve-heap-trim", daemon=True)
                self._thread.start()
        self._wanted.set()

    def close(self) -> None:
        self._stopping.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self._trim is not None
        while True:
            self._wanted.wait()
            if self._stopping.is_set():
                return
            if self._wait_for_idle():
                return
            self._wanted.clear()  # requests from now on ask for the next trim
            try:
                self._run_trim(self._trim)
                self.trims += 1
            except Exception:  # a trim is an optimisation: never let it end the thread
                log.exception("malloc_trim failed")
            if self._stopping.wait(self.min_interval_s):
                return

    def _wait_for_idle(self) -> bool:
        """Wait while the engine is busy, at most ``max_delay_s``; True when stopping."""
        if not self._busy():
            return False
        self.trims_delayed += 1
        deadline = time.monotonic() + self.max_delay_s
        while self._busy() and time.monotonic() < deadline:
            if self._stopping.wait(_IDLE_POLL_S):
                return True
        return False
