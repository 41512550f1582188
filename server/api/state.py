"""What the routes share: the loaded model, the engine, the prefix registry, the key ring, the limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from prefix_store.registry import PrefixRegistry
from server.api.auth import KeyRing, Principal
from server.config import ServeConfig
from server.engine import Engine
from server.errors import Unavailable
from server.model_loading import LoadedModel


@dataclass
class ServerState:
    config: ServeConfig
    model: LoadedModel
    engine: Engine
    registry: PrefixRegistry
    keys: KeyRing
    store_description: str
    ready: bool = True


def get_state(request: Request) -> ServerState:
    state: ServerState | None = getattr(request.app.state, "server", None)
    if state is None or not state.ready:
        raise Unavailable("the server is not ready")
    return state


def get_principal(request: Request) -> Principal:
    return get_state(request).keys.authenticate(request.headers.get("authorization"))


State = Annotated[ServerState, Depends(get_state)]
Caller = Annotated[Principal, Depends(get_principal)]
