"""Speculative decoding by prompt lookup: draft tokens copied from the row's own context, verified in one forward.

Prefix-tuned tasks often copy: a table-to-text row repeats the record's names, a summary quotes its article, an
edit repeats the code it edits. When the last few tokens of a row's context (prompt and output so far) occurred
before in it, the tokens that followed them then are a good guess of what comes next; where the row's own
context has nothing, the same lookup runs over its task's recent outputs (``TaskHistory``: a prefix-tuned
task writes to templates, so one request's words draft the next one's). A decode step can check
k such guesses at once: the row feeds its input token and the k drafts as k + 1 queries, and the logits at
query i give the token that truly follows the first i drafts. The greedy token is taken at every query; drafts
are accepted while they equal it, and the first token that differs (or the one after the last draft) comes
free. The output is the greedy output, token for token: only how many tokens a step yields changes.

A sampling row verifies the same way: at each query it samples as it would have at that step (its draw is a hash
of its seed and step, server/sampling.py), and a draft stands while it equals the token drawn. For a draft that
is one fixed guess this is exactly sampling one token at a time (the draft stands with the probability the model
gives it, as in speculative sampling), and the output is the same as without speculation, whatever the row's
batch-mates or how many drafts stood.

On a CPU the forward of a few rows is bound by reading the weights, not by its tokens, so verifying k drafts
costs a lone stream little more than one decode step; but each extra token still adds ~4.5% to a step of the
default model (1 to 4 rows, bench/RESULTS.md); a row feeds only its own drafts (attention alone lays a
group's queries out padded). So each row keeps its drafts' acceptance rate, and each step takes the most
drafts per row that maximises the expected tokens per unit of step time (``plan``),
none when no number beats a plain step; no row drafts once more than ``SpeculativeConfig.max_rows`` decode.
Rows with penalties, biases or log-probabilities do not speculate: their state (tokens seen) or what they
report follows the tokens one at a time. A row held to a grammar does: its matcher takes the drafts to give each
query its mask, and goes back to take the tokens the row keeps (server/structured_output.py).

This is prompt lookup decoding (Saxena, 2023), vLLM's "ngram" speculative method and TGI's ``--speculate``
n-gram mode. A request may also bring its own guess of the output (OpenAI's predicted outputs, ``Prediction``):
looked up first, with up to ``PREDICTION_DRAFT_TOKENS`` drafts a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefix_store.lru import ByteLRU
from server.sampling import SamplingParams

# Drafts per row and step by default on a CPU (``--speculative-tokens``).
DEFAULT_CPU_SPECULATIVE_TOKENS = 4


@dataclass(frozen=True)
class SpeculativeConfig:
    """When and how far rows speculate."""

    tokens: int = 0  # drafts proposed per row and step (k); 0 = off
    max_rows: int = 8  # speculate only while at most this many rows decode
    ngram_max: int = 4  # the longest context suffix looked up
    ngram_min: int = 2  # the shortest: a single token matches too often to be a good guess
    # A decode step's time, in units of one row's plain step: 1 + row_cost per further row, + verify_overhead
    # when it verifies drafts beside other rows, + draft_cost per draft token. Measured on the 2-core CPU with the
    # default model at 1-8 rows of 100-150 tokens (python -m bench.speculative_step; bench/RESULTS.md, nineteenth
    # session): 20 ms alone, 28 ms at 8 rows; each draft ~0.9 ms; ~3 ms more for a step verifying beside others.
    draft_cost: float = 0.045
    row_cost: float = 0.057
    verify_overhead: float = 0.15

    @property
    def enabled(self) -> bool:
        return self.tokens > 0


def speculates(params: SamplingParams) -> bool:
    """Whether a request's rows may take drafts: nothing of theirs changes or reports each position's
    distribution from state that follows the tokens one at a time (a grammar's matcher can go back)."""
    return params.logprobs is None and not params.adjusts_logits


class NgramIndex:
    """A row's context (prompt, then output) with, per n-gram, where it last occurred with a token after it.

    ``propose`` looks up the context's last n tokens (longest n first) and returns the tokens that followed their
    latest earlier occurrence. The index grows with the context, O(ngram_max - ngram_min + 1) per token, so a
    lookup never scans the context.
    """

    def __init__(self, tokens: Sequence[int], ngram_min: int, ngram_max: int) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {ngram_min}, {ngram_max}")
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.tokens: list[int] = []
        # (n-gram) -> the index just after its latest occurrence that has a token after it
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            # The n-grams ending at the current last token now have a follower: ``token``, at index len.
            end = len(self.tokens)
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self._next[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the context's longest matching suffix."""
        return self.following(self.tokens, k)

    def following(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed, in this index, the latest occurrence of the longest suffix of ``context``
        found (not past a ``SEPARATOR``)."""
        start = self.position_after(context) if k > 0 else None
        if start is None:
            return []
        out = self.tokens[start : start + k]
        return out[: out.index(SEPARATOR)] if SEPARATOR in out else out

    def position_after(self, context: Sequence[int]) -> int | None:
        """Where the tokens after the latest occurrence of the longest suffix of ``context`` found here start."""
        size = len(context)
        for n in range(min(self.ngram_max, size), self.ngram_min - 1, -1):
            start = self._next.get(tuple(context[size - n :]))
            if start is not None:
                return start
        return None


# Between two outputs in a task's history (``TaskHistory``): no context holds it, so no n-gram across two outputs
# ever matches, and a continuation stops there.
SEPARATOR = -1
# Per task, the tokens of recent outputs kept for lookup: two generations of this many (the older dropped whole
# when the newer fills), ~0.4 KB of index per token (at most ~50 MB in all); and the tasks kept, least recently
# used out first.
HISTORY_TOKENS = 1024
HISTORY_TASKS = 64


class TaskOutputs:
    """One task's recent outputs, each after the last few tokens of its prompt, indexed for lookup."""

    def __init__(self, config: SpeculativeConfig, budget: int = HISTORY_TOKENS) -> None:
        self.config, self.budget = config, budget
        self.current = NgramIndex([], config.ngram_min, config.ngram_max)
        self.previous: NgramIndex | None = None

    def add(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        # The prompt's tail, so that the output's first tokens can be looked up after it too.
        tokens = [*prompt[max(0, len(prompt) - (self.config.ngram_max - 1)) :], *output, SEPARATOR]
        if len(self.current) + len(tokens) > self.budget:
            self.previous, self.current = self.current, NgramIndex([], self.config.ngram_min, self.config.ngram_max)
        self.current.extend(tokens)

    def following(self, context: Sequence[int], k: int) -> list[int]:
        """What followed ``context``'s longest known suffix in the latest output that has it."""
        found = self.current.following(context, k)
        if not found and self.previous is not None:
            found = self.previous.following(context, k)
        return found


class TaskHistory:
    """Recent outputs per task, as drafts for the task's later requests.

    A prefix-tuned task's outputs follow its training data's templates ("... is a pub near ... It is not family
    friendly"), so one request's words are good guesses for the next one's: on the table-to-text example, drafts
    from the request's own context alone gave 1.06 tokens per verifying step, adding the task's previous outputs
    1.74 (bench/RESULTS.md). Kept per tenant and prefix version: a tenant's outputs never draft (nor, through the
    time a step takes, show) anything to another tenant. The base model's rows are each tenant's own task too.
    Past ``tasks`` tasks, the least recently used goes, but a tenant holding more than its share (``tasks`` ÷ the
    tenants with histories) drops its own: a tenant cycling through many tasks does not flush the few another
    keeps (whose lost drafts would also tell it how busy others are).
    """

    def __init__(self, config: SpeculativeConfig, tasks: int = HISTORY_TASKS, budget: int = HISTORY_TOKENS) -> None:
        self.config, self.capacity, self.budget = config, tasks, budget
        # Counted in tasks (each "weighs" 1), owned by tenant.
        self._tasks: ByteLRU[tuple[str, str], TaskOutputs] = ByteLRU(tasks, lambda _: 1, lambda key: key[0])

    def __len__(self) -> int:
        return len(self._tasks)

    def of(self, tenant: str, task: str) -> TaskOutputs:
        """The task's outputs (made empty when unknown), now the most recently used."""
        key = (tenant, task)
        outputs = self._tasks.get(key)
        if outputs is None:
            outputs = TaskOutputs(self.config, self.budget)
            self._tasks.put(key, outputs)
        return outputs


# A row's drafts' acceptance rate before it has drafted, and what a row that stopped drafting drifts back to.
PRIOR_ACCEPTANCE = 0.5
# The weight of the last step in a row's acceptance rate (an exponential moving average).
ACCEPTANCE_WEIGHT = 0.3
# How far a row below the break-even moves back toward the prior each step it does not draft, so that it tries
# again after a few steps (its text may have reached a part that repeats).
RECOVERY = 0.05


class Prediction:
    """The client's guess of the whole output (OpenAI's predicted outputs, ``prediction``): drafts read on from
    where the output has followed the guess so far; once the output strays, from after the latest place in the
    guess where the output's last few tokens occur (an edit's unchanged rest), until it strays again."""

    def __init__(self, tokens: Sequence[int], config: SpeculativeConfig) -> None:
        self.index = NgramIndex(tokens, config.ngram_min, config.ngram_max)
        self.position: int | None = 0  # where in the guess the next output token is expected; None: lost
        self.compared = 0  # output tokens compared with the guess so far

    def following(self, context: Sequence[int], generated: Sequence[int], k: int) -> list[int]:
        """Up to k tokens of the guess after ``generated`` (the output so far; ``context``: prompt and output)."""
        guess = self.index.tokens
        for token in generated[self.compared :]:
            at = self.position
            self.position = at + 1 if at is not None and at < len(guess) and guess[at] == token else None
        self.compared = len(generated)
        if self.position is None:
            self.position = self.index.position_after(context)
        return [] if self.position is None else guess[self.position : self.position + k]


# Drafts a row with a prediction may propose per step (its ``draft_len`` grows there while they all stand): a
# guess of the whole output is right far more often than a lookup, and each draft costs a CPU step ~4.5%.
PREDICTION_DRAFT_TOKENS = 16


class RowSpeculation:
    """One row's speculation: its context's n-grams, how many drafts it proposes next, and how often they stood."""

    def __init__(
        self,
        prompt: Sequence[int],
        config: SpeculativeConfig,
        task: TaskOutputs | None = None,
        prediction: Sequence[int] = (),
    ) -> None:
        self.config = config
        self.task = task  # the task's earlier outputs, looked up when the row's own context has nothing
        self.index = NgramIndex(prompt, config.ngram_min, config.ngram_max)
        self.prompt_len = len(prompt)
        # The client's guess of the output, looked up first where there is one.
        self.prediction = Prediction(prediction, config) if prediction else None
        self.most = max(config.tokens, PREDICTION_DRAFT_TOKENS) if prediction else config.tokens
        self.draft_len = config.tokens
        self.acceptance = PRIOR_ACCEPTANCE
        # Drafts taken from the prediction that stood and that did not (OpenAI's usage reports both).
        self.prediction_accepted = self.prediction_rejected = 0
        self._predicted = False  # the last proposal came from the prediction

    def proposal(self, generated: Sequence[int], room: int) -> list[int]:
        """Drafts that may follow the row's last token (``generated``: its output so far), at most ``room``."""
        self.index.extend(generated[len(self.index) - self.prompt_len :])
        k = min(self.draft_len, room)
        predicted = [] if self.prediction is None else self.prediction.following(self.index.tokens, generated, k)
        self._predicted = bool(predicted)
        if predicted:
            return predicted
        own = self.index.propose(k)
        if own or self.task is None:
            return own
        return self.task.following(self.index.tokens, k)

    def skipped(self) -> None:
        """The row had a proposal, and the step did not speculate: its acceptance rate drifts back toward the
        prior, so that a row that fell below the break-even tries again after a few steps."""
        self.acceptance += (PRIOR_ACCEPTANCE - self.acceptance) * RECOVERY

    def verified(self, drafted: int, kept: int) -> None:
        """``kept`` of the ``drafted`` drafts of the last step stood."""
        if drafted:
            self.acceptance += (kept / drafted - self.acceptance) * ACCEPTANCE_WEIGHT
            self.draft_len = next_draft_len(self.draft_len, drafted, kept, self.most)
            if self._predicted:
                self.prediction_accepted += kept
                self.prediction_rejected += drafted - kept


def expected_accepted(acceptance: float, drafts: int) -> float:
    """Drafts expected to stand out of ``drafts``, each standing with probability ``acceptance`` if the ones
    before it did: p + p² + ... + p^k."""
    return sum(acceptance**i for i in range(1, drafts + 1))


def plan(proposals: Sequence[Sequence[int]], acceptances: Sequence[float], config: SpeculativeConfig) -> int:
    """The drafts per row (k; rows with shorter proposals take theirs whole) that maximise a step's expected
    tokens per unit of its time, or 0 when a plain step is best.

    A step of B rows, row r verifying k_r = min(k, its proposal) drafts, yields B + sum of each row's expected
    accepted drafts; its time is the plain step's (1 + row_cost·(B - 1)) plus draft_cost·sum k_r (each draft is
    one more token through the model; a row without drafts feeds its input token only) and, beside other rows,
    verify_overhead.
    """
    rows = len(proposals)
    plain = 1 + config.row_cost * (rows - 1)
    overhead = config.verify_overhead if rows > 1 else 0.0
    best, best_rate = 0, 1.0
    for k in range(1, max((len(p) for p in proposals), default=0) + 1):
        gain = sum(expected_accepted(a, min(len(p), k)) for p, a in zip(proposals, acceptances, strict=True))
        drafts = sum(min(len(p), k) for p in proposals)
        rate = (1 + gain / rows) * plain / (plain + overhead + config.draft_cost * drafts)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def next_draft_len(current: int, drafted: int, kept: int, most: int) -> int:
    """How many drafts a row proposes next, after ``kept`` of its ``drafted`` were accepted (transformers'
    "heuristic" schedule for assisted generation): two more when all stood, one fewer (at least one) otherwise.
    A row whose guesses keep failing soon verifies one draft a step, for little more than a plain step's cost."""
    if kept == drafted:
        return min(most, current + 2)
    return max(1, current - 1)


def accepted(drafts: Sequence[int], targets: Sequence[int]) -> int:
    """How many drafts the verifying forward confirms: ``targets[i]`` is the token sampled after the input token
    and the first i drafts, so draft i + 1 stands while it equals ``targets[i]``."""
    count = 0
    for draft, target in zip(drafts, targets, strict=False):
        if draft != target:
            break
        count += 1
    return count
