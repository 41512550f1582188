"""Structured output: sampling held to a JSON schema, a regular expression, a list of choices or an EBNF grammar.

xgrammar (vLLM's default backend for the same thing) does the grammar work. A request's constraint is compiled
once, off the engine thread (``GrammarCompiler.compile``: the API calls it from a worker thread), and kept per
tenant, so a schema a tenant's requests share compiles once, in a few ms. Each row that has a constraint
holds a ``GrammarMatcher``: before a sampling call, the tokens its matcher allows next go into a bitmask
[B, ceil(V / 32)] int32 and every other token's logit becomes -inf; after the call, the matcher takes the sampled
token. A grammar ends only with EOS, which the mask allows once the text is complete and nothing else can follow;
the engine's usual EOS handling then ends the request (so a constrained request cannot also ``ignore_eos``).

JSON comes out compact: no free whitespace between its tokens (vLLM's ``--disable-any-whitespace``). Left free,
a small model held to JSON tends to write whitespace until it runs out of tokens.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from prefix_store.fair_slots import FairSlots
from server.config import GRAMMAR_CACHE_BYTES
from server.grammar_limits import limit_problem

GrammarKind = Literal["json", "regex", "choice", "ebnf", "structural_tag"]
# xgrammar's errors start with where in its C++ sources they were raised: "[00:19:35] /project/cpp/x.cc:83: ".
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """The constraint cannot be compiled (a bad schema, regex or grammar): the client's mistake, a 400."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match, as the client gave it.

    json: ``source`` is a JSON schema as JSON text; regex: a regular expression the whole output matches;
    choice: one of ``choices`` exactly; ebnf: a grammar in xgrammar's EBNF (GBNF-like, rule ``root`` first);
    structural_tag: xgrammar's structural tag as JSON text (the server's, for tool calls: server/api/tool_formats.py).
    """

    kind: GrammarKind
    source: str = ""
    choices: tuple[str, ...] = ()

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> GrammarSpec:
        """A JSON schema given as an object (or ``true``) or as its JSON text. Its keys keep their order: the
        properties of an object are written in the order the schema lists them."""
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema))

    def describe(self) -> str:
        """A short name for logs and errors."""
        return {
            "json": "JSON schema",
            "regex": "regex",
            "choice": "choice",
            "ebnf": "EBNF grammar",
            "structural_tag": "tool schema",
        }[self.kind]


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled constraint; one is shared by every request that sends the same ``spec``."""

    spec: GrammarSpec
    compiled: xgr.CompiledGrammar = field(repr=False)

    def matcher(self) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.compiled)


# Constraints compiled at once: each compile takes one core (xgrammar's max_threads=1), beside the engine's.
MAX_CONCURRENT_COMPILES = 2


class GrammarCompiler:
    """Compiles ``GrammarSpec``s against one tokenizer's vocabulary; thread-safe, and lazy: the vocabulary's
    tables (~0.1 s for a 49k vocabulary) are built by the first ``compile``, not at server start."""

    def __init__(self, tokenizer_info: Callable[[], xgr.TokenizerInfo], cache_bytes: int = GRAMMAR_CACHE_BYTES) -> None:
        self._tokenizer_info = tokenizer_info
        self._cache_bytes = cache_bytes
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        # Tenants take turns, one compile each at a time: a schema can take minutes of a core, and one tenant's
        # backlog of them held every slot (and every I/O thread) while others' constraints waited.
        self._compiling = FairSlots(MAX_CONCURRENT_COMPILES, per_owner=1)
        # What was compiled, per owner (a tenant), least recently used first. Not xgrammar's own cache, which is
        # one for everyone: a repeat's quick answer would tell a tenant that another had sent that exact schema
        # (its field names, its choices), even before a 404 for a made-up task, since constraints compile first.
        self._kept: OrderedDict[tuple[str, GrammarSpec], Grammar] = OrderedDict()
        self._kept_bytes = 0

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Sequence[int]
    ) -> GrammarCompiler:
        """``vocab_size``: the model's logits width (it may exceed the tokenizer's: the extra ids are never
        allowed); ``stop_token_ids``: the model's EOS tokens, which end a grammar."""
        return cls(
            lambda: xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
            )
        )

    def compile(self, spec: GrammarSpec, owner: str = "") -> Grammar:
        """The compiled constraint, or GrammarError saying what is wrong with it. At most MAX_CONCURRENT_COMPILES
        run at once, one per ``owner`` (a large schema takes seconds of a core, which the engine's steps would
        otherwise share with as many compiles as requests bring); ``owner``'s repeats are kept, and wait for no
        compile."""
        compiler = self._ready()
        kept = self.kept(spec, owner)
        if kept is not None:
            return kept
        # Refused before it waits for a compile slot: the check costs one walk over the text, not a turn.
        if (problem := limit_problem(spec.kind, spec.source, spec.choices)) is not None:
            raise GrammarError(f"invalid {spec.describe()}: {problem}")
        with self._compiling.slot(owner):
            grammar = self._compile(compiler, spec)
        self._keep(owner, grammar)
        return grammar

    def kept(self, spec: GrammarSpec, owner: str = "") -> Grammar | None:
        """``owner``'s constraint for ``spec`` if it was compiled and kept (no waiting: fit for an event loop)."""
        if self._compiler is None:  # nothing compiled yet; and _ready may hold the lock while it reads the vocabulary
            return None
        with self._lock:
            kept = self._kept.get((owner, spec))
            if kept is not None:
                self._kept.move_to_end((owner, spec))
            return kept

    def _keep(self, owner: str, grammar: Grammar) -> None:
        size = grammar.compiled.memory_size_bytes
        with self._lock:
            if size > self._cache_bytes or (owner, grammar.spec) in self._kept:
                return
            self._kept[(owner, grammar.spec)] = grammar
            self._kept_bytes += size
            while self._kept_bytes > self._cache_bytes:
                _, evicted = self._kept.popitem(last=False)
                self._kept_bytes -= evicted.compiled.memory_size_bytes

    def _compile(self, compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> Grammar:
        try:
            if spec.kind == "json":
                compiled = compiler.compile_json_schema(spec.source, any_whitespace=False)
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.source)
            elif spec.kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(spec.choices))
            elif spec.kind == "structural_tag":
                compiled = compiler.compile_structural_tag(spec.source)
            else:
                compiled = compiler.compile_grammar(spec.source)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar raises RuntimeError for bad input
            message = _SOURCE_LOCATION.sub("", str(exc).strip()).splitlines()[0] if str(exc).strip() else repr(exc)
            raise GrammarError(f"invalid {spec.describe()}: {message}") from exc
        grammar = Grammar(spec, compiled)
        if not _allows_a_first_token(grammar):
            # e.g. "root ::= root", or a regex of characters no token holds: every logit would be masked.
            raise GrammarError(f"invalid {spec.describe()}: no text this model can write satisfies it")
        return grammar

    @property
    def cache_bytes(self) -> int:
        """What the compiled constraints kept for reuse hold now."""
        with self._lock:
            return self._kept_bytes

    def _ready(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                try:
                    info = self._tokenizer_info()
                except Exception as exc:  # a tokenizer xgrammar cannot read: no constraint can be compiled
                    raise GrammarError(f"structured output is not available for this model's tokenizer: {exc}") from exc
                # One thread: the engine owns the other cores. Its cache is off: ``_kept`` keeps what was compiled.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler


def _allows_a_first_token(grammar: Grammar) -> bool:
    """Whether a fresh matcher allows any token at all (one bitmask fill: ~0.1 ms for a 49k vocabulary)."""
    matcher = grammar.matcher()
    if matcher.is_terminated():
        return True
    bitmask = xgr.allocate_token_bitmask(1, grammar.compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return bool(bitmask.any())


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (JSON string escapes are EBNF's too)."""
    if not choices:
        raise GrammarError("a choice needs at least one string")
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


@dataclass
class GrammarRows:
    """The matchers of the rows of a batch that have a constraint, aligned with the batch as it filters and
    concatenates (like ``LogitAdjustments``)."""

    rows: tuple[int, ...]  # the P rows of the batch that have a matcher
    matchers: list[xgr.GrammarMatcher]
    # [B, ceil(V / 32)] int32 on the host, kept between calls while B stays the same (xgrammar's bitmask layout:
    # bit j of row i set = token j allowed).
    _bitmask: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, grammars: Sequence[Grammar | None]) -> GrammarRows | None:
        rows = tuple(i for i, grammar in enumerate(grammars) if grammar is not None)
        if not rows:
            return None
        return cls(rows, [grammars[i].matcher() for i in rows])  # type: ignore[union-attr]

    def mask(self, logits: torch.Tensor) -> None:
        """Set to -inf, in place, each constrained row's logits of the tokens its grammar does not allow next.
        logits: [B, V]. A matcher that has ended (its row rides one step more, its token dropped) masks nothing."""
        live = [(row, m) for row, m in zip(self.rows, self.matchers, strict=True) if not m.is_terminated()]
        if not live:
            return
        batch, vocab = logits.shape
        if self._bitmask is None or self._bitmask.shape[0] != batch:
            self._bitmask = xgr.allocate_token_bitmask(batch, vocab)
        for row, matcher in live:
            matcher.fill_next_token_bitmask(self._bitmask, row)
        apply_bitmask(logits, self._bitmask, [row for row, _ in live])

    def at_positions(self, drafts: Sequence[Sequence[int]], counts: Sequence[int], vocab: int) -> DraftMasks:
        """The masks of a speculative step, whose row r samples at ``counts[r]`` queries, row after row
        (server/runner.py): the i-th after its input token and ``drafts[r][:i]``. Each matcher takes the drafts
        it allows, one by one, and gives the mask at each; past a draft it does not allow, or its end, the row's
        queries get none (what they sample is never kept: the draft before them cannot equal a token sampled
        under the mask).
        The matchers are left as they were; ``advance`` moves them past the tokens the rows keep."""
        starts = list(itertools.accumulate([0, *counts]))  # row r's queries: starts[r] .. starts[r + 1] - 1
        bitmask = xgr.allocate_token_bitmask(starts[-1], vocab)
        masked: list[int] = []
        for row, matcher in zip(self.rows, self.matchers, strict=True):
            taken = 0
            for i in range(counts[row]):
                if matcher.is_terminated():
                    break
                matcher.fill_next_token_bitmask(bitmask, starts[row] + i)
                masked.append(starts[row] + i)
                if i == len(drafts[row]) or not matcher.accept_token(drafts[row][i]):
                    break
                taken += 1
            if taken:
                matcher.rollback(taken)
        return DraftMasks(tuple(masked), bitmask)

    def advance(self, kept: Sequence[Sequence[int]]) -> None:
        """Move each matcher past the tokens its row kept in a speculative step (row after row)."""
        for row, matcher in zip(self.rows, self.matchers, strict=True):
            for token in kept[row]:
                if matcher.is_terminated():
                    break
                matcher.accept_token(token)  # sampled under the mask (``at_positions``): allowed

    def accept(self, tokens: torch.Tensor) -> None:
        """Advance each live matcher past its row's sampled token. tokens: [B] int64 (read on the host)."""
        picked = tokens[list(self.rows)].tolist()
        for matcher, token in zip(self.matchers, picked, strict=True):
            if not matcher.is_terminated():
                # The mask allowed only tokens the matcher accepts; a refusal would mean non-finite logits.
                matcher.accept_token(token)

    def filter(self, kept_rows: Sequence[int]) -> GrammarRows | None:
        """The rows ``kept_rows`` of the batch, in that order."""
        where = {row: i for i, row in enumerate(self.rows)}
        kept = [(new, where[old]) for new, old in enumerate(kept_rows) if old in where]
        if not kept:
            return None
        return GrammarRows(tuple(new for new, _ in kept), [self.matchers[i] for _, i in kept])

    @classmethod
    def concatenate(cls, parts: Sequence[tuple[GrammarRows | None, int]]) -> GrammarRows | None:
        """Batches stacked row-wise: (each one's grammar rows, its number of rows)."""
        rows: list[int] = []
        matchers: list[xgr.GrammarMatcher] = []
        offset = 0
        for part, size in parts:
            if part is not None:
                rows.extend(offset + row for row in part.rows)
                matchers.extend(part.matchers)
            offset += size
        return cls(tuple(rows), matchers) if rows else None


@dataclass(frozen=True)
class DraftMasks:
    """The grammar masks of a speculative step's queries (``GrammarRows.at_positions``), in the shape ``sample``
    takes a batch's grammars: it masks, and leaves the matchers to ``GrammarRows.advance``."""

    rows: tuple[int, ...]  # the queries (of sum n_r, row after row) that have a mask
    bitmask: torch.Tensor = field(repr=False)  # [sum n_r, ceil(V / 32)] int32

    def mask(self, logits: torch.Tensor) -> None:
        """logits: [sum n_r, V], masked in place."""
        if self.rows:
            apply_bitmask(logits, self.bitmask, list(self.rows))

    def accept(self, tokens: torch.Tensor) -> None:
        """Nothing: which of a speculative step's tokens a row keeps is known only after sampling."""


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of ``rows`` whose bit in ``bitmask`` is clear. logits: [B, V]; bitmask:
    [B, ceil(V / 32)] int32 on the host (xgrammar's layout: bit j of row i set = token j allowed)."""
    batch, vocab = logits.shape
    if logits.device.type != "cpu" or sys.byteorder != "little":  # xgrammar's kernel (its GPU one on CUDA)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab, indices=rows)
        return
    # On the CPU, xgrammar's kernel goes bit by bit: 4.6 ms for 32 rows of 49,152 tokens on the CI machine.
    # Unpacked by numpy into one byte per token (the words are little-endian: bit j of the row is token j) and
    # applied by masked_fill: 0.5 ms.
    words = bitmask[rows].numpy()  # [L, W] int32
    disallowed = torch.from_numpy(np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[:, :vocab] == 0)
    if len(rows) == batch:  # every row constrained: one pass
        logits.masked_fill_(disallowed, -math.inf)
    else:
        for i, row in enumerate(rows):
            logits[row].masked_fill_(disallowed[i], -math.inf)
