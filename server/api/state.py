"""What the routes share: the loaded model, the engine, the prefix registry, the key ring, the limits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prefix_store.registry import PrefixRegistry
from server.api.auth import TENANT_HEADER, KeyRing, Principal, acting_for
from server.api.response_store import MemoryResponseStore, ResponseStore
from server.config import ServeConfig
from server.engine import Engine
from server.errors import Unavailable
from server.heap_trim import HeapTrimmer
from server.model_loading import LoadedModel
from server.quotas import RequestGate, TenantQuotas, default_quotas
from server.request_log import current_request
from server.structured_output import GrammarCompiler
from server.tenant_threads import TenantThreads


@dataclass
class ServerState:
    config: ServeConfig
    model: LoadedModel
    engine: Engine
    registry: PrefixRegistry
    keys: KeyRing
    store_description: str
    ready: bool = True
    draining: bool = False  # SIGTERM received: new requests get 503 while in-flight ones finish
    gate: RequestGate = field(default_factory=RequestGate)
    # Gives the heap's freed pages back after prefix uploads, loads and deletes (server/heap_trim.py).
    heap_trimmer: HeapTrimmer = field(default_factory=lambda: HeapTrimmer(None))
    # Compiles structured-output constraints against the model's vocabulary; None when the model has no tokenizer.
    grammars: GrammarCompiler | None = None
    started_at: int = field(default_factory=lambda: int(time.time()))  # the base model's "created" in /v1/models
    # The Responses API's stored responses: in Redis with a Redis store, else in memory (response_store.py).
    responses: ResponseStore = field(default_factory=MemoryResponseStore)
    # Generation requests waiting for their prefix (a cold one loads from the store first): queued as much as
    # those waiting for a row, so prefix_serve_queue_depth (which the autoscaler reads) counts them too.
    awaiting_prefix: int = 0
    # Generation requests being prepared (tokenized, constrained, their prefix looked up) before the gate counts
    # them in flight: a drain waits for these too (server/drain.py).
    preparing: int = 0
    # Prefix lookups that may wait on the store, and grammar compiles, run on the I/O threads a few per tenant at
    # once: one tenant's burst of cold loads or slow schemas does not take every thread (server/tenant_threads.py).
    tenant_threads: TenantThreads = field(default_factory=TenantThreads)

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names the base model answers to on the OpenAI routes (``--served-model-name``), the first listed."""
        names = [n.strip() for n in (self.config.served_model_name or "").split(",") if n.strip()]
        return tuple(names) or (self.model.name,)

    def quotas_for(self, tenant: str) -> TenantQuotas:
        return default_quotas(self.config).with_overrides(self.keys.quota_overrides(tenant))


def get_state(request: Request) -> ServerState:
    state: ServerState | None = getattr(request.app.state, "server", None)
    if state is not None and state.draining:
        raise Unavailable("the server is shutting down", retry_after_s=5)
    if state is None or not state.ready:
        raise Unavailable("the server is not ready")
    return state


# Only documents the scheme in the OpenAPI schema; KeyRing.authenticate reads and checks the header.
_bearer = HTTPBearer(auto_error=False, description="an API key from the server's --api-keys file")


def get_principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    tenant: Annotated[
        str | None,
        Header(
            alias=TENANT_HEADER,
            description="admin keys only: act for this tenant (its prefixes, quotas and fair share)",
        ),
    ] = None,
) -> Principal:
    principal = acting_for(get_state(request).keys.authenticate(request.headers.get("authorization")), tenant)
    if (record := current_request.get()) is not None:  # for the request's log line
        record.tenant = principal.tenant
    return principal


State = Annotated[ServerState, Depends(get_state)]
Caller = Annotated[Principal, Depends(get_principal)]
