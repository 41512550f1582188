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


def lone_surrogate_at(document: Any) -> tuple[str | int, ...] | None:
    """Where in a decoded JSON document a string (or an object's key) holds a lone surrogate, or None.

    Walked with a stack of its own, not by recursion: a document nested as deep as the JSON decoder allows would
    otherwise exhaust Python's recursion limit here (a 500)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            if any(_SURROGATE.search(key) for key in value):
                return path
            stack.extend((item, (*path, key)) for key, item in reversed(list(value.items())))
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
    except (ValueError, RecursionError):
        return  # not JSON at all, or nested past the decoder's limit: the route's own parsing says so
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
