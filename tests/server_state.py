"""A server's state (engine, store, trimmer) built around a model without the app, and torn down after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.api.app import build_state
from server.api.state import ServerState
from server.config import ServeConfig
from server.model_loading import load_model


@contextmanager
def built_state(config: ServeConfig, model_dir: Path) -> Iterator[ServerState]:
    """``build_state`` on the model in ``model_dir``; what the app's lifespan closes at shutdown, closed after."""
    state = build_state(config, load_model(str(model_dir)))
    try:
        yield state
    finally:
        state.engine.shutdown()
        state.registry.backend.close()
        state.heap_trimmer.close()
