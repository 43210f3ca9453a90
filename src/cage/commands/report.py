"""`cage report`: spend from the ledger, grouped by model, provider, caller, mission or day."""

from __future__ import annotations

import argparse
import json
import sys

from cage.errors import UsageError

BY_CHOICES = ("model", "provider", "caller", "mission", "day")
TRUTH = ("measured", "modeled", "estimated")
COUNT_COLUMNS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `report` command's arguments."""
    parser.add_argument(
        "--by", choices=BY_CHOICES, default="model", help="group rows by this (default: model)"
    )
    parser.add_argument(
        "--since", metavar="DATE", help="from this UTC day (YYYY-MM-DD) or timestamp, inclusive"
    )
    parser.add_argument(
        "--until", metavar="DATE", help="up to this UTC day (YYYY-MM-DD) or timestamp, inclusive"
    )
    parser.add_argument("--mission", metavar="ID", help="only this mission's calls")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    form.add_argument("--csv", action="store_true", help="print CSV (one row per group)")
    parser.add_argument(
        "--ledger", metavar="PATH", help="ledger file (default: $CAGE_LEDGER or the user data dir)"
    )


def run(args: argparse.Namespace) -> int:
    """Print the report; an absent ledger is an empty report with a note, not an error."""
    import os

    from cage.ledger import Ledger, default_ledger_location, parse_bound, total_of

    bounds = {}
    for option in ("since", "until"):
        value = getattr(args, option)
        try:
            bounds[option] = parse_bound(value, end=option == "until")
        except ValueError as exc:
            raise UsageError(f"--{option}: {exc}") from None
    if bounds["since"] and bounds["until"] and bounds["since"] >= bounds["until"]:
        raise UsageError(f"--since {args.since} is after --until {args.until}: nothing to report")
    if args.mission is not None and not args.mission.strip():
        # An empty id (an unset shell variable, `--mission "$ID"`) must not report everything.
        raise UsageError("--mission: the mission id is empty; give the id `cage outcome` shows")

    location = args.ledger or default_ledger_location()
    note = None
    if "://" not in location and not os.path.exists(os.path.expanduser(location)):
        rows: list[dict] = []
        note = f"no ledger at {location} yet: nothing has been recorded"
    else:
        with Ledger.open(location) as ledger:
            rows = ledger.report(args.by, since=args.since, until=args.until, mission=args.mission)
    total = total_of(rows)
    status = 0
    if any(not -_INF < row["cost_usd"] < _INF for row in rows):
        # Only an older cage could store a NaN/inf cost; it would poison every total (and
        # make --json invalid). Say which groups, report them as unpriced, exit 1.
        bad = ", ".join(str(row["key"]) for row in rows if not -_INF < row["cost_usd"] < _INF)
        print(
            f"cage: the ledger {location} holds a cost that is not a finite number ({bad}); "
            "it is left out of the dollar totals: re-import those calls into a new ledger",
            file=sys.stderr,
        )
        for row in rows:
            if not -_INF < row["cost_usd"] < _INF:
                row["cost_usd"] = 0.0
                row["unpriced"] = row["calls"]
        total = total_of(rows)
        status = 1

    if args.json:
        document = {
            "schema": "cage.report/v1",
            "ledger": location,
            "by": args.by,
            "since": args.since,
            "until": args.until,
            "mission": args.mission,
            "rows": [_json_row(row) for row in rows],
            "total": _json_row(total),
        }
        if note:
            document["note"] = note
        print(json.dumps(document, indent=2))
    elif args.csv:
        _print_csv(args.by, rows)
    else:
        _print_table(args.by, rows, total)
    if note and not args.json:
        print(f"cage: {note}", file=sys.stderr)
    return status


_INF = float("inf")


def _json_row(row: dict) -> dict:
    out = dict(row)
    out["cost_usd"] = round(row["cost_usd"], 6)
    return out


def _print_csv(by: str, rows: list[dict]) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([by, *COUNT_COLUMNS, "cost_usd", "unpriced", *TRUTH])
    for row in rows:
        writer.writerow(
            [
                "" if row["key"] is None else row["key"],
                *(row[name] for name in COUNT_COLUMNS),
                f"{row['cost_usd']:.6f}",
                row["unpriced"],
                *(row["truth"][label] for label in TRUTH),
            ]
        )


def _print_table(by: str, rows: list[dict], total: dict) -> None:
    headers = [
        by,
        "calls",
        "input",
        "output",
        "cache read",
        "cache write",
        "cost $",
        "unpriced",
        "measured/modeled/estimated",
    ]

    def cells(key: str, row: dict) -> list[str]:
        return [
            key,
            f"{row['calls']:,}",
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            f"{row['cache_read_tokens']:,}",
            f"{row['cache_write_tokens']:,}",
            f"{row['cost_usd']:,.2f}",
            f"{row['unpriced']:,}",
            "/".join(f"{row['truth'][label]:,}" for label in TRUTH),
        ]

    body = [cells("(none)" if row["key"] is None else str(row["key"]), row) for row in rows]
    footer = cells("total", total)
    widths = [max(len(r[i]) for r in [headers, *body, footer]) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        # The key column reads left-aligned, numbers right-aligned.
        parts = [values[0].ljust(widths[0])]
        parts += [v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    print(line(headers))
    for values in body:
        print(line(values))
    print("  ".join("-" * w for w in widths))
    print(line(footer))
    if total["unpriced"]:
        print(
            f"{total['unpriced']:,} call(s) unpriced (model not in the price table): "
            "their cost is not in the dollars above"
        )
