"""Codex CLI rollouts (``sessions/**/rollout-*.jsonl``) -> ledger events.

A rollout line is ``{"timestamp", "type", "payload"}``. ``session_meta`` names the session
(``payload.id``), ``turn_context`` names the model for the turns that follow, and
``event_msg`` lines whose payload is ``token_count`` carry ``info.total_token_usage`` (running
totals for the session) and ``info.last_token_usage`` (the last turn).

Each turn is counted once: ``last_token_usage`` when the running total advanced, else the
difference of the running totals; a repeated ``token_count`` whose totals did not change adds
nothing. OpenAI counting is normalised here: ``input_tokens`` includes
``cached_input_tokens`` (input = input - cached, cache read = cached), and
``reasoning_output_tokens`` are already part of ``output_tokens`` (kept in ``extra``, not added).

The ledger id is ``codex:<session id>:<running total_tokens after the turn>``: the same turn
gets the same id on every import. Counts only, never content.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cage.importers.common import (
    BadLine,
    ImportReport,
    iter_files,
    load_object,
    normalise_timestamp,
    parse_lines,
    token_count,
)
from cage.pricing import normalise_openai

SOURCE = "codex"
PROVIDER = "openai"
UNKNOWN_MODEL = "unknown"
_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_output_tokens",
    "total_tokens",
)
_MARKERS = (b'"token_count"', b'"turn_context"', b'"session_meta"')


def default_roots(env: dict[str, str] | None = None) -> list[Path]:
    """``$CODEX_HOME/sessions``, else ``~/.codex/sessions`` (only if it exists)."""
    env = dict(os.environ) if env is None else env
    home = (env.get("CODEX_HOME") or "").strip()
    base = Path(home).expanduser() if home else Path(env.get("HOME") or Path.home()) / ".codex"
    root = base / "sessions"
    return [root] if root.is_dir() else []


def find_files(root: Path, report: ImportReport) -> list[Path]:
    """Every ``rollout-*.jsonl`` under ``root`` (a file given directly is taken as it is).

    A Codex home (one holding ``sessions/``, like ``~/.codex``) means its ``sessions/``.
    """
    if (root / "sessions").is_dir():
        root = root / "sessions"
    return iter_files(root, "rollout-*.jsonl", report)


class FileParser:
    """Parses one rollout line by line; its ``context`` is the state to resume from."""

    def __init__(self, path: Path, context: dict | None = None) -> None:
        self.path = path
        self.skipped = 0
        ctx = context or {}
        self.context: dict = {
            "session": ctx.get("session"),
            "model": ctx.get("model"),
            "previous_total": ctx.get("previous_total"),
            "running_total": ctx.get("running_total", 0),
        }

    def parse(self, raw: bytes, line_no: int) -> list[tuple[Any, tuple, dict]]:
        """Events on one line (zero or one); raises ``BadLine`` for an unusable line."""
        if not any(marker in raw for marker in _MARKERS):
            stripped = raw.strip()
            if stripped and not (stripped.startswith(b"{") and stripped.endswith(b"}")):
                raise BadLine("not a JSON object (malformed or truncated line)")
            return []
        obj = load_object(raw)
        kind = obj.get("type")
        payload = obj.get("payload")
        if not isinstance(payload, dict):
            return []
        ctx = self.context
        if kind == "session_meta":
            session = payload.get("id")
            if isinstance(session, str) and session:
                ctx["session"] = session
            model = payload.get("model")
            if isinstance(model, str) and model:
                ctx["model"] = model
            return []
        if kind == "turn_context":
            model = payload.get("model")
            if isinstance(model, str) and model:
                ctx["model"] = model
            return []
        if kind != "event_msg" or payload.get("type") != "token_count":
            return []
        info = payload.get("info")
        if info is None:
            return []  # a rate-limit update without usage
        if not isinstance(info, dict):
            raise BadLine("payload.info is not an object")
        total = _usage(info, "total_token_usage")
        last = _usage(info, "last_token_usage")
        previous = ctx["previous_total"]
        advanced = total is None or total != previous
        if last is not None and advanced:
            turn = last
        elif total is not None:
            # No per-turn figure (or a repeat): the difference of the running totals.
            turn = {k: max(total[k] - (previous or {}).get(k, 0), 0) for k in _FIELDS}
        else:
            return []
        if total is not None:
            ctx["previous_total"] = total
        if not any(turn[k] for k in _FIELDS if k != "total_tokens"):
            return []  # an unchanged repeat: adds nothing
        timestamp = normalise_timestamp(obj.get("timestamp"))
        turn_total = turn["total_tokens"] or (turn["input_tokens"] + turn["output_tokens"])
        if total is not None and total["total_tokens"]:
            ctx["running_total"] = total["total_tokens"]
        else:
            ctx["running_total"] = int(ctx.get("running_total") or 0) + turn_total
        model = payload.get("model") or info.get("model") or ctx.get("model")
        if not isinstance(model, str) or not model:
            model = UNKNOWN_MODEL
        session = ctx.get("session") or self.path.stem
        counts = normalise_openai(turn)  # input includes the cached part: subtracted there
        extra: dict[str, Any] = {"session_id": session}
        if turn["reasoning_output_tokens"]:
            extra["reasoning_tokens"] = turn["reasoning_output_tokens"]
        if model == UNKNOWN_MODEL:
            extra["model_unknown"] = True
        fields = {
            "timestamp": timestamp,
            "provider": PROVIDER,
            "model": model,
            "input_tokens": counts.input_tokens,
            "output_tokens": counts.output_tokens,
            "cache_read_tokens": counts.cache_read_tokens,
            "cache_write_tokens": 0,
            "cost_usd": None,
            "truth": "measured",  # tokens the API reported; priced later -> modeled
            "request_id": f"{SOURCE}:{session}:{ctx['running_total']}",
            "source": SOURCE,
            "extra": extra,
        }
        return [(None, (), fields)]


def _usage(info: dict, key: str) -> dict[str, int] | None:
    value = info.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadLine(f"payload.info.{key} is not an object")
    where = f"payload.info.{key}."
    return {k: token_count(value, k, where) for k in _FIELDS}


def parse_file(path: str | os.PathLike) -> Iterator[dict]:
    """Every event field set in one rollout (pure: no ledger, no state); bad lines skipped."""
    return parse_lines(FileParser(Path(path)), path)
