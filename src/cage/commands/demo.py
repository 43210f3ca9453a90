"""`cage demo` (not built yet)."""

from __future__ import annotations

import argparse

from cage.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `demo` command's arguments."""


def run(args: argparse.Namespace) -> int:
    """Not built yet."""
    raise UsageError("`cage demo` is not available yet")
