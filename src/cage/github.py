"""GitHub Actions edges: event payloads in; outputs, step summary and annotations out.

Everything here treats its input as hostile: the event payload is JSON an attacker can
shape (branch names, titles), and paths and test names in a verdict come from the pull
request. Values written to ``GITHUB_OUTPUT`` are single-line, Markdown is escaped so a path
cannot inject HTML or break a table, and workflow-command data is escaped per GitHub's rules
so a message cannot start a new command.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any

from cage.adjudicate import Reason, Verdict, rule_of
from cage.fileio import read_no_wait

# The events whose payload names a base and a head cage can adjudicate, and where their SHAs
# live. Everything else is refused: see UNTRUSTED_EVENTS for why the usual suspects are.
TRUSTED_EVENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pull_request": (("pull_request", "base", "sha"), ("pull_request", "head", "sha")),
    "merge_group": (("merge_group", "base_sha"), ("merge_group", "head_sha")),
}

UNTRUSTED_EVENTS: dict[str, str] = {
    "pull_request_target": (
        "it runs the base branch's workflow with its secrets and a write token while the "
        "checked-out code comes from the pull request"
    ),
    "push": "it describes a branch update, not a change proposed for review",
    "workflow_run": (
        "it runs with the base repository's secrets on artefacts of another run the pull "
        "request controls"
    ),
    "issue_comment": "a comment names no base and head commit",
    "pull_request_review": "it names a review, not a change to adjudicate",
    "schedule": "a scheduled run names no change",
    "workflow_dispatch": "its inputs are typed by a person or a script, not taken from a change",
}

SHA_RE = re.compile(r"\A(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{64})\Z")
MAX_EVENT_BYTES = 64 * 1024 * 1024

# GitHub rejects a step summary over 1 MiB; stay clearly below it.
SUMMARY_LIMIT_BYTES = 1000 * 1000
MAX_ANNOTATIONS = 10


# ---------------------------------------------------------------------------------------
# Event payloads


def revisions_from_event(env: Mapping[str, str]) -> tuple[str, str] | Reason:
    """(base, head) SHAs from the GitHub event, or the Reason the event is refused."""
    name = env.get("GITHUB_EVENT_NAME", "").strip()
    path = env.get("GITHUB_EVENT_PATH", "").strip()
    if not name and not path:
        return Reason(
            "no_revisions",
            "no --base/--head given and no GitHub event (GITHUB_EVENT_NAME, GITHUB_EVENT_PATH): "
            "pass --base REV --head REV, or run in a pull_request or merge_group workflow",
        )
    if not name:
        return Reason("bad_event", "GITHUB_EVENT_NAME is empty or unset: cannot tell the event")
    if name not in TRUSTED_EVENTS:
        why = UNTRUSTED_EVENTS.get(name, "only pull_request and merge_group are trusted")
        return Reason(
            "untrusted_event",
            f"event '{printable(name)}' is not trusted: {why}; "
            "trigger the workflow on pull_request or merge_group",
        )
    if not path:
        return Reason("bad_event", f"GITHUB_EVENT_PATH is unset: cannot read the {name} event")
    try:
        # A FIFO without a writer reads empty (then not valid JSON) instead of hanging.
        raw = read_no_wait(path, MAX_EVENT_BYTES + 1)
    except OSError as exc:
        return Reason("bad_event", f"cannot read the event file {path}: {exc.strerror or exc}")
    if len(raw) > MAX_EVENT_BYTES:
        return Reason("bad_event", f"the event file {path} is larger than {MAX_EVENT_BYTES} bytes")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Reason("bad_event", f"the event file {path} is not valid JSON: {exc}")
    shas = []
    for label, keys in zip(("base", "head"), TRUSTED_EVENTS[name], strict=True):
        value: Any = payload
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        dotted = ".".join(keys)
        if value is None or value == "":
            return Reason("bad_event", f"the {name} event has no {dotted} ({label} commit)")
        if not isinstance(value, str) or not SHA_RE.match(value):
            return Reason(
                "bad_event",
                f"the {name} event's {dotted} is {printable(str(value))[:80]!r}, "
                "not a full hexadecimal SHA",
            )
        shas.append(value.lower())
    return shas[0], shas[1]


# ---------------------------------------------------------------------------------------
# Escaping

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


def printable(text: str) -> str:
    """One line: control characters (newlines included) shown as escapes, never emitted."""

    def esc(m: re.Match[str]) -> str:
        ch = m.group(0)
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{ord(ch):02x}")

    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return _CONTROL_RE.sub(esc, text)


# Characters with a meaning in GitHub-flavoured Markdown or HTML: written as numeric entities,
# which render as the literal character in text and in table cells alike.
_MD_SPECIAL = set("\\`*_{}[]<>()#+-!|~&\"'@:")


def md(text: str) -> str:
    """Text safe to place anywhere in a Markdown line (paragraph, list item, table cell)."""
    return "".join(f"&#{ord(c)};" if c in _MD_SPECIAL else c for c in printable(text))


def escape_data(text: str) -> str:
    """Workflow-command data: ``%``, CR and LF escaped as GitHub's runner expects."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Workflow-command property value: data escapes plus ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def output_value(text: str) -> str:
    """A single-line ``GITHUB_OUTPUT`` value (our own values, sanitised all the same)."""
    return re.sub(r"[\r\n\x00]", " ", text)


# ---------------------------------------------------------------------------------------
# Outputs


def write_outputs(verdict: Verdict, path: str) -> None:
    """Append ``verdict``, ``policy-hash`` and ``verification-status`` to GITHUB_OUTPUT."""
    policy_hash = (verdict.policy or {}).get("hash") or ""
    lines = [
        f"verdict={output_value(verdict.verdict)}",
        f"policy-hash={output_value(policy_hash)}",
        f"verification-status={output_value(verdict.status)}",
    ]
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def annotations(verdict: Verdict, limit: int = MAX_ANNOTATIONS) -> list[str]:
    """At most ``limit`` ``::error file=…::`` lines for the paths at fault, deciding ones first."""
    out: list[str] = []
    seen: set[tuple[str, str, int | None]] = set()
    # Each finding's own line (a file can have several tamper findings on different lines).
    lines = {(f.code, f.reason().message): f.line for f in verdict.findings}
    for reason in verdict.reasons:
        if reason.path is None or rule_of(reason.code) >= 4:
            continue
        line = lines.get((reason.code, reason.message))
        key = (reason.path, reason.code, line)
        if key in seen:
            continue
        seen.add(key)
        props = f"file={escape_property(printable(reason.path))}"
        if line is not None:
            props += f",line={int(line)}"
        props += f",title={escape_property('cage: ' + reason.code)}"
        out.append(f"::error {props}::{escape_data(printable(reason.message))}")
        if len(out) >= limit:
            break
    return out


def stop_commands_token() -> str:
    """A fresh token for ``::stop-commands::``: output in between cannot run commands."""
    return secrets.token_hex(16)


def fenced_output(text: str) -> list[str]:
    """Lines that show untrusted output in a log without letting it issue workflow commands."""
    token = stop_commands_token()
    return [f"::stop-commands::{token}", *text.splitlines(), f"::{token}::"]


# ---------------------------------------------------------------------------------------
# Step summary


def _duration(value: Any) -> str:
    return f"{value:.1f}s" if isinstance(value, (int, float)) else "–"


def _tests(counts: Mapping[str, int] | None) -> str:
    if not counts:
        return "no report"
    parts = [f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped")]
    return ", ".join(p for p in parts if not p.startswith("0 ")) or "0 tests"


def _command_row(label: str, result: Mapping[str, Any] | None) -> str:
    if result is None:
        return f"| {md(label)} | – | not run | – | – |"
    code = "timed out" if result.get("timed_out") else str(result.get("exit_code"))
    return (
        f"| {md(label)} | `{md(result.get('command') or '')}` | {md(code)} | "
        f"{_duration(result.get('duration_s'))} | {md(_tests(result.get('tests')))} |"
    )


def summary_lines(verdict: Verdict) -> list[str]:
    """The Markdown step summary, as lines (not yet size-limited)."""
    doc = verdict.to_dict()
    policy = doc.get("policy") or {}
    icon = {"PASS": "✅", "BLOCKED": "⛔", "HUMAN_APPROVAL_REQUIRED": "✋"}.get(doc["verdict"], "")
    lines = [f"## {icon} cage: {doc['verdict']}", ""]
    facts = [f"verification **{doc['verification']['status']}**"]
    if doc.get("base") and doc.get("head"):
        facts.append(f"base `{doc['base'][:12]}` → head `{doc['head'][:12]}`")
    if policy.get("hash"):
        facts.append(f"policy `{md(policy['path'])}` from base, sha256 `{policy['hash'][:16]}…`")
    lines += [" · ".join(facts), "", "### Reasons", ""]
    if not doc["reasons"]:
        lines.append("None: the change fixes what the verify command checks, within scope.")
    by_code: dict[str, list[Mapping[str, Any]]] = {}
    for reason in doc["reasons"]:
        by_code.setdefault(reason["code"], []).append(reason)
    for code, group in by_code.items():
        if len(group) <= 3:
            lines += [f"- `{code}`: {md(r['message'])}" for r in group]
        else:
            lines.append(f"- `{code}` ({len(group)}): {md(group[0]['message'])} …")
    findings: dict[str, list[str]] = {}
    for change in doc["changes"]:
        for f in change["findings"]:
            findings.setdefault(f["code"], []).append(change["path"])
    if findings:
        lines += ["", "### Changed paths by finding", ""]
        for code, paths in findings.items():
            lines += ["<details open>" if len(paths) <= 20 else "<details>"]
            lines += [f"<summary><code>{md(code)}</code> ({len(paths)})</summary>", ""]
            lines += [f"- {md(p)}" for p in paths]
            lines += ["", "</details>", ""]
    clean = [c["path"] for c in doc["changes"] if not c["findings"]]
    if clean:
        lines += ["", f"<details><summary>paths without findings ({len(clean)})</summary>", ""]
        lines += [f"- {md(p)}" for p in clean]
        lines += ["", "</details>"]
    v = doc["verification"]
    lines += ["", "### Verification", ""]
    if not v.get("replayed"):
        lines.append(f"Not replayed: {md(v.get('skipped_reason') or 'see the reasons above')}.")
    else:
        lines += [
            "| run | command | exit | duration | tests |",
            "|---|---|---|---|---|",
        ]
        for side in ("base", "head"):
            data = v.get(side) or {}
            if data.get("setup"):
                lines.append(_command_row(f"setup at {side}", data["setup"]))
            lines.append(_command_row(f"command at {side}", data.get("command")))
        reg = v.get("regression") or {}
        if reg:
            lines.append(_command_row("regression at base", reg.get("base")))
            lines.append(_command_row("regression at head", reg.get("head")))
    lines += spend_summary(doc.get("spend") or {})
    timings = doc.get("timings") or {}
    if "total_s" in timings:
        lines += ["", f"Adjudicated in {timings['total_s']:.1f}s."]
    return lines


def _usd(value: Any) -> str:
    return f"${value:.4f}" if isinstance(value, (int, float)) else "–"


def spend_summary(spend: Mapping[str, Any]) -> list[str]:
    """The "Spend" part of the step summary: attested spend by model, and every statement."""
    status = spend.get("status")
    if status in (None, "not_evaluated"):
        return []
    lines = ["", "### Spend", ""]
    if status == "off":
        return [*lines, "Not evaluated: the policy sets `spend_evidence: off`."]
    if status == "elsewhere":
        return [*lines, "Judged by the separate `cage ci --mode spend` job."]
    limit = spend.get("limit_usd")
    if status == "attested":
        lines.append(
            f"Attested spend **{_usd(spend.get('total_usd'))}** in {spend.get('calls')} call(s)"
            + (f", limit {_usd(limit)}" if limit is not None else "")
            + " (signed by the mission's proxy, bound to this base and change)."
        )
        rows = spend.get("by_model") or []
        if rows:
            lines += ["", "| model | calls | cost |", "|---|---|---|"]
            for row in rows:
                lines.append(
                    f"| {md(str(row.get('model')))} | {row.get('calls', 0)} | "
                    f"{_usd(row.get('cost_usd'))} |"
                )
        truth = spend.get("truth") or {}
        split = ", ".join(
            f"{label} {_usd(v.get('cost_usd'))}" for label, v in truth.items() if v.get("calls")
        )
        if split:
            lines += ["", f"Truth labels: {split}."]
        if spend.get("note"):
            lines += ["", md(str(spend["note"]))]
    else:
        key = "" if spend.get("key_configured") else " No attest key is configured."
        lines.append(f"Unattested: no valid spend statement for this change.{key}")
    statements = spend.get("statements") or []
    if statements:
        lines += ["", "| statement | check | cost |", "|---|---|---|"]
        for row in statements[:20]:
            lines.append(
                f"| {md(str(row.get('source')))} | `{md(str(row.get('check')))}` | "
                f"{_usd(row.get('cost_usd'))} |"
            )
    return lines


def limit_summary(text: str, limit: int = SUMMARY_LIMIT_BYTES) -> str:
    """Cut ``text`` at a line boundary so that it, with a note, fits in ``limit`` bytes."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    note = (
        "\n\n*The summary was cut here to stay under GitHub's 1 MiB limit; "
        "run `cage ci --json` for every detail.*\n"
    )
    room = limit - len(note.encode("utf-8"))
    cut = data.rfind(b"\n", 0, room)
    kept = data[: cut if cut > 0 else 0].decode("utf-8", "ignore")
    # A cut inside an open <details> block would swallow the note: close it.
    if kept.count("<details") > kept.count("</details>"):
        kept += "\n\n</details>"
    return kept + note


def write_summary(verdict: Verdict, path: str) -> None:
    """Append the Markdown step summary, kept under GitHub's size limit."""
    text = limit_summary("\n".join(summary_lines(verdict)) + "\n")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


def publish(verdict: Verdict, env: Mapping[str, str] | None = None) -> list[str]:
    """Write GITHUB_OUTPUT and GITHUB_STEP_SUMMARY when set; returns problems (never raises)."""
    env = os.environ if env is None else env
    problems: list[str] = []
    for var, writer in (("GITHUB_OUTPUT", write_outputs), ("GITHUB_STEP_SUMMARY", write_summary)):
        target = env.get(var)
        if not target:
            continue
        try:
            writer(verdict, target)
        except OSError as exc:
            problems.append(f"cannot write {var} ({target}): {exc.strerror or exc}")
    return problems
