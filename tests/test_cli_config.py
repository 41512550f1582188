"""`prefix-serve serve` flags and PREFIX_SERVE_* variables."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest

from server.cli import _SERVE_FLAGS, SERVE_SWITCHES, ConfigError, _add_serve_parser, config_from_args, main
from server.config import ServeConfig
from tests.redis_server import free_port


def args(**given: object) -> argparse.Namespace:
    values = dict.fromkeys(_SERVE_FLAGS)
    values.update(given)
    return argparse.Namespace(**values)


def test_every_flag_is_a_config_field() -> None:
    assert set(_SERVE_FLAGS) <= set(ServeConfig.__dataclass_fields__)


def test_flags_beat_env_which_beats_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIX_SERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PREFIX_SERVE_STORE", "disk:///tmp/x")
    config = config_from_args(args(port=9001, store="disk:///tmp/y"))
    assert config.max_batch_size == 7 and config.port == 9001 and config.store == "disk:///tmp/y"
    assert config.max_queue == ServeConfig().max_queue


def test_bad_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PREFIX_SERVE_PORT", "eighty")
    with pytest.raises(ConfigError, match="PREFIX_SERVE_PORT"):
        config_from_args(args())
    assert main(["serve"]) == 2  # as every other startup error (it was 1)
    assert capsys.readouterr().err == "error: PREFIX_SERVE_PORT='eighty' is not a valid int\n"


def test_refuses_public_bind_without_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-keys" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-prefill-tokens", "-1"),
        ("--reserved-rows", "-1"),
        ("--reserved-queue", "-1"),
        ("--prefill-chunk-tokens", "-1"),
        ("--prefill-deadline-s", "-1"),
        ("--prefill-deadline-s", "nan"),
        ("--speculative-tokens", "-1"),
        ("--speculative-max-rows", "-2"),
        # Each of these served: a server refusing every request, or sizing nothing (operator audit).
        ("--max-batch-size", "0"),
        ("--max-batch-tokens", "-1"),
        ("--max-queue", "-5"),
        ("--max-new-tokens", "0"),
        ("--max-prompt-tokens", "0"),
        ("--max-virtual-tokens", "-3"),
        ("--max-upload-bytes", "-1"),
        ("--host-cache-bytes", "-1"),
        ("--max-concurrent-loads", "-2"),
        ("--load-piece-bytes", "-1"),
        ("--request-timeout-s", "-1"),
        ("--request-timeout-s", "inf"),
        ("--drain-timeout-s", "-1"),
        ("--responses-ttl-s", "-1"),
        ("--max-open-streams", "-1"),
        ("--kv-groups", "0"),
        ("--port", "70000"),
        ("--port", "0"),
        ("--log-level", "nonsense"),
    ],
)
def test_values_the_server_cannot_serve_with_are_refused(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} must be") and len(err.splitlines()) == 1, err


def test_startup_problems_are_one_line_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = str(free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        keys = tmp_path / "keys.json"
        keys.write_text((Path(__file__).parents[1] / "docker" / "api_keys.example.json").read_text())
        afile = tmp_path / "a-file"
        afile.write_text("")
        cases = [
            (["--port", busy], "cannot listen on 127.0.0.1:" + busy),
            (["--port", port, "--store", f"disk://{afile}/store"], "cannot create prefix store directory"),
            (["--port", port, "--api-keys", str(keys)], "still the template's placeholder"),
            (["--port", port, "--model", str(tmp_path / "nowhere")], "no such model directory or file"),
            (["--port", port, "--model", "./nowhere"], "no such model directory or file"),
            (["--port", port, "--device", "tpu"], "--device must be cpu, cuda or cuda:N, not 'tpu'"),
        ]
        for extra, words in cases:
            assert main(["serve", "--store", f"disk://{tmp_path / 'store'}", *extra]) == 2, extra
            err = capsys.readouterr().err
            # One error line (a model's path problem comes after the "loading the model" log line), no traceback.
            (error,) = [line for line in err.splitlines() if "INFO prefix_serve: loading the model" not in line]
            assert error.startswith("error: ") and words in error, (extra, err)


def test_an_unknown_tool_call_format_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--tool-call-format", "mistral"]) == 2
    err = capsys.readouterr().err
    assert "--tool-call-format" in err and "hermes, llama, none" in err


@pytest.mark.parametrize("switch", SERVE_SWITCHES)
def test_switches_from_flag_or_env(switch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert getattr(ServeConfig(), switch) is False  # every switch is off by default
    assert getattr(config_from_args(args()), switch) is False
    assert getattr(config_from_args(args(**{switch: True})), switch) is True
    for word in ("0", "false", "No", "off", ""):
        monkeypatch.setenv("PREFIX_SERVE_" + switch.upper(), word)
        assert getattr(config_from_args(args()), switch) is False
    for word in ("1", "true", "YES", "on"):  # only "1" was read; "true" was off without a word
        monkeypatch.setenv("PREFIX_SERVE_" + switch.upper(), word)
        assert getattr(config_from_args(args()), switch) is True
    monkeypatch.setenv("PREFIX_SERVE_" + switch.upper(), "maybe")
    with pytest.raises(ConfigError, match="must be 1, true, yes or on"):
        config_from_args(args())


def test_every_switch_is_a_serve_flag() -> None:
    parser = argparse.ArgumentParser()
    _add_serve_parser(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["serve", *("--" + switch.replace("_", "-") for switch in SERVE_SWITCHES)])
    assert all(getattr(parsed, switch) is True for switch in SERVE_SWITCHES)
    assert all(getattr(parser.parse_args(["serve"]), switch) is False for switch in SERVE_SWITCHES)


def test_fetches_between_steps_by_where_the_store_is(capsys: pytest.CaptureFixture[str]) -> None:
    from prefix_store.backends import store_on_this_machine
    from server.api.app import _fetches_between_steps

    local = ["disk:///srv/prefixes", "/srv/prefixes", "redis://127.0.0.1:6379/0", "rediss://u:pw@[::1]:6380/0"]
    local += ["redis+cluster://localhost:7000,127.0.0.1:7001"]
    remote = ["redis://10.0.0.5:6379/0", "redis://redis:6379/0", "redis+cluster://127.0.0.1:7000,10.1.1.1:7001"]
    assert all(store_on_this_machine(url) for url in local) and not any(store_on_this_machine(u) for u in remote)
    auto, on, off = (ServeConfig(fetch_between_steps=value) for value in ("auto", "on", "off"))
    assert _fetches_between_steps(auto, local[2]) and not _fetches_between_steps(auto, remote[0])
    assert _fetches_between_steps(on, remote[0]) and not _fetches_between_steps(off, local[0])
    assert main(["serve", "--fetch-between-steps", "sometimes"]) == 2
    assert "--fetch-between-steps must be auto, on, off" in capsys.readouterr().err
