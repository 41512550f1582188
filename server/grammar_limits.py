"""Bounds on what a structured-output constraint may ask of the compiler, checked before it compiles.

xgrammar cannot be interrupted, and some shapes of a few hundred bytes cost it minutes of a core, gigabytes, or
the whole process (measured with the default model's 49k vocabulary, one core; hostile-input audit):

* a chain of 5,000 ``$ref`` hops, or a ``pattern`` of 40,000 nested groups: the process dies (SIGSEGV: the
  converter recurses once per level). The bracket depth of the schema's text does not see either;
* a ``pattern``'s counted repetitions are written out: ``a{2000}`` 0.2 s, ``a{4000}`` 3 s, ``a{20000}``
  over 90 s; ``(ab|cd){5000}`` 6 s; nested counts multiply;
* many optional properties in one object: 256 take 0.09 s, 512 0.38 s, 1,000 4.5 s, 5,000 over 40 s;
* ``anyOf`` / ``oneOf`` branches: 1,000 take 0.1 s, 10,000 8 s and 1.3 GB;
* enum / const values: 5,000 short ones 0.1 s, 10,000 0.56 s, 100,000 over 40 s; characters, 100,000 0.5 s;
* a regex or an EBNF grammar of 100,000 alternatives (1.2 MB): 20 s and half a GB; 10,000 EBNF rules over 25 s.

The limits sit well above any real schema (a 28 KB one with 108 properties, 754 enum values, ``$defs`` and
patterns passes all of them and compiles in 0.16 s) and near OpenAI's documented ones for Structured Outputs
(5,000 properties, 1,000 enum values, 120,000 characters of names and values). Each check is one walk over the
parsed document, without recursion (the document may nest as deep as MAX_SCHEMA_DEPTH before it is parsed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

# How deep a JSON schema (or a tool schema) may nest its objects and arrays, counting each $ref's hop to its
# target. Compile time grows much faster than depth: 128 nested array schemas (256 levels) compile in 0.1 s, 256
# in 0.7 s, 900 took over a minute, and a chain of 5,000 references killed the process. Real schemas nest a few
# dozen levels at most.
MAX_SCHEMA_DEPTH = 256
MAX_PROPERTIES = 5_000  # in the whole schema (OpenAI's limit; 5,000 required ones compile in 1.4 s)
MAX_OPTIONAL_PROPERTIES = 256  # in one object: properties not listed as required
MAX_BRANCHES = 1_000  # anyOf and oneOf alternatives, in the whole schema
MAX_VALUES = 10_000  # enum values and consts, in the whole schema (all tools together), or a choice's strings
MAX_VALUE_CHARACTERS = 120_000  # of those values (as JSON) and of property names (OpenAI's limit)
MAX_PATTERN_CHARACTERS = 4_096  # one pattern (of a string, or of property names)
MAX_PATTERN_GROUPS = 64  # how deep a pattern's groups nest
MAX_PATTERN_SIZE = 2_000  # a pattern written out: its characters with each counted repetition multiplied out
MAX_SOURCE_BYTES = 32 * 2**10  # a regex or an EBNF grammar

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")
_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def json_nesting_depth(document: str) -> int:
    """How deep a JSON document's objects and arrays nest (its brackets outside strings)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", document)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def limit_problem(kind: str, source: str, choices: Sequence[str] = ()) -> str | None:
    """What makes a constraint too costly to compile, or None. ``kind`` and ``source`` as in ``GrammarSpec``
    (json: a JSON schema's text; structural_tag: a tool grammar's, whose schemas are checked as one)."""
    if kind == "choice":
        return _values_problem(len(choices), sum(len(choice) for choice in choices))
    if kind in ("regex", "ebnf"):
        size = len(source.encode())
        return None if size <= MAX_SOURCE_BYTES else f"{size} bytes long; at most {MAX_SOURCE_BYTES}"
    if (depth := json_nesting_depth(source)) > MAX_SCHEMA_DEPTH:
        return f"nested {depth} levels deep; at most {MAX_SCHEMA_DEPTH}"
    try:
        document = json.loads(source)
    except (ValueError, RecursionError):
        return None  # the compiler says what is wrong with it
    return _SchemaWalk(document).problem()


def _values_problem(values: int, characters: int) -> str | None:
    if values > MAX_VALUES:
        return f"{values} enum, const or choice values; at most {MAX_VALUES}"
    if characters > MAX_VALUE_CHARACTERS:
        return f"{characters} characters of values and property names; at most {MAX_VALUE_CHARACTERS}"
    return None


def pattern_problem(pattern: str) -> str | None:
    """What makes a JSON schema ``pattern`` too costly: its length, its groups' depth, its written-out size."""
    if len(pattern) > MAX_PATTERN_CHARACTERS:
        return f"a pattern is {len(pattern)} characters long; at most {MAX_PATTERN_CHARACTERS}"
    groups, size = _pattern_shape(pattern)
    if groups > MAX_PATTERN_GROUPS:
        return f"a pattern's groups nest {groups} deep; at most {MAX_PATTERN_GROUPS}"
    if size > MAX_PATTERN_SIZE:
        return f"a pattern written out (its counted repetitions repeated) is {size} long; at most {MAX_PATTERN_SIZE}"
    return None


def _pattern_shape(pattern: str) -> tuple[int, int]:
    """(how deep its groups nest, its size written out). The size counts each character, escape or class as 1,
    and multiplies what a ``{m}`` / ``{m,n}`` follows (a character, a class or a group) by its larger count:
    ``(ab|cd){3}`` is 5 x 3. An approximation of the rules xgrammar writes, never an undercount of repetition."""
    sizes = [0]  # the size so far of each open group, outermost first
    last = 0  # the size of the last atom, which a following count repeats
    deepest = i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            last = 1
        elif c == "[":  # a class: to its closing bracket (one written first, or escaped, does not close it)
            i += 2 if pattern[i + 1 : i + 2] == "]" else 1
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
            last = 1
        elif c == "(":
            sizes.append(0)
            deepest = max(deepest, len(sizes) - 1)
            i += 1
            continue
        elif c == ")" and len(sizes) > 1:
            last = sizes.pop()
            sizes[-1] += last
            i += 1
            continue
        elif c == "{" and (count := _COUNT.match(pattern, i)):
            most = max(int(count[1]), int(count[2]) if count[2] else 0)
            sizes[-1] += last * (most - 1) if most else -last
            last *= max(most, 1)
            i = count.end()
            continue
        elif c in "|*+?^$":
            i += 1
            last = 0 if c == "|" else last
            continue
        else:
            i += 1
            last = 1
        sizes[-1] += 1
    return deepest, sum(sizes)


class _SchemaWalk:
    """One pass over a parsed schema (or tool grammar), counting what costs the compiler, without recursion."""

    def __init__(self, document: Any) -> None:
        self.root = document
        self.properties = self.branches = self.values = self.characters = 0

    def problem(self) -> str | None:
        depth = self._deepest()
        if isinstance(depth, str):
            return depth
        if depth > MAX_SCHEMA_DEPTH:
            return f"nested {depth} levels deep, counting each $ref as a level; at most {MAX_SCHEMA_DEPTH}"
        if self.properties > MAX_PROPERTIES:
            return f"{self.properties} properties; at most {MAX_PROPERTIES}"
        if self.branches > MAX_BRANCHES:
            return f"{self.branches} anyOf or oneOf alternatives; at most {MAX_BRANCHES}"
        return _values_problem(self.values, self.characters)

    def _deepest(self) -> int | str:
        """The deepest path through the document, a $ref going on into its target (a reference back into the
        path, a recursive schema, ends it: the compiler makes that a rule of its own). Counts as it goes; a
        problem found on the way is returned as text."""
        depth_of: dict[int, int] = {}  # id(node) -> its depth, once its children are done
        on_path: set[int] = set()
        # Each frame: a node, its children still to visit, the deepest child so far.
        stack: list[tuple[Any, Iterator[Any], list[int]]] = []
        if (problem := self._enter(self.root, stack, on_path)) is not None:
            return problem
        while stack:
            node, children, deepest = stack[-1]
            child = next(children, _DONE)
            if child is _DONE:
                stack.pop()
                on_path.discard(id(node))
                depth_of[id(node)] = deepest[0] + 1
                if stack:
                    stack[-1][2][0] = max(stack[-1][2][0], depth_of[id(node)])
                continue
            if not isinstance(child, dict | list) or id(child) in on_path:
                continue
            if id(child) in depth_of:
                deepest[0] = max(deepest[0], depth_of[id(child)])
                continue
            if (problem := self._enter(child, stack, on_path)) is not None:
                return problem
        return depth_of.get(id(self.root), 0)

    def _enter(self, node: Any, stack: list[tuple[Any, Iterator[Any], list[int]]], on_path: set[int]) -> str | None:
        """Count ``node``'s own costs and push it, with its children (and its $ref's target) to visit."""
        if not isinstance(node, dict | list):
            return None
        on_path.add(id(node))
        children: list[Any] = list(node.values()) if isinstance(node, dict) else list(node)
        if isinstance(node, dict):
            if (problem := self._count(node)) is not None:
                return problem
            ref = node.get("$ref")
            if isinstance(ref, str) and (target := self._resolve(ref)) is not None:
                children.append(target)
        stack.append((node, iter(children), [0]))
        return None

    def _count(self, node: dict[str, Any]) -> str | None:
        properties = node.get("properties")
        if isinstance(properties, dict):
            self.properties += len(properties)
            self.characters += sum(len(name) for name in properties)
            required = node.get("required")
            listed = {name for name in required if isinstance(name, str)} if isinstance(required, list) else set()
            optional = sum(1 for name in properties if name not in listed)
            if optional > MAX_OPTIONAL_PROPERTIES:
                return f"an object has {optional} optional properties; at most {MAX_OPTIONAL_PROPERTIES}"
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                self.branches += len(node[key])
        if isinstance(node.get("enum"), list):
            self.values += len(node["enum"])
            self.characters += sum(len(json.dumps(value)) for value in node["enum"])
        if "const" in node:
            self.values += 1
            self.characters += len(json.dumps(node["const"]))
        patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            if (problem := pattern_problem(pattern)) is not None:
                return problem
        return None

    def _resolve(self, ref: str) -> Any:
        """The node a local reference ("#", "#/$defs/name", any JSON pointer) points at; None if none."""
        if not ref.startswith("#"):
            return None
        node = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node


_DONE = object()
