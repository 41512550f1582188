"""Score table-to-text on the test split: a served prefix vs. the base model zero-shot and with 5 examples.

Every system is queried through a prefix-serve server over HTTP (greedy decoding, concurrent requests so the
server batches them); BLEU is sacrebleu's corpus BLEU against the 3 references per record, and slot
accuracy uses ``restaurants.slot_errors`` (a slot is right when its value is realised and no other value of that
slot is). Needs ``pip install sacrebleu``.

    python examples/table_to_text/evaluate.py --prefix examples/prefixes/table-to-text.safetensors
    python examples/table_to_text/evaluate.py --url http://127.0.0.1:8000 --task-id table-to-text  # running server
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

import sacrebleu

from clients.client import Client

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from restaurants import PROMPT_SUFFIX, Record, parse_mr, slot_errors  # a script beside this one
from serve_locally import local_server  # examples/serve_locally.py

HERE = Path(__file__).parent
INSTRUCTION = (
    "Write one sentence that describes the restaurant with these attributes. Mention every attribute and nothing else."
)
SYSTEMS = ("prefix", "zero-shot", "5-shot")


def _chat_turn(mr: str) -> dict[str, str]:
    return {"role": "user", "content": f"{INSTRUCTION}\n\n{mr}"}


def requests_for(system: str, record: Record, task_id: str, shots: list[dict[str, Any]]) -> dict[str, Any]:
    if system == "prefix":
        return {"prompt": record.mr + PROMPT_SUFFIX, "task_id": task_id}
    messages: list[dict[str, str]] = []
    if system == "5-shot":
        for shot in shots:
            messages += [_chat_turn(shot["mr"]), {"role": "assistant", "content": shot["references"][0]}]
    return {"messages": [*messages, _chat_turn(record.mr)]}


def run_system(
    client: Client, system: str, records: list[Record], task_id: str, shots: list[dict[str, Any]], args: Any
) -> tuple[list[str], float]:
    def one(record: Record) -> str:
        body = requests_for(system, record, task_id, shots)
        result = client.generate(**body, max_new_tokens=args.max_new_tokens, temperature=0, stop=["\n"])
        return result.text.strip()

    started = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        outputs = list(pool.map(one, records))
    return outputs, time.monotonic() - started


def score(records: list[Record], refs: list[list[str]], outputs: list[str]) -> dict[str, float]:
    bleu = sacrebleu.corpus_bleu(outputs, [list(r) for r in zip(*refs, strict=True)])
    slots = [slot_errors(rec, out) for rec, out in zip(records, outputs, strict=True)]
    n_slots = sum(len(r.slots) for r in records)
    return {
        "bleu": round(bleu.score, 1),
        "slot_accuracy": round(100 * (1 - sum(len(e) for e in slots) / n_slots), 1),
        "all_slots_exact": round(100 * sum(not e for e in slots) / len(records), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", help="prefix to upload (native .safetensors or PEFT dir)")
    parser.add_argument("--task-id", default="table-to-text")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("PREFIX_SERVE_API_KEY"))
    parser.add_argument("--model", default=None, help="for the server this script starts (default: embedded)")
    parser.add_argument("--data", default=str(HERE / "data"))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "runs" / "eval"))
    args = parser.parse_args()

    rows = [json.loads(line) for line in Path(args.data, "test.records.jsonl").read_text().splitlines()][: args.limit]
    shots = [json.loads(line) for line in Path(args.data, "train.records.jsonl").read_text().splitlines()][:5]
    records = [parse_mr(r["mr"]) for r in rows]
    refs = [r["references"] for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    server = nullcontext(args.url) if args.url else local_server(args.model, out / "server.log")
    results: dict[str, Any] = {}
    with server as url, Client(url, args.api_key) as client:
        if args.prefix:
            info = client.upload_prefix(args.task_id, args.prefix)
            print(f"uploaded {args.prefix} as {info.task_id} v{info.version} ({info.bytes} bytes)", file=sys.stderr)
        for system in args.systems.split(","):
            outputs, wall = run_system(client, system, records, args.task_id, shots, args)
            results[system] = {**score(records, refs, outputs), "wall_s": round(wall, 1)}
            print(f"{system}: {results[system]}", file=sys.stderr, flush=True)
            with (out / f"{system}.outputs.jsonl").open("w") as f:
                for row, text in zip(rows, outputs, strict=True):
                    f.write(json.dumps({"mr": row["mr"], "output": text}, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"| system | BLEU | slot accuracy % | all slots exact % | wall s ({len(records)} records) |")
    print("|---|---:|---:|---:|---:|")
    for system, r in results.items():
        print(f"| {system} | {r['bleu']} | {r['slot_accuracy']} | {r['all_slots_exact']} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
