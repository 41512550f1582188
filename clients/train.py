"""``prefix-serve train``: prefix-tune the server's base model on a JSONL file with PEFT, save, optionally upload.

    prefix-serve train data.jsonl --output out/ --eval dev.jsonl --num-virtual-tokens 10 --epochs 3 \\
        --task-id my-task --upload http://127.0.0.1:8000

The base model is loaded exactly as ``prefix-serve serve`` loads it (``--model`` takes the same values;
default: the embedded SmolLM2-135M-Instruct), frozen, in fp32. The output directory gets PEFT's checkpoint
(``adapter_config.json`` + ``adapter_model.safetensors``, as ``save_pretrained`` writes it), the native
artifact ``prefix.safetensors`` (with the model's fingerprint, so another model refuses it) and
``training.json`` (options, losses, wall time). Either can be uploaded with ``prefix-serve upload``.

torch, transformers and peft are imported inside ``train`` only, so ``import clients`` stays light.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.client import ENV_API_KEY
from clients.errors import PrefixServeError
from clients.training_data import IGNORE_INDEX, Tokenized, TrainingDataError, read_examples, tokenize_example

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from clients.client import Client
    from prefix_store.fingerprint import ModelFingerprint
    from server.model_loading import LoadedModel

ARTIFACT_NAME = "prefix.safetensors"
LOG_NAME = "training.json"
ARTIFACT_DTYPES = ("float32", "float16", "bfloat16")
_TENANT = "default"  # recorded in the artifact; the server ignores an uploader's tenant and uses the caller's


class TrainError(ValueError):
    """Bad options, data that does not fit the model, or a model that cannot be loaded."""


@dataclass
class TrainOptions:
    data: str
    output: str
    model: str | None = None  # as `serve --model`; None = the embedded default
    eval: str | None = None
    num_virtual_tokens: int = 10
    prefix_projection: bool = False
    encoder_hidden_size: int = 512  # the reparameterisation MLP's width (with prefix_projection only)
    init_text: str | None = None  # initialise the prefix from this text's keys/values (without projection)
    steps: int | None = None  # wins over epochs
    epochs: int = 1
    lr: float = 5e-3
    batch_size: int = 8
    warmup_steps: int | None = None  # default: 5% of the steps
    eval_every: int | None = None  # default: once per epoch
    patience: int = 2  # evaluations without improvement before stopping
    max_length: int = 1024  # tokens per example, prompt included
    seed: int = 0
    task_id: str | None = None  # recorded in the artifact; default: the output directory's name
    artifact_dtype: str = "float32"
    device: str = "cpu"
    progress: bool = True  # a bar on a terminal, a line every ~5% of the steps otherwise (logs, CI)


@dataclass
class TrainResult:
    peft_model: PeftModel
    loaded: LoadedModel  # the base model, as the server would load it (now wrapped by peft_model)
    output: Path
    artifact: Path
    task_id: str
    steps: int
    train_losses: list[float] = field(default_factory=list)  # one per step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_step: int | None = None
    wall_s: float = 0.0


# -- command line -------------------------------------------------------------


def add_train_command(sub: argparse._SubParsersAction) -> None:
    """Register ``train``; it runs through clients.cli.run_client_command like the other client commands."""
    p = sub.add_parser(
        "train",
        help="prefix-tune the base model on a JSONL file (and upload the result)",
        description="Prefix-tune the server's base model on a JSONL file with PEFT; save, and optionally upload.",
    )
    p.add_argument("data", metavar="DATA", help='JSONL: {"prompt", "completion"} or {"messages": [...]} per line')
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="where the checkpoint and artifact go")
    p.add_argument("--model", default=None, help="as for `serve` (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--eval", default=None, metavar="FILE", help="JSONL evaluated once per epoch; early stopping")
    p.add_argument("--num-virtual-tokens", "-p", type=int, default=10, metavar="P", help="prefix length (default 10)")
    p.add_argument("--prefix-projection", action="store_true", help="train through an MLP (the paper's reparam.)")
    p.add_argument("--encoder-hidden-size", type=int, default=512, help="the MLP's width (default 512)")
    p.add_argument("--init-text", default=None, help="initialise from this text's keys/values (default: the data)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (wins over --epochs)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate (default 5e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 5%% of the steps)")
    p.add_argument("--eval-every", type=int, default=None, metavar="STEPS", help="default: once per epoch")
    p.add_argument(
        "--patience", type=int, default=2, help="evaluations without improvement before stopping (default 2)"
    )
    p.add_argument("--max-length", type=int, default=1024, help="longest example in tokens (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--task-id", default=None, help="task id of the artifact and the upload (default: DIR's name)")
    p.add_argument(
        "--artifact-dtype", choices=ARTIFACT_DTYPES, default="float32", help="native artifact dtype (default float32)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda; training is always fp32")
    # dest "url": run_client_command builds the Client for this URL, as for `upload` (key: --api-key or env).
    p.add_argument("--upload", dest="url", default=None, metavar="URL", help="then upload to this server")
    p.add_argument("--api-key", default=None, help=f"API key for the upload [env {ENV_API_KEY}]")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(client_command=_train_command)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    names = {f for f in TrainOptions.__dataclass_fields__ if f != "progress"}
    options = TrainOptions(**{name: getattr(args, name) for name in names})
    options.progress = not args.no_progress and not args.json
    return options


def _train_command(client: Client, args: argparse.Namespace) -> None:
    """Train; with --upload, ``client`` is already pointed at that server."""
    options = options_from_args(args)
    if args.url:
        _check_server_takes(client, options.num_virtual_tokens, args.url)
    result = train(options)
    summary: dict[str, Any] = {
        "output": str(result.output),
        "artifact": str(result.artifact),
        "task_id": result.task_id,
        "steps": result.steps,
        "final_train_loss": result.train_losses[-1] if result.train_losses else None,
        "best_eval_loss": min((loss for _, loss in result.eval_losses), default=None),
        "wall_s": round(result.wall_s, 1),
    }
    if args.url:
        info = client.upload_prefix(result.task_id, result.artifact, progress=options.progress and sys.stderr.isatty())
        summary["uploaded"] = info.model_dump()
    if args.json:
        print(json.dumps(summary))
        return
    print(f"saved {result.output} (PEFT checkpoint) and {result.artifact} after {result.steps} steps")
    if args.url:
        print(f"uploaded {result.task_id} version {summary['uploaded']['version']} to {args.url}")


def _check_server_takes(client: Client, num_virtual_tokens: int, url: str) -> None:
    """Refuse, before training, a prefix longer than the server at ``url`` takes. A server that cannot say (not up
    yet, or older) is not a reason to stop: the upload reports what it finds."""
    try:
        cards = client.models()
    except (PrefixServeError, ValueError, KeyError, TypeError):
        return
    limits = [card["max_prefix_tokens"] for card in cards if isinstance(card.get("max_prefix_tokens"), int)]
    if limits and num_virtual_tokens > min(limits):
        raise TrainError(
            f"--num-virtual-tokens {num_virtual_tokens}: the server at {url} takes prefixes of at most "
            f"{min(limits)} virtual tokens (its --max-virtual-tokens, and its model's context); nothing was trained"
        )


# -- training -----------------------------------------------------------------


def _check_output_writable(output: Path) -> None:
    """--output must be able to take files, found before training rather than after (the run was lost). Nothing
    is made here: a run refused later for bad data leaves no directory behind."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"--output {output} cannot be written: {existing} is not a writable directory")


def _check_options(options: TrainOptions) -> str:
    """Validate options before anything heavy happens; returns the task id."""
    from prefix_store.errors import InvalidTaskId
    from prefix_store.ids import validate_task_id

    positive = {
        "--num-virtual-tokens": options.num_virtual_tokens,
        "--batch-size": options.batch_size,
        "--epochs": options.epochs,
        "--max-length": options.max_length,
        "--patience": options.patience,
        "--encoder-hidden-size": options.encoder_hidden_size,
    }
    for flag, value in [*positive.items(), ("--steps", options.steps), ("--eval-every", options.eval_every)]:
        if value is not None and value < 1:
            raise TrainError(f"{flag} must be at least 1, got {value}")
    if not options.lr > 0:
        raise TrainError(f"--lr must be positive, got {options.lr}")
    if options.artifact_dtype not in ARTIFACT_DTYPES:
        raise TrainError(f"--artifact-dtype must be one of {', '.join(ARTIFACT_DTYPES)}")
    if options.init_text is not None and options.prefix_projection:
        raise TrainError("--init-text sets the prefix's keys/values directly; it cannot go with --prefix-projection")
    if options.init_text is not None and not options.init_text.strip():
        raise TrainError("--init-text is empty: give a text whose keys/values start the prefix, or leave it out")
    task_id = options.task_id or Path(options.output).resolve().name
    try:
        task_id = validate_task_id(task_id)
    except InvalidTaskId as exc:
        hint = "" if options.task_id else " (it defaults to the --output directory's name: pass --task-id)"
        raise TrainError(f"{exc}{hint}") from None
    _check_output_writable(Path(options.output).expanduser())
    return task_id


def _tokenize_all(path: str, tokenizer: Any, eos: int, max_length: int, prefix: int, context: int) -> list[Tokenized]:
    """Every example of `path`, tokenized; an error naming the line of one that is too long to train on (over
    --max-length, or with the `prefix` virtual tokens before it, over the model's `context`)."""
    out = []
    for example in read_examples(path):
        tokens = tokenize_example(example, tokenizer, eos, source=path)
        if len(tokens.input_ids) > max_length:
            raise TrainingDataError(
                f"{path} line {example.line}: {len(tokens.input_ids)} tokens, over --max-length {max_length}"
            )
        if prefix + len(tokens.input_ids) > context:
            # Positions past the context do not exist (GPT-2's position table: an IndexError mid-training) or
            # were never trained (RoPE): the server refuses such requests, so no example may need them.
            raise TrainingDataError(
                f"{path} line {example.line}: {len(tokens.input_ids)} tokens after the {prefix}-token prefix"
                f" exceed the model's context of {context}"
            )
        if all(label == IGNORE_INDEX for label in tokens.labels[1:]):
            raise TrainingDataError(f"{path} line {example.line}: no completion tokens to learn")
        out.append(tokens)
    return out


def _collate(rows: list[Tokenized], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch: real tokens take positions P, P+1, ... exactly as when served alone."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _check_peft_layout(config: Any, fingerprint: ModelFingerprint) -> None:
    """TrainError unless PEFT lays the prefix out as the model's attention caches hold it: PEFT reads the layout
    from the model's config (num_attention_heads, hidden_size), which for some architectures is not the cache's
    (Falcon's multi-query attention keeps one KV head). Its own forward then fails on those models too."""
    peft_layout = (config.num_layers, config.num_attention_heads, config.token_dim // config.num_attention_heads)
    cache_layout = (fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim)
    if peft_layout != cache_layout:
        raise TrainError(
            f"PEFT's prefix tuning lays this {fingerprint.architecture} model's prefix out as (layers, heads,"
            f" head_dim) {peft_layout}, but its attention caches hold {cache_layout}: PEFT cannot train a prefix"
            " for it (the server serves such prefixes when they come in the native format)"
        )


def _init_from_text(peft_model: PeftModel, loaded: LoadedModel, ids: list[int]) -> None:
    """Set the prefix to the keys/values the frozen model computes for ``ids`` (Li & Liang's real-word init).

    At step 0 the prefix then acts exactly like that text placed before the prompt (its keys carry the
    rotary phases of positions 0..P-1, which is where the prefix sits), a far better start than noise.
    """
    import torch

    config: Any = peft_model.peft_config["default"]  # a PrefixTuningConfig
    P = config.num_virtual_tokens
    tokens = (ids * math.ceil(P / max(len(ids), 1)))[:P]
    with torch.no_grad():
        out = loaded.model(input_ids=torch.tensor([tokens], device=loaded.device), use_cache=True)
        # per layer K, V [1, H_kv, P, d] -> [P, 2L, H_kv, d] (slot 2l = K_l, 2l+1 = V_l), PEFT's layout
        kv = torch.stack([t[0] for layer in out.cache.layers for t in (layer.keys, layer.values)])  # [2L, H, P, d]
        encoder: Any = peft_model.prompt_encoder["default"]  # PEFT's PrefixEncoder
        weight = encoder.embedding.weight  # [P, 2L * H * d]
        weight.copy_(kv.permute(2, 0, 1, 3).reshape(P, -1))


def _eval_loss(peft_model: PeftModel, rows: list[Tokenized], batch_size: int, pad_id: int) -> float:
    """Mean loss per completion token over ``rows``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = _collate(rows[start : start + batch_size], pad_id, peft_model.device)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
            total += float(peft_model(**batch).loss) * n
            count += n
    return total / max(count, 1)


def _batches(n: int, batch_size: int, seed: int) -> Any:
    """Shuffled index batches, epoch after epoch, forever; (epoch, batch) pairs."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, batch_size):
            yield epoch, order[start : start + batch_size]
        epoch += 1


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # On a terminal a live bar; elsewhere (a log file) tqdm prints a plain line every ~5% of the steps.
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc="train",
        unit="step",
        disable=not enabled,
        dynamic_ncols=tty,
        ncols=None if tty else 100,
        mininterval=0.1 if tty else 0,
        miniters=None if tty else max(1, total // 20),
        ascii=not tty,
        file=sys.stderr,
    )


def train(options: TrainOptions, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a prefix as ``options`` say and write the output directory; see the module docstring."""
    task_id = _check_options(options)
    # Every line of both files is checked before the model is loaded: a typo costs seconds, not a run.
    read_examples(options.data)
    if options.eval:
        read_examples(options.eval)
    started = time.monotonic()

    import torch
    from peft import PrefixTuningConfig, get_peft_model

    from prefix_store.artifact import encode_artifact
    from prefix_store.peft_import import key_values_from_peft_dir
    from server.model_loading import ModelLoadError, load_model

    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    torch.manual_seed(options.seed)
    try:
        torch.device(options.device)
    except RuntimeError as exc:
        raise TrainError(f"--device {options.device!r}: {exc}") from None
    try:
        loaded = load_model(options.model, device=options.device, dtype="float32")
    except ModelLoadError as exc:
        raise TrainError(str(exc)) from None
    if loaded.is_encoder_decoder:
        raise TrainError(
            f"{loaded.name} is an encoder-decoder model; `prefix-serve train` trains decoder-only models. Train "
            "with PEFT (PrefixTuningConfig(task_type='SEQ_2_SEQ_LM')) and upload its save_pretrained directory."
        )
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise TrainError(f"model {loaded.name} has no tokenizer")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else loaded.eos_token_ids[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # masked out: any id will do
    limits = (options.max_length, options.num_virtual_tokens, loaded.max_context)
    train_rows = _tokenize_all(options.data, tokenizer, eos, *limits)
    eval_rows = _tokenize_all(options.eval, tokenizer, eos, *limits) if options.eval else []
    fingerprint = loaded.fingerprint  # probed on the bare model, as the server does

    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=options.num_virtual_tokens,
        prefix_projection=options.prefix_projection,
        encoder_hidden_size=options.encoder_hidden_size,
    )
    peft_model = get_peft_model(loaded.model, config)
    _check_peft_layout(peft_model.peft_config["default"], fingerprint)
    if not options.prefix_projection:
        first = train_rows[0].input_ids
        init_ids = list(tokenizer(options.init_text).input_ids) if options.init_text is not None else first
        _init_from_text(peft_model, loaded, init_ids)
    # The base model stays in eval mode (no dropout): only the prefix learns, deterministically.
    peft_model.eval()
    params = [p for p in peft_model.parameters() if p.requires_grad]

    steps_per_epoch = math.ceil(len(train_rows) / options.batch_size)
    total = options.steps or options.epochs * steps_per_epoch
    warmup = options.warmup_steps if options.warmup_steps is not None else max(1, total // 20)
    eval_every = options.eval_every or steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    trainable = sum(p.numel() for p in params)
    say(
        f"training a {options.num_virtual_tokens}-token prefix ({trainable:,} trainable parameters) on "
        f"{loaded.name}: {len(train_rows)} examples, {total} steps of {options.batch_size}"
        + (f", {len(eval_rows)} eval examples" if eval_rows else "")
    )

    result = TrainResult(peft_model, loaded, Path(options.output), Path(options.output) / ARTIFACT_NAME, task_id, 0)
    best_loss, best_state, stale = math.inf, None, 0
    smoothed: float | None = None
    bar = _progress(total, options.progress)
    try:
        for step, (epoch, indices) in enumerate(_batches(len(train_rows), options.batch_size, options.seed), 1):
            batch = _collate([train_rows[i] for i in indices], pad, loaded.device)
            loss = peft_model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainError(f"the loss became {value} at step {step}: lower --lr")
            result.train_losses.append(value)
            result.steps = step
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            bar.set_postfix(loss=f"{smoothed:.4f}", epoch=epoch + 1)
            bar.update(1)
            if eval_rows and (step % eval_every == 0 or step == total):
                eval_loss = _eval_loss(peft_model, eval_rows, options.batch_size, pad)
                result.eval_losses.append((step, eval_loss))
                bar.write(f"step {step} (epoch {epoch + 1}): train loss {smoothed:.4f}, eval loss {eval_loss:.4f}")
                if eval_loss < best_loss - 1e-4:
                    best_loss, stale, result.best_step = eval_loss, 0, step
                    best_state = {k: v.detach().clone() for k, v in peft_model.prompt_encoder.state_dict().items()}
                else:
                    stale += 1
                    if stale >= options.patience:
                        bar.write(f"early stop: {stale} evaluations without improvement; best step {result.best_step}")
                        break
            if step >= total:
                break
    finally:
        bar.close()
    if best_state is not None:
        peft_model.prompt_encoder.load_state_dict(best_state)

    out = Path(options.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # With prefix_projection PEFT saves the MLP's output, so both files hold the prefix as served.
    # save_embedding_layers=False: prefix tuning never changes the embeddings, and "auto" probes the hub for them.
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    trained = key_values_from_peft_dir(out)  # [L, 2, H_kv, P, d]
    key_values = trained.to(getattr(torch, options.artifact_dtype))
    if not bool(torch.isfinite(key_values).all()):
        largest = float(trained.abs().max())
        raise TrainError(
            f"the prefix's values (up to {largest:.3g}) overflow --artifact-dtype {options.artifact_dtype}: use"
            f" float32 or bfloat16 (the PEFT checkpoint in {out} is complete)"
        )
    blob = encode_artifact(key_values, task_id=task_id, tenant=_TENANT, version=1, fingerprint=fingerprint)
    _write_atomic(result.artifact, blob)
    result.wall_s = time.monotonic() - started
    log_data = {
        "options": asdict(options),
        "model": loaded.name,
        "fingerprint": fingerprint.to_dict(),
        "trainable_parameters": trainable,
        "steps": result.steps,
        "best_step": result.best_step,
        "train_losses": [round(x, 5) for x in result.train_losses],
        "eval_losses": [[s, round(x, 5)] for s, x in result.eval_losses],
        "wall_s": round(result.wall_s, 1),
    }
    (out / LOG_NAME).write_text(json.dumps(log_data, indent=1) + "\n")
    return result


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
