"""uvicorn's HTTP/1.1 protocol with a deadline for a request's line and headers (slow-header clients).

uvicorn times out a connection only while it idles between two requests (its keep-alive timeout). A
connection that sends nothing after connecting, or sends a request's headers a byte at a time, stays open for
ever: a few thousand such connections ("slowloris") use up the process's file descriptors, and the server can
then neither accept a client nor open a file of its store. nginx (``client_header_timeout``, 60 s) and hyper,
under TGI's router (``header_read_timeout``, 30 s), close such a connection; this does the same.

The deadline runs from the connection's start, and from the first byte of each later request on a kept-alive
connection, to the end of that request's headers. A body that stops arriving is the app's to time out (a 408,
server/api/body_limit.py); a response being written and a generation running are under neither.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("prefix_serve")


class HeaderDeadlineProtocol(H11Protocol):
    """H11Protocol that closes a connection whose next request's headers are not in after ``header_timeout_s``."""

    header_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()
        elif self._deadline is None:  # the first bytes of a new request on a kept-alive connection
            self._arm()

    def _awaiting_headers(self) -> bool:
        """True while no request is in progress: the connection waits for (the rest of) a request's headers."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self.header_timeout_s > 0:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._awaiting_headers() and not self.transport.is_closing():
            logger.debug(
                "closing a connection from %s: no request headers within %g s", self.client, self.header_timeout_s
            )
            self.transport.close()


def header_deadline_protocol(timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn's ``http=`` setting, with this deadline in seconds (0 = none)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s})
