"""Server variants compared side by side: ``--variant NAME=FLAGS``, as the benchmarks that start servers take it."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence


def add_variant_option(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A repeatable ``flag NAME=FLAGS`` option (FLAGS: extra `prefix-serve serve` flags, shell-quoted)."""
    parser.add_argument(flag, action="append", default=[], metavar="NAME=FLAGS", help=help)


def parse_variants(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=FLAGS`` specs as {name: flags string}, in the order given."""
    return dict(spec.partition("=")[::2] for spec in specs)


def flag_list(flags: str) -> list[str]:
    """A variant's flags string as the argument list to append to the server's command."""
    return shlex.split(flags)
