"""Signed spend statements: the proxy attests a mission's spend, CI verifies it.

A receipt committed in a pull request is written where the agent works, so it proves
nothing. The metering proxy, which holds a key the agent never sees, signs a *spend
statement*: the spend it metered for one mission, bound to the mission's base commit and to
the change the mission produced. CI verifies the signature with the same key (a CI secret)
and checks the binding against the commits it adjudicates. See docs/trust-model.md, "The
spend trust chain".

A statement is JSON::

    {"payload": {"schema": "cage.spend-statement/v1", "mission_id": ..., "base": <sha>,
                 "tree": <change digest>, "totals": {...}, "by_model": [...],
                 "truth": {...}, "cap_usd": ..., "prior_cost_usd": ..., "issued_at": ...},
     "alg": "HMAC-SHA256", "key_id": <first 8 hex of sha256(key)>,
     "signature": <hex HMAC-SHA256 of the canonical payload>}

The canonical payload is ``json.dumps(payload, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)`` in UTF-8: the JSON a receipt carries can be re-indented
or re-ordered without breaking the signature, and any edit to a value does break it.

The change digest (:func:`change_digest`) is a SHA-256 over every entry of the commit's tree
except those under ``.runcap/outcomes/``: the mission signs the digest of its snapshot, CI
computes it for head, and the two are equal exactly when head holds what the mission
produced (receipts added afterwards do not count).

This module is pure apart from :func:`change_digest` (one ``git ls-tree``) and
:func:`load_key` (one file or environment read).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cage.errors import UsageError
from cage.fileio import read_no_wait

SCHEMA = "cage.spend-statement/v1"
ALG = "HMAC-SHA256"
KEY_ENV = "CAGE_ATTEST_KEY"
MIN_KEY_BYTES = 16
OUTCOMES_PREFIX = ".runcap/outcomes/"
DIGEST_VERSION = b"cage.change-digest/v1\0"
TRUTH_LABELS = ("measured", "modeled", "estimated")
TOTAL_KEYS = (
    "cost_usd",
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "unpriced",
)
# Receipts and evidence files are hostile input: bounded before they are parsed.
MAX_EVIDENCE_BYTES = 1024 * 1024
MAX_STATEMENTS = 100
# Spend judged by another job (`cage ci --mode spend`), not by the one that replays.
ELSEWHERE = "elsewhere"

_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEX8 = re.compile(r"\A[0-9a-f]{8}\Z")
_SHA = re.compile(r"\A(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")

# Every way a statement can fail, in the order verify() checks them: code -> what it means.
# The code is reported as the failed check of a `spend_evidence_invalid` reason.
CHECKS: dict[str, str] = {
    "unreadable": "the evidence cannot be read or is not JSON",
    "unsigned": "the receipt carries no signed spend statement: its spend is a claim",
    "malformed": "the statement does not have the shape of a cage.spend-statement/v1",
    "unsupported_schema": "the statement's schema or algorithm is not one this cage knows",
    "no_key_configured": "no attest key is configured here (CAGE_ATTEST_KEY), so nothing verifies",
    "wrong_key": "the statement was signed with another key (its key_id differs)",
    "bad_signature": "the signature does not match the payload: the statement was edited",
    "wrong_base": "the statement is bound to another base commit",
    "wrong_change": "the statement is bound to another change (head differs from the mission's)",
    "duplicate": "the same statement appears twice; it is counted once",
}


# ---------------------------------------------------------------------------------------
# Keys


def key_id(key: bytes) -> str:
    """First 8 hex digits of SHA-256(key): tells "another key" from "edited", reveals nothing."""
    return hashlib.sha256(key).hexdigest()[:8]


def check_key(key: bytes, where: str) -> bytes:
    """``key`` when it is long enough; UsageError naming ``where`` (never the key) if not."""
    if len(key) < MIN_KEY_BYTES:
        # Never echo the key, not even in part: only its length.
        raise UsageError(
            f"the attest key from {where} is {len(key)} bytes; it must be at least "
            f"{MIN_KEY_BYTES} random bytes. Make one with "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return key


def load_key(
    key_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> bytes | None:
    """The attest key from ``key_file``, else from ``$CAGE_ATTEST_KEY``; None when neither.

    Surrounding whitespace is dropped on both paths, so a key file written with ``echo`` and
    the same key in a CI secret agree. An empty variable means "no key" (the GitHub Action
    passes an empty string when its ``attest-key`` input is not set). A key shorter than
    MIN_KEY_BYTES is a UsageError; the message never contains the key.
    """
    if key_file is not None:
        try:
            raw = read_no_wait(key_file, 64 * 1024)
        except OSError as exc:
            raise UsageError(
                f"cannot read the attest key file {os.fspath(key_file)}: "
                f"{exc.strerror or exc}; check --attest-key-file"
            ) from exc
        key = raw.strip()
        if not key:
            raise UsageError(
                f"the attest key file {os.fspath(key_file)} is empty; put a random key in it"
            )
        return check_key(key, f"the file {os.fspath(key_file)}")
    env = os.environ if env is None else env
    value = env.get(KEY_ENV, "").strip()
    if not value:
        return None
    return check_key(value.encode("utf-8", "surrogateescape"), f"${KEY_ENV}")


# ---------------------------------------------------------------------------------------
# The change binding


def digest_entries(entries: Iterable[Any]) -> str:
    """SHA-256 (hex) over tree entries (``mode``, ``type``, ``sha``, ``path``), receipts out.

    Entries under ``.runcap/outcomes/`` are skipped: receipts are written after the mission's
    snapshot and committed with (or after) the change. Sorted by the path's bytes, so the
    order git lists them in does not matter.
    """
    rows = []
    for e in entries:
        if e.path.startswith(OUTCOMES_PREFIX):
            continue
        path = e.path.encode("utf-8", "surrogateescape")
        rows.append((path, f"{e.mode} {e.type} {e.sha}\t".encode("ascii") + path + b"\0"))
    h = hashlib.sha256(DIGEST_VERSION)
    for _, row in sorted(rows):
        h.update(row)
    return h.hexdigest()


def change_digest(repo: Any, commit: str) -> str:
    """The change digest of ``commit`` in ``repo`` (a ``gitio.Repo``): one ``git ls-tree``."""
    return digest_entries(repo.list_tree(commit))


# ---------------------------------------------------------------------------------------
# Signing


def canonical(payload: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _mac(payload: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical(payload), hashlib.sha256).hexdigest()


def utc_now() -> str:
    """The current time as ISO 8601 UTC with a Z, to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: Any) -> float:
    return round(float(value or 0.0), 10)


def statement_payload(
    *,
    mission_id: str,
    base: str,
    tree: str,
    spend: Mapping[str, Any],
    cap_usd: float | None,
    issued_at: str | None = None,
) -> dict[str, Any]:
    """The payload for a mission's spend, from the proxy's spend snapshot.

    ``spend`` has the shape of ``RunningProxy.spend()``: ``by_model`` maps model names to
    ``{provider, calls, *_tokens, cost_usd, unpriced}``, ``truth`` maps labels to
    ``{calls, cost_usd}``, ``prior_cost_usd`` is the mission's spend from earlier runs that
    the proxy found in the ledger and counted against the cap (it did not meter it itself).
    """
    by_model = []
    totals: dict[str, Any] = dict.fromkeys(TOTAL_KEYS, 0)
    totals["cost_usd"] = 0.0
    for model, row in sorted((spend.get("by_model") or {}).items()):
        item = {
            "model": str(model),
            "provider": row.get("provider"),
            "calls": int(row.get("calls") or 0),
            "input_tokens": int(row.get("input_tokens") or 0),
            "output_tokens": int(row.get("output_tokens") or 0),
            "cache_read_tokens": int(row.get("cache_read_tokens") or 0),
            "cache_write_tokens": int(row.get("cache_write_tokens") or 0),
            "cost_usd": _number(row.get("cost_usd")),
            "unpriced": int(row.get("unpriced") or 0),
        }
        by_model.append(item)
        for key in TOTAL_KEYS:
            totals[key] += item[key]
    totals["cost_usd"] = _number(totals["cost_usd"])
    truth_in = spend.get("truth") or {}
    truth = {
        label: {
            "calls": int((truth_in.get(label) or {}).get("calls") or 0),
            "cost_usd": _number((truth_in.get(label) or {}).get("cost_usd")),
        }
        for label in TRUTH_LABELS
    }
    return {
        "schema": SCHEMA,
        "mission_id": str(mission_id),
        "base": base,
        "tree": tree,
        "totals": totals,
        "by_model": by_model,
        "truth": truth,
        "cap_usd": None if cap_usd is None else float(cap_usd),
        "prior_cost_usd": _number(spend.get("prior_cost_usd")),
        "issued_at": issued_at or utc_now(),
    }


def sign(payload: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """The signed statement for ``payload`` (which must be JSON without NaN)."""
    check_key(key, "the caller")
    payload = json.loads(canonical(payload))  # a private copy, exactly as it is signed
    return {"payload": payload, "alg": ALG, "key_id": key_id(key), "signature": _mac(payload, key)}


# ---------------------------------------------------------------------------------------
# Verifying


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_amount(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def payload_problem(payload: Any) -> str | None:
    """What is wrong with the shape of a payload, or None (checked after the signature too:
    a payload this cage signed always passes, so a failure here is another signer's bug)."""
    if not isinstance(payload, dict):
        return "payload is not an object"
    for key in ("mission_id", "base", "tree", "issued_at"):
        if not isinstance(payload.get(key), str):
            return f"payload.{key} is not a string"
    if not _SHA.match(payload["base"]):
        return "payload.base is not a full lowercase SHA"
    if not _HEX64.match(payload["tree"]):
        return "payload.tree is not a SHA-256 digest"
    totals = payload.get("totals")
    if not isinstance(totals, dict):
        return "payload.totals is not an object"
    for key in TOTAL_KEYS:
        ok = _is_amount(totals.get(key)) if key == "cost_usd" else _is_count(totals.get(key))
        if not ok:
            return f"payload.totals.{key} is missing or not a non-negative number"
    if not isinstance(payload.get("by_model"), list) or not isinstance(payload.get("truth"), dict):
        return "payload.by_model or payload.truth has the wrong type"
    cap = payload.get("cap_usd")
    if cap is not None and not _is_amount(cap):
        return "payload.cap_usd is not a number"
    if not _is_amount(payload.get("prior_cost_usd", 0.0)):
        return "payload.prior_cost_usd is not a non-negative number"
    return None


def verify(
    statement: Any, key: bytes | None, *, base: str, digest: str | Callable[[], str]
) -> tuple[bool, str]:
    """Check a statement: ``(True, "ok")`` or ``(False, <code from CHECKS>)``.

    Checks, in order: shape (``malformed``, ``unsigned``), ``unsupported_schema``,
    ``no_key_configured``, ``wrong_key``, ``bad_signature``, ``wrong_base``, ``wrong_change``.
    ``digest`` may be a callable, called only when every earlier check passed (it costs a
    ``git ls-tree``).
    """
    if not isinstance(statement, dict):
        return False, "unsigned" if statement is None else "malformed"
    payload = statement.get("payload")
    signature = statement.get("signature")
    if not isinstance(payload, dict):
        return False, "malformed"
    if signature is None or signature == "":
        return False, "unsigned"
    if not isinstance(signature, str) or not _HEX64.match(signature):
        return False, "malformed"
    if payload.get("schema") != SCHEMA or statement.get("alg") != ALG:
        return False, "unsupported_schema"
    if key is None:
        return False, "no_key_configured"
    claimed_id = statement.get("key_id")
    if not isinstance(claimed_id, str) or not _HEX8.match(claimed_id):
        return False, "malformed"
    if not hmac.compare_digest(claimed_id, key_id(key)):
        return False, "wrong_key"
    try:
        expected = _mac(payload, key)
    except (TypeError, ValueError):  # NaN, or a value JSON cannot hold
        return False, "malformed"
    if not hmac.compare_digest(expected, signature):
        return False, "bad_signature"
    if payload_problem(payload) is not None:
        return False, "malformed"
    if not hmac.compare_digest(payload["base"], base):
        return False, "wrong_base"
    want = digest() if callable(digest) else digest
    if not hmac.compare_digest(payload["tree"], want):
        return False, "wrong_change"
    return True, "ok"


# ---------------------------------------------------------------------------------------
# Evidence: where statements come from, and what CI makes of them


@dataclass(frozen=True)
class Evidence:
    """One statement to judge: where it came from and what was found there."""

    source: str  # a receipt path at head, or the --spend-evidence file (with [i] for lists)
    statement: Any  # the parsed statement (None: the receipt has none)
    problem: str | None = None  # why the source could not be read (-> "unreadable")
    in_repo: bool = False  # a path in the repository (a receipt), named in the reason


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in spend evidence")


def parse_json(data: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded size. ValueError with a reason."""
    if len(data) > MAX_EVIDENCE_BYTES:
        raise ValueError(f"larger than {MAX_EVIDENCE_BYTES} bytes")
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


def evidence_from_receipt(path: str, data: bytes) -> Evidence:
    """The statement a receipt carries under ``spend_statement`` (None when it has none)."""
    try:
        doc = parse_json(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return Evidence(path, None, f"not valid JSON ({exc})", in_repo=True)
    if not isinstance(doc, dict):
        return Evidence(path, None, "the receipt is not a JSON object", in_repo=True)
    return Evidence(path, doc.get("spend_statement"), in_repo=True)


def evidence_from_file(path: str, data: bytes | None, error: str | None = None) -> list[Evidence]:
    """Statements in a ``--spend-evidence`` file: a statement, a receipt, or a list of either."""
    if data is None:
        return [Evidence(path, None, error or "cannot read the file")]
    try:
        doc = parse_json(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return [Evidence(path, None, f"not valid JSON ({exc})")]
    items = doc if isinstance(doc, list) else [doc]
    out = []
    for i, item in enumerate(items[:MAX_STATEMENTS]):
        source = f"{path}[{i}]" if isinstance(doc, list) else path
        if isinstance(item, dict) and "payload" not in item and "spend_statement" in item:
            item = item["spend_statement"]  # a receipt given as a file
        out.append(Evidence(source, item))
    return out


@dataclass
class Assessment:
    """What the spend evidence adds to a verdict."""

    spend: dict[str, Any]  # the verdict's `spend` section
    reasons: list[tuple[str, str, str | None]]  # (code, message, path) for the verdict


def _detail(item: Evidence, check: str, payload: Any) -> str:
    if check == "unreadable":
        return item.problem or CHECKS[check]
    if check == "wrong_base" and isinstance(payload, dict) and isinstance(payload.get("base"), str):
        return f"{CHECKS[check]} ({payload['base'][:12]})"
    return CHECKS[check]


def assess(
    evidence: Iterable[Evidence],
    key: bytes | None,
    *,
    mode: str,
    base: str,
    digest: Callable[[], str],
    limit_usd: float | None,
    evidence_path: str | None = None,
) -> Assessment:
    """Judge every statement and sum the valid ones against ``limit_usd``.

    ``mode`` is the policy's ``spend_evidence``: ``off`` ignores statements entirely,
    ``optional`` counts valid ones, ``required`` needs at least one (else
    ``spend_unattested``); ``elsewhere`` (``cage ci --spend-elsewhere``) leaves spend to a
    separate ``--mode spend`` job. Each invalid statement gives an informational
    ``spend_evidence_invalid`` naming its source and the failed check. Several valid
    statements (several missions that produced this same change) are summed; the same
    statement twice counts once. The digest is computed at most once, and only when some
    statement gets that far.
    """
    section: dict[str, Any] = {
        "status": "off" if mode == "off" else "unattested",
        "policy": mode,
        "evidence_path": evidence_path,
        "key_configured": key is not None,
        "key_id": key_id(key) if key is not None else None,
        "limit_usd": limit_usd,
        "total_usd": None,
        "cost_usd": None,
        "calls": None,
        "unpriced": None,
        "by_model": [],
        "truth": None,
        "statements": [],
    }
    reasons: list[tuple[str, str, str | None]] = []
    if mode == "off":
        section["note"] = "spend_evidence: off: spend statements are not read"
        return Assessment(section, reasons)
    if mode == ELSEWHERE:
        section["status"] = ELSEWHERE
        section["note"] = "spend is judged by a separate `cage ci --mode spend` job"
        return Assessment(section, reasons)

    cache: dict[str, str] = {}

    def lazy_digest() -> str:
        if "d" not in cache:
            cache["d"] = digest()
        return cache["d"]

    seen: set[str] = set()
    valid: list[dict[str, Any]] = []
    items = list(evidence)
    for item in items[:MAX_STATEMENTS]:
        statement = item.statement
        payload = statement.get("payload") if isinstance(statement, dict) else None
        if item.problem is not None:
            ok, check = False, "unreadable"
        else:
            ok, check = verify(statement, key, base=base, digest=lazy_digest)
        if ok and statement["signature"] in seen:
            ok, check = False, "duplicate"
        row: dict[str, Any] = {"source": item.source, "valid": ok, "check": check}
        if ok:
            seen.add(statement["signature"])
            valid.append(payload)
            row.update(
                mission_id=payload["mission_id"],
                cost_usd=payload["totals"]["cost_usd"],
                prior_cost_usd=payload.get("prior_cost_usd", 0.0),
                calls=payload["totals"]["calls"],
                unpriced=payload["totals"]["unpriced"],
                cap_usd=payload.get("cap_usd"),
                issued_at=payload["issued_at"],
            )
        elif check != "duplicate":
            reasons.append(
                (
                    "spend_evidence_invalid",
                    f"spend statement in {item.source} ignored: {check}: "
                    f"{_detail(item, check, payload)}",
                    item.source if item.in_repo else None,
                )
            )
        section["statements"].append(row)
    if len(items) > MAX_STATEMENTS:
        section["note"] = f"only the first {MAX_STATEMENTS} of {len(items)} statements were read"

    if valid:
        section.update(_sum(valid))
        section["status"] = "attested"
        total = section["total_usd"]
        if limit_usd is not None and total > limit_usd + 1e-9:
            reasons.append(
                (
                    "spend_over_limit",
                    f"attested spend ${total:.4f} is over budget.mission_hard_limit_usd "
                    f"${limit_usd:g} ({len(valid)} statement(s))",
                    None,
                )
            )
    elif mode == "required":
        why = "no spend statement was found"
        if items:
            why = "none of the spend statements verified"
        if key is None:
            why += f" and no attest key is configured (${KEY_ENV})"
        reasons.append(
            (
                "spend_unattested",
                f"spend_evidence: required, and {why}: spend for this change is unproven",
                None,
            )
        )
    return Assessment(section, reasons)


def gather(
    repo: Any,
    changes: Iterable[Any],
    evidence_path: str | None = None,
    statements: Iterable[Any] = (),
) -> list[Evidence]:
    """Spend evidence for base..head: receipts the change adds or modifies, read from git
    objects (never the working tree), then the ``--spend-evidence`` file, then ``statements``
    handed over in memory (``cage mission run`` passes the one it just signed).

    Receipts already at base are left out: they belong to earlier changes, so they could
    never be bound to this one, and listing them would flag every later pull request.
    """
    from cage import pathrules

    receipts = sorted(
        (c.path, c.new_sha)
        for c in changes
        if c.status in ("A", "M")
        and c.new_mode in ("100644", "100755")
        and pathrules.is_receipt_path(c.path)
    )[:MAX_STATEMENTS]
    blobs = repo.read_blobs([sha for _, sha in receipts]) if receipts else {}
    out = [evidence_from_receipt(path, blobs[sha]) for path, sha in receipts]
    if evidence_path is not None:
        data: bytes | None = None
        error = None
        try:
            data = read_no_wait(evidence_path, MAX_EVIDENCE_BYTES + 1)
        except OSError as exc:
            error = f"cannot read --spend-evidence {evidence_path}: {exc.strerror or exc}"
        out.extend(evidence_from_file(evidence_path, data, error))
    out.extend(Evidence(f"statement {i + 1} of the mission", s) for i, s in enumerate(statements))
    return out


def assess_change(
    repo: Any,
    *,
    base: str,
    head: str,
    changes: Iterable[Any],
    mode: str,
    limit_usd: float | None,
    key: bytes | None,
    evidence_path: str | None = None,
    statements: Iterable[Any] = (),
) -> Assessment:
    """:func:`gather` + :func:`assess` for base..head of ``repo`` (a ``gitio.Repo``)."""
    evidence = (
        [] if mode in ("off", ELSEWHERE) else gather(repo, changes, evidence_path, statements)
    )
    return assess(
        evidence,
        key,
        mode=mode,
        base=base,
        digest=lambda: change_digest(repo, head),
        limit_usd=limit_usd,
        evidence_path=evidence_path,
    )


SPEND_ONLY_NOTE = (
    "spend only (`cage ci --mode spend`): no code of the change ran in this job; "
    "the verify command is replayed by the adjudicate job"
)


def spend_only_verdict(
    repo_path: str | os.PathLike[str],
    base_rev: str,
    head_rev: str,
    *,
    key: bytes | None,
    evidence_path: str | None = None,
) -> Any:
    """The spend part of the gate alone, as a ``cage.adjudicate.Verdict``: resolve, read the
    policy at base, list the change, judge its spend statements. No worktree, no replay: no
    code of the change runs, so the attest key is never exposed to it (see
    docs/trust-model.md). BLOCKED for bad input and ``spend_over_limit``,
    HUMAN_APPROVAL_REQUIRED for ``spend_unattested``, else PASS.
    """
    from cage import adjudicate as adj
    from cage import gitio
    from cage import policy as policy_mod
    from cage.errors import GitError, PolicyError

    for label, rev in (("base", base_rev), ("head", head_rev)):
        if not rev or rev.startswith("-"):
            return adj.blocked("bad_revision", f"the {label} revision {rev!r} is refused")
    try:
        repo = gitio.Repo(repo_path)
    except GitError as exc:
        return adj.blocked("not_a_repository", f"{repo_path}: not a git repository ({exc})")
    try:
        base, head = repo.resolve_commit(base_rev), repo.resolve_commit(head_rev)
    except GitError as exc:
        return adj.blocked(
            "unresolvable_revision",
            f"{exc}; fetch both commits (actions/checkout with fetch-depth: 0)",
        )
    path = policy_mod.POLICY_PATH
    data = repo.read_file_at(base, path)
    if data is None:
        return adj.blocked(
            "policy_missing",
            f"{path} is not a regular file at the base commit {base[:12]}",
            base=base,
            head=head,
        )
    info = {"path": path, "hash": policy_mod.hash_policy(data), "source": "base"}
    try:
        policy = policy_mod.load_policy(data, f"{path}@{base[:12]}")
    except PolicyError as exc:
        verdict = adj.Verdict(
            adj.BLOCKED,
            [adj.Reason("policy_invalid", line, path) for line in exc.problems],
            base=base,
            head=head,
            policy=info,
        )
        verdict.verdict, verdict.reasons = adj.decide(verdict.reasons)
        return verdict
    changes = repo.diff(base, head)
    if not changes:
        return adj.blocked(
            "empty_change",
            f"base {base[:12]} and head {head[:12]} have the same content",
            base=base,
            head=head,
            policy=info,
        )
    assessment = assess_change(
        repo,
        base=base,
        head=head,
        changes=changes,
        mode=policy.spend_evidence,
        limit_usd=policy.budget.mission_hard_limit_usd,
        key=key,
        evidence_path=evidence_path,
    )
    reasons = [adj.Reason(code, message, where) for code, message, where in assessment.reasons]
    name, ordered = adj.decide(reasons)
    return adj.Verdict(
        name,
        ordered,
        base=base,
        head=head,
        policy=info,
        changes=changes,
        verification={"replayed": False, "skipped_reason": SPEND_ONLY_NOTE},
        spend=assessment.spend,
    )


def _sum(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over valid payloads: by model, by truth label, and the dollar total."""
    by_model: dict[str, dict[str, Any]] = {}
    truth = {label: {"calls": 0, "cost_usd": 0.0} for label in TRUTH_LABELS}
    cost = prior = 0.0
    calls = unpriced = 0
    for p in payloads:
        cost += p["totals"]["cost_usd"]
        prior += p.get("prior_cost_usd", 0.0)
        calls += p["totals"]["calls"]
        unpriced += p["totals"]["unpriced"]
        for row in p["by_model"]:
            if not isinstance(row, dict) or not isinstance(row.get("model"), str):
                continue
            into = by_model.setdefault(row["model"], {"model": row["model"], "calls": 0})
            for key in ("calls", "input_tokens", "output_tokens", "cost_usd", "unpriced"):
                if _is_amount(row.get(key)):
                    into[key] = into.get(key, 0) + row[key]
            into["provider"] = row.get("provider")
        for label in TRUTH_LABELS:
            got = p["truth"].get(label)
            if isinstance(got, dict):
                if _is_count(got.get("calls")):
                    truth[label]["calls"] += got["calls"]
                if _is_amount(got.get("cost_usd")):
                    truth[label]["cost_usd"] += got["cost_usd"]
    for row in by_model.values():
        if "cost_usd" in row:
            row["cost_usd"] = round(row["cost_usd"], 10)
    for label in TRUTH_LABELS:
        truth[label]["cost_usd"] = round(truth[label]["cost_usd"], 10)
    out = {
        "cost_usd": round(cost, 10),
        "prior_cost_usd": round(prior, 10),
        # What counts against the limit: metered spend plus earlier runs' spend the proxy
        # carried into the cap (conservative: it can only raise the total).
        "total_usd": round(cost + prior, 10),
        "calls": calls,
        "unpriced": unpriced,
        "by_model": [by_model[m] for m in sorted(by_model)],
        "truth": truth,
    }
    if unpriced:
        out["note"] = f"{unpriced} call(s) unpriced: total_usd is a lower bound"
    return out
