"""Argument parsing and dispatch only.

Each command lives in ``cage.commands.<module>`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Command modules import only the standard library at module level and
load heavy dependencies inside ``run``, so ``cage --help`` and the CI gate start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cage import __version__
from cage.errors import CageError

# (command, module, one line for ``cage --help``), in the order a new user meets them.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("demo", "demo", "run three scripted agent missions offline and show their verdicts"),
    ("policy", "policy", "check, show or create the mission policy (.runcap/mission.yaml)"),
    ("mission", "mission", "run an agent under the mission policy and write a receipt"),
    ("outcome", "outcome", "show mission receipts and the Verified Outcome Cost"),
    ("ci", "ci", "adjudicate a pull request in CI: PASS, BLOCKED or HUMAN_APPROVAL_REQUIRED"),
    ("import", "import_", "import LLM spend from Claude Code, Codex or JSONL logs"),
    ("report", "report", "report spend from the ledger by model, provider, caller, mission, day"),
    ("ledger", "ledger", "locate the spend ledger"),
    ("proxy", "proxy", "run the metering proxy with a hard budget cap"),
)


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line message (never a traceback)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"cage: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser: one sub-parser per command, configured by its module."""
    parser = _Parser(
        prog="cage",
        description=(
            "Trust pull requests written by coding agents: a spend ledger, missions under a "
            "budget, and a CI gate that replays the verify command with the verifier frozen."
        ),
        epilog="Start with `cage demo`, then `cage policy init` in your repository.",
    )
    parser.add_argument("--version", action="version", version=f"cage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module, help_line in COMMANDS:
        command = sub.add_parser(
            name, help=help_line, description=help_line[:1].upper() + help_line[1:] + "."
        )
        mod = importlib.import_module(f"cage.commands.{module}")
        mod.add_arguments(command)
        command.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cage`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CageError as exc:
        print(f"cage: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cage: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
