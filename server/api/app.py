"""The FastAPI application: lifespan (model, store, engine), error handlers, routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from prefix_store.backends import (
    PrefixBackend,
    RedisBackend,
    default_store_url,
    open_backend,
    store_on_this_machine,
)
from prefix_store.piecewise import run_here
from prefix_store.registry import PrefixRegistry
from server.api import generate, openai_compat, prefixes, responses, tokenize
from server.api.auth import KeyRing
from server.api.body_limit import BodyLimitMiddleware
from server.api.response_store import MemoryResponseStore, RedisResponseStore, ResponseStore
from server.api.schemas import ErrorBody, HealthStatus, OpenAIErrorBody, error_responses
from server.api.state import ServerState
from server.api.validation import describe as describe_validation
from server.config import ServeConfig
from server.engine import Engine
from server.errors import ApiError, BadRequest, InvalidInput, NotFound, RequestTimeout
from server.gc_freeze import frozen_heap
from server.heap_trim import HeapTrimmer, malloc_trim
from server.metrics import MetricsMiddleware, ServerMetrics
from server.metrics import router as metrics_router
from server.model_loading import LoadedModel, load_model
from server.prefill_pacing import DEFAULT_CPU_DEADLINE_S
from server.prompt_cache import PromptCache
from server.quotas import RequestGate
from server.runner import ModelRunner
from server.scheduler import SchedulerConfig
from server.seq2seq_runner import Seq2SeqRunner
from server.speculative import DEFAULT_CPU_SPECULATIVE_TOKENS, SpeculativeConfig
from server.step_gaps import StepGaps
from server.structured_output import GrammarCompiler
from server.threads import io_executor

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _prefill_deadline_s(config: ServeConfig, device: torch.device) -> float:
    """Prefill pacing's deadline: the flag, else on by default where prompt tokens are costly (a CPU)."""
    if config.prefill_deadline_s is not None:
        return config.prefill_deadline_s
    return DEFAULT_CPU_DEADLINE_S if device.type == "cpu" else 0.0


def _speculative(config: ServeConfig, device: torch.device) -> SpeculativeConfig:
    """Speculative decoding's settings: the flags, else on by default where it was measured (a CPU)."""
    tokens = config.speculative_tokens
    if tokens is None:
        tokens = DEFAULT_CPU_SPECULATIVE_TOKENS if device.type == "cpu" else 0
    return SpeculativeConfig(tokens, config.speculative_max_rows)


def _fetches_between_steps(config: ServeConfig, store_url: str) -> bool:
    """--fetch-between-steps: "auto" when the store is on this machine. Measured in S5 (16 cold P = 200 loads
    from a Redis on the same 2 cores beside 16 streams, five side-by-side runs): the streams' ITL p99 over no
    burst, median 1.17 (0.93-1.22) against 1.28 (1.05-1.37) with fetches during the steps; the loads' own time
    to first token +10-20% at the median (bench/RESULTS.md, twenty-eighth session)."""
    if config.fetch_between_steps != "auto":
        return config.fetch_between_steps == "on"
    return store_on_this_machine(store_url)


def build_state(config: ServeConfig, model: LoadedModel, metrics: ServerMetrics | None = None) -> ServerState:
    """Open the store and start the engine around an already loaded model (instrumented when given metrics)."""
    store_url = config.store or default_store_url()
    backend = open_backend(store_url)
    source = store_url.partition("://")[0].lower() if "://" in store_url else "disk"  # a bare path is a disk store
    # On a CPU the engine's threads take every core: prefix loads unpack between its steps (server/step_gaps.py).
    step_gaps = StepGaps() if model.device.type == "cpu" else None
    run_between_steps = run_here if step_gaps is None else step_gaps.run
    runner_class = Seq2SeqRunner if model.is_encoder_decoder else ModelRunner
    # Decoder-only runners replay fixed-shape decode steps from CUDA graphs on a GPU unless told not to.
    steps = (
        {}
        if model.is_encoder_decoder
        else {
            "static_decode": False if config.enforce_eager else None,
            "compile_decode": config.compile_decode,
            "fuse_projections": False if config.stock_projections else None,
            "decode_kernel": not config.stock_decode_attention,
        }
    )
    runner = runner_class(
        model.model,
        model.num_layers,
        model.num_kv_heads,
        model.head_dim,
        device_cache_bytes=config.device_cache_bytes,
        onednn_linear=not config.stock_linear,
        **steps,
    )
    engine = Engine(
        runner,
        model.tokenizer,
        eos_token_ids=model.eos_token_ids,
        max_context=model.max_context,
        config=SchedulerConfig(
            config.max_batch_size,
            config.max_batch_tokens,
            config.max_queue,
            max_prefill_tokens=config.max_prefill_tokens,
            reserved_rows=config.reserved_rows,
            reserved_queue=config.reserved_queue,
            prefill_chunk_tokens=config.prefill_chunk_tokens,
            prefill_deadline_s=_prefill_deadline_s(config, model.device),
            kv_groups=config.kv_groups,
        ),
        metrics=None if metrics is None else metrics.engine,
        step_gaps=step_gaps,
        prompt_cache=PromptCache(config.prompt_cache_bytes) if config.prompt_cache_bytes > 0 else None,
        speculative=_speculative(config, model.device),
    )
    # Trims run between steps, and wait for the engine to go idle while rows decode (server/heap_trim.py).
    heap_trimmer = HeapTrimmer(malloc_trim(), run=run_between_steps, busy=lambda: engine.num_running > 0)
    # Generations free their activations, KV buffers and logits in the heap too: once traffic stops, that memory
    # goes back to the OS (~85 MiB of the default model's after a soak, which otherwise stayed until the next
    # prefix upload or load asked for a trim).
    engine.idle_hooks.append(heap_trimmer.request)
    if step_gaps is not None:
        engine.idle_hooks.append(step_gaps.flush)
    observe_load = None if metrics is None else metrics.load_observer(source)

    def on_load(seconds: float) -> None:
        if observe_load is not None:
            observe_load(seconds)
        heap_trimmer.request()  # the load freed its blob, and may have evicted others

    registry = PrefixRegistry(
        backend,
        model.fingerprint,
        host_cache_bytes=config.host_cache_bytes,
        # A prefix must leave the context room for a prompt token and a generated one: a longer one could be
        # stored and never serve a request.
        max_virtual_tokens=min(config.max_virtual_tokens, model.max_context - 2),
        max_upload_bytes=config.max_upload_bytes,
        max_concurrent_loads=config.max_concurrent_loads,
        load_piece_bytes=config.load_piece_bytes,
        run_cpu_work=run_between_steps,
        fetch_in=step_gaps.run_held if step_gaps is not None and _fetches_between_steps(config, store_url) else None,
        on_load=on_load,
        serving_dtype=model.dtype,
    )
    if config.compile_decode and isinstance(runner, ModelRunner):
        runner.compile_decode_steps(engine.max_groups)  # before traffic: each compile takes a while
    keys = KeyRing.load(config.api_keys) if config.api_keys else KeyRing.disabled()
    engine.start()
    gate = RequestGate(
        max_open_streams=config.max_open_streams or None, request_timeout_s=config.request_timeout_s or None
    )
    grammars = (
        None
        if model.tokenizer is None
        else GrammarCompiler.for_tokenizer(model.tokenizer, runner.vocab_size, model.eos_token_ids)
    )
    state = ServerState(
        config,
        model,
        engine,
        registry,
        keys,
        backend.describe(),
        gate=gate,
        heap_trimmer=heap_trimmer,
        grammars=grammars,
        responses=_response_store(config, backend),
    )
    if metrics is not None:
        metrics.bind(state)
    return state


def _response_store(config: ServeConfig, backend: PrefixBackend) -> ResponseStore:
    """Where stored Responses API responses live: beside the prefixes in Redis (every replica sees them), else
    in this process's memory."""
    if isinstance(backend, RedisBackend) and config.responses_ttl_s > 0:
        return RedisResponseStore(backend, config.responses_ttl_s)
    return MemoryResponseStore()


# Paths under /v1 that are the native API's; the rest of /v1 is OpenAI's (routes that exist or not).
_NATIVE_PREFIXES = ("/v1/generate", "/v1/prefixes")


def _openai_path(path: str) -> bool:
    return path.startswith("/v1/") and not path.startswith(_NATIVE_PREFIXES)


def _error_body(path: str, error: ApiError) -> dict[str, Any]:
    """An error answered outside the routes (the body limit, the framework, a bug), in the shape of the API the
    path belongs to: OpenAI's under its paths, so the SDKs read its code."""
    if _openai_path(path):
        return openai_compat.openai_error_body(error.status_code, error.message, None, error.error_type)
    return error.body()


def create_app(config: ServeConfig, *, model: LoadedModel | None = None) -> FastAPI:
    """The app; the model is loaded in the lifespan unless one is given (tests, embedding)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model
        if loaded is None:
            loaded = await asyncio.to_thread(
                load_model,
                config.model,
                device=config.device,
                dtype=config.dtype,
                allow_unverified=config.allow_unverified_architecture,
            )
        state = build_state(config, loaded, metrics)
        # From now on blocking work (prefix loads and uploads) runs torch single-threaded, off the engine's cores.
        asyncio.get_running_loop().set_default_executor(io_executor())
        app.state.server = state
        # Frozen last, when everything start-up made is in the heap; thawed after the shutdown below.
        with nullcontext() if config.no_gc_freeze else frozen_heap():
            try:
                yield
            finally:
                state.ready = False
                await asyncio.to_thread(state.engine.shutdown)
                state.registry.backend.close()
                state.heap_trimmer.close()

    # One registry per app: tests build several apps in one process.
    metrics = ServerMetrics(task_labels=config.metrics_task_labels)
    docs = not config.disable_docs
    app = FastAPI(
        title="prefix-serve",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.metrics = metrics
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=config.max_request_bytes,
        upload_limit=config.max_upload_bytes,
        upload_prefix="/v1/prefixes/",
        error_body=_error_body,
    )
    if config.cors_allow_origins:  # off unless asked for: browsers on other origins get no access
        origins = [o.strip() for o in config.cors_allow_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    # Added last, so outermost: it also counts the 413s the body limit answers before any route.
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _install_error_handlers(app)

    @app.get("/health", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
    async def health(request: Request) -> JSONResponse:
        state: ServerState | None = getattr(request.app.state, "server", None)
        if state is None or not state.ready or state.draining:
            # As the other routes answer meanwhile: starting, or shutting down (a load balancer tries elsewhere).
            retry_after = "5" if state is not None and state.draining else "1"
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": retry_after})
        return JSONResponse({"status": "ok"})

    app.include_router(generate.router, responses=error_responses(ErrorBody))
    app.include_router(prefixes.router, responses=error_responses(ErrorBody))
    app.include_router(metrics_router)
    app.include_router(openai_compat.router, responses=error_responses(OpenAIErrorBody))
    app.include_router(responses.router, responses=error_responses(OpenAIErrorBody))
    app.include_router(tokenize.router, responses=error_responses(OpenAIErrorBody))  # vLLM's, at the root
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problem = describe_validation(exc)
        error: ApiError = (
            BadRequest(problem.message) if problem.json_invalid else InvalidInput(problem.message, param=problem.param)
        )
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: ApiError
        if exc.status_code == 404:
            error = NotFound(str(exc.detail))
        elif exc.status_code == 400:  # e.g. a body the framework could not parse (JSON nested past recursion)
            error = BadRequest(str(exc.detail))
        elif exc.status_code == 408:  # a body that stopped arriving (server/api/body_limit.py)
            error = RequestTimeout(str(exc.detail))
        else:
            error = ApiError(str(exc.detail))
        error.status_code = exc.status_code
        if exc.status_code == 405:
            error.error_type = "method_not_allowed"
        headers = getattr(exc, "headers", None)
        return JSONResponse(_error_body(request.url.path, error), status_code=exc.status_code, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> Response:
        # The client left while its body was read or its whole answer made: nothing failed here, and no one reads
        # the answer. 499 (nginx's "client closed request") keeps it out of the 5xx rate the alert rules page on.
        log.info("client disconnected before its answer: %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(_error_body(request.url.path, ApiError("internal server error")), 500)
