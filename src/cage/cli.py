"""Argument parsing and dispatch only.

Each command lives in ``cage.commands.<module>`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Command modules import only the standard library at module level and
load heavy dependencies inside ``run``, so ``cage --help`` and the CI gate start fast.
"""

from __future__ import annotations

import argparse
import gc
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


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser: one sub-parser per command, configured by its module.

    When ``argv`` names a command first, only that command's module is imported and its
    options defined (the others still appear in ``cage --help``): every run of the CI gate
    pays for one command's set-up, not nine.
    """
    chosen = argv[0] if argv and argv[0] in {name for name, _, _ in COMMANDS} else None
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
        if chosen is not None and name != chosen:
            continue
        mod = importlib.import_module(f"cage.commands.{module}")
        mod.add_arguments(command)
        command.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cage`` console script; returns the exit code."""
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
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


def console() -> None:
    """The ``cage`` console script and ``python -m cage``: ``main()``, then exit with its code.

    Everything a command opened is closed by then; ``gc.freeze()`` spares the interpreter's
    teardown one last garbage collection over every object loaded (about 30 ms with the CI
    gate's libraries, paid on every run of a required check).
    """
    code = main()
    gc.freeze()
    sys.exit(code)
