"""The spend ledger: one row per LLM call, in SQLite by default.

Design (see docs/ledger.md for the user-facing version):

- ``events`` holds one row per call: the :class:`Event` fields, ``extra`` as JSON text, the
  timestamp as ISO 8601 UTC text truncated to whole seconds (``2026-11-23T10:00:00Z``), so
  text order is time order and the UTC day is ``substr(timestamp, 1, 10)``.
- ``request_id`` is unique (NULLs allowed any number of times): inserting the same source
  call twice is a no-op, which makes every import idempotent. Since schema 4 uniqueness is
  enforced on ``rid``, a 128-bit BLAKE2b hash of the id (:func:`request_key`), not on the
  text: a 16-byte key keeps the index small and cheap to insert into however long and random
  the ids are (the text stays in ``request_id`` for display and queries).
- Calls that several sources see share one canonical id (:func:`canonical_request_id`):
  an Anthropic or OpenAI call is ``<provider>:<upstream request id>`` whether the proxy
  recorded it or a transcript import found it, so it is counted once.
- ``rollup_model``, ``rollup_caller``, ``rollup_mission`` (:data:`ROLLUPS`) hold running
  totals per (UTC day, dimensions, truth), written in the same transaction as the events
  they sum, so a report reads a few thousand rows instead of scanning a million. Triggers
  keep them right when someone deletes or edits events by hand; inserts are summed by the
  writer in SQL (one statement per batch and rollup), several times cheaper than a per-row
  trigger. Bulk writers (the importers) sum their rows in Python instead
  (:class:`RowBatch`) and write one upsert per group.
- The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` are forward
  steps, applied under a write lock. A ledger newer than this cage is refused.

Storage sits behind :class:`Ledger` so that a PostgreSQL backend (``postgresql://`` URLs)
can follow; this build refuses such URLs with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any

from cage.errors import LedgerError

TRUTH_LABELS: tuple[str, ...] = ("measured", "modeled", "estimated")

# `cage report --by X` -> the rollup column that is the group key.
REPORT_KEYS: dict[str, str] = {
    "model": "model",
    "provider": "provider",
    "caller": "caller",
    "mission": "mission_id",
    "day": "day",
}

# Events per write transaction in add_many(). Small enough that a crash loses little (and
# imports are idempotent, so re-running one restores it), large enough that the per-commit
# cost (a WAL append, no fsync under synchronous=NORMAL) is amortised.
BATCH_SIZE = 1000

# How long a writer keeps retrying when other processes hold the write lock. The SQLite
# busy handler waits BUSY_TIMEOUT_MS per attempt; the retry loop goes on until RETRY_FOR_S,
# and says once that it is waiting (a lock held that long is another import, a proxy or a
# mission writing: silence would look like a hang).
BUSY_TIMEOUT_MS = 2_000
PAGE_SIZE = 16384  # bytes, for a new ledger file
_INF = float("inf")
RETRY_FOR_S = 120.0


@dataclass
class Event:
    """One LLM call. Counts only: no prompt or completion text, ever."""

    timestamp: str  # ISO 8601 UTC, e.g. "2026-11-23T10:00:00Z"
    provider: str
    model: str
    input_tokens: int = 0  # prompt tokens NOT served from cache and not written to cache
    output_tokens: int = 0  # includes reasoning tokens
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0  # extra["cache_write_1h_tokens"] may say how many were 1h
    cost_usd: float | None = None  # None = unpriced, 0 only when truly free
    truth: str = "estimated"  # measured | modeled | estimated
    role: str | None = None
    caller: str | None = None
    mission_id: str | None = None
    duration_s: float | None = None
    error_class: str | None = None
    request_id: str | None = None  # unique per source call; duplicates are skipped
    source: str | None = None  # "proxy", "meter", "claude-code", "codex", "jsonl"
    extra: dict = field(default_factory=dict)  # counts/ids only, never content

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (AttributionEvent-compatible field names)."""
        return {name: getattr(self, name) for name in _EVENT_FIELDS}


_EVENT_FIELDS: tuple[str, ...] = (
    "timestamp",
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "truth",
    "role",
    "caller",
    "mission_id",
    "duration_s",
    "error_class",
    "request_id",
    "source",
    "extra",
)


# ---------------------------------------------------------------------------------------
# Schema and migrations

_SUMS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "unpriced",
)
# How each rollup sum is computed from events `e`, and what one event row contributes.
_SUM_OF_EVENTS = (
    "count(*)",
    "sum(e.input_tokens)",
    "sum(e.output_tokens)",
    "sum(e.cache_read_tokens)",
    "sum(e.cache_write_tokens)",
    "total(e.cost_usd)",
    "sum(e.cost_usd IS NULL)",
)
_ONE_ROW = (
    "1",
    "old.input_tokens",
    "old.output_tokens",
    "old.cache_read_tokens",
    "old.cache_write_tokens",
    "ifnull(old.cost_usd, 0)",
    "(old.cost_usd IS NULL)",
)
# Event column -> rollup key expression. NULL keys are stored as '' because a primary key
# treats NULLs as distinct; the writer turns empty caller/mission strings into NULL, so
# '' in a rollup means exactly "none".
_KEY_OF = {
    "provider": "{t}.provider",
    "model": "{t}.model",
    "caller": "ifnull({t}.caller, '')",
    "mission_id": "ifnull({t}.mission_id, '')",
}

# The rollups (schema 3): each sums events per (UTC day, its dimensions, truth). One per
# report shape keeps each small whatever the others' cardinality: by-model rows are bounded
# by days x models even with a million distinct missions.
ROLLUPS: dict[str, tuple[str, ...]] = {
    "rollup_model": ("provider", "model"),
    "rollup_caller": ("caller",),
    "rollup_mission": ("mission_id", "provider", "model"),
}


def _rollup_table_sql(table: str, dims: Sequence[str]) -> str:
    columns = ", ".join(f"{d} TEXT NOT NULL" for d in ("day", *dims, "truth"))
    sums = ", ".join(
        f"{name} {'REAL' if name == 'cost_usd' else 'INTEGER'} NOT NULL" for name in _SUMS
    )
    key = ", ".join(("day", *dims, "truth"))
    return f"CREATE TABLE {table} ({columns}, {sums}, PRIMARY KEY ({key})) WITHOUT ROWID"


def _rollup_upsert_sql(table: str, dims: Sequence[str], where: str) -> str:
    """Sum the events matching ``where`` (events aliased ``e``) into one rollup table."""
    key = ("day", *dims, "truth")
    keys = ", ".join(
        ["substr(e.timestamp, 1, 10)", *(_KEY_OF[d].format(t="e") for d in dims), "e.truth"]
    )
    groups = ", ".join(str(i + 1) for i in range(len(key)))
    updates = ", ".join(f"{name} = {name} + excluded.{name}" for name in _SUMS)
    return (
        f"INSERT INTO {table} ({', '.join(key)}, {', '.join(_SUMS)}) "
        f"SELECT {keys}, {', '.join(_SUM_OF_EVENTS)} FROM events AS e WHERE {where} "
        f"GROUP BY {groups} ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


def _rollup_subtract_sql(table: str, dims: Sequence[str]) -> str:
    """Take the ``old`` event row out of one rollup table (inside a trigger)."""
    sets = ", ".join(f"{name} = {name} - {one}" for name, one in zip(_SUMS, _ONE_ROW, strict=True))
    match = " AND ".join(
        [
            "day = substr(old.timestamp, 1, 10)",
            *(f"{d} = {_KEY_OF[d].format(t='old')}" for d in dims),
            "truth = old.truth",
        ]
    )
    return f"UPDATE {table} SET {sets} WHERE {match}; DELETE FROM {table} WHERE calls <= 0"


def _rollup_triggers_sql(rollups: Mapping[str, Sequence[str]]) -> tuple[str, str]:
    # Manual DELETE/UPDATE of events (sqlite3 shell, a cleanup script) keeps the rollups
    # right. Inserts are summed by the writer instead (one statement per batch and rollup),
    # several times cheaper than a per-row trigger at import scale.
    subtract = "; ".join(_rollup_subtract_sql(t, d) for t, d in rollups.items())
    add_new = "; ".join(_rollup_upsert_sql(t, d, "e.id = new.id") for t, d in rollups.items())
    return (
        f"CREATE TRIGGER events_rollup_delete AFTER DELETE ON events BEGIN {subtract}; END",
        f"CREATE TRIGGER events_rollup_update AFTER UPDATE ON events BEGIN {subtract}; "
        f"{add_new}; END",
    )


_V2_ROLLUP = {"rollup": ("provider", "model", "caller", "mission_id")}

# MIGRATIONS[i] takes a ledger from user_version i to i + 1. Append only; never change
# what a step that has shipped does (ledgers in the field have already run it).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the events table.
    (
        "CREATE TABLE events ("
        " id INTEGER PRIMARY KEY,"
        " timestamp TEXT NOT NULL,"
        " provider TEXT NOT NULL,"
        " model TEXT NOT NULL,"
        " input_tokens INTEGER NOT NULL DEFAULT 0,"
        " output_tokens INTEGER NOT NULL DEFAULT 0,"
        " cache_read_tokens INTEGER NOT NULL DEFAULT 0,"
        " cache_write_tokens INTEGER NOT NULL DEFAULT 0,"
        " cost_usd REAL,"
        " truth TEXT NOT NULL DEFAULT 'estimated'"
        "  CHECK (truth IN ('measured', 'modeled', 'estimated')),"
        " role TEXT,"
        " caller TEXT,"
        " mission_id TEXT,"
        " duration_s REAL,"
        " error_class TEXT,"
        " request_id TEXT UNIQUE,"
        " source TEXT,"
        " extra TEXT NOT NULL DEFAULT '{}'"
        ")",
        "CREATE INDEX events_timestamp ON events (timestamp)",
    ),
    # 2: one rollup over every dimension, budget threshold flags, and a backfill.
    (
        _rollup_table_sql("rollup", _V2_ROLLUP["rollup"]),
        "CREATE INDEX rollup_mission ON rollup (mission_id, day)",
        "CREATE INDEX events_mission ON events (mission_id, timestamp)",
        "CREATE TABLE thresholds ("
        " mission_id TEXT NOT NULL,"
        " kind TEXT NOT NULL,"
        " threshold REAL NOT NULL,"
        " value REAL NOT NULL,"
        " fired_at TEXT NOT NULL,"
        " PRIMARY KEY (mission_id, kind)"
        ")",
        _rollup_upsert_sql("rollup", _V2_ROLLUP["rollup"], "1"),
        *_rollup_triggers_sql(_V2_ROLLUP),
    ),
    # 3: the single rollup grows with missions x callers; replace it by one per report
    # shape (ROLLUPS), backfilled from the events.
    (
        "DROP TRIGGER events_rollup_delete",
        "DROP TRIGGER events_rollup_update",
        "DROP TABLE rollup",
        *(_rollup_table_sql(t, d) for t, d in ROLLUPS.items()),
        *(_rollup_upsert_sql(t, d, "1") for t, d in ROLLUPS.items()),
        *_rollup_triggers_sql(ROLLUPS),
    ),
)


def request_key(request_id: str) -> bytes:
    """The 16-byte key the ledger's uniqueness is enforced on: BLAKE2b-128 of the id.

    Two distinct ids share a key with probability about n**2 / 2**129 for n ids: below
    1e-20 for a billion events, far below any other cause of error.
    """
    return hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def canonical_request_id(provider: str, upstream_id: str) -> str:
    """The id of a call an upstream named ``upstream_id``: ``<provider>:<upstream_id>``.

    The proxy (from the ``request-id`` / ``x-request-id`` response header, else the
    response's own id) and the transcript importers (Claude Code's ``requestId``, which is
    that same header) both use it, so a call seen by both is recorded once.
    """
    return f"{provider}:{upstream_id}"


def _legacy_canonical_id(source: str | None, provider: str, request_id: str | None) -> str | None:
    """Schema 4: an id written before canonical ids, as it would be written now.

    Before schema 4 the proxy stored the upstream's id bare (``req_…``) and the Claude Code
    importer stored ``claude-code:<message.id>:<requestId>``; both now use
    :func:`canonical_request_id`, so a call recorded before the upgrade and seen again
    afterwards (a re-import, the other source) is not counted twice.
    """
    if request_id is None:
        return None
    if source == "proxy" and not request_id.startswith("cage-proxy-"):
        return canonical_request_id(provider, request_id)
    if source == "claude-code" and request_id.startswith("claude-code:"):
        parts = request_id.split(":", 2)
        if len(parts) == 3 and parts[1] != "line" and parts[2] not in ("", "-"):
            return canonical_request_id("anthropic", parts[2])
    return request_id


_V4_COLUMNS = ("id", *_EVENT_FIELDS)


def _migrate_to_v4(db: sqlite3.Connection) -> None:
    """Schema 4: uniqueness on a 16-byte hash of the id, canonical ids, and a mission index
    that leaves out the events of no mission (most imported calls).

    The events table is rebuilt (SQLite cannot drop a column's UNIQUE constraint), old ids
    are rewritten to their canonical form, and when two old rows turn out to be the same
    call (the proxy's copy and an import's) the first one stored is kept. The rollups are
    then rebuilt from the events.
    """
    db.create_function("cage_request_key", 1, _key_or_none, deterministic=True)
    db.create_function("cage_canonical_id", 3, _legacy_canonical_id, deterministic=True)
    db.execute("DROP TRIGGER IF EXISTS events_rollup_delete")
    db.execute("DROP TRIGGER IF EXISTS events_rollup_update")
    db.execute(_EVENTS_V4_SQL.replace("CREATE TABLE events", "CREATE TABLE events_v4"))
    # The unique key first, so that the copy below drops the second copy of a call; the
    # other indexes (whose names the old table still holds) after it is gone.
    db.execute(_EVENTS_V4_INDEXES[0].replace("ON events", "ON events_v4"))
    columns = ", ".join(_V4_COLUMNS)
    # ORDER BY id: of two old rows that are the same call, the first one stored is kept.
    db.execute(
        f"INSERT OR IGNORE INTO events_v4 ({columns}, rid) "
        f"SELECT {columns.replace('request_id', 'rq')}, cage_request_key(rq) FROM "
        "(SELECT *, cage_canonical_id(source, provider, request_id) AS rq FROM events) "
        "ORDER BY id"
    )
    db.execute("DROP TABLE events")
    db.execute("ALTER TABLE events_v4 RENAME TO events")
    for sql in _EVENTS_V4_INDEXES[1:]:
        db.execute(sql)
    for table, dims in ROLLUPS.items():
        db.execute(f"DELETE FROM {table}")
        db.execute(_rollup_upsert_sql(table, dims, "1"))
    for sql in _rollup_triggers_sql(ROLLUPS):
        db.execute(sql)


def _key_or_none(request_id: str | None) -> bytes | None:
    return None if request_id is None else request_key(request_id)


_EVENTS_V4_SQL = (
    "CREATE TABLE events ("
    " id INTEGER PRIMARY KEY,"
    " timestamp TEXT NOT NULL,"
    " provider TEXT NOT NULL,"
    " model TEXT NOT NULL,"
    " input_tokens INTEGER NOT NULL DEFAULT 0,"
    " output_tokens INTEGER NOT NULL DEFAULT 0,"
    " cache_read_tokens INTEGER NOT NULL DEFAULT 0,"
    " cache_write_tokens INTEGER NOT NULL DEFAULT 0,"
    " cost_usd REAL,"
    " truth TEXT NOT NULL DEFAULT 'estimated'"
    "  CHECK (truth IN ('measured', 'modeled', 'estimated')),"
    " role TEXT,"
    " caller TEXT,"
    " mission_id TEXT,"
    " duration_s REAL,"
    " error_class TEXT,"
    " request_id TEXT,"
    " source TEXT,"
    " extra TEXT NOT NULL DEFAULT '{}',"
    " rid BLOB"  # request_key(request_id); NULL when there is no request id
    ")"
)
_EVENTS_V4_INDEXES = (
    "CREATE UNIQUE INDEX events_rid ON events (rid)",
    "CREATE INDEX events_timestamp ON events (timestamp)",
    # Partial: `mission_id = ?` implies NOT NULL, so every mission query can use it, and
    # the (many) events of no mission cost no index entry.
    "CREATE INDEX events_mission ON events (mission_id, timestamp) WHERE mission_id IS NOT NULL",
)

# Steps may also be callables taking the connection (schema 4 needs Python functions).
MIGRATIONS = (*MIGRATIONS, (_migrate_to_v4,))

SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (*_EVENT_FIELDS, "rid")
_SHORT_COLUMNS = tuple(
    c for c in _COLUMNS if c not in ("role", "caller", "mission_id", "duration_s", "error_class")
)


def _insert_sql(columns: Sequence[str], rows: int = 1) -> str:
    one = f"({', '.join('?' * len(columns))})"
    return f"INSERT OR IGNORE INTO events ({', '.join(columns)}) VALUES {', '.join([one] * rows)}"


_INSERT = _insert_sql(_COLUMNS)
_INSERT_SHORT = _insert_sql(_SHORT_COLUMNS)
# Rows per statement for large batches: each execution of a statement has a fixed cost in
# the sqlite3 module, so binding 50 rows at a time costs about a third less per row than
# one (and 650 parameters stay far below SQLite's limit of 32,766 since 3.32, 999 before).
_ROWS_PER_INSERT = 50
_INSERT_SHORT_MANY = _insert_sql(_SHORT_COLUMNS, _ROWS_PER_INSERT)


def _insert_rows(db: sqlite3.Connection, rows: list[tuple]) -> None:
    """``INSERT OR IGNORE`` ``rows`` (of ``_SHORT_COLUMNS``) in order, many per statement."""
    whole = len(rows) - len(rows) % _ROWS_PER_INSERT
    if whole:
        step = _ROWS_PER_INSERT
        flat = chain.from_iterable
        db.executemany(
            _INSERT_SHORT_MANY, [tuple(flat(rows[i : i + step])) for i in range(0, whole, step)]
        )
    if whole < len(rows):
        db.executemany(_INSERT_SHORT, rows[whole:])


def _rollup_add_sql(table: str, dims: Sequence[str]) -> str:
    """Add one group's sums (computed in Python) to a rollup table."""
    key = ("day", *dims, "truth")
    updates = ", ".join(f"{name} = {name} + excluded.{name}" for name in _SUMS)
    return (
        f"INSERT INTO {table} ({', '.join(key)}, {', '.join(_SUMS)}) "
        f"VALUES ({', '.join('?' * (len(key) + len(_SUMS)))}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


# Fields that make an event a long row (see RowBatch): any of them present and non-empty.
_LONG_FIELDS = frozenset(("role", "caller", "mission_id", "duration_s", "error_class"))

# The fields of a common imported event, in one C call (a missing one: the general path).
_TAKE_FIELDS = itemgetter(
    "timestamp",
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "truth",
    "request_id",
    "source",
    "extra",
)

# Where each rollup's dimensions sit in a RowBatch group key
# (day, provider, model, caller, mission_id, truth).
_GROUP_INDEX = {"provider": 1, "model": 2, "caller": 3, "mission_id": 4}


def _add_call(
    sums: dict[tuple, list],
    key: tuple,
    inp: int,
    out: int,
    cache_read: int,
    cache_write: int,
    cost: float | None,
) -> None:
    """Count one call in its group's running totals: [calls, input, output, cache read,
    cache write, dollars of the priced calls, unpriced calls]."""
    group = sums.get(key)
    if group is None:
        sums[key] = [1, inp, out, cache_read, cache_write, cost or 0.0, int(cost is None)]
        return
    group[0] += 1
    group[1] += inp
    group[2] += out
    group[3] += cache_read
    group[4] += cache_write
    if cost is None:
        group[6] += 1
    else:
        group[5] += cost


def _add_totals(sums: dict[tuple, list], key: tuple, totals: Sequence[float]) -> None:
    """Add a group's running totals (as ``_add_call`` keeps them) to ``sums[key]``."""
    group = sums.get(key)
    if group is None:
        sums[key] = list(totals)
    else:
        for i, value in enumerate(totals):
            group[i] += value


class RowBatch:
    """Ledger rows ready to insert, with their rollup sums already added up in Python.

    Built where the rows are made (an importer's reader process builds it and sends it on;
    it pickles as plain lists and dicts), written in one transaction by
    :meth:`Ledger.add_batch`. When every row of it is new, the rollups get one upsert per
    (day, provider, model, caller, mission, truth) group instead of a pass over the rows.
    Rows without role, caller, mission, duration and error (every imported call) are kept
    apart and inserted without those five NULLs: binding parameters is a good part of an
    insert's cost.
    """

    __slots__ = ("_extras", "rows", "short", "sums")

    def __init__(self) -> None:
        self.rows: list[tuple] = []  # _COLUMNS
        self.short: list[tuple] = []  # _SHORT_COLUMNS
        # (day, provider, model, caller or '', mission_id or '', truth) -> the _SUMS
        self.sums: dict[tuple, list] = {}
        # extra items -> its JSON: a transcript repeats the same few (session, project, ...)
        self._extras: dict[tuple, str] = {}

    def __len__(self) -> int:
        return len(self.rows) + len(self.short)

    def __getstate__(self) -> tuple:
        return self.rows, self.short, self.sums

    def __setstate__(self, state: tuple) -> None:
        self.rows, self.short, self.sums = state
        self._extras = {}

    @classmethod
    def combine(cls, parts: Sequence[RowBatch]) -> RowBatch:
        """One batch holding the rows of ``parts``, in order, and their summed rollups."""
        whole = cls()
        sums = whole.sums
        for part in parts:
            whole.rows.extend(part.rows)
            whole.short.extend(part.short)
            for key, values in part.sums.items():
                _add_totals(sums, key, values)
        return whole

    def add_event(self, event: Event) -> None:
        """Add one Event, validated (:class:`LedgerError` names what is wrong)."""
        self._add(*_event_row(event))

    def add_fields(self, fields: Mapping[str, Any]) -> None:
        """Add one event given as a dict of :class:`Event` fields already validated, unchecked.

        For the importers, which check each field as they parse it: the timestamp in UTC as
        ``YYYY-MM-DDTHH:MM:SS[.fraction]Z`` (the fraction is dropped here), a truth label,
        non-empty provider and model, token counts as ints >= 0, a cost as float or None.
        """
        get = fields.get
        extra_json = self._extra_json(get("extra"))
        self._add(
            fields["timestamp"][:19] + "Z",
            fields["provider"],
            fields["model"],
            get("input_tokens", 0),
            get("output_tokens", 0),
            get("cache_read_tokens", 0),
            get("cache_write_tokens", 0),
            get("cost_usd"),
            get("truth", "estimated"),
            get("role") or None,
            get("caller") or None,
            get("mission_id") or None,
            get("duration_s"),
            get("error_class") or None,
            get("request_id") or None,
            get("source"),
            extra_json,
        )

    def _extra_json(self, extra: dict | None) -> str:
        """``extra`` as stored: JSON text, remembered for the batch's repeated extras (an
        import's events of one session share theirs)."""
        if not extra:
            return "{}"
        try:
            items = tuple(extra.items())
            extra_json = self._extras.get(items)
        except TypeError:  # an unhashable value (a list): encode it each time
            return _encode_extra(extra)
        if extra_json is None:
            extra_json = _encode_extra(extra)
            if len(self._extras) < 1024:
                self._extras[items] = extra_json
        return extra_json

    def add_many_fields(self, batch: Iterable[dict], price: Any = None) -> None:
        """``add_fields`` for each of ``batch``, pricing the events without a cost first.

        ``price(provider, model, timestamp, input, output, cache_read, cache_write,
        cache_write_1h)`` gives a cost or None (unpriced); a priced event's truth becomes
        ``modeled`` unless it was ``estimated``, as :func:`cage.pricing.price_event` does.
        The loop of an import, once per event: the rows of the common shape (no role,
        caller, mission, duration or error) are built inline, the others by ``add_fields``.
        """
        short = self.short
        sums = self.sums
        extra_of = self._extra_json
        long_keys = _LONG_FIELDS
        key_of = request_key
        take = _TAKE_FIELDS
        for fields in batch:
            try:
                (
                    stamp,
                    provider,
                    model,
                    inp,
                    out,
                    cache_read,
                    cache_write,
                    cost,
                    truth,
                    request_id,
                    source,
                    extra,
                ) = take(fields)
            except KeyError:  # a field left to its default: the general path
                self._add_priced(fields, price)
                continue
            if not long_keys.isdisjoint(fields):
                self._add_priced(fields, price)
                continue
            if cost is None and price is not None:
                cost = price(
                    provider,
                    model,
                    stamp,
                    inp,
                    out,
                    cache_read,
                    cache_write,
                    int(extra.get("cache_write_1h_tokens") or 0) if extra else 0,
                )
                if truth != "estimated":
                    truth = "modeled"
            extra_json = extra_of(extra)
            request_id = request_id or None
            short.append(
                (
                    stamp[:19] + "Z",
                    provider,
                    model,
                    inp,
                    out,
                    cache_read,
                    cache_write,
                    cost,
                    truth,
                    request_id,
                    source,
                    extra_json,
                    None if request_id is None else key_of(request_id),
                )
            )
            _add_call(
                sums,
                (stamp[:10], provider, model, "", "", truth),
                inp,
                out,
                cache_read,
                cache_write,
                cost,
            )

    def _add_priced(self, fields: dict, price: Any) -> None:
        """One event of ``add_many_fields`` the general way: priced, then ``add_fields``."""
        get = fields.get
        if get("cost_usd") is None and price is not None:
            extra = get("extra")
            fields["cost_usd"] = price(
                fields["provider"],
                fields["model"],
                fields["timestamp"],
                get("input_tokens", 0),
                get("output_tokens", 0),
                get("cache_read_tokens", 0),
                get("cache_write_tokens", 0),
                int(extra.get("cache_write_1h_tokens") or 0) if extra else 0,
            )
            if get("truth") != "estimated":
                fields["truth"] = "modeled"
        self.add_fields(fields)

    def _add(
        self,
        timestamp: str,
        provider: str,
        model: str,
        inp: int,
        out: int,
        cache_read: int,
        cache_write: int,
        cost: float | None,
        truth: str,
        role: str | None,
        caller: str | None,
        mission_id: str | None,
        duration_s: float | None,
        error_class: str | None,
        request_id: str | None,
        source: str | None,
        extra_json: str,
    ) -> None:
        rid = _key_or_none(request_id)
        if (
            role is None
            and caller is None
            and mission_id is None
            and duration_s is None
            and error_class is None
        ):
            self.short.append(
                (
                    timestamp,
                    provider,
                    model,
                    inp,
                    out,
                    cache_read,
                    cache_write,
                    cost,
                    truth,
                    request_id,
                    source,
                    extra_json,
                    rid,
                )
            )
        else:
            self.rows.append(
                (
                    timestamp,
                    provider,
                    model,
                    inp,
                    out,
                    cache_read,
                    cache_write,
                    cost,
                    truth,
                    role,
                    caller,
                    mission_id,
                    duration_s,
                    error_class,
                    request_id,
                    source,
                    extra_json,
                    rid,
                )
            )
        key = (timestamp[:10], provider, model, caller or "", mission_id or "", truth)
        _add_call(self.sums, key, inp, out, cache_read, cache_write, cost)


# ---------------------------------------------------------------------------------------
# Locations


def default_ledger_path() -> Path:
    """Where the ledger lives: ``$CAGE_LEDGER``, else the user data directory.

    ``$XDG_DATA_HOME/cage/ledger.db`` (default ``~/.local/share/cage/ledger.db``) on Linux
    and other Unixes, ``~/Library/Application Support/cage/ledger.db`` on macOS,
    ``%LOCALAPPDATA%\\cage\\ledger.db`` on Windows.
    """
    env = os.environ.get("CAGE_LEDGER")
    if env:
        # os.path.expanduser leaves "~nosuchuser" as it is; Path.expanduser raises.
        return Path(os.path.expanduser(env))
    return _user_data_dir() / "cage" / "ledger.db"


def default_ledger_location() -> str:
    """The ledger location as a string; unlike a Path it keeps ``postgresql://`` URLs intact."""
    env = os.environ.get("CAGE_LEDGER")
    if env and _is_url(env):
        return env
    return str(default_ledger_path())


def _user_data_dir() -> Path:
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support"
    if sys.platform.startswith("win"):
        local = os.environ.get("LOCALAPPDATA")
        return Path(local) if local else home / "AppData" / "Local"
    xdg = os.environ.get("XDG_DATA_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    return home / ".local" / "share"


def _is_url(location: str) -> bool:
    return "://" in location


# ---------------------------------------------------------------------------------------
# Timestamps and bounds

_ISO_Z = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?Z")
_DATE = re.compile(r"\d{4}-\d\d-\d\d")


def normalise_timestamp(value: str | datetime) -> str:
    """ISO 8601 text or a datetime -> ``YYYY-MM-DDTHH:MM:SSZ`` in UTC (whole seconds).

    Naive values are taken as UTC. Raises ValueError naming the value when it is not a
    timestamp. Whole seconds keep text order equal to time order.
    """
    if isinstance(value, datetime):
        dt = value
    else:
        match = _ISO_Z.fullmatch(value)
        if match:
            # Fast path for the common form; fromisoformat still validates the fields.
            head = match.group(1)
            datetime.fromisoformat(head)
            return head + "Z"
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        # Python 3.10's fromisoformat wants 0, 3 or 6 fractional digits: drop the fraction.
        text = re.sub(r"(T\d\d:\d\d:\d\d)\.\d+", r"\1", text)
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an ISO 8601 timestamp: {value!r}") from None
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_bound(value: str | date | datetime | None, *, end: bool) -> str | None:
    """A --since/--until value -> the timestamp text to compare with, or None.

    A date (``2026-11-23``) covers the whole UTC day: as a start it means 00:00:00, as an
    end it is inclusive (the comparison uses the next day's midnight, exclusive). A full
    timestamp is used as it is (inclusive). Raises ValueError for anything else.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        stamp = normalise_timestamp(value)
        return stamp if not end else _after(stamp)
    if isinstance(value, date):
        day = value
    elif _DATE.fullmatch(value.strip()):
        try:
            day = date.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"not a date: {value!r} (use YYYY-MM-DD)") from None
    else:
        try:
            stamp = normalise_timestamp(value)
        except ValueError:
            raise ValueError(
                f"not a date or timestamp: {value!r} (use YYYY-MM-DD or 2026-11-23T10:00:00Z)"
            ) from None
        return stamp if not end else _after(stamp)
    if end:
        day = day + timedelta(days=1)
    return day.isoformat() + "T00:00:00Z"


def _after(stamp: str) -> str:
    # An inclusive end timestamp as an exclusive bound: one second later.
    dt = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ") + timedelta(seconds=1)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# The ledger


class Ledger:
    """The spend ledger. Use :meth:`open`; the storage backend is chosen by location."""

    location: str

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> Ledger:
        """Open (creating and migrating if needed) the ledger at ``path`` or the default.

        ``postgresql://`` URLs are recognised but not supported in this build.
        """
        location = default_ledger_location() if path is None else os.fspath(path)
        if location.startswith(("postgresql://", "postgres://")):
            raise LedgerError(
                "PostgreSQL ledgers are not supported in this build "
                f"(CAGE_LEDGER / --ledger is {_redact_url(location)}): "
                "use a SQLite file path instead"
            )
        if _is_url(location) and not location.startswith("file:"):
            raise LedgerError(
                f"unsupported ledger location {_redact_url(location)}: "
                "give a file path (SQLite) instead"
            )
        return SQLiteLedger(Path(os.path.expanduser(location)))

    # The storage interface every backend implements.
    def add(self, event: Event) -> bool:
        """Record one event; False when its request_id is already in the ledger."""
        inserted, _ = self.add_many((event,))
        return inserted == 1

    def add_many(self, events: Iterable[Event]) -> tuple[int, int]:
        """Record events in batched transactions; returns (inserted, duplicates)."""
        raise NotImplementedError

    def add_batch(self, batch: RowBatch) -> tuple[int, int]:
        """Record a prepared :class:`RowBatch` in one transaction; (inserted, duplicates)."""
        raise NotImplementedError

    def bulk_mode(self) -> None:
        """Tune the backend for a long run of large batches (an import); a hint only."""

    def report(
        self,
        by: str,
        since: str | date | datetime | None = None,
        until: str | date | datetime | None = None,
        mission: str | None = None,
    ) -> list[dict]:
        """Spend grouped by ``by`` (model|provider|caller|mission|day); see docs/ledger.md."""
        raise NotImplementedError

    def check_thresholds(
        self,
        mission_id: str,
        warn_at_usd: float | None = None,
        warn_at_tokens: int | None = None,
    ) -> list[str]:
        """Warnings for thresholds this mission has crossed, each returned once, ever."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection."""
        raise NotImplementedError

    def mission_spend(self, mission_id: str) -> dict:
        """Totals for one mission, with a ``by_model`` breakdown and the truth split."""
        rows = self.report("model", mission=mission_id)
        totals = total_of(rows)
        totals["mission_id"] = mission_id
        totals["by_model"] = {row["key"]: _without_key(row) for row in rows}
        return totals

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def total_of(rows: Sequence[dict]) -> dict:
    """Sum report rows into one total row (without a key)."""
    total: dict[str, Any] = {
        "calls": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "cost_usd": 0.0,
        "unpriced": 0,
        "truth": dict.fromkeys(TRUTH_LABELS, 0),
    }
    for row in rows:
        for name in ("calls", "input_tokens", "output_tokens", "cache_read_tokens"):
            total[name] += row[name]
        total["cache_write_tokens"] += row["cache_write_tokens"]
        total["cost_usd"] += row["cost_usd"]
        total["unpriced"] += row["unpriced"]
        for label in TRUTH_LABELS:
            total["truth"][label] += row["truth"][label]
    total["cost_usd"] = round(total["cost_usd"], 9)
    return total


def _without_key(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "key"}


def _redact_url(url: str) -> str:
    # Never echo a password from a connection URL.
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _event_row(event: Event) -> tuple:
    try:
        timestamp = normalise_timestamp(event.timestamp)
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"event {event.request_id or ''}: {exc}".strip()) from None
    if event.truth not in TRUTH_LABELS:
        raise LedgerError(
            f"event truth must be one of {', '.join(TRUTH_LABELS)}, not {event.truth!r}"
        )
    if not event.provider or not event.model:
        raise LedgerError("event needs a provider and a model (both empty or missing)")
    counts = (
        event.input_tokens,
        event.output_tokens,
        event.cache_read_tokens,
        event.cache_write_tokens,
    )
    for count in counts:
        if type(count) is not int or count < 0:  # the exact-type test is the fast path
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                continue
            raise LedgerError(f"token counts must be whole numbers >= 0, got {count!r}")
    # NaN or inf stored once would make every later total NaN/inf (and report --json invalid).
    if event.cost_usd is not None and not -_INF < float(event.cost_usd) < _INF:
        raise LedgerError(f"cost_usd must be a finite number or None, got {event.cost_usd!r}")
    extra = event.extra
    return (
        timestamp,
        event.provider,
        event.model,
        *counts,
        None if event.cost_usd is None else float(event.cost_usd),
        event.truth,
        event.role or None,
        event.caller or None,
        event.mission_id or None,
        event.duration_s,
        event.error_class or None,
        event.request_id or None,
        event.source,
        _encode_extra(extra) if extra else "{}",
    )


# One encoder for every row: json.dumps with options builds a new encoder per call.
_encode_extra = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def retry_while_busy(action, path: Path | str):  # type: ignore[no-untyped-def]
    """``action()``, tried again while another connection holds the lock on ``path``, for up
    to RETRY_FOR_S; says once (logger ``cage.ledger``) that it is waiting. The last busy
    error propagates."""
    deadline = time.monotonic() + RETRY_FOR_S
    delay = 0.005
    told = False
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() > deadline:
                raise
            if not told:
                told = True
                import logging  # only now: most runs never wait

                logging.getLogger("cage.ledger").warning(
                    "cage: the ledger %s is locked by another process (an import, a proxy "
                    "or a mission writing to it); waiting up to %.0f s",
                    path,
                    RETRY_FOR_S,
                )
            # Jitter from the clock (no `random` import: it costs start-up time for every
            # `cage report`); it only has to differ between competing processes.
            time.sleep(delay * (1 + (time.perf_counter_ns() % 1000) / 1000))
            delay = min(delay * 2, 0.5)


class SQLiteLedger(Ledger):
    """The SQLite backend (the default): one local file in WAL mode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger folder {path.parent}: {exc}") from None
        if path.is_dir():
            raise LedgerError(
                f"the ledger {path} is a directory; point CAGE_LEDGER / --ledger at a file "
                f"(e.g. {path / 'ledger.db'})"
            )
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so a
            # write transaction takes the write lock up front instead of upgrading a read
            # lock later (an upgrade that can fail with SQLITE_BUSY without waiting).
            self._db = sqlite3.connect(
                str(path),
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger {path}: {exc}") from None
        try:
            self._configure()
            self._migrate()
        except sqlite3.OperationalError as exc:
            # Not a broken file: the file, its folder or the file system refuses access (a
            # read-only mount, a FIFO...). Never advise moving a ledger that may be fine.
            self._db.close()
            if _is_busy(exc):
                raise LedgerError(
                    f"the ledger {path} stayed locked by another process for "
                    f"{RETRY_FOR_S:.0f} s; try again when it has finished"
                ) from None
            raise LedgerError(
                f"cannot use the ledger {path} ({exc}): it must be a regular file that can be "
                f"written, in a writable folder (SQLite keeps {path.name}-wal and "
                f"{path.name}-shm beside it); nothing in it was changed"
            ) from None
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise LedgerError(
                f"{path} is not a usable cage ledger ({exc}); move it away or point "
                "CAGE_LEDGER / --ledger at another file"
            ) from None
        except LedgerError:
            self._db.close()
            raise

    def _configure(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # 16 KB pages (default 4 KB) for a new ledger: a row is ~300 bytes, and an import
        # writes a million of them; larger pages cut the B-tree and WAL work per row by about
        # a quarter (measured). No effect on an existing file (its size is fixed).
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        # WAL: readers never block the writer and the writer never blocks readers; each
        # commit is an append to the -wal file. synchronous=NORMAL skips the fsync per
        # commit: a committed transaction survives a crash of any process (the WAL is in
        # the OS page cache); only a power loss or OS crash can roll back the last few
        # commits, and it never corrupts the file.
        self._retry(lambda: db.execute("PRAGMA journal_mode = WAL").fetchone())
        db.execute("PRAGMA synchronous = NORMAL")
        # A 32 MB page cache (default 2 MB) keeps the request_id index of a large ledger in
        # memory while importing; a report touches only the small rollups and stays small.
        db.execute("PRAGMA cache_size = -32768")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"the ledger {self.path} has schema version {version}, but this cage "
                f"understands up to version {SCHEMA_VERSION}: upgrade cage "
                "(pip install -U cage-gate) or use another ledger (CAGE_LEDGER / --ledger)"
            )
        if version == SCHEMA_VERSION:
            return

        def step() -> None:
            # Re-read under the write lock: another process may have migrated meanwhile.
            current = self._db.execute("PRAGMA user_version").fetchone()[0]
            for target in range(current, SCHEMA_VERSION):
                for sql in MIGRATIONS[target]:
                    if callable(sql):
                        sql(self._db)
                    else:
                        self._db.execute(sql)
                self._db.execute(f"PRAGMA user_version = {target + 1}")

        self._write(step)

    # -- writing ------------------------------------------------------------------------

    def _retry(self, action):  # type: ignore[no-untyped-def]
        return retry_while_busy(action, self.path)

    def _write(self, action):  # type: ignore[no-untyped-def]
        """Run ``action`` inside BEGIN IMMEDIATE ... COMMIT, retrying while busy."""
        db = self._db

        def attempt():  # type: ignore[no-untyped-def]
            db.execute("BEGIN IMMEDIATE")
            try:
                result = action()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        return self._retry(attempt)

    def add_many(self, events: Iterable[Event]) -> tuple[int, int]:
        """Record events in transactions of BATCH_SIZE; returns (inserted, duplicates).

        Each batch is committed before the next is read, so a crash loses at most the
        batch in flight; rows with a request_id already present are skipped and counted.
        """
        inserted = duplicates = 0
        for events_batch in _batches(events, BATCH_SIZE):
            batch = RowBatch()
            for event in events_batch:
                batch.add_event(event)
            new, dup = self.add_batch(batch)
            inserted += new
            duplicates += dup
        return inserted, duplicates

    def bulk_mode(self) -> None:
        """Tune this connection for a long run of large batches (an import).

        Random request keys touch index pages all over the file, so each commit rewrites
        many of them: a 64 MB page cache keeps the index in memory, and checkpointing the
        WAL every 40 MB (default 4 MB) instead of after almost every commit writes each
        page to the database once per checkpoint rather than once per commit. Readers and
        other writers are unaffected; crash safety is the same (every commit is in the WAL).
        """
        self._db.execute("PRAGMA cache_size = -65536")
        self._db.execute("PRAGMA wal_autocheckpoint = 10000")

    def add_batch(self, batch: RowBatch) -> tuple[int, int]:
        """Record a :class:`RowBatch` in one transaction; returns (inserted, duplicates)."""
        if not len(batch):
            return 0, 0
        try:
            new = self._write(lambda: self._insert(batch))
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write to the ledger {self.path}: {exc}") from None
        return new, len(batch) - new

    def _insert(self, batch: RowBatch) -> int:
        db = self._db
        # We hold the write lock, so rows inserted now get ids above the current maximum.
        before = db.execute("SELECT ifnull(max(id), 0) FROM events").fetchone()[0]
        changes = db.total_changes
        if batch.short:
            _insert_rows(db, batch.short)
        if batch.rows:
            db.executemany(_INSERT, batch.rows)
        new = db.total_changes - changes
        if new == len(batch):
            # Every row is new (the common case): add the sums made in Python, one upsert
            # per group and rollup.
            for table, dims in ROLLUPS.items():
                merged: dict[tuple, list] = {}
                picks = [_GROUP_INDEX[d] for d in dims]
                for key, sums in batch.sums.items():
                    _add_totals(merged, (key[0], *[key[i] for i in picks], key[5]), sums)
                db.executemany(
                    _rollup_add_sql(table, dims),
                    [(*k, *v) for k, v in merged.items()],
                )
        elif new:
            # Some rows were duplicates (ignored): sum exactly the rows inserted, in SQL.
            for table, dims in ROLLUPS.items():
                db.execute(_rollup_upsert_sql(table, dims, "e.id > ?"), (before,))
        return new

    # -- reading ------------------------------------------------------------------------

    def report(
        self,
        by: str,
        since: str | date | datetime | None = None,
        until: str | date | datetime | None = None,
        mission: str | None = None,
    ) -> list[dict]:
        """Spend grouped by ``by``, sorted by cost (desc) then key; one GROUP BY query.

        Rows: key, calls, input/output/cache_read/cache_write tokens, cost_usd (sum of the
        priced calls), unpriced (calls with no price), truth {measured, modeled, estimated}
        (calls per label). Whole UTC days are read from a rollup table; the partial first
        or last day of a bound with a time of day (and by-caller within a mission) from the
        events table.
        """
        if by not in REPORT_KEYS:
            raise LedgerError(f"cannot report by {by!r}: use one of {', '.join(REPORT_KEYS)}")
        try:
            low = parse_bound(since, end=False)
            high = parse_bound(until, end=True)
        except ValueError as exc:
            raise LedgerError(str(exc)) from None
        key = REPORT_KEYS[by]
        mission_sql = " AND mission_id = ?" if mission is not None else ""
        mission_params = [mission] if mission is not None else []
        parts: list[str] = []
        params: list[Any] = []
        table = _rollup_for(key, mission is not None)
        if table is None:
            event_ranges: list[tuple[str | None, str | None]] = [(low, high)]
        else:
            # Whole UTC days come from the rollup; the partial first and last day of a bound
            # with a time of day come from the events table (its timestamp index).
            days, event_ranges = _split_by_days(low, high)
            if days is not None:
                first, last = days
                where = "1"
                if first is not None:
                    where += " AND day >= ?"
                    params.append(first)
                if last is not None:
                    where += " AND day < ?"
                    params.append(last)
                parts.append(
                    f"SELECT nullif({key}, '') AS k, calls, input_tokens, output_tokens, "
                    "cache_read_tokens, cache_write_tokens, cost_usd, unpriced, "
                    "(truth = 'measured') * calls AS m, (truth = 'modeled') * calls AS d, "
                    f"(truth = 'estimated') * calls AS e FROM {table} WHERE {where}" + mission_sql
                )
                params += mission_params
        column = "substr(timestamp, 1, 10)" if key == "day" else key
        for start, end in event_ranges:
            where = "1"
            if start is not None:
                where += " AND timestamp >= ?"
                params.append(start)
            if end is not None:
                where += " AND timestamp < ?"
                params.append(end)
            parts.append(
                f"SELECT {column} AS k, 1 AS calls, input_tokens, output_tokens, "
                "cache_read_tokens, cache_write_tokens, ifnull(cost_usd, 0) AS cost_usd, "
                "cost_usd IS NULL AS unpriced, truth = 'measured' AS m, "
                f"truth = 'modeled' AS d, truth = 'estimated' AS e FROM events WHERE {where}"
                + mission_sql
            )
            params += mission_params
        if not parts:
            return []
        sql = (
            "SELECT k, sum(calls), sum(input_tokens), sum(output_tokens), "
            "sum(cache_read_tokens), sum(cache_write_tokens), total(cost_usd) AS cost, "
            "sum(unpriced), sum(m), sum(d), sum(e) FROM ("
            + " UNION ALL ".join(parts)
            # Round inside the ordering so that float noise in the last bits cannot
            # reorder rows whose costs are equal to the cent-fraction users see.
            + ") GROUP BY k HAVING sum(calls) > 0 ORDER BY round(cost, 9) DESC, k IS NULL, k"
        )
        try:
            found = self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read the ledger {self.path}: {exc}") from None
        return [
            {
                "key": k,
                "calls": int(calls),
                "input_tokens": int(inp),
                "output_tokens": int(out),
                "cache_read_tokens": int(c_read),
                "cache_write_tokens": int(c_write),
                "cost_usd": round(cost, 9),
                "unpriced": int(unpriced),
                "truth": {
                    "measured": int(measured),
                    "modeled": int(modeled),
                    "estimated": int(estimated),
                },
            }
            for (
                k,
                calls,
                inp,
                out,
                c_read,
                c_write,
                cost,
                unpriced,
                measured,
                modeled,
                estimated,
            ) in found
            if calls
        ]

    def check_thresholds(
        self,
        mission_id: str,
        warn_at_usd: float | None = None,
        warn_at_tokens: int | None = None,
    ) -> list[str]:
        """Warnings for thresholds crossed by this mission, each returned once across processes.

        ``warn_at_usd`` compares with the priced cost; ``warn_at_tokens`` with all tokens
        (input + output + cache read + cache write). Each threshold is a separate flag in
        the ``thresholds`` table, claimed with INSERT OR IGNORE inside the write lock, so
        exactly one caller, in whatever process, gets each warning.
        """
        if warn_at_usd is None and warn_at_tokens is None:
            return []
        spend = self.mission_spend(mission_id)
        tokens = (
            spend["input_tokens"]
            + spend["output_tokens"]
            + spend["cache_read_tokens"]
            + spend["cache_write_tokens"]
        )
        crossed: list[tuple[str, float, float, str]] = []
        if warn_at_usd is not None and spend["cost_usd"] >= warn_at_usd:
            crossed.append(
                (
                    "warn_at_usd",
                    float(warn_at_usd),
                    spend["cost_usd"],
                    f"mission {mission_id} has spent ${spend['cost_usd']:.2f}, "
                    f"crossing warn_at_usd ${warn_at_usd:.2f}"
                    + (f" ({spend['unpriced']} calls unpriced)" if spend["unpriced"] else ""),
                )
            )
        if warn_at_tokens is not None and tokens >= warn_at_tokens:
            crossed.append(
                (
                    "warn_at_tokens",
                    float(warn_at_tokens),
                    float(tokens),
                    f"mission {mission_id} has used {tokens:,} tokens, "
                    f"crossing warn_at_tokens {warn_at_tokens:,}",
                )
            )
        if not crossed:
            return []
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

        def claim() -> list[str]:
            fired = []
            for kind, threshold, value, message in crossed:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO thresholds (mission_id, kind, threshold, value, "
                    "fired_at) VALUES (?, ?, ?, ?, ?)",
                    (mission_id, kind, threshold, value, now),
                )
                if cursor.rowcount == 1:
                    fired.append(message)
            return fired

        try:
            return self._write(claim)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write to the ledger {self.path}: {exc}") from None

    def events(self, mission: str | None = None) -> Iterator[Event]:
        """Every event (optionally of one mission), oldest first."""
        sql = "SELECT " + ", ".join(_EVENT_FIELDS) + " FROM events"
        params: tuple = ()
        if mission is not None:
            sql += " WHERE mission_id = ?"
            params = (mission,)
        sql += " ORDER BY timestamp, id"
        for row in self._db.execute(sql, params):
            values = dict(zip(_EVENT_FIELDS, row, strict=True))
            values["extra"] = json.loads(values["extra"] or "{}")
            yield Event(**values)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._db.close()


def _split_by_days(
    low: str | None, high: str | None
) -> tuple[tuple[str | None, str | None] | None, list[tuple[str | None, str | None]]]:
    """[low, high) -> (whole days [first, last) or None, partial ranges for the events).

    Bounds are timestamps (``...T00:00:00Z`` at midnight) or None (unbounded).
    """
    first = None if low is None else low[:10] if _is_midnight(low) else _next_day(low[:10])
    last = None if high is None else high[:10]
    partial: list[tuple[str | None, str | None]] = []
    if first is not None and last is not None and first >= last:
        # Both bounds inside one day (or crossing no midnight): no whole day at all.
        return None, [(low, high)] if low is not None and high is not None and low < high else []
    if low is not None and not _is_midnight(low):
        partial.append((low, first + "T00:00:00Z"))  # type: ignore[operator]
    if high is not None and not _is_midnight(high):
        partial.append((high[:10] + "T00:00:00Z", high))
    return (first, last), partial


def _is_midnight(stamp: str) -> bool:
    return stamp.endswith("T00:00:00Z")


def _next_day(day: str) -> str:
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


def _rollup_for(key: str, by_mission: bool) -> str | None:
    """The smallest rollup that has ``key`` (and mission_id when filtering by mission)."""
    for table, dims in ROLLUPS.items():
        have = {"day", *dims}
        if key in have and (not by_mission or "mission_id" in have):
            return table
    return None


def _batches(events: Iterable[Event], size: int) -> Iterator[list[Event]]:
    batch: list[Event] = []
    for event in events:
        batch.append(event)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
