"""Blocking calls run on the I/O executor, at most a few per tenant at once.

Prefix lookups and grammar compiles run on the event loop's executor (server/threads.py: ``IO_THREADS``), and a
cold lookup holds its thread while it waits for a load slot and loads (a compile, for a compile slot and its
compile). Without a cap, one tenant's burst of 200 cold prefixes (or of 36 schemas that each compile for a
minute) took every thread, and other tenants' lookups (of prefixes already resident too), compiles and
tokenizing queued behind the whole burst in the executor. Here a tenant's calls beyond its share wait on the
event loop, holding no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import TypeVar

from server.threads import IO_THREADS

T = TypeVar("T")

# A tenant's calls on the executor at once: a quarter of its threads, so three other tenants (and the
# tokenizing and parsing that share the executor) always find one free.
DEFAULT_PER_TENANT = IO_THREADS // 4


class TenantThreads:
    def __init__(self, per_tenant: int = DEFAULT_PER_TENANT) -> None:
        self.per_tenant = per_tenant
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}  # calls holding or awaiting each tenant's semaphore (to drop idle ones)

    async def run(self, tenant: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the loop's default executor, once fewer than ``per_tenant`` of the tenant's calls run.

        The slot is held until ``fn`` returns, even if the caller is cancelled first (a client that hung up):
        the call still runs, so it still counts.
        """
        loop = asyncio.get_running_loop()
        slots = self._slots.get(tenant)
        if slots is None:
            slots = self._slots[tenant] = asyncio.Semaphore(self.per_tenant)
        self._users[tenant] = self._users.get(tenant, 0) + 1
        try:
            await slots.acquire()
        except BaseException:
            self._leave(tenant)
            raise

        def release() -> None:
            slots.release()
            self._leave(tenant)

        def call() -> T:
            try:
                return fn(*args)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody is left waiting
                    loop.call_soon_threadsafe(release)

        context = contextvars.copy_context()  # as asyncio.to_thread does: request-scoped state goes along
        try:
            future = loop.run_in_executor(None, functools.partial(context.run, call))
        except BaseException:  # the executor is shut down (the server is stopping): nothing will run
            release()
            raise
        # Shielded: a caller cancelled while the call is still queued for a thread must not cancel it, or the
        # slot would never be released. Its outcome is then retrieved here, so an error is not logged as lost.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(future)

    def _leave(self, tenant: str) -> None:
        self._users[tenant] -= 1
        if not self._users[tenant]:
            del self._users[tenant]
            del self._slots[tenant]
