"""Request-validation errors (pydantic's, raised by FastAPI) said the way a client can act on: which field, what
is wrong with it, in a sentence. Shared by the native routes and the OpenAI ones, which wrap the same words in
their own error shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError

# pydantic starts the message of a ValueError raised in a validator with this; the rest is ours.
_VALUE_ERROR = "Value error, "


@dataclass(frozen=True)
class ValidationProblem:
    message: str
    param: str | None  # the first field at fault (dotted path), None for the body as a whole
    json_invalid: bool  # the body is not JSON at all (a 400 everywhere, not a 422)


def describe(exc: RequestValidationError) -> ValidationProblem:
    errors: list[dict[str, Any]] = list(exc.errors())
    broken = next((err for err in errors if err.get("type") == "json_invalid"), None)
    if broken is not None:
        reason = (broken.get("ctx") or {}).get("error", "JSON decode error")
        position = [p for p in broken.get("loc", ()) if p != "body"]
        where = f" at character {position[0]}" if position else ""
        return ValidationProblem(f"the request body is not valid JSON: {reason}{where}", None, True)
    whole = next((err for err in errors if tuple(err.get("loc", ())) == ("body",)), None)
    if whole is not None and whole.get("type") in _NOT_AN_OBJECT:
        if isinstance(getattr(exc, "body", None), bytes):  # not read as JSON: its Content-Type said otherwise
            message = (
                "the request body must be JSON, sent with Content-Type: application/json "
                "(curl: add -H 'Content-Type: application/json')"
            )
        else:
            message = "the request body must be a JSON object"
        return ValidationProblem(message, None, True)
    problems, params = [], []
    for err in errors:
        where = ".".join(str(p) for p in _field_path(err.get("loc", ())))
        message = str(err.get("msg", "invalid value")).removeprefix(_VALUE_ERROR)
        params.append(where or None)
        problems.append(f"{where}: {message}" if where else message)
    return ValidationProblem("; ".join(problems) or "invalid request", params[0] if params else None, False)


# pydantic's error types for a body that is not an object: a list, a string, or bytes FastAPI did not read as JSON.
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")

# Where FastAPI says a value came from, first in an error's loc: the field is named without it.
_SOURCES = ("body", "query", "path", "header", "cookie")


def _field_path(loc: Any) -> list[Any]:
    return list(loc[1:]) if loc and loc[0] in _SOURCES else list(loc)
