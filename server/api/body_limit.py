"""ASGI middleware bounding request bodies: 413 before the body is read, whatever the route, and 408 for a body that
stops coming (a client holding connections open with bodies it never finishes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, PayloadTooLarge, RequestTimeout

# A request body must keep arriving: each piece within BODY_IDLE_S of the last, all of it within BODY_TOTAL_S (a
# 64 MiB upload at 1 MB/s takes a minute).
BODY_IDLE_S = 30.0
BODY_TOTAL_S = 300.0


class BodyLimitMiddleware:
    """Refuse bodies over a limit: at once when Content-Length says so, else when the stream passes it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        default_limit: int,
        upload_limit: int,
        upload_prefix: str,
        error_body: Callable[[str, ApiError], dict[str, Any]] = lambda _path, error: error.body(),
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_prefix = upload_prefix
        self.error_body = error_body  # (path, error) -> the body of its response: each API's error shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "PUT" and scope["path"].startswith(self.upload_prefix)
        limit = self.upload_limit if is_upload else self.default_limit
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, scope, too_large)
            return
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # Chunked: read it here, up to the limit, and hand it on whole. Raised from inside the app's own read,
            # the 413 would reach the client as the framework's 400 "error parsing the body".
            try:
                body = await _read_within(_timed(receive), limit)
            except ClientDisconnect:  # as the app answers one (server/api/app.py): no one reads it, 499 is logged
                await send({"type": "http.response.start", "status": 499, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            except StarletteHTTPException as exc:  # the body stopped coming
                await self._refuse(send, scope, RequestTimeout(str(exc.detail)))
                return
            if body is None:
                await self._refuse(send, scope, too_large)
                return
            await self.app(scope, _replay(body, receive), send)
            return
        received = 0
        timed_receive = _timed(receive)

        async def limited_receive() -> Message:
            nonlocal received
            message = await timed_receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send, scope: Scope, error: ApiError) -> None:
        payload = json.dumps(self.error_body(scope["path"], error)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _read_within(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (what is left of it is not read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _timed(receive: Receive) -> Receive:
    """``receive``, giving up on a body whose next piece takes over BODY_IDLE_S or whose whole takes over
    BODY_TOTAL_S: an HTTP 408, which the framework passes through (any other error in its own read of the body
    reaches the client as a 400 "error parsing the body"). Once the body is in, waits are the app's (a stream
    listens for the client leaving for as long as it runs)."""
    deadline = asyncio.get_running_loop().time() + BODY_TOTAL_S
    body_done = False

    async def timed() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + BODY_IDLE_S)):
                message = await receive()
        except TimeoutError:
            wait = f"over {BODY_IDLE_S:g} s for a piece or {BODY_TOTAL_S:g} s in all"
            raise StarletteHTTPException(408, f"the request body stopped arriving ({wait})") from None
        body_done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return timed


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives ``body`` in one message, then what the connection says next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
