"""Per-tenant quotas and server-wide request limits, enforced around the engine and the prefix store.

Rate quotas (requests in flight, requests waiting) answer 429 with Retry-After;
storage quotas answer 409 (number of prefixes, stored bytes) or 413 (one
upload's size). Each message names the limit it hit.

The counters live on the event loop: a request takes its slot when it starts
and gives it back in ``finally``, whatever way it ends (finished, failed,
timed out, client gone). The storage check and the upload run under a
per-tenant lock, so two concurrent uploads cannot both slip under a quota
(within one replica; replicas sharing a store may each admit one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from server.errors import Overloaded, PayloadTooLarge, QuotaExceeded, RequestTimeout, Unavailable
from server.request_log import current_request

if TYPE_CHECKING:
    from prefix_store.artifact import PrefixMetadata
    from prefix_store.registry import PrefixRegistry
    from server.config import ServeConfig
    from server.engine import Engine, GenerationEvent, GenerationRequest

_T = TypeVar("_T")


@dataclass(frozen=True)
class TenantQuotas:
    """One tenant's limits; None = unlimited."""

    max_concurrent_requests: int | None = None  # HTTP generation requests in flight (waiting or running)
    max_queued_requests: int | None = None  # of those, waiting for a batch row
    max_prefixes: int | None = None  # stored tasks
    max_stored_bytes: int | None = None  # tensor bytes of the latest version of every task
    max_upload_bytes: int | None = None  # tensor bytes of one upload (the server's --max-upload-bytes caps it too)

    @property
    def limits_storage(self) -> bool:
        """Whether what the tenant stores is bounded (the number of prefixes or their bytes)."""
        return self.max_prefixes is not None or self.max_stored_bytes is not None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse_overrides(cls, raw: object, where: str) -> dict[str, int | None]:
        """The "quotas" object of a key-file entry: known names, each a non-negative integer or null."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: 'quotas' must be an object")
        out: dict[str, int | None] = {}
        for name, value in raw.items():
            if name not in cls.names():
                raise ValueError(f"{where}: unknown quota {name!r} (known: {', '.join(cls.names())})")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{where}: quota {name!r} must be a non-negative integer or null")
            if name == "max_queued_requests" and value == 0:
                # Every request waits for a row at least until the next step: 0 would refuse them all.
                raise ValueError(
                    f"{where}: quota 'max_queued_requests' 0 would refuse every request (each waits for the next "
                    "step); use null for no limit, or max_concurrent_requests: 0 to stop the tenant generating"
                )
            out[name] = value
        return out

    def with_overrides(self, overrides: Mapping[str, int | None]) -> TenantQuotas:
        return dataclasses.replace(self, **overrides) if overrides else self


class RequestGate:
    """In-flight counters per tenant, the server-wide open-stream count and the request timeout."""

    def __init__(self, *, max_open_streams: int | None = None, request_timeout_s: float | None = None) -> None:
        self.max_open_streams = max_open_streams
        self.request_timeout_s = request_timeout_s
        self.in_flight: dict[str, int] = {}
        self.open_streams = 0
        # The server is stopping and has aborted what still ran (server/drain.py): those requests end with 503.
        self.closing = False
        self._upload_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def events(
        self, engine: Engine, request: GenerationRequest, quotas: TenantQuotas, *, stream: bool, counted: bool = True
    ) -> AsyncIterator[GenerationEvent]:
        """The engine's events for ``request``, within the tenant's quotas and the server's limits.

        Raises Overloaded (429) before submitting when a limit is reached, and
        RequestTimeout (408) once the request has run past the timeout (it is
        aborted then, freeing its row). ``counted`` False: one of several generations of one HTTP request,
        which ``together`` counts once.
        """
        tenant = request.tenant
        self._refuse_if_closing()
        if counted:
            self._enter(tenant, quotas, stream)
        try:
            if counted:
                self._refuse_if_queue_full(engine, tenant, quotas)
            events = engine.generate(request)
            record = current_request.get()  # the HTTP request's log record, when served over HTTP
            if record is not None:
                record.note_generation(request)
            try:
                async for event in self._with_deadline(events):
                    if record is not None:
                        record.note_event(request, event)
                    if event.finish_reason == "cancelled" and self.closing:
                        raise Unavailable(
                            "the server is shutting down: this generation ran past its drain time "
                            "(--drain-timeout-s) and was stopped; send it again",
                            retry_after_s=1,
                        )
                    yield event
            finally:
                await events.aclose()  # type: ignore[attr-defined]  # aborts the request if it is still going
        finally:
            if counted:
                self._leave(tenant, stream)

    async def together(
        self, engine: Engine, tenant: str, quotas: TenantQuotas, events: AsyncIterator[_T], *, stream: bool
    ) -> AsyncIterator[_T]:
        """The events of one HTTP request's several generations (``n`` choices, a list of prompts), each from
        ``events(..., counted=False)``, counted as the one request they are against the tenant's quotas and the
        open-stream limit: its choices do not refuse each other, and its stream does not end with a 429 after
        its first choice's tokens."""
        self._refuse_if_closing()
        self._enter(tenant, quotas, stream)
        try:
            self._refuse_if_queue_full(engine, tenant, quotas)
            async for item in events:
                yield item
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            self._leave(tenant, stream)

    def _refuse_if_closing(self) -> None:
        """A request prepared (its prefix loaded, say) after the drain's deadline is not started."""
        if self.closing:
            raise Unavailable("the server is shutting down; send the request again", retry_after_s=1)

    async def _with_deadline(self, events: AsyncIterator[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
        timeout = self.request_timeout_s
        deadline = None if not timeout else asyncio.get_running_loop().time() + timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    event = await anext(events, None)
            except TimeoutError:
                raise RequestTimeout(
                    f"the request ran longer than the server's limit of {timeout:g} s "
                    "(request_timeout_s) and was cancelled; ask for fewer tokens",
                    # The same request would run as long again: OpenAI's SDKs retry a 408 unless told not to.
                    headers={"x-should-retry": "false"},
                ) from None
            if event is None:
                return
            yield event

    def refuse_if_full(self, tenant: str, quotas: TenantQuotas) -> None:
        """429 now if the tenant already has its quota of requests in flight: checked before a request is prepared
        (rendered, tokenized, its grammar compiled: seconds of CPU for a large one), so a tenant at its quota
        costs the server nothing more. ``events`` checks again when it takes the place."""
        running = self.in_flight.get(tenant, 0)
        if quotas.max_concurrent_requests is not None and running >= quotas.max_concurrent_requests:
            raise Overloaded(
                f"tenant {tenant!r} has {running} requests in flight; "
                f"its quota max_concurrent_requests is {quotas.max_concurrent_requests}"
            )

    @staticmethod
    def _refuse_if_queue_full(engine: Engine, tenant: str, quotas: TenantQuotas) -> None:
        waiting = engine.scheduler.waiting_for(tenant)
        if quotas.max_queued_requests is not None and waiting >= quotas.max_queued_requests:
            raise Overloaded(
                f"tenant {tenant!r} has {waiting} requests waiting; "
                f"its quota max_queued_requests is {quotas.max_queued_requests}"
            )

    def _enter(self, tenant: str, quotas: TenantQuotas, stream: bool) -> None:
        self.refuse_if_full(tenant, quotas)
        running = self.in_flight.get(tenant, 0)
        if stream and self.max_open_streams is not None and self.open_streams >= self.max_open_streams:
            raise Overloaded(f"the server has {self.open_streams} open streams; its limit max_open_streams is reached")
        self.in_flight[tenant] = running + 1
        if stream:
            self.open_streams += 1

    def _leave(self, tenant: str, stream: bool) -> None:
        left = self.in_flight[tenant] - 1
        if left:
            self.in_flight[tenant] = left
        else:
            del self.in_flight[tenant]  # the dict stays as small as the set of busy tenants
        if stream:
            self.open_streams -= 1

    def upload_lock(self, tenant: str) -> asyncio.Lock:
        """Held around a tenant's storage-quota check and upload, so the two are one step."""
        lock = self._upload_locks.get(tenant)
        if lock is None:
            lock = self._upload_locks[tenant] = asyncio.Lock()
        return lock


def upload_within_quotas(
    registry: PrefixRegistry, tenant: str, task_id: str, key_values: torch.Tensor, quotas: TenantQuotas
) -> PrefixMetadata:
    """Store ``key_values`` [L, 2, H_kv, P, d] as the task's next version if the tenant's storage quotas allow
    (blocks). With a quota on what is stored, the check and the write hold the store's tenant lock, so replicas
    sharing the store cannot each find room for the same last prefix."""
    nbytes = key_values.numel() * key_values.element_size() if isinstance(key_values, torch.Tensor) else 0
    with registry.backend.tenant_lock(tenant) if quotas.limits_storage else contextlib.nullcontext():
        check_storage(registry, tenant, task_id, nbytes, quotas)
        return registry.upload(tenant, task_id, key_values)


def check_storage(registry: PrefixRegistry, tenant: str, task_id: str, nbytes: int, quotas: TenantQuotas) -> None:
    """Raise if storing ``nbytes`` of tensors as ``task_id``'s next version would break a storage quota (blocks)."""
    if quotas.max_upload_bytes is not None and nbytes > quotas.max_upload_bytes:
        raise PayloadTooLarge(
            f"prefix has {nbytes} bytes of tensors; the tenant's quota max_upload_bytes is {quotas.max_upload_bytes}"
        )
    if not quotas.limits_storage:
        return
    metas = registry.list(tenant)
    others = [m for m in metas if m.task_id != task_id]
    if quotas.max_prefixes is not None and len(others) == len(metas) and len(metas) >= quotas.max_prefixes:
        raise QuotaExceeded(
            f"the tenant has {len(metas)} prefixes; its quota max_prefixes is {quotas.max_prefixes}: delete one first"
        )
    stored = sum(m.nbytes for m in others)
    if quotas.max_stored_bytes is not None and stored + nbytes > quotas.max_stored_bytes:
        raise QuotaExceeded(
            f"storing {nbytes} bytes beside the tenant's other {stored} would pass its quota "
            f"max_stored_bytes of {quotas.max_stored_bytes}"
        )


def default_quotas(config: ServeConfig) -> TenantQuotas:
    """The server-wide defaults from the ``tenant_max_*`` settings (0 = unlimited)."""
    return TenantQuotas(**{name: getattr(config, f"tenant_{name}") or None for name in TenantQuotas.names()})
