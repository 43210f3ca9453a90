"""Claude Code transcripts -> ledger: dedup, idempotence, incremental reads, bad lines, privacy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cage.cli import main
from cage.importers import claude_code

from .conftest import (
    SECRET,
    append_lines,
    claude_line,
    ledger_rows,
    user_line,
    write_lines,
)


def run_import(capsys, *args: str) -> tuple[int, dict]:
    code = main(["import", "claude-code", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def project(tmp_path: Path, name: str = "-home-dev-project") -> Path:
    return tmp_path / "claude" / "projects" / name


def test_one_event_per_response_with_normalised_tokens(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "sess-1.jsonl",
        [
            user_line(),
            claude_line(
                "msg_a", "req_a", input_tokens=3, output_tokens=7, cache_write=100, cache_read=50
            ),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 0
    assert (doc["imported"], doc["duplicates"], doc["bad_lines"]) == (1, 0, 0)
    [row] = ledger_rows(ledger_db)
    assert row["provider"] == "anthropic"
    assert row["model"] == "claude-sonnet-4-20250514"
    assert (row["input_tokens"], row["output_tokens"]) == (3, 7)
    assert (row["cache_write_tokens"], row["cache_read_tokens"]) == (100, 50)
    assert row["request_id"] == "anthropic:req_a"
    assert row["source"] == "claude-code"
    extra = json.loads(row["extra"])
    assert extra["session_id"] == "sess-1"
    assert extra["project"] == "-home-dev-project"
    assert extra["version"] == "2.0.14"


def test_copies_in_one_file_keep_the_largest(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "s.jsonl",
        [
            claude_line("msg_a", "req_a", output_tokens=1),
            claude_line("msg_a", "req_a", output_tokens=500),
            claude_line("msg_a", "req_a", output_tokens=30),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert (code, doc["imported"], doc["duplicates"]) == (0, 1, 2)
    [row] = ledger_rows(ledger_db)
    assert row["output_tokens"] == 500


def test_non_sidechain_copy_preferred(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "s.jsonl",
        [
            claude_line("msg_a", "req_a", output_tokens=40, sidechain=True),
            claude_line("msg_a", "req_a", output_tokens=40, sidechain=False),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 0
    assert (doc["imported"], doc["duplicates"]) == (1, 1)
    [row] = ledger_rows(ledger_db)
    assert "is_sidechain" not in json.loads(row["extra"])


def test_copies_across_files_count_once_main_file_first(tmp_path, ledger_db, capsys):
    # The subagent file sorts first by name but is read after the main session files.
    write_lines(
        project(tmp_path) / "sess-1" / "subagents" / "agent-1.jsonl",
        [claude_line("msg_a", "req_a", output_tokens=40, sidechain=True)],
    )
    write_lines(
        project(tmp_path) / "zz-sess-1.jsonl",
        [claude_line("msg_a", "req_a", output_tokens=40), claude_line("msg_b", "req_b")],
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 0
    assert (doc["imported"], doc["duplicates"], doc["files"]) == (2, 1, 2)
    rows = {r["request_id"]: r for r in ledger_rows(ledger_db)}
    assert "is_sidechain" not in json.loads(rows["anthropic:req_a"]["extra"])


def test_second_import_adds_nothing(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "s.jsonl",
        [claude_line("msg_a", "req_a"), claude_line(None, None, uuid="no-id-line")],
    )
    assert run_import(capsys, str(tmp_path / "claude"))[1]["imported"] == 2
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert (code, doc["imported"], doc["files_unchanged"]) == (0, 0, 1)
    # Even ignoring the saved state (every line read again), nothing is counted twice.
    code, doc = run_import(capsys, str(tmp_path / "claude"), "--full")
    assert (doc["imported"], doc["duplicates"]) == (0, 2)
    assert len(ledger_rows(ledger_db)) == 2


def test_line_without_message_id_gets_a_stable_id(tmp_path, ledger_db, capsys):
    write_lines(project(tmp_path) / "s.jsonl", [claude_line(None, "req_x", uuid="line-uuid-1")])
    run_import(capsys, str(tmp_path / "claude"))
    [row] = ledger_rows(ledger_db)
    assert row["request_id"] == "claude-code:line:line-uuid-1"


def test_incremental_reads_only_appended_lines(tmp_path, ledger_db, capsys):
    path = write_lines(project(tmp_path) / "s.jsonl", [claude_line("msg_a", "req_a")])
    assert run_import(capsys, str(tmp_path / "claude"))[1]["imported"] == 1
    size_before = path.stat().st_size
    append_lines(path, [claude_line("msg_b", "req_b"), claude_line("msg_c", "req_c")])
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 0
    assert (doc["imported"], doc["duplicates"]) == (2, 0)
    assert doc["bytes_read"] == path.stat().st_size - size_before


def test_unfinished_last_line_is_read_once_completed(tmp_path, ledger_db, capsys):
    path = project(tmp_path) / "s.jsonl"
    whole = claude_line("msg_b", "req_b", output_tokens=9)
    path.parent.mkdir(parents=True)
    path.write_text(claude_line("msg_a", "req_a") + "\n" + whole[:50], encoding="utf-8")
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert (code, doc["imported"], doc["bad_lines"], doc["pending"]) == (0, 1, 0, 1)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(whole[50:] + "\n")
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert (doc["imported"], doc["bad_lines"], doc["pending"]) == (1, 0, 0)
    assert {r["request_id"] for r in ledger_rows(ledger_db)} == {
        "anthropic:req_a",
        "anthropic:req_b",
    }


def test_complete_last_line_without_newline_is_imported(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "s.jsonl", [claude_line("msg_a", "req_a")], newline_at_end=False
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 0
    assert (doc["imported"], doc["pending"]) == (1, 0)


def test_truncated_or_replaced_file_is_read_again_without_double_counting(
    tmp_path, ledger_db, capsys
):
    path = write_lines(
        project(tmp_path) / "s.jsonl",
        [claude_line("msg_a", "req_a"), claude_line("msg_b", "req_b")],
    )
    run_import(capsys, str(tmp_path / "claude"))
    write_lines(path, [claude_line("msg_c", "req_c")])  # shorter than what was consumed
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 0
    assert doc["imported"] == 1
    assert len(ledger_rows(ledger_db)) == 3


def test_bad_lines_are_counted_with_file_and_line_and_the_rest_imported(
    tmp_path, ledger_db, capsys
):
    path = write_lines(
        project(tmp_path) / "s.jsonl",
        [
            claude_line("msg_a", "req_a"),
            '{"type":"assistant","message":{"usage":{"input_tokens": 1,',  # malformed JSON
            claude_line("msg_b", "req_b", input_tokens=-5),
            claude_line("msg_c", "req_c").replace('"output_tokens": 20', '"output_tokens": "20"'),
            "garbage",
            claude_line("msg_d", "req_d"),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 1  # everything readable is imported, and the exit status says lines were not
    assert (doc["imported"], doc["bad_lines"]) == (2, 4)
    where = [(e["file"], e["line"]) for e in doc["errors"]]
    assert where == [(str(path), 2), (str(path), 3), (str(path), 4), (str(path), 5)]
    messages = [e["message"] for e in doc["errors"]]
    assert "malformed JSON" in messages[0]
    assert "input_tokens = -5 is negative" in messages[1]
    assert "output_tokens is a str" in messages[2]


def test_bad_lines_text_report_lists_file_line(tmp_path, ledger_db, capsys):
    path = write_lines(project(tmp_path) / "s.jsonl", ["{not json", claude_line()])
    code = main(["import", "claude-code", str(tmp_path / "claude")])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[0].startswith("imported 1, skipped duplicates 0, bad lines 1")
    assert f"{path}:1: " in out


def test_synthetic_model_is_skipped(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "s.jsonl",
        [claude_line("msg_a", "req_a", model="<synthetic>"), claude_line("msg_b", "req_b")],
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 0
    assert (doc["imported"], doc["skipped"]) == (1, 1)
    assert [r["model"] for r in ledger_rows(ledger_db)] == ["claude-sonnet-4-20250514"]


def test_cache_creation_breakdown_is_the_cache_write_count(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "s.jsonl",
        [
            claude_line(
                "msg_a",
                "req_a",
                cache_write=999,  # the flat field is superseded by the breakdown
                cache_creation={"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 200},
            )
        ],
    )
    run_import(capsys, str(tmp_path / "claude"))
    [row] = ledger_rows(ledger_db)
    assert row["cache_write_tokens"] == 500
    extra = json.loads(row["extra"])
    assert extra["cache_write_1h_tokens"] == 200  # priced at the 1h rate


def test_cost_in_transcript_is_measured_else_priced(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "s.jsonl",
        [
            claude_line("msg_a", "req_a", cost=0.125),
            claude_line("msg_b", "req_b", input_tokens=1000, output_tokens=1000),
        ],
    )
    run_import(capsys, str(tmp_path / "claude"))
    rows = {r["request_id"]: r for r in ledger_rows(ledger_db)}
    measured = rows["anthropic:req_a"]
    assert (measured["cost_usd"], measured["truth"]) == (0.125, "measured")
    priced = rows["anthropic:req_b"]
    assert priced["truth"] == "modeled"
    assert priced["cost_usd"] > 0


def test_no_content_is_stored(tmp_path, ledger_db, capsys):
    write_lines(
        project(tmp_path) / "s.jsonl",
        [user_line(), claude_line("msg_a", "req_a"), claude_line(None, None)],
    )
    run_import(capsys, str(tmp_path / "claude"))
    assert len(ledger_rows(ledger_db)) == 2
    for suffix in ("", "-wal", "-shm"):
        f = Path(str(ledger_db) + suffix)
        if f.exists():
            assert SECRET.encode() not in f.read_bytes()


def test_missing_path_exits_1_after_importing_the_rest(tmp_path, ledger_db, capsys):
    write_lines(project(tmp_path) / "s.jsonl", [claude_line()])
    code = main(
        ["import", "claude-code", str(tmp_path / "claude"), str(tmp_path / "nope"), "--json"]
    )
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert code == 1
    assert doc["imported"] == 1
    assert doc["failures"][0]["file"] == str(tmp_path / "nope")
    assert "nope" in captured.err


def test_default_dirs_from_claude_config_dir(tmp_path, ledger_db, capsys, monkeypatch):
    a = tmp_path / "a"
    b = tmp_path / "b" / "projects"  # an entry may name the projects folder itself
    write_lines(a / "projects" / "p1" / "s.jsonl", [claude_line("msg_a", "req_a")])
    write_lines(b / "p2" / "s.jsonl", [claude_line("msg_b", "req_b")])
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", f"{a}, {b},{tmp_path / 'missing'}")
    assert claude_code.default_roots() == [a / "projects", b]
    code, doc = run_import(capsys)
    assert (code, doc["imported"]) == (0, 2)


def test_default_dirs_xdg_then_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    xdg = tmp_path / "xdg"
    (xdg / "claude" / "projects").mkdir(parents=True)
    (home / ".claude" / "projects").mkdir(parents=True)
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(xdg)}
    assert claude_code.default_roots(env) == [
        xdg / "claude" / "projects",
        home / ".claude" / "projects",
    ]
    (home / ".config" / "claude" / "projects").mkdir(parents=True)
    assert claude_code.default_roots({"HOME": str(home)}) == [
        home / ".config" / "claude" / "projects",
        home / ".claude" / "projects",
    ]


def test_no_default_dir_is_an_error_naming_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "none"))
    code = main(["import", "claude-code"])
    err = capsys.readouterr().err
    assert code == 1
    assert "CLAUDE_CONFIG_DIR" in err and "cage import claude-code DIR" in err


def test_parse_file_is_pure_and_yields_every_copy(tmp_path):
    path = write_lines(
        tmp_path / "s.jsonl",
        [user_line(), claude_line("msg_a", "req_a"), claude_line("msg_a", "req_a"), "bad"],
    )
    events = list(claude_code.parse_file(path))
    assert [e["request_id"] for e in events] == ["anthropic:req_a"] * 2


def test_progress_lines_nested_usage_is_read(tmp_path, ledger_db, capsys):
    nested = json.loads(claude_line("msg_n", "req_n", output_tokens=77))
    progress_line = json.dumps(
        {
            "type": "progress",
            "sessionId": "sess-1",
            "data": {
                "message": {
                    k: nested[k] for k in ("message", "requestId", "timestamp", "isSidechain")
                }
            },
        }
    )
    write_lines(project(tmp_path) / "s.jsonl", [progress_line])
    run_import(capsys, str(tmp_path / "claude"))
    [row] = ledger_rows(ledger_db)
    assert (row["request_id"], row["output_tokens"]) == ("anthropic:req_n", 77)


def test_counts_agree_with_the_pricing_normaliser(tmp_path):
    """The importer's inline counting is cage.pricing.normalise_anthropic's, shape by shape."""
    from cage.pricing import normalise_anthropic

    shapes = [
        {"cache_write": 40, "cache_read": 7},
        {
            "cache_write": 40,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        },
        {"cache_creation": {"ephemeral_5m_input_tokens": 11, "ephemeral_1h_input_tokens": 5}},
        {"cache_write": 3, "cache_creation": {"ephemeral_1h_input_tokens": 9}},
    ]
    lines = [claude_line(f"msg_{i}", "req", **shape) for i, shape in enumerate(shapes)]
    path = write_lines(tmp_path / "s.jsonl", lines)
    for line, fields in zip(lines, list(claude_code.parse_file(path)), strict=True):
        expected = normalise_anthropic(json.loads(line)["message"]["usage"])
        got = (
            fields["input_tokens"],
            fields["output_tokens"],
            fields["cache_read_tokens"],
            fields["cache_write_tokens"],
            fields["extra"].get("cache_write_1h_tokens", 0),
        )
        assert got == (
            expected.input_tokens,
            expected.output_tokens,
            expected.cache_read_tokens,
            expected.cache_write_tokens,
            expected.cache_write_1h_tokens,
        )


def test_two_process_import_gives_the_same_result(tmp_path, ledger_db, capsys, monkeypatch):
    """Large imports parse in a forked reader: same counts, bad lines, state and dedup."""
    import cage.importers.common as common

    monkeypatch.setattr(common, "PIPELINE_MIN_BYTES", 0)
    monkeypatch.setattr(common, "BATCH_SIZE", 3)  # several batches and checkpoints per file
    lines = [claude_line(f"msg_{i}", f"req_{i}", output_tokens=i + 1) for i in range(10)]
    lines.insert(4, claude_line("msg_2", "req_2", output_tokens=999))  # a larger copy, nearby
    lines.insert(6, "{broken")
    path = write_lines(project(tmp_path) / "s.jsonl", lines)
    write_lines(project(tmp_path) / "t.jsonl", [claude_line("msg_t", "req_t")])
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 1
    assert (doc["imported"], doc["duplicates"], doc["bad_lines"], doc["files"]) == (11, 1, 1, 2)
    assert doc["errors"][0]["line"] == 7
    rows = {r["request_id"]: r for r in ledger_rows(ledger_db)}
    assert rows["anthropic:req_2"]["output_tokens"] == 999
    append_lines(path, [claude_line("msg_new", "req_new")])
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    # The bad line was consumed: the next import reads only new lines and is clean.
    assert (code, doc["imported"], doc["files_unchanged"], doc["bad_lines"]) == (0, 1, 1, 0)


def test_a_config_folder_means_its_projects(tmp_path, ledger_db, capsys):
    write_lines(project(tmp_path) / "s.jsonl", [claude_line("msg_a", "req_a")])
    write_lines(tmp_path / "claude" / "history.jsonl", ['{"display": "not a transcript"}'])
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert (code, doc["imported"], doc["files"]) == (0, 1, 1)


def test_reimport_after_upgrade_does_not_count_calls_stored_under_old_ids(
    tmp_path, ledger_db, capsys
):
    # A ledger written before canonical ids (schema 3): one call imported from the transcript
    # as claude-code:<message id>:<request id>, another metered by the proxy under the bare
    # request-id header. Importing the transcript again after the upgrade adds only the new.
    import sqlite3

    from cage.ledger import MIGRATIONS

    db = sqlite3.connect(ledger_db)
    for step in MIGRATIONS[:3]:
        for sql in step:
            db.execute(sql)
    db.execute("PRAGMA user_version = 3")
    db.executemany(
        "INSERT INTO events (timestamp, provider, model, input_tokens, output_tokens, truth, "
        "source, request_id) VALUES ('2026-11-20T10:00:00Z', 'anthropic', "
        "'claude-sonnet-4-20250514', 10, 20, 'modeled', ?, ?)",
        [("claude-code", "claude-code:msg_a:req_a"), ("proxy", "req_b")],
    )
    db.commit()
    db.close()
    write_lines(
        project(tmp_path) / "sess-1.jsonl",
        [
            claude_line("msg_a", "req_a"),
            claude_line("msg_b", "req_b"),
            claude_line("msg_c", "req_c"),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 0
    assert (doc["imported"], doc["duplicates"]) == (1, 2)
    assert [(r["source"], r["request_id"]) for r in ledger_rows(ledger_db)] == [
        ("claude-code", "anthropic:req_a"),
        ("proxy", "anthropic:req_b"),
        ("claude-code", "anthropic:req_c"),
    ]


@pytest.mark.parametrize("with_orjson", [True, False], ids=["orjson-if-installed", "stdlib"])
def test_lines_read_the_same_whichever_json_parser_is_installed(
    tmp_path, ledger_db, capsys, monkeypatch, with_orjson
):
    # orjson (optional) is stricter than the standard library; what it refuses the standard
    # library decides, and a count beyond 64 bits (which parsers read differently) is bad.
    from cage.importers import common

    if not with_orjson:
        monkeypatch.setattr(common, "_orjson", None)
    path = project(tmp_path) / "sess-1.jsonl"
    good = claude_line("msg_a", "req_a", input_tokens=5)
    huge = claude_line("msg_b", "req_b").replace(
        '"input_tokens": 10', '"input_tokens": ' + "9" * 30
    )
    nan = claude_line("msg_c", "req_c").replace('"output_tokens": 20', '"output_tokens": NaN')
    write_lines(path, [good, huge, nan])
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert code == 1
    assert (doc["imported"], doc["bad_lines"]) == (1, 2)
    assert [e["message"] for e in doc["errors"]] == [
        "message.usage.input_tokens is too large to be a token count",
        "message.usage.output_tokens = nan is not a whole number",
    ]


def test_infinite_or_nan_cost_in_a_transcript_is_a_bad_line(tmp_path, ledger_db, capsys):
    # json.loads reads 1e400 as inf and NaN as nan: stored, either made report totals unusable.
    write_lines(
        project(tmp_path) / "s.jsonl",
        [
            claude_line("msg_a", "req_a", cost=float("inf")),
            claude_line("msg_b", "req_b", cost=float("nan")),
            claude_line("msg_c", "req_c", cost=0.5),
        ],
    )
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert (code, doc["imported"], doc["bad_lines"]) == (1, 1, 2)
    assert "costUSD is not a finite" in doc["errors"][0]["message"]
    assert [r["cost_usd"] for r in ledger_rows(ledger_db)] == [0.5]


def _import_rows_and_state(capsys, ledger_db, root: Path) -> tuple[int, dict, list, list]:
    import sqlite3

    code, doc = run_import(capsys, str(root), "--full")
    rows = [
        (r["id"], r["request_id"], r["output_tokens"], r["cost_usd"], r["extra"])
        for r in ledger_rows(ledger_db)
    ]
    db = sqlite3.connect(ledger_db)
    states = db.execute(
        "SELECT path, offset, line, size FROM import_state ORDER BY path"
    ).fetchall()
    db.close()
    return code, doc, rows, states


def _reset_ledger(ledger_db) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(ledger_db) + suffix).unlink(missing_ok=True)


TRICKY_LINES = [
    # content that is not UTF-8: the fast decoder skips it unchecked; the line is still bad
    claude_line("msg_u", "req_u").replace("TOP-SECRET", "\udcff"),  # written as byte 0xff
    # a lone surrogate in the content: valid for json.loads (the fast decoder refuses it)
    claude_line("msg_s", "req_s").replace("TOP-SECRET", "\\ud800"),
    # NaN where a count should be, and inf as a cost: the standard library reads them
    claude_line("msg_n", "req_n").replace('"output_tokens": 20', '"output_tokens": NaN'),
    claude_line("msg_i", "req_i").replace('"stop_reason": null', '"x": 1e400'),
    # usage null, message a string, a nested progress copy, duplicate keys (last one wins)
    claude_line("msg_z", "req_z").replace('"usage": {', '"usage": null, "u": {'),
    '{"type": "assistant", "message": "the \\"usage\\" is elsewhere"}',
    json.dumps(
        {
            "type": "progress",
            "sessionId": "sess-p",
            "data": {"message": json.loads(claude_line("msg_p", "req_p"))},
        }
    ),
    claude_line("msg_d", "req_d")[:-1] + ', "requestId": "req_dd"}',
    claude_line("msg_k", "req_k").replace('"model"', '"mod\\u0065l"'),
]


def test_fast_decoder_reads_every_line_as_the_standard_library(
    tmp_path, ledger_db, capsys, monkeypatch
):
    # The fast path (msgspec, only the event's fields) must give exactly what json.loads
    # gives: the same events, the same bad lines with the same reasons.
    path = project(tmp_path) / "s.jsonl"
    path.parent.mkdir(parents=True)
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
        for line in [claude_line("msg_a", "req_a"), *TRICKY_LINES]:
            handle.write(line + "\n")
    fast = _import_rows_and_state(capsys, ledger_db, tmp_path / "claude")
    _reset_ledger(ledger_db)
    monkeypatch.setattr(claude_code, "_decode_fast", lambda raw: None)
    general = _import_rows_and_state(capsys, ledger_db, tmp_path / "claude")
    assert fast == general
    _code, doc, rows, _states = fast
    assert [e["message"] for e in doc["errors"]] == [
        "malformed JSON (not valid UTF-8)",
        "message.usage.output_tokens = nan is not a whole number",
        "message.usage is not an object",
    ]
    assert {r[1] for r in rows} == {
        "anthropic:req_a",
        "anthropic:req_s",
        "anthropic:req_i",
        "anthropic:req_p",
        "anthropic:req_dd",
        "anthropic:req_k",
    }


@pytest.mark.parametrize("readers", [2, 3])
def test_several_readers_write_what_one_reader_writes(
    tmp_path, ledger_db, capsys, monkeypatch, readers
):
    # Readers parse files in parallel, the writer takes them in file order: the same rows
    # in the same order (so the same copy of a call kept across files), the same report
    # (bad lines listed in file order) and the same saved state.
    import gc

    import cage.importers.common as common

    monkeypatch.setattr(common, "PIPELINE_MIN_BYTES", 0)
    monkeypatch.setattr(common, "BATCH_SIZE", 4)
    monkeypatch.setattr(common, "WRITE_BATCH_SIZE", 5)
    for n in range(5):
        lines = [
            claude_line(f"msg_{n}_{i}", f"req_{n}_{i}", output_tokens=i + 1, session=f"s{n}")
            for i in range(3 + 4 * n)
        ]
        # the same call as in the previous file (a resumed session), and a bad line
        lines.insert(1, claude_line(f"msg_{n - 1}_0", f"req_{n - 1}_0", session=f"s{n}"))
        lines.insert(2 + n, "{broken")
        write_lines(project(tmp_path) / f"s{n}.jsonl", lines)
        write_lines(
            project(tmp_path) / f"s{n}" / "subagents" / "agent-1.jsonl",
            [claude_line(f"msg_{n}_1", f"req_{n}_1", output_tokens=999, sidechain=True)],
        )
    monkeypatch.setattr(common, "reader_count", lambda total, files: 1)
    threshold = gc.get_threshold()
    one = _import_rows_and_state(capsys, ledger_db, tmp_path / "claude")
    _reset_ledger(ledger_db)
    monkeypatch.setattr(common, "reader_count", lambda total, files: readers)
    several = _import_rows_and_state(capsys, ledger_db, tmp_path / "claude")
    assert several == one
    assert gc.get_freeze_count() == 0  # what the import froze for its readers is let go
    assert gc.get_threshold() == threshold  # and the collector's pace is the caller's again
    code, doc, rows, states = several
    assert (code, doc["files"], doc["bad_lines"]) == (1, 10, 5)
    assert [(e["file"].rsplit("/", 1)[1], e["line"]) for e in doc["errors"]] == [
        (f"s{n}.jsonl", 3 + n) for n in range(5)
    ]
    kept = {r[1]: (r[2], json.loads(r[4])["session_id"]) for r in rows}
    assert kept["anthropic:req_1_1"] == (2, "s1")  # the main copy, not the sidechain's 999
    assert kept["anthropic:req_0_0"] == (1, "s0")  # the first file's copy
    assert len(states) == 10


def test_a_failing_reader_is_named_and_what_came_before_is_kept(
    tmp_path, ledger_db, capsys, monkeypatch
):
    import cage.importers.common as common

    monkeypatch.setattr(common, "PIPELINE_MIN_BYTES", 0)
    monkeypatch.setattr(common, "reader_count", lambda total, files: 2)

    class Failing(claude_code.FileParser):
        def parse(self, raw, line_no):
            if self.path.name == "s3.jsonl":
                raise RuntimeError("boom")
            return super().parse(raw, line_no)

    for n in range(6):
        write_lines(project(tmp_path) / f"s{n}.jsonl", [claude_line(f"msg_{n}", f"req_{n}")])
    monkeypatch.setattr(claude_code, "FileParser", Failing)
    assert main(["import", "claude-code", str(tmp_path / "claude")]) == 1
    assert "the transcript reader failed: RuntimeError: boom" in capsys.readouterr().err
    assert [r["request_id"] for r in ledger_rows(ledger_db)] == [
        f"anthropic:req_{n}" for n in range(3)
    ]
    monkeypatch.setattr(claude_code, "FileParser", Failing.__mro__[1])
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert (code, doc["imported"], doc["files_unchanged"]) == (0, 3, 3)


def test_readers_yield_the_cpu_to_the_writer(tmp_path, ledger_db, capsys, monkeypatch):
    # The writer must keep up with several readers (else it is left alone with their
    # backlog at the end): the readers run at a lower priority than the process that writes.
    import os

    import cage.importers.common as common

    monkeypatch.setattr(common, "PIPELINE_MIN_BYTES", 0)
    monkeypatch.setattr(common, "reader_count", lambda total, files: 2)

    class Recording(claude_code.FileParser):
        def parse(self, raw, line_no):
            items = super().parse(raw, line_no)
            for _, _, fields in items:
                fields["extra"]["niceness"] = os.nice(0)
            return items

    for n in range(2):
        write_lines(project(tmp_path) / f"s{n}.jsonl", [claude_line(f"msg_{n}", f"req_{n}")])
    monkeypatch.setattr(claude_code, "FileParser", Recording)
    code, doc = run_import(capsys, str(tmp_path / "claude"))
    assert (code, doc["imported"]) == (0, 2)
    seen = [json.loads(r["extra"])["niceness"] for r in ledger_rows(ledger_db)]
    assert seen == [min(19, os.nice(0) + 10)] * 2
