"""The spend ledger on real SQLite files: schema, idempotence, concurrency, reports."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cage.errors import LedgerError
from cage.ledger import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Event,
    Ledger,
    default_ledger_path,
    normalise_timestamp,
    parse_bound,
)


def ev(n: int = 0, **fields) -> Event:
    base = {
        "timestamp": "2026-11-23T10:00:00Z",
        "provider": "anthropic",
        "model": "claude-sonnet-4",
        "input_tokens": 100,
        "output_tokens": 10,
        "cost_usd": 0.5,
        "truth": "modeled",
        "request_id": f"req-{n}",
    }
    base.update(fields)
    return Event(**base)


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger.open(tmp_path / "ledger.db") as opened:
        yield opened


def test_default_path_follows_cage_ledger(monkeypatch, tmp_path):
    monkeypatch.setenv("CAGE_LEDGER", str(tmp_path / "x.db"))
    assert default_ledger_path() == tmp_path / "x.db"


def test_default_path_uses_xdg_data_home(monkeypatch, tmp_path):
    if sys.platform == "darwin" or sys.platform.startswith("win"):
        pytest.skip("XDG applies to Linux and other Unixes")
    monkeypatch.delenv("CAGE_LEDGER")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_ledger_path() == tmp_path / "cage" / "ledger.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_ledger_path() == tmp_path / "home" / ".local" / "share" / "cage" / "ledger.db"


def test_open_creates_a_wal_ledger_at_the_current_schema(tmp_path):
    path = tmp_path / "deep" / "ledger.db"
    Ledger.open(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_postgresql_url_is_refused_clearly():
    with pytest.raises(LedgerError, match="PostgreSQL ledgers are not supported") as info:
        Ledger.open("postgresql://cage:secret@db.example/cage")
    assert "secret" not in str(info.value)


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a usable cage ledger"):
        Ledger.open(path)


def test_newer_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger.open(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="upgrade cage"):
        Ledger.open(path)


def test_migration_from_version_0(tmp_path):
    # Version 0: an empty SQLite file.
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with Ledger.open(empty) as opened:
        assert opened.add(ev(1))
        assert opened.report("model")[0]["calls"] == 1


@pytest.mark.parametrize("start", [1, 2, 3])
def test_migration_from_older_versions_backfills_the_rollups(tmp_path, start):
    # Events written under an older schema; migrating must rebuild the totals from them.
    old = tmp_path / "old.db"
    db = old_ledger(old, start)
    db.executemany(
        "INSERT INTO events (timestamp, provider, model, input_tokens, cost_usd, truth, "
        "request_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            ("2026-11-20T01:00:00Z", "openai", "gpt-4o", 10, 1.0, "modeled", "a"),
            ("2026-11-21T01:00:00Z", "openai", "gpt-4o", 5, None, "estimated", "b"),
        ],
    )
    db.commit()
    db.close()
    with Ledger.open(old) as opened:
        (row,) = opened.report("model")
        assert (row["calls"], row["input_tokens"], row["cost_usd"], row["unpriced"]) == (
            2,
            15,
            1.0,
            1,
        )
        assert not opened.add(ev(0, request_id="a"))
    assert sqlite3.connect(old).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def old_ledger(path: Path, version: int) -> sqlite3.Connection:
    """A ledger file as an older cage left it: the first ``version`` migration steps."""
    db = sqlite3.connect(path)
    for step in MIGRATIONS[:version]:
        for sql in step:
            db.execute(sql)
    db.execute(f"PRAGMA user_version = {version}")
    return db


def test_schema_4_rewrites_old_ids_and_keeps_one_copy_of_a_call_seen_twice(tmp_path):
    # Before schema 4 the proxy stored the upstream's request id bare and the Claude Code
    # importer claude-code:<message id>:<request id>: the same call seen by both was two rows.
    path = tmp_path / "old.db"
    db = old_ledger(path, 3)
    rows = [
        ("proxy", "req_1", 10, "m1"),  # the proxy's copy of a call...
        ("claude-code", "claude-code:msg_1:req_1", 10, None),  # ...imported again: dropped
        ("claude-code", "claude-code:msg_2:req_2", 20, None),
        ("claude-code", "claude-code:msg_3:-", 30, None),  # no requestId: kept as it is
        ("claude-code", "claude-code:line:uuid-4", 40, None),
        ("proxy", "cage-proxy-5", 50, "m1"),  # no upstream id: kept as it is
        ("meter", "anthropic:msg_6", 60, None),
    ]
    db.executemany(
        "INSERT INTO events (timestamp, provider, model, input_tokens, cost_usd, truth, "
        "source, request_id, mission_id) VALUES ('2026-11-20T01:00:00Z', 'anthropic', "
        "'claude-sonnet-4', ?, 1.0, 'modeled', ?, ?, ?)",
        [(tokens, source, rid, mission) for source, rid, tokens, mission in rows],
    )
    db.commit()
    db.close()
    with Ledger.open(path) as opened:
        assert [(e.source, e.request_id, e.input_tokens) for e in opened.events()] == [
            ("proxy", "anthropic:req_1", 10),
            ("claude-code", "anthropic:req_2", 20),
            ("claude-code", "claude-code:msg_3:-", 30),
            ("claude-code", "claude-code:line:uuid-4", 40),
            ("proxy", "cage-proxy-5", 50),
            ("meter", "anthropic:msg_6", 60),
        ]
        # The rollups were rebuilt without the dropped copy.
        (row,) = opened.report("model")
        assert (row["calls"], row["input_tokens"], row["cost_usd"]) == (6, 210, 6.0)
        assert opened.mission_spend("m1")["calls"] == 2
        # The same calls arriving again under the new ids are duplicates.
        again = [ev(0, request_id=rid) for rid in ("anthropic:req_1", "anthropic:req_2")]
        assert opened.add_many(again) == (0, 2)
    indexes = {
        name: sql
        for name, sql in sqlite3.connect(path).execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'"
        )
    }
    assert set(indexes) == {"events_rid", "events_timestamp", "events_mission"}


def test_batches_with_duplicates_keep_the_rollups_exact(ledger):
    # All-new batches add sums made in Python; a batch with duplicates (in the ledger or
    # within itself) sums only the rows really inserted, in SQL. Both must agree.
    ledger.add_many([ev(i, input_tokens=i, cost_usd=None if i % 3 else 0.5) for i in range(10)])
    batch = [ev(i, input_tokens=i, cost_usd=0.25, mission_id="m") for i in range(5, 15)]
    assert ledger.add_many([*batch, batch[-1]]) == (5, 6)
    (row,) = ledger.report("model")
    assert (row["calls"], row["input_tokens"], row["unpriced"]) == (15, sum(range(15)), 6)
    assert row["cost_usd"] == pytest.approx(4 * 0.5 + 5 * 0.25)
    assert ledger.mission_spend("m")["calls"] == 5
    brute = sqlite3.connect(ledger.path).execute(
        "SELECT count(*), sum(input_tokens), total(cost_usd) FROM events"
    )
    assert brute.fetchone() == (15, sum(range(15)), pytest.approx(3.25))


def test_large_batches_keep_order_and_the_first_copy(ledger):
    # Rows are inserted many per statement (and the rest one by one): order, the copy kept
    # and the counts are those of inserting them one at a time.
    ledger.add_many([ev(7, output_tokens=1)])
    events = [ev(i % 100, output_tokens=1000 + i) for i in range(123)]  # 23 seen twice
    assert ledger.add_many(events) == (99, 24)
    rows = sqlite3.connect(ledger.path).execute(
        "SELECT request_id, output_tokens FROM events ORDER BY id"
    )
    assert rows.fetchall() == [("req-7", 1)] + [
        (f"req-{i}", 1000 + i) for i in range(100) if i != 7
    ]
    (row,) = ledger.report("model")
    assert (row["calls"], row["output_tokens"]) == (
        100,
        1 + sum(1000 + i for i in range(100)) - 1007,
    )


def test_add_is_idempotent_by_request_id(ledger):
    assert ledger.add(ev(1)) is True
    assert ledger.add(ev(1)) is False
    assert ledger.add_many([ev(1), ev(2), ev(2), ev(3)]) == (2, 2)
    # No request id: never a duplicate.
    assert ledger.add_many([ev(0, request_id=None)] * 3) == (3, 0)
    assert ledger.report("model")[0]["calls"] == 6


def test_bad_events_are_refused_with_a_message(ledger):
    with pytest.raises(LedgerError, match="truth"):
        ledger.add(ev(1, truth="guessed"))
    with pytest.raises(LedgerError, match="timestamp"):
        ledger.add(ev(1, timestamp="yesterday"))
    with pytest.raises(LedgerError, match="token counts"):
        ledger.add(ev(1, input_tokens=-1))
    assert ledger.report("model") == []


def test_timestamps_are_stored_as_sortable_utc_text(ledger):
    assert normalise_timestamp("2026-11-23T10:00:00.123456Z") == "2026-11-23T10:00:00Z"
    assert normalise_timestamp("2026-11-23T11:00:00+01:00") == "2026-11-23T10:00:00Z"
    assert normalise_timestamp("2026-11-23T10:00:00.5+00:00") == "2026-11-23T10:00:00Z"
    ledger.add(ev(1, timestamp="2026-11-24T00:30:00+01:00"))
    (event,) = list(ledger.events())
    assert event.timestamp == "2026-11-23T23:30:00Z"
    assert [r["key"] for r in ledger.report("day")] == ["2026-11-23"]


def test_events_round_trip_with_extra(ledger):
    original = ev(1, caller="bot", mission_id="m1", extra={"cache_write_1h_tokens": 4})
    ledger.add(original)
    (back,) = list(ledger.events())
    assert back == original


def test_report_groups_sorts_and_counts_unpriced(ledger):
    ledger.add_many(
        [
            ev(1, model="b-model", cost_usd=1.0),
            ev(2, model="a-model", cost_usd=1.0),
            ev(3, model="c-model", cost_usd=2.0, truth="measured"),
            ev(4, model="unknown-model", cost_usd=None, truth="modeled"),
            ev(5, model="a-model", cost_usd=None, truth="estimated", cache_read_tokens=7),
        ]
    )
    rows = ledger.report("model")
    # Cost desc, then name: the tie between a-model and b-model is broken by name.
    assert [r["key"] for r in rows] == ["c-model", "a-model", "b-model", "unknown-model"]
    a = rows[1]
    assert a["calls"] == 2
    assert a["cost_usd"] == 1.0
    assert a["unpriced"] == 1
    assert a["cache_read_tokens"] == 7
    assert a["truth"] == {"measured": 0, "modeled": 1, "estimated": 1}
    assert rows[3]["unpriced"] == 1
    assert rows[3]["cost_usd"] == 0.0


def test_report_by_every_key_and_null_keys_last(ledger):
    ledger.add_many(
        [
            ev(1, caller="bot", mission_id="m1", provider="openai", model="gpt-4o"),
            ev(2, caller=None, mission_id=None, cost_usd=0.25),
            ev(3, caller="", mission_id="m2", timestamp="2026-11-24T00:00:00Z", cost_usd=0.25),
        ]
    )
    assert [r["key"] for r in ledger.report("caller")] == ["bot", None]
    assert [r["calls"] for r in ledger.report("caller")] == [1, 2]
    assert [r["key"] for r in ledger.report("mission")] == ["m1", "m2", None]
    assert [r["key"] for r in ledger.report("provider")] == ["anthropic", "openai"]
    assert [r["key"] for r in ledger.report("day")] == ["2026-11-23", "2026-11-24"]
    with pytest.raises(LedgerError, match="cannot report by"):
        ledger.report("colour")


def test_report_date_and_time_bounds(ledger):
    ledger.add_many(
        [
            ev(1, timestamp="2026-11-22T23:59:59Z"),
            ev(2, timestamp="2026-11-23T00:00:00Z"),
            ev(3, timestamp="2026-11-23T12:00:00Z"),
            ev(4, timestamp="2026-11-23T23:59:59Z"),
            ev(5, timestamp="2026-11-24T00:00:00Z", mission_id="m"),
        ]
    )

    def calls(**bounds) -> int:
        return sum(r["calls"] for r in ledger.report("model", **bounds))

    assert calls(since="2026-11-23", until="2026-11-23") == 3
    assert calls(since="2026-11-23") == 4
    assert calls(until="2026-11-23") == 4
    # Timestamp bounds are inclusive and read the events table.
    assert calls(since="2026-11-23T12:00:00Z", until="2026-11-23T23:59:59Z") == 2
    assert calls(since="2026-11-23T12:00:01Z") == 2
    assert calls(mission="m") == 1
    assert calls(mission="m", until="2026-11-23T23:00:00Z") == 0
    with pytest.raises(LedgerError, match="not a date"):
        ledger.report("model", since="2026-02-30")
    assert parse_bound("2026-11-23", end=True) == "2026-11-24T00:00:00Z"


def test_manual_delete_and_update_keep_reports_right(ledger):
    ledger.add_many([ev(1), ev(2, model="other"), ev(3)])
    db = sqlite3.connect(ledger.location)
    db.execute("DELETE FROM events WHERE request_id = 'req-1'")
    db.execute("UPDATE events SET model = 'renamed' WHERE request_id = 'req-2'")
    db.commit()
    db.close()
    rows = {r["key"]: r["calls"] for r in ledger.report("model")}
    assert rows == {"claude-sonnet-4": 1, "renamed": 1}


def test_mission_spend(ledger):
    ledger.add_many(
        [
            ev(1, mission_id="m1", cost_usd=1.25, model="a"),
            ev(2, mission_id="m1", cost_usd=None, model="b", truth="estimated"),
            ev(3, mission_id="m2", cost_usd=9.0),
        ]
    )
    spend = ledger.mission_spend("m1")
    assert spend["mission_id"] == "m1"
    assert spend["calls"] == 2
    assert spend["cost_usd"] == 1.25
    assert spend["unpriced"] == 1
    assert spend["input_tokens"] == 200
    assert spend["truth"] == {"measured": 0, "modeled": 1, "estimated": 1}
    assert set(spend["by_model"]) == {"a", "b"}
    assert ledger.mission_spend("nothing")["calls"] == 0


def test_thresholds_fire_once_each_across_ledger_instances(tmp_path):
    path = tmp_path / "ledger.db"
    first = Ledger.open(path)
    second = Ledger.open(path)
    first.add(ev(1, mission_id="m", cost_usd=3.0, input_tokens=1000, output_tokens=0))
    assert first.check_thresholds("m", warn_at_usd=4, warn_at_tokens=5000) == []
    first.add(ev(2, mission_id="m", cost_usd=1.5, input_tokens=1000, output_tokens=0))
    fired = second.check_thresholds("m", warn_at_usd=4, warn_at_tokens=5000)
    assert len(fired) == 1 and "warn_at_usd" in fired[0] and "$4.50" in fired[0]
    assert first.check_thresholds("m", warn_at_usd=4, warn_at_tokens=5000) == []
    first.add(ev(3, mission_id="m", cost_usd=0.0, input_tokens=4000, output_tokens=0))
    fired = first.check_thresholds("m", warn_at_usd=4, warn_at_tokens=5000)
    assert len(fired) == 1 and "warn_at_tokens" in fired[0]
    assert second.check_thresholds("m", warn_at_usd=4, warn_at_tokens=5000) == []
    # Another mission has its own flags.
    second.add(ev(4, mission_id="other", cost_usd=10.0))
    assert len(second.check_thresholds("other", warn_at_usd=4)) == 1
    first.close()
    second.close()


WRITER = textwrap.dedent(
    """
    import sys
    from cage.ledger import Event, Ledger
    worker, count = int(sys.argv[1]), int(sys.argv[2])
    events = (
        Event(timestamp="2026-11-23T10:00:00Z", provider="openai", model="gpt-4o",
              input_tokens=1, output_tokens=2, cost_usd=0.001, truth="modeled",
              caller=f"w{worker}", request_id=f"w{worker}-{i}")
        for i in range(count)
    )
    with Ledger.open(sys.argv[3]) as ledger:
        print(ledger.add_many(events))
    """
)


def test_eight_concurrent_writers_leave_exactly_80000_rows(tmp_path):
    path = tmp_path / "ledger.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(worker), "10000", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in range(8)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.strip() == "(10000, 0)"
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*), count(DISTINCT request_id) FROM events").fetchone() == (
        80_000,
        80_000,
    )
    with Ledger.open(path) as ledger:
        rows = ledger.report("caller")
    assert sorted(r["key"] for r in rows) == [f"w{i}" for i in range(8)]
    assert all(r["calls"] == 10_000 for r in rows)


def test_a_writer_kept_waiting_says_so_once_then_writes(tmp_path, monkeypatch, caplog):
    # Another process holds the write lock (an import, a proxy): the writer waits, tells
    # the user once instead of looking hung, and writes as soon as the lock is free.
    import threading

    import cage.ledger as ledger_mod

    monkeypatch.setattr(ledger_mod, "BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "ledger.db"
    Ledger.open(path).close()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.6, lambda: holder.execute("COMMIT"))
    release.start()
    with Ledger.open(path) as ledger:
        assert ledger.add_many([ev(1), ev(2)]) == (2, 0)
    release.join()
    holder.close()
    notices = [r.getMessage() for r in caplog.records if r.name == "cage.ledger"]
    assert len(notices) == 1
    assert f"the ledger {path} is locked by another process" in notices[0]


CRASHER = textwrap.dedent(
    """
    import os, sys
    from cage.ledger import Event, Ledger
    def events():
        for i in range(10_000):
            if i == 2_500:
                os._exit(9)  # a crash: no close, no rollback, no atexit
            yield Event(timestamp="2026-11-23T10:00:00Z", provider="openai", model="gpt-4o",
                        request_id=f"r{i}")
    Ledger.open(sys.argv[1]).add_many(events())
    """
)


def test_a_crash_mid_import_keeps_every_committed_batch(tmp_path):
    path = tmp_path / "ledger.db"
    done = subprocess.run([sys.executable, "-c", CRASHER, str(path)], check=False)
    assert done.returncode == 9
    with Ledger.open(path) as ledger:
        # Batches of 1,000 were committed before the crash; the batch in flight is lost.
        assert ledger.report("model")[0]["calls"] == 2_000
        # Re-running the import restores the rest without duplicates.
        more = (ev(i, request_id=f"r{i}", provider="openai", model="gpt-4o") for i in range(3000))
        assert ledger.add_many(more) == (1000, 2000)


def test_ledger_file_is_private_to_the_test(tmp_path):
    # conftest points CAGE_LEDGER at a temporary file: never the user's ledger.
    assert str(default_ledger_path()) == os.environ["CAGE_LEDGER"]


def test_reports_with_any_bounds_equal_a_brute_force_sum(ledger):
    # Whole days come from the rollups, partial days from the events: every split of a
    # range must give what summing the events directly gives.
    import random

    rng = random.Random(3)
    stamps = [
        f"2026-11-{day:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"
        for day in (20, 20, 21, 21, 21, 22, 23, 23, 24, 25)
        for _ in range(3)
    ]
    events = [
        ev(
            i,
            timestamp=t,
            model=rng.choice("ab"),
            cost_usd=rng.choice([None, 0.25, 1.0]),
            mission_id=rng.choice(["m1", "m2"]),
            caller=rng.choice(["x", None]),
        )
        for i, t in enumerate(stamps)
    ]
    ledger.add_many(events)
    bounds = [
        None,
        "2026-11-21",
        "2026-11-21T06:30:00Z",
        "2026-11-23T00:00:00Z",
        "2026-11-23T18:00:00Z",
        "2026-11-25",
    ]
    for since in bounds:
        for until in bounds:
            for mission in (None, "m1"):
                for by, attr in (("model", "model"), ("caller", "caller")):
                    low = parse_bound(since, end=False) or ""
                    high = parse_bound(until, end=True) or "9999"
                    expected: dict = {}
                    for e in events:
                        stamp = normalise_timestamp(e.timestamp)
                        if low <= stamp < high and mission in (None, e.mission_id):
                            row = expected.setdefault(getattr(e, attr), [0, 0.0, 0])
                            row[0] += 1
                            row[1] += e.cost_usd or 0.0
                            row[2] += e.cost_usd is None
                    got = {
                        r["key"]: [r["calls"], round(r["cost_usd"], 6), r["unpriced"]]
                        for r in ledger.report(by, since=since, until=until, mission=mission)
                    }
                    expected = {k: [n, round(c, 6), u] for k, (n, c, u) in expected.items()}
                    assert got == expected, (by, since, until, mission)


def test_a_directory_or_an_unopenable_ledger_is_named_without_advice_to_move_it(tmp_path):
    with pytest.raises(LedgerError, match="is a directory; point CAGE_LEDGER"):
        Ledger.open(tmp_path)
    path = tmp_path / "ledger.db"
    Ledger.open(path).close()
    size = path.stat().st_size
    # The WAL side files cannot be made (as on a read-only mount): the ledger itself is fine.
    (tmp_path / "ledger.db-shm").mkdir()
    (tmp_path / "ledger.db-wal").mkdir()
    with pytest.raises(LedgerError) as caught:
        Ledger.open(path)
    assert "cannot use the ledger" in caught.value.message
    assert "move it away" not in caught.value.message
    assert path.stat().st_size == size


def test_a_nan_or_infinite_cost_is_refused_and_the_total_stays_finite(tmp_path):
    ledger = Ledger.open(tmp_path / "ledger.db")
    for n, cost in enumerate((float("inf"), float("nan"))):
        with pytest.raises(LedgerError, match="cost_usd must be a finite number"):
            ledger.add(ev(n, cost_usd=cost))
    assert ledger.add(ev(9, cost_usd=0.25))
    (row,) = ledger.report("model")
    assert row["cost_usd"] == 0.25
    ledger.close()


def test_a_tilde_for_an_unknown_user_is_kept_as_written(monkeypatch, tmp_path):
    # Path.expanduser raised RuntimeError (a traceback) for "~nosuchuser/...".
    monkeypatch.setenv("CAGE_LEDGER", "~nosuchuser-cage-qa/x.db")
    assert default_ledger_path() == Path("~nosuchuser-cage-qa/x.db")
    monkeypatch.chdir(tmp_path)
    Ledger.open("~nosuchuser-cage-qa/y.db").close()
    assert (tmp_path / "~nosuchuser-cage-qa" / "y.db").is_file()


def test_add_many_fields_builds_the_rows_add_fields_builds():
    # The import loop builds common rows inline; it must give exactly the rows and sums
    # that pricing each event and calling add_fields gives.
    from cage.ledger import RowBatch

    def price(provider, model, stamp, inp, out, cache_read, cache_write, write_1h):
        return None if model == "unknown" else inp * 1e-6 + out * 2e-6 + write_1h * 1e-7

    def fields(n: int, **more) -> dict:
        base = {
            "timestamp": f"2026-11-2{n % 3}T10:00:0{n}.5Z",
            "provider": "anthropic",
            "model": "claude-sonnet-4",
            "input_tokens": n,
            "output_tokens": 2 * n,
            "cache_read_tokens": 1,
            "cache_write_tokens": 3,
            "cost_usd": None,
            "truth": "measured",
            "request_id": f"r{n}",
            "source": "claude-code",
            "extra": {"session_id": "s"},
        }
        base.update(more)
        return base

    events = [
        fields(0),
        fields(1, cost_usd=0.25),
        fields(2, model="unknown"),
        fields(3, truth="estimated"),
        fields(4, caller="ci", mission_id="m"),
        fields(5, extra={"cache_write_1h_tokens": 2, "ids": [1, 2]}),
        fields(6, request_id="", extra={}),
        fields(7, role=None, duration_s=1.5),
        fields(8, truth=None),
        {k: v for k, v in fields(9).items() if k != "cache_read_tokens"},  # a default
    ]
    expected = RowBatch()
    for event in [dict(e) for e in events]:
        if event.get("cost_usd") is None:
            extra = event.get("extra")
            event["cost_usd"] = price(
                event["provider"],
                event["model"],
                event["timestamp"],
                event.get("input_tokens", 0),
                event.get("output_tokens", 0),
                event.get("cache_read_tokens", 0),
                event.get("cache_write_tokens", 0),
                int(extra.get("cache_write_1h_tokens") or 0) if extra else 0,
            )
            if event.get("truth") != "estimated":
                event["truth"] = "modeled"
        expected.add_fields(event)
    got = RowBatch()
    got.add_many_fields([dict(e) for e in events], price)
    assert (got.short, got.rows, got.sums) == (expected.short, expected.rows, expected.sums)
    assert len(got.short) == 8 and len(got.rows) == 2


def test_a_new_ledger_has_large_pages_and_an_old_one_keeps_its_own(tmp_path):
    # 16 KB pages make a million-row import cheaper; a ledger made with SQLite's default
    # 4 KB pages (older cage) is used as it is, never rebuilt.
    new = tmp_path / "new.db"
    Ledger.open(new).close()
    assert sqlite3.connect(new).execute("PRAGMA page_size").fetchone()[0] == 16384
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.execute("PRAGMA page_size = 4096")
    db.execute("PRAGMA journal_mode = WAL")
    db.close()
    ledger = Ledger.open(old)
    ledger.add_many([Event(timestamp="2026-11-23T10:00:00Z", provider="openai", model="m")])
    ledger.close()
    db = sqlite3.connect(old)
    assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 1
