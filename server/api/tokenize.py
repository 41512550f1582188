"""vLLM's utility routes: POST /tokenize, POST /detokenize, GET /version.

Clients written against vLLM (benchmark harnesses, prompt-budgeting front ends) count a prompt's tokens with
/tokenize before they send it, so its ids must be the ones a generation would prefill: messages go through the
same chat-template rendering as /v1/chat/completions (tools shown as with tool_choice 'auto', the default), and
a prompt through the same tokenizer call as /v1/completions. A prefix changes the context, never the
tokenisation, yet ``model`` must still name the base model or one of the caller's tasks, as on the OpenAI
routes. As in vLLM, these live at the root (no /v1) and answer errors in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.generate import ChatTemplateOptions
from server.api.generate import tokenize as prompt_ids
from server.api.openai_compat import ChatMessageIn, OpenAIRoute, ParameterError, chat_messages, task_metadata
from server.api.state import Caller, ServerState, State
from server.api.tool_calls import ToolIn
from server.api.tool_formats import TOOL_CALL_FORMATS
from server.errors import InvalidInput

router = APIRouter(route_class=OpenAIRoute)


class TokenizeRequest(BaseModel):
    """A prompt (with ``add_special_tokens``) or chat messages (with ``add_generation_prompt`` and ``tools``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[ChatMessageIn] | None = Field(None, min_length=1, max_length=256)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolIn] | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' or 'messages', not both or neither")
        chat_only = {"add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools"}
        wrong = {"add_special_tokens"} if self.prompt is None else chat_only
        if sent := sorted(wrong & self.model_fields_set):
            raise ValueError(f"{', '.join(sent)} does not apply to {'messages' if self.prompt is None else 'prompt'}")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def _ids(state: ServerState, body: TokenizeRequest) -> list[int]:
    """The ids a generation would prefill for this prompt or these messages."""
    if body.messages is None:
        tokenizer = state.model.tokenizer
        if body.add_special_tokens or tokenizer is None:
            return prompt_ids(state, body.prompt, None)  # /v1/completions' call
        return list(tokenizer(body.prompt, add_special_tokens=False).input_ids)
    tools: list[dict[str, Any]] | None = (
        None if body.tools is None else [tool.model_dump(exclude_none=True) for tool in body.tools]
    )
    tool_format = TOOL_CALL_FORMATS.get(state.config.tool_call_format)
    return prompt_ids(state, None, chat_messages(body.messages), tools, tool_format, ChatTemplateOptions.asked(body))


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, state: State, principal: Caller) -> TokenizeResponse:
    await task_metadata(state, principal, body.model)
    ids = await asyncio.to_thread(_ids, state, body)  # megabytes of text take seconds: not on the event loop
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_context, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, state: State, principal: Caller) -> DetokenizeResponse:
    await task_metadata(state, principal, body.model)
    tokenizer = state.model.tokenizer
    if tokenizer is None:
        raise InvalidInput("this model has no tokenizer")
    vocab = len(tokenizer)  # the tokenizer would decode a larger id to '' without a word
    if any(not 0 <= token < vocab for token in body.tokens):
        raise ParameterError("tokens", f"token ids must be between 0 and {vocab - 1}")
    return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))


@functools.cache
def _package_version() -> str:
    try:
        return version("prefix-serve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@router.get("/version", response_model=VersionResponse)
async def server_version() -> VersionResponse:
    """No key needed, as for /health."""
    return VersionResponse(version=_package_version())
