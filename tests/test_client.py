"""Client, AsyncClient and the CLI commands against a real server on loopback; retries against a real HTTP peer."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clients import errors
from clients.client import AsyncClient, Client
from server.api.app import create_app
from server.cli import main
from server.config import ServeConfig
from server.model_loading import LoadedModel, load_model
from tests.live_server import serve_in_thread, write_key_file, write_native_prefix, write_peft_checkpoint
from tests.tiny_models import oracle_greedy

KEY = "client-test-key"
OTHER_KEY = "other-tenant-key"
MAX_UPLOAD = 256 * 1024


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def server_url(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("client-server")
    keys = write_key_file(root / "keys.json", {KEY: "alice", OTHER_KEY: "bob"})
    config = ServeConfig(
        store=f"disk://{root / 'store'}",
        api_keys=str(keys),
        max_new_tokens=48,
        max_prompt_tokens=200,
        max_upload_bytes=MAX_UPLOAD,
    )
    with serve_in_thread(create_app(config, model=loaded)) as url:
        yield url


@pytest.fixture(scope="module")
def checkpoint(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory):
    """A PEFT checkpoint directory (PEFT's own save_pretrained), the same prefix as a native file, the oracle."""
    root = tmp_path_factory.mktemp("client-ckpt")
    peft = write_peft_checkpoint(loaded, root / "peft", num_virtual_tokens=6, seed=11)
    native = write_native_prefix(peft, root / "prefix.safetensors")
    return root / "peft", native, peft


@pytest.fixture
def client(server_url: str) -> Iterator[Client]:
    with Client(server_url, KEY) as c:
        yield c


def test_upload_peft_dir_then_generate_matches_oracle(client: Client, loaded: LoadedModel, checkpoint) -> None:
    peft_dir, _, peft = checkpoint
    info = client.upload_prefix("peft-task", peft_dir)
    assert info.task_id == "peft-task" and info.num_virtual_tokens == 6
    prompt = "The quick brown fox jumps over"
    result = client.generate(prompt, task_id="peft-task", max_new_tokens=8)
    want, _ = oracle_greedy(peft, loaded.tokenizer(prompt).input_ids, 8)
    got = result.token_ids
    assert got == want[: len(got)] and (len(got) == 8 or got[-1] in loaded.eos_token_ids)
    assert result.prefix_version == info.version and result.task_id == "peft-task"
    assert client.get_prefix("peft-task") == info
    assert "peft-task" in {p.task_id for p in client.list_prefixes()}


def test_native_file_upload_is_the_same_prefix(client: Client, checkpoint) -> None:
    peft_dir, native, _ = checkpoint
    client.upload_prefix("from-peft", peft_dir)
    info = client.upload_prefix("from-native", native, progress=True)  # chunked body with a bar
    assert info.num_virtual_tokens == 6
    a = client.generate("Once upon a time", task_id="from-peft", max_new_tokens=10)
    b = client.generate("Once upon a time", task_id="from-native", max_new_tokens=10)
    base = client.generate("Once upon a time", max_new_tokens=10)
    assert a.token_ids == b.token_ids and a.token_ids != base.token_ids


def test_stream_concatenates_to_generate(client: Client) -> None:
    full = client.generate("Tell me a story", max_new_tokens=20, temperature=0)
    events = list(client.stream("Tell me a story", max_new_tokens=20, temperature=0))
    assert "".join(e.text for e in events) == full.text
    assert [e.token_id for e in events] == full.token_ids
    assert events[-1].finish_reason == full.finish_reason and events[-1].usage == full.usage
    chat = [{"role": "user", "content": "Hi"}]
    assert "".join(e.text for e in client.stream(messages=chat, max_new_tokens=6)) == (
        client.generate(messages=chat, max_new_tokens=6).text
    )


def test_logprobs_through_the_client(client: Client) -> None:
    full = client.generate("Tell me a story", max_new_tokens=6, temperature=0, logprobs=1)
    assert full.logprobs is not None and [e.token_id for e in full.logprobs] == full.token_ids
    events = list(client.stream("Tell me a story", max_new_tokens=6, temperature=0, logprobs=1))
    assert [e.logprob for e in events] == full.logprobs
    assert client.generate("Tell me a story", max_new_tokens=6, temperature=0).logprobs is None

    scored = client.generate("Tell me a story", max_new_tokens=2, temperature=0, prompt_logprobs=2)
    assert scored.prompt_token_ids is not None and scored.prompt_logprobs is not None
    assert len(scored.prompt_logprobs) == len(scored.prompt_token_ids) == scored.usage.prompt_tokens
    assert scored.prompt_logprobs[0] is None
    assert [e.token_id for e in scored.prompt_logprobs[1:] if e] == scored.prompt_token_ids[1:]
    first = next(iter(client.stream("Tell me a story", max_new_tokens=2, temperature=0, prompt_logprobs=2)))
    assert first.prompt_logprobs == scored.prompt_logprobs
    with pytest.raises(TypeError, match="temprature"):  # a misspelt option fails here, not at the server
        client.generate("Tell me a story", temprature=0)  # type: ignore[call-arg]
    # The penalties reach the server (their effect is tested in test_engine and test_openai_compat).
    for name, bad in (("repetition_penalty", 0.0), ("frequency_penalty", 2.5), ("presence_penalty", -3.0)):
        with pytest.raises(errors.InvalidRequest, match=name):
            client.generate("Tell me a story", max_new_tokens=2, **{name: bad})
    forced = client.generate("Tell me a story", max_new_tokens=3, temperature=0, logit_bias={1234: 100.0})
    assert forced.token_ids == [1234] * 3
    forced_stop = {"temperature": 0, "logit_bias": {1234: 100.0}, "stop_token_ids": [1234], "ignore_eos": True}
    stopped = client.generate("Tell me a story", max_new_tokens=5, **forced_stop)
    assert stopped.token_ids == [1234] and stopped.finish_reason == "stop"
    held = client.generate("Tell me a story", max_new_tokens=5, min_tokens=3, **forced_stop)
    assert 1234 not in held.token_ids[:3] and held.token_ids[3] == 1234 and held.finish_reason == "stop"
    # Structured output: the constraint reaches the server and holds (test_structured_output tests the engine).
    choice = client.generate("Tell me a story", max_new_tokens=8, grammar={"type": "choice", "value": ["yes", "no"]})
    assert choice.text in ("yes", "no") and choice.finish_reason == "eos"
    with pytest.raises(errors.InvalidRequest, match="invalid regex"):
        client.generate("Tell me a story", max_new_tokens=4, grammar={"type": "regex", "value": "("})


async def test_async_client(server_url: str, checkpoint) -> None:
    peft_dir, _, _ = checkpoint
    async with AsyncClient(server_url, KEY) as client:
        assert await client.health()
        info = await client.upload_prefix("async-task", peft_dir)
        full = await client.generate("Hello there", task_id="async-task", max_new_tokens=12, seed=5, temperature=0.8)
        pieces = [
            e
            async for e in client.stream(
                "Hello there", task_id="async-task", max_new_tokens=12, seed=5, temperature=0.8
            )
        ]
        assert "".join(e.text for e in pieces) == full.text and pieces[-1].finish_reason == full.finish_reason
        assert (await client.get_prefix("async-task")).version == info.version
        assert "async-task" in {p.task_id for p in await client.list_prefixes()}
        await client.delete_prefix("async-task")
        with pytest.raises(errors.NotFound):
            await client.get_prefix("async-task")


def test_errors_are_typed(server_url: str, client: Client, checkpoint, tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound) as info:
        client.generate("hi", task_id="no-such-task", max_new_tokens=2)
    assert info.value.status == 404 and "no-such-task" in info.value.message
    with pytest.raises(errors.NotFound):
        next(iter(client.stream("hi", task_id="no-such-task", max_new_tokens=2)))
    with pytest.raises(errors.InvalidRequest) as bad:
        client.generate("hi", max_new_tokens=10_000)
    assert bad.value.status == 422 and "max_new_tokens" in bad.value.message
    wrong_shape = tmp_path / "wrong.safetensors"
    save_file({"layers.0.key": torch.zeros(2, 3, 8), "layers.0.value": torch.zeros(2, 3, 8)}, str(wrong_shape))
    with pytest.raises(errors.InvalidPrefix):
        client.upload_prefix("wrong", wrong_shape)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(b"\0" * (MAX_UPLOAD + 1))
    with pytest.raises(errors.PayloadTooLarge):
        client.upload_prefix("huge", huge)
    (tmp_path / "not-a-ckpt").mkdir()
    (tmp_path / "not-a-ckpt" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors$"):
        client.upload_prefix("x", tmp_path / "not-a-ckpt")
    (tmp_path / "not-a-ckpt" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin is a pickle, never read"):
        client.upload_prefix("x", tmp_path / "not-a-ckpt")
    for dots in (".", ".."):  # sent as the id, not resolved to another route (404)
        with pytest.raises(errors.InvalidRequest, match="invalid task id"):
            client.upload_prefix(dots, wrong_shape)
        with pytest.raises(errors.InvalidRequest, match="invalid task id"):
            client.get_prefix(dots)
    with Client(server_url, "wrong-key") as bad_key, pytest.raises(errors.Unauthorized):
        bad_key.list_prefixes()
    with Client(server_url, OTHER_KEY) as bob:  # another tenant's tasks are invisible
        client.upload_prefix("alice-only", checkpoint[0])
        with pytest.raises(errors.NotFound):
            bob.get_prefix("alice-only")
    with Client("http://127.0.0.1:9", KEY, max_retries=0) as nowhere, pytest.raises(errors.ConnectionFailed):
        nowhere.list_prefixes()


def test_url_and_key_from_environment(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIX_SERVE_URL", server_url)
    monkeypatch.setenv("PREFIX_SERVE_API_KEY", KEY)
    with Client() as client:
        assert client.base_url == server_url and client.health()
        client.list_prefixes()  # authenticated
    monkeypatch.setenv("PREFIX_SERVE_API_KEY", "nope")
    with Client() as client, pytest.raises(errors.Unauthorized):
        client.list_prefixes()


# ----- retries against a real (scripted) HTTP peer ---------------------------------------------


class ScriptedServer:
    """A real HTTP server on loopback answering from a script of (status, headers, body), then 200s."""

    def __init__(self, script: list[tuple[int, dict[str, str], dict]]) -> None:
        self.script = list(script)
        self.arrivals: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                outer.arrivals.append(time.monotonic())
                status, headers, body = outer.script.pop(0) if outer.script else (200, {}, {"data": []})
                payload = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"content-type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


BUSY = {"error": {"type": "unavailable", "message": "loading"}}
FULL = {"error": {"type": "overloaded", "message": "queue full"}}


def test_retries_honour_retry_after() -> None:
    script = [(503, {"Retry-After": "0.3"}, BUSY), (429, {"Retry-After": "0.3"}, FULL)]
    with ScriptedServer(script) as peer, Client(peer.url, backoff_s=30.0, max_retries=3) as client:
        assert client.list_prefixes() == []
    gaps = [b - a for a, b in zip(peer.arrivals, peer.arrivals[1:], strict=False)]
    assert len(peer.arrivals) == 3 and all(0.25 <= gap < 5 for gap in gaps), gaps  # not the 30 s backoff


def test_retries_are_bounded_then_raise_typed() -> None:
    script = [(429, {}, FULL)] * 5
    with (
        ScriptedServer(script) as peer,
        Client(peer.url, backoff_s=0.01, max_retries=2) as client,
        pytest.raises(errors.Overloaded) as info,
    ):
        client.list_prefixes()
    assert len(peer.arrivals) == 3 and info.value.status == 429
    not_found = {"error": {"type": "not_found", "message": "x"}}
    with (
        ScriptedServer([(404, {}, not_found)] * 3) as peer,
        Client(peer.url, max_retries=3) as client,
        pytest.raises(errors.NotFound),
    ):
        client.get_prefix("x")
    assert len(peer.arrivals) == 1  # other errors are never retried


async def test_async_retries() -> None:
    script = [(503, {"Retry-After": "0"}, BUSY), (503, {}, BUSY)]
    with ScriptedServer(script) as peer:
        async with AsyncClient(peer.url, backoff_s=0.05, max_retries=2) as client:
            assert await client.list_prefixes() == []
    assert len(peer.arrivals) == 3


# ----- the command line --------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_round_trip(server_url: str, checkpoint, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    peft_dir, _, _ = checkpoint
    auth = ["--url", server_url, "--api-key", KEY]
    code, out, _ = run_cli(capsys, "upload", "cli-task", str(peft_dir), *auth, "--json")
    assert code == 0 and json.loads(out)["task_id"] == "cli-task"
    code, out, _ = run_cli(capsys, "upload", "cli-task", str(peft_dir), *auth)
    assert code == 0 and out.startswith("uploaded cli-task version 2")

    code, out, _ = run_cli(capsys, "list", *auth, "--json")
    listed = {p["task_id"]: p for p in json.loads(out)}
    assert code == 0 and listed["cli-task"]["version"] == 2
    code, out, _ = run_cli(capsys, "list", *auth)
    assert code == 0 and "cli-task" in out and out.splitlines()[0].startswith("TASK_ID")
    code, out, _ = run_cli(capsys, "info", "cli-task", *auth, "--json")
    assert code == 0 and json.loads(out)["num_virtual_tokens"] == 6
    code, out, _ = run_cli(capsys, "info", "cli-task", *auth)
    assert code == 0 and "version: 2" in out

    gen = ["generate", "cli-task", "Once upon a time", "--max-new-tokens", "12", *auth]
    code, out, _ = run_cli(capsys, *gen, "--json")
    result = json.loads(out)
    assert code == 0 and result["usage"]["completion_tokens"] >= 1
    code, out, _ = run_cli(capsys, *gen)
    assert code == 0 and out == result["text"] + "\n"
    code, out, _ = run_cli(capsys, *gen, "--stream")
    assert code == 0 and out == result["text"] + "\n"
    code, out, _ = run_cli(capsys, *gen, "--stream", "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert "".join(e["text"] for e in events) == result["text"] and events[-1]["finish_reason"]
    code, out, _ = run_cli(capsys, *gen, "--json", "--logprobs", "2", "--temperature", "0")
    with_logprobs = json.loads(out)
    assert code == 0 and [e["token_id"] for e in with_logprobs["logprobs"]] == with_logprobs["token_ids"]
    assert all(len(e["top_logprobs"]) == 2 for e in with_logprobs["logprobs"])
    code, out, _ = run_cli(capsys, *gen, "--json", "--prompt-logprobs", "1", "--temperature", "0")
    scored = json.loads(out)
    assert code == 0 and len(scored["prompt_logprobs"]) == len(scored["prompt_token_ids"]) > 1
    assert scored["prompt_logprobs"][0] is None and len(scored["prompt_logprobs"][1]["top_logprobs"]) == 1
    for flag in ("--repetition-penalty", "--frequency-penalty", "--presence-penalty"):
        code, _, err = run_cli(capsys, *gen, flag, "-5")
        assert code == 1 and flag[2:].replace("-", "_") in err
    code, out, _ = run_cli(capsys, *gen, "--json", "--logit-bias", "1234=100", "--logit-bias", "99=-1")
    assert code == 0 and json.loads(out)["token_ids"] == [1234] * 12
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}))
    code, out, _ = run_cli(capsys, *gen, "--json-schema", f"@{schema}", "--max-new-tokens", "30")
    assert code == 0 and json.loads(out)["a"] in (1, 2) and len(json.loads(out)) == 1, out
    code, out, _ = run_cli(capsys, *gen, "--regex", "[0-9]{4}", "--stream")
    assert code == 0 and out.strip().isdigit() and len(out.strip()) == 4, out
    code, out, _ = run_cli(capsys, *gen, "--choice", "red", "--choice", "green")
    assert code == 0 and out in ("red\n", "green\n"), out
    code, _, err = run_cli(capsys, *gen, "--grammar", "root ::= undefined_rule")
    assert code == 1 and "invalid EBNF grammar" in err
    code, _, err = run_cli(capsys, *gen, "--json-schema", "{not json")
    assert code == 1 and "--json-schema is not JSON" in err
    code, out, _ = run_cli(capsys, "generate", "-", "Once upon a time", "--max-new-tokens", "12", *auth, "--json")
    assert code == 0 and json.loads(out)["task_id"] is None and json.loads(out)["text"] != result["text"]

    code, out, _ = run_cli(capsys, "delete", "cli-task", *auth)
    assert code == 0 and out == "deleted cli-task\n"
    code, out, err = run_cli(capsys, "info", "cli-task", *auth)
    assert code == 1 and out == "" and err.startswith("error: 404 not_found") and len(err.splitlines()) == 1


def test_cli_readable_errors(server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["upload", "t", str(tmp_path / "missing"), "--url", server_url, "--api-key", KEY], "no such file"),
        (["list", "--url", server_url, "--api-key", "wrong"], "401 unauthorized"),
        (["generate", "-", "hi", "--max-new-tokens", "9999", "--url", server_url, "--api-key", KEY], "max_new_tokens"),
        (["list", "--url", "http://127.0.0.1:9"], "cannot connect"),
        (["generate", "-", "hi", "--logprobs", "2", "--url", server_url, "--api-key", KEY], "with --json only"),
        (["list", "--url", "http://"], "http(s)://HOST[:PORT], not 'http://'"),
        (["list", "--url", "localhost:8000"], "http(s)://HOST[:PORT]"),
    ]
    for argv, words in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and out == "" and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("error: ") and words in err and "Traceback" not in err, (argv, err)


def test_cli_is_quiet_when_its_reader_leaves(server_url: str) -> None:
    """`prefix-serve list | head -n 0`: no "error: [Errno 32] Broken pipe" (twice with --json), and the status
    of a tool SIGPIPE ended (141), as Unix tools leave it."""
    cli = f"{shlex.quote(sys.executable)} -c 'import sys; from server.cli import main; sys.exit(main())'"
    for command in ("list --json", "list"):
        script = f"set -o pipefail; {cli} {command} --url {server_url} --api-key {KEY} | head -n 0"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert (done.returncode, done.stderr) == (141, ""), (command, done)


def test_cli_uses_environment(server_url: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PREFIX_SERVE_URL", server_url)
    monkeypatch.setenv("PREFIX_SERVE_API_KEY", KEY)
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0 and isinstance(json.loads(out), list)


def test_client_never_imports_the_engine() -> None:
    code = (
        "import sys, clients, clients.cli, server.cli\n"
        "sys.exit(any(m in sys.modules for m in ('torch', 'server.engine')))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
