"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

``model`` names a task (its prefix) or, for the plain base model, the base
model's name (which wins if a task has the same id). These routes answer errors
in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; the
native routes keep theirs. ``n`` choices, and completions' several prompts, run as requests of their own in the
engine. Parameters the server
cannot honour (best_of > 1, suffix, ...) are refused with a 400 instead of being ignored. Log-probabilities
(``logprobs``; chat: ``logprobs`` and ``top_logprobs``) are the model's own distribution's,
before temperature, top-k and top-p, as vLLM reports them by default (server/api/logprobs.py).

Completions take ``echo``: the prompt comes back before the completion, and with ``logprobs`` its tokens'
log-probabilities before the completion's (the first token's null). With ``echo``, ``max_tokens`` may be 0:
the prompt scored and nothing generated, which is how evaluation harnesses (lm-evaluation-harness) ask for a
text's log-likelihood. A prompt may also be token ids, as in OpenAI's API.

Structured output: ``response_format`` (``json_object``, ``json_schema``) and vLLM's ``structured_outputs`` (a
schema, regex, choice or EBNF grammar), on both endpoints (server/api/response_format.py); chat's tool calls
with a named ``tool_choice`` or ``"required"`` are structured output too (server/api/tool_calls.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from prefix_store.artifact import PrefixMetadata
from prefix_store.errors import InvalidTaskId, PrefixNotFound, PrefixStoreError
from prefix_store.ids import shown, validate_task_id
from server.api import logprobs as token_logprobs
from server.api.auth import Principal
from server.api.generate import (
    ChatTemplateOptions,
    PreparedGeneration,
    check_event,
    events_until_disconnect,
    first_event,
    prepare_generation,
    start_events,
    version_headers,
)
from server.api.json_body import TextJSONRoute
from server.api.response_format import FormatError, ResponseFormat, StructuredOutputs, grammar_of
from server.api.state import Caller, ServerState, State
from server.api.tool_calls import (
    ReplyReader,
    StreamedCalls,
    ToolCallError,
    ToolIn,
    ToolMode,
    call_id,
    function_call,
    tool_calls,
    tool_mode,
)
from server.api.tool_formats import TOOL_CALL_FORMATS, ToolCall, read_reply
from server.api.validation import describe as describe_validation
from server.config import MAX_LISTED_TOKENS, MAX_LOGPROBS
from server.engine import GenerationEvent
from server.errors import ApiError, BadRequest, GenerationFailed, InvalidInput, NotFound, from_store_error
from server.request_log import current_request, note_stream_error
from server.sampling import SamplingParams, TokenLogprob
from server.structured_output import GrammarSpec

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256  # OpenAI lets chat run to the context; we stop here (capped by the server limit)
_FINISHED = ("length", "stop", "eos")
MAX_CHOICES = 16  # n: each choice is a request of its own in the engine (the prompt is prefilled n times)
MAX_SEQUENCES = 64  # completions: prompts x n, the engine requests one HTTP request may make


# ----- errors in OpenAI's shape ----------------------------------------------------------------


class ParameterError(BadRequest):
    """A 400 that names the offending parameter (OpenAI's ``param``)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class UnsupportedParameter(ParameterError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(param, message, "unsupported_parameter")


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model {shown(model)} does not exist or you do not have access to it")
        self.param = "model"
        self.code = "model_not_found"


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _openai_type(status), "param": param, "code": code}}


def _from_api_error(exc: ApiError, path: str) -> JSONResponse:
    # OpenAI answers bad input with 400; our 422 ("valid JSON, bad value") becomes 400 here.
    status = 400 if exc.status_code == 422 else exc.status_code
    param = getattr(exc, "param", None)
    if isinstance(exc, InvalidInput) and param is not None:
        param = openai_param(param, path)
    code = "invalid_api_key" if status == 401 else getattr(exc, "code", exc.error_type)  # OpenAI's code for it
    message = exc.message
    if path.endswith("/v1/responses"):  # a Responses request is checked as the chat request it becomes
        param = None if param is None else _RESPONSES_WORDS.get(param, param)
        message = _CHAT_WORD.sub(lambda m: _RESPONSES_WORDS[m.group(0)], message)
    body = openai_error_body(status, message, param, code)
    return JSONResponse(body, status_code=status, headers=exc.headers)


# The chat request's fields as the Responses request that became it (server/api/responses.py) names them.
_RESPONSES_WORDS = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "json_schema.schema": "text.format.schema",
    "messages": "input",
}
_CHAT_WORD = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in sorted(_RESPONSES_WORDS, key=len, reverse=True)))


# The native names of the fields the engine's errors name (server/errors.py InvalidInput), as each OpenAI route
# calls them; the others are named alike.
_OPENAI_PARAMS = {"max_new_tokens": "max_tokens", "grammar": "response_format", "prompt_logprobs": "logprobs"}
_PARAMS_BY_ROUTE = {
    "/v1/chat/completions": {**_OPENAI_PARAMS, "prompt": "messages", "logprobs": "top_logprobs"},
    "/v1/responses": {"max_new_tokens": "max_output_tokens", "grammar": "text", "prompt": "input"},
}


def openai_param(native: str, path: str) -> str:
    """A request field named as the OpenAI route at ``path`` calls it."""
    names = next((names for route, names in _PARAMS_BY_ROUTE.items() if path.endswith(route)), _OPENAI_PARAMS)
    return names.get(native, native)


def _from_validation_error(exc: RequestValidationError) -> JSONResponse:
    problem = describe_validation(exc)
    return JSONResponse(openai_error_body(400, problem.message, problem.param, None), status_code=400)


class OpenAIRoute(TextJSONRoute):
    """A route whose errors (auth, validation, engine) leave in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _from_validation_error(exc)
            except ApiError as exc:
                return _from_api_error(exc, request.url.path)

        return openai_handler


router = APIRouter(route_class=OpenAIRoute)


# ----- request bodies --------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far
    include_obfuscation: bool | None = None  # OpenAI's padding against length side channels: nothing to pad here


class _SamplingFields(BaseModel):
    """What both endpoints accept. Unknown fields are refused rather than ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="extension (as in vLLM); 0 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension (as in vLLM); 0 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="extension (as in vLLM); 1 = off")
    # More of vLLM's extensions: what its benchmark and evaluation clients send.
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_LISTED_TOKENS)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None  # only true (how the tokenizers decode) is accepted
    truncate_prompt_tokens: int | None = Field(None, ge=1)  # keep the prompt's last this many tokens
    # Structured output (server/api/response_format.py): OpenAI's field, and vLLM's on both endpoints.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for structured_outputs' fields, which many clients still send.
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    user: str | None = None  # accepted and not used, as OpenAI only logs it


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing")
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = False
    suffix: str | None = None


class PredictionIn(BaseModel):
    """OpenAI's predicted output: text the reply is expected to repeat much of (a file being edited)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["content"]
    content: str | list[dict[str, Any]]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None  # None only for an assistant's tool calls
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls (server/api/tool_calls.py)
    tool_call_id: str | None = None  # a tool's answer: the call it answers
    name: str | None = None
    # What an earlier reply carries when a client sends it back as it got it (the openai package's
    # ``message.model_dump()``): read as the reply it was, with nothing of them shown to the model.
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None  # vLLM's reasoning replies
    audio: dict[str, Any] | None = None  # only null: no audio here
    function_call: dict[str, Any] | None = None  # only null: the deprecated form of tool_calls


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[ToolIn] | None = Field(None, max_length=128)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    # vLLM's chat fields (server/api/generate.py ChatTemplateOptions).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI's fields that ask nothing of the reply this server can change, accepted as OpenAI accepts them:
    # storage and its metadata (nothing is stored), the service tier, caching and abuse-tracking keys, a
    # prediction (the reply is the same with or without one), the effort and verbosity of reasoning models.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: PredictionIn | None = None  # drafts for speculative decoding (server/speculative.py)
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None  # only ["text"]
    audio: dict[str, Any] | None = None  # only null
    web_search_options: dict[str, Any] | None = None  # only null


OpenAIBody = CompletionRequest | ChatCompletionRequest


def _reject_unsupported(body: OpenAIBody) -> None:
    if body.n is not None and body.n > MAX_CHOICES:
        raise ParameterError("n", f"n must be at most {MAX_CHOICES}")
    if body.stream_options is not None and not body.stream:
        raise ParameterError("stream_options", "stream_options is only allowed with stream=true")
    if body.spaces_between_special_tokens is False:
        raise UnsupportedParameter("spaces_between_special_tokens", "special tokens are decoded as the tokenizer does")
    if isinstance(body, CompletionRequest):
        if body.best_of not in (None, 1):
            raise UnsupportedParameter("best_of", "best_of > 1 is not supported")
        if body.logprobs is not None and body.logprobs > MAX_LOGPROBS:
            raise ParameterError("logprobs", f"logprobs must be at most {MAX_LOGPROBS}")
        if body.max_tokens == 0 and not body.echo:
            raise ParameterError("max_tokens", "max_tokens must be at least 1 (0 only with echo, to score the prompt)")
        if body.suffix:
            raise UnsupportedParameter("suffix", "suffix (insertion) is not supported")
        if body.echo and body.truncate_prompt_tokens is not None:
            raise ParameterError("truncate_prompt_tokens", "echo gives the prompt back whole: do not truncate it")
        return
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs needs logprobs set to true")
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise ParameterError("top_logprobs", f"top_logprobs must be between 0 and {MAX_LOGPROBS}")
    for name in ("functions", "function_call"):
        if getattr(body, name) is not None:
            raise UnsupportedParameter(name, f"{name} (deprecated by OpenAI) is not supported: send tools")
    if body.modalities is not None and set(body.modalities) != {"text"}:
        raise UnsupportedParameter("modalities", "only text replies: modalities may only be ['text']")
    for name in ("audio", "web_search_options"):
        if getattr(body, name) is not None:
            raise UnsupportedParameter(name, f"{name} is not supported")


def chat_messages(messages: list[ChatMessageIn]) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template wants them: text only; 'developer' is the system role; an
    assistant's tool calls and a tool's answer keep their fields (templates that know tools use them)."""
    out = []
    for i, message in enumerate(messages):
        for name in ("audio", "function_call"):
            if getattr(message, name) is not None:
                raise UnsupportedParameter(f"messages.{i}.{name}", f"a message's {name} is not supported")
        content = message.content
        answered = message.role == "assistant" and (message.tool_calls or message.refusal is not None)
        if content is None and not answered:
            raise ParameterError(
                f"messages.{i}.content", "content is missing (only an assistant's tool calls or refusal go without)"
            )
        if message.role == "tool" and not message.tool_call_id:  # OpenAI's answer: the call it answers is needed
            raise ParameterError(f"messages.{i}.tool_call_id", "a tool message needs the tool_call_id it answers")
        if isinstance(content, list):
            content = text_parts(content, f"messages.{i}.content")
        rendered: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": content or "",
        }
        for name in ("tool_calls", "tool_call_id", "name"):
            if getattr(message, name) is not None:
                rendered[name] = getattr(message, name)
        out.append(rendered)
    return out


def text_parts(parts: list[Any], param: str, kinds: tuple[str, ...] = ("text",)) -> str:
    """Content given as parts: their text, joined. Only text parts (of ``kinds``) are supported."""
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in kinds:
            raise UnsupportedParameter(param, f"only text content parts ({', '.join(kinds)}) are supported")
        if not isinstance(part.get("text"), str):
            raise ParameterError(param, "a text part needs its text")
    return "".join(part["text"] for part in parts)


def _prediction(body: OpenAIBody) -> str | None:
    prediction = getattr(body, "prediction", None)
    if prediction is None:
        return None
    content = prediction.content
    return content if isinstance(content, str) else text_parts(content, "prediction.content")


# ----- shared plumbing -------------------------------------------------------------------------


async def _prepare(
    state: ServerState,
    principal: Principal,
    body: OpenAIBody,
    *,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    max_tokens: int,
    response_id: str,
    prompt_ids: list[int] | None = None,
    grammar: GrammarSpec | None = None,
    tools: list[dict[str, Any]] | None = None,
    mode: ToolMode | None = None,
    max_tokens_given: bool = True,
) -> PreparedGeneration:
    """``grammar``: the reply's constraint (``_format_grammar``, or a tool call's); ``tools``: shown to the chat
    template (in ``mode`` 'auto', in a system message where the template ignores them). ``max_tokens_given``:
    the client set ``max_tokens``; if not, the default is lowered to what the context leaves, as in vLLM."""
    if max_tokens > state.config.max_new_tokens:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ParameterError(param, f"{param} must be at most {state.config.max_new_tokens} on this server")
    task_id = None if body.model in state.model_names else body.model
    if task_id is not None:
        try:
            validate_task_id(task_id)
        except InvalidTaskId as exc:  # cannot name a task, so no such model
            raise ModelNotFound(body.model) from exc
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    forced_call = mode is not None and mode.forced  # its grammar ends it; a stop string would cut its JSON
    echo = isinstance(body, CompletionRequest) and bool(body.echo)
    params = SamplingParams(
        # max_tokens 0 (echo): the prompt's forward samples a first token anyway; the response leaves it out.
        max_new_tokens=max(1, max_tokens),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p or 0.0,
        seed=secrets.randbits(63) if body.seed is None else body.seed,
        stop=() if forced_call else tuple(s for s in stop if s),
        logprobs=_logprobs_asked(body),
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=_logit_bias(body.logit_bias),
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0,
        stop_token_ids=() if forced_call else tuple(body.stop_token_ids or ()),
        prompt_logprobs=_logprobs_asked(body) if echo else None,
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        skip_special_tokens=body.skip_special_tokens is not False,
    )
    chat = ChatTemplateOptions.asked(body) if isinstance(body, ChatCompletionRequest) else ChatTemplateOptions()
    try:
        return await prepare_generation(
            state,
            principal,
            task_id=task_id,
            prompt=prompt,
            messages=messages,
            params=params,
            response_id=response_id,
            prompt_ids=prompt_ids,
            grammar=grammar,
            tools=tools,
            tool_format=None if mode is None else mode.auto,
            fit_to_context=not max_tokens_given,
            chat=chat,
            truncate_prompt_tokens=body.truncate_prompt_tokens,
            prediction=_prediction(body),
        )
    except NotFound as exc:  # the only NotFound here is the prefix lookup
        raise ModelNotFound(body.model) from exc
    except InvalidInput as exc:
        if exc.param == "grammar" and mode is not None:  # the constraint came from the tools
            exc.param = "tools"
        raise


def _format_grammar(body: OpenAIBody) -> GrammarSpec | None:
    """The constraint of ``response_format`` or ``structured_outputs``, if any."""
    structured = body.structured_outputs
    guided = {
        name: getattr(body, "guided_" + name)
        for name in ("json", "regex", "choice", "grammar")
        if getattr(body, "guided_" + name) is not None
    }
    if guided:
        if structured is not None:
            raise ParameterError("structured_outputs", "give structured_outputs or guided_* fields, not both")
        structured = StructuredOutputs.model_validate(guided)
    try:
        return grammar_of(body.response_format, structured)
    except FormatError as exc:
        raise ParameterError(exc.param, str(exc)) from exc


def _tool_mode(
    body: ChatCompletionRequest, format_grammar: GrammarSpec | None, state: ServerState
) -> tuple[ToolMode | None, GrammarSpec | None]:
    """The tool mode and the reply's constraint; ``format_grammar``: the response format's, if any."""
    auto_format = TOOL_CALL_FORMATS.get(state.config.tool_call_format)  # "none": 'auto' refused
    try:
        return tool_mode(body.tools, body.tool_choice, body.parallel_tool_calls, auto_format, format_grammar)
    except ToolCallError as exc:
        error = UnsupportedParameter if exc.unsupported else ParameterError
        raise error(exc.param, str(exc)) from exc


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias, keyed by token ids written as strings."""
    try:
        return tuple(sorted((int(token), value) for token, value in (bias or {}).items()))
    except ValueError as exc:
        raise ParameterError("logit_bias", "logit_bias keys must be token ids (integers)") from exc


def _logprobs_asked(body: OpenAIBody) -> int | None:
    """How many alternatives the engine reports per token: None for no log-probabilities at all."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    return (body.top_logprobs or 0) if body.logprobs else None


def _finish_reason(event: GenerationEvent) -> str:
    return _openai_finish(event.finish_reason)


def _openai_finish(finish: str) -> str:
    """The engine's finish (``length``, ``stop``: a stop string or token id, ``eos``) as OpenAI says it."""
    return "length" if finish == "length" else "stop"


# A token and its log-probability, None for a prompt's first token (echo).
Scored = tuple[int, TokenLogprob | None]


class _Shape:
    """How one endpoint words its responses and stream chunks, for ``n`` choices of each of its prompts (chat:
    one). Choice ``index`` is choice ``index % n`` of prompt ``index // n``, as in vLLM."""

    def __init__(
        self,
        chat: bool,
        prompts: list[PreparedGeneration],
        body: OpenAIBody,
        tokenizer: Any,
        echoes: list[str] | None = None,
        tools: ToolMode | None = None,
    ) -> None:
        self.chat = chat
        # Chat with tool_choice 'required' or a named function: replies are tool calls (server/api/tool_calls.py);
        # 'auto': text and calls (server/api/tool_formats.py).
        self.tools = tools
        self.replies: dict[int, ReplyReader] = {}  # streamed replies, per choice: read into text and calls
        self.streamed: dict[int, StreamedCalls] = {}  # streamed calls, per choice
        self.n = body.n or 1
        self.prompts = prompts
        self.choices = len(prompts) * self.n
        self.with_logprobs = _logprobs_asked(body) is not None
        # Completions with echo, per prompt: its text (and tokens) before the completion's; with max_tokens 0,
        # nothing after it (the token the prompt's forward sampled is left out).
        self.echoes = echoes
        self.generated = not (isinstance(body, CompletionRequest) and body.max_tokens == 0)
        self.texts = token_logprobs.TokenTexts(tokenizer)
        # Completions, per choice: where the next streamed token's text starts in the choice's text.
        self.text_offsets = [0] * self.choices
        # With stream_options.include_usage every chunk has "usage": null and one last chunk carries it; with
        # continuous_usage_stats too (vLLM's), every chunk carries the usage so far.
        options = body.stream_options
        self.include_usage = bool(body.stream and options and options.include_usage)
        self.continuous_usage = self.include_usage and bool(options and options.continuous_usage_stats)
        self.completion_tokens = [0] * self.choices  # per choice, streamed so far
        self.predicted = bool(getattr(body, "prediction", None))  # usage says how much of the prediction stood
        self.cached_tokens = [0] * self.choices  # per choice: its prompt's tokens the prompt cache gave
        self.head = {
            "id": prompts[0].response_id,
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": None,
        }

    def echo(self, index: int) -> str | None:
        """The text choice ``index`` starts with: its prompt's, with echo."""
        return None if self.echoes is None else self.echoes[index // self.n]

    def prompt_tokens(self, index: int, event: GenerationEvent) -> list[Scored]:
        """Choice ``index``'s prompt tokens and log-probabilities, from the event that carries them (echo with
        logprobs)."""
        if event.prompt_logprobs is None:
            return []
        prompt_ids = self.prompts[index // self.n].request.prompt_ids
        return list(zip(prompt_ids, event.prompt_logprobs, strict=True))

    def logprobs(self, index: int, tokens: list[Scored]) -> dict[str, Any] | None:
        """The ``logprobs`` of a response or chunk carrying these tokens of choice ``index`` (None when not asked
        for). For completions it also moves the choice's text offset past them: call it once per chunk, in order."""
        if not self.with_logprobs:
            return None
        if self.chat:
            return token_logprobs.chat(tokens, self.texts)  # chat never echoes: every token has its own
        out = token_logprobs.completion(tokens, self.texts, self.text_offsets[index])
        self.text_offsets[index] += sum(len(t) for t in out["tokens"])
        return out

    def usage(self, lasts: list[GenerationEvent]) -> dict[str, Any]:
        """The request's usage from each choice's last event (in index order): each prompt once (and its tokens
        the prompt cache gave), every choice's completion tokens."""
        firsts = lasts[:: self.n]
        prompt_tokens, cached = sum(e.prompt_tokens for e in firsts), sum(e.cached_tokens for e in firsts)
        usage = _usage(prompt_tokens, sum(e.completion_tokens for e in lasts) if self.generated else 0, cached)
        if self.predicted:
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": sum(e.accepted_prediction_tokens for e in lasts),
                "rejected_prediction_tokens": sum(e.rejected_prediction_tokens for e in lasts),
            }
        return usage

    def response(self, choices: list[_Choice]) -> dict[str, Any]:
        out = []
        for index, c in enumerate(choices):
            assert c.last is not None
            text, tokens, finish = "".join(c.text), c.tokens, c.last.finish_reason
            if not self.generated:
                text, tokens, finish = "", [], "length"
            finish_reason = _openai_finish(finish)
            echo = self.echo(index)
            if echo is not None:
                text, tokens = echo + text, c.prompt_tokens + tokens
            choice: dict[str, Any] = {
                "index": index,
                "logprobs": self.logprobs(index, tokens),
                "finish_reason": finish_reason,
            }
            if self.chat:
                choice["message"], choice["finish_reason"] = self.message(text, finish)
            else:
                choice["text"] = text
            out.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        usage = self.usage([c.last for c in choices if c.last is not None])
        return {**self.head, "object": kind, "choices": out, "usage": usage}

    def message(self, text: str, finish: str) -> tuple[dict[str, Any], str]:
        """A chat reply's message and finish reason, given the engine's finish: in tool mode, its tool calls
        (server/api/tool_calls.py)."""
        finish_reason = _openai_finish(finish)
        if self.tools is not None and self.tools.auto is not None:
            reply = read_reply(self.tools.auto, text)
            if not reply.calls:
                return {"role": "assistant", "content": reply.content or ""}, finish_reason
            auto_calls = [_call_out(call) for call in reply.calls]
            message = {"role": "assistant", "content": reply.content, "tool_calls": auto_calls}
            return message, self.tools.finish(finish, reply.cut_in_call)
        if self.tools is None:
            return {"role": "assistant", "content": text}, finish_reason
        calls = tool_calls(self.tools, text)
        if not calls:  # 'required', cut short before a call's name was complete: nothing to call
            return {"role": "assistant", "content": ""}, finish_reason
        return {"role": "assistant", "content": None, "tool_calls": calls}, self.tools.finish(finish)

    def tool_chunks(self, index: int, event: GenerationEvent) -> list[str]:
        """Tool mode, streamed: the chunks an event of choice ``index`` makes. Each call opens with its id and name
        once its name is known and streams its arguments piece by piece (``StreamedCalls``); 'auto' text goes out
        as content as soon as it cannot be the start of a call. The last chunk carries the finish reason."""
        assert self.tools is not None
        finish = _finish_reason(event) if event.finish_reason in _FINISHED else None
        reply = self.replies.setdefault(index, ReplyReader(self.tools))
        streamed = self.streamed.setdefault(index, StreamedCalls())
        out = []
        for step in reply.feed(event.text, end=finish is not None):
            if isinstance(step, str):
                out.append(self._delta(index, {"content": step}, None))
            else:
                out += self._call_deltas(index, streamed.update(step))
        if finish is not None:
            reason = self.tools.finish(event.finish_reason, reply.cut_in_call) if streamed else finish
            out.append(self._delta(index, {}, reason))
        return out

    def _call_deltas(self, index: int, entries: list[dict[str, Any]]) -> list[str]:
        return [self._delta(index, {"tool_calls": [entry]}, None) for entry in entries]

    def _delta(self, index: int, delta: dict[str, Any], finish_reason: str | None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload = {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        return self._sent(payload)

    def chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        usage: dict[str, int] | None = None,
        tokens: list[Scored] | None = None,
    ) -> str:
        choices: list[dict[str, Any]] = []
        if text is not None:
            logprobs = self.logprobs(index, tokens or [])
            choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
            if self.chat:
                choice["delta"] = {"content": text} if text or finish_reason is None else {}
            else:
                choice["text"] = text
            choices.append(choice)
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        payload = {**self.head, "object": kind, "choices": choices}
        return self._sent(payload, usage)

    def opening(self, index: int) -> str | None:
        """Chat streams start each choice by naming the role, as OpenAI's do (content null where the reply is a
        forced call, as OpenAI's tool-call streams have it; "" otherwise)."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": None if self.tools is not None and self.tools.forced else ""}
        payload = {
            **self.head,
            "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}],
        }
        return self._sent(payload)

    def observe(self, index: int, event: GenerationEvent) -> None:
        """Count choice ``index``'s tokens so far, from each of its events before its chunks go out."""
        self.completion_tokens[index] = max(self.completion_tokens[index], event.completion_tokens)
        self.cached_tokens[index] = event.cached_tokens

    def _sent(self, payload: dict[str, Any], usage: dict[str, int] | None = None) -> str:
        """A chunk as sent: with ``usage`` (the last chunk's), or the usage so far (continuous_usage_stats), or
        null (include_usage), or none."""
        if usage is None and self.continuous_usage:
            prompt_tokens = sum(len(p.request.prompt_ids) for p in self.prompts)
            completion_tokens = sum(self.completion_tokens) if self.generated else 0
            usage = _usage(prompt_tokens, completion_tokens, sum(self.cached_tokens[:: self.n]))
        if usage is not None or self.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage; ``cached_tokens``: prompt tokens whose K/V the prompt cache gave (OpenAI's, and vLLM's)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[Scored] = field(default_factory=list)  # generated, with log-probabilities when asked for
    prompt_tokens: list[Scored] = field(default_factory=list)  # echo with logprobs
    last: GenerationEvent | None = None


def _call_out(call: ToolCall) -> dict[str, Any]:
    """A call read from an 'auto' reply, as OpenAI's ``tool_calls`` carry it."""
    return function_call(call_id(), call.name, call.arguments)


def _choices(prepared: PreparedGeneration, n: int) -> list[PreparedGeneration]:
    """``n`` engine requests for the ``n`` choices of one: each samples with its own seed (the request's, then
    the next ones), so a seeded request gives the same choices again."""
    request = prepared.request
    seeds = [(request.params.seed + i) & ((1 << 63) - 1) for i in range(n)]
    return [replace(prepared, request=replace(request, params=replace(request.params, seed=seed))) for seed in seeds]


def _waits(state: ServerState, prompts: list[PreparedGeneration], n: int) -> list[int | None]:
    """For each of the ``n`` choices of each prompt, the stream it starts after (its prompt's first choice), or
    None: with the prompt cache on, a prompt's later choices start once the first has its first token, and so
    take its prompt's K/V from the cache instead of computing it again (on a CPU the prefills would share the
    cores anyway, so the later choices' first tokens come no later). Prompts of one block or less go at once."""
    cache = state.engine.prompt_cache
    waits: list[int | None] = []
    for p, prepared in enumerate(prompts):
        shared = cache is not None and len(prepared.request.prompt_ids) > cache.block_tokens
        waits += [None if c == 0 or not shared else p * n for c in range(n)]
    return waits


async def _indexed(
    streams: list[AsyncIterator[GenerationEvent]], waits: list[int | None] | None = None
) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """The choices' events as they come, each with its choice's index. ``waits[i]``: the stream whose first event
    stream i waits for before it starts (None: at once). An error in one (429, 408) ends them all; closing this
    closes every stream (which aborts their requests)."""
    if len(streams) == 1:  # no tasks, no queue: the common case stays as cheap as it was
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | None]] = asyncio.Queue()

    started = [asyncio.Event() for _ in streams]

    async def pump(index: int, stream: AsyncIterator[GenerationEvent]) -> None:
        try:
            if waits is not None and waits[index] is not None:
                await started[waits[index]].wait()  # type: ignore[index]
            async for event in stream:
                started[index].set()
                queue.put_nowait((index, event))
            queue.put_nowait((index, None))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        finally:
            started[index].set()  # ended without an event: whoever waits goes anyway

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]


async def _respond(
    request: Request,
    state: ServerState,
    body: OpenAIBody,
    shape: _Shape,
) -> Response:
    # Choice p * n + c: choice c of prompt p.
    engine_requests = [choice for prompt in shape.prompts for choice in _choices(prompt, shape.n)]
    single = len(engine_requests) == 1
    streams = [start_events(state, p, stream=bool(body.stream), counted=single) for p in engine_requests]
    events = _indexed(streams, _waits(state, shape.prompts, shape.n))
    if not single:  # its choices are one request against the tenant's quota and the open-stream limit
        tenant = engine_requests[0].request.tenant
        events = state.gate.together(state.engine, tenant, state.quotas_for(tenant), events, stream=bool(body.stream))
    if body.stream:
        first = await first_event(request, events)  # errors before the first token still get a proper status code
        try:
            check_event(first[1])
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        return StreamingResponse(
            _sse(shape, first, events), media_type="text/event-stream", headers=version_headers(shape.prompts)
        )
    choices = [_Choice() for _ in range(shape.choices)]
    async for index, event in events_until_disconnect(request, events):
        check_event(event)
        choice = choices[index]
        choice.text.append(event.text)
        _collect_logprob(event, choice.tokens)
        choice.prompt_tokens = choice.prompt_tokens or shape.prompt_tokens(index, event)
        choice.last = event
    if any(c.last is None or c.last.finish_reason not in _FINISHED for c in choices):
        raise GenerationFailed("the request ended without a result")
    return JSONResponse(shape.response(choices), headers=version_headers(shape.prompts))


def _collect_logprob(event: GenerationEvent, tokens: list[Scored]) -> None:
    if event.token_id is not None and event.logprob is not None:
        tokens.append((event.token_id, event.logprob))


async def _sse(
    shape: _Shape, first: tuple[int, GenerationEvent], rest: AsyncIterator[tuple[int, GenerationEvent]]
) -> AsyncIterator[str]:
    """The stream of all choices: each opens (chat: its role; echo: its prompt) on its first event, then its
    tokens as they come; a final usage chunk (when asked for) and [DONE] once every choice has finished."""
    pending: list[list[Scored]] = [[] for _ in range(shape.choices)]  # per choice: tokens not yet in a chunk
    started = [False] * shape.choices
    lasts: list[GenerationEvent | None] = [None] * shape.choices
    try:
        item: tuple[int, GenerationEvent] | None = first
        while item is not None:
            index, event = item
            if event.finish_reason == "error":
                note_stream_error(GenerationFailed.status_code)
                error = openai_error_body(500, event.error or "generation failed", None, GenerationFailed.error_type)
                yield f"data: {json.dumps(error)}\n\n"
                return
            shape.observe(index, event)
            if not started[index]:
                started[index] = True
                opening = shape.opening(index)
                if opening is not None:
                    yield opening
                echo = shape.echo(index)
                if echo is not None:  # the prompt first, in a chunk of its own
                    finish_reason = None if shape.generated else "length"
                    yield shape.chunk(index, echo, finish_reason, tokens=shape.prompt_tokens(index, event))
            if shape.tools is not None:
                for chunk in shape.tool_chunks(index, event):
                    yield chunk
            elif shape.generated:
                _collect_logprob(event, pending[index])
                if event.finish_reason in _FINISHED:
                    yield shape.chunk(index, event.text, _finish_reason(event), tokens=pending[index])
                elif event.text:  # a piece held back (inside a character or a possible stop string) comes later
                    yield shape.chunk(index, event.text, None, tokens=pending[index])
                    pending[index] = []
            if event.finish_reason in _FINISHED or not shape.generated:  # max_tokens 0: the prompt was all
                lasts[index] = event
                if all(last is not None for last in lasts):
                    if shape.include_usage:
                        yield shape.chunk(0, None, None, shape.usage([e for e in lasts if e is not None]))
                    yield "data: [DONE]\n\n"
                    return
            item = await anext(rest, None)
    except ApiError as exc:  # ended by the server mid-stream (timed out): say why in the last chunk
        note_stream_error(exc.status_code)
        yield f"data: {json.dumps(openai_error_body(exc.status_code, exc.message, None, exc.error_type))}\n\n"
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  # a disconnect lands here: abort the requests


# ----- routes ----------------------------------------------------------------------------------


_STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"}}


@router.post("/v1/completions", responses=_STREAMED)
async def completions(body: CompletionRequest, request: Request, state: State, principal: Caller) -> Response:
    _reject_unsupported(body)
    prompts = _prompts(body.prompt)
    if len(prompts) * (body.n or 1) > MAX_SEQUENCES:
        raise ParameterError("prompt", f"at most {MAX_SEQUENCES} completions per request (prompts times n)")
    max_tokens = body.max_tokens
    if max_tokens is None:
        max_tokens = min(COMPLETION_DEFAULT_MAX_TOKENS, state.config.max_new_tokens)
    response_id = "cmpl-" + secrets.token_hex(12)
    grammar = _format_grammar(body)
    prepared = [
        await _prepare(
            state,
            principal,
            body,
            prompt=text,
            messages=None,
            max_tokens=max_tokens,
            response_id=response_id,
            prompt_ids=ids,
            grammar=grammar,
            max_tokens_given=body.max_tokens is not None,
        )
        for text, ids in prompts
    ]
    tokenizer = state.model.tokenizer
    echoes = None
    if body.echo:  # each prompt as sent; token ids as the tokenizer reads them
        echoes = [
            text if text is not None else tokenizer.decode(p.request.prompt_ids)
            for (text, _), p in zip(prompts, prepared, strict=True)
        ]
    if body.max_tokens == 0 and (record := current_request.get()) is not None:
        record.drops_generated = True  # echo only: the tokens sampled are left out of the response
    return await _respond(request, state, body, _Shape(False, prepared, body, tokenizer, echoes))


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str | None, list[int] | None]]:
    """A completion's prompts, each text or token ids: OpenAI takes one of either, or a list of either."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise ParameterError("prompt", "the prompt list is empty")
    if isinstance(prompt[0], int):
        return [(None, list(prompt))]  # type: ignore[arg-type]  # pydantic made it a list of ints
    return [(one, None) if isinstance(one, str) else (None, list(one)) for one in prompt]  # type: ignore[union-attr]


@router.post("/v1/chat/completions", responses=_STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State, principal: Caller) -> Response:
    prepared, mode = await prepare_chat(state, principal, body, "chatcmpl-" + secrets.token_hex(12))
    shape = _Shape(True, [prepared], body, state.model.tokenizer, tools=mode)
    return await _respond(request, state, body, shape)


async def prepare_chat(
    state: ServerState, principal: Principal, body: ChatCompletionRequest, response_id: str
) -> tuple[PreparedGeneration, ToolMode | None]:
    """A chat request checked and ready for the engine, and how its reply becomes tool calls (None: text). Shared
    with the Responses API (server/api/responses.py), which is a chat underneath."""
    _reject_unsupported(body)
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise ParameterError("max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one")
    max_tokens = (
        body.max_completion_tokens or body.max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, state.config.max_new_tokens)
    )
    mode, grammar = _tool_mode(body, _format_grammar(body), state)
    prepared = await _prepare(
        state,
        principal,
        body,
        prompt=None,
        messages=chat_messages(body.messages),
        max_tokens=max_tokens,
        response_id=response_id,
        grammar=grammar,
        tools=None if body.tools is None else [tool.model_dump(exclude_none=True) for tool in body.tools],
        mode=mode,
        max_tokens_given=bool(body.max_completion_tokens or body.max_tokens),
    )
    return prepared, mode


def _model_card(state: ServerState, model_id: str, created: int, owned_by: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "root": parent or model_id,
        "parent": parent,
        "max_model_len": state.engine.max_context,  # vLLM's field: prefix, prompt and completion together
    }


def _base_cards(state: ServerState) -> list[dict[str, Any]]:
    # prefix-serve's own field: the longest prefix an upload may have (so `prefix-serve train --upload` can tell
    # before it trains).
    extra = {"max_prefix_tokens": state.registry.max_virtual_tokens}
    return [{**_model_card(state, n, state.started_at, "prefix-serve", None), **extra} for n in state.model_names]


def _task_card(state: ServerState, meta: PrefixMetadata) -> dict[str, Any]:
    return _model_card(state, meta.task_id, _epoch(meta.created_at), meta.tenant, state.model_names[0])


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


async def task_metadata(state: ServerState, principal: Principal, model: str) -> PrefixMetadata | None:
    """The caller's task that ``model`` names (its metadata: nothing is loaded), None for the base model, or
    404 ``model_not_found``."""
    if model in state.model_names:
        return None
    try:
        return await asyncio.to_thread(state.registry.info, principal.tenant, model)
    except (PrefixNotFound, InvalidTaskId) as exc:
        raise ModelNotFound(model) from exc
    except PrefixStoreError as exc:
        raise from_store_error(exc) from exc


@router.get("/v1/models")
async def list_models(state: State, principal: Caller) -> dict[str, Any]:
    try:
        metas = await asyncio.to_thread(state.registry.list, principal.tenant)
    except PrefixStoreError as exc:
        raise from_store_error(exc) from exc
    # A task stored under a base model's name (before that name was served) cannot be reached by it, nor one made
    # for another base model (stored before this server's model changed) be used.
    usable = [m for m in metas if m.task_id not in state.model_names and state.registry.fits_model(m)]
    tasks = [_task_card(state, m) for m in usable]
    return {"object": "list", "data": [*_base_cards(state), *tasks]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, state: State, principal: Caller) -> dict[str, Any]:
    meta = await task_metadata(state, principal, model)
    if meta is None:
        return _model_card(state, model, state.started_at, "prefix-serve", None)
    return _task_card(state, meta)
