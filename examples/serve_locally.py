"""``prefix-serve serve`` in a subprocess for the example evaluations: a throwaway store, a free port."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clients.client import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_server(model: str | None, log_path: Path) -> Iterator[str]:
    """``prefix-serve serve`` in a subprocess with a throwaway store; yields its URL."""
    port = _free_port()
    store_dir = tempfile.TemporaryDirectory(prefix="example-store-")  # removed when the server stops
    store = store_dir.name
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--store", f"disk://{store}"]
    if model:
        cmd += ["--model", model]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url, timeout_s=5) as client:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited; see {log_path}")
                try:
                    if client.health():
                        break
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start in 300 s; see {log_path}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        store_dir.cleanup()
