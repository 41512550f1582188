"""The OpenAI-compatible server the OpenAI, Responses and tokenize tests talk to: the tiny model, two tenants'
keys, tenant A holding the prefix ``TASK`` (conftest.py's ``server_url`` and ``oai`` fixtures start one per test
module)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import LoadedModel
from tests.live_server import serve_in_thread, write_key_file, write_peft_checkpoint

KEY_A, KEY_B = "key-tenant-a", "key-tenant-b"
TASK = "summarize"
MAX_NEW_TOKENS = 48


@contextlib.contextmanager
def openai_server(loaded: LoadedModel, root: Path) -> Iterator[str]:
    """The tiny model served with two tenants' keys, tenant A holding the prefix ``TASK``; yields its URL."""
    keys = write_key_file(root / "keys.json", {KEY_A: "tenant-a", KEY_B: "tenant-b"})
    config = ServeConfig(
        store=f"disk://{root / 'store'}", api_keys=str(keys), max_new_tokens=MAX_NEW_TOKENS, max_prompt_tokens=200
    )
    with serve_in_thread(create_app(config, model=loaded)) as url:
        write_peft_checkpoint(loaded, root / "ckpt", num_virtual_tokens=5, seed=3)
        files = {
            name: (name, (root / "ckpt" / name).read_bytes())
            for name in ("adapter_config.json", "adapter_model.safetensors")
        }
        r = httpx.put(f"{url}/v1/prefixes/{TASK}", files=files, headers={"authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 201, r.text
        yield url
