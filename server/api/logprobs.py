"""Log-probabilities in each API's words: native, OpenAI completions (legacy) and OpenAI chat.

The engine hands out a ``TokenLogprob`` per token for requests that asked (server/sampling.py: the model's own
distribution, before temperature, top-k and top-p). A token's text is what the tokenizer decodes for it alone,
as vLLM reports it; a token that is part of a multi-byte character decodes to U+FFFD on its own. Its ``bytes``
(chat) are the token's own, as OpenAI gives them, so that a client joining them gets the text back.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:  # the client imports the response models here, and must not import torch
    from server.sampling import TokenLogprob

logger = logging.getLogger(__name__)


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprobOut(BaseModel):
    """A generated token's log-probability and the most likely alternatives' (native API)."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TopLogprob]


class TokenTexts:
    """Each token's text alone, decoded once per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = "" if self._tokenizer is None else self._tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text

    def bytes_of(self, token_id: int) -> bytes:
        """The token's own bytes: half a character's UTF-8 where its text alone is U+FFFD."""
        vocabulary = () if self._tokenizer is None else _vocabulary_bytes(self._tokenizer)
        return vocabulary[token_id] if token_id < len(vocabulary) else self(token_id).encode()


@functools.lru_cache(maxsize=2)
def _vocabulary_bytes(tokenizer: Any) -> tuple[bytes, ...]:
    """Every token id's bytes (~0.1 s once for a 49k vocabulary). xgrammar reads them out of any Hugging Face
    vocabulary (byte-level BPE, SentencePiece's byte fallback, plain strings) for its grammars."""
    import xgrammar as xgr  # not at import: the client imports this module's models

    try:
        return tuple(bytes(token) for token in xgr.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab)
    except (RuntimeError, ValueError, TypeError) as exc:
        logger.warning("token bytes unknown for this vocabulary (%s): each token's text's bytes are given instead", exc)
        return ()


def native(token_id: int, logprob: TokenLogprob, texts: TokenTexts) -> TokenLogprobOut:
    return TokenLogprobOut(
        token_id=token_id,
        token=texts(token_id),
        logprob=logprob.logprob,
        top_logprobs=[TopLogprob(token_id=i, token=texts(i), logprob=lp) for i, lp in logprob.top],
    )


def native_prompt(
    prompt_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None], texts: TokenTexts
) -> list[TokenLogprobOut | None]:
    """A prompt's log-probabilities (native API): one per prompt token, None where the engine has none (the first)."""
    return [
        None if logprob is None else native(token_id, logprob, texts)
        for token_id, logprob in zip(prompt_ids, logprobs, strict=True)
    ]


def completion(
    tokens: Sequence[tuple[int, TokenLogprob | None]], texts: TokenTexts, text_offset: int = 0
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object of some tokens; ``text_offset`` is where the first one's text
    starts in the completion. Alternatives that decode to the same text keep the likelier one (a dict by text).
    A token without a log-probability (an echoed prompt's first) gets null for its value and alternatives."""
    strings, offsets, values, top = [], [], [], []
    for token_id, logprob in tokens:
        string = texts(token_id)
        strings.append(string)
        offsets.append(text_offset)
        text_offset += len(string)
        if logprob is None:
            values.append(None)
            top.append(None)
            continue
        alternatives: dict[str, float] = {}
        for i, lp in logprob.top:
            alternatives.setdefault(texts(i), lp)
        alternatives.setdefault(string, logprob.logprob)  # OpenAI: "always" the chosen token's, up to logprobs + 1
        values.append(logprob.logprob)
        top.append(alternatives)
    return {"tokens": strings, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}


def chat(tokens: Sequence[tuple[int, TokenLogprob]], texts: TokenTexts) -> dict[str, Any]:
    """The chat completions ``logprobs`` object of some tokens."""

    def entry(token_id: int, value: float) -> dict[str, Any]:
        string = texts(token_id)
        return {"token": string, "logprob": value, "bytes": list(texts.bytes_of(token_id))}

    content = [
        {**entry(token_id, logprob.logprob), "top_logprobs": [entry(i, lp) for i, lp in logprob.top]}
        for token_id, logprob in tokens
    ]
    return {"content": content, "refusal": None}
