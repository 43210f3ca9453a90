"""Codex rollouts -> ledger: each turn once, OpenAI counting normalised, incremental, bad lines."""

from __future__ import annotations

import json
from pathlib import Path

from cage.cli import main
from cage.importers import codex

from .conftest import SECRET, append_lines, ledger_rows, write_lines

SESSION = "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


def meta(session: str = SESSION) -> str:
    return json.dumps(
        {
            "timestamp": "2026-11-20T10:00:00.000Z",
            "type": "session_meta",
            "payload": {
                "id": session,
                "cwd": "/work",
                "cli_version": "0.58.0",
                "instructions": SECRET,
            },
        }
    )


def turn_context(model: str = "gpt-5-codex") -> str:
    return json.dumps(
        {
            "timestamp": "2026-11-20T10:00:01.000Z",
            "type": "turn_context",
            "payload": {"cwd": "/work", "model": model, "approval_policy": "on-request"},
        }
    )


def usage(inp: int, cached: int, out: int, reasoning: int = 0) -> dict:
    return {
        "input_tokens": inp,
        "cached_input_tokens": cached,
        "output_tokens": out,
        "reasoning_output_tokens": reasoning,
        "total_tokens": inp + out,
    }


def token_count(total: dict | None, last: dict | None, ts: str = "2026-11-20T10:00:05.000Z") -> str:
    info = None
    if total is not None or last is not None:
        info = {"model_context_window": 272000}
        if total is not None:
            info["total_token_usage"] = total
        if last is not None:
            info["last_token_usage"] = last
    return json.dumps(
        {
            "timestamp": ts,
            "type": "event_msg",
            "payload": {"type": "token_count", "info": info, "rate_limits": {"primary": None}},
        }
    )


def message_line() -> str:
    return json.dumps(
        {
            "timestamp": "2026-11-20T10:00:02.000Z",
            "type": "response_item",
            "payload": {"type": "message", "role": "assistant", "content": [{"text": SECRET}]},
        }
    )


def rollout(tmp_path: Path, name: str = "rollout-2026-11-20T10-00-00-x.jsonl") -> Path:
    return tmp_path / "sessions" / "2026" / "11" / "20" / name


def run_import(capsys, *args: str) -> tuple[int, dict]:
    code = main(["import", "codex", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_last_token_usage_counts_each_turn_once(tmp_path, ledger_db, capsys):
    t1 = usage(1000, 800, 50, reasoning=20)
    t2 = usage(1500, 1200, 70)
    total1 = t1
    total2 = {k: t1[k] + t2[k] for k in t1}
    write_lines(
        rollout(tmp_path),
        [
            meta(),
            turn_context(),
            message_line(),
            token_count(None, None),  # rate limits only
            token_count(total1, t1),
            token_count(total1, t1),  # repeated, totals unchanged: adds nothing
            token_count(total2, t2),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "sessions"))
    assert (code, doc["imported"], doc["bad_lines"]) == (0, 2, 0)
    rows = sorted(ledger_rows(ledger_db), key=lambda r: r["request_id"])
    first = next(r for r in rows if r["request_id"] == f"codex:{SESSION}:{total1['total_tokens']}")
    assert first["provider"] == "openai"
    assert first["model"] == "gpt-5-codex"
    # input includes cached: 1000 - 800 non-cached; reasoning already inside output.
    assert (first["input_tokens"], first["cache_read_tokens"], first["output_tokens"]) == (
        200,
        800,
        50,
    )
    assert json.loads(first["extra"])["reasoning_tokens"] == 20
    assert first["truth"] == "modeled" and first["cost_usd"] > 0
    assert sum(r["input_tokens"] + r["cache_read_tokens"] for r in rows) == 2500


def test_totals_only_are_differenced(tmp_path, ledger_db, capsys):
    a = usage(100, 0, 10)
    b = usage(350, 100, 40)
    write_lines(
        rollout(tmp_path),
        [
            meta(),
            turn_context("gpt-5"),
            token_count(a, None),
            token_count(a, None),
            token_count(b, None),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "sessions"))
    assert code == 0
    assert doc["imported"] == 2
    rows = ledger_rows(ledger_db)
    assert sorted(
        (r["input_tokens"], r["cache_read_tokens"], r["output_tokens"]) for r in rows
    ) == [
        (100, 0, 10),
        (150, 100, 30),
    ]


def test_reimport_and_incremental_append(tmp_path, ledger_db, capsys):
    a = usage(100, 0, 10)
    b = {k: a[k] * 2 for k in a}
    path = write_lines(rollout(tmp_path), [meta(), turn_context(), token_count(a, a)])
    assert run_import(capsys, str(tmp_path / "sessions"))[1]["imported"] == 1
    assert run_import(capsys, str(tmp_path / "sessions"))[1]["imported"] == 0
    # The model and running totals are remembered: only the new turn counts, with its model.
    append_lines(path, [token_count(b, a), token_count(b, a)])
    code, doc = run_import(capsys, str(tmp_path / "sessions"))
    assert (doc["imported"], doc["bytes_read"] > 0) == (1, True)
    assert {r["model"] for r in ledger_rows(ledger_db)} == {"gpt-5-codex"}
    # Reading everything again from the start changes nothing either.
    code, doc = run_import(capsys, str(tmp_path / "sessions"), "--full")
    assert code == 0
    assert (doc["imported"], doc["duplicates"]) == (0, 2)
    assert len(ledger_rows(ledger_db)) == 2


def test_bad_lines_named_and_skipped(tmp_path, ledger_db, capsys):
    good = usage(10, 0, 1)
    bad_total = dict(good, input_tokens=-1)
    path = write_lines(
        rollout(tmp_path),
        [
            meta(),
            turn_context(),
            '{"type":"event_msg","payload":{"type":"token_count","info":',
            token_count(bad_total, None),
            token_count(good, good),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "sessions"))
    assert (code, doc["imported"], doc["bad_lines"]) == (1, 1, 2)
    assert [(e["file"], e["line"]) for e in doc["errors"]] == [(str(path), 3), (str(path), 4)]
    assert "total_token_usage.input_tokens = -1 is negative" in doc["errors"][1]["message"]


def test_only_rollout_files_are_read_and_content_never_stored(tmp_path, ledger_db, capsys):
    a = usage(10, 0, 1)
    write_lines(rollout(tmp_path), [meta(), turn_context(), message_line(), token_count(a, a)])
    write_lines(tmp_path / "sessions" / "history.jsonl", ["not a rollout"])
    code, doc = run_import(capsys, str(tmp_path / "sessions"))
    assert code == 0
    assert (doc["imported"], doc["files"], doc["bad_lines"]) == (1, 1, 0)
    for suffix in ("", "-wal"):
        f = Path(str(ledger_db) + suffix)
        if f.exists():
            assert SECRET.encode() not in f.read_bytes()


def test_unknown_model_is_kept_unpriced(tmp_path, ledger_db, capsys):
    a = usage(10, 0, 1)
    write_lines(rollout(tmp_path), [meta(), token_count(a, a)])
    run_import(capsys, str(tmp_path / "sessions"))
    [row] = ledger_rows(ledger_db)
    assert row["model"] == "unknown"
    assert row["cost_usd"] is None


def test_default_dir_from_codex_home(tmp_path, monkeypatch):
    home = tmp_path / "codex-home"
    (home / "sessions").mkdir(parents=True)
    assert codex.default_roots({"CODEX_HOME": str(home)}) == [home / "sessions"]
    (tmp_path / "h" / ".codex" / "sessions").mkdir(parents=True)
    assert codex.default_roots({"HOME": str(tmp_path / "h")}) == [
        tmp_path / "h" / ".codex" / "sessions"
    ]
    assert codex.default_roots({"CODEX_HOME": str(tmp_path / "absent")}) == []


def test_parse_file_is_pure(tmp_path):
    a = usage(10, 4, 1)
    path = write_lines(tmp_path / "rollout-x.jsonl", [meta(), turn_context(), token_count(a, a)])
    [event] = list(codex.parse_file(path))
    assert (event["input_tokens"], event["cache_read_tokens"]) == (6, 4)
