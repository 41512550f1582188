"""`prefix-serve serve` as a real process on a free loopback port, for end-to-end and replica tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.redis_server import free_port


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def console_script() -> str:
    """The installed `prefix-serve` script: next to this interpreter (a venv's bin/) or on PATH."""
    script = Path(sys.executable).with_name("prefix-serve")
    found = str(script) if script.exists() else shutil.which("prefix-serve")
    assert found, "the prefix-serve console script is not installed (pip install -e .)"
    return found


@contextmanager
def running_server(
    args: list[str], log_path: Path, *, env: dict[str, str] | None = None, startup_timeout_s: float = 240
) -> Iterator[ServerProcess]:
    """Start `prefix-serve serve ARGS --port N`, wait for /health, stop it with SIGINT afterwards."""
    port = free_port()
    cmd = [console_script(), "serve", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
