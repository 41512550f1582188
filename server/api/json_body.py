"""JSON request bodies whose strings are text.

JSON may escape a UTF-16 surrogate alone (``"\\ud800"``); Python's decoder takes it into a ``str`` that no
encoder will turn into UTF-8, so the tokenizer, a stop string's matcher or the response's own encoding failed
with a 500 wherever such a string went. A lone surrogate is refused up front instead, by field (RFC 7493, I-JSON,
forbids them; a proper pair, as ``json.dumps`` escapes an emoji, is one character and welcome).
"""

from __future__ import annotations

import email.message
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

# A surrogate can only reach a decoded string through an escape like this in the raw body (UTF-8 cannot encode
# one): bodies without it, nearly all, are not walked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where in a decoded JSON document a string (or an object's key) holds a lone surrogate, or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, list):
        items: Any = enumerate(value)
    elif isinstance(value, dict):
        for key in value:
            if _SURROGATE.search(key):
                return path
        items = value.items()
    else:
        return None
    for key, item in items:
        found = lone_surrogate_at(item, (*path, key))
        if found is not None:
            return found
    return None


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type")
    if not content_type:
        return True  # FastAPI reads a body without a content type as JSON
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


async def check_text(request: Request) -> None:
    """Raise a RequestValidationError naming the first field whose string is not text. The body read here is the
    one the route then parses (Starlette keeps it on the request)."""
    if request.method not in ("POST", "PUT", "PATCH") or not _is_json(request):
        return
    body = await request.body()
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        document = await request.json()
    except ValueError:
        return  # not JSON at all: the route's own parsing says so
    where = lone_surrogate_at(document)
    if where is not None:
        raise RequestValidationError(
            [
                {
                    "type": "string_unicode",
                    "loc": ("body", *where),
                    "msg": "holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not text",
                    "input": None,
                }
            ]
        )


class TextJSONRoute(APIRoute):
    """A route that refuses JSON bodies whose strings are not text before they are parsed into its model."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            await check_text(request)
            return await handler(request)

        return checked
