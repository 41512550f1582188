"""Torch's intra-op threads belong to the engine; every other thread that touches tensors runs torch on one.

torch's CPU ops parallelise with OpenMP, and libgomp (the runtime torch ships) keeps a pool of worker threads
*per thread that ever ran a parallel region*, for as long as that thread lives. It counts the workers of all
pools together, and once they outnumber the CPUs it cuts every barrier's spin-wait from ~300,000 spins to
~100 and puts threads to sleep on a futex instead: each of the hundreds of parallel regions of a decode step
then pays a sleep and a wake-up. The idle pool of the thread that loaded the model, beside the engine
thread's, is enough: a CPU decode step was ~20% slower on the engine thread than on the loading thread.

So: the thread that loads the model, and the one that starts the engine, free their pools
(``release_openmp_pool``); I/O threads, which parse and check prefixes of a few MB, run torch single-threaded
and never build one (``io_executor``); the engine thread pins its own intra-op count.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import torch

# The intra-op threads the engine uses: torch's count when this module is first imported, before any I/O thread
# has made the process-wide value 1 (torch.set_num_threads or OMP_NUM_THREADS set it at startup, as usual).
ENGINE_TORCH_THREADS = torch.get_num_threads()


def pin_torch_threads(count: int) -> None:
    """Give the calling thread ``count`` intra-op threads (other threads keep their own setting)."""
    # torch gives a thread its count lazily, from the process-wide value, on the thread's first parallel op;
    # asking first settles that, so the setting below is not overwritten later.
    torch.get_num_threads()
    torch.set_num_threads(count)


def use_one_torch_thread() -> None:
    """Make torch's ops on the calling thread single-threaded: the I/O executor's initializer."""
    pin_torch_threads(1)


# Threads of the I/O executor. Most of them wait (on the store, or for a load slot: prefix_store/registry.py
# runs one backend load at a time by default), so there are more than cores: cold loads queued behind one
# another must not leave a resident prefix's lookup waiting for a thread.
IO_THREADS = 32


def io_executor() -> ThreadPoolExecutor:
    """The event loop's executor for blocking store and parsing work."""
    return ThreadPoolExecutor(
        max_workers=IO_THREADS,
        thread_name_prefix="prefix-serve-io",
        initializer=use_one_torch_thread,
    )


def release_openmp_pool() -> None:
    """Free the calling thread's idle OpenMP worker threads (libgomp or LLVM's runtime; a no-op elsewhere).

    ``omp_pause_resource_all`` (OpenMP 5.0) frees this thread's pool; a later parallel op on the thread would
    build a new one, so call it when the thread is done with torch's intra-op work.
    """
    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:  # no /proc: not Linux, nothing to do
        return
    for path in sorted(libraries):
        if os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")):
            with contextlib.suppress(OSError, AttributeError):  # AttributeError: older than OpenMP 5.0
                ctypes.CDLL(path).omp_pause_resource_all(1)  # omp_pause_soft
