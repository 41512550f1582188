"""Tool calls as structured output: which tool_choice gives which constraint, and replies read back as calls."""

from __future__ import annotations

import json

import pytest

from server.api.tool_calls import (
    StreamedCalls,
    ToolCallError,
    ToolIn,
    ToolMode,
    read_required,
    tool_calls,
    tool_mode,
)
from server.structured_output import GrammarSpec

ADD = ToolIn.model_validate(
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {}}}}}
)
NOW = ToolIn.model_validate({"type": "function", "function": {"name": "now"}})


def test_no_tools_or_none_leave_the_reply_free() -> None:
    assert tool_mode(None, None, None) == (None, None)
    assert tool_mode([ADD], "none", None) == (None, None)
    assert tool_mode(None, "none", None) == (None, None)  # 'none' without tools asks for nothing (vLLM accepts it)
    # A response format then holds the text reply.
    answer = GrammarSpec.json_schema({"type": "object"})
    assert tool_mode([ADD], "none", None, answer=answer) == (None, answer)
    assert tool_mode(None, None, None, answer=answer) == (None, answer)


def test_a_forced_call_is_the_reply_whatever_the_response_format() -> None:
    answer = GrammarSpec.json_schema({"type": "object", "properties": {"x": {}}})
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        assert tool_mode([ADD, NOW], choice, None, answer=answer) == tool_mode([ADD, NOW], choice, None)


@pytest.mark.parametrize(
    ("tools", "choice", "param", "unsupported"),
    [
        ([ADD], None, "tool_choice", True),  # OpenAI's default with tools: auto
        ([ADD], "auto", "tool_choice", True),
        (None, "required", "tool_choice", False),
        ([ADD, ADD], "required", "tools", False),
        ([ADD], {"type": "function", "function": {"name": "sub"}}, "tool_choice", False),
        ([ADD], {"type": "function"}, "tool_choice", False),
        ([ADD], "sometimes", "tool_choice", False),
    ],
)
def test_refused_choices_name_their_field(tools, choice, param: str, unsupported: bool) -> None:
    with pytest.raises(ToolCallError) as caught:
        tool_mode(tools, choice, None)
    assert caught.value.param == param and caught.value.unsupported == unsupported


def test_named_and_required_constraints() -> None:
    mode, spec = tool_mode([ADD, NOW], {"type": "function", "function": {"name": "add"}}, None)
    assert mode == ToolMode("add") and mode.finish_reason == "stop"
    assert spec is not None and json.loads(spec.source) == {"type": "object", "properties": {"a": {}}}
    mode, spec = tool_mode([ADD, NOW], "required", False)
    assert mode == ToolMode(None) and mode.finish_reason == "tool_calls"
    schema = json.loads(spec.source)  # type: ignore[union-attr]
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [call["properties"]["name"]["const"] for call in schema["items"]["anyOf"]]
    assert names == ["add", "now"]
    # No parameters: an empty parameter list (OpenAI), not any object.
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    _, spec = tool_mode([ADD], "required", None)
    assert "maxItems" not in json.loads(spec.source)  # type: ignore[union-attr]


def test_replies_read_back_as_calls() -> None:
    (call,) = tool_calls(ToolMode("add"), '{"a": 1}')  # type: ignore[misc]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1}'}
    calls = tool_calls(ToolMode(None), '[{"name": "now", "parameters": {}}, {"name": "add", "parameters": {"a": 2}}]')
    assert calls is not None and [c["function"]["name"] for c in calls] == ["now", "add"]
    assert len({c["id"] for c in calls}) == 2
    (cut,) = tool_calls(ToolMode("add"), '{"a": ')  # type: ignore[misc]
    assert cut["function"] == {"name": "add", "arguments": '{"a": '}
    assert tool_calls(ToolMode(None), '{"name": "add"}') == []  # not the grammar's list


@pytest.mark.parametrize(
    ("reply", "calls"),
    [
        ("", []),
        ("[", []),
        ('[{"name": "no', []),  # the name cut short: nothing to call
        ('[{"name": "now", "param', []),
        ('[{"name": "now", "parameters": ', [("now", "")]),
        ('[{"name": "add", "parameters": {"a": [1, 2', [("add", '{"a": [1, 2')]),  # arguments as written
        ('[{"name": "now", "parameters": {}}', [("now", "{}")]),
        ('[{"name": "now", "parameters": {}},\n {"name": "add", "parameters": {"a"', [("now", "{}"), ("add", '{"a"')]),
        (' [ {"name":"a\\"b","parameters":{"x":1}} ]', [('a"b', '{"x":1}')]),  # escapes, any spacing, as written
        ('[{"name": "now", "parameters": {}}] trailing', [("now", "{}")]),
    ],
)
def test_required_replies_cut_short_keep_what_they_called(reply: str, calls: list[tuple[str, str]]) -> None:
    """A 'required' reply cut short by max_tokens or a stop string gives its whole calls, and the one it was
    writing once that one's name is complete (its arguments as written, as a named call's are)."""
    assert [(call.name, call.arguments) for call in read_required(reply)] == calls
    got = tool_calls(ToolMode(None), reply)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == calls


def test_streamed_calls_open_with_their_name_and_send_each_piece_of_arguments_once() -> None:
    """Fed the calls read from a growing reply, every prefix of it: each call opens once (id, name, empty
    arguments) and its arguments' pieces add up to the whole call's, whichever way the reply is cut."""
    reply = '[{"name": "now", "parameters": {}}, {"name": "add", "parameters": {"a": [1, 2], "b": "x}"}}]'
    streamed, entries = StreamedCalls(), []
    for end in range(len(reply) + 1):
        entries += streamed.update(read_required(reply[:end]))
    openings = [e for e in entries if "id" in e]
    assert [(e["index"], e["function"]["name"], e["function"]["arguments"]) for e in openings] == [
        (0, "now", ""),
        (1, "add", ""),
    ]
    assert len({e["id"] for e in openings}) == 2 and len(streamed) == 2
    for index, whole in enumerate(call.arguments for call in read_required(reply)):
        pieces = [e["function"]["arguments"] for e in entries if e["index"] == index and "id" not in e]
        assert "".join(pieces) == whole and len(pieces) > 1
