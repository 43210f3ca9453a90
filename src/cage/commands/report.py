"""`cage report` (not built yet)."""

from __future__ import annotations

import argparse

from cage.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `report` command's arguments."""


def run(args: argparse.Namespace) -> int:
    """Not built yet."""
    raise UsageError("`cage report` is not available yet")
