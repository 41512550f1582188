"""Turning a request's token stream into text pieces: incremental detokenisation and stop strings.

The streamed pieces concatenate to exactly the final text: the non-streamed
response is built from the same pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# How many prompt tokens seed the detokeniser, so that the first generated
# token decodes with the spacing it has in context (sentencepiece drops a
# leading space when a token is decoded alone).
_CONTEXT_TOKENS = 4
# Tokens held back at most while their text is unfinished: a UTF-8 character takes at most 4 byte tokens, so more
# is a model writing stray bytes (each held token made every later step decode a longer window: quadratic).
_MAX_HELD_TOKENS = 8


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Emits text only once it is stable: never half of a multi-byte character."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = len(self._ids)  # tokens before this were already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is left when the request ends, but for a character it ended inside of (max_tokens cut it):
        that would read as U+FFFD, which the model never wrote. vLLM leaves it out too."""
        return self._advance(final=True).rstrip("\ufffd")

    def _advance(self, *, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        emitted = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        waiting = len(self._ids) - self._read_offset
        if not final and waiting <= _MAX_HELD_TOKENS and (len(full) <= len(emitted) or full.endswith("\ufffd")):
            return ""  # an unfinished byte sequence: wait for the next token
        piece = full[len(emitted) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return piece


class StopMatcher:
    """Cuts the text at the first stop string (after it, with ``include``) and holds back any tail that could
    start one."""

    def __init__(self, stop: Sequence[str], include: bool = False) -> None:
        self._stop = [s for s in stop if s]
        self._include = include
        self._pending = ""

    def feed(self, piece: str, match: bool = True) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string completed). ``match`` False: the text is not searched
        yet (``min_tokens`` not reached, as vLLM does), though a tail that may start a stop string is still held.

        A stop string must end in ``piece``: one that lies whole in the held-back tail arrived while matching was
        off (otherwise the tail never holds one: it would have been found)."""
        text = self._pending + piece
        if not self._stop:
            self._pending = ""
            return text, False
        held = len(self._pending)
        hits = [(i, s) for s in self._stop if match and (i := text.find(s, max(0, held - len(s) + 1))) >= 0]
        if hits:
            self._pending = ""
            at, stop = min(hits, key=lambda hit: hit[0])
            return text[: at + len(stop) if self._include else at], True
        hold = partial_match_length(text, self._stop)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back tail, released when the request ends without a stop string."""
        text, self._pending = self._pending, ""
        return text


def partial_match_length(text: str, strings: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``strings``: what to hold back
    while it may yet become one of them."""
    best = 0
    for string in strings:
        for n in range(min(len(string) - 1, len(text)), best, -1):
            if text.endswith(string[:n]):
                best = n
                break
    return best
