"""`prefix-serve` command line. `serve` runs the server; upload, generate, list, info, delete are clients/cli.py."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import fields
from types import FrameType
from typing import Any

from clients.cli import add_client_commands, run_client_command
from prefix_store.backends.redis_url import is_loopback
from server.config import FETCH_BETWEEN_STEPS, ServeConfig
from server.request_log import LOG_FORMATS, LOG_LEVELS, configure_logging

ENV_PREFIX = "PREFIX_SERVE_"
KEEP_ALIVE_S = 75  # seconds an idle HTTP connection stays open (nginx's default)

# On/off flags of `serve` (store_true), each also on with PREFIX_SERVE_<FLAG>=1.
SERVE_SWITCHES = (
    "disable_docs",
    "enforce_eager",
    "compile_decode",
    "stock_linear",
    "stock_projections",
    "stock_decode_attention",
    "no_gc_freeze",
)

# flag -> (type, help). Every flag can also come from PREFIX_SERVE_<FLAG> (dashes as underscores).
_SERVE_FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "model directory, .gguf file or cached hub id (default: embedded SmolLM2-135M-Instruct)"),
    "served_model_name": (
        str,
        "comma-separated names the OpenAI routes know the base model by, the first listed (vLLM's flag; "
        "default: the model's own name)",
    ),
    "store": (
        str,
        "prefix store: disk://PATH or redis://[USER:PASSWORD@]HOST:PORT/DB (rediss:// for TLS; ?ssl_ca_certs=PATH "
        "for a private CA; redis+cluster://HOST:PORT[,HOST:PORT...] for a Redis Cluster) (default: disk:// under "
        "the user data directory)",
    ),
    "host": (str, "address to bind (default 127.0.0.1)"),
    "port": (int, "port (default 8000)"),
    "api_keys": (str, "JSON file of API keys and tenants"),
    "device": (str, "cpu or cuda (default: cuda when available)"),
    "dtype": (str, "float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)"),
    "max_batch_size": (int, "rows decoded together (default 32), plus --reserved-rows for other tenants"),
    "max_batch_tokens": (int, "KV budget of the batch in token slots (default 65536)"),
    "max_queue": (int, "waiting requests before 429 (default 256)"),
    "max_prefill_tokens": (int, "prompt tokens prefilled per step, padding included (default 512; 0 = no limit)"),
    "prefill_chunk_tokens": (
        int,
        "prompt tokens prefilled inside each decode step, in chunks, each chunk's overhead counted "
        "(default 64; 0 = separate prefill steps)",
    ),
    "prefill_deadline_s": (
        float,
        "while prompts can finish prefilling within this many seconds, steps carry fewer of their tokens, down to "
        "a quarter of --prefill-chunk-tokens (default 1.0 on cpu, 0 = off on cuda)",
    ),
    "kv_groups": (int, "padded groups of similar lengths the running rows are kept in, with fused steps (default 4)"),
    "reserved_rows": (int, "rows beyond --max-batch-size for tenants other than the one holding the most (default 1)"),
    "reserved_queue": (
        int,
        "waiting slots beyond --max-queue for tenants other than the one with the most waiting (default 32)",
    ),
    "max_new_tokens": (int, "largest max_new_tokens a request may ask (default 2048)"),
    "max_prompt_tokens": (int, "longest prompt in tokens (default 4096)"),
    "max_upload_bytes": (int, "largest prefix upload (default 64 MiB)"),
    "max_virtual_tokens": (int, "longest prefix P (default 512; at most the model's context minus 2)"),
    "host_cache_bytes": (int, "host prefix cache budget (default 512 MiB)"),
    "max_concurrent_loads": (int, "prefix loads from the store at once (default 1; 0 = no limit)"),
    "load_piece_bytes": (
        int,
        "read larger prefixes from the store in pieces of this many bytes, one per step on CPU "
        "(default 2 MiB; 0 = whole)",
    ),
    "fetch_between_steps": (
        str,
        "on a CPU, read prefix pieces from the store between engine steps, which wait up to 10 ms for each: auto "
        "(default: when the store is on this machine, where a read is CPU the steps would share), on or off",
    ),
    "device_cache_bytes": (int, "accelerator prefix cache budget (default 1 GiB; unused on CPU)"),
    "prompt_cache_bytes": (
        int,
        "K/V of prompt heads kept for later requests of the same prefix, in blocks of 16 tokens (default 256 MiB; "
        "0 = off)",
    ),
    "speculative_tokens": (
        int,
        "draft tokens per step looked up in a row's own context and verified in the decode step (default 4 "
        "on cpu, 0 = off on cuda)",
    ),
    "speculative_max_rows": (int, "speculate only while at most this many rows decode (default 8)"),
    "tool_call_format": (
        str,
        "how the model writes tool calls, read back for tool_choice 'auto': hermes (<tool_call> blocks), llama "
        "(Llama 3.1 JSON) or none ('auto' refused) (default hermes)",
    ),
    "max_stop_strings": (int, "most stop strings per request (default 16)"),
    "max_request_bytes": (int, "largest JSON request body (default 4 MiB)"),
    "request_timeout_s": (float, "cancel a generation running longer, answering 408 (default 600; 0 = never)"),
    "max_open_streams": (int, "streamed generations open at once before 429 (default 1024; 0 = no limit)"),
    "drain_timeout_s": (float, "on SIGTERM, seconds in-flight requests get to finish (default 30)"),
    "header_timeout_s": (
        float,
        "close a connection whose request line and headers take longer than this many seconds (default 30; 0 = never)",
    ),
    "responses_ttl_s": (
        int,
        "with a redis store, stored Responses API responses are kept there, shared by every replica, this many "
        "seconds (default 86400; 0 = in each process's memory)",
    ),
    "cors_allow_origins": (str, "comma-separated origins allowed cross-site (default: none, CORS off)"),
    "tenant_max_concurrent_requests": (int, "per-tenant generations in flight before 429 (default 0 = no limit)"),
    "tenant_max_queued_requests": (int, "per-tenant generations waiting before 429 (default 0 = no limit)"),
    "tenant_max_prefixes": (int, "per-tenant stored prefixes before 409 (default 0 = no limit)"),
    "tenant_max_stored_bytes": (int, "per-tenant stored prefix bytes before 409 (default 0 = no limit)"),
    "tenant_max_upload_bytes": (int, "per-tenant largest upload before 413 (default 0 = --max-upload-bytes)"),
    "metrics_task_labels": (
        int,
        'tasks with their own metric label, later ones as "other" (default 0 = no label); with --api-keys, '
        "/metrics then answers admin keys only",
    ),
}


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the inference server")
    for name, (kind, text) in _SERVE_FLAGS.items():
        env = ENV_PREFIX + name.upper()
        serve.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"{text} [env {env}]")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help=f"allow a non-loopback bind without API keys [env {ENV_PREFIX}INSECURE_NO_AUTH=1]",
    )
    serve.add_argument(  # a store_true flag: the table's type(raw) conversion would read "0" as True
        "--allow-unverified-architecture",
        action="store_true",
        help=f"serve a model type no test verifies, with a warning [env {ENV_PREFIX}ALLOW_UNVERIFIED_ARCHITECTURE=1]",
    )
    serve.add_argument(
        "--disable-docs",
        action="store_true",
        help=f"serve no /docs, /redoc or /openapi.json [env {ENV_PREFIX}DISABLE_DOCS=1]",
    )
    serve.add_argument(
        "--enforce-eager",
        action="store_true",
        help=f"no CUDA graphs: every decode step runs eagerly (vLLM's flag) [env {ENV_PREFIX}ENFORCE_EAGER=1]",
    )
    serve.add_argument(
        "--compile-decode",
        action="store_true",
        help="compile the fixed-shape decode step with torch.compile at startup (tens of seconds) "
        f"for fewer, fused kernels; CUDA graphs then replay those [env {ENV_PREFIX}COMPILE_DECODE=1]",
    )
    serve.add_argument(
        "--stock-linear",
        action="store_true",
        help="float32 linear layers on the CPU use torch's default kernel, not oneDNN with packed weights: "
        f"slower steps, no packed copy of a tied lm_head [env {ENV_PREFIX}STOCK_LINEAR=1]",
    )
    serve.add_argument(
        "--stock-projections",
        action="store_true",
        help="keep q/k/v and gate/up as separate matmuls instead of one each (fused by default on CUDA, and on "
        f"the CPU with oneDNN linear layers) [env {ENV_PREFIX}STOCK_PROJECTIONS=1]",
    )
    serve.add_argument(
        "--stock-decode-attention",
        action="store_true",
        help="on CUDA, fixed-shape decode steps attend with SDPA over every KV column instead of the Triton "
        f"kernel that reads each row's columns only [env {ENV_PREFIX}STOCK_DECODE_ATTENTION=1]",
    )
    serve.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the objects alive after start-up in the garbage collector's full walks (~300 ms pauses of "
        f"every stream when one runs) instead of freezing them [env {ENV_PREFIX}NO_GC_FREEZE=1]",
    )
    serve.add_argument(
        "--log-level",
        default=os.environ.get(ENV_PREFIX + "LOG_LEVEL", "info"),
        help=f"debug, info, warning or error (default info) [env {ENV_PREFIX}LOG_LEVEL]",
    )
    serve.add_argument(
        "--log-format",
        default=os.environ.get(ENV_PREFIX + "LOG_FORMAT", "text"),
        help=f"text or json: one line per request either way (default text) [env {ENV_PREFIX}LOG_FORMAT]",
    )


class ConfigError(ValueError):
    """A flag or PREFIX_SERVE_* variable the server cannot start with; the message names it."""


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("", "0", "false", "no", "off")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Flags win over PREFIX_SERVE_* variables, which win over the defaults. ConfigError for a value of the wrong
    type or out of its range (a server that would refuse every request, or size nothing)."""
    values: dict[str, object] = {}
    for field in fields(ServeConfig):
        if field.name not in _SERVE_FLAGS:
            continue
        kind = _SERVE_FLAGS[field.name][0]
        value = getattr(args, field.name, None)
        if value is None and (raw := os.environ.get(ENV_PREFIX + field.name.upper())):
            try:
                value = kind(raw)
            except ValueError as exc:
                raise ConfigError(f"{ENV_PREFIX}{field.name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
        if value is not None:
            values[field.name] = value
    for switch in SERVE_SWITCHES:  # on by its flag or by its variable set to 1 (or true, yes, on)
        if getattr(args, switch, False) or _env_switch(switch):
            values[switch] = True
    config = ServeConfig(**values)
    if (problem := _range_problem(config)) is not None:
        raise ConfigError(problem)
    return config


def _env_switch(name: str) -> bool:
    raw = os.environ.get(ENV_PREFIX + name.upper(), "").strip().lower()
    if raw not in _TRUE_WORDS + _FALSE_WORDS:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} must be 1, true, yes or on (0, false, no or off)")
    return raw in _TRUE_WORDS


# The least value of each numeric flag: 1 where 0 would leave the server unable to serve (or size nothing), 0
# where 0 means off or no limit. Port 0 would bind a port no one is told of.
_LEAST: dict[str, int] = {
    "port": 1,
    "max_batch_size": 1,
    "max_batch_tokens": 1,
    "max_queue": 1,
    "max_new_tokens": 1,
    "max_prompt_tokens": 1,
    "max_upload_bytes": 1,
    "max_request_bytes": 1,
    "max_virtual_tokens": 1,
    "kv_groups": 1,
    **dict.fromkeys(
        (
            "max_prefill_tokens",
            "prefill_chunk_tokens",
            "prefill_deadline_s",
            "reserved_rows",
            "reserved_queue",
            "host_cache_bytes",
            "max_concurrent_loads",
            "load_piece_bytes",
            "device_cache_bytes",
            "prompt_cache_bytes",
            "speculative_tokens",
            "speculative_max_rows",
            "max_stop_strings",
            "request_timeout_s",
            "max_open_streams",
            "drain_timeout_s",
            "header_timeout_s",
            "responses_ttl_s",
            "tenant_max_concurrent_requests",
            "tenant_max_queued_requests",
            "tenant_max_prefixes",
            "tenant_max_stored_bytes",
            "tenant_max_upload_bytes",
            "metrics_task_labels",
        ),
        0,
    ),
}


def _range_problem(config: ServeConfig) -> str | None:
    for name, least in _LEAST.items():
        value = getattr(config, name)
        if value is None:  # a default chosen at startup (by device)
            continue
        flag = "--" + name.replace("_", "-")
        if not least <= value < float("inf"):  # NaN compares false
            meaning = " (0 = off or no limit)" if least == 0 else ""
            return f"{flag} must be at least {least}{meaning}, not {value}"
    if config.port > 65535:
        return f"--port must be at most 65535, not {config.port}"
    return None


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from prefix_store.backends import default_store_url
    from prefix_store.backends.redis_url import redact_url
    from server.api.app import create_app
    from server.api.tool_formats import TOOL_CALL_FORMATS
    from server.http_protocol import header_deadline_protocol
    from server.model_loading import ModelLoadError, load_model

    try:
        config = config_from_args(args)
        insecure = args.insecure_no_auth or _env_switch("insecure_no_auth")
        allow_unverified = (
            config.allow_unverified_architecture
            or args.allow_unverified_architecture
            or _env_switch("allow_unverified_architecture")
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not config.api_keys and not is_loopback(config.host) and not insecure:
        print(
            f"error: refusing to bind {config.host} without --api-keys (pass --insecure-no-auth to override)",
            file=sys.stderr,
        )
        return 2
    if config.api_keys:  # a bad key file fails now, not after the model has loaded
        from server.api.auth import KeyRing

        try:
            KeyRing.load(config.api_keys)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if config.fetch_between_steps not in FETCH_BETWEEN_STEPS:
        choices = ", ".join(FETCH_BETWEEN_STEPS)
        print(f"error: --fetch-between-steps must be {choices}, not {config.fetch_between_steps!r}", file=sys.stderr)
        return 2
    if config.tool_call_format != "none" and config.tool_call_format not in TOOL_CALL_FORMATS:
        names = ", ".join([*TOOL_CALL_FORMATS, "none"])
        print(f"error: --tool-call-format must be one of {names}, not {config.tool_call_format!r}", file=sys.stderr)
        return 2
    log_format = args.log_format.lower()
    if log_format not in LOG_FORMATS:
        print(f"error: --log-format must be one of {', '.join(LOG_FORMATS)}, not {args.log_format!r}", file=sys.stderr)
        return 2
    if args.log_level.lower() not in LOG_LEVELS:
        print(f"error: --log-level must be one of {', '.join(LOG_LEVELS)}, not {args.log_level!r}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, log_format)
    store = config.store or default_store_url()
    if (problem := _store_problem(store) or _bind_problem(config.host, config.port)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        logging.getLogger("prefix_serve").info("loading the model %s", config.model or "(the embedded default)")
        with _stopped_by_signals():
            model = load_model(
                config.model, device=config.device, dtype=config.dtype, allow_unverified=allow_unverified
            )
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _Stopped as stop:
        print(f"prefix-serve: stopped by {stop.signal_name} while loading the model", file=sys.stderr)
        return 128 + stop.signal_number
    banner = (
        f"prefix-serve: model {model.name} ({model.num_layers} layers, {model.num_kv_heads} KV heads, "
        f"head size {model.head_dim}) on {model.device} as {str(model.dtype).removeprefix('torch.')}; "
        f"store {redact_url(store)}; listening on http://{config.host}:{config.port}"
    )
    if log_format == "json":  # every line of a JSON log is JSON
        logging.getLogger("prefix_serve").info(banner)
    else:
        print(banner, flush=True)
    app = create_app(config, model=model)
    server_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=args.log_level.lower(),
        log_config=None,  # uvicorn's loggers propagate to ours (configure_logging), in the chosen format
        access_log=False,  # our request line (server/request_log.py) replaces uvicorn's access log
        timeout_graceful_shutdown=max(1, round(config.drain_timeout_s)),
        # Idle keep-alive connections stay open longer than clients keep them (httpx: 5 s, uvicorn's own
        # default too): when both sides expire together, a client can send a request on a connection that the
        # server is closing, and gets a connection error with no response (seen by the cold-burst benchmark).
        timeout_keep_alive=KEEP_ALIVE_S,
        http=header_deadline_protocol(config.header_timeout_s),
    )
    _draining_server(server_config, app, config.drain_timeout_s).run()
    return 0


class _Stopped(BaseException):
    """SIGINT or SIGTERM while the server was not serving yet: nothing to drain, a quiet exit. A BaseException,
    as KeyboardInterrupt is: the loader's handlers of Exception must not take it for a broken model file."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number
        self.signal_name = signal.Signals(signal_number).name


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise _Stopped in the block (a model load: seconds to minutes); uvicorn installs its own
    handlers once it serves. Without this, SIGTERM killed the process mid-load and Ctrl-C printed a traceback."""

    def stop(number: int, frame: FrameType | None) -> None:
        raise _Stopped(number)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _bind_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (in use, not an address of this machine), found before the
    model loads rather than after."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _store_problem(url: str) -> str | None:
    """Why the server cannot start on this store (a bad URL, credentials Redis refuses), before the model loads.
    A store that cannot be reached now is only warned about: the server recovers once it can be."""
    from prefix_store.backends import open_backend
    from prefix_store.errors import StoreUnavailable

    try:
        backend = open_backend(url)
    except (ValueError, StoreUnavailable) as exc:  # a bad URL; a disk store's directory that cannot be made
        return str(exc)
    try:
        backend.check()
    except ValueError as exc:
        return str(exc)
    except StoreUnavailable as exc:
        logging.getLogger("prefix_serve").warning("%s; starting anyway: prefixes load once it answers", exc)
    finally:
        backend.close()
    return None


def _draining_server(config: Any, app: Any, drain_timeout_s: float) -> Any:
    """uvicorn's server, plus a drain on SIGTERM, and exit code 0.

    On SIGTERM the server keeps listening while in-flight generations finish (up to ``drain_timeout_s``): new
    requests and /health get 503 with Retry-After, so a load balancer or a Kubernetes readiness probe sends work
    elsewhere. Generations still running at the deadline are stopped with a 503 (streamed: a last error event),
    never cut off mid-body; then uvicorn stops listening, closes idle connections and runs the lifespan's
    shutdown. SIGINT (Ctrl-C), or a second signal, stops as uvicorn does: no new connections, open ones get
    uvicorn's graceful-shutdown time.
    """
    import uvicorn

    from server.drain import drain_generations

    class Server(uvicorn.Server):
        drain_signal: int | None = None
        drain_task: asyncio.Task[None] | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            state = getattr(app.state, "server", None)
            if state is not None:
                state.draining = True
            if sig == signal.SIGTERM and state is not None and self.drain_signal is None:
                self.drain_signal = sig  # the drain starts on the next tick, in the event loop (not in a handler)
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_signal is not None and self.drain_task is None:
                self.drain_task = asyncio.get_running_loop().create_task(self._drain(self.drain_signal))
            return await super().on_tick(counter)

        async def _drain(self, sig: int) -> None:
            await drain_generations(app.state.server, drain_timeout_s)
            super().handle_exit(sig, None)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                # uvicorn re-raises the signal it shut down for, so the process would die by it;
                # a drained shutdown is a clean exit.
                self._captured_signals.clear()

    return Server(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-serve", description="Serve many prefix-tuned tasks on one model.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    add_client_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if getattr(args, "client_command", None) is not None:
        return run_client_command(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
