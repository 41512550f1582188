"""The server freezes its start-up heap out of the garbage collector's full walks (server/gc_freeze.py)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import load_model


@pytest.mark.parametrize("no_gc_freeze", [False, True], ids=["default", "no-gc-freeze"])
def test_startup_heap_is_frozen_out_of_full_walks(tiny_model_dir: Path, tmp_path: Path, no_gc_freeze: bool) -> None:
    model = load_model(str(tiny_model_dir))
    gc.unfreeze()  # what earlier tests in this process froze goes back to the collector
    gc.collect()
    walked_before = len(gc.get_objects(generation=2))
    config = ServeConfig(store=f"disk://{tmp_path / 'store'}", no_gc_freeze=no_gc_freeze)
    with TestClient(create_app(config, model=model)) as client:
        assert client.get("/health").status_code == 200
        gc.collect()
        walked = len(gc.get_objects(generation=2))  # what a full collection walks now
        if no_gc_freeze:
            assert gc.get_freeze_count() == 0 and walked >= walked_before
        else:
            # Everything alive at start-up (the modules, the model, the app) is out of the walk; serving's
            # own objects since (one health check) are few.
            assert gc.get_freeze_count() >= walked_before
            assert walked < walked_before // 20
        assert client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
    assert gc.get_freeze_count() == 0  # thawed at shutdown: the interpreter's last collection may free them
