"""`prefix-serve serve` flags and PREFIX_SERVE_* variables."""

from __future__ import annotations

import argparse

import pytest

from server.cli import _SERVE_FLAGS, SERVE_SWITCHES, _add_serve_parser, config_from_args, main
from server.config import ServeConfig


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


def test_bad_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIX_SERVE_PORT", "eighty")
    with pytest.raises(SystemExit, match="PREFIX_SERVE_PORT"):
        config_from_args(args())


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
    ],
)
def test_negative_admission_budget_is_refused(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_an_unknown_tool_call_format_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--tool-call-format", "mistral"]) == 2
    err = capsys.readouterr().err
    assert "--tool-call-format" in err and "hermes, llama, none" in err


@pytest.mark.parametrize("switch", SERVE_SWITCHES)
def test_switches_from_flag_or_env(switch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert getattr(ServeConfig(), switch) is False  # every switch is off by default
    assert getattr(config_from_args(args()), switch) is False
    assert getattr(config_from_args(args(**{switch: True})), switch) is True
    monkeypatch.setenv("PREFIX_SERVE_" + switch.upper(), "0")
    assert getattr(config_from_args(args()), switch) is False
    monkeypatch.setenv("PREFIX_SERVE_" + switch.upper(), "1")
    assert getattr(config_from_args(args()), switch) is True


def test_every_switch_is_a_serve_flag() -> None:
    parser = argparse.ArgumentParser()
    _add_serve_parser(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["serve", *("--" + switch.replace("_", "-") for switch in SERVE_SWITCHES)])
    assert all(getattr(parsed, switch) is True for switch in SERVE_SWITCHES)
    assert all(getattr(parser.parse_args(["serve"]), switch) is False for switch in SERVE_SWITCHES)
