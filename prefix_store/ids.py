"""Validation of task ids and tenant names (no path tricks)."""

from __future__ import annotations

import re

from prefix_store.errors import InvalidTaskId

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)


def _validate(kind: str, value: object) -> str:
    # fullmatch also refuses a trailing "\n", which "$" alone would let through.
    if not isinstance(value, str) or _TASK_ID_RE.fullmatch(value) is None or ".." in value:
        raise InvalidTaskId(
            f"invalid {kind} {shown(value)}: must match {TASK_ID_PATTERN} and must not contain '..'",
            field=kind.replace(" ", "_"),
        )
    return value


def shown(value: object, limit: int = 64) -> str:
    """``value`` as an error message quotes it: its repr, cut short (a client's 100,000-character id is not sent
    back whole)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def validate_task_id(task_id: object) -> str:
    """Return `task_id` unchanged if it is a valid task id, else raise InvalidTaskId."""
    return _validate("task id", task_id)


def validate_tenant(tenant: object) -> str:
    """Return `tenant` unchanged if it is a valid tenant name, else raise InvalidTaskId."""
    return _validate("tenant", tenant)
