"""`cage outcome show|list`: mission receipts and the Verified Outcome Cost.

Only argument handling and output live here; receipts are ``cage.outcome``. Receipts are
read from ``.runcap/outcomes/*/receipt.json`` in the working tree: this is a local tool for
the developer who ran the missions (CI never trusts these files; see ``cage ci --mode grade``).
"""

from __future__ import annotations

import argparse
import json
import sys

from cage.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `outcome` command's arguments."""
    sub = parser.add_subparsers(dest="outcome_command", metavar="SUBCOMMAND")
    show = sub.add_parser(
        "show",
        help="one receipt: verdict, reasons, spend by model, verification, VOC",
        description=(
            "Show one mission receipt: verdict and reasons, spend by model with truth labels "
            "and the unpriced count, verification, and the Verified Outcome Cost of all the "
            "receipts in the repository."
        ),
    )
    show.add_argument(
        "which",
        nargs="?",
        default="latest",
        metavar="ID|latest",
        help="mission id, or `latest` (the most recently started; the default)",
    )
    lst = sub.add_parser(
        "list",
        help="every receipt, one line each, and the Verified Outcome Cost",
        description="List every mission receipt, one line each, then the Verified Outcome Cost.",
    )
    for p in (show, lst):
        p.add_argument("--repo", metavar="DIR", default=".", help="repository (default: .)")
        p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    """Dispatch `cage outcome show` and `cage outcome list`."""
    command = getattr(args, "outcome_command", None)
    if command not in ("show", "list"):
        raise UsageError("use `cage outcome show [ID|latest]` or `cage outcome list`")
    from cage import gitio, outcome

    root = gitio.Repo(args.repo).root
    # One corrupt receipt must not hide the others: each is named on stderr, the rest shown,
    # and the exit code says the Verified Outcome Cost left some out.
    found, problems = outcome.scan_receipts(root)
    for problem in problems:
        print(f"cage: skipped an unreadable receipt: {problem}", file=sys.stderr)
    status = 1 if problems else 0
    receipts = [receipt for _path, receipt in found]
    voc = outcome.verified_outcome_cost(receipts)
    if command == "show":
        path, receipt = outcome.find_receipt(root, args.which)
        if args.json:
            doc = {"receipt_path": str(path), "receipt": receipt, "voc": voc}
            doc["unreadable"] = problems
            sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        else:
            lines = outcome.show_lines(receipt, voc)
            lines.append(f"receipt: {path}")
            sys.stdout.write("\n".join(lines) + "\n")
        return status
    if args.json:
        doc = {
            "outcomes": [
                {
                    "id": r["id"],
                    "started_at": r["started_at"],
                    "verdict": r["verdict"],
                    "reasons": [x["code"] for x in r["reasons"]],
                    "spend_usd": r["spend"]["total_usd"],
                    "calls": r["spend"]["calls"],
                    "unpriced": r["spend"]["unpriced"],
                    "receipt_path": str(path),
                }
                for path, r in found
            ],
            "voc": voc,
            "unreadable": problems,
        }
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n".join(outcome.list_lines(receipts, voc)) + "\n")
    return status
