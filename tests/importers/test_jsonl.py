"""AttributionEvent-style JSONL -> ledger: fields, aliases, truth labels, synthetic ids."""

from __future__ import annotations

import json

from cage.cli import main
from cage.importers.jsonl import event_fields

from .conftest import ledger_rows, write_lines


def run_import(capsys, *args: str) -> tuple[int, dict]:
    code = main(["import", "jsonl", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def event(**fields) -> str:
    base = {
        "timestamp": "2026-11-20T10:00:00Z",
        "provider": "anthropic",
        "model": "claude-sonnet-4-20250514",
        "input_tokens": 100,
        "output_tokens": 10,
    }
    base.update(fields)
    return json.dumps(base)


def test_fields_aliases_and_truth(tmp_path, ledger_db, capsys):
    path = write_lines(
        tmp_path / "events.jsonl",
        [
            event(request_id="r-measured", cost_usd=0.5),
            event(request_id="r-label", cost_usd=0.25, truth="estimated"),
            event(
                request_id="r-priced", cached_tokens=40, mesh_peer="mission-7", caller="agent.py"
            ),
            "",
        ],
    )
    code, doc = run_import(capsys, str(path))
    assert (code, doc["imported"], doc["bad_lines"]) == (0, 3, 0)
    rows = {r["request_id"]: r for r in ledger_rows(ledger_db)}
    assert (rows["r-measured"]["cost_usd"], rows["r-measured"]["truth"]) == (0.5, "measured")
    assert (rows["r-label"]["cost_usd"], rows["r-label"]["truth"]) == (0.25, "estimated")
    priced = rows["r-priced"]
    assert priced["truth"] == "modeled" and priced["cost_usd"] > 0
    assert (priced["cache_read_tokens"], priced["mission_id"], priced["caller"]) == (
        40,
        "mission-7",
        "agent.py",
    )
    assert priced["source"] == "jsonl"


def test_events_without_request_id_dedupe_by_content(tmp_path, ledger_db, capsys):
    a = write_lines(tmp_path / "a.jsonl", [event(), event(input_tokens=5)])
    b = write_lines(tmp_path / "b.jsonl", [event()])  # the same event in another file
    code, doc = run_import(capsys, str(a), str(b))
    assert (doc["imported"], doc["duplicates"]) == (2, 1)
    code, doc = run_import(capsys, str(a), str(b), "--full")
    assert code == 0
    assert (doc["imported"], doc["duplicates"]) == (0, 3)
    assert all(r["request_id"].startswith("jsonl:") for r in ledger_rows(ledger_db))


def test_bad_lines(tmp_path, ledger_db, capsys):
    path = write_lines(
        tmp_path / "e.jsonl",
        [
            event(input_tokens=-1),
            event(truth="guessed", cost_usd=1),
            json.dumps({"model": "mystery-model", "timestamp": "2026-11-20T10:00:00Z"}),
            event(timestamp="yesterday"),
            "[1, 2]",
            event(request_id="ok"),
        ],
    )
    code, doc = run_import(capsys, str(path))
    assert (code, doc["imported"], doc["bad_lines"]) == (1, 1, 5)
    assert [e["line"] for e in doc["errors"]] == [1, 2, 3, 4, 5]
    assert "provider is missing" in doc["errors"][2]["message"]


def test_provider_inferred_and_extra_keeps_only_counts_and_ids():
    fields = event_fields(
        {
            "timestamp": 1763632800,
            "model": "gpt-4o-mini",
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "cached_tokens": 30,
            "extra": {"trace_id": "t-1", "n": 3, "prompt": ["long", "content"]},
        }
    )
    assert fields["provider"] == "openai"
    assert (fields["input_tokens"], fields["cache_read_tokens"], fields["output_tokens"]) == (
        70,
        30,
        5,
    )
    assert fields["extra"] == {"trace_id": "t-1", "n": 3}
    assert fields["timestamp"] == "2025-11-20T10:00:00Z"


def test_extra_never_keeps_short_content_under_a_content_key():
    fields = event_fields(
        {
            "timestamp": 1763632800,
            "model": "gpt-4o-mini",
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "extra": {"prompt": "secret", "Answer": "42", "messages": "hi", "span": "s-9"},
        }
    )
    assert fields["extra"] == {"span": "s-9"}


def test_missing_file_exits_1(tmp_path, ledger_db, capsys):
    code = main(["import", "jsonl", str(tmp_path / "absent.jsonl")])
    captured = capsys.readouterr()
    assert code == 1
    assert "absent.jsonl: no such file or directory" in captured.out


def test_infinite_cost_or_duration_is_a_bad_line_not_an_inf_total():
    # One `Infinity` cost made every later report total inf (and its --json invalid).
    import pytest

    from cage.importers.common import BadLine

    base = {"timestamp": "2026-11-20T10:00:00Z", "provider": "openai", "model": "gpt-4o"}
    for bad in ({"cost_usd": float("inf")}, {"cost_usd": 1e400}, {"duration_s": float("inf")}):
        with pytest.raises(BadLine):
            event_fields({**base, **bad})
