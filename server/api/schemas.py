"""Request and response bodies of the native API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.logprobs import TokenLogprobOut
from server.config import MAX_LISTED_TOKENS, MAX_LOGPROBS


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class GrammarIn(BaseModel):
    """What the generated text must match (TGI's ``grammar`` field, plus choice and EBNF): ``json``: a JSON
    schema (an object, or ``true`` for any JSON value); ``regex``: a regular expression; ``choice``: a list of
    strings, one of which is the whole output; ``ebnf``: a grammar in xgrammar's EBNF, rule ``root`` first."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json", "regex", "choice", "ebnf"]
    value: dict[str, Any] | bool | str | list[str]

    @model_validator(mode="after")
    def _value_fits_type(self) -> GrammarIn:
        wanted, kind = {
            "json": ((dict, bool), "a JSON schema object"),
            "regex": ((str,), "a string"),
            "ebnf": ((str,), "a string"),
            "choice": ((list,), "a list of strings"),
        }[self.type]
        if not isinstance(self.value, wanted):
            raise ValueError(f"grammar of type {self.type!r} takes {kind} as its value")
        if self.type == "choice" and not self.value:
            raise ValueError("grammar of type 'choice' needs at least one string")
        return self


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str | None = Field(None, description="the prefix to use; null = the base model")
    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="tokens less likely than min_p times the likeliest are not sampled (vLLM)"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list)
    include_stop_str_in_output: bool = Field(False, description="the stop string that ended the text stays (vLLM)")
    prediction: str | None = Field(
        None,
        max_length=1_000_000,
        description="text the output is expected to repeat much of (OpenAI's predicted outputs): drafts for "
        "speculative decoding; the output is the same without it",
    )
    skip_special_tokens: bool = Field(True, description="special tokens leave no text (vLLM's default)")
    ignore_eos: bool = Field(False, description="EOS does not end the request (vLLM's name; for fixed-length runs)")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="each token's log-probability and this many most likely alternatives' (the model's own "
        "distribution, before temperature, top-k and top-p); null = none",
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="each prompt token's log-probability after the first, given the prefix and the tokens before "
        "it, and this many most likely alternatives' (vLLM's name); null = none",
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="> 1 discourages every token of the prompt or generated so far (HF, TGI)"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="subtracted from a token's logit once per time it was generated (OpenAI)"
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="subtracted from the logit of every token generated so far (OpenAI)"
    )
    stop_token_ids: list[int] = Field(
        default_factory=list,
        max_length=MAX_LISTED_TOKENS,
        description="tokens that end the request as EOS does (vLLM's name); finish_reason 'stop'",
    )
    min_tokens: int = Field(0, ge=0, description="no EOS or stop token before this many tokens (vLLM's name)")
    logit_bias: dict[int, float] | None = Field(
        None,
        max_length=MAX_LISTED_TOKENS,
        description="token id -> added to its logit before sampling (-100..100; OpenAI's)",
    )
    grammar: GrammarIn | None = Field(
        None, description="structured output: what the text must match; EOS ends it once complete"
    )
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V the prompt cache gave (not computed again)
    # With a prediction: its draft tokens that stood and that did not (OpenAI's completion_tokens_details).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


FinishReason = Literal["length", "stop", "eos"]


class GenerateResponse(BaseModel):
    id: str
    task_id: str | None
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    prefix_version: int | None
    logprobs: list[TokenLogprobOut] | None = None  # one per token of token_ids, when asked for
    # When prompt_logprobs is asked for: the prompt's tokens, and one entry per token (the first null).
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprobOut | None] | None = None


class StreamEvent(BaseModel):
    """One server-sent event of a streamed generation; the last carries finish_reason and usage."""

    id: str
    task_id: str | None
    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    prefix_version: int | None = None
    logprob: TokenLogprobOut | None = None  # this event's token's, when asked for
    # The first event only, when prompt_logprobs is asked for (as in GenerateResponse).
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprobOut | None] | None = None


class PrefixInfo(BaseModel):
    task_id: str
    version: int
    num_virtual_tokens: int
    sha256: str
    bytes: int
    created_at: str
    dtype: str | None = None
    # False for a prefix made for another base model (stored before this server's model changed): requests
    # naming it are refused; delete it, or serve the model it was made for.
    fits_model: bool = True


class PrefixList(BaseModel):
    data: list[PrefixInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """Errors of the OpenAI-compatible routes (a 413 refused before routing has the native shape, which fits too)."""

    error: OpenAIErrorDetail


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]


def error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, object]]:
    """The error statuses every API route may answer, for the OpenAPI schema (``responses=``)."""
    described = {
        400: "malformed request",
        401: "no or invalid API key",
        403: "a tenant key named another tenant in X-Prefix-Serve-Tenant",
        404: "no such task (also another tenant's)",
        408: "the request ran past the server's request timeout",
        409: "a tenant storage quota would be exceeded",
        413: "body or prefix too large",
        422: "invalid value",
        429: "overloaded or over a tenant's rate quota (see Retry-After)",
        500: "generation failed",
        503: "not ready, shutting down, or the prefix store is unavailable",
    }
    return {code: {"model": model, "description": text} for code, text in described.items()}
