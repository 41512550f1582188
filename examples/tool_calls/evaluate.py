"""Score tool calling on the test split: the trained prefix vs. the base model told the tools (zero-shot) and with
one example exchange in the history (one-shot).

Every chat goes to a prefix-serve server through its OpenAI route, as a client sends it: the messages, the tools
and no tool_choice (so "auto": the server tells a model whose template ignores tools about them, holds calls to
the tools' schemas and reads them back). Greedy. The test split's cities, currencies and reminders never occur
in training. Scored per kind of chat:

- **call**: the question fits a tool: the reply must be exactly the expected call (name and arguments);
- **small talk**: no tool fits: the reply must be text, no call;
- **follow-up**: a tool's answer is the last message: the reply must be text that passes the answer on (contains
  it).

    python examples/tool_calls/evaluate.py --prefix examples/prefixes/tool-calls.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import httpx

from clients.client import Client

sys.path.insert(0, str(Path(__file__).parent.parent))
from serve_locally import local_server  # examples/serve_locally.py

HERE = Path(__file__).parent
SYSTEMS = ("prefix", "zero-shot", "one-shot")
# The one-shot system's history: one question, its call, the tool's answer and the reply (values not in the test).
SHOT: list[dict[str, Any]] = [
    {"role": "user", "content": "What's the weather in Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_9", "content": "21 degrees, cloudy"},
    {"role": "assistant", "content": "In Rome it is 21 degrees, cloudy right now."},
]
SHOT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def kind(chat: dict[str, Any]) -> str:
    if "calls" in chat["expected"]:
        return "call"
    return "follow-up" if chat["messages"][-1]["role"] == "tool" else "small talk"


def body_for(system: str, chat: dict[str, Any], model: str, task_id: str, max_tokens: int) -> dict[str, Any]:
    messages, tools = chat["messages"], chat["tools"]
    if system == "one-shot":
        messages = [*SHOT, *messages]
        if all(t["function"]["name"] != "get_weather" for t in tools):
            tools = [SHOT_TOOL, *tools]  # the example's call names a tool the model is told about
    return {
        "model": task_id if system == "prefix" else model,
        "messages": messages,
        "tools": tools,
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def right(chat: dict[str, Any], message: dict[str, Any]) -> bool:
    calls = [[c["function"]["name"], json.loads(c["function"]["arguments"])] for c in message.get("tool_calls") or []]
    expected = chat["expected"]
    if "calls" in expected:
        return calls == expected["calls"]
    if calls:
        return False
    if kind(chat) == "follow-up":
        return chat["messages"][-1]["content"] in (message.get("content") or "")
    return bool((message.get("content") or "").strip())


def run_system(url: str, key: str | None, system: str, chats: list[dict[str, Any]], args: Any) -> list[dict[str, Any]]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as http:

        def one(chat: dict[str, Any]) -> dict[str, Any]:
            body = body_for(system, chat, args.model_name, args.task_id, args.max_tokens)
            response = http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["message"]

        with ThreadPoolExecutor(args.concurrency) as pool:
            return list(pool.map(one, chats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", help="prefix to upload (native .safetensors or PEFT dir)")
    parser.add_argument("--task-id", default="tool-calls")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("PREFIX_SERVE_API_KEY"))
    parser.add_argument("--model", default=None, help="for the server this script starts (default: embedded)")
    parser.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="the base model's name on the server")
    parser.add_argument("--data", default=str(HERE / "data" / "test.jsonl"))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "runs" / "eval"))
    args = parser.parse_args()

    chats = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    kinds = sorted({kind(c) for c in chats})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = nullcontext(args.url) if args.url else local_server(args.model, out / "server.log")
    results: dict[str, Any] = {}
    with server as url:
        if args.prefix:
            with Client(url, args.api_key) as client:
                info = client.upload_prefix(args.task_id, args.prefix)
            print(f"uploaded {args.prefix} as {info.task_id} v{info.version} ({info.bytes} bytes)", file=sys.stderr)
        for system in args.systems.split(","):
            started = time.monotonic()
            replies = run_system(url, args.api_key, system, chats, args)
            scores = {k: [right(c, r) for c, r in zip(chats, replies, strict=True) if kind(c) == k] for k in kinds}
            results[system] = {k: round(100 * sum(v) / len(v), 1) for k, v in scores.items()}
            results[system]["wall_s"] = round(time.monotonic() - started, 1)
            print(f"{system}: {results[system]}", file=sys.stderr, flush=True)
            with (out / f"{system}.replies.jsonl").open("w") as f:
                for chat, reply in zip(chats, replies, strict=True):
                    f.write(json.dumps({"expected": chat["expected"], "reply": reply}, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    counts = {k: sum(kind(c) == k for c in chats) for k in kinds}
    print("| system | " + " | ".join(f"{k} right % ({counts[k]})" for k in kinds) + " | wall s |")
    print("|---|" + "---:|" * (len(kinds) + 1))
    for system, r in results.items():
        print(f"| {system} | " + " | ".join(str(r[k]) for k in kinds) + f" | {r['wall_s']} |")


if __name__ == "__main__":
    main()
