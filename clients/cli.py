"""Client commands of ``prefix-serve``: upload, generate, list, info, delete.

Each takes ``--url`` (env PREFIX_SERVE_URL, default http://127.0.0.1:8000),
``--api-key`` (env PREFIX_SERVE_API_KEY) and ``--json`` (machine-readable
output). Failures print one line, ``error: ...``, to stderr and exit with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients.client import DEFAULT_URL, ENV_API_KEY, ENV_URL, Client
from clients.errors import PrefixServeError

BASE_MODEL = "-"  # TASK_ID meaning "no prefix": never a valid task id, which must start with a letter or digit

Handler = Callable[[Client, argparse.Namespace], None]


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"server URL [env {ENV_URL}, default {DEFAULT_URL}]")
    common.add_argument("--api-key", default=None, help=f"API key [env {ENV_API_KEY}]")
    common.add_argument("--json", action="store_true", help="print the server's JSON")
    return common


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Register the client commands on the ``prefix-serve`` parser; ``run_client_command`` runs them."""
    common = _common_options()

    upload = sub.add_parser("upload", parents=[common], help="upload a prefix (PEFT checkpoint dir or .safetensors)")
    upload.add_argument("task_id", metavar="TASK_ID")
    upload.add_argument("path", metavar="PATH", help="PEFT prefix-tuning checkpoint directory, or a native file")
    upload.add_argument("--no-progress", action="store_true", help="no progress bar")
    upload.set_defaults(client_command=_upload)

    generate = sub.add_parser("generate", parents=[common], help="generate text with a task's prefix")
    generate.add_argument("task_id", metavar="TASK_ID", help=f"the task, or {BASE_MODEL!r} for the base model")
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt, or '-' to read it from stdin")
    generate.add_argument(
        "--stream", action="store_true", help="print tokens as they come (with --json: one event per line)"
    )
    generate.add_argument("--chat", action="store_true", help="send PROMPT as a user message (chat template)")
    generate.add_argument("--max-new-tokens", type=int, default=None, help="default: the server's (64)")
    generate.add_argument("--temperature", type=float, default=None, help="0 = greedy (the server's default)")
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--min-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    generate.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="K",
        help="with --json: each token's log-probability and K alternatives'",
    )
    generate.add_argument(
        "--prompt-logprobs",
        type=int,
        default=None,
        metavar="K",
        help="with --json: each prompt token's log-probability and K alternatives'",
    )
    generate.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1 = off)")
    generate.add_argument("--frequency-penalty", type=float, default=None, help="-2..2, per repeat (0 = off)")
    generate.add_argument("--presence-penalty", type=float, default=None, help="-2..2, once per token (0 = off)")
    generate.add_argument(
        "--logit-bias",
        action="append",
        default=None,
        metavar="TOKEN_ID=BIAS",
        type=_logit_bias_entry,
        help="add BIAS (-100..100) to a token's logit (repeatable)",
    )
    constraint = generate.add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema", metavar="SCHEMA", help="structured output: JSON matching this schema (JSON text, or @FILE)"
    )
    constraint.add_argument("--regex", metavar="REGEX", help="structured output: text matching this regex")
    constraint.add_argument(
        "--choice", action="append", metavar="TEXT", help="structured output: one of these texts (repeatable)"
    )
    constraint.add_argument(
        "--grammar", metavar="EBNF", help="structured output: text of this EBNF grammar, rule root first (or @FILE)"
    )
    generate.set_defaults(client_command=_generate)

    listing = sub.add_parser("list", parents=[common], help="list your prefixes")
    listing.set_defaults(client_command=_list)

    info = sub.add_parser("info", parents=[common], help="show a prefix's metadata")
    info.add_argument("task_id", metavar="TASK_ID")
    info.set_defaults(client_command=_info)

    delete = sub.add_parser("delete", parents=[common], help="delete a prefix (all versions)")
    delete.add_argument("task_id", metavar="TASK_ID")
    delete.set_defaults(client_command=_delete)

    from clients.train import add_train_command  # torch, transformers and peft load only when train runs

    add_train_command(sub)


def _logit_bias_entry(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError(text)
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, got {text!r}") from None


def _grammar(args: argparse.Namespace) -> dict[str, Any] | None:
    """The --json-schema / --regex / --choice / --grammar constraint as /v1/generate's ``grammar`` field."""
    if args.json_schema is not None:
        text = _text_or_file(args.json_schema)
        try:
            return {"type": "json", "value": json.loads(text)}
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json-schema is not JSON: {exc}") from None
    if args.regex is not None:
        return {"type": "regex", "value": args.regex}
    if args.choice is not None:
        return {"type": "choice", "value": args.choice}
    if args.grammar is not None:
        return {"type": "ebnf", "value": _text_or_file(args.grammar)}
    return None


def _text_or_file(value: str) -> str:
    """``value``, or the contents of the file it names as ``@PATH``."""
    return Path(value[1:]).read_text() if value.startswith("@") else value


def run_client_command(args: argparse.Namespace) -> int:
    """Run the command ``args`` names; 0 on success, 1 with a one-line message on stderr on failure."""
    handler: Handler = args.client_command
    try:
        with Client(args.url, args.api_key) as client:
            handler(client, args)
        sys.stdout.flush()  # into a pipe, output is written here: a reader gone is found here, not at exit
    except BrokenPipeError:
        # Whoever read our output left (`| head`): quiet, as Unix tools are. stdout goes nowhere from here, so that
        # the interpreter's last flush of it does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (PrefixServeError, OSError, ValueError) as exc:  # server errors, and local mistakes (missing file, ...)
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))


def _upload(client: Client, args: argparse.Namespace) -> None:
    progress = not args.json and not args.no_progress and sys.stderr.isatty()
    info = client.upload_prefix(args.task_id, args.path, progress=progress)
    if args.json:
        _print_json(info.model_dump())
    else:
        print(
            f"uploaded {info.task_id} version {info.version}: {info.num_virtual_tokens} virtual tokens, "
            f"{info.bytes} bytes, sha256 {info.sha256}"
        )


def _generate(client: Client, args: argparse.Namespace) -> None:
    if not args.json and (args.logprobs is not None or args.prompt_logprobs is not None):
        raise ValueError("--logprobs and --prompt-logprobs are shown with --json only")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request: dict[str, Any] = {
        "task_id": None if args.task_id == BASE_MODEL else args.task_id,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "seed": args.seed,
        "stop": args.stop,
        "logprobs": args.logprobs,
        "prompt_logprobs": args.prompt_logprobs,
        "repetition_penalty": args.repetition_penalty,
        "frequency_penalty": args.frequency_penalty,
        "presence_penalty": args.presence_penalty,
        "logit_bias": None if args.logit_bias is None else dict(args.logit_bias),
        "grammar": _grammar(args),
    }
    if args.chat:
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt"] = prompt
    if not args.stream:
        result = client.generate(**request)
        if args.json:
            _print_json(result.model_dump())
        else:
            print(result.text)
        return
    try:
        for event in client.stream(**request):
            if args.json:
                _print_json(event.model_dump(exclude_none=True))
            else:
                print(event.text, end="", flush=True)
    except PrefixServeError:
        if not args.json:
            print(flush=True)  # the error's line starts on a line of its own, after the text so far
        raise
    if not args.json:
        print()


def _list(client: Client, args: argparse.Namespace) -> None:
    prefixes = client.list_prefixes()
    if args.json:
        _print_json([p.model_dump() for p in prefixes])
        return
    if not prefixes:
        print("no prefixes")
        return
    width = max(len("TASK_ID"), *(len(p.task_id) for p in prefixes))
    print(f"{'TASK_ID':<{width}}  VERSION  TOKENS  {'BYTES':>10}  CREATED")
    for p in prefixes:
        print(f"{p.task_id:<{width}}  {p.version:>7}  {p.num_virtual_tokens:>6}  {p.bytes:>10}  {p.created_at}")


def _info(client: Client, args: argparse.Namespace) -> None:
    info = client.get_prefix(args.task_id)
    if args.json:
        _print_json(info.model_dump())
        return
    for key, value in info.model_dump().items():
        print(f"{key}: {value}")


def _delete(client: Client, args: argparse.Namespace) -> None:
    client.delete_prefix(args.task_id)
    if args.json:
        _print_json({"task_id": args.task_id, "deleted": True})
    else:
        print(f"deleted {args.task_id}")
