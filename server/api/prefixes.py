"""Prefix management: upload (native file or PEFT checkpoint), list, show, delete."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.datastructures import UploadFile

from prefix_store.artifact import PrefixMetadata, parse_uploaded_native
from prefix_store.ids import validate_task_id
from prefix_store.peft_import import key_values_from_peft
from server.api.json_body import TextJSONRoute
from server.api.schemas import PrefixInfo, PrefixList
from server.api.state import Caller, ServerState, State
from server.errors import BadRequest, InvalidInput, NotFound, PayloadTooLarge, store_work
from server.quotas import upload_within_quotas


class _AnyTextConvertor(PathConvertor):
    """Starlette's "path" (slashes, so that ids holding one reach the id check and get its 422), plus line
    breaks: with "path" ('.*'), the route's closing '$' matched before a trailing newline, so a PUT or DELETE of
    '/v1/prefixes/a%0A' acted on task 'a' instead of being refused as the id 'a\\n'."""

    regex = r"[\s\S]*"


register_url_convertor("anytext", _AnyTextConvertor())

router = APIRouter(route_class=TextJSONRoute)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


@router.put(
    "/v1/prefixes/{task_id:anytext}",
    status_code=201,
    response_model=PrefixInfo,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            PEFT_CONFIG_FILE: {"type": "string", "format": "binary"},
                            PEFT_WEIGHTS_FILE: {"type": "string", "format": "binary"},
                        },
                        "required": [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE],
                    }
                },
            },
            "required": True,
        }
    },
)
async def upload_prefix(
    task_id: str,
    request: Request,
    state: State,
    principal: Caller,
) -> JSONResponse:
    await store_work(validate_task_id, task_id)
    if task_id in state.model_names:  # the OpenAI routes' ``model`` would name the base model, never this task
        raise InvalidInput(
            f"task id {task_id!r} is a name of this server's base model (--served-model-name): choose another",
            param="task_id",
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/octet-stream", ""):
        raise BadRequest(
            f"unsupported content type {content_type!r}: send application/octet-stream (native .safetensors) "
            f"or multipart/form-data with {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE}"
        )
    tenant = principal.tenant
    try:
        # One upload of a tenant at a time, from its body's first byte to the write: a tenant holds at most one
        # body in memory (uploads held open by a client cost it alone), and the quota check and the write are one
        # step here (an asyncio lock: no thread waits on another's upload) and across replicas
        # (upload_within_quotas).
        async with state.gate.upload_lock(tenant):
            if content_type == "multipart/form-data":
                key_values = await _read_peft_form(
                    request, state.config.max_upload_bytes, state.model.is_encoder_decoder, state.model.num_layers
                )
            else:
                blob = await request.body()
                if not blob:
                    raise BadRequest("empty body: send the .safetensors prefix file")
                key_values = await store_work(parse_uploaded_native, blob, state.registry.fingerprint)
            meta = await store_work(
                upload_within_quotas, state.registry, tenant, task_id, key_values, state.quotas_for(tenant)
            )
    finally:
        state.heap_trimmer.request()  # the body, blob and parsed copies are freed now, between cached prefixes
    return JSONResponse(_info(state, meta), status_code=201)


async def _read_peft_form(request: Request, limit: int, encoder_decoder: bool, layers: int) -> torch.Tensor:
    """A PEFT checkpoint's two files, as key_values for a model of ``layers`` (decoder) layers."""
    try:
        form = await request.form(max_files=4, max_fields=8, max_part_size=limit)
    except PayloadTooLarge:
        raise
    except Exception as exc:  # starlette raises its own parse errors for malformed multipart bodies
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    try:
        parts = {}
        for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
            part = form.get(name)
            if not isinstance(part, UploadFile):
                raise BadRequest(f"multipart upload needs a file field named {name!r}")
            parts[name] = await part.read()
    finally:
        await form.close()
    return await store_work(
        partial(
            key_values_from_peft, encoder_decoder=encoder_decoder, decoder_layers=layers if encoder_decoder else None
        ),
        parts[PEFT_CONFIG_FILE],
        parts[PEFT_WEIGHTS_FILE],
    )


@router.get("/v1/prefixes", response_model=PrefixList)
async def list_prefixes(state: State, principal: Caller) -> dict[str, Any]:
    metas = await store_work(state.registry.list, principal.tenant)
    return {"data": [_info(state, m) for m in metas]}


@router.get("/v1/prefixes/{task_id:anytext}", response_model=PrefixInfo)
async def get_prefix(task_id: str, state: State, principal: Caller) -> dict[str, Any]:
    return _info(state, await store_work(state.registry.info, principal.tenant, task_id))


def _info(state: ServerState, meta: PrefixMetadata) -> dict[str, Any]:
    return {**meta.to_public_dict(), "fits_model": state.registry.fits_model(meta)}


@router.delete("/v1/prefixes/{task_id:anytext}", status_code=204)
async def delete_prefix(task_id: str, state: State, principal: Caller) -> Response:
    deleted = await store_work(state.registry.delete, principal.tenant, task_id)
    state.heap_trimmer.request()
    if not deleted:
        raise NotFound(f"no prefix {task_id!r}")
    return Response(status_code=204)
