"""tool_choice 'auto': replies read back into text and calls however they stream, the grammar that holds calls to
the tools, and the tools shown to models whose chat template ignores them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.api.tool_calls import ToolIn, ToolMode, tool_mode
from server.api.tool_formats import (
    TOOL_CALL_FORMATS,
    ToolCall,
    ToolCallFormat,
    ToolCallReader,
    read_reply,
    template_shows_tools,
    with_tools_in_text,
)
from server.structured_output import GrammarCompiler, GrammarSpec

HERMES = TOOL_CALL_FORMATS["hermes"]
LLAMA = TOOL_CALL_FORMATS["llama"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty parameter list
TOOLS = [WEATHER, NOW]
# The tools as tool_mode hands them to a format's grammar (a missing parameters schema filled in).
GRAMMAR_TOOLS = [ToolIn.model_validate(tool).as_grammar_input() for tool in TOOLS]

HERMES_REPLY = (
    "Let me look.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n'
    "One moment <please>."
)
HERMES_PIECES: list[Any] = [
    "Let me look.",
    ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}'),
    ToolCall("now", "{}"),
    "One moment <please>.",
]


def _pieces_streamed(tool_format: ToolCallFormat, parts: list[str]) -> list[Any]:
    """What a reader gives for a reply arriving in ``parts``, texts that follow each other joined."""
    reader = ToolCallReader(tool_format)
    out: list[Any] = []
    for part in parts:
        out.extend(reader.feed(part))
    out.extend(reader.finish())
    joined: list[Any] = []
    for piece in out:
        if isinstance(piece, str) and joined and isinstance(joined[-1], str):
            joined[-1] += piece
        else:
            joined.append(piece)
    return joined


def _split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(40, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_a_reply_reads_the_same_however_it_streams() -> None:
    assert _pieces_streamed(HERMES, [HERMES_REPLY]) == HERMES_PIECES
    assert _pieces_streamed(HERMES, list(HERMES_REPLY)) == HERMES_PIECES  # one character at a time
    rng = random.Random(0)
    for _ in range(200):
        assert _pieces_streamed(HERMES, _split(HERMES_REPLY, rng)) == HERMES_PIECES
    assert read_reply(HERMES, HERMES_REPLY)[:2] == (
        "Let me look.One moment <please>.",
        [p for p in HERMES_PIECES if isinstance(p, ToolCall)],
    )


def test_text_is_given_out_as_soon_as_it_cannot_start_a_call() -> None:
    reader = ToolCallReader(HERMES)
    assert reader.feed("It is <b") == ["It is <b"]  # '<b' cannot begin '<tool_call>'
    assert reader.feed(" sunny <tool") == [" sunny"]  # the space may precede a call, '<tool' may open one
    assert reader.feed("box>") == [" <toolbox>"]
    assert reader.feed('<tool_call>\n{"name": "now", "arguments"') == []  # a call, not complete
    assert reader.feed(": {}}\n</tool_call>") == [ToolCall("now", "{}")]
    assert reader.finish() == []


def test_calls_only_have_no_text_and_a_call_cut_short_keeps_what_it_has() -> None:
    """A call cut short (max_tokens, a stop string) comes back as a call with its arguments so far once its name
    is complete, as OpenAI's do; before that, its text comes back as text: nothing is lost."""
    calls_only = '\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n \n'
    assert read_reply(HERMES, calls_only)[:2] == (None, [ToolCall("now", "{}")])
    cut = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"ci'
    assert read_reply(HERMES, cut)[:2] == ("Sure.", [ToolCall("get_weather", '{"ci')])
    unclosed = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool'
    assert read_reply(HERMES, unclosed)[:2] == (None, [ToolCall("now", "{}")])
    unnamed = 'Sure. <tool_call>\n{"name": "get_w'
    assert read_reply(HERMES, unnamed)[:2] == (unnamed, [])
    assert read_reply(HERMES, "plain answer  \n")[:2] == ("plain answer", [])
    # Whether the reply ended inside a call (a stop string there leaves the call incomplete: ToolMode.finish).
    assert [read_reply(HERMES, r).cut_in_call for r in (cut, unclosed, unnamed, calls_only)] == [
        True,
        True,
        False,
        False,
    ]


def test_a_call_being_written_is_partial_once_named() -> None:
    reader = ToolCallReader(HERMES)
    assert reader.feed('Hi <tool_call>\n{"name": "get_') == ["Hi"] and reader.partial is None
    assert reader.feed('weather", "arguments": {"city"') == []
    assert reader.partial == ToolCall("get_weather", '{"city"')
    assert reader.feed(': "Oslo"}}\n</tool_call>') == [ToolCall("get_weather", '{"city": "Oslo"}')]
    assert reader.partial is None


def test_llama_calls_are_bare_json_objects() -> None:
    reply = 'Checking. {"name": "get_weather", "parameters": {"city": "Oslo"}} {"name": "now", "parameters": {}}'
    expected = ["Checking.", ToolCall("get_weather", '{"city": "Oslo"}'), ToolCall("now", "{}")]
    rng = random.Random(1)
    for parts in ([reply], list(reply), *(_split(reply, rng) for _ in range(50))):
        assert _pieces_streamed(LLAMA, parts) == expected
    assert read_reply(LLAMA, '{"name": "now", "arguments": {}}')[:2] == ('{"name": "now", "arguments": {}}', [])


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer: PreTrainedTokenizerBase) -> GrammarCompiler:
    return GrammarCompiler.for_tokenizer(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def _accepts(compiler: GrammarCompiler, spec: Any, tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether the grammar takes ``text`` token by token and then the end (EOS)."""
    matcher = compiler.compile(spec).matcher()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return all(matcher.accept_token(token) for token in ids) and matcher.accept_token(tokenizer.eos_token_id)


@pytest.mark.parametrize("tool_format", [HERMES, LLAMA], ids=lambda f: f.name)
def test_the_grammar_leaves_text_free_and_holds_calls_to_the_tools(
    tool_format: ToolCallFormat, compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    spec = tool_format.grammar(GRAMMAR_TOOLS, parallel_tool_calls=True)
    paris = tool_format.write("get_weather", '{"city": "Paris", "unit": "celsius"}')
    now = tool_format.write("now", {})
    assert read_reply(tool_format, f"Sure.\n{paris}\n{now}")[1] == [
        ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}'),
        ToolCall("now", "{}"),
    ]
    assert _accepts(compiler, spec, tokenizer, "Any text at all, with <tags> and {braces}.")
    assert _accepts(compiler, spec, tokenizer, f"Sure.\n{paris}\n{now}\nDone.")
    assert _accepts(compiler, spec, tokenizer, "")
    for wrong in (
        tool_format.write("get_weather", {"town": "Paris"}),  # not a parameter
        tool_format.write("get_weather", {"city": "Paris", "unit": "kelvin"}),  # not in the enum
        tool_format.write("get_weather", {}),  # city is required
        tool_format.write("get_time", {}),  # not a tool
        tool_format.write("now", {"any": [1, 2]}),  # a tool without parameters takes none
    ):
        assert not _accepts(compiler, spec, tokenizer, f"Sure.\n{wrong}"), wrong
    one = tool_format.grammar(GRAMMAR_TOOLS, parallel_tool_calls=False)
    assert _accepts(compiler, one, tokenizer, f"Sure.\n{paris}")
    assert not _accepts(compiler, one, tokenizer, f"Sure.\n{paris}\n{now}")  # one call, then only the end
    assert not _accepts(compiler, one, tokenizer, f"{paris} and more text")


@pytest.mark.parametrize("tool_format", [HERMES, LLAMA], ids=lambda f: f.name)
def test_beside_a_response_format_the_reply_calls_or_answers_in_it(
    tool_format: ToolCallFormat, compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    answer = {"type": "object", "properties": {"temp": {"type": "integer"}}, "required": ["temp"]}
    tools = [ToolIn.model_validate(tool) for tool in TOOLS]
    mode, spec = tool_mode(tools, "auto", None, tool_format, GrammarSpec.json_schema(answer))
    assert mode == ToolMode(None, tool_format) and spec is not None
    paris = tool_format.write("get_weather", '{"city": "Paris"}')
    now = tool_format.write("now", {})
    assert _accepts(compiler, spec, tokenizer, '{"temp": 18}')
    assert _accepts(compiler, spec, tokenizer, paris)
    assert _accepts(compiler, spec, tokenizer, f"{paris}\n{now}")
    assert read_reply(tool_format, '{"temp": 18}') == read_reply(tool_format, '{"temp": 18}')
    for wrong in ("It is warm.", '{"temp": "warm"}', '{"celsius": 18}', tool_format.write("now", {"a": 1})):
        assert not _accepts(compiler, spec, tokenizer, wrong), wrong
    # Other formats: a choice, a regex.
    _, spec = tool_mode(tools, "auto", None, tool_format, GrammarSpec("choice", choices=("yes", "no")))
    assert _accepts(compiler, spec, tokenizer, "no") and _accepts(compiler, spec, tokenizer, now)
    assert not _accepts(compiler, spec, tokenizer, "maybe")
    _, spec = tool_mode(tools, "auto", None, tool_format, GrammarSpec("regex", "[0-9]+ degrees"))
    assert _accepts(compiler, spec, tokenizer, "18 degrees") and not _accepts(compiler, spec, tokenizer, "warm")


def test_auto_mode_takes_the_servers_format_and_is_refused_without_one() -> None:
    tools = [ToolIn.model_validate(tool) for tool in TOOLS]
    for choice in (None, "auto"):
        mode, spec = tool_mode(tools, choice, None, HERMES)
        assert mode == ToolMode(None, HERMES) and mode.finish("stop") == "tool_calls"
        assert mode.finish("length") == "length"  # cut short: the calls so far are read, the reason stays
        assert mode.finish("stop", cut_in_call=True) == "stop"  # a stop string cut a call: not a whole one
        assert mode.finish("stop") == mode.finish("eos") == "tool_calls"  # ...after it: the calls are whole
        assert spec == HERMES.grammar(GRAMMAR_TOOLS, parallel_tool_calls=True)
    _, spec = tool_mode(tools, "auto", False, LLAMA)
    assert spec == LLAMA.grammar(GRAMMAR_TOOLS, parallel_tool_calls=False)
    assert json.loads(spec.source)["format"]["stop_after_first"] is True  # type: ignore[union-attr]


def test_tools_are_told_in_a_system_message_where_the_template_ignores_them(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
    ]
    assert not template_shows_tools(tokenizer, messages, TOOLS)  # SmolLM2's template has no tools
    told = with_tools_in_text(HERMES, messages, TOOLS)
    assert told[0]["role"] == "system" and told[1:3] != messages[:2] and told[3] == messages[2]
    assert '"name": "get_weather"' in told[0]["content"] and "<tool_call>" in told[0]["content"]
    assert read_reply(HERMES, told[2]["content"])[:2] == (None, [ToolCall("now", "{}")])  # the earlier call, written
    with_system = with_tools_in_text(LLAMA, [{"role": "system", "content": "Be brief."}, *messages], TOOLS)
    assert with_system[0]["content"].startswith("Be brief.\n\n") and '"parameters"' in with_system[0]["content"]
    assert len(with_system) == 4

    aware = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    aware.chat_template = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    assert template_shows_tools(aware, messages, TOOLS)
