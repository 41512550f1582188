"""Server settings: one dataclass, filled from command-line flags or PREFIX_SERVE_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

# The most log-probability alternatives a request may ask for per token (OpenAI's chat API and vLLM allow 20).
MAX_LOGPROBS = 20
# A request's logit_bias and its stop_token_ids may each name at most this many tokens.
MAX_LISTED_TOKENS = 1024
# Each logit bias within +-this (OpenAI's documented range).
MAX_LOGIT_BIAS = 100.0
# Structured output: the compiled constraints kept for reuse (per tenant), in bytes; a server sent many distinct
# schemas would otherwise grow without end. Least recently used go first.
GRAMMAR_CACHE_BYTES = 64 << 20
# The values of --fetch-between-steps.
FETCH_BETWEEN_STEPS = ("auto", "on", "off")


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # None = the embedded default model
    # Comma-separated names the OpenAI routes know the base model by (vLLM's --served-model-name), e.g. the Hugging
    # Face id clients were set up with; None = the loaded model's own name. No task may take one of them.
    served_model_name: str | None = None
    store: str | None = None  # None = disk store under the user's data directory
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str | None = None  # path of the JSON key file
    device: str | None = None  # None = cuda when available, else cpu
    dtype: str | None = None  # None = bf16 on cuda, fp32 on cpu
    max_batch_size: int = 32
    max_batch_tokens: int = 65536
    max_queue: int = 256
    # Prompt tokens one step may prefill, padding included (0 = no limit). 512 caps the stall that newcomers
    # cause running streams (~66 ms + ~1.5 ms a token on the 2-core CPU) without splitting ordinary bursts.
    max_prefill_tokens: int = 512
    # Prompt tokens that ride along in one decode step (chunked prefill fused into the decode forward);
    # 0 = a separate prefill forward per admission. Bounds the stall newcomers cause running streams; while
    # rows decode, each chunk's fixed cost counts against it too (server/engine.py, chunk_overhead).
    prefill_chunk_tokens: int = 64
    # While prefilling prompts can still finish within this many seconds of submission, steps carry fewer prompt
    # tokens than the chunk budget, down to a quarter of it (server/prefill_pacing.py): a burst with time to
    # spare is spread, sparing running streams' inter-token latency. None = 1.0 on a CPU, where a prompt token
    # costs a step ~2% of its time, and off (0) on CUDA, where a 64-token chunk costs a decode step little.
    prefill_deadline_s: float | None = None
    # Padded groups of similar lengths the running rows are kept in (fused steps only): less of the KV is padding.
    kv_groups: int = 4
    # Rows beyond max_batch_size for tenants other than the one holding the most rows: another tenant's request
    # starts at the next step while one tenant fills the batch (issue 6's fairness), and a lone tenant loses nothing.
    reserved_rows: int = 1
    # Waiting slots beyond max_queue for tenants other than the one with the most waiting: a tenant that fills the
    # queue does not get every other tenant 429s; a lone tenant loses nothing.
    reserved_queue: int = 32
    max_new_tokens: int = 2048  # upper bound a request may ask for
    max_prompt_tokens: int = 4096
    max_stop_strings: int = 16
    max_upload_bytes: int = 64 * 2**20
    max_request_bytes: int = 4 * 2**20  # JSON bodies (uploads have their own limit)
    max_virtual_tokens: int = 512
    host_cache_bytes: int = 512 * 2**20
    # Prefix loads from the store at once (0 = no limit): one at a time spreads a burst's CPU over many steps.
    max_concurrent_loads: int = 1
    # Prefixes larger than this are read from the store in pieces of this many tensor bytes, one piece per
    # engine step on a CPU (prefix_store/piecewise.py); 0 = read each prefix whole.
    load_piece_bytes: int = 2 * 2**20
    # On a CPU, whether prefix pieces are fetched from the store between engine steps too, not only unpacked
    # there (prefix_store/piecewise.py): "auto" when the store is on this machine, where a fetch is CPU (the
    # store's and ours) that would deschedule the steps' threads; "on"; "off". The step waits up to 10 ms for one.
    fetch_between_steps: str = "auto"
    device_cache_bytes: int = 2**30  # prefixes kept on the accelerator (unused on CPU, where host memory is used)
    # Prompt heads' K/V kept for later requests of the same prefix (server/prompt_cache.py), on the model's device;
    # 0 = off. Decoder-only models.
    prompt_cache_bytes: int = 256 * 2**20
    # Speculative decoding by prompt lookup (server/speculative.py): draft tokens per row and step, copied from the
    # row's own context and verified in the decode step, while at most ``speculative_max_rows`` rows
    # decode; 0 = off. None = 4 on a CPU, where it was measured (bench/speculative.py), and off on CUDA, where it
    # is not yet: there a speculating step cannot be launched ahead of the last one's tokens (server/engine.py).
    speculative_tokens: int | None = None
    speculative_max_rows: int = 8
    # How the model writes tool calls, for tool_choice 'auto' (server/api/tool_formats.py): "hermes"
    # (<tool_call> blocks: Hermes, Qwen and most tuned models), "llama" (Llama 3.1's JSON calls), or "none" to
    # refuse 'auto' as vLLM does without --enable-auto-tool-choice.
    tool_call_format: str = "hermes"
    request_timeout_s: float = 600.0  # a generation running longer is cancelled (408); 0 = no limit
    max_open_streams: int = 1024  # streamed generations open at once, server-wide (429 past it); 0 = no limit
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    # A connection is closed when a request's line and headers take longer than this (server/http_protocol.py:
    # slow clients holding connections); 0 = never.
    header_timeout_s: float = 30.0
    # With a Redis store, the Responses API's stored responses live in Redis for this long (every replica sees
    # them); 0 = keep them in each process's memory instead (server/api/response_store.py).
    responses_ttl_s: int = 24 * 3600
    disable_docs: bool = False  # no /docs, /redoc or /openapi.json
    # No CUDA graphs: decode steps run eagerly (on CUDA the default replays fixed-shape steps from graphs).
    enforce_eager: bool = False
    # Decode steps go through torch.compile before graph capture (fused kernels); compiled at startup.
    compile_decode: bool = False
    # float32 linear layers on the CPU keep torch's default kernel (MKL) instead of packed oneDNN
    # (server/cpu_linear.py), at ~1.4x the decode step time; a tied lm_head is then held once, not twice.
    stock_linear: bool = False
    # The runner fuses q/k/v and gate/up into one matmul each (server/fused_projections.py) on CUDA, and on the
    # CPU where linear layers run on oneDNN; True keeps the model's separate layers.
    stock_projections: bool = False
    # On CUDA fixed-shape decode steps attend with a Triton kernel reading each row's KV columns only
    # (server/decode_attention.py); True keeps SDPA over every column under a mask.
    stock_decode_attention: bool = False
    # The objects alive after start-up are frozen out of the garbage collector's full walks (server/gc_freeze.py):
    # ~300 ms pauses of every stream otherwise. True leaves the collector as Python sets it up.
    no_gc_freeze: bool = False
    allow_unverified_architecture: bool = False  # serve a model type not in server/architectures.py, with a warning
    cors_allow_origins: str | None = None  # comma-separated origins allowed cross-site; None = CORS off
    # Per-tenant quota defaults (0 = unlimited); the key file's "quotas" object overrides them per tenant.
    tenant_max_concurrent_requests: int = 0
    tenant_max_queued_requests: int = 0
    tenant_max_prefixes: int = 0
    tenant_max_stored_bytes: int = 0
    tenant_max_upload_bytes: int = 0
    metrics_task_labels: int = 0  # first N tasks get their own `task` metric label, later ones "other"; 0 = off
