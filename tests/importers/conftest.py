"""Transcript-shaped fixtures for the importer tests, written the way the agents write them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

SECRET = "TOP-SECRET-PROMPT-TEXT-do-not-store"


def claude_line(
    msg_id: str | None = "msg_01",
    req_id: str | None = "req_01",
    *,
    model: str = "claude-sonnet-4-20250514",
    input_tokens: int = 10,
    output_tokens: int = 20,
    cache_write: int = 0,
    cache_read: int = 0,
    cache_creation: dict | None = None,
    sidechain: bool = False,
    session: str = "sess-1",
    timestamp: str = "2026-11-20T10:00:00.000Z",
    cost: float | None = None,
    speed: str | None = None,
    uuid: str | None = None,
    **extra_fields,
) -> str:
    """One assistant line as Claude Code writes it (with content text, which must never leak)."""
    usage = {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    if cache_creation is not None:
        usage["cache_creation"] = cache_creation
    if speed is not None:
        usage["speed"] = speed
    message = {
        "model": model,
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": SECRET}],
        "stop_reason": None,
        "usage": usage,
    }
    if msg_id is not None:
        message["id"] = msg_id
    line = {
        "parentUuid": "p-1",
        "isSidechain": sidechain,
        "userType": "external",
        "cwd": "/home/dev/project",
        "sessionId": session,
        "version": "2.0.14",
        "gitBranch": "main",
        "message": message,
        "type": "assistant",
        "uuid": uuid or f"uuid-{msg_id}-{req_id}-{input_tokens}-{output_tokens}",
        "timestamp": timestamp,
    }
    if req_id is not None:
        line["requestId"] = req_id
    if cost is not None:
        line["costUSD"] = cost
    line.update(extra_fields)
    return json.dumps(line)


def user_line(text: str = SECRET) -> str:
    """A user line: no usage, content only."""
    return json.dumps(
        {
            "parentUuid": None,
            "isSidechain": False,
            "type": "user",
            "message": {"role": "user", "content": text},
            "uuid": "u-1",
            "timestamp": "2026-11-20T09:59:59.000Z",
            "sessionId": "sess-1",
        }
    )


def write_lines(path: Path, lines: list[str], *, newline_at_end: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if newline_at_end else "")
    path.write_text(text, encoding="utf-8")
    return path


def append_lines(path: Path, lines: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def ledger_rows(db: Path) -> list[dict]:
    """Every event row in the ledger file, as dicts, ordered by request id."""
    conn = sqlite3.connect(str(db))
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM events ORDER BY request_id").fetchall()
        return [dict(r) for r in rows]
    finally:
        conn.close()


@pytest.fixture
def ledger_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "ledger.db"
    monkeypatch.setenv("CAGE_LEDGER", str(db))
    return db
