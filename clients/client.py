"""Python client for prefix-serve: ``Client`` (blocking) and ``AsyncClient`` over httpx.

Both talk HTTP only, never the engine. Requests answered 429 or 503 are
retried with exponential backoff, waiting what the server's Retry-After asks
(capped), up to ``max_retries`` times; other errors raise the typed exceptions
of clients/errors.py at once.

    with Client() as client:  # PREFIX_SERVE_URL / PREFIX_SERVE_API_KEY, or arguments
        client.upload_prefix("summarize", "checkpoints/summarize")  # a PEFT checkpoint directory
        print(client.generate("Article: ...", task_id="summarize").text)
        for event in client.stream("Article: ...", task_id="summarize"):
            print(event.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack
from urllib.parse import quote

import httpx

from clients.errors import ConnectionFailed, GenerationFailed, PrefixServeError, parse_error
from server.api.schemas import GenerateResponse, PrefixInfo, PrefixList, StreamEvent

DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "PREFIX_SERVE_URL"
ENV_API_KEY = "PREFIX_SERVE_API_KEY"
RETRY_STATUSES = frozenset({429, 503})
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_CHUNK = 1 << 20  # upload chunk when showing progress

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "Client",
    "GenerateResponse",
    "GenerationOptions",
    "PrefixInfo",
    "StreamEvent",
    "upload_body",
]


@dataclass(frozen=True)
class _Call:
    """One HTTP request, kept so that it can be sent again on a retry."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retry: bool = True
    progress: bool = False


def upload_body(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The request body and content type for a prefix upload.

    A directory must be a PEFT checkpoint (adapter_config.json + adapter_model.safetensors),
    sent as multipart/form-data; a file is taken as the native .safetensors artifact.
    """
    source = Path(path).expanduser()
    if source.is_dir():
        files = [source / PEFT_CONFIG_FILE, source / PEFT_WEIGHTS_FILE]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            pickled = PEFT_WEIGHTS_FILE in missing and (source / "adapter_model.bin").is_file()
            hint = " (adapter_model.bin is a pickle, never read: save_pretrained with safe_serialization=True)"
            raise FileNotFoundError(
                f"{source} is not a PEFT prefix checkpoint: missing {', '.join(missing)}{hint if pickled else ''}"
            )
        boundary = secrets.token_hex(16)
        parts = []
        for file, content_type in zip(files, ("application/json", "application/octet-stream"), strict=True):
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{file.name}"; filename="{file.name}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n"
            )
            parts.append(head.encode() + file.read_bytes() + b"\r\n")
        return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
    if source.is_file():
        return source.read_bytes(), "application/octet-stream"
    raise FileNotFoundError(f"no such file or directory: {source}")


def _progress_bar(total: int) -> Any | None:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upload", leave=False)


def _chunks(body: bytes) -> Iterator[bytes]:
    bar = _progress_bar(len(body))
    try:
        for start in range(0, len(body), _CHUNK):
            chunk = body[start : start + _CHUNK]
            yield chunk
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


async def _achunks(body: bytes) -> AsyncIterator[bytes]:
    for chunk in _chunks(body):
        yield chunk


def _retry_after_s(response: httpx.Response) -> float | None:
    """Retry-After as seconds: delay-seconds (fractions tolerated) or an HTTP date."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_of(response: httpx.Response) -> PrefixServeError:
    return parse_error(response.status_code, response.content, _retry_after_s(response))


class GenerationOptions(TypedDict, total=False):
    """What a generation may ask for besides its prompt and task (/v1/generate's fields); None = the server's
    default.

    ``logprobs=k``: each token's log-probability and the k most likely alternatives' (``.logprobs``);
    ``prompt_logprobs=k``: the same for each prompt token after the first (``.prompt_logprobs``, aligned with
    ``.prompt_token_ids``), as a text's log-likelihood under the task's prefix. The penalties discourage tokens
    already seen: ``repetition_penalty`` (> 1) those of the prompt and output, ``frequency_penalty`` and
    ``presence_penalty`` (OpenAI's, -2..2) those of the output; ``logit_bias`` adds to chosen tokens' logits
    (token id -> -100..100). ``stop_token_ids`` end the request as EOS does, ``min_tokens`` holds EOS and them
    back that long, ``ignore_eos`` lets EOS neither end nor be held back (vLLM's names). ``grammar`` holds the
    text to a constraint (structured output), as TGI's field: ``{"type": "json", "value": schema}``, or type
    ``regex`` (a string), ``choice`` (a list of strings) or ``ebnf`` (a grammar whose first rule is ``root``).
    """

    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None
    stop: str | list[str] | None
    logprobs: int | None
    prompt_logprobs: int | None
    repetition_penalty: float | None
    frequency_penalty: float | None
    presence_penalty: float | None
    logit_bias: dict[int, float] | None
    stop_token_ids: list[int] | None
    min_tokens: int | None
    ignore_eos: bool | None
    include_stop_str_in_output: bool | None
    skip_special_tokens: bool | None
    prediction: str | None
    grammar: dict[str, Any] | None


def _generate_body(
    prompt: str | None,
    *,
    task_id: str | None,
    messages: list[dict[str, str]] | None,
    stream: bool,
    **params: Any,
) -> dict[str, Any]:
    """The /v1/generate body; parameters left as None take the server's defaults."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    unknown = sorted(set(params) - set(GenerationOptions.__annotations__))
    if unknown:  # as a function with these keyword parameters would say
        raise TypeError(f"unexpected generation options: {', '.join(unknown)}")
    body: dict[str, Any] = {"task_id": task_id, "stream": stream}
    body.update({"prompt": prompt} if messages is None else {"messages": messages})
    body.update({name: value for name, value in params.items() if value is not None})
    if isinstance(body.get("stop"), str):
        body["stop"] = [body["stop"]]
    return body


def _parse_sse_line(line: str) -> StreamEvent | None:
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data or data == "[DONE]":
        return None
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise GenerationFailed(f"the server sent a malformed event: {data[:200]}") from exc
    if isinstance(payload, dict) and "error" in payload:
        raise parse_error(None, payload)
    return StreamEvent.model_validate(payload)


def _task_path(task_id: str) -> str:
    if not task_id:
        raise ValueError("task_id must not be empty")
    # "." and ".." stay as they are under quote(), and HTTP clients resolve them as path segments (to another
    # route): escaped, they reach the server, which says the id is invalid.
    escaped = quote(task_id, safe="")
    return "/v1/prefixes/" + (escaped.replace(".", "%2E") if set(task_id) == {"."} else escaped)


class _Base:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        *,
        timeout_s: float | None,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
    ) -> None:
        given = base_url or os.environ.get(ENV_URL) or DEFAULT_URL
        url = httpx.URL(given)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"the server URL must be http(s)://HOST[:PORT], not {given!r}")
        self.base_url = given.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
        self.max_retries = max(0, max_retries)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s or 10.0))

    def _headers(self) -> dict[str, str]:
        headers = {"user-agent": "prefix-serve-client/0.1"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def _retry_delay(self, call: _Call, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before sending ``call`` again, or None to give up."""
        if not call.retry or response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        asked = _retry_after_s(response)
        delay = self.backoff_s * 2**attempt if asked is None else asked
        return min(delay, self.max_backoff_s)

    def _connection_error(self, exc: httpx.TransportError) -> ConnectionFailed:
        if isinstance(exc, httpx.ConnectError):
            return ConnectionFailed(f"cannot connect to {self.base_url} (is the server running?): {exc}")
        if isinstance(exc, httpx.TimeoutException):
            return ConnectionFailed(f"timed out talking to {self.base_url}: {type(exc).__name__}")
        return ConnectionFailed(f"connection to {self.base_url} failed: {exc!r}")

    def _request_kwargs(self, call: _Call) -> dict[str, Any]:
        headers = {**call.headers}
        if call.body is not None:
            headers["content-length"] = str(len(call.body))
        return {"json": call.json, "headers": headers}


class Client(_Base):
    """Blocking client. ``base_url`` and ``api_key`` default to PREFIX_SERVE_URL and PREFIX_SERVE_API_KEY."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float | None = 300.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        )
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers(), timeout=self._timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            content = None if call.body is None else (_chunks(call.body) if call.progress else call.body)
            request = self._http.build_request(call.method, call.path, content=content, **self._request_kwargs(call))
            try:
                response = self._http.send(request, stream=stream)
                if response.status_code >= 400:
                    try:
                        response.read()
                    finally:
                        response.close()
            except httpx.TransportError as exc:
                raise self._connection_error(exc) from exc
            if response.status_code < 400:
                return response
            delay = self._retry_delay(call, attempt, response)
            if delay is None:
                raise _error_of(response)
            time.sleep(delay)
            attempt += 1

    def health(self) -> bool:
        """True once the server has its model loaded (a 503 means not yet)."""
        try:
            self._send(_Call("GET", "/health", retry=False))
        except PrefixServeError as exc:
            if exc.status == 503:
                return False
            raise
        return True

    def generate(
        self,
        prompt: str | None = None,
        *,
        task_id: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **options: Unpack[GenerationOptions],
    ) -> GenerateResponse:
        """One completion; ``task_id`` None means the base model. ``options``: ``GenerationOptions``; those left
        out (or None) take the server's defaults."""
        body = _generate_body(
            prompt,
            task_id=task_id,
            messages=messages,
            stream=False,
            **options,
        )
        return GenerateResponse.model_validate_json(self._send(_Call("POST", "/v1/generate", json=body)).content)

    def stream(
        self,
        prompt: str | None = None,
        *,
        task_id: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **options: Unpack[GenerationOptions],
    ) -> Iterator[StreamEvent]:
        """Events as tokens are generated; their ``text`` concatenates to what ``generate`` returns.

        The last event carries ``finish_reason`` and ``usage``. Leaving the loop early cancels the request.
        """
        body = _generate_body(
            prompt,
            task_id=task_id,
            messages=messages,
            stream=True,
            **options,
        )
        response = self._send(_Call("POST", "/v1/generate", json=body), stream=True)
        try:
            for line in response.iter_lines():
                event = _parse_sse_line(line)
                if event is None:
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        except httpx.TransportError as exc:
            raise self._connection_error(exc) from exc
        finally:
            response.close()
        raise GenerationFailed("the stream ended before the generation finished")

    def upload_prefix(self, task_id: str, path: str | os.PathLike[str], *, progress: bool = False) -> PrefixInfo:
        """Upload a PEFT checkpoint directory or a native .safetensors file as a new version of ``task_id``."""
        body, content_type = upload_body(path)
        call = _Call("PUT", _task_path(task_id), body=body, headers={"content-type": content_type}, progress=progress)
        return PrefixInfo.model_validate_json(self._send(call).content)

    def list_prefixes(self) -> list[PrefixInfo]:
        return PrefixList.model_validate_json(self._send(_Call("GET", "/v1/prefixes")).content).data

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the base model's cards (``max_model_len``, ``max_prefix_tokens``) and the tasks'."""
        return list(self._send(_Call("GET", "/v1/models")).json()["data"])

    def get_prefix(self, task_id: str) -> PrefixInfo:
        return PrefixInfo.model_validate_json(self._send(_Call("GET", _task_path(task_id))).content)

    def delete_prefix(self, task_id: str) -> None:
        self._send(_Call("DELETE", _task_path(task_id)))


class AsyncClient(_Base):
    """The same as ``Client``, for asyncio."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float | None = 300.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        )
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers(), timeout=self._timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            content = None if call.body is None else (_achunks(call.body) if call.progress else call.body)
            request = self._http.build_request(call.method, call.path, content=content, **self._request_kwargs(call))
            try:
                response = await self._http.send(request, stream=stream)
                if response.status_code >= 400:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
            except httpx.TransportError as exc:
                raise self._connection_error(exc) from exc
            if response.status_code < 400:
                return response
            delay = self._retry_delay(call, attempt, response)
            if delay is None:
                raise _error_of(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def health(self) -> bool:
        try:
            await self._send(_Call("GET", "/health", retry=False))
        except PrefixServeError as exc:
            if exc.status == 503:
                return False
            raise
        return True

    async def generate(
        self,
        prompt: str | None = None,
        *,
        task_id: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **options: Unpack[GenerationOptions],
    ) -> GenerateResponse:
        body = _generate_body(
            prompt,
            task_id=task_id,
            messages=messages,
            stream=False,
            **options,
        )
        response = await self._send(_Call("POST", "/v1/generate", json=body))
        return GenerateResponse.model_validate_json(response.content)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        task_id: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **options: Unpack[GenerationOptions],
    ) -> AsyncIterator[StreamEvent]:
        body = _generate_body(
            prompt,
            task_id=task_id,
            messages=messages,
            stream=True,
            **options,
        )
        response = await self._send(_Call("POST", "/v1/generate", json=body), stream=True)
        try:
            async for line in response.aiter_lines():
                event = _parse_sse_line(line)
                if event is None:
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        except httpx.TransportError as exc:
            raise self._connection_error(exc) from exc
        finally:
            await response.aclose()
        raise GenerationFailed("the stream ended before the generation finished")

    async def upload_prefix(self, task_id: str, path: str | os.PathLike[str], *, progress: bool = False) -> PrefixInfo:
        body, content_type = await asyncio.to_thread(upload_body, path)
        call = _Call("PUT", _task_path(task_id), body=body, headers={"content-type": content_type}, progress=progress)
        return PrefixInfo.model_validate_json((await self._send(call)).content)

    async def list_prefixes(self) -> list[PrefixInfo]:
        return PrefixList.model_validate_json((await self._send(_Call("GET", "/v1/prefixes"))).content).data

    async def get_prefix(self, task_id: str) -> PrefixInfo:
        return PrefixInfo.model_validate_json((await self._send(_Call("GET", _task_path(task_id)))).content)

    async def delete_prefix(self, task_id: str) -> None:
        await self._send(_Call("DELETE", _task_path(task_id)))
