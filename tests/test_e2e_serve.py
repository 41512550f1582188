"""End to end: `prefix-serve serve` as a process on the real default model, driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.redis_server import free_port
from tests.server_process import console_script, running_server
from tests.tiny_models import oracle_greedy, peft_prefix_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real server process on the default model; yields (base URL, its log file)."""
    store = tmp_path_factory.mktemp("e2e-store")
    log_path = tmp_path_factory.mktemp("e2e-log") / "server.log"
    args = ["--store", f"disk://{store}"]
    with running_server(args, log_path, env={"PREFIX_SERVE_MAX_BATCH_SIZE": "8"}) as proc:
        yield proc.url, log_path


def test_serve_upload_generate_stream_list_delete(server, default_model, tmp_path: Path) -> None:
    url, log_path = server
    startup = log_path.read_text()
    assert "SmolLM2-135M-Instruct" in startup and "cpu" in startup and "float32" in startup
    assert "disk://" in startup and url.rsplit(":", 1)[1] in startup

    # A checkpoint written by PEFT's own save_pretrained for the default model.
    peft = peft_prefix_model(default_model.model, num_virtual_tokens=10, seed=5)
    peft.save_pretrained(tmp_path)
    files = {
        name: (name, (tmp_path / name).read_bytes()) for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.put("/v1/prefixes/poet", files=files)
        assert r.status_code == 201, r.text
        assert r.json()["num_virtual_tokens"] == 10

        prompt = "The weather today is"
        r = client.post("/v1/generate", json={"task_id": "poet", "prompt": prompt, "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        want, _ = oracle_greedy(peft, default_model.tokenizer(prompt).input_ids, 8)
        assert body["token_ids"] == want[: len(body["token_ids"])]
        assert len(body["token_ids"]) == 8 or body["finish_reason"] == "eos"

        events = []
        request = {"task_id": "poet", "prompt": prompt, "max_new_tokens": 8, "stream": True}
        with client.stream("POST", "/v1/generate", json=request) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert "".join(e["text"] for e in events) == body["text"]
        assert events[-1]["finish_reason"] == body["finish_reason"]

        listed = client.get("/v1/prefixes").json()["data"]
        assert [p["task_id"] for p in listed] == ["poet"]
        assert client.delete("/v1/prefixes/poet").status_code == 204
        r = client.post("/v1/generate", json={"task_id": "poet", "prompt": prompt})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_scoring_a_text_under_a_prefix_equals_peft(server, default_model, tmp_path: Path) -> None:
    """What an evaluation harness asks (lm-evaluation-harness's log-likelihood request: token ids, echo, logprobs,
    max_tokens 0) of a real server process on the default model with a prefix: each prompt token's
    log-probability is log-softmax of PEFT's forward at the position before it."""
    import torch

    url, _ = server
    peft = peft_prefix_model(default_model.model, num_virtual_tokens=6, seed=11)
    peft.save_pretrained(tmp_path)
    files = {
        name: (name, (tmp_path / name).read_bytes()) for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    ids = default_model.tokenizer("The capital of France is Paris, and the capital of Italy is Rome.").input_ids
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.put("/v1/prefixes/scorer", files=files).status_code == 201
        body = {"model": "scorer", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert client.delete("/v1/prefixes/scorer").status_code == 204
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    got = choice["logprobs"]["token_logprobs"]
    assert choice["text"] == default_model.tokenizer.decode(ids) and got[0] is None and len(got) == len(ids)
    with torch.no_grad():
        logits = peft(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0].float()
    want = torch.log_softmax(logits, dim=-1)
    assert got[1:] == pytest.approx([want[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-3)
    without = torch.log_softmax(default_model.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    assert got[1:] != pytest.approx([without[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-3)


def test_json_schema_output_of_the_real_model_equals_the_masked_oracle(server, default_model) -> None:
    """Structured output on the real model: a chat request held to a JSON schema gets JSON that fits it, and
    its greedy tokens are those of the model's own forward loop with xgrammar's mask of the same schema."""
    import torch
    import xgrammar as xgr

    url, _ = server
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "Name the capital of France and its country, as JSON."}]
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": default_model.name,
                "messages": messages,
                "max_tokens": 40,
                "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
            },
        )
        assert r.status_code == 200, r.text
        native = client.post(
            "/v1/generate",
            json={"messages": messages, "max_new_tokens": 40, "grammar": {"type": "json", "value": schema}},
        ).json()
    choice = r.json()["choices"][0]
    place = json.loads(choice["message"]["content"])
    assert choice["finish_reason"] == "stop" and set(place) == {"city", "country"}
    assert all(isinstance(v, str) and len(v) <= 24 for v in place.values())
    assert native["text"] == choice["message"]["content"]

    tokenizer, model = default_model.tokenizer, default_model.model
    vocab = model.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=default_model.eos_token_ids)
    matcher = xgr.GrammarMatcher(
        xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    )
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    want: list[int] = []
    with torch.no_grad():
        while len(want) < 40 and not matcher.is_terminated():
            logits = model(input_ids=torch.tensor([ids + want])).logits[:, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            want.append(int(logits.argmax()))
            assert matcher.accept_token(want[-1])
    assert native["token_ids"] == want


def speculative_counts(client: httpx.Client) -> tuple[float, float]:
    """The server's draft tokens proposed and accepted so far, from /metrics."""
    values = {}
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("prefix_serve_speculative_") and name.endswith("_total"):
            values[name] = float(value)
    return (
        values["prefix_serve_speculative_draft_tokens_total"],
        values["prefix_serve_speculative_accepted_tokens_total"],
    )


def test_speculative_decoding_on_the_real_model_keeps_the_greedy_tokens(server, default_model) -> None:
    """With the server's defaults a lone greedy request speculates (prompt lookup): asked to add type hints to a
    function it rewrites, the real model's drafts are accepted, and its tokens are still those of the model's
    own uncached forward loop."""
    url, _ = server
    source = "def total(prices, tax):\n    subtotal = sum(prices)\n    return subtotal + subtotal * tax\n"
    messages = [{"role": "user", "content": f"Add type hints to this Python function:\n\n{source}"}]
    with httpx.Client(base_url=url, timeout=120) as client:
        drafted, kept = speculative_counts(client)
        r = client.post("/v1/generate", json={"messages": messages, "max_new_tokens": 40})
        assert r.status_code == 200, r.text
        after = speculative_counts(client)
    assert after[1] - kept > 0 and after[0] - drafted >= after[1] - kept
    tokenizer = default_model.tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    got = r.json()["token_ids"]
    want, _ = oracle_greedy(default_model.model, ids, 40)
    assert got == want[: len(got)] and (len(got) == 40 or r.json()["finish_reason"] == "eos")


WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a time zone",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
        },
    },
]
# One earlier exchange in the history shows the small model a call and its answer.
WEATHER_SHOT = [
    {"role": "user", "content": "What's the weather in Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, cloudy"},
    {"role": "assistant", "content": "It is 21 degrees and cloudy in Rome."},
]


def _streamed_chat(client: httpx.Client, body: dict) -> tuple[str, list[dict], str]:
    """A streamed chat reply's content, tool calls (their deltas merged by index, as clients do; ``deltas``:
    how many each came in) and finish reason, from its server-sent events."""
    content, calls, finish = "", {}, ""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            (choice,) = json.loads(line[len("data: ") :])["choices"]
            content += choice["delta"].get("content") or ""
            for entry in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(entry["index"], {"index": entry["index"], "id": entry.get("id"), "deltas": 0})
                function = call.setdefault("function", {"name": "", "arguments": ""})
                function["name"] += entry.get("function", {}).get("name") or ""
                function["arguments"] += entry.get("function", {}).get("arguments") or ""
                call["deltas"] += 1
            finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_tool_choice_auto_on_the_real_model_calls_or_answers_as_the_model_would(server, default_model) -> None:
    """With tools and no tool_choice (OpenAI's 'auto'), the real model, whose template ignores tools, is told
    about them and the <tool_call> format: asked for the weather it calls get_weather, asked for a joke it
    answers in text; streamed or not alike, and what it writes is what its own uncached forward loop writes on
    the same prompt (read back the same way)."""
    from server.api.tool_formats import TOOL_CALL_FORMATS, read_reply, with_tools_in_text

    url, _ = server
    hermes = TOOL_CALL_FORMATS["hermes"]
    tokenizer = default_model.tokenizer
    for question, calls in [
        ("What's the weather in Paris?", [("get_weather", {"city": "Paris"})]),
        ("Tell me a joke.", []),
    ]:
        messages = [*WEATHER_SHOT, {"role": "user", "content": question}]
        body = {"model": default_model.name, "messages": messages, "tools": WEATHER_TOOLS, "max_tokens": 48}
        with httpx.Client(base_url=url, timeout=120) as client:
            r = client.post("/v1/chat/completions", json={**body, "temperature": 0})
            assert r.status_code == 200, r.text
            streamed = _streamed_chat(client, {**body, "temperature": 0})
        choice = r.json()["choices"][0]
        message = choice["message"]
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]
        assert got == calls, message
        if calls:
            assert choice["finish_reason"] == "tool_calls" and message["content"] is None
            assert all(c["id"].startswith("call_") and c["type"] == "function" for c in message["tool_calls"])
        else:
            assert choice["finish_reason"] == "stop" and message["content"] and "tool_calls" not in message
        content, streamed_calls, finish = streamed
        assert content == (message["content"] or "") and finish == choice["finish_reason"]
        assert [c["index"] for c in streamed_calls] == list(range(len(calls)))
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed_calls] == calls
        assert all(c["id"].startswith("call_") and c["deltas"] > 2 for c in streamed_calls)  # piece by piece

        shown = with_tools_in_text(hermes, [{**m, "content": m["content"] or ""} for m in messages], WEATHER_TOOLS)
        prompt = tokenizer.apply_chat_template(shown, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
        want, _ = oracle_greedy(default_model.model, ids, 48)
        ended = [i for i, token in enumerate(want) if token in default_model.eos_token_ids]
        wanted_content, wanted_calls, _ = read_reply(hermes, tokenizer.decode(want[: ended[0] if ended else None]))
        assert wanted_content == message["content"]
        assert [(c.name, json.loads(c.arguments)) for c in wanted_calls] == calls


def test_the_responses_api_on_the_real_model_calls_as_the_chat_route_does(server, default_model) -> None:
    """POST /v1/responses with the one-shot history as input items (a function_call and its output): the model calls
    get_weather for Paris in a function_call item, as on the chat route; streamed, the item opens with its name
    and the arguments come in pieces that add up to the same call."""
    url, _ = server
    items: list[dict] = [
        {"role": "user", "content": "What's the weather in Rome?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "21 degrees, cloudy"},
        {"role": "assistant", "content": "It is 21 degrees and cloudy in Rome."},
        {"role": "user", "content": "What's the weather in Paris?"},
    ]
    tools = [{"type": "function", **tool["function"]} for tool in WEATHER_TOOLS]
    body = {"model": default_model.name, "input": items, "tools": tools, "max_output_tokens": 48, "temperature": 0}
    chat = {
        "model": default_model.name,
        "messages": [*WEATHER_SHOT, {"role": "user", "content": "What's the weather in Paris?"}],
        "tools": WEATHER_TOOLS,
        "max_tokens": 48,
        "temperature": 0,
    }
    with httpx.Client(base_url=url, timeout=120) as client:
        got = client.post("/v1/responses", json=body)
        want = client.post("/v1/chat/completions", json=chat)
        with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert got.status_code == want.status_code == 200, got.text
    (call,) = [item for item in got.json()["output"] if item["type"] == "function_call"]
    (wanted,) = want.json()["choices"][0]["message"]["tool_calls"]
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris"})
    assert call["arguments"] == wanted["function"]["arguments"]
    pieces = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(pieces) > 2 and "".join(pieces) == call["arguments"]
    assert events[-1]["type"] == "response.completed"


def test_the_shipped_tool_calling_prefix_calls_without_an_example(server, default_model) -> None:
    """examples/prefixes/tool-calls.safetensors, trained on generated chats (examples/tool_calls): with it the
    real model calls a tool for a question one fits, with its arguments copied from a city it never saw in
    training, and answers small talk in text; the base model, told the same tools, calls nothing."""
    url, _ = server
    artifact = Path(__file__).resolve().parent.parent / "examples" / "prefixes" / "tool-calls.safetensors"
    tools = [  # as examples/tool_calls/make_data.py describes it
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "The current time in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    headers = {"content-type": "application/octet-stream"}
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.put("/v1/prefixes/tool-calls", content=artifact.read_bytes(), headers=headers).status_code == 201
        replies = {}
        for model in ("tool-calls", default_model.name):
            for question in ("What time is it in Quito?", "Thanks!"):
                body = {"model": model, "messages": [{"role": "user", "content": question}], "tools": tools}
                r = client.post("/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 40})
                assert r.status_code == 200, r.text
                replies[model, question] = r.json()["choices"][0]
        assert client.delete("/v1/prefixes/tool-calls").status_code == 204
    call = replies["tool-calls", "What time is it in Quito?"]
    assert call["finish_reason"] == "tool_calls", call
    (made,) = call["message"]["tool_calls"]
    assert made["function"]["name"] == "get_time" and json.loads(made["function"]["arguments"]) == {"city": "Quito"}
    thanks = replies["tool-calls", "Thanks!"]
    assert thanks["finish_reason"] == "stop" and thanks["message"]["content"] and "tool_calls" not in thanks["message"]
    assert "tool_calls" not in replies[default_model.name, "What time is it in Quito?"]["message"]


@pytest.mark.parametrize(("signal_number", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_model_loads_stops_the_server_quietly(
    signal_number: int, status: int, tmp_path: Path
) -> None:
    """SIGTERM mid-load killed the process (status -15, no word); Ctrl-C printed a KeyboardInterrupt traceback."""
    proc = subprocess.Popen(
        [console_script(), "serve", "--port", str(free_port()), "--store", f"disk://{tmp_path}"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the embedded model takes seconds to load: the signal lands during it
            if "loading the model" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal_number)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == status, rest
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in rest and f"stopped by {signal.Signals(signal_number).name} while loading" in rest, rest
