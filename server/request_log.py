"""Structured request logs: one line per finished HTTP request, as text or JSON (``--log-format``).

The metrics middleware (server/metrics.py) opens a ``RequestRecord`` when a
request arrives, publishes it in the ``current_request`` context variable, and
logs it once the response's last byte is sent. Code further down fills it in
without knowing about HTTP: authentication sets the tenant, the request gate
(server/quotas.py) the task, token counts, time to first token and finish
reason. Context variables are copied into threads and tasks, and the record is
shared by reference, so updates made there are seen by the middleware.

Logs may name tenants and task ids (they are not metrics: no cardinality
concern), but never API keys, prompts or generated text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.engine import GenerationEvent, GenerationRequest

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
REQUEST_ID_HEADER = "x-request-id"
# A client-sent request id is echoed only when it is short and plain; otherwise the server makes one.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

access_log = logging.getLogger("prefix_serve.access")


@dataclass
class RequestRecord:
    """What is known about one HTTP request; filled in as it is served."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    tenant: str | None = None
    task_id: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    first_token_at: float | None = None
    finish_reason: str | None = None
    # A streamed response that failed after its 200 was sent (timed out, aborted at shutdown, the engine failed):
    # the status its error event carries, which the request is counted and logged under.
    stream_error: int | None = None
    # Completions' echo with max_tokens 0 (scoring a prompt): the token each prompt's forward samples is dropped,
    # and usage counts none, so neither does the line.
    drops_generated: bool = False
    # The engine requests this HTTP request submits (OpenAI's n and prompt lists make several): each distinct
    # prompt's token ids, by id() (held, so an id is not reused meanwhile), and each request's tokens generated so
    # far, by the request's id(). The token fields above are their sums. The n choices of one prompt share its list
    # (they are copies of one request), so it counts once, as the response's usage counts it.
    _prompts: dict[int, Sequence[int]] = field(default_factory=dict, repr=False)
    _generated: dict[int, int] = field(default_factory=dict, repr=False)

    def note_generation(self, request: GenerationRequest) -> None:
        """An engine request this HTTP request submits (its prefix id is "tenant/task@version#sha256-prefix")."""
        self.tenant = request.tenant
        if request.prefix_id is not None:
            self.task_id = request.prefix_id.partition("/")[2].rpartition("@")[0] or None
        self._prompts[id(request.prompt_ids)] = request.prompt_ids
        self._generated[id(request)] = 0
        self._add_up()

    def note_event(self, request: GenerationRequest, event: GenerationEvent) -> None:
        """An event of ``request``, one of the engine requests ``note_generation`` was told of."""
        if event.token_id is not None and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        key = id(request)
        if event.completion_tokens:
            self._generated[key] = event.completion_tokens
        elif event.token_id is not None:
            self._generated[key] = self._generated.get(key, 0) + 1
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        self._add_up()

    def _add_up(self) -> None:
        self.prompt_tokens = sum(len(prompt) for prompt in self._prompts.values())
        self.generated_tokens = 0 if self.drops_generated else sum(self._generated.values())

    def fields(self, endpoint: str, status: int, finished: float) -> dict[str, Any]:
        """The log line's fields; those still unknown (no generation, no first token) are left out."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "endpoint": endpoint,
            "status": status,
            "tenant": self.tenant,
            "task_id": self.task_id,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.started, 6),
            "duration_s": round(finished - self.started, 6),
            "finish_reason": self.finish_reason,
        }
        return {k: v for k, v in out.items() if v is not None}


current_request: ContextVar[RequestRecord | None] = ContextVar("prefix_serve_request", default=None)


def note_stream_error(status: int) -> None:
    """The current request's stream ends in an error event after its 200 went out: count and log it as `status`."""
    record = current_request.get()
    if record is not None and record.stream_error is None:
        record.stream_error = status


def new_request_id(sent: str | None) -> str:
    """The client's X-Request-ID when it is plain and short, else a fresh one."""
    if sent is not None and _CLIENT_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def log_request(record: RequestRecord, endpoint: str, status: int) -> None:
    """The one line of a finished request: fields as JSON attributes, and a readable message for text logs."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    data = record.fields(endpoint, status, time.perf_counter())
    text = " ".join(f"{k}={v}" for k, v in data.items())
    access_log.info("request %s", text, extra={"request": data})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus a request's fields when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            out["event"] = "request"
            out.update(request)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the moment it was made.

    So a handler installed while stderr was redirected (a test capturing output) never writes to a closed file.
    """

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str, log_format: str) -> None:
    """Root logging for `prefix-serve serve`: uvicorn's loggers propagate here (it is started with log_config=None)."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # warnings.warn output becomes log lines (JSON ones too)
    if log_format == "json":
        # Hugging Face writes progress bars and has a handler of its own on stderr: neither is JSON. transformers'
        # GGUF conversion uses tqdm directly (10 lines of bars when the default model loads): tqdm reads
        # TQDM_* variables as its defaults.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
