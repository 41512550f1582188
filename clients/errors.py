"""Typed client exceptions, one per server error ``type`` (see server/errors.py), plus connection failures."""

from __future__ import annotations

import json
from typing import Any


class PrefixServeError(Exception):
    """Anything the server (or the way to it) refused. ``status`` is None when no response came back."""

    error_type = "error"

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return self.error_type

    def __str__(self) -> str:
        return (
            f"{self.error_type}: {self.message}"
            if self.status is None
            else f"{self.status} {self.error_type}: {self.message}"
        )


class InvalidRequest(PrefixServeError):
    error_type = "invalid_request"


class InvalidPrefix(PrefixServeError):
    error_type = "invalid_prefix"


class Unauthorized(PrefixServeError):
    error_type = "unauthorized"


class NotFound(PrefixServeError):
    error_type = "not_found"


class PayloadTooLarge(PrefixServeError):
    error_type = "payload_too_large"


class Overloaded(PrefixServeError):
    error_type = "overloaded"


class Unavailable(PrefixServeError):
    error_type = "unavailable"


class GenerationFailed(PrefixServeError):
    error_type = "generation_failed"


class Forbidden(PrefixServeError):
    """A non-admin key asked to act for another tenant."""

    error_type = "forbidden"


class RequestTimeout(PrefixServeError):
    error_type = "timeout"


class QuotaExceeded(PrefixServeError):
    """A per-tenant storage quota (number of prefixes, stored bytes)."""

    error_type = "quota_exceeded"


class ConnectionFailed(PrefixServeError):
    """The server could not be reached, or the connection broke."""

    error_type = "connection_error"


_SERVER_TYPES = (
    InvalidRequest,
    InvalidPrefix,
    Unauthorized,
    NotFound,
    PayloadTooLarge,
    Overloaded,
    Unavailable,
    GenerationFailed,
    Forbidden,
    RequestTimeout,
    QuotaExceeded,
)
_BY_TYPE: dict[str, type[PrefixServeError]] = {cls.error_type: cls for cls in _SERVER_TYPES}
_BY_STATUS: dict[int, type[PrefixServeError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    408: RequestTimeout,
    409: QuotaExceeded,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: Overloaded,
    503: Unavailable,
}


def parse_error(
    status: int | None, content: bytes | str | dict[str, Any], retry_after_s: float | None = None
) -> PrefixServeError:
    """The typed exception for an error response (or an error event of a stream).

    The server's ``error.type`` picks the class; an unknown type or a non-JSON
    body (a proxy's HTML page) falls back to the status code.
    """
    body: Any = content
    if not isinstance(content, dict):
        try:
            body = json.loads(content)
        except ValueError:
            body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "(no message)")
        cls = _BY_TYPE.get(str(error.get("type")))
    else:
        text = content.decode(errors="replace") if isinstance(content, bytes) else str(content)
        message = text.strip()[:200] or "(empty response)"
        cls = None
    if cls is None:
        cls = _BY_STATUS.get(status or 0, PrefixServeError)
    return cls(message, status=status, retry_after_s=retry_after_s)
