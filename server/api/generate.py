"""POST /v1/generate: schema in, engine events out, as JSON or server-sent events."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from prefix_store.errors import PrefixStoreError
from server.api import logprobs as token_logprobs
from server.api.auth import Principal
from server.api.json_body import TextJSONRoute
from server.api.logprobs import TokenLogprobOut
from server.api.schemas import GenerateRequest, GenerateResponse, GrammarIn, StreamEvent, Usage
from server.api.state import Caller, ServerState, State
from server.api.tool_formats import ToolCallFormat, template_shows_tools, with_tools_in_text
from server.engine import GenerationEvent, GenerationRequest
from server.errors import ApiError, GenerationFailed, InvalidInput, from_store_error
from server.request_log import note_stream_error
from server.sampling import SamplingParams
from server.structured_output import Grammar, GrammarError, GrammarSpec

router = APIRouter(route_class=TextJSONRoute)


@dataclass(frozen=True)
class PreparedGeneration:
    """A validated request, its prefix resolved: ready for the engine."""

    response_id: str
    task_id: str | None
    prefix_version: int | None
    request: GenerationRequest


def version_headers(prepared: Sequence[PreparedGeneration]) -> dict[str, str]:
    """``x-prefix-version``: the prefix versions a response's generations run with (one, unless an upload came
    between a list's prompts), so that an OpenAI client, whose bodies have no field for it, can tell which upload
    answered it. None for the base model."""
    versions = sorted({p.prefix_version for p in prepared if p.prefix_version is not None})
    return {"x-prefix-version": ",".join(map(str, versions))} if versions else {}


# apply_chat_template's own parameters: chat_template_kwargs may not set them (they have fields of their own, or
# are the server's to choose).
_TEMPLATE_PARAMETERS = frozenset(
    {
        "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How messages become the prompt (vLLM's chat fields): the reply's opening appended
    (``add_generation_prompt``), or the last message left open for the model to go on writing
    (``continue_final_message``: a reply begun by the client), and variables for the template
    (``chat_template_kwargs``, e.g. Qwen 3's ``enable_thinking``)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def asked(cls, body: Any) -> ChatTemplateOptions:
        """From a request's ``add_generation_prompt``, ``continue_final_message`` and ``chat_template_kwargs``
        (pydantic fields): continuing the last message opens no new reply unless the client also sets
        ``add_generation_prompt`` (and is refused)."""
        opens = body.add_generation_prompt and (
            "add_generation_prompt" in body.model_fields_set or not body.continue_final_message
        )
        return cls(opens, body.continue_final_message, body.chat_template_kwargs or {})

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidInput(
                "continue_final_message goes on writing the last message; it cannot also open a new one "
                "(set add_generation_prompt to false)",
                param="continue_final_message",
            )
        if taken := sorted(_TEMPLATE_PARAMETERS & set(self.kwargs)):
            raise InvalidInput(f"chat_template_kwargs may not set {', '.join(taken)}", param="chat_template_kwargs")


P = ParamSpec("P")


def _counted_while_preparing(
    prepare: Callable[Concatenate[ServerState, P], Awaitable[PreparedGeneration]],
) -> Callable[Concatenate[ServerState, P], Awaitable[PreparedGeneration]]:
    """Counts the request in ``state.preparing`` while it is prepared, before the gate counts it in flight: a drain
    (SIGTERM) that saw nothing in flight while a request waited for a cold prefix ended at once, and the request
    was cut off when the server stopped."""

    @functools.wraps(prepare)
    async def counted(state: ServerState, *args: P.args, **kwargs: P.kwargs) -> PreparedGeneration:
        state.preparing += 1
        try:
            return await prepare(state, *args, **kwargs)
        finally:
            state.preparing -= 1

    return counted


@_counted_while_preparing
async def prepare_generation(
    state: ServerState,
    principal: Principal,
    *,
    task_id: str | None,
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    params: SamplingParams,
    response_id: str,
    prompt_ids: list[int] | None = None,
    grammar: GrammarSpec | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_format: ToolCallFormat | None = None,
    fit_to_context: bool = False,
    chat: ChatTemplateOptions = ChatTemplateOptions(),
    truncate_prompt_tokens: int | None = None,
    prediction: str | None = None,
) -> PreparedGeneration:
    """Shared by the native and OpenAI routes: limits, tokenisation (unless ``prompt_ids`` come instead of a
    prompt), the structured-output constraint's compilation, prefix lookup.

    Prefix, prompt and ``params.max_new_tokens`` must fit in the model's context, or the engine refuses the
    request (``ContextLengthExceeded``); with ``fit_to_context`` (the client left the limit to its default),
    ``max_new_tokens`` is lowered to the server's limit and the room the context leaves instead, as vLLM does.
    ``truncate_prompt_tokens``: only the prompt's last this many tokens are kept (vLLM's field). ``prediction``: the
    client's guess of the output, drafts for speculative decoding (OpenAI's predicted outputs)."""
    config = state.config
    state.gate.refuse_if_full(principal.tenant, state.quotas_for(principal.tenant))
    if params.max_new_tokens > config.max_new_tokens:
        if not fit_to_context:
            raise InvalidInput(f"max_new_tokens must be at most {config.max_new_tokens}", param="max_new_tokens")
        params = dataclasses.replace(params, max_new_tokens=config.max_new_tokens)
    if len(params.stop) > config.max_stop_strings or any(len(s) > 256 for s in params.stop):
        raise InvalidInput(f"at most {config.max_stop_strings} stop strings of at most 256 characters", param="stop")
    if prompt_ids is None:  # token ids sent as they are: the engine checks they are in the vocabulary
        _refuse_sure_overlong(state, prompt, messages, truncated=truncate_prompt_tokens is not None)
        # Off the event loop: a body of megabytes takes seconds to render and tokenize, which every other
        # request's stream (and /health) would wait out.
        prompt_ids = await asyncio.to_thread(tokenize, state, prompt, messages, tools, tool_format, chat)
    if truncate_prompt_tokens is not None:
        prompt_ids = prompt_ids[-truncate_prompt_tokens:]
    if len(prompt_ids) > config.max_prompt_tokens:
        raise InvalidInput(  # OpenAI's code for a prompt too long: clients trim their history on it
            f"prompt has {len(prompt_ids)} tokens; the limit is {config.max_prompt_tokens}",
            param="prompt",
            code="context_length_exceeded",
        )
    if grammar is not None:
        params = dataclasses.replace(params, grammar=await compile_grammar(state, grammar, principal.tenant))
    prefix_kv, prefix_id, version = None, None, None
    if task_id is not None:
        state.awaiting_prefix += 1
        try:
            # A resident prefix needs no thread; a cold one (or a due check on use) takes one of the tenant's few.
            artifact = state.registry.resolve_resident(principal.tenant, task_id) or await state.tenant_threads.run(
                principal.tenant, state.registry.resolve, principal.tenant, task_id
            )
        except PrefixStoreError as exc:
            raise from_store_error(exc) from exc
        finally:
            state.awaiting_prefix -= 1
        meta = artifact.metadata
        prefix_kv, version = artifact.key_values, meta.version
        # The content hash makes the id unique even when a deleted task is uploaded again and its version
        # numbers restart: the device tier of the prefix cache is keyed by this id.
        prefix_id = f"{meta.tenant}/{meta.task_id}@{meta.version}#{meta.sha256[:16]}"
    predicted = await asyncio.to_thread(_predicted, state, prediction) if prediction else ()
    request = GenerationRequest(prompt_ids, params, prefix_kv, prefix_id, tenant=principal.tenant, prediction=predicted)
    room = state.engine.max_context - request.prefix_len - len(prompt_ids)
    if fit_to_context and 0 < room < params.max_new_tokens:
        params = dataclasses.replace(params, max_new_tokens=room)
        request = dataclasses.replace(request, params=params)
    return PreparedGeneration(response_id=response_id, task_id=task_id, prefix_version=version, request=request)


# How far under the longest token's characters a token may average before the bound below could refuse a prompt
# that fits: a normalizer that drops characters (accents, controls) shortens text before it is split.
_CHARS_BOUND_MARGIN = 2


def _refuse_sure_overlong(
    state: ServerState, prompt: str | None, messages: list[dict[str, Any]] | None, *, truncated: bool
) -> None:
    """Refuse, before tokenizing it, a prompt with more characters than ``max_prompt_tokens`` tokens can hold
    (tokenizing megabytes takes seconds of CPU, beside the engine's)."""
    longest = state.model.longest_token_chars
    if truncated or not longest:
        return
    if prompt is not None:
        chars = len(prompt)
    else:
        chars = sum(len(m["content"]) for m in messages or () if isinstance(m.get("content"), str))
    limit = state.config.max_prompt_tokens
    if chars > limit * longest * _CHARS_BOUND_MARGIN:
        raise InvalidInput(
            f"prompt has {chars} characters, more than {limit} tokens (the limit) can hold",
            param="prompt",
            code="context_length_exceeded",
        )


def _predicted(state: ServerState, prediction: str | None) -> tuple[int, ...]:
    """A predicted output's tokens, as the reply would hold them (no special tokens), at most a prompt's worth."""
    tokenizer = state.model.tokenizer
    if not prediction or tokenizer is None:
        return ()
    ids = tokenizer(prediction, add_special_tokens=False).input_ids
    if len(ids) > state.config.max_prompt_tokens:
        raise InvalidInput(
            f"prediction has {len(ids)} tokens; the limit is {state.config.max_prompt_tokens}", param="prediction"
        )
    return tuple(ids)


async def compile_grammar(state: ServerState, spec: GrammarSpec, tenant: str) -> Grammar:
    """The compiled constraint (off the event loop: a big schema takes a while; the tenant's repeats are kept)."""
    if state.grammars is None:
        raise InvalidInput("structured output needs a model with a tokenizer", param="grammar")
    try:
        # A kept repeat needs no thread; a compile takes one of the tenant's few (server/tenant_threads.py).
        kept = state.grammars.kept(spec, tenant)
        return kept or await state.tenant_threads.run(tenant, state.grammars.compile, spec, tenant)
    except GrammarError as exc:
        raise InvalidInput(str(exc), param="grammar") from exc


def start_events(
    state: ServerState, prepared: PreparedGeneration, *, stream: bool, counted: bool = True
) -> AsyncIterator[GenerationEvent]:
    """The engine's events for a prepared request, within its tenant's quotas and the server's limits
    (``counted`` False: one of an HTTP request's several, counted once by ``RequestGate.together``)."""
    request = prepared.request
    return state.gate.events(state.engine, request, state.quotas_for(request.tenant), stream=stream, counted=counted)


def tokenize(
    state: ServerState,
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    tools: list[dict[str, Any]] | None = None,
    tool_format: ToolCallFormat | None = None,
    chat: ChatTemplateOptions = ChatTemplateOptions(),
) -> list[int]:
    """The prompt's token ids; messages go through the model's chat template (with the tools, if any), as
    ``chat`` says. ``tool_format``: tool_choice 'auto', whose calls are written so: where the template ignores
    the tools, the messages tell the model about them (server/api/tool_formats.py)."""
    tokenizer = state.model.tokenizer
    if tokenizer is None:
        raise InvalidInput("this model has no tokenizer", param="prompt")
    if messages is not None:
        if not tokenizer.chat_template:
            raise InvalidInput("this model has no chat template; send 'prompt' instead of 'messages'", param="messages")
        if chat.continue_final_message and state.model.is_encoder_decoder:
            # The messages are the encoder's input; the decoder starts afresh, so the reply could not go on.
            raise InvalidInput(
                "continue_final_message needs a decoder-only model: this one is an encoder-decoder, whose reply "
                "starts from its decoder's start token",
                param="continue_final_message",
            )
        try:
            if tools and tool_format is not None and not template_shows_tools(tokenizer, messages, tools):
                messages = with_tools_in_text(tool_format, messages, tools)
            prompt = tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=chat.continue_final_message,
                tokenize=False,
                **chat.kwargs,
            )
        except Exception as exc:  # a Jinja template raising on messages it does not expect
            raise InvalidInput(
                f"the model's chat template cannot render these messages: {exc}", param="messages"
            ) from exc
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt or "").input_ids)


T = TypeVar("T")


async def events_until_disconnect(request: Request, events: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yield engine events; stop (and so cancel the request) as soon as the client goes away, raising
    ClientDisconnect: answered 499, which no one reads, and kept out of the 5xx that a result-less end was."""
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        while (event := await _next_unless_gone(events, disconnect)) is not None:
            yield event
    finally:
        disconnect.cancel()
        await events.aclose()  # type: ignore[attr-defined]


async def first_event(request: Request, events: AsyncIterator[T]) -> T:
    """A stream's first event, before its response starts; ClientDisconnect (499) if the client goes away while
    the request waits for a row or its prefix, and GenerationFailed if the events end first. The events are closed
    (the request aborted) unless the first one comes."""
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        first = await _next_unless_gone(events, disconnect)
        if first is None:
            raise GenerationFailed("the request ended without a result")
        return first
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    finally:
        disconnect.cancel()  # the response's own disconnect watch takes over


async def _next_unless_gone(events: AsyncIterator[T], disconnect: asyncio.Future[None]) -> T | None:
    """The next event (None at the end), or ClientDisconnect as soon as `disconnect` completes first."""
    next_event = asyncio.ensure_future(anext(events, None))
    await asyncio.wait({next_event, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if not next_event.done():
        next_event.cancel()
        await asyncio.gather(next_event, return_exceptions=True)
        raise ClientDisconnect()
    return next_event.result()


async def _wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone away.

    The body has been read, so the server's next message for this request is ``http.disconnect``, sent when the
    connection closes: waiting for it costs nothing meanwhile. (Polling ``request.is_disconnected()`` every 50 ms
    instead cost the event loop ~9% of a core with 200 requests waiting, stolen from the engine's threads.)
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_event(event: GenerationEvent) -> None:
    if event.finish_reason == "error":
        raise GenerationFailed(event.error or "generation failed")


@router.post("/v1/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def generate(
    body: GenerateRequest,
    request: Request,
    state: State,
    principal: Caller,
):
    params = SamplingParams(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        seed=secrets.randbits(63) if body.seed is None else body.seed,
        stop=tuple(body.stop),
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
        prompt_logprobs=body.prompt_logprobs,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=tuple(sorted((body.logit_bias or {}).items())),
        stop_token_ids=tuple(body.stop_token_ids),
        min_tokens=body.min_tokens,
    )
    prepared = await prepare_generation(
        state,
        principal,
        task_id=body.task_id,
        prompt=body.prompt,
        messages=None if body.messages is None else [m.model_dump() for m in body.messages],
        params=params,
        response_id="gen-" + secrets.token_hex(8),
        grammar=None if body.grammar is None else _grammar_spec(body.grammar),
        fit_to_context="max_new_tokens" not in body.model_fields_set,
        prediction=body.prediction,
    )
    texts = token_logprobs.TokenTexts(state.model.tokenizer)
    if body.stream:
        # StreamingResponse cancels the body iterator when the client goes away, which aborts the request.
        stream = start_events(state, prepared, stream=True)
        first = await first_event(request, stream)  # errors before the first token still get a proper status code
        check_event(first)
        return StreamingResponse(_sse(prepared, first, stream, texts), media_type="text/event-stream")
    events = events_until_disconnect(request, start_events(state, prepared, stream=False))
    text, token_ids = [], []
    logprobs: list[TokenLogprobOut] | None = None if body.logprobs is None else []
    prompt_logprobs: list[TokenLogprobOut | None] | None = None
    last: GenerationEvent | None = None
    async for event in events:
        check_event(event)
        text.append(event.text)
        if event.prompt_logprobs is not None:
            prompt_logprobs = token_logprobs.native_prompt(prepared.request.prompt_ids, event.prompt_logprobs, texts)
        if event.token_id is not None:
            token_ids.append(event.token_id)
            if logprobs is not None and event.logprob is not None:
                logprobs.append(token_logprobs.native(event.token_id, event.logprob, texts))
        last = event
    if last is None or last.finish_reason not in ("length", "stop", "eos"):
        raise GenerationFailed("the request ended without a result")
    return GenerateResponse(
        id=prepared.response_id,
        task_id=prepared.task_id,
        text="".join(text),
        token_ids=token_ids,
        finish_reason=last.finish_reason,
        usage=_usage(last),
        prefix_version=prepared.prefix_version,
        logprobs=logprobs,
        prompt_token_ids=None if body.prompt_logprobs is None else list(prepared.request.prompt_ids),
        prompt_logprobs=prompt_logprobs,
    )


def _usage(last: GenerationEvent) -> Usage:
    """A request's usage, from its last event."""
    return Usage(
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        cached_tokens=last.cached_tokens,
        accepted_prediction_tokens=last.accepted_prediction_tokens,
        rejected_prediction_tokens=last.rejected_prediction_tokens,
    )


def _grammar_spec(grammar: GrammarIn) -> GrammarSpec:
    if grammar.type == "json":
        return GrammarSpec.json_schema(grammar.value)  # type: ignore[arg-type]  # checked by GrammarIn
    if grammar.type == "choice":
        return GrammarSpec("choice", choices=tuple(grammar.value))  # type: ignore[arg-type]
    return GrammarSpec(grammar.type, grammar.value)  # type: ignore[arg-type]


async def _sse(
    prepared: PreparedGeneration,
    first: GenerationEvent,
    rest: AsyncIterator[GenerationEvent],
    texts: token_logprobs.TokenTexts,
) -> AsyncIterator[str]:
    try:
        async for chunk in _sse_chunks(prepared, first, rest, texts):
            yield chunk
    except ApiError as exc:  # ended by the server mid-stream (timed out): say why in the last event
        note_stream_error(exc.status_code)
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  # a disconnect lands here: abort the request


async def _sse_chunks(
    prepared: PreparedGeneration,
    first: GenerationEvent,
    rest: AsyncIterator[GenerationEvent],
    texts: token_logprobs.TokenTexts,
) -> AsyncIterator[str]:
    event: GenerationEvent | None = first
    while event is not None:
        if event.finish_reason == "error":
            note_stream_error(GenerationFailed.status_code)
            error = {"error": {"type": GenerationFailed.error_type, "message": event.error or "generation failed"}}
            yield f"data: {json.dumps(error)}\n\n"
            return
        finished = event.finish_reason in ("length", "stop", "eos")
        payload = StreamEvent(
            id=prepared.response_id,
            task_id=prepared.task_id,
            token_id=event.token_id,
            text=event.text,
            finish_reason=event.finish_reason if finished else None,
            usage=_usage(event) if finished else None,
            prefix_version=prepared.prefix_version,
            logprob=None
            if event.logprob is None or event.token_id is None
            else token_logprobs.native(event.token_id, event.logprob, texts),
        )
        if event.prompt_logprobs is not None:  # the first token's event
            prompt_ids = prepared.request.prompt_ids
            payload.prompt_token_ids = list(prompt_ids)
            payload.prompt_logprobs = token_logprobs.native_prompt(prompt_ids, event.prompt_logprobs, texts)
        yield f"data: {payload.model_dump_json()}\n\n"
        event = None if finished else await anext(rest, None)
