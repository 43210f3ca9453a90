"""`cage demo`: three scripted agent missions offline, their verdicts, reasons and spend.

The work is in :mod:`cage.demo`; this module makes the temporary directory, prints and exits.
Exit 0 when the three verdicts are the expected PASS, HUMAN_APPROVAL_REQUIRED and BLOCKED,
1 otherwise: the demo doubles as a self-test of an installation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cage.errors import CageError

_COLOURS = {
    "PASS": "32",  # green
    "HUMAN_APPROVAL_REQUIRED": "33",  # yellow
    "BLOCKED": "31",  # red
}
_MAX_REASONS = 4
_MAX_MESSAGE = 240


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `demo` command's arguments."""
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (repository, receipts, ledger, logs) and print it",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args: argparse.Namespace) -> int:
    """Run the demo in a fresh temporary directory; 0 when every verdict is as expected."""
    import importlib.util
    import shutil
    import tempfile
    from pathlib import Path

    if importlib.util.find_spec("aiohttp") is None:
        raise CageError(
            "`cage demo` runs the metering proxy, which needs aiohttp: install the proxy "
            "extra (pip install 'cage-gate[proxy]', or '.[proxy]' from a clone)"
        )
    from cage.demo.missions import run_demo

    directory = Path(tempfile.mkdtemp(prefix="cage-demo-"))
    try:
        result = run_demo(directory, progress=_progress)
        if args.json:
            print(json.dumps(result.to_dict(kept=args.keep), indent=2))
        else:
            _print_text(result, kept=args.keep)
    finally:
        if args.keep:
            print(f"cage demo: kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    if result.ok:
        return 0
    for mission in result.missions:
        if not mission.as_expected:
            print(
                f"cage demo: mission {mission.scenario.mission_id} ended "
                f"{mission.verdict or 'without a verdict'}, expected {mission.scenario.expected}"
                + (f": {mission.error}" if mission.error else ""),
                file=sys.stderr,
            )
    print(
        "cage demo: FAILED: the installation does not behave as it should"
        + ("" if args.keep else " (run `cage demo --keep` to inspect the logs)"),
        file=sys.stderr,
    )
    return 1


def _progress(message: str, pending: bool) -> None:
    # On a terminal the pending line ("mission 1/3: honest fix…") is completed in place.
    if sys.stderr.isatty():
        end = "" if pending else "\n"
        print("\r\033[K" + message, end=end, file=sys.stderr, flush=True)
    else:
        print(message, file=sys.stderr, flush=True)


def _colour_enabled() -> bool:
    return (
        sys.stdout.isatty()
        and "NO_COLOR" not in os.environ
        and os.environ.get("TERM", "") != "dumb"
    )


def _paint(text: str, code: str | None, enabled: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if enabled and code else text


def _wrapped(first: str, message: str, indent: int = 5) -> list[str]:
    """``first`` + ``message`` on lines fitting the terminal, continued under the message."""
    import shutil
    import textwrap

    text = " ".join(message.split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 100))
    return textwrap.wrap(
        first + text, width=width, subsequent_indent=" " * indent, break_on_hyphens=False
    )


def _money(value: float) -> str:
    # Mock calls cost fractions of a cent: six places keep every row distinguishable.
    return f"${value:.6f}"


def _print_text(result: Any, *, kept: bool) -> None:
    from cage.demo import repository

    colour = _colour_enabled()
    bold = "1"
    out: list[str] = []
    out.append(
        _paint("cage demo", bold, colour)
        + f": three scripted agents, one bug (add() in {repository.OPS_PATH} subtracts), "
        f"a ${repository.BUDGET_USD:g} cap per mission, all offline"
    )
    out.append(f"verify command: {result.verify_command}  (evidence: {result.evidence})")
    if result.evidence == "exit-code":
        out.extend(
            _wrapped(
                "  ",
                "pytest is not installed here: the tests run under unittest and are judged by "
                "exit status (VERIFIED_WEAK); with pytest the gate reads a JUnit report "
                "(VERIFIED_STRONG)",
                indent=2,
            )
        )
    out.append("")
    for number, mission in enumerate(result.missions, start=1):
        scenario = mission.scenario
        out.append(f"{number}. {_paint(scenario.title, bold, colour)}: {scenario.does}")
        verdict = mission.verdict or "NO VERDICT"
        status = f" ({mission.verification_status})" if mission.verification_status else ""
        spend = mission.spend
        line = (
            f"   {_paint(verdict, _COLOURS.get(verdict, '35'), colour)}{status}"
            f"  spend {_money(spend.get('cost_usd', 0.0))} in {spend.get('calls', 0)} LLM calls"
        )
        if mission.refusals:
            line += f", {len(mission.refusals)} refused by the budget guard"
        out.append(line)
        shown = [r for r in mission.reasons if r.get("code") != "replay_skipped"] or list(
            mission.reasons
        )
        for reason in shown[:_MAX_REASONS]:
            out.extend(_wrapped(f"   - {reason.get('code')}: ", str(reason.get("message", ""))))
        if len(shown) > _MAX_REASONS:
            out.append(f"   - ... {len(shown) - _MAX_REASONS} more in the receipt")
        for refusal in mission.refusals[:1]:
            out.extend(_wrapped("   the agent got HTTP 429 budget_guard: ", refusal))
        if not mission.as_expected:
            out.append(
                "   "
                + _paint(f"expected {scenario.expected}", "31", colour)
                + (f": {mission.error}" if mission.error else "")
            )
        out.append("")
    out.extend(_spend_table(result))
    out.append("")
    if result.voc is not None:
        from cage.outcome import voc_lines

        out.extend(voc_lines(result.voc))
        out.append("")
    receipts = result.receipts_dir / "<id>" / "receipt.json"
    if kept:
        out.append(f"receipts: {receipts}")
        out.append(f"  try: cd {result.repo} && cage outcome list")
        out.append(f"ledger:   {result.ledger}")
        out.append(f"  try: cage report --ledger {result.ledger} --by mission")
    else:
        out.append(
            f"receipts were in {receipts} (removed with the demo directory; "
            "`cage demo --keep` keeps them)"
        )
    if result.ok:
        out.append(
            _paint("OK", "32", colour) + ": PASS, HUMAN_APPROVAL_REQUIRED and BLOCKED, as expected "
            f"({result.duration_s:.1f} s)"
        )
        out.append(
            "next: `cage policy init` in your repository, then "
            "`cage mission run -- <your agent>` (docs/missions.md)"
        )
    else:
        out.append(_paint("FAILED", "31", colour) + ": not every verdict is the expected one")
    print("\n".join(out))


def _spend_table(result: Any) -> list[str]:
    rows: list[tuple[str, ...]] = []
    for mission in result.missions:
        for model, row in mission.spend.get("by_model", {}).items():
            rows.append(
                (
                    mission.scenario.mission_id,
                    model,
                    str(row["calls"]),
                    str(row["input_tokens"]),
                    str(row["output_tokens"]),
                    _money(row["cost_usd"]),
                )
            )
    totals = result.totals
    rows.append(
        (
            "total",
            "",
            str(totals.get("calls", 0)),
            str(totals.get("input_tokens", 0)),
            str(totals.get("output_tokens", 0)),
            _money(totals.get("cost_usd", 0.0)),
        )
    )
    header = ("mission", "model", "calls", "input", "output", "cost")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        left = [row[i].ljust(widths[i]) for i in range(2)]
        right = [row[i].rjust(widths[i]) for i in range(2, len(row))]
        return "  " + "  ".join(left + right)

    lines = [
        "spend, from the demo's own ledger (every call metered by the proxy, "
        "usage measured, priced offline):",
        fmt(header),
    ]
    lines.extend(fmt(row) for row in rows)
    unpriced = totals.get("unpriced", 0)
    if unpriced:
        lines.append(f"  {unpriced} calls unpriced (no price known for their model)")
    return lines
