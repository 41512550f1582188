"""The server's error taxonomy: one exception type per HTTP outcome, one JSON shape.

Every error leaves the server as ``{"error": {"type": ..., "message": ...}}``.
The client's exceptions (clients/errors.py) mirror the ``type`` strings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from prefix_store import errors as store_errors

T = TypeVar("T")


class ApiError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        error = {"type": self.error_type, "message": self.message}
        param = getattr(self, "param", None)
        if param is not None:  # the field at fault, where one is
            error["param"] = param
        return {"error": error}


class BadRequest(ApiError):
    status_code = 400
    error_type = "invalid_request"


class InvalidInput(ApiError):
    """Valid JSON, a bad value. ``param``: the request field at fault, by its native name (``prompt``,
    ``max_new_tokens``, ``stop``, ``logit_bias``, ``grammar``...), which the OpenAI routes translate to theirs."""

    status_code = 422
    error_type = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class ContextLengthExceeded(InvalidInput):
    """Prefix, prompt and the tokens asked for do not fit in the model's context. Refused, as OpenAI and vLLM do,
    rather than cut short where the context ends."""

    def __init__(self, *, context: int, prompt_tokens: int, prefix_tokens: int, new_tokens: int) -> None:
        needed = prompt_tokens + prefix_tokens + new_tokens
        super().__init__(
            f"this model's context is {context} tokens; the request needs {needed}: {prompt_tokens} in the prompt, "
            f"{prefix_tokens} in the task's prefix and {new_tokens} to generate. Shorten the prompt or ask for "
            "fewer tokens",
            param="max_new_tokens" if prompt_tokens + prefix_tokens < context else "prompt",
            code="context_length_exceeded",
        )
        self.room = max(0, context - prompt_tokens - prefix_tokens)


class InvalidPrefixError(ApiError):
    status_code = 422
    error_type = "invalid_prefix"


class Unauthorized(ApiError):
    status_code = 401
    error_type = "unauthorized"


class Forbidden(ApiError):
    """The key is valid but may not do this (a tenant key naming another tenant). Never for another's task: 404."""

    status_code = 403
    error_type = "forbidden"


class NotFound(ApiError):
    status_code = 404
    error_type = "not_found"


class RequestTimeout(ApiError):
    """The request ran past the server's --request-timeout-s and was cancelled."""

    status_code = 408
    error_type = "timeout"


class QuotaExceeded(ApiError):
    """A tenant's storage quota (number of prefixes, stored bytes) would be exceeded."""

    status_code = 409
    error_type = "quota_exceeded"


class PayloadTooLarge(ApiError):
    status_code = 413
    error_type = "payload_too_large"


class Overloaded(ApiError):
    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Unavailable(ApiError):
    status_code = 503
    error_type = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class GenerationFailed(ApiError):
    status_code = 500
    error_type = "generation_failed"


def from_store_error(exc: store_errors.PrefixStoreError) -> ApiError:
    """Map a prefix-store failure to its HTTP outcome."""
    message = str(exc)
    if isinstance(exc, store_errors.PrefixNotFound):
        return NotFound(message)
    if isinstance(exc, store_errors.InvalidTaskId):
        return InvalidInput(message, param=exc.field)
    if isinstance(exc, store_errors.InvalidPrefix):
        return InvalidPrefixError(message)
    if isinstance(exc, store_errors.PrefixTooLarge):
        return PayloadTooLarge(message)
    if isinstance(exc, store_errors.CorruptPrefix | store_errors.StoreUnavailable):
        return Unavailable(message, retry_after_s=2)
    return ApiError(message)


async def store_work(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking store work (a Redis round trip, a file read) off the event loop, its store errors turned into
    API errors."""
    try:
        return await asyncio.to_thread(fn, *args)
    except store_errors.PrefixStoreError as exc:
        raise from_store_error(exc) from exc
