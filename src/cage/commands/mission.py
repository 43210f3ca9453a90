"""`cage mission run`: run an agent under the mission policy and write a receipt.

Only argument handling and output live here; the runner is ``cage.mission``.
Exit codes: PASS 0, BLOCKED 1 (budget or runtime exceeded included),
HUMAN_APPROVAL_REQUIRED 3, usage error 2, interrupted (Ctrl-C, SIGTERM) 130.
"""

from __future__ import annotations

import argparse
import json
import sys

from cage.commands.proxy import add_traffic_arguments, show_log
from cage.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `mission` command's arguments."""
    sub = parser.add_subparsers(dest="mission_command", metavar="SUBCOMMAND")
    run = sub.add_parser(
        "run",
        help="run an agent command under the policy, metered and capped; write a receipt",
        description=(
            "Run an agent command with its LLM traffic metered by a local proxy under the "
            "policy's budget cap, stop it at max_runtime_minutes or when the budget is spent, "
            "snapshot its result without touching your branch, index or working tree, "
            "adjudicate it with the same code as `cage ci`, and write "
            ".runcap/outcomes/<id>/receipt.json. Example: cage mission run -- claude -p 'fix "
            "the add bug'"
        ),
    )
    run.add_argument(
        "--policy",
        metavar="PATH",
        help="policy file to run under (default: .runcap/mission.yaml at the base commit, "
        "as CI reads it)",
    )
    run.add_argument("--id", metavar="ID", help="mission id (default: UTC time + random hex)")
    run.add_argument("--repo", metavar="DIR", default=".", help="repository (default: .)")
    run.add_argument(
        "--allow-dirty",
        action="store_true",
        help="start even with uncommitted changes (they count as the agent's work)",
    )
    run.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="after SIGTERM, how long the agent has to exit before SIGKILL (default 5)",
    )
    add_traffic_arguments(
        run, mock_help="the proxy answers locally (no network, no keys): for demos and tests"
    )
    run.add_argument(
        "--attest-key-file",
        metavar="PATH",
        help="key that signs the mission's spend statement (default: $CAGE_ATTEST_KEY); "
        "never passed to the agent",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (receipt path, exit code, receipt); the agent's "
        "stdout goes to stderr",
    )
    run.add_argument(
        "agent",
        nargs=argparse.REMAINDER,
        metavar="-- AGENT COMMAND",
        help="the agent command, after `--`",
    )


def _progress(message: str) -> None:
    print(f"cage: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Dispatch `cage mission run`."""
    if getattr(args, "mission_command", None) != "run":
        raise UsageError("use `cage mission run [options] -- <agent command>`")
    import logging

    from cage import mission, outcome

    # Refusals by the budget guard and threshold warnings reach the user as they happen.
    show_log(logging.WARNING)

    options = mission.MissionOptions(
        argv=list(args.agent or []),
        repo=args.repo,
        policy_path=args.policy,
        mission_id=args.id,
        allow_dirty=args.allow_dirty,
        grace_s=args.grace,
        ledger=args.ledger,
        upstream_openai=args.upstream_openai,
        upstream_anthropic=args.upstream_anthropic,
        mock=args.mock,
        attest_key_file=args.attest_key_file,
        agent_stdout_to_stderr=args.json,
        progress=_progress,
    )
    result = mission.run_mission(options)
    if args.json:
        doc = {
            "receipt_path": str(result.path),
            "exit_code": result.exit_code,
            "receipt": result.receipt,
        }
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    else:
        lines = outcome.show_lines(result.receipt)
        lines.append(f"receipt: {result.path}")
        sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return result.exit_code
