"""Shared import machinery: complete lines only, resume points, the dedup window, progress."""

from __future__ import annotations

import io

import pytest

from cage.importers.common import (
    BadLine,
    DedupWindow,
    FileState,
    Progress,
    StateStore,
    normalise_timestamp,
    read_complete_lines,
    resume_point,
    sizes_to_read,
)


def lines_of(data: bytes, start: int = 0) -> list[tuple[int, int, int, bytes]]:
    handle = io.BytesIO(data)
    handle.seek(start)
    return list(read_complete_lines(handle, start, 0))


def test_unfinished_tail_is_not_yielded_but_a_complete_object_is():
    assert [r[3] for r in lines_of(b'{"a":1}\n{"b":')] == [b'{"a":1}\n']
    assert [r[3] for r in lines_of(b'{"a":1}\n{"b":2}')] == [b'{"a":1}\n', b'{"b":2}']
    # Offsets and line numbers resume exactly where the previous read stopped.
    assert lines_of(b'{"a":1}\n{"b":2}\n', start=8) == [(1, 8, 16, b'{"b":2}\n')]


def test_resume_point_rules():
    saved = FileState("/x", inode=5, size=100, mtime=1.0, offset=100, line=3)
    assert resume_point(saved, 5, 100, 1.0) is None  # unchanged
    grown = resume_point(saved, 5, 150, 2.0)
    assert (grown.offset, grown.line) == (100, 3)
    assert resume_point(saved, 6, 150, 2.0).offset == 0  # replaced: another inode
    assert resume_point(saved, 5, 50, 2.0).offset == 0  # truncated
    assert resume_point(None, 5, 50, 2.0).offset == 0


def test_state_store_round_trip(tmp_path):
    store = StateStore(tmp_path / "ledger.db")
    store.put_many("codex", [FileState("/f", 1, 10, 2.5, 10, 2, {"model": "gpt-5"})])
    store.close()
    again = StateStore(tmp_path / "ledger.db")
    got = again.get("codex", "/f")
    assert (got.offset, got.line, got.context) == (10, 2, {"model": "gpt-5"})
    assert again.get("claude-code", "/f") is None
    again.close()


def test_state_store_leaves_checkpoints_to_the_ledger(tmp_path):
    # Its small commit after each large batch of events must not checkpoint the whole WAL
    # (the ledger's bulk mode checkpoints every 40 MB, not every batch).
    import sqlite3

    db = sqlite3.connect(tmp_path / "ledger.db")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE big (x BLOB)")
    db.close()
    store = StateStore(tmp_path / "ledger.db")
    writer = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint = 0")  # as if in bulk mode, not yet due
    writer.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) "
        "INSERT INTO big SELECT randomblob(4000) FROM n"
    )  # ~2,000 pages in the WAL, none yet in the database file
    store.put_many("codex", [FileState("/f", 1, 10, 2.5, 10, 2, {})])
    # SQLite's default (checkpoint from 1,000 pages) would have copied them there now.
    assert (tmp_path / "ledger.db").stat().st_size < 1_000_000
    store.close()
    writer.close()


def test_state_store_waits_for_the_lock_then_fails_clearly(tmp_path, monkeypatch, caplog):
    # Another process holding the write lock: the import's state is saved once it is free,
    # and a lock that is never freed is a clear error (events already written are kept),
    # not a traceback.
    import sqlite3
    import threading

    import cage.ledger as ledger_mod
    from cage.errors import LedgerError

    monkeypatch.setattr(ledger_mod, "BUSY_TIMEOUT_MS", 50)
    store = StateStore(tmp_path / "ledger.db")
    holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.4, lambda: holder.execute("COMMIT"))
    release.start()
    store.put_many("codex", [FileState("/f", 1, 10, 2.5, 10, 2, {})])
    release.join()
    assert store.get("codex", "/f").offset == 10
    assert any("is locked by another process" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(ledger_mod, "RETRY_FOR_S", 0.3)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(LedgerError, match="cannot save how far the transcripts were read"):
        store.put_many("codex", [FileState("/f", 1, 20, 2.5, 20, 3, {})])
    holder.execute("COMMIT")
    assert store.get("codex", "/f").offset == 10
    store.close()
    holder.close()


def test_dedup_window_keeps_best_and_bounds_memory():
    window = DedupWindow(size=2)
    assert window.offer("a", (True, 5), "a5", 0, 1) == []
    assert window.offer("a", (True, 9), "a9", 10, 2) == []
    assert window.offer("a", (False, 99), "a-side", 20, 3) == []  # a sidechain copy loses
    assert window.offer("b", (True, 1), "b1", 30, 4) == []
    assert window.oldest_position() == (0, 0)
    assert window.offer("c", (True, 1), "c1", 40, 5) == ["a9"]  # pushed out, oldest first
    assert window.drain() == ["b1", "c1"]
    assert window.merged == 2
    assert window.oldest_position() is None


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_cleared_at_the_end():
    quiet = io.StringIO()
    progress = Progress(Progress.MIN_BYTES * 2, "importing", stream=quiet)
    progress.advance(Progress.MIN_BYTES)
    progress.finish()
    assert quiet.getvalue() == ""
    tty = _Tty()
    progress = Progress(Progress.MIN_BYTES * 2, "importing", stream=tty)
    progress.advance(Progress.MIN_BYTES)
    progress.finish()
    assert "\rimporting:  50.0%" in tty.getvalue()
    assert tty.getvalue().endswith("\r\033[K")


def test_state_store_keeps_a_non_utf8_file_name(tmp_path):
    # A file name that is not UTF-8 arrives surrogate-escaped; SQLite text cannot hold it.
    name = "/data/bad" + b"\xff".decode("utf-8", "surrogateescape") + ".jsonl"
    store = StateStore(tmp_path / "ledger.db")
    store.put_many("jsonl", [FileState(name, 1, 10, 2.5, 10, 2, {})])
    store.close()
    again = StateStore(tmp_path / "ledger.db")
    assert again.get("jsonl", name).offset == 10
    assert again.get("jsonl", "/data/bad.jsonl") is None
    again.close()


def test_a_fifo_among_transcripts_is_skipped_and_named_not_waited_on(tmp_path, capsys):
    # open() on a FIFO with no writer blocked the whole import forever.
    import json
    import os

    from cage.cli import main

    os.mkfifo(tmp_path / "a.jsonl")
    line = {"timestamp": "2026-11-20T10:00:00Z", "provider": "openai", "model": "gpt-4o"}
    (tmp_path / "b.jsonl").write_text(json.dumps({**line, "request_id": "r1"}) + "\n")
    assert main(["import", "jsonl", "--json", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["imported"] == 1
    assert doc["failures"][0]["file"].endswith("a.jsonl")
    assert "not a regular file" in doc["failures"][0]["message"]
    assert main(["import", "jsonl", str(tmp_path / "a.jsonl")]) == 1
    assert "not a regular file or a directory" in capsys.readouterr().out


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2025-10-21T08:00:00.945Z", "2025-10-21T08:00:00.945Z"),  # the fast path
        ("2024-02-29T23:59:59Z", "2024-02-29T23:59:59Z"),  # days past 28: datetime decides
        ("2025-12-31T00:00:00Z", "2025-12-31T00:00:00Z"),
        ("2025-10-21T10:00:00+02:00", "2025-10-21T08:00:00Z"),
        ("2025-02-29T00:00:00Z", "is not a valid time"),
        ("0000-01-01T00:00:00Z", "is not a valid time"),
        ("2025-10-21T24:00:00Z", "is not a valid time"),
        ("2025-10-21T23:60:00Z", "is not a valid time"),
        ("2025-13-01T00:00:00Z", "is not a valid time"),
    ],
)
def test_timestamps_are_kept_converted_or_refused(value, expected):
    if expected.startswith("is not"):
        with pytest.raises(BadLine, match=expected):
            normalise_timestamp(value)
    else:
        assert normalise_timestamp(value) == expected


def test_sizes_to_read_counts_only_what_an_import_would_read(tmp_path):
    import os

    done, grown, new = (tmp_path / name for name in ("done.jsonl", "grown.jsonl", "new.jsonl"))
    for path in (done, grown, new):
        path.write_bytes(b'{"a": 1}\n' * 10)  # 90 bytes each
    store = StateStore(None)
    for path in (done, grown):
        st = path.stat()
        store.put_many(
            "src", [FileState(os.path.realpath(path), st.st_ino, 90, st.st_mtime, 90, 10)]
        )
    with open(grown, "ab") as handle:
        handle.write(b'{"b": 2}\n')
    files = [done, grown, new, tmp_path / "gone.jsonl"]
    assert sizes_to_read("src", files, store) == (279, 9 + 90)
    assert sizes_to_read("src", files, store, full=True) == (279, 279)
