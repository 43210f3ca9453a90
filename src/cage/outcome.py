"""Mission receipts: write, read, list, show; the Verified Outcome Cost.

A receipt is the JSON record of one ``cage mission run`` (schema ``cage.outcome-receipt/v1``,
documented field by field in docs/receipt.md), stored at
``.runcap/outcomes/<id>/receipt.json`` in the working tree. It is written by cage on the
developer's machine; in a pull request it is only a claim (see ``cage.grade``): nothing in
it is trusted by the CI gate.

The Verified Outcome Cost (VOC) answers "what did verified work cost?": the spend of the
missions whose verdict is ``PASS``, next to the total spend of all missions, the share of the
spend that bought nothing verified, and the total spend divided by the number of verified
outcomes (what one verified outcome costs once the failed attempts are paid for too).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cage.errors import ReceiptError

SCHEMA = "cage.outcome-receipt/v1"
OUTCOMES_DIR = ".runcap/outcomes"
RECEIPT_NAME = "receipt.json"
VERDICTS = ("PASS", "BLOCKED", "HUMAN_APPROVAL_REQUIRED")
TRUTH_LABELS = ("measured", "modeled", "estimated")
MAX_RECEIPT_BYTES = 16 * 1024 * 1024

# A mission id names a folder and a git ref: a conservative alphabet, no "..".
MISSION_ID_RE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")


def check_mission_id(mission_id: str) -> str:
    """Return ``mission_id`` when it is a valid id; ReceiptError saying why otherwise."""
    if not MISSION_ID_RE.match(mission_id or "") or ".." in mission_id or mission_id[0] in ".-":
        # Echo a long id in part: a 5000-character id must not flood the terminal.
        shown = repr(mission_id)
        if len(mission_id) > 80:
            shown = f"{mission_id[:40]!r}... ({len(mission_id)} characters)"
        raise ReceiptError(
            f"mission id {shown} is not valid: use 1 to 64 characters from "
            "A-Z a-z 0-9 . _ -, not starting with '.' or '-', without '..'"
        )
    if mission_id.endswith(".lock"):  # git refuses ref names ending in .lock
        raise ReceiptError(f"mission id {mission_id!r} is not valid: it must not end in '.lock'")
    return mission_id


def receipt_path(root: str | os.PathLike[str], mission_id: str) -> Path:
    """Where the receipt of ``mission_id`` lives under the repository ``root``."""
    return Path(root) / OUTCOMES_DIR / check_mission_id(mission_id) / RECEIPT_NAME


# ---------------------------------------------------------------------------------------
# Secrets in the agent's command line (data: each rule with the reason it exists)

REDACTED = "[REDACTED]"

# Option names whose value is a secret: `--api-key X`, `--api-key=X`, `-k X`, `--token X`.
SECRET_OPTION_RE = re.compile(
    r"\A(?:-k|--?(?:[a-z0-9]+[-_])*"
    r"(?:api[-_]?key|key|token|secret|password|passwd|pass|auth|authorization|credentials?|"
    r"bearer|cookie)"
    r")\Z",
    re.IGNORECASE,
)
# NAME=VALUE arguments whose name looks secret (OPENAI_API_KEY=..., db_password=...).
SECRET_NAME_RE = re.compile(
    r"(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|AUTH|COOKIE)\Z", re.IGNORECASE
)
# Secret-shaped values anywhere in an argument (a prompt can contain a key, too).
SECRET_VALUE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "Anthropic / OpenAI keys (sk-ant-..., sk-proj-..., sk-...)",
        re.compile(r"sk-[A-Za-z0-9_\-]{8,}"),
    ),
    ("GitHub tokens", re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,})")),
    ("Slack tokens", re.compile(r"xox[abposr]-[A-Za-z0-9\-]{8,}")),
    ("AWS access key ids", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
    ("Google API keys", re.compile(r"\bAIza[A-Za-z0-9_\-]{30,}")),
    ("bearer tokens", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]{8,}")),
)


def redact_text(text: str) -> str:
    """``text`` with every secret-shaped value replaced by ``[REDACTED]``."""
    for _why, pattern in SECRET_VALUE_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def redact_argv(argv: Sequence[str]) -> list[str]:
    """The agent's command line with secrets replaced by ``[REDACTED]``: values of secret
    options (``--api-key X``, ``--token=X``, ``-k X``), ``NAME=VALUE`` arguments whose name
    looks secret, and secret-shaped values (``sk-...``, ``ghp_...``, ``xox...``, bearer
    tokens) anywhere, prompts included. The program name is kept."""
    out: list[str] = []
    hide_next = False
    for index, arg in enumerate(argv):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if index > 0 and arg.startswith("-"):
            name, eq, _value = arg.partition("=")
            if SECRET_OPTION_RE.match(name):
                if eq:
                    out.append(f"{name}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        if index > 0 and not arg.startswith("-"):
            name, eq, _value = arg.partition("=")
            if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and SECRET_NAME_RE.search(name):
                out.append(f"{name}={REDACTED}")
                continue
        out.append(redact_text(arg))
    return out


# ---------------------------------------------------------------------------------------
# Writing and reading


def write_receipt(path: str | os.PathLike[str], receipt: dict[str, Any]) -> Path:
    """Write ``receipt`` as JSON to ``path`` atomically (temporary file in the same folder,
    fsync, rename): a reader never sees half a receipt, and a crash leaves none."""
    target = Path(path)
    data = (json.dumps(receipt, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".receipt-", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ReceiptError(f"{target}: cannot write the receipt ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk, a directory in the receipt's place...
            raise ReceiptError(
                f"{target}: cannot write the receipt ({exc.strerror or exc})"
            ) from None
        raise
    return target


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ReceiptError(f"{where}: {what}; it is not a valid {SCHEMA} receipt")


def _is_number(value: Any) -> bool:
    # json.loads reads NaN, Infinity and 1e400: one such spend made the VOC NaN/inf and the
    # --json output invalid, so a receipt holding one is malformed.
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and -float("inf") < value < float("inf")
    )


def parse_receipt(data: bytes, where: str) -> dict[str, Any]:
    """Parse and check the bytes of a receipt; ``where`` names it in errors (ReceiptError).

    The checks cover what cage reads back (schema, id, times, verdict, reasons, spend), so a
    receipt that passes can be shown and totalled without a traceback.
    """
    if len(data) > MAX_RECEIPT_BYTES:
        raise ReceiptError(f"{where}: larger than {MAX_RECEIPT_BYTES} bytes; not a receipt")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ReceiptError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise ReceiptError(f"{where}: not valid JSON ({exc})") from None
    _need(isinstance(doc, dict), where, "the document is not a JSON object")
    _need(doc.get("schema") == SCHEMA, where, f"schema is {doc.get('schema')!r}, not {SCHEMA!r}")
    for key in ("id", "started_at"):
        _need(isinstance(doc.get(key), str) and bool(doc[key]), where, f"'{key}' is not a string")
    _need(doc.get("verdict") in VERDICTS, where, f"'verdict' is {doc.get('verdict')!r}")
    reasons = doc.get("reasons")
    _need(isinstance(reasons, list), where, "'reasons' is not a list")
    for i, reason in enumerate(reasons):
        _need(
            isinstance(reason, dict)
            and isinstance(reason.get("code"), str)
            and isinstance(reason.get("message"), str),
            where,
            f"reasons[{i}] is not {{code, message}}",
        )
    spend = doc.get("spend")
    _need(isinstance(spend, dict), where, "'spend' is not an object")
    _need(_is_number(spend.get("total_usd")), where, "'spend.total_usd' is not a number")
    for key in ("calls", "unpriced"):
        _need(
            isinstance(spend.get(key), int) and not isinstance(spend.get(key), bool),
            where,
            f"'spend.{key}' is not a whole number",
        )
    by_model = spend.get("by_model", [])
    _need(isinstance(by_model, list), where, "'spend.by_model' is not a list")
    for i, row in enumerate(by_model):
        _need(
            isinstance(row, dict)
            and isinstance(row.get("model"), str)
            and (row.get("cost_usd") is None or _is_number(row.get("cost_usd"))),
            where,
            f"spend.by_model[{i}] is not {{provider, model, cost_usd, ...}}",
        )
    return doc


def read_receipt(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the receipt at ``path``; ReceiptError naming the file when missing,
    unreadable or malformed."""
    target = Path(path)
    try:
        if target.exists() and not target.is_file() and not target.is_dir():
            # A FIFO would block read_bytes() forever; a receipt is always a regular file.
            raise ReceiptError(f"{target}: not a regular file; a receipt is a JSON file")
        data = target.read_bytes()
    except FileNotFoundError:
        raise ReceiptError(f"{target}: no such receipt") from None
    except OSError as exc:
        raise ReceiptError(f"{target}: cannot read the receipt ({exc.strerror})") from None
    return parse_receipt(data, str(target))


def receipt_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every ``.runcap/outcomes/<id>/receipt.json`` in the working tree under ``root``."""
    folder = Path(root) / OUTCOMES_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*/{RECEIPT_NAME}") if p.is_file())


def load_receipts(root: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """Every receipt in the working tree as (path, receipt), oldest first (by
    ``started_at``, then id). A malformed receipt, or one whose id is not its folder's
    name, raises ReceiptError naming its file."""
    found, problems = scan_receipts(root)
    if problems:
        raise ReceiptError(problems[0])
    return found


def scan_receipts(
    root: str | os.PathLike[str],
) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """Like ``load_receipts``, but a malformed receipt does not hide the others: returns
    (readable receipts oldest first, one message per unreadable receipt naming its file)."""
    found = []
    problems = []
    for path in receipt_files(root):
        try:
            receipt = read_receipt(path)
        except ReceiptError as exc:
            problems.append(exc.message)
            continue
        if receipt["id"] != path.parent.name:
            problems.append(
                f"{path}: the receipt's id {receipt['id']!r} is not its folder's name "
                f"{path.parent.name!r}; it was moved or edited"
            )
            continue
        found.append((path, receipt))
    found.sort(key=lambda item: (item[1]["started_at"], item[1]["id"]))
    return found, problems


def find_receipt(
    root: str | os.PathLike[str], which: str = "latest"
) -> tuple[Path, dict[str, Any]]:
    """(path, receipt) of mission ``which``, or of the most recently started one for
    ``latest``; ReceiptError when there is none."""
    if which == "latest":
        # Unreadable receipts are the caller's to report (scan_receipts): the latest readable
        # one is still shown.
        receipts, _problems = scan_receipts(root)
        if not receipts:
            raise ReceiptError(
                f"no receipts in {Path(root) / OUTCOMES_DIR}: run `cage mission run -- <agent>` "
                "first"
            )
        return receipts[-1]
    path = receipt_path(root, which)
    return path, read_receipt(path)


# ---------------------------------------------------------------------------------------
# Verified Outcome Cost


def verified_outcome_cost(receipts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """VOC over ``receipts``: spend of the verified (``PASS``) outcomes, total spend, the share
    of spend that bought nothing verified, and the total spend per verified outcome.

    Unpriced calls have no dollar amount and are counted, never treated as free.
    """
    total = verified = 0.0
    outcomes = verified_count = unpriced = 0
    by_verdict = dict.fromkeys(VERDICTS, 0)
    for receipt in receipts:
        spend = float(receipt["spend"]["total_usd"])
        outcomes += 1
        total += spend
        unpriced += int(receipt["spend"].get("unpriced") or 0)
        by_verdict[receipt["verdict"]] = by_verdict.get(receipt["verdict"], 0) + 1
        if receipt["verdict"] == "PASS":
            verified += spend
            verified_count += 1
    return {
        "outcomes": outcomes,
        "verified_outcomes": verified_count,
        "by_verdict": by_verdict,
        "total_spend_usd": round(total, 9),
        "verified_spend_usd": round(verified, 9),
        "unverified_spend_usd": round(total - verified, 9),
        "unverified_share": None if total <= 0 else round((total - verified) / total, 6),
        "cost_per_verified_outcome_usd": (
            None if verified_count == 0 else round(total / verified_count, 9)
        ),
        "unpriced_calls": unpriced,
    }


# ---------------------------------------------------------------------------------------
# Text output


def money(value: float | None) -> str:
    """Dollars with 4 decimals (LLM calls are cheap), or 'n/a'."""
    return "n/a" if value is None else f"${value:.4f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _clean(text: Any) -> str:
    # Receipts can come from anywhere: never print control characters to a terminal.
    return re.sub(r"[\x00-\x1f\x7f\u0085\u2028\u2029]", "?", str(text))


def voc_lines(voc: dict[str, Any]) -> list[str]:
    """The Verified Outcome Cost in a few lines of text."""
    rows = [
        ("verified spend", money(voc["verified_spend_usd"])),
        ("total spend", money(voc["total_spend_usd"])),
        (
            "bought nothing",
            f"{money(voc['unverified_spend_usd'])} "
            f"({_share(voc['unverified_share'])} of the spend)",
        ),
        ("per verified outcome", money(voc["cost_per_verified_outcome_usd"])),
    ]
    lines = [
        f"Verified Outcome Cost over {voc['outcomes']} mission(s), "
        f"{voc['verified_outcomes']} verified (PASS):",
        *(f"  {label:<22}{value}" for label, value in rows),
    ]
    if voc["unpriced_calls"]:
        lines.append(f"  {voc['unpriced_calls']} unpriced call(s) not in the dollar figures")
    return lines


def statement_line(statement: Any) -> str:
    """Whether CI can count this receipt's spend: signed (and with which key) or not.

    Only shape is shown here; CI verifies the signature with its own key (cage.attest)."""
    if not isinstance(statement, dict):
        return (
            "spend statement: none (no attest key: CI will show this spend as unattested; "
            "see docs/missions.md)"
        )
    return (
        f"spend statement: signed {_clean(statement.get('alg'))}, "
        f"key id {_clean(statement.get('key_id'))} (CI verifies it with its key)"
    )


def show_lines(receipt: dict[str, Any], voc: dict[str, Any] | None = None) -> list[str]:
    """A receipt for people: verdict and reasons first, then spend by model, verification."""
    spend = receipt["spend"]
    agent = receipt.get("agent") or {}
    lines = [f"mission {_clean(receipt['id'])}: {receipt['verdict']}"]
    for reason in receipt["reasons"]:
        lines.append(f"  - {_clean(reason['code'])}: {_clean(reason['message'])}")
    started = _clean(receipt.get("started_at"))
    runtime = receipt.get("runtime_s")
    lines.append(
        f"started {started}"
        + (f", ran {runtime:.1f}s" if _is_number(runtime) else "")
        + (f", agent exit {agent.get('exit_code')}" if "exit_code" in agent else "")
        + (f", stopped by {_clean(agent['stopped_by'])}" if agent.get("stopped_by") else "")
    )
    if agent.get("argv"):
        lines.append("agent: " + _clean(" ".join(str(a) for a in agent["argv"])))
    cap = spend.get("cap_usd")
    lines.append(
        f"spend: {money(spend['total_usd'])} in {spend['calls']} call(s)"
        + (f" of a {money(cap)} cap" if _is_number(cap) else "")
        + (f", budget {_clean(spend['budget_status'])}" if spend.get("budget_status") else "")
        + (f", {spend['unpriced']} unpriced" if spend["unpriced"] else "")
    )
    for row in spend.get("by_model") or []:
        truth = row.get("truth") or {}
        labels = ", ".join(f"{truth[k]} {k}" for k in TRUTH_LABELS if truth.get(k))
        cost = row.get("cost_usd")
        lines.append(
            f"  {_clean(row.get('provider', '?'))}/{_clean(row['model'])}: "
            f"{money(cost if _is_number(cost) else None)}, {row.get('calls', 0)} call(s)"
            + (f" ({labels})" if labels else "")
            + (f", {row['unpriced']} unpriced" if row.get("unpriced") else "")
        )
    lines.append(statement_line(receipt.get("spend_statement")))
    verification = receipt.get("verification") or {}
    status = verification.get("status")
    if status:
        detail = ""
        if verification.get("skipped_reason"):
            detail = f" (not replayed: {_clean(verification['skipped_reason'])})"
        lines.append(f"verification: {_clean(status)}{detail}")
    policy = receipt.get("policy") or {}
    if policy.get("hash"):
        lines.append(
            f"policy: {_clean(policy.get('path'))} ({_clean(policy.get('source'))}), "
            f"sha256 {_clean(policy['hash'])}"
        )
    snapshot = receipt.get("snapshot") or {}
    if receipt.get("base") and snapshot.get("commit"):
        lines.append(f"base {_clean(receipt['base'])}  snapshot {_clean(snapshot['commit'])}")
    verified = receipt["verdict"] == "PASS"
    lines.append(
        f"this outcome: {money(spend['total_usd'])} "
        + ("bought a verified outcome" if verified else "bought nothing verified")
    )
    if voc is not None:
        lines += voc_lines(voc)
    return lines


def list_lines(receipts: Sequence[dict[str, Any]], voc: dict[str, Any]) -> list[str]:
    """One line per receipt, then the VOC totals."""
    if not receipts:
        return ["no mission receipts yet: run `cage mission run -- <agent command>`"]
    lines = []
    for r in receipts:
        lines.append(
            f"{_clean(r['id'])}  {_clean(r['started_at'])}  {r['verdict']:<23}  "
            f"{money(float(r['spend']['total_usd']))}  {r['spend']['calls']} call(s)"
            + (
                f"  {_clean(r['reasons'][0]['code'])}"
                if r["reasons"] and r["verdict"] != "PASS"
                else ""
            )
        )
    return [*lines, "", *voc_lines(voc)]
