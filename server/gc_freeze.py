"""The start-up heap out of the cyclic garbage collector's reach.

A loaded server holds ~470,000 objects that Python's cyclic collector tracks (torch, transformers, the model's
modules, the tokenizer, the app), and nearly all of them live until exit. A full (generation 2) collection walks
every one of them while it holds the GIL, so the engine thread's next step waits for it: 274 ms in process with the
default model on the 2-core CI machine, 334 ms measured inside a serving process during a cold burst (every
stream's next token that late). Serving makes few long-lived objects, so such collections are rare, but each
one stalls every stream.

``gc.freeze()`` (Python 3.7+, as vLLM does after start-up) moves every object alive at that moment to a
permanent generation that collections skip: a full collection then walks only what serving created since. The
start-up garbage is collected first, since frozen objects are never collected. At shutdown the heap is thawed:
left frozen, objects that only the interpreter's last collection would free stay alive at exit, and nanobind
(Triton's bindings) then prints leak reports to stderr.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now; returns how many objects the collector no longer walks."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    took_ms = (time.perf_counter() - start) * 1e3
    log.info("froze %d start-up objects out of the garbage collector's walks (%.0f ms)", frozen, took_ms)
    return frozen


@contextmanager
def frozen_heap() -> Iterator[int]:
    """The heap frozen for the duration (the server while it serves, benchmark clients while they time); yields
    the frozen count."""
    frozen = freeze_startup_heap()
    try:
        yield frozen
    finally:
        gc.unfreeze()  # the frozen objects go back to the collector
