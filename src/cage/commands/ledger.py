"""`cage ledger` (not built yet)."""

from __future__ import annotations

import argparse

from cage.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `ledger` command's arguments."""


def run(args: argparse.Namespace) -> int:
    """Not built yet."""
    raise UsageError("`cage ledger` is not available yet")
