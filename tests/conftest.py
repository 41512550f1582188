"""Shared fixtures: an offline environment, a tiny model directory with the default model's tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# Without a GPU, Triton kernels (server/decode_attention.py's) run in Triton's interpreter. Set before anything
# imports triton (torch.compile may): its own jit'd helpers are made for the mode in force at their import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.redis_server import RedisClusterServers, RedisServer, TlsFiles

if TYPE_CHECKING:
    import openai

    from server.model_loading import LoadedModel

SMOL_VOCAB = 49152


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Starts real redis-server processes on free loopback ports (``RedisServer``'s options), each in a directory
    of its own; all are stopped after the test."""
    servers: list[RedisServer] = []

    def make(**kwargs: object) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", **kwargs)  # type: ignore[arg-type]
        server.workdir.mkdir()
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """A test CA's certificate, a server certificate for 127.0.0.1 it signed, and a client certificate."""
    directory = tmp_path / "tls"
    directory.mkdir()
    return TlsFiles.make(directory)


@pytest.fixture
def make_redis_cluster(make_redis_server: Callable[..., RedisServer]) -> Callable[..., RedisClusterServers]:
    """Starts and forms a Redis Cluster of `nodes` real redis-server primaries (stopped after the test); with
    `replicas`, one replica each too, and a failed node replaced after 1 s (its node timeout) instead of 5; with
    `tls`, every node, and the cluster bus, speaks only TLS."""

    def make(
        nodes: int = 3,
        persistent: bool = False,
        replicas: bool = False,
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> RedisClusterServers:
        def node() -> RedisServer:
            timeout_ms = 1000 if replicas else 5000
            return make_redis_server(
                cluster=True, persistent=persistent, node_timeout_ms=timeout_ms, password=password, tls=tls
            )

        primaries = [node() for _ in range(nodes)]
        cluster = RedisClusterServers(primaries, [node() for _ in range(nodes)] if replicas else None)
        cluster.form()
        return cluster

    return make


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model's tokenizer and chat template (as the server loads it: with SmolLM2's
    pre-tokenizer, server/gguf_files.py), saved as a plain HF tokenizer once."""
    from server.model_loading import load_tokenizer

    tokenizer = load_tokenizer(None)
    out = tmp_path_factory.mktemp("smol-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smol_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GQA Llama with the real SmolLM2 tokenizer, saved as a local HF model directory."""
    from transformers import AutoTokenizer

    from tests.tiny_models import tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(seed=7, vocab_size=SMOL_VOCAB)
    model.config.eos_token_id = 2  # <|im_end|> in the SmolLM2 vocabulary
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smol_tokenizer_dir).save_pretrained(out)
    torch.manual_seed(0)
    return out


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (SmolLM2-135M-Instruct), loaded once, fp32 on CPU."""
    from server.model_loading import load_model

    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """`prefix-serve serve` run in-process configures root logging for a server process; undo it per test."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# The OpenAI-compatible server of the OpenAI, Responses and tokenize tests (tests/openai_server.py), one per test
# module that asks for it; modules with fixtures of these names of their own keep theirs.


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    from server.model_loading import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def server_url(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.openai_server import openai_server

    with openai_server(loaded, tmp_path_factory.mktemp("openai-server")) as url:
        yield url


@pytest.fixture(scope="module")
def oai(server_url: str) -> Iterator[openai.OpenAI]:
    import openai

    from tests.openai_server import KEY_A

    with openai.OpenAI(base_url=f"{server_url}/v1", api_key=KEY_A, max_retries=0, timeout=60) as client:
        yield client
