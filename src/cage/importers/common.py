"""What every importer shares: line reading, incremental state, bad-line accounting, progress.

An importer turns a source file into ledger events, one line at a time. This module owns the
parts that do not depend on the format:

- ``read_complete_lines``: stream a file from a byte offset, yielding only complete lines, so
  a line the writer has not finished yet is left for the next import (an import's own loop
  does the same inline);
- ``StateStore``: per-file state (inode, size, mtime, bytes and lines consumed, parser context)
  in an ``import_state`` table of the ledger's SQLite file, so a second import reads only the
  new bytes;
- ``DedupWindow``: keeps, among copies of the same call seen close together, the best one;
- ``ImportReport``: counts and the first bad lines as ``file:line: why``;
- ``Progress``: one line on stderr, rewritten in place, when stderr is a terminal.

Nothing here stores or prints transcript text: a bad line is described by its position and
the reason, never by its content.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import stat
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

# Larger token counts are refused: no call uses them, and beyond 64 bits SQLite cannot
# store them (nor do JSON parsers agree on reading them).
MAX_TOKENS = 2**53
# At most this many bad lines are listed; the rest are counted.
MAX_LISTED_ERRORS = 20
# Events handed to the ledger per transaction; the file's state is saved after each batch.
BATCH_SIZE = 10_000
# Events per transaction when reader processes feed the writer (a large import). Each commit
# rewrites every index page it touched, and random request keys touch most of the unique
# index, so fewer, larger commits write far less: 50,000 costs about a quarter less CPU than
# 10,000 and much less disk. A crash still loses nothing: state is saved after its events.
WRITE_BATCH_SIZE = 50_000
READ_BUFFER = 1 << 20  # bytes per read of a transcript


class BadLine(Exception):
    """A line that cannot be turned into an event; the message says why (never the content)."""


@dataclass
class LineError:
    """One problem, located: ``file:line: message`` (line 0 when it concerns the whole file)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: {self.message}"
            if self.line
            else f"{self.file}: {self.message}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``--json``."""
        return {"file": self.file, "line": self.line or None, "message": self.message}


@dataclass
class ImportReport:
    """What one ``cage import`` run did."""

    source: str
    imported: int = 0
    duplicates: int = 0
    bad_lines: int = 0
    skipped: int = 0  # lines that are not billable calls (e.g. Claude Code's <synthetic> model)
    pending: int = 0  # files ending in an unfinished line, left for the next import
    files: int = 0
    files_unchanged: int = 0
    bytes_read: int = 0
    errors: list[LineError] = field(default_factory=list)
    failures: list[LineError] = field(default_factory=list)  # unreadable files or directories

    def bad(self, file: str, line: int, message: str) -> None:
        """Count a bad line; keep its location and reason if fewer than the cap are listed."""
        self.bad_lines += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append(LineError(file, line, message))

    def fail(self, file: str, message: str) -> None:
        """Record a file or directory that could not be read at all."""
        self.failures.append(LineError(file, 0, message))

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "source": self.source,
            "imported": self.imported,
            "duplicates": self.duplicates,
            "bad_lines": self.bad_lines,
            "skipped": self.skipped,
            "pending": self.pending,
            "files": self.files,
            "files_unchanged": self.files_unchanged,
            "bytes_read": self.bytes_read,
            "errors": [e.to_dict() for e in self.errors],
            "errors_not_listed": self.bad_lines - len(self.errors),
            "failures": [e.to_dict() for e in self.failures],
        }

    def text_lines(self) -> list[str]:
        """The human report: the summary line, then the listed problems."""
        lines = [
            f"imported {self.imported}, skipped duplicates {self.duplicates}, "
            f"bad lines {self.bad_lines}"
            + (f", not billable {self.skipped}" if self.skipped else "")
            + f" ({self.files} files, {self.files_unchanged} unchanged since the last import)"
        ]
        lines.extend(str(e) for e in self.errors)
        if self.bad_lines > len(self.errors):
            lines.append(f"... and {self.bad_lines - len(self.errors)} more bad lines")
        if self.pending:
            lines.append(
                f"{self.pending} file(s) end in an unfinished line; it is read by the next import"
            )
        lines.extend(str(e) for e in self.failures)
        return lines


# ---------------------------------------------------------------------------------------------
# Reading


def read_complete_lines(
    handle: Any, start_offset: int, start_line: int
) -> Iterator[tuple[int, int, int, bytes]]:
    """Yield ``(line_number, start_offset, end_offset, raw)`` for each complete line.

    ``handle`` is a binary file already positioned at ``start_offset``. A final line without a
    newline is yielded only when it is a complete JSON value (writers that omit the last
    newline are common); otherwise it is unfinished, not yielded, and the caller's offset
    stays before it, so nothing is lost when the writer completes it later.
    """
    offset = start_offset
    number = start_line
    for raw in handle:
        number += 1
        end = offset + len(raw)
        if not raw.endswith(b"\n") and not _is_complete_json(raw):
            return
        yield number, offset, end, raw
        offset = end


try:  # optional: parses a transcript line about three times faster than the stdlib
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the installation
    _orjson = None


def loads_line(raw: bytes) -> Any:
    """``json.loads(raw.decode("utf-8"))``: exactly its results and errors, faster with orjson.

    orjson is stricter (no NaN, integers within 64 bits, no lone surrogates): whatever it
    refuses is handed to the standard library, which then decides and names the problem,
    so a line reads the same with or without orjson installed.
    """
    if _orjson is not None:
        try:
            return _orjson.loads(raw)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(raw.decode("utf-8"))


def load_object(raw: bytes) -> dict:
    """The JSON object on one line (``loads_line``); ``BadLine`` naming why it is not one."""
    try:
        obj = loads_line(raw)
    except ValueError as exc:
        reason = (
            f"{exc.msg} at column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else "not valid UTF-8"
        )
        raise BadLine(f"malformed JSON ({reason})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"a JSON {type(obj).__name__}, not an object")
    return obj


def parse_lines(parser: Any, path: str | os.PathLike) -> Iterator[dict]:
    """Every event field set ``parser`` (a ``FileParser``) finds in ``path``, bad lines
    skipped: the pure reading behind each importer's ``parse_file`` (no ledger, no state)."""
    with open(path, "rb") as handle:
        for number, _start, _end, raw in read_complete_lines(handle, 0, 0):
            try:
                for _key, _rank, fields in parser.parse(raw, number):
                    yield fields
            except BadLine:
                continue


def _is_complete_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def has_unfinished_tail(path: Path, offset: int) -> bool:
    """True when bytes after ``offset`` exist but form no complete line yet."""
    try:
        return path.stat().st_size > offset
    except OSError:
        return False


def iter_files(root: Path, pattern: str, report: ImportReport) -> list[Path]:
    """Every file matching ``pattern`` under ``root`` (recursively), sorted, errors reported.

    Unreadable directories are reported and skipped; the walk goes on.
    """
    found: list[Path] = []

    def on_error(exc: OSError) -> None:
        report.fail(str(exc.filename or root), f"cannot read directory: {exc.strerror or exc}")

    if root.is_file():
        return [root]
    if root.exists() and not root.is_dir():
        report.fail(str(root), "not a regular file or a directory (a FIFO, socket or device)")
        return found
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames.sort()
        for name in filenames:
            if Path(name).match(pattern):
                found.append(Path(dirpath) / name)
    found.sort()
    return found


_ISO_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z\Z")
# The same shape in ASCII digits with every field in range (year 1 on, days up to 28, which
# every month has): a match is a valid time without asking datetime (an import's hot path).
ISO_Z_VALID = re.compile(
    r"(?!0000)[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?Z\Z"
).match


def normalise_timestamp(value: Any) -> str:
    """An ISO 8601 UTC timestamp ending in ``Z``; raises ``BadLine`` when unusable.

    The common ``...Z`` form passes unchanged (fast path); an offset is converted to UTC;
    a naive time is taken as UTC; a number is read as Unix seconds.
    """
    if isinstance(value, str):
        if ISO_Z_VALID(value):
            return value
        if _ISO_Z.match(value):
            # The fields must be in range too (month 13 is no time): the ledger takes this
            # text as it is.
            try:
                datetime.fromisoformat(value[:19])
            except ValueError:
                raise BadLine(f"timestamp {value[:40]!r} is not a valid time") from None
            return value
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise BadLine(f"timestamp {value[:40]!r} is not ISO 8601") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            parsed = datetime.fromtimestamp(float(value), tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise BadLine(f"timestamp {value!r} is out of range") from None
    elif value is None:
        raise BadLine("no timestamp")
    else:
        raise BadLine(f"timestamp is a {type(value).__name__}, not a string")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        utc = parsed.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise BadLine(f"timestamp {str(value)[:40]!r} is out of range") from None
    if not 1000 <= utc.year <= 9999:
        raise BadLine(f"timestamp {str(value)[:40]!r} is out of range")
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


def token_count(mapping: dict, key: str, where: str = "") -> int:
    """A token count from ``mapping[key]``: absent or null is 0; else a non-negative integer.

    Raises ``BadLine`` naming the field for a wrong type or a negative count. A float with an
    integral value (``12.0``) is accepted, as JSON writers sometimes produce them.
    """
    value = mapping.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadLine(f"{where}{key} is a {type(value).__name__}, not a number")
    if isinstance(value, float):
        if not value.is_integer():
            raise BadLine(f"{where}{key} = {value} is not a whole number")
        value = int(value)
    if value < 0:
        raise BadLine(f"{where}{key} = {value} is negative")
    if value > MAX_TOKENS:
        # Not a count any API reports; refused the same way whichever JSON parser read it.
        raise BadLine(f"{where}{key} is too large to be a token count")
    return value


# ---------------------------------------------------------------------------------------------
# Deduplication within a run


class DedupWindow:
    """Holds recent events by dedup key and keeps the best copy of each.

    Streaming writers repeat the same call on neighbouring lines (Claude Code writes one line
    per content block, each carrying the message's usage), so comparing copies within a
    bounded window of recent keys finds the best copy without holding the whole run in
    memory. A copy that arrives after its key left the window is passed on, and the ledger's
    unique request id drops it (the ledger keeps the first copy it stored).
    """

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        # key -> [rank, payload, first_line_start, first_line_number]; keys oldest first in
        # _order (a plain dict and a deque: cheaper than an OrderedDict on this hot path)
        self._held: dict[Any, list] = {}
        self._order: deque = deque()
        self.merged = 0  # copies dropped here because a better or equal copy was held

    def offer(self, key: Any, rank: tuple, payload: Any, line_start: int, line_no: int) -> list:
        """Offer one copy; returns the payloads pushed out of the window (oldest first)."""
        held = self._held.get(key)
        if held is not None:
            self.merged += 1
            if rank > held[0]:
                held[0] = rank
                held[1] = payload
            return []
        self._held[key] = [rank, payload, line_start, line_no]
        self._order.append(key)
        out = []
        while len(self._held) > self.size:
            out.append(self._held.pop(self._order.popleft())[1])
        return out

    def drain(self) -> list:
        """Every held payload, oldest first; the window is empty afterwards."""
        out = [self._held[key][1] for key in self._order]
        self._held.clear()
        self._order.clear()
        return out

    def oldest_position(self) -> tuple[int, int] | None:
        """(byte offset, line number) just before the oldest held line, or None when empty.

        Saved state must not move past a line whose event is still held here.
        """
        if not self._order:
            return None
        entry = self._held[self._order[0]]
        return entry[2], entry[3] - 1


# ---------------------------------------------------------------------------------------------
# Incremental state


@dataclass
class FileState:
    """How far a file has been imported."""

    path: str
    inode: int
    size: int
    mtime: float
    offset: int = 0
    line: int = 0
    context: dict = field(default_factory=dict)  # parser state at ``offset`` (Codex totals, model)


_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS import_state (
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    offset INTEGER NOT NULL,
    line INTEGER NOT NULL,
    context TEXT NOT NULL DEFAULT '{}',
    updated_at TEXT NOT NULL,
    PRIMARY KEY (source, path)
)
"""


def _storable_path(path: str) -> str:
    """``path`` as SQLite text: a file name that is not UTF-8 (surrogate-escaped by Python)
    cannot be stored as is, so it is kept as the hex of its bytes behind a prefix that no
    resolved (absolute) path can start with."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "fsbytes:" + os.fsencode(path).hex()
    return path


class StateStore:
    """Per-file import state in the ``import_state`` table of the ledger's SQLite file.

    The importer owns this table (created here with ``CREATE TABLE IF NOT EXISTS``) and uses
    its own connection, committing after the ledger has committed the events it covers, so
    state never claims more than the ledger holds. Paths are stored resolved.
    A ``None`` database (a non-SQLite ledger) keeps state in memory for this run only.
    """

    def __init__(self, db_path: str | os.PathLike | None) -> None:
        import sqlite3

        self._memory: dict[tuple[str, str], FileState] | None = None
        self._conn = None
        if db_path is None:
            self._memory = {}
            return
        from cage.ledger import BUSY_TIMEOUT_MS

        self.path = str(db_path)
        self._conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
        )
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # The ledger runs in WAL mode; like its writer, skip the fsync per commit (a crash of
        # the process loses nothing committed; at worst a power loss re-reads some lines).
        self._conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpointing is the ledger connection's job (its bulk mode checkpoints every 40
        # MB). Left at SQLite's default (4 MB), this connection's small commit after each
        # large batch of events checkpointed the whole WAL: a fifth of the writer's CPU.
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._conn.execute(_STATE_SCHEMA)

    def get(self, source: str, path: str) -> FileState | None:
        """The saved state of ``path`` for ``source``, or None."""
        if self._memory is not None:
            return self._memory.get((source, path))
        row = self._conn.execute(
            "SELECT inode, size, mtime, offset, line, context FROM import_state "
            "WHERE source = ? AND path = ?",
            (source, _storable_path(path)),
        ).fetchone()
        if row is None:
            return None
        try:
            context = json.loads(row[5])
        except ValueError:
            context = {}
        return FileState(path, row[0], row[1], row[2], row[3], row[4], context)

    def put_many(self, source: str, states: list[FileState]) -> None:
        """Save (replace) the state of several files in one transaction."""
        if self._memory is not None:
            for state in states:
                self._memory[(source, state.path)] = state
            return
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows = [
            (
                source,
                _storable_path(state.path),
                state.inode,
                state.size,
                state.mtime,
                state.offset,
                state.line,
                json.dumps(state.context, separators=(",", ":")),
                now,
            )
            for state in states
        ]
        conn = self._conn

        def attempt() -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO import_state "
                    "(source, path, inode, size, mtime, offset, line, context, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        import sqlite3

        from cage.errors import LedgerError
        from cage.ledger import retry_while_busy

        try:
            retry_while_busy(attempt, self.path)
        except sqlite3.Error as exc:
            # The events before this point are in the ledger; only how far the files were
            # read is not saved, and the next import reads those lines again (their ids
            # keep them from being counted twice).
            raise LedgerError(
                f"cannot save how far the transcripts were read in {self.path} ({exc}); "
                "what was imported is kept: run the import again to finish"
            ) from None

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def resume_point(saved: FileState | None, inode: int, size: int, mtime: float) -> FileState | None:
    """Where to resume a file, or None when it is unchanged since the last import.

    A file whose inode changed, or that is now shorter than what was consumed, was replaced
    or truncated: it is read again from the start (the ledger's unique request ids keep that
    from counting anything twice).
    """
    if saved is None or saved.inode != inode or size < saved.offset:
        return FileState(saved.path if saved else "", inode, size, mtime)
    if size == saved.size and mtime == saved.mtime and size == saved.offset:
        return None
    return FileState(saved.path, inode, size, mtime, saved.offset, saved.line, dict(saved.context))


def sizes_to_read(
    source: str, files: list[Path], state: StateStore, full: bool = False
) -> tuple[int, int]:
    """(total size of ``files``, bytes an import would read: what is new since the saved
    state, everything with ``full``), so that a run with little to read stays light."""
    total = pending = 0
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue  # the import names it
        total += st.st_size
        if full:
            pending += st.st_size
            continue
        saved = state.get(source, os.path.realpath(path))
        resume = resume_point(saved, st.st_ino, st.st_size, st.st_mtime)
        if resume is not None:
            pending += st.st_size - resume.offset
    return total, pending


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A one-line progress display on stderr, by bytes, rewritten in place.

    Shown only when stderr is a terminal and the input is large enough to wait for; redrawn at
    most a few times a second so it costs nothing measurable.
    """

    MIN_BYTES = 8 * 1024 * 1024

    def __init__(self, total_bytes: int, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = max(total_bytes, 1)
        self.label = label
        self.done = 0
        self.enabled = total_bytes >= self.MIN_BYTES and _isatty(self.stream)
        self._last_draw = 0.0
        self._drawn = False

    def advance(self, nbytes: int) -> None:
        """Add ``nbytes`` read; redraw if enough time has passed."""
        self.done += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw >= 0.2:
            self._last_draw = now
            pct = min(100.0, 100.0 * self.done / self.total)
            mib = self.done / (1024 * 1024)
            self.stream.write(f"\r{self.label}: {pct:5.1f}% ({mib:,.0f} MiB)")
            self.stream.flush()
            self._drawn = True

    def finish(self) -> None:
        """Clear the progress line."""
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of at most ``size`` items."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# The import loop


def import_files(
    source: str,
    files: list[Path],
    make_parser: Any,
    sink: Any,
    state: StateStore,
    report: ImportReport,
    *,
    full: bool = False,
    window: DedupWindow | None = None,
    progress: Progress | None = None,
) -> None:
    """Read each file from where the last import stopped and hand its events to ``sink``.

    ``make_parser(path, context)`` returns an object with ``parse(raw, line_no)`` (a list of
    ``(dedup_key, rank, fields)``; ``BadLine`` for an unusable line), ``context`` (what to
    resume from) and ``skipped``. ``sink(list_of_fields) -> (inserted, duplicates)`` writes a
    batch in one transaction. State is saved after the events it covers are written, so a
    crash loses nothing: the next run reads again from the saved point and the ledger's
    unique request ids drop what was already stored. ``full`` ignores the saved state.
    """
    importer = _Importer(source, make_parser, sink, state, report, window, progress)
    for path in files:
        importer.run_file(path, full)
    importer.flush()


class _Importer:
    """The loop behind ``import_files``: events are batched across files (a tree of many
    small transcripts costs one transaction per batch, not one per file), and the state of
    each file is saved in the same step as the batch that completes it."""

    def __init__(
        self,
        source: str,
        make_parser: Any,
        sink: Any,
        state: StateStore,
        report: ImportReport,
        window: DedupWindow | None,
        progress: Progress | None,
    ) -> None:
        self.source = source
        self.make_parser = make_parser
        self.sink = sink
        self.state = state
        self.report = report
        self.window = window
        self.progress = progress
        self.out: list[dict] = []
        self.done_states: list[FileState] = []  # files fully read, waiting for their events

    def run_file(self, path: Path, full: bool) -> None:
        """Import one file from its resume point."""
        report = self.report
        display = str(path)
        try:
            st = path.stat()
        except OSError as exc:
            report.fail(display, f"cannot read: {exc.strerror or exc}")
            return
        if not stat.S_ISREG(st.st_mode):
            # A FIFO would block open() until some writer came: skip it (the walk lists
            # every name that matches the pattern).
            report.fail(display, "not a regular file (a FIFO, socket or device); skipped")
            return
        report.files += 1
        key = os.path.realpath(path)
        saved = None if full else self.state.get(self.source, key)
        resume = resume_point(saved, st.st_ino, st.st_size, st.st_mtime)
        if resume is None:
            report.files_unchanged += 1
            self._advance(st.st_size)
            return
        resume.path = key
        self._advance(resume.offset)
        parser = self.make_parser(path, resume.context)
        parse = parser.parse
        end, line_no = resume.offset, resume.line  # the last line consumed
        # Bytes read are counted (report and progress) per batch and per file, not per line:
        # the loop below runs once per line of the whole tree.
        counted = resume.offset
        window = self.window
        offer = window.offer if window is not None else None
        out = self.out
        try:
            # 1 MB reads (default 8 KB): a transcript tree is read in a tenth of the calls.
            with open(path, "rb", buffering=READ_BUFFER) as handle:
                handle.seek(resume.offset)
                # read_complete_lines, inlined: this loop runs once per line of the tree.
                for raw in handle:
                    if raw[-1] != 10 and not _is_complete_json(raw):  # 10: b"\n"
                        break  # unfinished: left for the next import
                    start = end
                    end += len(raw)
                    line_no += 1
                    try:
                        items = parse(raw, line_no)
                    except BadLine as exc:
                        report.bad(display, line_no, str(exc))
                        items = ()
                    for dedup_key, rank, fields in items:
                        if dedup_key is None or offer is None:
                            out.append(fields)
                        else:
                            out.extend(offer(dedup_key, rank, fields, start, line_no))
                    if len(out) >= BATCH_SIZE:
                        self._count(end - counted)
                        counted = end
                        held = window.oldest_position() if window else None
                        self.flush(_checkpoint(resume, held or (end, line_no), parser))
                        out = self.out
        except OSError as exc:
            report.fail(display, f"cannot read: {exc.strerror or exc}")
            self._count(end - counted)
            # What was read is still written; this file's saved state stays where it was.
            self._finish_window()
            return
        self._count(end - counted)
        consumed = (end, line_no)
        self._finish_window()
        report.skipped += parser.skipped
        if consumed[0] < st.st_size:
            report.pending += 1
        self.done_states.append(_checkpoint(resume, consumed, parser))

    def _count(self, nbytes: int) -> None:
        self.report.bytes_read += nbytes
        self._advance(nbytes)

    def _advance(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.advance(nbytes)

    def _finish_window(self) -> None:
        if self.window is not None:
            self.out.extend(self.window.drain())
            self.report.duplicates += self.window.merged
            self.window.merged = 0

    def flush(self, current: FileState | None = None) -> None:
        """Write the batch, then (only then) save how far each file covered by it was read."""
        states = self.done_states + ([current] if current is not None else [])
        _write_then_save(self.sink, self.out, self.report, self.state, self.source, states)
        self.out = []
        self.done_states = []


def _write_then_save(
    sink: Any,
    batch: Any,
    report: ImportReport,
    state: StateStore,
    source: str,
    states: list[FileState],
) -> None:
    """Write ``batch`` (when there is one) through ``sink`` and count it in ``report``; then,
    only then, save ``states``: saved state never claims more than the ledger holds."""
    if batch:
        inserted, duplicates = sink(batch)
        report.imported += inserted
        report.duplicates += duplicates
    if states:
        state.put_many(source, states)


def _checkpoint(resume: FileState, position: tuple[int, int], parser: Any) -> FileState:
    """The state to save once the events before ``position`` are written."""
    offset, line = position
    return FileState(
        resume.path,
        resume.inode,
        max(resume.size, offset),
        resume.mtime,
        offset,
        line,
        dict(parser.context),
    )


# ---------------------------------------------------------------------------------------------
# Several processes: readers parse (and prepare rows), this one writes


# Below this many bytes to read, a second process costs more than it saves.
PIPELINE_MIN_BYTES = 64 * 1024 * 1024
# At most this many reader processes: beyond it the single writer is the limit.
MAX_READERS = 4


def can_pipeline() -> bool:
    """True where a forked reader process is available (Linux and other Unixes but macOS)."""
    import multiprocessing

    return sys.platform != "darwin" and "fork" in multiprocessing.get_all_start_methods()


def reader_count(total_bytes: int, files: int) -> int:
    """How many reader processes an import of ``files`` files, ``total_bytes`` in all, gets.

    One per CPU this process may run on (parsing costs about twice what writing does, so on
    two CPUs two readers and the writer share them best), at most ``MAX_READERS``, at most
    one per file and per ``PIPELINE_MIN_BYTES`` of input.
    """
    from cage.runtime import usable_cpus

    cpus = usable_cpus()
    return max(1, min(MAX_READERS, cpus, files, total_bytes // max(PIPELINE_MIN_BYTES, 1)))


# Bytes of messages a reader may have ready and not yet sent: enough for it to go on parsing
# through one of the writer's commits (a pickled event is about 150 bytes, a commit 50,000).
OUTBOX_BYTES = 16 * 1024 * 1024


class _Outbox:
    """A reader's messages, pickled as they are made and sent by a thread, so that parsing
    goes on while the writer commits and does not read its pipes. At most ``OUTBOX_BYTES``
    wait (one larger message alone), so memory stays bounded."""

    def __init__(self, conn: Any) -> None:
        import threading
        from multiprocessing.reduction import ForkingPickler

        self.conn = conn
        self._dumps = ForkingPickler.dumps  # what Connection.send uses: recv() reads it
        self._waiting: deque = deque()
        self._bytes = 0
        self._changed = threading.Condition()
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._send_all, daemon=True)
        self._thread.start()

    def _send_all(self) -> None:
        changed = self._changed
        while True:
            with changed:
                while not self._waiting:
                    changed.wait()
                data = self._waiting.popleft()
            if data is None:
                return
            if self.failed is None:
                try:
                    self.conn.send_bytes(data)
                except BaseException as exc:  # the writer is gone: put() says so, and this
                    self.failed = exc  # loop goes on draining, so put() never hangs
            with changed:
                self._bytes -= len(data)
                changed.notify_all()

    def put(self, message: tuple) -> None:
        """Queue one message (waits while ``OUTBOX_BYTES`` are queued)."""
        if self.failed is not None:
            raise OSError(f"the writer stopped reading: {self.failed}")
        data = self._dumps(message)
        with self._changed:
            while self._bytes and self._bytes + len(data) > OUTBOX_BYTES:
                self._changed.wait()
            self._bytes += len(data)
            self._waiting.append(data)
            self._changed.notify_all()

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        with self._changed:
            self._waiting.append(None)
            self._changed.notify_all()
        self._thread.join()


class _SendSink:
    """In a reader process: batches, states and the end of each file go to the writer.

    ``prepare`` (when given) turns a batch into what the writer's sink takes, here in the
    reader: the per-row work (pricing, row building) then runs beside the writer's SQL
    instead of before it, and ready rows pickle smaller than dicts. Each message carries the
    bytes read since the last one, for the writer's progress line.
    """

    def __init__(self, outbox: _Outbox, prepare: Any = None) -> None:
        self.outbox = outbox
        self.prepare = prepare
        self.done = 0  # bytes read and not yet reported

    def advance(self, nbytes: int) -> None:
        """Progress (the importer's ``progress.advance``): counted, sent with the next message."""
        self.done += nbytes

    def send(self, kind: str, payload: Any) -> None:
        """One message: ``(kind, payload, bytes read since the last message)``."""
        done, self.done = self.done, 0
        self.outbox.put((kind, payload, done))

    def __call__(self, batch: list[dict]) -> tuple[int, int]:
        self.send("events", self.prepare(batch) if self.prepare else batch)
        return 0, 0  # counted by the writer

    def put_many(self, source: str, states: list[FileState]) -> None:
        self.send("states", states)


class _ReaderState:
    """In a reader process: saved state is read from the file, and saving is sent on."""

    def __init__(self, store: StateStore, sink: _SendSink) -> None:
        self.store = store
        self.sink = sink

    def get(self, source: str, path: str) -> FileState | None:
        return self.store.get(source, path)

    def put_many(self, source: str, states: list[FileState]) -> None:
        self.sink.put_many(source, states)


def _reader_main(conn: Any, job: dict, first: int, step: int) -> None:
    """A reader process: files ``first``, ``first + step``, ... of the job, in order.

    After each file it sends that file's events and state, then ``next``: the writer takes
    the files in the order of the list, whichever reader parsed them.
    """
    outbox = None
    try:
        # The writer goes first: it is one process against several readers, and a writer
        # that fell behind would be left alone with their backlog at the end (one core
        # busy, the others idle). Lowering a priority needs no privilege.
        with contextlib.suppress(OSError):
            os.nice(10)
        outbox = _Outbox(conn)
        sink = _SendSink(outbox, job.get("prepare"))
        store = StateStore(job["state_path"])
        try:
            report = ImportReport(source=job["report_source"])
            importer = _Importer(
                job["source"],
                job["make_parser"],
                sink,
                _ReaderState(store, sink),  # type: ignore[arg-type]
                report,
                job["window"],
                sink,  # type: ignore[arg-type]  # counts progress
            )
            files = job["files"]
            for index in range(first, len(files), step):
                importer.run_file(files[index], job["full"])
                importer.flush()
                sink.send("next", None)
        finally:
            store.close()
        sink.send("done", report)
        outbox.close()
    except KeyboardInterrupt:
        pass  # Ctrl-C reaches every process; the writer reports it
    except BaseException as exc:  # the writer re-raises it; nothing may die silently here
        import traceback

        message = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", 0)
        with contextlib.suppress(OSError, ValueError):  # the writer may be gone already
            if outbox is None:
                conn.send(message)
            else:
                outbox.put(message)  # after what is queued: messages stay in order
                outbox.close()
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def _concatenate(parts: list[list]) -> list:
    return [item for part in parts for item in part]


def import_files_pipelined(
    source: str,
    files: list[Path],
    make_parser: Any,
    sink: Any,
    state: StateStore,
    state_path: str | os.PathLike | None,
    report: ImportReport,
    *,
    total_bytes: int,
    full: bool = False,
    window: DedupWindow | None = None,
    prepare: Any = None,
    combine: Any = None,
    readers: int = 1,
) -> None:
    """``import_files`` with ``readers`` forked reader processes while this one writes.

    Same results and the same guarantees as one process: reader ``r`` parses files ``r``,
    ``r + readers``, ... and this process takes their events file by file in the order of
    ``files``, so the ledger receives the same events in the same order (the copy of a call
    it keeps is the same), and a file's state is saved only after its events are written.
    Events of consecutive files are written together, ``WRITE_BATCH_SIZE`` at a time.
    ``prepare(batch)``, when given, runs in the readers on each batch of event fields;
    ``combine(list_of_prepared)`` joins several into one for ``sink`` (lists are
    concatenated when it is not given). Each reader queues at most ``OUTBOX_BYTES`` of
    messages, so memory stays bounded.
    """
    import multiprocessing

    from cage.errors import TranscriptError
    from cage.runtime import collect_less_often

    combine = combine or _concatenate
    readers = max(1, min(readers, len(files)))
    # fork: the readers inherit the parser classes and file list without pickling them. They
    # never touch the ledger's SQLite handle they inherit, and multiprocessing ends a forked
    # child with os._exit, so that handle is never closed (or checkpointed) from a child.
    ctx = multiprocessing.get_context("fork")
    job = {
        "source": source,
        "report_source": report.source,
        "files": files,
        "make_parser": make_parser,
        "window": window,
        "prepare": prepare,
        "full": full,
        "state_path": state_path,
    }
    progress = Progress(total_bytes, f"importing {report.source}")
    finished = False
    conns = []
    processes = []
    # Everything loaded so far (modules, the price table) lives as long as the import: frozen,
    # the garbage collector of every process stops walking it again and again (about a tenth
    # of a reader's CPU), and the forked readers do not copy the pages it would touch. What a
    # caller froze before stays frozen (gc cannot unfreeze part of it).
    caller_froze = gc.get_freeze_count() > 0
    gc.freeze()
    # Every event is a few short-lived dicts and tuples, freed by reference counting; a
    # collection every 700 new objects found almost nothing and cost 3 to 4% of each
    # process's CPU. The readers inherit the setting.
    threshold = collect_less_often(100_000)
    try:
        for first in range(readers):
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_reader_main, args=(sender, job, first, readers), daemon=True
            )
            process.start()
            sender.close()
            conns.append(receiver)
            processes.append(process)
        writer = _PipelineWriter(source, sink, state, report, combine, progress)
        try:
            for index in range(len(files)):
                writer.take_file(conns[index % readers], processes[index % readers])
        except TranscriptError:
            writer.commit()  # a reader failed: keep what the files before it gave
            raise
        parts = [
            writer.take_done(conn, process) for conn, process in zip(conns, processes, strict=True)
        ]
        writer.commit()
        finished = True
        _merge(report, parts, files)
    finally:
        gc.set_threshold(*threshold)
        if not caller_froze:
            gc.unfreeze()
        progress.finish()
        for conn in conns:
            conn.close()
        for process in processes:
            if not finished and process.is_alive():
                process.terminate()
            process.join()


class _PipelineWriter:
    """The writing side of ``import_files_pipelined``: events are gathered across files and
    written ``WRITE_BATCH_SIZE`` at a time; the states they cover are saved right after."""

    def __init__(
        self,
        source: str,
        sink: Any,
        state: StateStore,
        report: ImportReport,
        combine: Any,
        progress: Progress,
    ) -> None:
        self.source = source
        self.sink = sink
        self.state = state
        self.report = report
        self.combine = combine
        self.progress = progress
        self.events: list[Any] = []
        self.rows = 0
        self.states: list[FileState] = []

    def _receive(self, conn: Any, process: Any) -> tuple[str, Any]:
        try:
            kind, payload, done = conn.recv()
        except EOFError:
            from cage.errors import TranscriptError

            process.join(1)
            raise TranscriptError(
                f"a transcript reader stopped early (exit {process.exitcode}); what was "
                "imported so far is kept: run the import again to finish"
            ) from None
        if kind == "error":
            from cage.errors import TranscriptError

            raise TranscriptError(f"the transcript reader failed: {payload}")
        self.progress.advance(done)
        return kind, payload

    def take_file(self, conn: Any, process: Any) -> None:
        """Everything one reader sends about its next file, up to its ``next``."""
        while True:
            kind, payload = self._receive(conn, process)
            if kind == "next":
                return
            if kind == "events":
                self.events.append(payload)
                self.rows += len(payload)
                if self.rows >= WRITE_BATCH_SIZE:
                    self.commit()
            elif kind == "states":
                self.states.extend(payload)

    def take_done(self, conn: Any, process: Any) -> ImportReport:
        """A reader's report, the last thing it sends."""
        kind, payload = self._receive(conn, process)
        if kind != "done":  # pragma: no cover - the protocol above makes this impossible
            raise AssertionError(f"a transcript reader sent {kind!r} after its last file")
        return payload

    def commit(self) -> None:
        """Write the gathered events, then (only then) save the states they cover."""
        events = self.events
        batch = (events[0] if len(events) == 1 else self.combine(events)) if events else None
        _write_then_save(self.sink, batch, self.report, self.state, self.source, self.states)
        self.events = []
        self.rows = 0
        self.states = []


def _merge(into: ImportReport, parts: list[ImportReport], files: list[Path]) -> None:
    """Add the readers' reports to ``into``; listed problems in file order, as one reader
    would have listed them (each reader lists its first ones, so the first of all are among
    them)."""
    order = {str(path): i for i, path in enumerate(files)}
    errors: list[LineError] = []
    failures: list[LineError] = []
    for part in parts:
        into.duplicates += part.duplicates  # copies merged in the readers' windows
        into.bad_lines += part.bad_lines
        into.skipped += part.skipped
        into.pending += part.pending
        into.files += part.files
        into.files_unchanged += part.files_unchanged
        into.bytes_read += part.bytes_read
        errors.extend(part.errors)
        failures.extend(part.failures)
    errors.sort(key=lambda e: (order.get(e.file, len(order)), e.line))
    failures.sort(key=lambda e: order.get(e.file, len(order)))
    room = MAX_LISTED_ERRORS - len(into.errors)
    into.errors.extend(errors[: max(room, 0)])
    into.failures.extend(failures)
