"""A real server on a loopback port for tests that talk HTTP over the wire (clients, the openai package)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from safetensors.torch import save_file

from server.model_loading import LoadedModel
from tests.tiny_models import peft_prefix_model, prefix_kv_of


@contextmanager
def serve_in_thread(app: FastAPI, *, startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` under uvicorn (lifespan included) in a background thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def write_key_file(path: Path, keys: dict[str, str]) -> Path:
    """An --api-keys file: {key: tenant}."""
    path.write_text(json.dumps([{"tenant": tenant, "key": key} for key, tenant in keys.items()]))
    return path


def write_peft_checkpoint(loaded: LoadedModel, out: Path, *, num_virtual_tokens: int, seed: int):
    """A PEFT prefix-tuning checkpoint written by PEFT's save_pretrained; returns the PEFT model (the oracle)."""
    import copy

    peft = peft_prefix_model(copy.deepcopy(loaded.model), num_virtual_tokens=num_virtual_tokens, seed=seed)
    peft.save_pretrained(out)
    return peft


def write_native_prefix(peft_model, path: Path) -> Path:
    """The same prefix as a native .safetensors file: layers.{l}.key / .value, each [H_kv, P, d]."""
    kv = prefix_kv_of(peft_model)  # [L, 2, H_kv, P, d]
    tensors = {}
    for layer in range(kv.shape[0]):
        tensors[f"layers.{layer}.key"] = kv[layer, 0].contiguous()
        tensors[f"layers.{layer}.value"] = kv[layer, 1].contiguous()
    save_file(tensors, str(path))
    return path
