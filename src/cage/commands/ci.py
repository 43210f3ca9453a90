"""`cage ci`: adjudicate a pull request in CI (PASS, BLOCKED or HUMAN_APPROVAL_REQUIRED).

Only argument handling and output live here; the gate itself is ``cage.adjudicate``.
Exit codes: PASS 0, BLOCKED 1, HUMAN_APPROVAL_REQUIRED 3, usage error 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from cage.errors import UsageError
from cage.runtime import collect_less_often

# What to do next, by the code of the reason that decided the verdict.
NEXT_STEPS: dict[str, str] = {
    "no_revisions": "pass --base REV --head REV, or run in a pull_request or merge_group workflow",
    "bad_revision": "give a commit SHA or a ref that does not start with '-'",
    "bad_event": "run in a pull_request or merge_group workflow, or pass --base and --head",
    "untrusted_event": "trigger the workflow on pull_request or merge_group (never *_target)",
    "not_a_repository": "run in the checked-out repository or pass --repo",
    "unresolvable_revision": "fetch both commits: actions/checkout with fetch-depth: 0",
    "policy_missing": "commit .runcap/mission.yaml to the base branch (`cage policy init`)",
    "policy_invalid": "fix the policy on the base branch (`cage policy check`)",
    "empty_change": "push a commit that changes something",
    "internal_error": "re-run; if it persists, report the error above. The gate fails closed",
    "structural": (
        "drop the structural change (deletion, mode, symlink, submodule, binary, LFS, "
        "encoding) or land it in a pull request reviewed by a person"
    ),
    "human": (
        "a maintainer must review the change to the verifier; land verifier changes "
        "separately first, so the next run reads them from base"
    ),
    "out_of_scope": "keep the change inside verification.allow (widen it in a reviewed change)",
    "baseline_already_green": (
        "the verify command must fail before the fix: point verification.command at a test "
        "that reproduces the problem"
    ),
    "setup_failed": "fix verification.setup on the base branch",
    "timeout": "make the command faster or raise verification.timeout_seconds",
    "regression_failed": "the change breaks tests that passed before it: fix them",
    "spend_over_limit": (
        "the missions behind this change spent more than budget.mission_hard_limit_usd: "
        "a maintainer decides whether to raise the limit on the base branch"
    ),
    "spend_unattested": (
        "commit the receipt of a `cage mission run` made with the attest key "
        "(or pass --spend-evidence), and configure the same key as the CAGE_ATTEST_KEY secret"
    ),
    "verification": "the change does not make the verify command pass at head: run it locally",
}

STRUCTURAL = {
    "deleted_path",
    "mode_changed",
    "new_executable",
    "symlink",
    "gitlink",
    "binary_content",
    "lfs_pointer",
    "not_utf8",
    "unsupported_change",
    "unreadable_content",
}
SHOWN_PER_CODE = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `ci` command's arguments."""
    parser.add_argument(
        "--mode",
        choices=("adjudicate", "grade", "spend"),
        default="adjudicate",
        help="adjudicate (default): replay the verify command and print a verdict; "
        "grade: an advisory report of the mission receipts in the change "
        "(claimed, not attested; never gates); "
        "spend: verify the change's signed spend statements only, running none of its code "
        "(the job that holds the attest key)",
    )
    parser.add_argument("--base", metavar="REV", help="base commit (SHA or ref); with --head")
    parser.add_argument("--head", metavar="REV", help="head commit (SHA or ref); with --base")
    parser.add_argument("--repo", metavar="PATH", default=".", help="repository (default: .)")
    parser.add_argument("--json", action="store_true", help="print one cage.verdict/v1 document")
    parser.add_argument(
        "--spend-evidence",
        metavar="PATH",
        help="a file with signed spend statement(s) (a statement, a receipt, or a list), "
        "besides the receipts the change adds",
    )
    parser.add_argument(
        "--attest-key-file",
        metavar="PATH",
        help="the key that verifies spend statements (default: $CAGE_ATTEST_KEY)",
    )
    parser.add_argument(
        "--spend-elsewhere",
        action="store_true",
        help="adjudicate without judging spend: a separate `--mode spend` job does it "
        "(so the attest key never sits in the job that runs the change's code)",
    )


def _progress(message: str) -> None:
    print(f"cage: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Adjudicate base..head (from the options or the GitHub event) and report the verdict."""
    if args.mode == "grade":
        from cage import grade  # advisory report of the change's receipts; never gates

        return grade.run(args)
    if (args.base is None) != (args.head is None):
        raise UsageError("give both --base and --head, or neither (then the GitHub event is read)")
    # The run builds a syntax tree of every changed Python file, while git writes the base
    # worktree beside it: collecting every 10,000 new objects instead of every 700 makes
    # 12 collections of 59 for 1,000 files (about 10 ms of CPU less). Its garbage is freed
    # by reference counting anyway; the process is short-lived.
    collect_less_often(10_000)
    from cage import adjudicate as adj
    from cage import attest

    if args.spend_elsewhere and args.mode != "adjudicate":
        raise UsageError("--spend-elsewhere belongs to --mode adjudicate (the job without the key)")
    # A bad key is a configuration error, reported before anything runs (exit 2).
    key = attest.load_key(args.attest_key_file)
    # So is an evidence file the workflow names but that is not there: a typo in the path
    # must not quietly turn into "no evidence".
    if args.spend_evidence is not None:
        evidence = Path(args.spend_evidence)
        if not evidence.exists():
            raise UsageError(f"--spend-evidence {evidence}: no such file")
        if evidence.is_dir():
            raise UsageError(f"--spend-evidence {evidence}: is a directory, not a file")
    if key is not None and args.spend_elsewhere:
        print(
            "cage: warning: an attest key is set in the job that runs the change's code; "
            "give it only to the `--mode spend` job",
            file=sys.stderr,
        )
    # Paths are bytes in git; undecodable ones reach us as lone surrogates. Never let
    # printing them raise (a crash in the gate must not replace the verdict).
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            stream.reconfigure(errors="backslashreplace")
    try:
        verdict = _adjudicate(args, key)
    except Exception as exc:  # fail closed: a crash must be a BLOCKED verdict, not a traceback
        verdict = adj.blocked("internal_error", f"cage failed: {type(exc).__name__}: {exc}")
        verdict.error = f"{type(exc).__name__}: {exc}"
    if verdict.error:
        print(f"cage: internal error: {verdict.error}", file=sys.stderr)
    try:
        _publish(verdict, json_mode=args.json)
    except Exception as exc:  # outputs are a courtesy; the exit code carries the verdict
        print(f"cage: warning: cannot write the GitHub outputs: {exc}", file=sys.stderr)
    if args.json:
        # ASCII JSON: valid on any stdout encoding, undecodable path bytes kept as escapes.
        sys.stdout.write(json.dumps(verdict.to_dict(), indent=2, ensure_ascii=True) + "\n")
    else:
        fence = os.environ.get("GITHUB_ACTIONS") == "true"
        sys.stdout.write("\n".join(text_report(verdict, fence=fence)) + "\n")
    sys.stdout.flush()
    return verdict.exit_code


def _adjudicate(args: argparse.Namespace, key: bytes | None) -> Any:
    from cage import adjudicate as adj
    from cage import github

    if args.base is not None:
        base, head = args.base, args.head
    else:
        found = github.revisions_from_event(os.environ)
        if isinstance(found, adj.Reason):
            return adj.blocked(found.code, found.message)
        base, head = found
    if args.mode == "spend":
        from cage import attest

        return attest.spend_only_verdict(
            args.repo, base, head, key=key, evidence_path=args.spend_evidence
        )
    return adj.adjudicate(
        args.repo,
        base,
        head,
        spend_evidence_path=args.spend_evidence,
        progress=_progress,
        attest_key=key,
        spend_elsewhere=args.spend_elsewhere,
    )


def _publish(verdict: Any, *, json_mode: bool) -> None:
    """GitHub outputs, step summary and annotations (only on GitHub)."""
    from cage import github

    for problem in github.publish(verdict):
        print(f"cage: warning: {problem}", file=sys.stderr)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        # The runner reads workflow commands from stdout and stderr alike; with --json stdout
        # holds exactly one JSON document, so annotations go to stderr.
        stream = sys.stderr if json_mode else sys.stdout
        for line in github.annotations(verdict):
            print(line, file=stream)
        stream.flush()


def _next_step(code: str) -> str:
    from cage import adjudicate as adj

    if code in NEXT_STEPS:
        return NEXT_STEPS[code]
    if code in STRUCTURAL:
        return NEXT_STEPS["structural"]
    if adj.rule_of(code) == adj.RULE_HUMAN:
        return NEXT_STEPS["human"]
    return NEXT_STEPS["verification"]


def _run_line(label: str, result: dict[str, Any] | None) -> str | None:
    if result is None:
        return None
    exit_text = "timed out" if result.get("timed_out") else f"exit {result.get('exit_code')}"
    tests = result.get("tests")
    counts = ""
    if tests:
        parts = [f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped")]
        counts = ", " + ", ".join(p for p in parts if not p.startswith("0 "))
    return f"  {label}: {exit_text}{counts}, {result.get('duration_s', 0):.1f}s"


def _output_lines(v: dict[str, Any], codes: set[str], *, fence: bool) -> list[str]:
    """Tails of the failed runs that decided the verdict, escaped, fenced on GitHub."""
    from cage.github import fenced_output, printable

    head = v.get("head") or {}
    runs = [("setup at base", (v.get("base") or {}).get("setup"))]
    runs.append(("setup at head", head.get("setup")))
    if codes - {"regression_failed", "setup_failed", "timeout", "processes_killed"}:
        runs.append(("command at head", head.get("command")))
    if "regression_failed" in codes:
        runs.append(("regression at head", (v.get("regression") or {}).get("head")))
    lines: list[str] = []
    for label, result in runs:
        tail = (result or {}).get("output_tail")
        if not tail:
            continue
        # Terminal escapes and workflow commands in the output must not act on the reader.
        body = "\n".join("    " + printable(line) for line in tail.splitlines())
        lines.append(f"output of {label} (last lines):")
        lines += fenced_output(body) if fence else body.splitlines()
    return lines


def text_report(verdict: Any, *, fence: bool = False) -> list[str]:
    """The human summary: verdict, reasons, verification, what to do next.

    ``fence`` wraps command output in ``::stop-commands::`` (on GitHub Actions).
    """
    from cage.github import printable

    doc = verdict.to_dict()
    meaning = {
        "PASS": "the change may merge",
        "BLOCKED": "the change may not merge",
        "HUMAN_APPROVAL_REQUIRED": "a person must approve the change",
    }[doc["verdict"]]
    lines = [f"{doc['verdict']}: {meaning} (verification {doc['verification']['status']})"]
    if doc["reasons"]:
        lines.append("reasons:")
    shown: dict[str, int] = {}
    for reason in doc["reasons"]:
        n = shown[reason["code"]] = shown.get(reason["code"], 0) + 1
        if n <= SHOWN_PER_CODE:
            lines.append(f"  - {reason['code']}: {printable(reason['message'])}")
    for code, n in shown.items():
        if n > SHOWN_PER_CODE:
            lines.append(f"  … and {n - SHOWN_PER_CODE} more {code} (see --json)")
    if doc["policy"]:
        lines.append(f"policy: {doc['policy']['path']} at base, sha256 {doc['policy']['hash']}")
    if doc["base"] and doc["head"]:
        n = len(doc["changes"])
        paths = "1 changed path" if n == 1 else f"{n} changed paths"
        lines.append(f"base {doc['base']}  head {doc['head']}  ({paths})")
    v = doc["verification"]
    if v.get("replayed"):
        lines.append("verification:")
        for side in ("base", "head"):
            data = v.get(side) or {}
            for key in ("setup", "command"):
                row = _run_line(f"{key} at {side}", data.get(key))
                if row:
                    lines.append(row)
        reg = v.get("regression") or {}
        for side in ("base", "head"):
            row = _run_line(f"regression at {side}", reg.get(side))
            if row:
                lines.append(row)
        lines += _output_lines(v, {r["code"] for r in doc["reasons"]}, fence=fence)
    elif v.get("skipped_reason"):
        lines.append(f"verification: not replayed: {printable(v['skipped_reason'])}")
    lines += spend_lines(doc.get("spend") or {})
    deciding = next((r["code"] for r in doc["reasons"] if r["code"]), None)
    if doc["verdict"] == "PASS":
        lines.append("next: nothing; the check passes")
    elif deciding:
        lines.append(f"next: {_next_step(deciding)}")
    return lines


def spend_lines(spend: dict[str, Any]) -> list[str]:
    """The spend part of the text report: attested total, or why there is none."""
    from cage.github import printable

    status = spend.get("status")
    if status == "attested":
        line = f"spend: attested ${spend['total_usd']:.4f} in {spend['calls']} call(s)"
        if spend.get("limit_usd") is not None:
            line += f" (limit ${spend['limit_usd']:g})"
        lines = [line]
        for row in spend.get("by_model") or []:
            cost = row.get("cost_usd")
            shown = f"${cost:.4f}" if isinstance(cost, (int, float)) else "unpriced"
            name = printable(str(row["model"]))
            lines.append(f"  {name}: {row.get('calls', 0)} call(s), {shown}")
        if spend.get("note"):
            lines.append(f"  note: {printable(str(spend['note']))}")
        return lines
    if status == "off":
        return ["spend: not evaluated (spend_evidence: off)"]
    if status == "elsewhere":
        return ["spend: judged by the separate `cage ci --mode spend` job"]
    if status == "unattested":
        given = len(spend.get("statements") or [])
        why = f"{given} statement(s) given, none valid" if given else "no spend statement"
        if not spend.get("key_configured"):
            why += "; no attest key configured (CAGE_ATTEST_KEY)"
        return [f"spend: unattested ({why})"]
    return []
