"""Constraints too costly to compile are refused before they compile (server/grammar_limits.py); real ones are not.

Each refused shape below cost xgrammar seconds to minutes of a core, gigabytes, or the process (hostile-input
audit); the two that crashed it are compiled in a child process, so a regression fails one test, not the run.
"""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
import time
from typing import Any

import pytest

from server.grammar_limits import (
    MAX_BRANCHES,
    MAX_OPTIONAL_PROPERTIES,
    MAX_PATTERN_SIZE,
    MAX_SOURCE_BYTES,
    MAX_VALUE_CHARACTERS,
    MAX_VALUES,
    limit_problem,
    pattern_problem,
)
from server.structured_output import GrammarCompiler, GrammarError, GrammarSpec
from tests.test_structured_output import byte_vocab_info


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(byte_vocab_info)


def ref_chain(hops: int) -> dict[str, Any]:
    """$defs d0 -> d1 -> ... each an object whose one property refers to the next: the text nests ~5 deep."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(hops)}
    defs[f"d{hops}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def words(n: int, length: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return ["".join(rnd.choice(string.ascii_lowercase) for _ in range(length)) + str(i) for i in range(n)]


def realistic_schema() -> dict[str, Any]:
    """An order: nested objects through $defs, arrays, 750 enum values, patterns, formats, 108 properties."""
    address = {
        "type": "object",
        "properties": {
            "street": {"type": "string", "maxLength": 200},
            "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
            "country": {"type": "string", "enum": words(250, 8, 1)},
        },
        "required": ["street", "city", "country"],
        "additionalProperties": False,
    }
    item = {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 10000},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
            "category": {"enum": words(500, 12, 2)},
        },
        "required": ["sku", "qty"],
        "additionalProperties": False,
    }
    properties: dict[str, Any] = {
        "id": {"type": "string", "format": "uuid"},
        "created": {"type": "string", "format": "date-time"},
        "billing": {"$ref": "#/$defs/address"},
        "shipping": {"$ref": "#/$defs/address"},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1},
        "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "parent": {"$ref": "#"},  # recursive: the compiler makes it a rule of its own
    }
    properties |= {f"extra_{i}": {"type": ["string", "null"]} for i in range(100)}
    return {
        "type": "object",
        "$defs": {"address": address, "item": item},
        "properties": properties,
        "required": [name for name in properties if name != "parent"],
        "additionalProperties": False,
    }


def test_a_realistic_schema_and_each_limit_itself_compile(compiler: GrammarCompiler) -> None:
    started = time.monotonic()
    assert compiler.compile(GrammarSpec.json_schema(realistic_schema())) is not None
    at_limits = [
        {"type": "string", "pattern": f"a{{{MAX_PATTERN_SIZE}}}"},
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_OPTIONAL_PROPERTIES)}},
        {"anyOf": [{"const": i} for i in range(MAX_BRANCHES)]},
        {"enum": list(range(MAX_VALUES - MAX_BRANCHES))},
        ref_chain(80),  # 3 levels a hop (the definition, its properties, the property): 243
    ]
    for schema in at_limits:
        assert limit_problem("json", json.dumps(schema)) is None, schema
    assert limit_problem("choice", "", tuple(words(MAX_VALUES, 5, 3))) is None
    assert limit_problem("ebnf", 'root ::= "a"' + " " * (MAX_SOURCE_BYTES - 12)) is None
    # Tools' schemas are checked as the one grammar they compile to: 128 tools of 10 properties pass.
    tool = {
        "type": "object",
        "properties": {f"arg{i}": {"enum": ["a", "b", "c", "d", "e"]} for i in range(10)},
        "required": [f"arg{i}" for i in range(10)],
    }
    tools = {"type": "or", "elements": [{"type": "json_schema", "json_schema": tool}] * 128}
    assert limit_problem("structural_tag", json.dumps({"type": "structural_tag", "format": tools})) is None
    assert time.monotonic() - started < 60  # a few seconds; a refused shape below would take minutes


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec.json_schema(ref_chain(90)), "nested 273 levels deep, counting each"),  # the text nests 5
        (GrammarSpec.json_schema({"type": "string", "pattern": "a{4000}"}), "written out"),
        (GrammarSpec.json_schema({"type": "string", "pattern": "(ab|cd){1000}"}), "written out"),
        (GrammarSpec.json_schema({"type": "string", "pattern": "((a{100}){100})"}), "written out"),
        (GrammarSpec.json_schema({"type": "string", "pattern": "(" * 100 + ")" * 100}), "groups nest 100 deep"),
        (GrammarSpec.json_schema({"pattern": "a" * 5000}), "5000 characters long"),
        (
            GrammarSpec.json_schema({"type": "object", "patternProperties": {"^x{9000}$": {"type": "integer"}}}),
            "written out",
        ),
        (
            GrammarSpec.json_schema({"type": "object", "properties": {f"p{i}": {} for i in range(300)}}),
            "300 optional properties",
        ),
        (GrammarSpec.json_schema({"anyOf": [{"const": i} for i in range(MAX_BRANCHES + 1)]}), "alternatives"),
        (GrammarSpec.json_schema({"enum": list(range(MAX_VALUES + 1))}), "enum, const or choice values"),
        (GrammarSpec.json_schema({"const": "x" * MAX_VALUE_CHARACTERS}), "characters of values"),
        (GrammarSpec("choice", choices=tuple(str(i) for i in range(MAX_VALUES + 1))), "choice values"),
        (GrammarSpec("regex", "|".join(words(4000, 8, 4))), "bytes long"),
        (GrammarSpec("ebnf", "root ::= " + " | ".join(f'"{w}"' for w in words(4000, 8, 5))), "bytes long"),
    ],
)
def test_costly_constraints_are_refused_before_they_compile(
    compiler: GrammarCompiler, spec: GrammarSpec, message: str
) -> None:
    started = time.monotonic()
    with pytest.raises(GrammarError, match=message):
        compiler.compile(spec)
    assert time.monotonic() - started < 5  # refused by the check, not after a compile


def test_pattern_sizes_count_repetition_and_nothing_else() -> None:
    assert pattern_problem("^[0-9]{5}(-[0-9]{4})?$") is None
    assert pattern_problem(r"^\d{3}-\{9999\}$") is None  # escaped braces are characters
    assert pattern_problem("[{]{3}x{2,}") is None  # a brace in a class; an open-ended count counts its least
    assert pattern_problem("(a{50}){50}") is not None  # 2,500 written out
    assert pattern_problem("(a{40}|b){40}") is None  # 41 x 40


CRASHES = """
import json, sys
from server.structured_output import GrammarCompiler, GrammarError, GrammarSpec
from tests.test_grammar_limits import ref_chain
from tests.test_structured_output import byte_vocab_info
compiler = GrammarCompiler(byte_vocab_info)
for spec in (
    GrammarSpec.json_schema(ref_chain(6000)),
    GrammarSpec.json_schema({"type": "string", "pattern": "(" * 40000 + "a" + ")" * 40000}),
):
    try:
        compiler.compile(spec)
        print("compiled")
    except GrammarError as exc:
        print("refused:", str(exc)[:80])
"""


def test_shapes_that_crashed_the_compiler_are_refused() -> None:
    """A chain of 6,000 $ref hops, and a pattern of 40,000 nested groups: xgrammar died of SIGSEGV on each."""
    done = subprocess.run([sys.executable, "-c", CRASHES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.splitlines() == [
        "refused: invalid JSON schema: nested 18003 levels deep, counting each $ref as a level; at",
        "refused: invalid JSON schema: a pattern is 80001 characters long; at most 4096",
    ], done.stdout
