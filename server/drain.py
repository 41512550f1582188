"""Draining a server before it stops (SIGTERM, server/cli.py): in-flight generations may finish, up to a deadline.

Until the deadline the server still answers (503 to new requests and to /health: ``ServerState.draining``), so a
load balancer or a readiness probe moves traffic away while running streams end as they would. Generations still
running at the deadline are aborted in the engine and end with a 503 (``RequestGate.closing``; streamed: a last
error event), so that no response is cut off mid-body when the server stops.
"""

from __future__ import annotations

import asyncio

from server.api.state import ServerState

# After the deadline, how long aborted generations get to send their last event.
ABORT_GRACE_S = 2.0
POLL_S = 0.05


async def drain_generations(state: ServerState, timeout_s: float) -> None:
    """Return once no generation is in flight: at once when none is, else when the last ends, or when those still
    running at ``timeout_s`` have been stopped."""
    loop = asyncio.get_running_loop()
    if await _until_idle(state, loop.time() + timeout_s):
        return
    # Requests still being prepared meet the closed gate: a 503 (retry elsewhere), never a start of work.
    state.gate.closing = True
    state.engine.abort_all()
    await _until_idle(state, loop.time() + ABORT_GRACE_S)


def _busy(state: ServerState) -> bool:
    """Generations in flight, or being prepared (a cold prefix loading, a constraint compiling)."""
    return bool(state.gate.in_flight) or state.preparing > 0


async def _until_idle(state: ServerState, deadline: float) -> bool:
    """Whether the server went idle before ``deadline``. Idle must be seen twice, a poll apart: a prepared stream
    passes from ``preparing`` to the gate's count across a few event-loop turns (its response headers are sent
    between), and one look could fall between the two."""
    loop = asyncio.get_running_loop()
    idle_seen = False
    while loop.time() < deadline:
        if _busy(state):
            idle_seen = False
        elif idle_seen:
            return True
        else:
            idle_seen = True
        await asyncio.sleep(POLL_S)
    return not _busy(state)
