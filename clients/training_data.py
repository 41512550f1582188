"""Training data for ``prefix-serve train``: JSONL records, checked before any model is loaded, then tokenised.

Each line is one JSON object, either

* ``{"prompt": str, "completion": str}`` — the text is prompt + completion as they are, EOS is appended, and
  only the completion's tokens (and the EOS) carry loss; or
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` — rendered with the model's chat template, loss on
  the assistant turns only.

Tokenisation mirrors what the server does at request time, so that what the prefix learns is what it sees
when served: a prompt is tokenised on its own (``tokenizer(prompt)``), and chat context up to each assistant
turn is the template rendered with ``add_generation_prompt=True`` and tokenised without special tokens.
This module imports no torch: ``import clients`` stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

IGNORE_INDEX = -100  # label of tokens without loss (transformers' cross-entropy ignore_index)
ROLES = ("system", "user", "assistant", "tool")  # "tool": a tool's answer, as the chat template renders it


class TrainingDataError(ValueError):
    """A malformed training file; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in its file, for error messages
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss
    line: int


class Tokenizer(Protocol):
    """The part of a transformers tokenizer we use."""

    chat_template: Any

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def _parse_line(raw: str, source: Path, line: int) -> Example | None:
    where = f"{source} line {line}"
    if not raw.strip():
        return None  # blank lines (a trailing newline, spacing) are allowed
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise TrainingDataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise TrainingDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_pair, has_messages = "prompt" in obj or "completion" in obj, "messages" in obj
    if has_pair == has_messages:
        raise TrainingDataError(
            f'{where}: expected {{"prompt": str, "completion": str}} or {{"messages": [...]}}, got keys {sorted(obj)}'
        )
    extra = set(obj) - ({"prompt", "completion"} if has_pair else {"messages"})
    if extra:
        raise TrainingDataError(f"{where}: unexpected keys {sorted(extra)}")
    if has_pair:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise TrainingDataError(f"{where}: {key!r} must be a string, got {_kind(obj.get(key))}")
        if not obj["completion"]:
            raise TrainingDataError(f"{where}: 'completion' is empty (nothing to learn)")
        return Example(line=line, prompt=obj["prompt"], completion=obj["completion"])
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise TrainingDataError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        if message["role"] not in ROLES:
            raise TrainingDataError(
                f"{where}: messages[{i}].role must be one of {list(ROLES)}, not {message['role']!r:.40}"
            )
        if not isinstance(message["content"], str):
            raise TrainingDataError(f"{where}: messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainingDataError(f"{where}: no assistant message (nothing to learn)")
    if messages[0]["role"] == "assistant":
        raise TrainingDataError(f"{where}: the conversation must not start with an assistant message")
    return Example(line=line, messages=tuple(dict(m) for m in messages))


def _kind(value: object) -> str:
    return "missing" if value is None else type(value).__name__


def read_examples(path: str | Path) -> list[Example]:
    """Parse and check every line of a JSONL file; TrainingDataError at the first malformed one."""
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingDataError(f"no such file: {source}") from None
    except UnicodeDecodeError as exc:
        raise TrainingDataError(f"{source}: not UTF-8 text ({exc})") from None
    examples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        example = _parse_line(raw, source, number)
        if example is not None:
            examples.append(example)
    if not examples:
        raise TrainingDataError(f"{source}: no examples")
    return examples


def _ids(tokenizer: Tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids) if text else []


def _render(tokenizer: Tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def tokenize_example(example: Example, tokenizer: Tokenizer, eos_token_id: int, *, source: str = "") -> Tokenized:
    """Token ids and labels of one example (see the module docstring for what carries loss)."""
    where = f"{source} line {example.line}".strip()
    if example.messages is None:
        assert example.prompt is not None and example.completion is not None
        # The server tokenises the prompt alone, then generates; so the completion starts at a token boundary.
        prompt_ids = _ids(tokenizer, example.prompt, special=True)
        completion_ids = [*_ids(tokenizer, example.completion, special=False), eos_token_id]
        return Tokenized(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, example.line)
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError(f"{where}: 'messages' given but the model's tokenizer has no chat template")
    messages = list(example.messages)
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""  # rendered text already tokenised
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Context up to this turn, as the server renders a chat request; then the turn itself, with loss.
        context = _render(tokenizer, messages[:i], generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not context.startswith(done) or not turn.startswith(context):
            raise TrainingDataError(
                f"{where}: the chat template does not render this conversation turn by turn, "
                "so the assistant turns cannot be located; use prompt/completion records"
            )
        ids = _ids(tokenizer, context[len(done) :], special=False)
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids)
        ids = _ids(tokenizer, turn[len(context) :], special=False)
        input_ids += ids
        labels += ids
        done = turn
    return Tokenized(input_ids, labels, example.line)
