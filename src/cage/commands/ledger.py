"""`cage ledger path`: where the spend ledger is."""

from __future__ import annotations

import argparse
import json
import sys

from cage.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `ledger` command's arguments."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    path = sub.add_parser(
        "path",
        help="print where the ledger is",
        description="Print where the spend ledger is: --ledger, else $CAGE_LEDGER, else the "
        "user data directory (~/.local/share/cage/ledger.db on Linux).",
    )
    path.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    path.add_argument("--ledger", metavar="PATH", help="a ledger location to resolve instead")


def run(args: argparse.Namespace) -> int:
    """Print the ledger location (nothing is created)."""
    import os

    from cage.ledger import default_ledger_location

    if getattr(args, "action", None) != "path":
        raise UsageError("say what to do: cage ledger path [--json]")
    if args.ledger:
        location, origin = args.ledger, "--ledger"
    elif os.environ.get("CAGE_LEDGER"):
        location, origin = default_ledger_location(), "CAGE_LEDGER"
    else:
        location, origin = default_ledger_location(), "default"
    is_url = "://" in location
    exists = None if is_url else os.path.exists(os.path.expanduser(location))
    if args.json:
        print(json.dumps({"path": location, "from": origin, "exists": exists}, indent=2))
    else:
        print(location)
    if exists and os.path.isdir(os.path.expanduser(location)):
        # Every command that opens it would fail: say so here, where the user looks first.
        print(
            f"cage: {location} ({origin}) is a directory, not a ledger file; point "
            "CAGE_LEDGER / --ledger at a file inside it, e.g. ledger.db",
            file=sys.stderr,
        )
        return 1
    return 0
