"""Structured output on the OpenAI routes: OpenAI's ``response_format`` and vLLM's ``structured_outputs``.

``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (a JSON object) or
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``. vLLM's extension
``structured_outputs`` takes exactly one of ``json`` (a schema), ``regex``, ``choice``, ``grammar`` (EBNF) or
``json_object: true``; its older fields ``guided_json``, ``guided_regex``, ``guided_choice`` and ``guided_grammar``
are taken too. Both endpoints take all of them, as vLLM's do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.structured_output import GrammarSpec


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = None  # OpenAI requires it and only uses it to name the schema; so do we not
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always followed strictly here


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (the successor of its ``guided_*`` fields)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


class FormatError(ValueError):
    """A structured-output request the server cannot read; ``param`` names the field at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def grammar_of(response_format: ResponseFormat | None, structured: StructuredOutputs | None) -> GrammarSpec | None:
    """The constraint a request asks for, or None; FormatError when it asks for two or gives one badly."""
    specs: list[GrammarSpec] = []
    if response_format is not None and response_format.type == "json_object":
        specs.append(GrammarSpec.json_schema({"type": "object"}))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise FormatError("response_format", "response_format of type 'json_schema' needs json_schema.schema")
        specs.append(GrammarSpec.json_schema(response_format.json_schema.schema_))
    if structured is not None:
        given = [
            spec
            for spec in (
                None if structured.json_ is None else GrammarSpec.json_schema(structured.json_),
                None if structured.regex is None else GrammarSpec("regex", structured.regex),
                None if structured.choice is None else GrammarSpec("choice", choices=tuple(structured.choice)),
                None if structured.grammar is None else GrammarSpec("ebnf", structured.grammar),
                GrammarSpec.json_schema({"type": "object"}) if structured.json_object else None,
            )
            if spec is not None
        ]
        if len(given) != 1:
            raise FormatError(
                "structured_outputs",
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
            )
        specs.extend(given)
    if len(specs) > 1:
        raise FormatError("structured_outputs", "give response_format or structured_outputs, not both")
    return specs[0] if specs else None
