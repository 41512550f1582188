"""`prefix-serve serve` flags and PREFIX_SERVE_* variables."""

from __future__ import annotations

import argparse

import pytest

from server.cli import _SERVE_FLAGS, config_from_args, main
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
        ("--prefill-chunk-tokens", "-1"),
        ("--prefill-deadline-s", "-1"),
        ("--prefill-deadline-s", "nan"),
    ],
)
def test_negative_admission_budget_is_refused(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_enforce_eager_from_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args(args()).enforce_eager is False
    assert config_from_args(args(enforce_eager=True)).enforce_eager is True
    monkeypatch.setenv("PREFIX_SERVE_ENFORCE_EAGER", "1")
    assert config_from_args(args()).enforce_eager is True


def test_compile_decode_from_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args(args()).compile_decode is False
    assert config_from_args(args(compile_decode=True)).compile_decode is True
    monkeypatch.setenv("PREFIX_SERVE_COMPILE_DECODE", "1")
    assert config_from_args(args()).compile_decode is True


def test_stock_linear_from_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args(args()).stock_linear is False
    assert config_from_args(args(stock_linear=True)).stock_linear is True
    monkeypatch.setenv("PREFIX_SERVE_STOCK_LINEAR", "1")
    assert config_from_args(args()).stock_linear is True
