"""`prefix-serve serve` flags and PREFIX_SERVE_* variables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from server import cli
from server.cli import _SERVE_FLAGS, config_from_args, main
from server.config import ServeConfig
from server.threads import SERVING_SWITCH_INTERVAL_S


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


def test_serve_shortens_the_gil_switch_interval_before_serving(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine thread shares the GIL with the event loop: a served process hands it over every 0.5 ms."""
    seen: list[float] = []

    class NotServing:
        def run(self) -> None:
            seen.append(sys.getswitchinterval())

    monkeypatch.setattr(cli, "_draining_server", lambda config, app: NotServing())
    before = sys.getswitchinterval()
    try:
        assert main(["serve", "--model", str(tiny_model_dir), "--store", f"disk://{tmp_path}"]) == 0
    finally:
        sys.setswitchinterval(before)
    assert before == pytest.approx(0.005)  # Python's default, which the test must see changed
    assert seen == [pytest.approx(SERVING_SWITCH_INTERVAL_S)]
