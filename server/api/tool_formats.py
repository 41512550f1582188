"""``tool_choice: "auto"``: the model answers in text or calls tools in its own format, and the server reads the
calls back out (vLLM's ``--enable-auto-tool-choice --tool-call-parser``).

A format says how a model writes a call. ``hermes`` (Hermes 2/3, Qwen 2.5 and 3, and most models tuned since):
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call. ``llama`` (Llama 3.1/3.2's
JSON calls): a bare ``{"name": ..., "parameters": {...}}``. The server picks one (``--tool-call-format``).

Unlike a parser alone, the reply is also held to the format where it calls (xgrammar's structural tags, the
grammar vLLM builds for the same formats): text is free until the model writes a call's opening, and from there
the call must name one of the tools and give arguments its schema allows. So every call the model starts is one
the server can read and the client can run; text it writes is left as it is.

Chat templates that know tools show them to the model; where a template ignores them (the embedded default
model's does) the model is told about them and the format in a system message, and an assistant's earlier calls in
the history are written into its text in the same format, so the conversation reads as the model would write it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase
from xgrammar import get_model_structural_tag

from server.structured_output import GrammarSpec
from server.text_stream import partial_match_length

# Whitespace characters in a row that a call's arguments may hold: JSON written with a newline and an indent
# passes; a small model cannot pad its arguments with whitespace until it runs out of tokens.
MAX_ARGUMENT_WHITESPACE = 4


@dataclass(frozen=True)
class ToolCall:
    """A call read from the reply: the tool's name and its arguments as JSON text."""

    name: str
    arguments: str


# What a reply reads as, in order: text (str) and calls.
Piece = str | ToolCall


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes a tool call."""

    name: str  # the --tool-call-format value
    grammar_model: str  # xgrammar's key for the format's structural tag
    opening: str  # the text that starts a call
    object_in_opening: bool  # the opening is the start of the call's JSON object (llama) or precedes it (hermes)
    closing: str  # the text that ends a call after its JSON object ("" when the object ends it)
    arguments_key: str
    example: str  # a call, in the instructions shown to models whose template ignores tools

    def grammar(self, tools: Sequence[dict[str, Any]], parallel_tool_calls: bool) -> GrammarSpec:
        """Free text, and calls of ``tools`` written in this format (one at most, then the end, without
        ``parallel_tool_calls``). ``tools``: OpenAI's ``{"type": "function", "function": {...}}``."""
        return GrammarSpec("structural_tag", self._calls_tag(tools, parallel_tool_calls, "auto").model_dump_json())

    def grammar_or_answer(
        self, tools: Sequence[dict[str, Any]], parallel_tool_calls: bool, answer: GrammarSpec
    ) -> GrammarSpec:
        """Calls of ``tools`` in this format, or else an answer held to ``answer`` (a response format): OpenAI's
        tools beside ``response_format``, where the model either calls or answers in the format."""
        calls = self._calls_tag(tools, parallel_tool_calls, "required").model_dump(mode="json")["format"]
        either = {"type": "or", "elements": [_tag_format(answer), calls]}
        return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": either}))

    def _calls_tag(self, tools: Sequence[dict[str, Any]], parallel_tool_calls: bool, choice: str) -> Any:
        """xgrammar's structural tag for calls of ``tools`` in this format: text and calls ("auto"), or at least
        one call ("required")."""
        return get_model_structural_tag(
            self.grammar_model,
            tools=list(tools),
            tool_choice=choice,
            reasoning="disabled",
            max_whitespace_cnt=MAX_ARGUMENT_WHITESPACE,
            parallel_tool_calls=parallel_tool_calls,
        )

    def instructions(self, tools: Sequence[dict[str, Any]]) -> str:
        """A system message telling a model the tools and how to call them."""
        listed = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
        return (
            "You can call functions to answer. Each is described by a JSON object between <tools> and </tools>:\n"
            f"<tools>\n{listed}\n</tools>\n"
            f"To call a function, write its name and {self.arguments_key} in this form:\n{self.example}\n"
            "Write one such call for each function you need. When no function is needed, answer in plain text."
        )

    def write(self, name: str, arguments: Any) -> str:
        """A call as the model writes it (an earlier call in the history); ``arguments``: an object or JSON text."""
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):  # else written as given: what was sent
                arguments = json.loads(arguments)
        call = json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
        if self.object_in_opening:
            return call
        return f"{self.opening}\n{call}\n{self.closing}"

    def read_call(self, text: str) -> tuple[ToolCall, int | None] | None:
        """The call ``text`` starts with (it starts with ``opening``): with how many characters it takes once
        complete, or None while it is not (its arguments then as far as they go); None before its name is."""
        start = 0 if self.object_in_opening else len(self.opening)
        start += len(text[start:]) - len(text[start:].lstrip())
        read = read_call_at(text, start, self.arguments_key)
        if read is None or read[1] is None:
            return read
        call, end = read
        if self.closing:
            rest = text[end:]
            gap = len(rest) - len(rest.lstrip())
            if not rest[gap:].startswith(self.closing):
                return call, None
            end += gap + len(self.closing)
        return call, end


def _tag_format(spec: GrammarSpec) -> dict[str, Any]:
    """A response format's constraint as an element of xgrammar's structural tag."""
    if spec.kind == "json":
        schema = json.loads(spec.source)
        return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_ARGUMENT_WHITESPACE}
    if spec.kind == "regex":
        return {"type": "regex", "pattern": spec.source}
    if spec.kind == "choice":
        return {"type": "or", "elements": [{"type": "const_string", "value": choice} for choice in spec.choices]}
    if spec.kind == "ebnf":
        return {"type": "grammar", "grammar": spec.source}
    raise ValueError(f"a {spec.describe()} cannot be a response format")


_DECODER = json.JSONDecoder()
_CLOSING_BRACE = re.compile(r"\s*\}")


@functools.cache
def _call_head(arguments_key: str) -> re.Pattern[str]:
    """A call object's start up to its arguments: its name (a JSON string's inside) first, as grammars write it."""
    return re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"' + re.escape(arguments_key) + r'"\s*:\s*')


def read_call_at(text: str, position: int, arguments_key: str) -> tuple[ToolCall, int | None] | None:
    """The call object ``{"name": ..., arguments_key: ...}`` written at ``position`` (name first, as the grammars
    write calls), its arguments as written, and the index just past the object once it is complete (None while
    it is cut short: the arguments then go as far as the text does). None while its name is not complete.

    Arguments are the model's text, never parsed and dumped again: a streamed call sends each piece as it comes,
    and the pieces add up to exactly the arguments of the whole call (as OpenAI's do)."""
    head = _call_head(arguments_key).match(text, position)
    if head is None:
        return None
    name, start = json.loads(f'"{head[1]}"'), head.end()
    try:
        _, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError:
        return ToolCall(name, text[start:]), None
    closed = _CLOSING_BRACE.match(text, end)
    return ToolCall(name, text[start:end]), None if closed is None else closed.end()


TOOL_CALL_FORMATS = {
    "hermes": ToolCallFormat(
        name="hermes",
        grammar_model="qwen_3",  # Qwen 3's calls are Hermes's; with reasoning off, no <think> block before them
        opening="<tool_call>",
        object_in_opening=False,
        closing="</tool_call>",
        arguments_key="arguments",
        example='<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>',
    ),
    "llama": ToolCallFormat(
        name="llama",
        grammar_model="llama",
        opening='{"name": ',
        object_in_opening=True,
        closing="",
        arguments_key="parameters",
        example='{"name": "function_name", "parameters": {"argument": "value"}}',
    ),
}


class ToolCallReader:
    """Reads a reply, piece by piece as it streams, into text and calls.

    Text goes out as soon as it cannot be the start of a call; a call once complete, and meanwhile, once its name
    is, it is ``partial`` (its arguments as far as they go). Whitespace next to a call is dropped (a model writes
    a newline between calls), so the text of a reply of calls only is empty. At the end, a call cut short (by
    max_tokens or a stop string) comes back as a call with the arguments it has, as OpenAI's do, once its name
    is complete; anything else held back comes back as text: nothing is lost.
    """

    def __init__(self, tool_format: ToolCallFormat) -> None:
        self.format = tool_format
        self._pending = ""  # text not yet given out: a possible opening, a call not yet complete, or whitespace
        self._after_call = False  # the last piece given out was a call: leading whitespace goes
        self.partial: ToolCall | None = None  # the call being written, once its name is complete

    def feed(self, text: str) -> list[Piece]:
        self._pending += text
        out: list[Piece] = []
        opening = self.format.opening
        while self._pending:
            if self._after_call:
                self._pending = self._pending.lstrip()
                if not self._pending:
                    break
            at = self._pending.find(opening)
            if at < 0:
                # Hold back what may yet become the opening, and whitespace that may yet precede a call.
                held = partial_match_length(self._pending, [opening])
                text_out = self._pending[: len(self._pending) - held]
                kept = len(text_out.rstrip())
                self._give(out, text_out[:kept])
                self._pending = self._pending[kept:]
                break
            # The text before the call goes; the whitespace between stays with the call until it is complete.
            kept = len(self._pending[:at].rstrip())
            self._give(out, self._pending[:kept])
            self._pending = self._pending[kept:]
            read = self.format.read_call(self._pending[at - kept :])
            self.partial = None if read is None else read[0]
            if read is None or read[1] is None:
                break  # the call is not complete yet
            call, used = read
            out.append(call)
            self.partial = None
            self._pending = self._pending[at - kept + used :]
            self._after_call = True
        return out

    def finish(self) -> list[Piece]:
        """The reply has ended: a call cut short (once named), or what was held back as text (trailing
        whitespace dropped)."""
        rest = self._pending.rstrip()
        self._pending = ""
        out: list[Piece] = []
        if self.partial is not None:
            out.append(self.partial)
            self.partial = None
        else:
            self._give(out, rest)
        return out

    def _give(self, out: list[Piece], text: str) -> None:
        if text:
            out.append(text)
            self._after_call = False


class Reply(NamedTuple):
    content: str | None  # its text, None when there is none
    calls: list[ToolCall]
    cut_in_call: bool  # it ended inside its last call


def read_reply(tool_format: ToolCallFormat, text: str) -> Reply:
    """A whole reply's text and calls."""
    reader = ToolCallReader(tool_format)
    pieces = reader.feed(text)
    cut_in_call = reader.partial is not None
    pieces += reader.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    return Reply(content or None, [p for p in pieces if isinstance(p, ToolCall)], cut_in_call)


def template_shows_tools(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> bool:
    """Whether the chat template renders ``tools`` (it renders these messages differently with them)."""
    with_tools = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return with_tools != tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def with_tools_in_text(
    tool_format: ToolCallFormat, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``messages`` for a template that ignores tools: the tools and the format in the system message (added
    after the client's own system message, or as the first message), an assistant's earlier calls written into
    its text."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and calls:
            written = [tool_format.write(c["function"]["name"], c["function"].get("arguments", {})) for c in calls]
            text = "\n".join(part for part in (message.get("content") or "", *written) if part)
            message = {**message, "content": text}
        out.append(message)
    instructions = tool_format.instructions(tools)
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{instructions}"}, *out[1:]]
    return [{"role": "system", "content": instructions}, *out]
