"""Tool calling on the chat route, by structured output, as vLLM does it without a model-specific parser.

``tool_choice`` names a function (``{"type": "function", "function": {"name": ...}}``): the reply is held to that
function's parameters schema and comes back as one tool call whose arguments are the reply (finish reason
``stop``, as OpenAI answers a forced function; streamed, the arguments come piece by piece). ``"required"``: the
reply is held to a JSON array of one or more calls, each ``{"name": ..., "parameters": {...}}`` of one of the
tools (one call only with ``parallel_tool_calls: false``), and comes back as those calls (finish reason
``tool_calls``). Streamed, every call opens with its id and name once its name is written and then streams its
arguments, the model's text as written (``StreamedCalls``). ``"none"``: the tools are only shown to the chat template.
``"auto"`` (OpenAI's default when tools are given): the model writes text or calls in its own format, read back
by server/api/tool_formats.py; with ``--tool-call-format none`` it is refused, as vLLM refuses it without
``--enable-auto-tool-choice``.

The tools are passed to the chat template (templates that know tools show them to the model; others ignore them).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.api.tool_formats import ToolCall, ToolCallFormat, ToolCallReader, read_call_at
from server.structured_output import GrammarSpec


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: no parameters (OpenAI's rule)
    strict: bool | None = None  # followed strictly in any case

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        # Arguments are keyword arguments: a call whose arguments were '"cats"' breaks fn(**json.loads(args)).
        # OpenAI refuses such a schema too.
        kind = "object" if parameters is None else parameters.get("type", "object")
        if kind != "object":
            raise ValueError(f"a function's parameters must be a JSON schema of type 'object', not {kind!r}")
        return parameters

    @property
    def schema(self) -> dict[str, Any]:
        """The schema of the call's arguments. Without ``parameters``, an empty object: "omitting parameters
        defines a function with an empty parameter list" (OpenAI). ``{"type": "object"}`` would let the model
        make arguments up."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionIn

    def as_grammar_input(self) -> dict[str, Any]:
        """The tool as xgrammar's structural tags read it, its parameters' schema filled in."""
        tool = self.model_dump(exclude_none=True)
        tool["function"]["parameters"] = self.function.schema
        return tool


class ToolCallError(ValueError):
    """A tool request the server cannot honour; ``param`` names the field at fault."""

    def __init__(self, param: str, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.param = param
        self.unsupported = unsupported


@dataclass(frozen=True)
class ToolMode:
    """How a chat reply becomes tool calls: one call of ``function``, a list of calls (``function`` None), or
    with ``auto`` (tool_choice 'auto'), text and calls in that format."""

    function: str | None
    auto: ToolCallFormat | None = None

    @property
    def finish_reason(self) -> str:
        return "stop" if self.function is not None else "tool_calls"

    @property
    def forced(self) -> bool:
        """A named function or 'required': the whole reply is the calls, held to their grammar, which ends it.
        Stop strings and stop token ids do not act on it (they cut a call's arguments mid-JSON)."""
        return self.auto is None

    def finish(self, generation_finish: str, cut_in_call: bool = False) -> str:
        """A tool reply's finish reason, given the engine's (``length``, ``stop``: a stop string or token id, or
        ``eos``): cut short by max_tokens stays ``length``; a stop string that cut an 'auto' reply inside a call
        gives ``stop``, not ``tool_calls``: the call is incomplete, as the client must not take it for whole."""
        if generation_finish == "length":
            return "length"
        if generation_finish == "stop" and cut_in_call:
            return "stop"
        return self.finish_reason


def tool_mode(
    tools: list[ToolIn] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    auto_format: ToolCallFormat | None = None,
    answer: GrammarSpec | None = None,
) -> tuple[ToolMode | None, GrammarSpec | None]:
    """The tool mode (None: the reply is text) and the reply's constraint. ``auto_format``: how the model writes
    calls, for tool_choice 'auto' (None: refused). ``answer``: the response format's constraint, if any. It holds
    a text reply; with 'auto' the reply either calls or answers in it; a forced call's reply is the call."""
    if tool_choice not in (None, "none") and not tools:
        raise ToolCallError("tool_choice", "tool_choice needs tools")
    if not tools or tool_choice == "none":
        return None, answer
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise ToolCallError("tools", "tool names must be distinct")
    if tool_choice is None or tool_choice == "auto":
        if auto_format is None:
            raise ToolCallError(
                "tool_choice",
                "tool_choice 'auto' is off on this server (--tool-call-format none): send tool_choice 'required', "
                "'none' or a named function",
                unsupported=True,
            )
        functions = [tool.as_grammar_input() for tool in tools]
        parallel = parallel_tool_calls is not False
        if answer is not None:
            return ToolMode(None, auto_format), auto_format.grammar_or_answer(functions, parallel, answer)
        return ToolMode(None, auto_format), auto_format.grammar(functions, parallel)
    schemas = {tool.function.name: tool.function.schema for tool in tools}
    if tool_choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in schemas.items()
        ]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if parallel_tool_calls is False:
            array["maxItems"] = 1
        return ToolMode(None), GrammarSpec.json_schema(array)
    name = _named(tool_choice)
    if name not in schemas:
        raise ToolCallError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
    return ToolMode(name), GrammarSpec.json_schema(schemas[name])


def _named(tool_choice: Any) -> str:
    if (
        isinstance(tool_choice, dict)
        and tool_choice.get("type") == "function"
        and isinstance(tool_choice.get("function"), dict)
        and isinstance(tool_choice["function"].get("name"), str)
    ):
        return tool_choice["function"]["name"]
    raise ToolCallError(
        "tool_choice",
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
    )


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_calls(mode: ToolMode, text: str) -> list[dict[str, Any]]:
    """A named function's or a 'required' reply as OpenAI's ``tool_calls`` (``calls_in``)."""
    return [function_call(call_id(), call.name, call.arguments) for call in calls_in(mode, text)]


def calls_in(mode: ToolMode, text: str) -> list[ToolCall]:
    """The calls of a reply so far. A named function's call carries the reply as its arguments, as written (cut
    short by max_tokens, they are cut short too, as OpenAI's are). A 'required' reply is a list of calls; cut
    short, its whole calls come back, and the one it was writing too once its name is complete, with its
    arguments as written: never the list's own text."""
    if mode.function is not None:
        return [ToolCall(mode.function, text)]
    return read_required(text)


def read_required(text: str) -> list[ToolCall]:
    """The calls in a 'required' reply, ``[{"name": ..., "parameters": {...}}, ...]`` (the grammar's shape; a
    stop string or max_tokens may have cut it short), their arguments as written."""
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        return []
    calls: list[ToolCall] = []
    position += 1
    while True:
        read = read_call_at(text, _skip_space(text, position), "parameters")
        if read is None:
            return calls
        call, end = read
        calls.append(call)
        if end is None:
            return calls
        position = _skip_space(text, end)
        if not text.startswith(",", position):
            return calls
        position += 1


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\n\r":
        position += 1
    return position


class ReplyReader:
    """A chat reply read as it streams, with its tool mode: ``feed`` gives what each piece adds, in order: text to
    show (str), and the calls so far (a list, the last maybe still being written) whenever they grow."""

    def __init__(self, mode: ToolMode | None) -> None:
        self.mode = mode
        self.reader = None if mode is None or mode.auto is None else ToolCallReader(mode.auto)
        self.text = ""  # named and 'required' replies so far
        self.done: list[ToolCall] = []  # 'auto' replies' whole calls so far
        self.cut_in_call = False  # 'auto': the reply ended inside a call

    def feed(self, text: str, end: bool = False) -> list[str | list[ToolCall]]:
        if self.mode is None:
            return [text] if text else []
        if self.reader is None:
            self.text += text
            return [calls_in(self.mode, self.text)]
        out: list[str | list[ToolCall]] = []
        pieces = self.reader.feed(text)
        if end:
            self.cut_in_call = self.reader.partial is not None
            pieces += self.reader.finish()
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
            else:
                self.done.append(piece)
                out.append(list(self.done))
        if self.reader.partial is not None:
            out.append([*self.done, self.reader.partial])
        return out


class StreamedCalls:
    """A reply's tool calls as OpenAI streams them: each call's id and name once its name is known, then its
    arguments piece by piece. Fed the calls read so far each time the reply grows (the last one maybe cut short:
    its arguments only ever grow); gives the deltas' ``tool_calls`` entries."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.sent: list[int] = []  # per call: characters of its arguments sent

    def __len__(self) -> int:
        return len(self.ids)

    def update(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for index, call in enumerate(calls):
            if index == len(self.ids):
                self.ids.append(call_id())
                self.sent.append(0)
                opening = function_call(self.ids[index], call.name, "")
                out.append({"index": index, **opening})
            if len(call.arguments) > self.sent[index]:
                out.append({"index": index, "function": {"arguments": call.arguments[self.sent[index] :]}})
                self.sent[index] = len(call.arguments)
        return out


def function_call(id_: str, name: str, arguments: str) -> dict[str, Any]:
    """A call as OpenAI's ``tool_calls`` carry it; ``arguments``: JSON text."""
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}
