"""`cage ci --mode grade`: an advisory report of the mission receipts in a pull request.

It lists the receipts the change adds or updates under ``.runcap/outcomes/`` (read from the
head commit's git objects, never from the working tree), with the spend the local ledger
holds for their mission ids, and marks every figure as **claimed (not attested)**: a receipt
in a pull request is written on a machine the gate does not control, so it proves nothing
(attested spend is `cage ci --mode adjudicate`'s business, issue 8). Grade mode never gates:
it exits 0 whatever it finds, and 2 only when it is used wrongly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cage.errors import GitError, LedgerError, ReceiptError, UsageError

SCHEMA = "cage.grade/v1"
CLAIMED = "claimed (not attested)"
UNREADABLE = "unreadable"


def _revisions(args: argparse.Namespace) -> tuple[str, str]:
    """(base, head) from --base/--head or the GitHub event; UsageError when neither works."""
    if (args.base is None) != (args.head is None):
        raise UsageError("give both --base and --head, or neither (then the GitHub event is read)")
    if args.base is not None:
        return args.base, args.head
    from cage import github
    from cage.adjudicate import Reason

    found = github.revisions_from_event(os.environ)
    if isinstance(found, Reason):
        raise UsageError(f"grade mode: {found.message}")
    return found


def _ledger_spend(mission_ids: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """What the ledger (``$CAGE_LEDGER`` or the user data directory) holds for each mission
    id. A ledger that does not exist is not created: in CI there usually is none."""
    from cage import ledger as ledger_mod

    location = ledger_mod.default_ledger_location()
    info: dict[str, Any] = {"location": location, "found": False, "error": None}
    if "://" not in location and not Path(location).is_file():
        return info, {}
    spend: dict[str, dict[str, Any]] = {}
    try:
        with ledger_mod.Ledger.open(location) as book:
            info["found"] = True
            for mission_id in mission_ids:
                row = book.mission_spend(mission_id)
                if row["calls"]:
                    spend[mission_id] = {
                        "cost_usd": row["cost_usd"],
                        "calls": row["calls"],
                        "unpriced": row["unpriced"],
                        "truth": row["truth"],
                    }
    except LedgerError as exc:
        info["error"] = str(exc)
    return info, spend


def grade(repo_path: str, base_rev: str, head_rev: str) -> dict[str, Any]:
    """The ``cage.grade/v1`` report for base..head. Raises UsageError for revisions that do
    not resolve (the only way grade mode can be used wrongly once it has revisions)."""
    from cage import gitio, outcome, pathrules

    try:
        repo = gitio.Repo(repo_path)
    except GitError as exc:
        raise UsageError(f"grade mode: {exc}") from None
    try:
        base = repo.resolve_commit(base_rev)
        head = repo.resolve_commit(head_rev)
    except GitError as exc:
        raise UsageError(f"grade mode: {exc}") from None
    found = [
        c
        for c in repo.diff(base, head)
        if pathrules.is_receipt_path(c.path)
        and c.status != "D"
        and c.new_mode in gitio.REGULAR_MODES
    ]
    blobs = repo.read_blobs([c.new_sha for c in found]) if found else {}
    entries: list[dict[str, Any]] = []
    valid: list[dict[str, Any]] = []
    for change in found:
        where = f"{change.path}@{head[:12]}"
        entry: dict[str, Any] = {"path": change.path, "status": CLAIMED, "error": None}
        try:
            receipt = outcome.parse_receipt(blobs[change.new_sha], where)
            folder = change.path.split("/")[-2]
            if receipt["id"] != folder:
                raise ReceiptError(
                    f"{where}: the receipt's id {receipt['id']!r} is not its folder's name"
                )
        except ReceiptError as exc:
            entry.update(status=UNREADABLE, error=str(exc))
            entries.append(entry)
            continue
        spend = receipt["spend"]
        entry.update(
            id=receipt["id"],
            verdict=receipt["verdict"],
            reasons=[r["code"] for r in receipt["reasons"]],
            spend_usd=spend["total_usd"],
            calls=spend["calls"],
            unpriced=spend["unpriced"],
            base_matches=receipt.get("base") == base,
            attested=False,
            ledger=None,
        )
        valid.append(receipt)
        entries.append(entry)
    ledger_info, ledger_spend = _ledger_spend([r["id"] for r in valid])
    for entry in entries:
        if entry.get("id") in ledger_spend:
            entry["ledger"] = ledger_spend[entry["id"]]
    return {
        "schema": SCHEMA,
        "advisory": True,
        "base": base,
        "head": head,
        "receipts": entries,
        "totals": {
            "receipts": len(entries),
            "unreadable": sum(1 for e in entries if e["status"] == UNREADABLE),
            "claimed_spend_usd": round(sum(float(r["spend"]["total_usd"]) for r in valid), 9),
            "ledger_spend_usd": round(sum(s["cost_usd"] for s in ledger_spend.values()), 9),
            "voc": outcome.verified_outcome_cost(valid),
        },
        "ledger": ledger_info,
        "note": (
            "advisory only: every figure is claimed by receipts committed in the change "
            "(or held in this machine's ledger), not attested; grade mode never gates a merge"
        ),
    }


def text_lines(report: dict[str, Any]) -> list[str]:
    """The report for a terminal or a CI log."""
    from cage.github import printable
    from cage.outcome import money

    totals = report["totals"]
    lines = [
        f"cage grade (advisory, never gates): {totals['receipts']} receipt(s) in "
        f"{report['base'][:12]}..{report['head'][:12]}, all {CLAIMED}"
    ]
    for e in report["receipts"]:
        if e["status"] == UNREADABLE:
            lines.append(f"  {printable(e['path'])}: unreadable: {printable(e['error'])}")
            continue
        ledger = e["ledger"]
        lines.append(
            f"  {printable(e['id'])}: {e['verdict']}, {money(e['spend_usd'])} in {e['calls']} "
            f"call(s), {CLAIMED}"
            + ("" if e["base_matches"] else ", base differs from this pull request's")
            + (
                f"; ledger here: {money(ledger['cost_usd'])} in {ledger['calls']} call(s)"
                if ledger
                else ""
            )
        )
    voc = totals["voc"]
    lines.append(
        f"claimed spend {money(totals['claimed_spend_usd'])}, of which verified (PASS) "
        f"{money(voc['verified_spend_usd'])}; ledger spend here "
        f"{money(totals['ledger_spend_usd'])}"
    )
    lines.append(report["note"])
    return lines


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The Markdown step summary (receipt content is the pull request's: escaped)."""
    from cage.github import md
    from cage.outcome import money

    totals = report["totals"]
    lines = [
        "## cage grade (advisory)",
        "",
        f"{totals['receipts']} receipt(s) in this change. Every figure is **{CLAIMED}**: "
        "receipts are written outside CI and prove nothing; this check never gates a merge.",
        "",
    ]
    if report["receipts"]:
        lines += [
            "| mission | claimed verdict | claimed spend | calls | ledger here |",
            "|---|---|---|---|---|",
        ]
        for e in report["receipts"]:
            if e["status"] == UNREADABLE:
                lines.append(f"| {md(e['path'])} | unreadable: {md(e['error'] or '')} | | | |")
                continue
            ledger = e["ledger"]
            lines.append(
                f"| {md(e['id'])} | {md(e['verdict'])} | {money(e['spend_usd'])} | {e['calls']} | "
                + (money(ledger["cost_usd"]) if ledger else "–")
                + " |"
            )
        voc = totals["voc"]
        lines += [
            "",
            f"Claimed spend {money(totals['claimed_spend_usd'])}, of which verified (PASS) "
            f"{money(voc['verified_spend_usd'])}.",
        ]
    return lines


def run(args: argparse.Namespace) -> int:
    """`cage ci --mode grade`: print the advisory report; 0 always, 2 when used wrongly."""
    from cage.github import limit_summary

    base, head = _revisions(args)
    report = grade(args.repo, base, head)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(limit_summary("\n".join(summary_lines(report)) + "\n"))
        except OSError as exc:
            print(
                f"cage: warning: cannot write GITHUB_STEP_SUMMARY: {exc.strerror}", file=sys.stderr
            )
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n".join(text_lines(report)) + "\n")
    sys.stdout.flush()
    return 0
