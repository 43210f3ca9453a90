"""Claude Code transcripts (``projects/**/*.jsonl``) -> ledger events.

One event per API response. An assistant line carries ``message.usage``; the same response
is often written several times (one line per content block, and again in subagent or
resumed-session files), so copies are merged on ``message.id`` + ``requestId``:

- within a run, among copies seen close together, the best copy is kept: a non-sidechain
  copy over a sidechain copy, then the largest token total, then one that names ``speed``
  (ccusage's order, so our per-model totals match it);
- across files and across runs the ledger's unique request id keeps the first copy
  stored; subagent files are read after the main session files so the main copy is
  normally the first. The id is ``anthropic:<requestId>``, the canonical id of an Anthropic
  call (``cage proxy`` records the same call under the same id, from the same
  ``request-id`` header), or ``claude-code:<message.id>:-`` for a line without a
  ``requestId``.

A line without ``message.id`` cannot be matched with its copies; it gets the stable id
``claude-code:line:<uuid>`` (the line's own ``uuid``), or a hash of the line's bytes when it
has none, so importing the same file again adds nothing.

Counts only: model, token counts, ids, session, project folder, version, sidechain flag and
speed. Never message content.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from cage.importers.common import (
    ISO_Z_VALID,
    MAX_TOKENS,
    BadLine,
    ImportReport,
    iter_files,
    load_object,
    normalise_timestamp,
    parse_lines,
    token_count,
)

SOURCE = "claude-code"
PROVIDER = "anthropic"
SYNTHETIC_MODEL = "<synthetic>"
# Lines without this byte string carry no usage and are not parsed (most of a transcript).
_USAGE_MARKER = b'"usage"'


def default_roots(env: dict[str, str] | None = None) -> list[Path]:
    """The ``projects`` folders Claude Code writes to, in the order they are searched.

    ``$CLAUDE_CONFIG_DIR`` (comma-separated; each entry holds ``projects/`` or is it) when set,
    else ``$XDG_CONFIG_HOME/claude`` (default ``~/.config/claude``) and ``~/.claude``.
    Folders that do not exist are left out; duplicates are removed.
    """
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home())
    configured = (env.get("CLAUDE_CONFIG_DIR") or "").strip()
    if configured:
        bases = [Path(p.strip()).expanduser() for p in configured.split(",") if p.strip()]
    else:
        xdg = (env.get("XDG_CONFIG_HOME") or "").strip()
        bases = [Path(xdg) / "claude" if xdg else home / ".config" / "claude", home / ".claude"]
    roots: list[Path] = []
    seen: set[str] = set()
    for base in bases:
        candidate = base if base.name == "projects" and base.is_dir() else base / "projects"
        if not candidate.is_dir():
            continue
        key = os.path.realpath(candidate)
        if key not in seen:
            seen.add(key)
            roots.append(candidate)
    return roots


def find_files(root: Path, report: ImportReport) -> list[Path]:
    """Every ``*.jsonl`` under ``root``, main session files before subagent files.

    A config folder (one holding ``projects/``, like ``~/.claude``) means its ``projects/``.

    Reading subagent (sidechain) files last means the ledger, which keeps the first copy of
    a response, normally keeps the main session's copy.
    """
    if (root / "projects").is_dir():
        root = root / "projects"  # a config folder given: only its transcripts
    files = iter_files(root, "*.jsonl", report)
    return sorted(files, key=lambda p: ("subagents" in p.parts, str(p)))


def project_of(path: Path) -> str | None:
    """The project folder: the first folder under ``projects/`` (None when not under one)."""
    parts = path.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "projects":
            return parts[i + 1] if i + 1 < len(parts) - 1 else None
    return None


class FileParser:
    """Parses one transcript file line by line into ``(dedup_key, rank, event_fields)``."""

    def __init__(self, path: Path, context: dict | None = None) -> None:
        self.path = path
        self.project = project_of(path)
        self.session_from_path = (
            path.parent.parent.name if path.parent.name == "subagents" else path.stem
        )
        self.skipped = 0
        self.context: dict = {}  # nothing to carry between runs: each line stands alone

    def parse(self, raw: bytes, line_no: int) -> list[tuple[Any, tuple, dict]]:
        """Events on one line (zero or one); raises ``BadLine`` for an unusable line."""
        # Searched from the end: usage follows the message content, most of a line.
        if raw.rfind(_USAGE_MARKER) < 0:
            stripped = raw.strip()
            if stripped and not (stripped.startswith(b"{") and stripped.endswith(b"}")):
                raise BadLine("not a JSON object (malformed or truncated line)")
            return []
        line = _decode_fast(raw)
        if line is not None:
            message = line.message
            if message is not None and type(message.usage) is dict:
                return self._event(
                    raw,
                    message.model,
                    message.id,
                    message.usage,
                    line.timestamp,
                    line.requestId,
                    line.sessionId,
                    line.isSidechain,
                    line.version,
                    line.costUSD,
                    line.uuid,
                    line.isApiErrorMessage,
                )
        # Anything else (a progress line, no usage, a line the fast decoder refuses) takes
        # the general path, which decides and names every problem.
        obj = load_object(raw)
        record = _usage_record(obj)
        if record is None:
            return []
        message, usage, outer = record
        return self._event(
            raw,
            message.get("model"),
            message.get("id"),
            usage,
            outer.get("timestamp"),
            outer.get("requestId"),
            outer.get("sessionId"),
            outer.get("isSidechain"),
            outer.get("version"),
            outer.get("costUSD"),
            obj.get("uuid"),
            obj.get("isApiErrorMessage"),
        )

    def _event(
        self,
        raw: bytes,
        model: Any,
        message_id: Any,
        usage: dict,
        timestamp: Any,
        request_id: Any,
        session: Any,
        is_sidechain: Any,
        version: Any,
        cost: Any,
        line_uuid: Any,
        api_error: Any,
    ) -> list[tuple[Any, tuple, dict]]:
        """The event of one usage record, every field checked (``BadLine`` names a bad one)."""
        if model == SYNTHETIC_MODEL:
            self.skipped += 1
            return []
        if not isinstance(model, str) or not model:
            raise BadLine("message.model is missing or not a string")
        # Anthropic counting: input_tokens excludes the cache, so the four counts are
        # disjoint as they stand (the rule cage.pricing.normalise_anthropic implements; done
        # inline here, with each bad count named, because this is the hot loop of an import).
        get = usage.get
        input_tokens = get("input_tokens")
        output_tokens = get("output_tokens")
        cache_read = get("cache_read_input_tokens", 0)
        cache_write = get("cache_creation_input_tokens", 0)
        if not (
            type(input_tokens) is int  # fast path: four plain non-negative integers
            and type(output_tokens) is int
            and type(cache_read) is int
            and type(cache_write) is int
            and 0 <= input_tokens <= MAX_TOKENS
            and 0 <= output_tokens <= MAX_TOKENS
            and 0 <= cache_read <= MAX_TOKENS
            and 0 <= cache_write <= MAX_TOKENS
        ):
            input_tokens = token_count(usage, "input_tokens", "message.usage.")
            output_tokens = token_count(usage, "output_tokens", "message.usage.")
            cache_read = token_count(usage, "cache_read_input_tokens", "message.usage.")
            cache_write = token_count(usage, "cache_creation_input_tokens", "message.usage.")
        extra: dict[str, Any] = {}
        breakdown = get("cache_creation")
        if breakdown is not None:
            if not isinstance(breakdown, dict):
                raise BadLine("message.usage.cache_creation is not an object")
            where = "message.usage.cache_creation."
            w5m = token_count(breakdown, "ephemeral_5m_input_tokens", where)
            w1h = token_count(breakdown, "ephemeral_1h_input_tokens", where)
            if w5m or w1h:
                # The breakdown is the cache-write count; 1h writes are priced higher.
                cache_write = w5m + w1h
                extra["cache_write_1h_tokens"] = w1h
        if not (type(timestamp) is str and ISO_Z_VALID(timestamp)):
            timestamp = normalise_timestamp(timestamp)  # converts, or names the problem

        if not (type(message_id) is str and type(request_id) is str and type(session) is str):
            message_id = _optional_str(message_id, "message.id")
            request_id = _optional_str(request_id, "requestId")
            session = _optional_str(session, "sessionId")
        session = session or self.session_from_path
        sidechain = is_sidechain is True
        speed = get("speed")
        # "not 0 <= cost < inf" also refuses NaN and Infinity (1e400): one such row made
        # every later report total NaN/inf, and its --json invalid.
        if cost is not None and (
            isinstance(cost, bool)
            or not isinstance(cost, (int, float))
            or not 0 <= cost < float("inf")
        ):
            raise BadLine("costUSD is not a finite non-negative number")

        if message_id:
            # requestId is the API's request-id header: with it the call gets the canonical
            # id the proxy gives the same call (cage.ledger.canonical_request_id), so a call
            # both metered by `cage proxy` and found here is recorded once.
            ledger_id = f"{PROVIDER}:{request_id}" if request_id else f"{SOURCE}:{message_id}:-"
            key: Any = (message_id, request_id)
        else:
            if isinstance(line_uuid, str) and line_uuid:
                ledger_id = f"{SOURCE}:line:{line_uuid}"
            else:
                digest = hashlib.sha256(raw.rstrip(b"\r\n")).hexdigest()[:32]
                ledger_id = f"{SOURCE}:line:{digest}"
            key = None
        extra["session_id"] = session
        if self.project:
            extra["project"] = self.project
        if isinstance(version, str):
            extra["version"] = version
        if sidechain:
            extra["is_sidechain"] = True
        if isinstance(speed, str):
            extra["speed"] = speed
        if api_error is True:
            extra["api_error"] = True

        fields = {
            "timestamp": timestamp,
            "provider": PROVIDER,
            "model": model,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_read_tokens": cache_read,
            "cache_write_tokens": cache_write,
            "cost_usd": float(cost) if cost is not None else None,
            # Usage reported by the API: measured tokens (priced later -> modeled).
            "truth": "measured",
            "request_id": ledger_id,
            "source": SOURCE,
            "extra": extra,
        }
        total = input_tokens + output_tokens + cache_read + cache_write
        rank = (not sidechain, total, isinstance(speed, str))
        return [(key, rank, fields)]


class _Message(msgspec.Struct):
    id: Any = None
    model: Any = None
    usage: Any = None


class _Line(msgspec.Struct):
    """The fields of an assistant line that an event needs; everything else is skipped."""

    message: _Message | None = None  # any other type: the general path decides
    timestamp: Any = None
    requestId: Any = None
    sessionId: Any = None
    isSidechain: Any = None
    version: Any = None
    costUSD: Any = None
    uuid: Any = None
    isApiErrorMessage: Any = None


_decode_line = msgspec.json.Decoder(_Line).decode


def _decode_fast(raw: bytes) -> _Line | None:
    """The line's event fields, decoded without building the rest (message content is most
    of a line), or None when the general path must decide.

    msgspec checks the whole line's syntax but not that skipped strings are UTF-8, so a line
    that is not ASCII is first checked to be UTF-8. Whatever msgspec refuses (NaN, 1e400, a
    lone surrogate, a message that is not an object) is left to the standard library, so a
    line reads exactly as ``json.loads`` reads it.
    """
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        return _decode_line(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def _usage_record(obj: dict) -> tuple[dict, dict, dict] | None:
    """(message, usage, line carrying timestamp/ids) or None when the line has no usage.

    Besides plain assistant lines, subagent progress lines (``type: "progress"``) nest a
    replayed assistant line under ``data.message``; for some responses that copy is the only
    one with complete usage.
    """
    message = obj.get("message")
    if isinstance(message, dict) and "usage" in message:
        usage = message["usage"]
        if not isinstance(usage, dict):
            raise BadLine("message.usage is not an object")
        return message, usage, obj
    if obj.get("type") == "progress":
        data = obj.get("data")
        inner = data.get("message") if isinstance(data, dict) else None
        nested = inner.get("message") if isinstance(inner, dict) else None
        if isinstance(nested, dict) and isinstance(nested.get("usage"), dict):
            outer = dict(inner)
            outer.setdefault("sessionId", obj.get("sessionId"))
            outer.setdefault("version", obj.get("version"))
            return nested, nested["usage"], outer
    return None


def _optional_str(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadLine(f"{name} is a {type(value).__name__}, not a string")
    return value


def parse_file(path: str | os.PathLike) -> Iterator[dict]:
    """Every event field set in one transcript, copies not merged (pure: no ledger, no state).

    Bad lines are skipped; use ``cage import claude-code`` for the accounting.
    """
    return parse_lines(FileParser(Path(path)), path)
