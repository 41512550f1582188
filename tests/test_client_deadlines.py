"""Slow-header clients cannot hold connections for ever (--header-timeout-s): `prefix-serve serve`, raw sockets.

A connection that sends nothing, or sends a request's headers and stops before their end, is closed once the
deadline passes; a kept-alive connection idle for longer than it, and a body that comes slowly (the app's own
deadlines govern bodies: server/api/body_limit.py), are served as usual.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.server_process import ServerProcess, running_server

DEADLINE_S = 1.0
# How long a test waits for the server to close a connection it should close: the deadline and a wide margin
# for a loaded machine, still far below "never".
CLOSE_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("client-deadlines")
    args = ["--model", str(tiny_model_dir), "--store", f"disk://{tmp / 'store'}"]
    args += ["--header-timeout-s", str(DEADLINE_S)]
    with running_server(args, tmp / "server.log") as proc:
        yield proc


@contextmanager
def connection(server: ServerProcess) -> Iterator[socket.socket]:
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=CLOSE_WITHIN_S)
    try:
        yield sock
    finally:
        sock.close()


def closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping anything it sends first)."""
    start = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {CLOSE_WITHIN_S} s")
    return time.monotonic() - start


def response(sock: socket.socket) -> tuple[int, bytes]:
    """Read one response with a Content-Length body: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), body


def request_head(method: str, path: str, length: int | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if length is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
    return (head + "\r\n").encode()


def test_connections_without_complete_headers_are_closed_at_the_deadline(server: ServerProcess) -> None:
    with ExitStack() as stack:
        silent = stack.enter_context(connection(server))  # connects, sends nothing
        half_headers = stack.enter_context(connection(server))
        half_headers.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")  # no blank line: headers never end
        # After a served request, the next one's headers stall: its deadline runs from its first byte.
        second = stack.enter_context(connection(server))
        second.sendall(request_head("GET", "/health"))
        assert response(second)[0] == 200
        second.sendall(b"GET /health HTTP/1.1\r\n")
        # Each is closed, not long before the deadline (the clock started as they connected, just above).
        waited = [closed_after(sock) for sock in (silent, half_headers, second)]
    assert waited[0] >= DEADLINE_S * 0.5, waited

    # The server is still serving, and wrote no traceback for the connections it closed.
    with connection(server) as sock:
        sock.sendall(request_head("GET", "/health"))
        assert response(sock)[0] == 200
    assert "Traceback" not in server.log()


def test_a_kept_alive_connection_may_idle_past_the_deadline(server: ServerProcess) -> None:
    with connection(server) as sock:
        sock.sendall(request_head("GET", "/health"))
        assert response(sock)[0] == 200
        time.sleep(DEADLINE_S * 2.5)  # idle between requests: the keep-alive timeout (75 s) governs that
        sock.sendall(request_head("GET", "/health"))
        assert response(sock)[0] == 200


def test_a_slow_body_that_keeps_coming_is_served(server: ServerProcess) -> None:
    body = json.dumps({"prompt": "hello there", "max_new_tokens": 2, "ignore_eos": True}).encode()
    with connection(server) as sock:
        sock.sendall(request_head("POST", "/v1/generate", len(body)))
        start = time.monotonic()
        for i in range(0, len(body), 6):  # a few bytes every 0.4 s: the whole body takes several deadlines
            time.sleep(DEADLINE_S * 0.4)
            sock.sendall(body[i : i + 6])
        assert time.monotonic() - start > DEADLINE_S * 2
        status, reply = response(sock)
    assert status == 200, reply
    assert json.loads(reply)["usage"]["completion_tokens"] == 2
