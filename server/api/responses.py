"""OpenAI's Responses API, POST /v1/responses: a chat underneath, answered in the Responses shape.

The request's ``instructions`` and ``input`` (a string, or items: messages, earlier ``function_call`` items and
their ``function_call_output``) become chat messages; ``tools`` (function tools), ``tool_choice``, ``text.format``
(structured output), ``max_output_tokens``, ``temperature`` and ``top_p`` become the chat's fields, and the chat
route's checks, tool modes and prefix lookup run on them (``prepare_chat``). ``model`` names a task or the base
model, as on the other OpenAI routes. The reply comes back as output items: a ``message`` with its text, and a
``function_call`` item per tool call; streamed, as the typed events OpenAI sends (``response.created``, text
deltas, function-call argument deltas, ``response.completed``).

Responses are kept unless ``store: false`` (server/api/response_store.py: per tenant, in Redis with a Redis store,
where every replica sees them, else in this process's memory): ``previous_response_id`` continues one (its
conversation, then this input; its instructions are not carried over, as OpenAI does), GET and DELETE
/v1/responses/{id} read and drop one, GET /v1/responses/{id}/input_items lists the items it read.
``conversation`` objects are not supported; a client may always send the whole conversation as ``input``, earlier
output items included, as for the chat API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefix_store.errors import PrefixStoreError
from prefix_store.ids import shown
from server.api.auth import Principal
from server.api.generate import check_event, events_until_disconnect, first_event, start_events, version_headers
from server.api.openai_compat import (
    ChatCompletionRequest,
    OpenAIRoute,
    ParameterError,
    UnsupportedParameter,
    openai_error_body,
    prepare_chat,
    text_parts,
)
from server.api.response_store import StoredResponse
from server.api.state import Caller, ServerState, State
from server.api.tool_calls import ReplyReader, ToolMode, calls_in
from server.api.tool_formats import ToolCall, read_reply
from server.engine import GenerationEvent
from server.errors import ApiError, GenerationFailed, NotFound, store_work
from server.request_log import note_stream_error

logger = logging.getLogger(__name__)
router = APIRouter(route_class=OpenAIRoute)

_FINISHED = ("length", "stop", "eos")


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    verbosity: str | None = None  # for reasoning models: nothing to change here


class ResponsesRequest(BaseModel):
    """What this server takes of OpenAI's ``responses.create``; unknown fields are refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    # Whether the response is kept (the default, as OpenAI's): server/api/response_store.py.
    store: bool | None = None
    # OpenAI's bounds: kept with the response, so bounded like it.
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    user: str | None = Field(None, max_length=512)
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    truncation: str | None = None  # "disabled" (the default); "auto" refused (``_refuse_state``)
    max_tool_calls: int | None = Field(None, ge=0)  # bounds calls of built-in tools, of which there are none here
    reasoning: dict[str, Any] | None = None
    # Extra outputs: only what is empty here anyway (no reasoning items to carry encrypted), others refused.
    include: list[Literal["reasoning.encrypted_content"]] | None = None
    stream_options: dict[str, Any] | None = None  # {"include_obfuscation": ...}: nothing to pad here
    previous_response_id: str | None = None  # a stored response this one continues
    # Refused with a reason (``_refuse_state``).
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = None


def _refuse_state(body: ResponsesRequest) -> None:
    if body.conversation is not None:
        raise UnsupportedParameter(
            "conversation", "conversation objects are not supported: send previous_response_id, or the whole input"
        )
    if body.background:
        raise UnsupportedParameter("background", "background responses are not supported")
    if body.prompt is not None:
        raise UnsupportedParameter("prompt", "stored prompt templates are not supported: send instructions and input")
    if body.top_logprobs:
        raise UnsupportedParameter("top_logprobs", "log-probabilities are not supported on /v1/responses: use chat")
    if body.truncation not in (None, "disabled"):
        raise UnsupportedParameter("truncation", "only truncation 'disabled' is supported: an input too long is a 400")


def _text_of(content: Any, param: str) -> str:
    """Message content as text: a string, or parts of input or output text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ParameterError(param, "content must be a string or a list of text parts")
    return text_parts(content, param, ("input_text", "output_text", "text"))


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's ``input`` as items (a string is one user message), each with an id (OpenAI gives every item
    one: GET /v1/responses/{id}/input_items lists them by it)."""
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    if not items:
        raise ParameterError("input", "input is empty")
    for i, item in enumerate(items):
        if not isinstance(item.get("type", "message"), str):
            raise ParameterError(f"input.{i}.type", "an input item's type must be a string")
    kept = [_known_fields(item) for item in items]
    return [item if "id" in item else {**item, "id": _new_item_id(item)} for item in kept]


# What an input item of each type is read for: a stored response keeps only these (a client's other keys, which
# nothing reads, would otherwise be kept with it, megabytes of them if sent).
_ITEM_FIELDS = {
    "message": ("type", "id", "role", "content", "status"),
    "function_call": ("type", "id", "call_id", "name", "arguments", "status"),
    "function_call_output": ("type", "id", "call_id", "output", "status"),
    "item_reference": ("type", "id"),  # an item of a stored response, by its id (_resolve_references)
}
_PART_FIELDS = ("type", "text")


def _known_fields(item: dict[str, Any]) -> dict[str, Any]:
    fields = _ITEM_FIELDS.get(item.get("type", "message"))
    if fields is None:  # refused by name when read (_messages)
        return item
    kept = {k: item[k] for k in fields if k in item}
    for key in ("content", "output"):
        if isinstance(kept.get(key), list):
            kept[key] = [{k: p[k] for k in _PART_FIELDS if k in p} if isinstance(p, dict) else p for p in kept[key]]
    return kept


_ITEM_ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_"}


def _new_item_id(item: dict[str, Any]) -> str:
    return _ITEM_ID_PREFIXES.get(item.get("type", "message"), "item_") + secrets.token_hex(12)


def _messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``instructions`` and the conversation's items as chat messages: an earlier ``function_call`` joins the
    assistant message before it (or makes one), its ``function_call_output`` is a tool message. An item's
    ``input.N`` counts from the first item a stored response before this one had."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ParameterError(f"input.{i}.role", "role must be user, assistant, system or developer")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"input.{i}.content")})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise ParameterError(f"input.{i}", "a function_call item needs call_id, name and arguments")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise ParameterError(f"input.{i}.call_id", "a function_call_output item needs the call_id it answers")
            output = _text_of(item.get("output"), f"input.{i}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise UnsupportedParameter(f"input.{i}.type", f"input items of type {kind!r} are not supported")
    return messages


def _chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A Responses function tool (flat) as the chat API's (nested under ``function``)."""
    if tool.get("type") != "function":
        raise UnsupportedParameter(f"tools.{i}.type", "only function tools are supported")
    function = {k: v for k, v in tool.items() if k != "type"}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None, tools: list[Any] | None) -> Any:
    if choice == "auto" and not tools:  # the Responses API's default, with or without tools (OpenAI, vLLM)
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: TextOptions | None) -> dict[str, Any] | None:
    """``text.format`` as the chat API's ``response_format`` (whose json_schema nests what Responses has flat)."""
    fmt = None if text is None else text.format
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def chat_request(body: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request a Responses request is, on the conversation ``items`` (earlier turns', then its input)."""
    _refuse_state(body)
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body.instructions, items),
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tool_choice": _chat_tool_choice(body.tool_choice, body.tools),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body.text),
        "user": body.user,
    }
    if body.tools is not None:
        chat["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(body.tools)]
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as exc:  # a field read from the Responses request: name it as the client sent it
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]).replace("messages", "input").replace("response_format", "text")
        raise ParameterError(where, f"{where}: {error['msg']}") from exc


# ----- the response --------------------------------------------------------------------------------------------


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {
        "type": "message",
        "id": _new_item_id({"type": "message"}),
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": _new_item_id({"type": "function_call"}),
        "call_id": "call_" + secrets.token_hex(12),
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


class _Reply:
    """What a response says about itself, with its output and usage as they are so far."""

    def __init__(self, body: ResponsesRequest, response_id: str) -> None:
        self.body = body
        self.id = response_id
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.usage = {"input_tokens": 0, "output_tokens": 0}
        self.cut = False  # ended by max_output_tokens
        self.cached_tokens = 0  # input tokens whose K/V the prompt cache gave

    def finished(self, last: GenerationEvent) -> None:
        self.usage = {"input_tokens": last.prompt_tokens, "output_tokens": last.completion_tokens}
        self.cached_tokens = last.cached_tokens
        self.cut = last.finish_reason == "length"

    def object(self, status: str) -> dict[str, Any]:
        body, usage = self.body, self.usage
        incomplete = status == "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": self.output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": None,
            "store": body.store is not False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": (body.text.format if body.text and body.text.format else {"type": "text"})},
            "tool_choice": body.tool_choice or "auto",  # OpenAI reports its default, tools or not
            "tools": body.tools or [],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled",
            "usage": {
                "input_tokens": usage["input_tokens"],
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": usage["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["input_tokens"] + usage["output_tokens"],
            },
            "user": body.user,
            "metadata": body.metadata or {},
        }

    @property
    def status(self) -> str:
        return "incomplete" if self.cut else "completed"


def _output_of(mode: ToolMode | None, text: str) -> list[dict[str, Any]]:
    """A whole reply as output items: its text as a message, each call as a function_call item."""
    if mode is None:
        return [_message_item(text)]
    if mode.auto is not None:
        reply = read_reply(mode.auto, text)
        return ([_message_item(reply.content)] if reply.content else []) + [_call_item(call) for call in reply.calls]
    return [_call_item(call) for call in calls_in(mode, text)]


class _Events:
    """A response streamed as OpenAI's typed server-sent events, numbered in order."""

    def __init__(self, reply: _Reply) -> None:
        self.reply = reply
        self.sequence = 0
        self.open: dict[str, Any] | None = None  # the output item being written
        self.calls: list[dict[str, Any]] = []  # function_call items so far
        self.text = ""  # the open message's text so far

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def start(self) -> list[str]:
        response = self.reply.object("in_progress")
        return [
            self.event("response.created", response=response),
            self.event("response.in_progress", response=response),
        ]

    def add_text(self, delta: str) -> list[str]:
        out = []
        if self.open is None or self.open["type"] != "message":
            out += self.close()
            item = _message_item("", status="in_progress")
            item["content"] = []
            self.open, self.text = item, ""
            out += self._added(item)
            part = {"type": "output_text", "text": "", "annotations": []}
            out.append(
                self.event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=self._index,
                    content_index=0,
                    part=part,
                )
            )
        self.text += delta
        out.append(
            self.event(
                "response.output_text.delta",
                item_id=self.open["id"],
                output_index=self._index,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return out

    def set_calls(self, calls: list[ToolCall]) -> list[str]:
        out = []
        for i, call in enumerate(calls):
            if i == len(self.calls):
                out += self.close()
                item = _call_item(ToolCall(call.name, ""), status="in_progress")
                self.calls.append(item)
                self.open = item
                out += self._added(item)
            item = self.calls[i]
            delta = call.arguments[len(item["arguments"]) :]
            if delta:
                item["arguments"] = call.arguments
                out.append(
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=self._index_of(item),
                        delta=delta,
                    )
                )
        return out

    def close(self, last: bool = False) -> list[str]:
        """The open item done (``last``: the response's last, incomplete where max_output_tokens cut it)."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = self._index_of(item)
        item["status"] = self.reply.status if last else "completed"
        out = []
        if item["type"] == "message":
            part = {"type": "output_text", "text": self.text, "annotations": []}
            item["content"] = [part]
            out.append(
                self.event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=self.text,
                    logprobs=[],
                )
            )
            out.append(
                self.event(
                    "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                )
            )
        else:
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out

    def finish(self) -> list[str]:
        out = self.close(last=True)
        reply = self.reply
        kind = "response.incomplete" if reply.status == "incomplete" else "response.completed"
        return [*out, self.event(kind, response=reply.object(reply.status))]

    def _added(self, item: dict[str, Any]) -> list[str]:
        self.reply.output.append(item)
        return [self.event("response.output_item.added", output_index=self._index, item=item)]

    @property
    def _index(self) -> int:
        return len(self.reply.output) - 1

    def _index_of(self, item: dict[str, Any]) -> int:
        return next(i for i, it in enumerate(self.reply.output) if it is item)


@router.post("/v1/responses", responses={200: {"content": {"text/event-stream": {}}}})
async def create_response(body: ResponsesRequest, request: Request, state: State, principal: Caller) -> Response:
    earlier: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        earlier = (await _stored(state, principal, body.previous_response_id, "previous_response_id")).items
    items = await _resolve_references(state, principal, [*earlier, *input_items(body)])
    response_id = "resp_" + secrets.token_hex(12)
    prepared, mode = await prepare_chat(state, principal, chat_request(body, items), response_id)
    reply = _Reply(body, response_id)

    async def keep() -> None:  # once the response is complete, before its last event or its body is sent
        if body.store is False:
            return
        stored = StoredResponse([*items, *reply.output], reply.object(reply.status))
        try:
            await asyncio.to_thread(state.responses.put, principal.tenant, response_id, stored)
        except PrefixStoreError as exc:  # the reply is not lost for it: only its continuation is
            logger.warning("response %s not stored: %s", response_id, exc)

    events = start_events(state, prepared, stream=body.stream)
    if body.stream:
        first = await first_event(request, events)  # errors before the first token still get a proper status code
        try:
            check_event(first)
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        headers = version_headers([prepared])
        return StreamingResponse(
            _stream(reply, mode, first, events, keep), media_type="text/event-stream", headers=headers
        )
    text, last = [], None
    async for event in events_until_disconnect(request, events):
        check_event(event)
        text.append(event.text)
        last = event
    if last is None or last.finish_reason not in _FINISHED:
        raise GenerationFailed("the request ended without a result")
    reply.finished(last)
    reply.output = _output_of(mode, "".join(text))
    if reply.output:  # the item max_output_tokens cut, as OpenAI marks it
        reply.output[-1]["status"] = reply.status
    await keep()
    return JSONResponse(reply.object(reply.status), headers=version_headers([prepared]))


async def _resolve_references(
    state: ServerState, principal: Principal, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``items`` with each ``{"type": "item_reference", "id": ...}`` replaced by the stored item of that id (an
    earlier response's input or output: what clients that keep their history as ids send). An id no stored
    response holds, or one already in the conversation, is refused by position."""
    refs = {i: item.get("id") for i, item in enumerate(items) if item.get("type") == "item_reference"}
    if not refs:
        return items
    # A client's input item may carry any JSON as its id: only strings name items.
    present = {i for item in items if item.get("type") != "item_reference" and isinstance(i := item.get("id"), str)}
    for i, item_id in refs.items():
        if not isinstance(item_id, str):
            raise ParameterError(f"input.{i}.id", "an item_reference needs the id of a stored item")
        if item_id in present:
            raise ParameterError(f"input.{i}.id", f"item {shown(item_id)} is in the conversation already")
    found = await store_work(state.responses.find_items, principal.tenant, list(refs.values()))
    for i, item_id in refs.items():
        if item_id not in found:
            raise ParameterError(f"input.{i}.id", f"no stored item {shown(item_id)} (unknown, or expired)")
    return [found[refs[i]] if i in refs else item for i, item in enumerate(items)]


class ResponseNotFound(NotFound):
    def __init__(self, response_id: str, param: str) -> None:
        super().__init__(f"no response {response_id!r} (unknown, deleted, or kept by another replica)")
        self.param = param
        self.code = "response_not_found"


async def _stored(state: ServerState, principal: Principal, response_id: str, param: str) -> StoredResponse:
    stored = await store_work(state.responses.get, principal.tenant, response_id)
    if stored is None:
        raise ResponseNotFound(response_id, param)
    return stored


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, state: State, principal: Caller) -> dict[str, Any]:
    return (await _stored(state, principal, response_id, "response_id")).response


# What OpenAI's input_items listing may be asked to include; none of it exists here (no images, no reasoning).
_ListingInclude = Literal[
    "message.input_image.image_url",
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
    "file_search_call.results",
    "web_search_call.action.sources",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
]


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    state: State,
    principal: Caller,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    include: Annotated[list[_ListingInclude] | None, Query()] = None,
) -> dict[str, Any]:
    """The items a stored response read (earlier responses' conversation, then its own input), as OpenAI lists
    them: newest first unless ``order=asc``, ``limit`` at a time, the page after the item ``after``."""
    stored = await _stored(state, principal, response_id, "response_id")
    listed = [_listed(item) for item in stored.items[: len(stored.items) - len(stored.response["output"])]]
    if order == "desc":
        listed.reverse()
    if after is not None:
        ids = [item.get("id") for item in listed]
        if after not in ids:
            raise ParameterError("after", f"no item {after!r} among this response's input items")
        listed = listed[ids.index(after) + 1 :]
    page = listed[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0].get("id") if page else None,
        "last_id": page[-1].get("id") if page else None,
        "has_more": len(listed) > limit,
    }


def _listed(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as OpenAI lists it: a message's text as a content part, its type and status named."""
    if item.get("type", "message") != "message":
        return item
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "output_text" if item.get("role") == "assistant" else "input_text", "text": content}]
    return {"type": "message", "status": "completed", **item, "content": content}


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, state: State, principal: Caller) -> dict[str, Any]:
    await _stored(state, principal, response_id, "response_id")
    await store_work(state.responses.delete, principal.tenant, response_id)
    return {"id": response_id, "object": "response", "deleted": True}


async def _stream(
    reply: _Reply,
    mode: ToolMode | None,
    first: GenerationEvent,
    rest: AsyncIterator[GenerationEvent],
    keep: Callable[[], Awaitable[None]],
) -> AsyncIterator[str]:
    writer = _Events(reply)
    reader = ReplyReader(mode)
    try:
        for chunk in writer.start():
            yield chunk
        event: GenerationEvent | None = first
        while event is not None:
            if event.finish_reason == "error":
                note_stream_error(GenerationFailed.status_code)
                yield writer.event(
                    "error", code="generation_failed", message=event.error or "generation failed", param=None
                )
                return
            ended = event.finish_reason in _FINISHED
            for step in reader.feed(event.text, end=ended):
                for chunk in writer.add_text(step) if isinstance(step, str) else writer.set_calls(step):
                    yield chunk
            if ended:
                reply.finished(event)
                last_events = writer.finish()
                await keep()  # before response.completed: a client may continue the response as soon as it reads it
                for chunk in last_events:
                    yield chunk
                return
            event = await anext(rest, None)
    except ApiError as exc:  # ended by the server mid-stream (timed out, shutting down): say why
        note_stream_error(exc.status_code)
        error = openai_error_body(exc.status_code, exc.message, None, exc.error_type)["error"]
        yield writer.event("error", code=error["code"], message=error["message"], param=None)
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  # a disconnect lands here: abort the request
