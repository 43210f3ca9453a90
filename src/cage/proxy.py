"""The metering proxy: OpenAI- and Anthropic-compatible, streaming, with a hard budget cap.

Agents point their base URLs here. Three endpoints are metered, ``POST /v1/chat/completions``,
``POST /v1/responses`` and ``POST /v1/messages``; every other request is passed through
untouched to the right upstream. Each metered call becomes one ledger ``Event`` (counts, never
content). Before a call is forwarded its worst-case cost is reserved against the cap; when it
ends the reservation is replaced by the real cost. A call whose reservation would cross the
cap gets HTTP 429 in the provider's error shape and never leaves the machine.

Latency matters (an agent makes hundreds of calls, and at concurrency 50 the proxy is
CPU-bound on one event loop, so CPU per call is latency): one pooled upstream session,
TCP_NODELAY on both sides (aiohttp sets it on every connection it makes or accepts),
aiohttp's low-level server (no router), request bodies forwarded without re-encoding,
streams relayed chunk by chunk and metered a run of events at a time, the cyclic GC kept
off the loop, and ledger writes done by a writer thread.

Entry points: ``start_proxy_in_thread()`` (for ``cage mission run``) and ``serve()`` (for
``cage proxy``). See docs/proxy.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import queue
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.payload import BytesPayload
from multidict import CIMultiDict
from yarl import URL

from cage.errors import CageError, ProxyError
from cage.ledger import Event, canonical_request_id
from cage.pricing import Usage, normalise_anthropic, normalise_openai, price_of_day
from cage.runtime import collect_less_often

log = logging.getLogger("cage.proxy")

DEFAULT_UPSTREAM_OPENAI = "https://api.openai.com"
DEFAULT_UPSTREAM_ANTHROPIC = "https://api.anthropic.com"

# Worst-case sizing of a reservation. Tokenisers give about 4 bytes of JSON per token for
# English and code, rarely below 3; 2 bytes per token leaves room for CJK text and for the
# cache-write surcharge. A request that names no output limit may produce this many tokens.
RESERVE_BYTES_PER_TOKEN = 2
DEFAULT_MAX_OUTPUT_TOKENS = 32_000
# Estimating an unknown usage (stream cut, usage missing): the usual 4 characters per token.
ESTIMATE_BYTES_PER_TOKEN = 4

# Request bodies up to this size are accepted (agents send whole conversations).
MAX_REQUEST_BYTES = 256 * 1024 * 1024

CONNECT_TIMEOUT_S = 10.0
# LLM calls can think for minutes before the first byte, and SDKs wait 10 minutes.
READ_TIMEOUT_S = 600.0
SHUTDOWN_GRACE_S = 5.0
# Ledger writes are batched over this interval (flush() and stop() cut it short).
WRITE_INTERVAL_S = 0.2
# Young-generation threshold of the cyclic GC in a process that only serves the proxy
# (Python's default, 700, ran a collection every few calls at concurrency 50).
GC_GEN0_THRESHOLD = 10_000

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True)
class Api:
    """One metered endpoint: who serves it and which request keys bound its output."""

    name: str  # chat | responses | messages
    provider: str  # openai | anthropic
    max_output_keys: tuple[str, ...]


METERED: dict[str, Api] = {
    "/v1/chat/completions": Api("chat", "openai", ("max_completion_tokens", "max_tokens")),
    "/v1/responses": Api("responses", "openai", ("max_output_tokens",)),
    "/v1/messages": Api("messages", "anthropic", ("max_tokens",)),
}

# Events in a Responses stream that carry the final usage.
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


# ---------------------------------------------------------------------------------------
# Prices used by the cap


@dataclass(frozen=True)
class Rates:
    """Dollars per token for the cap; ``priced`` is False for the conservative fallback."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    priced: bool = True

    def cost(self, usage: Any) -> float:
        """Cost of a normalised usage at these rates."""
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_read_tokens * self.cache_read
            + usage.cache_write_tokens * self.cache_write
        )


_MTOK = 1_000_000
_rates_cache: dict[tuple[str, str], Rates] = {}
_fallback_cache: dict[str, Rates] = {}
_rates_lock = threading.Lock()


def _price_per_token(provider: str, model: str, **tokens: int) -> float | None:
    from cage.pricing import price

    fields = {"input_tokens": 0, "output_tokens": 0, **tokens}
    cost = price(provider, model, Usage(**fields))
    return None if cost is None else float(cost) / _MTOK


def model_rates(provider: str, model: str) -> Rates:
    """Per-token rates for ``model`` (priced at a million tokens, so the top tier of a tiered
    price applies: conservative); the provider's fallback when the model is unknown."""
    key = (provider, model)
    rates = _rates_cache.get(key)
    if rates is not None:
        return rates
    inp = _price_per_token(provider, model, input_tokens=_MTOK)
    if inp is None:
        rates = fallback_rates(provider)
    else:
        rates = Rates(
            input=inp,
            output=_price_per_token(provider, model, output_tokens=_MTOK) or 0.0,
            cache_read=_price_per_token(provider, model, cache_read_tokens=_MTOK) or inp,
            cache_write=_price_per_token(provider, model, cache_write_tokens=_MTOK) or inp,
        )
    with _rates_lock:
        _rates_cache[key] = rates
    return rates


def fallback_rates(provider: str) -> Rates:
    """The most expensive per-token prices of any model of ``provider`` in the price table.

    Used for models the table does not know, both to reserve and to charge the cap (the
    ledger still records such a call as unpriced, ``cost_usd`` null).
    """
    rates = _fallback_cache.get(provider)
    if rates is not None:
        return rates
    best = [0.0, 0.0, 0.0, 0.0]
    for model in _known_models(provider):
        for i, kind in enumerate(
            ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
        ):
            value = _price_per_token(provider, model, **{kind: _MTOK})
            if value is not None and value > best[i]:
                best[i] = value
    if best[0] <= 0 or best[1] <= 0:
        # No table at all: Claude Opus 4 list prices, the dearest of the common models.
        best = [15 / _MTOK, 75 / _MTOK, 15 / _MTOK, 18.75 / _MTOK]
    inp, out, c_read, c_write = best
    rates = Rates(inp, out, max(c_read, inp), max(c_write, inp), priced=False)
    with _rates_lock:
        _fallback_cache[provider] = rates
    return rates


def _known_models(provider: str) -> list[str]:
    try:
        from genai_prices import data_snapshot

        for entry in data_snapshot.get_snapshot().providers:
            if entry.id == provider:
                return [m.id for m in entry.models]
    except (ImportError, AttributeError):
        pass
    return []


# ---------------------------------------------------------------------------------------
# Budget: reservations and settlements, shared with the thread that polls spend()


@dataclass
class _ModelTotals:
    provider: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0


class BudgetGuard:
    """The cap's books. Every method is one short critical section under a thread lock:
    the event loop reserves and settles, the mission runner reads ``snapshot()`` from its own
    thread. A reservation is checked and taken in the same section, so concurrent requests
    can never together overshoot."""

    def __init__(
        self,
        *,
        cap_usd: float | None,
        max_calls: int | None,
        prior_cost_usd: float = 0.0,
        prior_calls: int = 0,
    ) -> None:
        self.cap_usd = cap_usd
        self.max_calls = max_calls
        self.prior_cost_usd = prior_cost_usd
        self.prior_calls = prior_calls
        self.exhausted = threading.Event()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when no call is in flight
        self._reserved = 0.0
        self._in_flight = 0
        self._settled = 0.0  # cap cost of settled calls (fallback rates for unpriced ones)
        self._calls = 0
        self._refused = 0
        self._by_model: dict[str, _ModelTotals] = {}
        self._truth: dict[str, dict[str, float]] = {}
        self._check_exhausted()

    def reserve(self, amount: float) -> str | None:
        """Take ``amount`` from the budget; returns why not (a message) when it does not fit."""
        with self._lock:
            refusal = None
            if self.max_calls is not None:
                used = self.prior_calls + self._calls + self._in_flight
                if used + 1 > self.max_calls:
                    refusal = (
                        f"the mission has made {used} of its {self.max_calls} allowed LLM calls"
                    )
            if refusal is None and self.cap_usd is not None:
                committed = self.prior_cost_usd + self._settled + self._reserved
                if committed + amount > self.cap_usd + 1e-12:
                    refusal = (
                        f"this call could cost up to ${amount:.4f} and the mission has "
                        f"${max(0.0, self.cap_usd - committed):.4f} left of its "
                        f"${self.cap_usd:.2f} cap (${self.prior_cost_usd + self._settled:.4f} "
                        f"spent, ${self._reserved:.4f} reserved by calls in flight)"
                    )
            if refusal is not None:
                self._refused += 1
                self.exhausted.set()
                return refusal
            self._reserved += amount
            self._in_flight += 1
            return None

    def release(self, amount: float) -> None:
        """Give a reservation back: the call never reached the upstream."""
        with self._lock:
            self._reserved -= amount
            self._in_flight -= 1
            if self._in_flight == 0:
                self._reserved = 0.0  # no float dust left behind
                self._idle.notify_all()

    def settle(self, amount: float, event: Any, cap_cost: float) -> None:
        """Replace a reservation by the call's real cost and count the call."""
        with self._lock:
            self._reserved -= amount
            self._in_flight -= 1
            if self._in_flight == 0:
                self._reserved = 0.0
                self._idle.notify_all()
            self._settled += cap_cost
            self._calls += 1
            totals = self._by_model.get(event.model)
            if totals is None:
                totals = self._by_model[event.model] = _ModelTotals(event.provider)
            totals.calls += 1
            totals.input_tokens += event.input_tokens
            totals.output_tokens += event.output_tokens
            totals.cache_read_tokens += event.cache_read_tokens
            totals.cache_write_tokens += event.cache_write_tokens
            if event.cost_usd is None:
                totals.unpriced += 1
            else:
                totals.cost_usd += event.cost_usd
            truth = self._truth.setdefault(event.truth, {"calls": 0, "cost_usd": 0.0})
            truth["calls"] += 1
            truth["cost_usd"] += event.cost_usd or 0.0
            self._check_exhausted()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no call is in flight; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _check_exhausted(self) -> None:
        if self.cap_usd is not None and self.prior_cost_usd + self._settled >= self.cap_usd:
            self.exhausted.set()
        if self.max_calls is not None and self.prior_calls + self._calls >= self.max_calls:
            self.exhausted.set()

    def snapshot(self) -> dict[str, Any]:
        """Totals so far (this proxy's calls, plus the mission's earlier spend in the cap)."""
        with self._lock:
            by_model = {
                model: {
                    "provider": t.provider,
                    "calls": t.calls,
                    "input_tokens": t.input_tokens,
                    "output_tokens": t.output_tokens,
                    "cache_read_tokens": t.cache_read_tokens,
                    "cache_write_tokens": t.cache_write_tokens,
                    "cost_usd": round(t.cost_usd, 10),
                    "unpriced": t.unpriced,
                }
                for model, t in sorted(self._by_model.items())
            }
            truth = {
                name: {"calls": int(v["calls"]), "cost_usd": round(v["cost_usd"], 10)}
                for name, v in sorted(self._truth.items())
            }
            cost = sum(t.cost_usd for t in self._by_model.values())
            return {
                "cap_usd": self.cap_usd,
                "max_calls": self.max_calls,
                "calls": self._calls,
                "in_flight": self._in_flight,
                "refused": self._refused,
                "cost_usd": round(cost, 10),
                "unpriced": sum(t.unpriced for t in self._by_model.values()),
                "settled_usd": round(self._settled, 10),
                "reserved_usd": round(self._reserved, 10),
                "prior_cost_usd": round(self.prior_cost_usd, 10),
                "prior_calls": self.prior_calls,
                "committed_usd": round(self.prior_cost_usd + self._settled + self._reserved, 10),
                "by_model": by_model,
                "truth": truth,
                "budget_exhausted": self.exhausted.is_set(),
            }


# ---------------------------------------------------------------------------------------
# Ledger writes, off the event loop


class LedgerWriter:
    """A thread that owns the ledger connection and writes events in batches.

    The event loop only puts events on a queue; SQLite (and its busy waits) never blocks a
    request. ``flush()`` waits until everything queued so far is written.
    """

    _STOP = object()

    def __init__(
        self,
        path: str | None,
        *,
        mission_id: str | None,
        warn_at_usd: float | None = None,
        warn_at_tokens: int | None = None,
    ) -> None:
        self.path = path
        self.mission_id = mission_id
        self.warn_at_usd = warn_at_usd
        self.warn_at_tokens = warn_at_tokens
        self.location: str | None = None
        self.prior: dict[str, Any] | None = None
        self.warnings: list[str] = []
        self.write_errors = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cage-proxy-ledger", daemon=True)

    def start(self) -> None:
        """Open the ledger (in the writer thread) and read the mission's earlier spend."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            error = self._error
            self._thread.join()
            if isinstance(error, CageError):
                raise ProxyError(f"cannot open the spend ledger: {error.message}") from None
            raise ProxyError(f"cannot open the spend ledger {self.path or ''}: {error}") from None

    def put(self, event: Any) -> None:
        """Queue one event for writing (never blocks)."""
        self._queue.put(event)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every event queued before this call is in the ledger."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        return done.wait(timeout)

    def stop(self) -> None:
        """Write what is queued, close the ledger, end the thread."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._wake.set()
            self._thread.join()

    def _run(self) -> None:
        import sqlite3

        from cage.ledger import Ledger

        try:
            ledger = Ledger.open(self.path)
            self.location = str(getattr(ledger, "location", None) or getattr(ledger, "path", ""))
            if self.mission_id is not None:
                self.prior = ledger.mission_spend(self.mission_id)
        except (CageError, OSError, sqlite3.Error) as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            stopping = False
            while not stopping:
                batch = [self._queue.get()]
                if not isinstance(batch[0], threading.Event) and batch[0] is not self._STOP:
                    # Gather a batch: one wake-up and one transaction per interval, not per
                    # call, so this thread rarely competes with the event loop for the GIL.
                    self._wake.wait(WRITE_INTERVAL_S)
                    self._wake.clear()
                with contextlib.suppress(queue.Empty):
                    while len(batch) < 500:
                        batch.append(self._queue.get_nowait())
                events = [item for item in batch if not isinstance(item, threading.Event)]
                stopping = any(item is self._STOP for item in events)
                events = [item for item in events if item is not self._STOP]
                if events:
                    self._write(ledger, events)
                for item in batch:
                    if isinstance(item, threading.Event):
                        item.set()
        finally:
            ledger.close()

    def _write(self, ledger: Any, events: list[Any]) -> None:
        import sqlite3

        try:
            ledger.add_many(events)
        except (CageError, sqlite3.Error, OSError) as exc:
            # The ledger already retries busy locks for minutes; this is a real failure.
            # Say so loudly; the in-process totals (and the cap) still count these calls.
            self.write_errors += len(events)
            log.error("cage proxy: %d spend events could not be written: %s", len(events), exc)
            return
        if self.mission_id is not None and (self.warn_at_usd or self.warn_at_tokens):
            try:
                fired = ledger.check_thresholds(
                    self.mission_id,
                    warn_at_usd=self.warn_at_usd,
                    warn_at_tokens=self.warn_at_tokens,
                )
            except (CageError, sqlite3.Error) as exc:
                log.error("cage proxy: cannot check spend thresholds: %s", exc)
                return
            for message in fired:
                self.warnings.append(message)
                log.warning("cage proxy: warning: %s", message)


# ---------------------------------------------------------------------------------------
# Server-sent events: split, parse, meter


_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SSESplitter:
    """Cuts a byte stream into runs of complete SSE events (each event with its blank-line
    terminator); the bytes of an event still incomplete wait for the next chunk."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def push(self, chunk: bytes) -> bytes:
        """Add bytes; return the complete events they finish, as one run of bytes (b"" when
        none is complete yet). ``split_events`` cuts a run into its events."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            cut = 0
            for match in _BOUNDARY.finditer(buf):
                cut = match.end()
        else:
            # The usual case (every provider ends lines with \n): one search from the end.
            cut = buf.rfind(b"\n\n") + 2 if b"\n\n" in buf else 0
        self._buf = buf[cut:]
        return buf[:cut]

    def rest(self) -> bytes:
        """Bytes of an unterminated last event (a stream that ended without a blank line)."""
        rest, self._buf = self._buf, b""
        return rest


def split_events(run: bytes) -> list[bytes]:
    """The events of a run of complete events; joined, they give ``run`` back exactly."""
    events = []
    start = 0
    for match in _BOUNDARY.finditer(run):
        events.append(run[start : match.end()])
        start = match.end()
    if start < len(run):
        events.append(run[start:])
    return events


def parse_sse_event(raw: bytes) -> tuple[str | None, bytes | None]:
    """(event name, data) of one raw SSE event; multi-line data joined with newlines."""
    name = None
    data: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value[:1] == b" " else value)
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, (b"\n".join(data) if data else None)


def _text_len(value: Any) -> int:
    """Characters of generated text in a delta (strings, not ids, roles or types)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(
            _text_len(v) for k, v in value.items() if k not in ("type", "id", "role", "index")
        )
    if isinstance(value, list):
        return sum(_text_len(v) for v in value)
    return 0


class StreamMeter:
    """What one SSE response tells about usage, event by event.

    ``on_event`` returns False for the one event the client must not see: the usage-only
    chunk of an OpenAI chat stream whose ``include_usage`` the proxy injected.
    """

    __slots__ = (
        "api",
        "error",
        "final",
        "hide_usage_chunk",
        "malformed",
        "model",
        "response_id",
        "text_chars",
        "usage",
    )

    def __init__(self, api: Api, hide_usage_chunk: bool = False) -> None:
        self.api = api
        self.hide_usage_chunk = hide_usage_chunk
        self.usage: dict[str, Any] | None = None  # raw, provider-shaped
        self.final = False  # the stream's final usage has been seen
        self.text_chars = 0
        self.malformed = 0
        self.error = False
        self.model: str | None = None
        self.response_id: str | None = None

    def feed(self, run: bytes) -> bytes:
        """Meter a run of complete events (``SSESplitter.push``); returns the bytes to
        forward: ``run`` itself, or ``run`` without the hidden usage chunk.

        Text deltas, most of a stream, are metered together: a regex finds the next event
        that is not a text delta (``_next_not_text``), the text fields before it are counted
        in one pass, and only that event is parsed, by ``on_event``.
        """
        if b"\r" in run:
            # CR line ends (no provider sends them): event by event.
            kept = [raw for raw in split_events(run) if self.on_event(raw)]
            return b"".join(kept)
        api = self.api.name
        out: list[bytes] | None = None  # pieces to forward, once one event was dropped
        pos = 0
        end = len(run)
        while pos < end:
            if self.response_id is not None:
                # (Before the first event that names the response, nothing is skipped.)
                found = _next_not_text(api, run, pos)
                if found < 0:
                    stop = end
                else:  # up to the start of the event where it was found
                    stop = run.rfind(b"\n\n", pos, found)
                    stop = pos if stop < 0 else stop + 2
                if stop > pos:
                    self.text_chars += sum(map(len, _TEXT_FIELD.findall(run, pos, stop)))
                    if out is not None:
                        out.append(run[pos:stop])
                    pos = stop
                    continue
            nxt = run.find(b"\n\n", pos)
            nxt = end if nxt < 0 else nxt + 2
            raw = run[pos:nxt]
            if not self.on_event(raw):
                if out is None:
                    out = [run[:pos]]
            elif out is not None:
                out.append(raw)
            pos = nxt
        return run if out is None else b"".join(out)

    def on_event(self, raw: bytes) -> bool:
        """Meter one raw event; True when it is to be forwarded."""
        if self.response_id is not None and _is_text_delta(self.api.name, raw):
            # Most events of a stream are text deltas: measured by a regex over the raw
            # bytes, not parsed, to keep the proxy's CPU per call low.
            self.text_chars += sum(map(len, _TEXT_FIELD.findall(raw)))
            return True
        _name, data = parse_sse_event(raw)
        if data is None or data == b"[DONE]":
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            self.malformed += 1
            return True
        if not isinstance(obj, dict):
            self.malformed += 1
            return True
        if self.api.name == "chat":
            return self._chat(obj)
        if self.api.name == "responses":
            self._responses(obj)
        else:
            self._messages(obj)
        return True

    def _chat(self, obj: dict) -> bool:
        if self.response_id is None:
            self.response_id = _str_or_none(obj.get("id"))
            self.model = _str_or_none(obj.get("model"))
        if "error" in obj:
            self.error = True
        choices = obj.get("choices")
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            self.final = True
            if self.hide_usage_chunk and choices == []:
                return False
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self.text_chars += _text_len(choice.get("delta"))
        return True

    def _responses(self, obj: dict) -> None:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            delta = obj.get("delta")
            self.text_chars += len(delta) if isinstance(delta, str) else 0
        elif kind in _RESPONSES_FINAL or kind == "response.created":
            response = obj.get("response")
            if isinstance(response, dict):
                self.response_id = _str_or_none(response.get("id")) or self.response_id
                self.model = _str_or_none(response.get("model")) or self.model
                usage = response.get("usage")
                if kind in _RESPONSES_FINAL and isinstance(usage, dict):
                    self.usage = usage
                    self.final = True
            if kind == "response.failed":
                self.error = True
        elif kind == "error":
            self.error = True

    def _messages(self, obj: dict) -> None:
        kind = obj.get("type")
        if kind == "content_block_delta":
            self.text_chars += _text_len(obj.get("delta"))
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                self.response_id = _str_or_none(message.get("id"))
                self.model = _str_or_none(message.get("model"))
                usage = message.get("usage")
                if isinstance(usage, dict):
                    self.usage = dict(usage)
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                # Counts in message_delta are cumulative: they replace, never add.
                merged = dict(self.usage or {})
                merged.update({k: v for k, v in usage.items() if v is not None})
                self.usage = merged
                self.final = True
        elif kind == "error":
            self.error = True


# JSON string fields that carry generated text in the three APIs' stream deltas.
# (The string body is written as an unrolled loop, runs of plain bytes matched at once.)
_TEXT_FIELD = re.compile(
    rb'"(?:content|text|arguments|partial_json|thinking|delta|reasoning_content|refusal)"'
    rb'\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
# A data line that does not open with a text-delta type: the event may carry more than text
# (the providers write "type" first; an event in any other order is simply parsed). Each
# pattern starts with a literal, which the regex engine finds quickly.
_DATA_NOT_TEXT = {
    "messages": re.compile(rb'\ndata:(?! ?\{"type": ?"content_block_delta")'),
    "responses": re.compile(rb'\ndata:(?! ?\{"type": ?"[\w.]+\.delta")'),
}
_FIRST_DATA_NOT_TEXT = {
    api: re.compile(pattern.pattern[2:]) for api, pattern in _DATA_NOT_TEXT.items()
}


def _next_not_text(api: str, run: bytes, pos: int) -> int:
    """Where, in the run of complete events from ``pos`` on, the first event that may carry
    more than text shows it (-1: none does). In a chat stream that is a usage object or an
    error; in the other two, a data line that is not a text delta."""
    if api == "chat":
        error = run.find(b'"error"', pos)
        usage = _USAGE_OBJECT.search(run, pos)
        if usage is None:
            return error
        return usage.start() if error < 0 else min(error, usage.start())
    if pos == 0 and _FIRST_DATA_NOT_TEXT[api].match(run):
        return 0
    # Events start after a blank line, so run[pos - 1] is the newline before this one.
    found = _DATA_NOT_TEXT[api].search(run, max(0, pos - 1))
    return -1 if found is None else found.start() + 1


def _is_text_delta(api: str, raw: bytes) -> bool:
    """True for an event that can only carry text (no usage, id, model or error)."""
    if api == "chat":
        return _USAGE_OBJECT.search(raw) is None and b'"error"' not in raw
    if api == "messages":
        return b'"type":"content_block_delta"' in raw or b'"type": "content_block_delta"' in raw
    return b'.delta","' in raw or b'.delta", "' in raw


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# ---------------------------------------------------------------------------------------
# Usage -> event


def normalise_usage(api: Api, usage: Mapping[str, Any]) -> Any:
    """Provider-shaped usage -> cage.pricing.Usage (cached tokens counted once)."""
    if api.provider == "anthropic":
        return normalise_anthropic(usage)
    return normalise_openai(usage)


class _Call:
    """One metered call in flight (a plain slotted class: one is made per request)."""

    __slots__ = (
        "api",
        "body_len",
        "done",
        "model",
        "request_id",
        "reserved",
        "started",
        "status",
        "stream",
        "when",
    )

    def __init__(self, api: Api, model: str, body_len: int, reserved: float, stream: bool):
        self.api = api
        self.model = model
        self.body_len = body_len
        self.reserved = reserved
        self.stream = stream
        self.started = time.monotonic()
        self.when = time.time()  # request time (UTC seconds): its price and timestamp
        self.request_id: str | None = None
        self.status: int | None = None
        self.done = False


# (second, its text): one tuple, replaced whole, so proxies in other threads read a pair.
_last_stamp: tuple[int, str] = (-1, "")


def _utc_stamp(when: float) -> str:
    """``2026-11-23T10:00:00Z`` for a time in seconds; the last second's text is reused."""
    global _last_stamp
    second = int(when)
    last = _last_stamp
    if last[0] == second:
        return last[1]
    text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
    _last_stamp = (second, text)
    return text


# ---------------------------------------------------------------------------------------
# The proxy


@dataclass
class ProxyConfig:
    """Everything a proxy instance needs; see ``start_proxy_in_thread`` for the meaning."""

    host: str = "127.0.0.1"
    port: int = 0
    mission_id: str | None = None
    budget_usd: float | None = None
    max_calls: int | None = None
    ledger_path: str | None = None
    upstream_openai: str | None = None
    upstream_anthropic: str | None = None
    mock: bool = False
    warn_at_usd: float | None = None
    warn_at_tokens: int | None = None
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    # Signs spend statements (cage.attest). Held here, never passed to the agent, never
    # shown: repr=False keeps it out of any log line or traceback that prints the config.
    attest_key: bytes | None = field(default=None, repr=False)


def _upstream_base(url: str) -> str:
    """The upstream origin that request paths (which start with /v1) are appended to."""
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    if not base.startswith(("http://", "https://")):
        raise ProxyError(f"upstream URL {url!r} must start with http:// or https://")
    return base


class MeteringProxy:
    """The aiohttp application and the state behind it. Runs on one event loop."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.upstreams = {
            "openai": _upstream_base(config.upstream_openai or DEFAULT_UPSTREAM_OPENAI),
            "anthropic": _upstream_base(config.upstream_anthropic or DEFAULT_UPSTREAM_ANTHROPIC),
        }
        self.writer = LedgerWriter(
            config.ledger_path,
            mission_id=config.mission_id,
            warn_at_usd=config.warn_at_usd,
            warn_at_tokens=config.warn_at_tokens,
        )
        self.guard: BudgetGuard | None = None
        self.url: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._raw_session: aiohttp.ClientSession | None = None
        self._runner: web.BaseRunner | None = None
        self._mock_runner: web.AppRunner | None = None
        self._urls: dict[tuple[str, str], URL] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def open_ledger(self) -> None:
        """Start the ledger writer and load the mission's earlier spend into the cap."""
        # The price table is loaded now, not by the first call (and so it is frozen with
        # the rest of the start-up objects, see _keep_gc_off_the_loop).
        _known_models("openai")
        self.writer.start()
        prior = self.writer.prior or {}
        self.guard = BudgetGuard(
            cap_usd=self.config.budget_usd,
            max_calls=self.config.max_calls,
            prior_cost_usd=float(prior.get("cost_usd") or 0.0),
            prior_calls=int(prior.get("calls") or 0),
        )

    async def start(self) -> str:
        """Bind and serve; returns the proxy's base URL."""
        if self.config.mock:
            from cage import mockupstream

            self._mock_runner = web.AppRunner(
                mockupstream.create_app(), access_log=None, shutdown_timeout=1.0
            )
            await self._mock_runner.setup()
            mock_site = web.TCPSite(self._mock_runner, "127.0.0.1", 0)
            await mock_site.start()
            mock_url = _site_url(mock_site, "127.0.0.1")
            self.upstreams = {"openai": mock_url, "anthropic": mock_url}
        # One pool for every upstream call: keep-alive connections are reused, never one
        # connection per request. aiohttp sets TCP_NODELAY on each connection it opens.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.config.connect_timeout_s,
            sock_read=self.config.read_timeout_s,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=True, cookie_jar=_NO_COOKIES()
        )
        # Pass-through keeps content-encoding as the upstream sent it; same pool.
        self._raw_session = aiohttp.ClientSession(
            connector=connector,
            connector_owner=False,
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=_NO_COOKIES(),
        )
        # aiohttp's low-level server: every request goes to _dispatch, without an
        # Application, a router or middlewares to pass through (CPU per call is the
        # proxy's latency under load). No access log: it would cost time per request and
        # could record query strings.
        loop = asyncio.get_running_loop()

        def make_request(*args: Any) -> web.BaseRequest:
            # (message, payload, protocol, writer, task), as aiohttp passes them.
            return web.BaseRequest(*args, loop, client_max_size=MAX_REQUEST_BYTES)

        server = web.Server(
            self._dispatch,
            request_factory=make_request,
            handler_cancellation=True,
            access_log=None,
        )
        # On stop, calls in flight get SHUTDOWN_GRACE_S to finish, then are cut (and recorded).
        self._runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ProxyError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}; "
                "check --host, or choose another --port (0 picks a free one)"
            ) from None
        self.url = _site_url(site, self.config.host)
        return self.url

    async def stop(self) -> None:
        """Stop serving (calls in flight are cut and recorded), close upstream pools."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for session in (self._raw_session, self._session):
            if session is not None:
                await session.close()
        self._session = self._raw_session = None
        if self._mock_runner is not None:
            await self._mock_runner.cleanup()
            self._mock_runner = None

    # -- routing --------------------------------------------------------------------------

    def _upstream_url(self, provider: str, raw_path: str) -> URL:
        """The upstream URL of a request path (a handful of them in practice: cached)."""
        key = (provider, raw_path)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= 256:  # paths with ever-changing query strings
                self._urls.clear()
            url = self._urls[key] = URL(self.upstreams[provider] + raw_path, encoded=True)
        return url

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        api = METERED.get(request.path) if request.method == "POST" else None
        if api is not None:
            return await self._metered(request, api)
        return await self._passthrough(request)

    @staticmethod
    def _provider_of(request: web.BaseRequest) -> str:
        headers = request.headers
        if "x-api-key" in headers or "anthropic-version" in headers:
            return "anthropic"
        if request.path.startswith("/v1/messages"):
            return "anthropic"
        return "openai"

    # -- metered calls --------------------------------------------------------------------

    async def _metered(self, request: web.BaseRequest, api: Api) -> web.StreamResponse:
        assert self.guard is not None and self._session is not None
        body = await request.read()
        payload = _members(_REQUEST_MEMBERS, body)
        if payload is None:
            # Unreadable to us means unmeterable: refusing keeps the cap honest.
            return _error_response(
                api,
                400,
                "invalid_request_error",
                "cage proxy: the request body is not a JSON object; nothing was forwarded",
            )
        model = str(payload.get("model") or "unknown")
        stream = payload.get("stream") is True
        hide_usage = False
        if api.name == "chat" and stream:
            options = payload.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Without it a chat stream reports no usage at all; the client did not ask
                # for the extra usage-only chunk, so it is removed from what it sees.
                body = _ask_for_usage(body, payload)
                hide_usage = True

        if self.guard.cap_usd is not None and (api.provider, model) not in _rates_cache:
            # First call for this model: the price lookup (for an unknown model, a scan of
            # the whole table) runs off the event loop.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, model_rates, api.provider, model)
        reserve = self._worst_case(api, model, payload, len(body))
        refusal = self.guard.reserve(reserve)
        if refusal is not None:
            log.warning("cage proxy: refused %s %s: %s", request.path, model, refusal)
            return _error_response(
                api,
                429,
                "budget_guard",
                f"cage budget guard: {refusal}. The call was not forwarded.",
                code="budget_exceeded",
                retry=False,
            )
        call = _Call(api=api, model=model, body_len=len(body), reserved=reserve, stream=stream)
        try:
            return await self._forward(request, call, body, hide_usage)
        except asyncio.CancelledError:
            # The client went away (or the proxy is stopping): the upstream request is
            # abandoned with this task; what it may have cost is still recorded.
            self._record_unknown(call, "client_disconnected", output_chars=0)
            raise
        finally:
            if not call.done:
                self._record_unknown(call, "proxy_error", output_chars=0)

    def _worst_case(self, api: Api, model: str, payload: dict, body_len: int) -> float:
        if self.guard is None or (self.guard.cap_usd is None):
            return 0.0
        max_out = DEFAULT_MAX_OUTPUT_TOKENS
        for key in api.max_output_keys:
            value = payload.get(key)
            if isinstance(value, int) and value > 0:
                max_out = value
                break
        n = payload.get("n") if api.name == "chat" else 1
        choices = n if isinstance(n, int) and n > 1 else 1
        rates = model_rates(api.provider, model)
        input_tokens = math.ceil(body_len / RESERVE_BYTES_PER_TOKEN)
        return input_tokens * max(rates.input, rates.cache_write) + max_out * choices * rates.output

    async def _forward(
        self, request: web.BaseRequest, call: _Call, body: bytes, hide_usage: bool
    ) -> web.StreamResponse:
        assert self._session is not None and self.guard is not None
        api = call.api
        url = self._upstream_url(api.provider, request.raw_path)
        headers = _request_headers(request.headers, metered=True)
        try:
            # Wrapped here, so aiohttp does not look up a payload type for it.
            upstream = await self._session.post(url, data=BytesPayload(body), headers=headers)
        except _CONNECT_ERRORS as exc:
            # Nothing reached the upstream: nothing was spent, nothing is recorded.
            call.done = True
            self.guard.release(call.reserved)
            log.warning("cage proxy: upstream %s unreachable: %s", api.provider, exc)
            return _error_response(
                api,
                502,
                "upstream_unreachable",
                f"cage proxy: cannot connect to the {api.provider} upstream "
                f"{self.upstreams[api.provider]}: {exc}",
            )
        except asyncio.TimeoutError:
            self._record_unknown(call, "upstream_timeout", output_chars=0)
            return _error_response(
                api,
                504,
                "upstream_timeout",
                f"cage proxy: the {api.provider} upstream sent no response within "
                f"{self.config.read_timeout_s:g} s",
            )
        except aiohttp.ClientError as exc:
            self._record_unknown(call, "upstream_error", output_chars=0)
            return _error_response(
                api,
                502,
                "upstream_error",
                f"cage proxy: the {api.provider} upstream failed: {exc.__class__.__name__}",
            )
        try:
            call.status = upstream.status
            call.request_id = upstream.headers.get("request-id") or upstream.headers.get(
                "x-request-id"
            )
            if upstream.content_type == "text/event-stream":
                return await self._relay_stream(request, call, upstream, hide_usage)
            return await self._relay_body(request, call, upstream)
        finally:
            # An unfinished upstream response is closed (its connection dropped, so the
            # upstream stops generating); a finished one goes back to the pool.
            upstream.release() if upstream.content.at_eof() else upstream.close()

    async def _relay_body(
        self, request: web.BaseRequest, call: _Call, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        api = call.api
        try:
            data = await upstream.read()
        except asyncio.TimeoutError:
            self._record_unknown(call, "upstream_timeout", output_chars=0)
            return _error_response(
                api, 504, "upstream_timeout", "cage proxy: the upstream response timed out"
            )
        except aiohttp.ClientError as exc:
            self._record_unknown(call, "upstream_error", output_chars=0)
            return _error_response(
                api, 502, "upstream_error", f"cage proxy: the upstream response failed: {exc}"
            )
        response = web.Response(
            status=upstream.status,
            reason=upstream.reason,
            body=data,
            headers=_response_headers(upstream.headers, decoded=True),
        )
        # Send first, account after: the client never waits for the books. The accounting
        # runs even when the client hangs up while the answer is being sent.
        try:
            await response.prepare(request)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError):
            pass
        finally:
            self._account_body(call, upstream.status, data)
        return response

    def _account_body(self, call: _Call, status: int, data: bytes) -> None:
        api = call.api
        obj = _members(_RESPONSE_MEMBERS, data) if data[:64].lstrip()[:1] == b"{" else None
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(obj, dict):
            call.model = _str_or_none(obj.get("model")) or call.model
            call.request_id = call.request_id or _str_or_none(obj.get("id"))
        if isinstance(usage, dict):
            error = f"http_{status}" if status >= 400 else None
            self._record(call, normalise_usage(api, usage), "measured", error)
        elif status >= 400:
            # Providers do not bill a request they answer with an error status.
            self._record_free_error(call, f"http_{status}")
        else:
            self._record_unknown(call, "usage_missing", output_chars=len(data))

    async def _relay_stream(
        self,
        request: web.BaseRequest,
        call: _Call,
        upstream: aiohttp.ClientResponse,
        hide_usage: bool,
    ) -> web.StreamResponse:
        response = _HeadersWithBodyResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=_response_headers(upstream.headers, decoded=True),
        )
        meter = StreamMeter(call.api, hide_usage_chunk=hide_usage)
        splitter = SSESplitter()
        error: str | None = None
        try:
            await response.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionError):
            error = "client_disconnected"
        content = upstream.content
        try:
            while error is None:
                try:
                    chunk = await content.readany()
                except asyncio.TimeoutError:
                    error = "upstream_timeout"
                    break
                except aiohttp.ClientError:
                    error = "stream_cut"
                    break
                if not chunk:
                    rest = splitter.rest()
                    if rest:
                        keep = meter.on_event(rest)
                        if hide_usage and keep:
                            await _write(response, rest)
                    break
                if hide_usage:
                    # Forward each event as soon as it is complete, minus the hidden one.
                    out = meter.feed(splitter.push(chunk))
                    if out and not await _write(response, out):
                        error = "client_disconnected"
                else:
                    # Forward the bytes as they came, then meter them.
                    if not await _write(response, chunk):
                        error = "client_disconnected"
                    run = splitter.push(chunk)
                    if run:
                        meter.feed(run)
        except asyncio.CancelledError:
            self._record_stream(call, meter, "client_disconnected")
            raise
        if error is None and not meter.final:
            error = "malformed_stream" if meter.malformed else "usage_missing"
        elif error is None and (meter.malformed or meter.error):
            error = "malformed_stream" if meter.malformed else "upstream_error_event"
        self._record_stream(call, meter, error)
        if error in ("stream_cut", "upstream_timeout"):
            # Cut the client's stream too (no final chunk), so it sees a truncated response
            # rather than one that looks complete.
            if request.transport is not None:
                request.transport.close()
            return response
        if error != "client_disconnected":
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionError):
                await response.write_eof()
        return response

    # -- recording ------------------------------------------------------------------------

    def _record_stream(self, call: _Call, meter: StreamMeter, error: str | None) -> None:
        if call.done:
            return
        call.model = meter.model or call.model
        call.request_id = call.request_id or meter.response_id
        if meter.final and meter.usage is not None:
            self._record(call, normalise_usage(call.api, meter.usage), "measured", error)
            return
        output = math.ceil(meter.text_chars / ESTIMATE_BYTES_PER_TOKEN)
        if meter.usage is not None and call.api.provider == "anthropic":
            # message_start told the input side; only the output is a guess.
            usage = dict(meter.usage)
            usage["output_tokens"] = max(int(usage.get("output_tokens") or 0), output)
            self._record(call, normalise_usage(call.api, usage), "estimated", error)
            return
        self._record_unknown(call, error or "usage_missing", output_chars=meter.text_chars)

    def _record_unknown(self, call: _Call, error: str, *, output_chars: int) -> None:
        """An estimated event: the upstream may have billed, and did not say how much."""
        if call.done:
            return
        usage = Usage(
            input_tokens=max(1, math.ceil(call.body_len / ESTIMATE_BYTES_PER_TOKEN)),
            output_tokens=math.ceil(output_chars / ESTIMATE_BYTES_PER_TOKEN),
        )
        self._record(call, usage, "estimated", error)

    def _record_free_error(self, call: _Call, error: str) -> None:
        self._record(call, Usage(input_tokens=0, output_tokens=0), "estimated", error, cost=0.0)

    def _record(
        self,
        call: _Call,
        usage: Any,
        truth: str,
        error: str | None,
        cost: float | None = None,
    ) -> None:
        if call.done:
            return
        call.done = True
        provider = call.api.provider
        timestamp = _utc_stamp(call.when)
        if cost is None:
            # Priced at the request time (to the minute where the price depends on the hour).
            priced = price_of_day(provider, call.model, usage, timestamp)
            cost = None if priced is None else float(priced)
        if cost is not None:
            cap_cost = cost
        elif self.guard is not None and self.guard.cap_usd is not None:
            # Unpriced: charged to the cap at the fallback prices (cached by the reservation).
            cap_cost = fallback_rates(provider).cost(usage)
        else:
            cap_cost = 0.0
        extra: dict[str, Any] = {"api": call.api.name, "stream": call.stream}
        if call.status is not None:
            extra["status"] = call.status
        event = Event(
            timestamp=timestamp,
            provider=provider,
            model=call.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            cost_usd=cost,
            truth=truth,
            mission_id=self.config.mission_id,
            duration_s=round(time.monotonic() - call.started, 6),
            error_class=error,
            # The canonical id (<provider>:<upstream id>): a transcript import of the same
            # call (Claude Code's requestId is this request-id header) is then not counted
            # again.
            request_id=canonical_request_id(provider, call.request_id)
            if call.request_id
            else f"cage-proxy-{uuid.uuid4().hex}",
            source="proxy",
            extra=extra,
        )
        assert self.guard is not None
        self.guard.settle(call.reserved, event, cap_cost)
        self.writer.put(event)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %s in=%d out=%d cache_r=%d cache_w=%d $%s %s%s",
                call.api.name,
                call.model,
                call.status or "-",
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
                "?" if cost is None else f"{cost:.6f}",
                truth,
                f" {error}" if error else "",
            )

    # -- pass-through ---------------------------------------------------------------------

    async def _passthrough(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._raw_session is not None
        provider = self._provider_of(request)
        url = self._upstream_url(provider, request.raw_path)
        body = await request.read() if request.body_exists else None
        try:
            upstream = await self._raw_session.request(
                request.method,
                url,
                data=body,
                allow_redirects=False,
                headers=_request_headers(request.headers, metered=False),
            )
        except asyncio.TimeoutError:
            return _error_response(
                METERED_BY_PROVIDER[provider],
                504,
                "upstream_timeout",
                "cage proxy: the upstream sent no response in time",
            )
        except aiohttp.ClientError as exc:
            return _error_response(
                METERED_BY_PROVIDER[provider],
                502,
                "upstream_unreachable",
                f"cage proxy: the {provider} upstream failed: {exc}",
            )
        try:
            response = _HeadersWithBodyResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=_response_headers(upstream.headers, decoded=False),
            )
            if upstream.content_length is not None and request.method != "HEAD":
                response.content_length = upstream.content_length
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (asyncio.TimeoutError, aiohttp.ClientError):
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if not chunk:
                    break
                if not await _write(response, chunk):
                    return response
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionError):
                await response.write_eof()
            return response
        finally:
            upstream.release() if upstream.content.at_eof() else upstream.close()


METERED_BY_PROVIDER = {
    "openai": METERED["/v1/chat/completions"],
    "anthropic": METERED["/v1/messages"],
}

_CONNECT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,)
if hasattr(aiohttp, "ConnectionTimeoutError"):  # aiohttp >= 3.10: the connect phase timed out
    _CONNECT_ERRORS += (aiohttp.ConnectionTimeoutError,)


def _NO_COOKIES() -> aiohttp.DummyCookieJar:
    # A proxy must not keep one client's cookies and send them on for another.
    return aiohttp.DummyCookieJar()


class _HeadersWithBodyResponse(web.StreamResponse):
    """A relayed response whose headers leave in the same packet as its first bytes.

    The upstreams send their first event (``message_start``, ``response.created``, the
    role chunk) right after their headers, so nothing waits longer; the client is woken
    once instead of twice, a good part of what a proxy adds to time-to-first-byte.
    (An aiohttp class setting; on a version without it, headers simply go first.)
    """

    _send_headers_immediately = False


async def _write(response: web.StreamResponse, data: bytes) -> bool:
    """Write to the client; False when it has gone away."""
    try:
        await response.write(data)
    except (ConnectionError, aiohttp.ClientConnectionError):
        return False
    return True


def _keep_gc_off_the_loop(*, own_process: bool) -> None:
    """Keep Python's cyclic GC from pausing the event loop once the proxy serves.

    Everything alive at start-up (modules, aiohttp, the price table: some 60,000 objects)
    is moved out of the collector's sight (``gc.freeze``): a full collection walked it all
    and stopped every call in flight for 30 ms. In a process of its own (``cage proxy``)
    the young generation is also collected less often: calls free their objects by
    reference counting, and 50 concurrent calls crossed the default threshold every few
    calls.
    """
    gc.freeze()
    if own_process:
        collect_less_often(GC_GEN0_THRESHOLD)


def _site_url(site: web.TCPSite, host: str) -> str:
    server = site._server  # aiohttp keeps the asyncio server here; the port may be 0
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"http://{host}:{port}"


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("Connection")
    return {t.strip().lower() for t in value.split(",")} if value else set()


def _request_headers(headers: Mapping[str, str], *, metered: bool) -> CIMultiDict:
    """Client headers to send upstream: credentials pass, hop-by-hop headers do not."""
    drop = _connection_tokens(headers)
    out: CIMultiDict = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in drop or lower in ("host", "content-length"):
            continue
        if metered and lower == "accept-encoding":
            continue
        out.add(name, value)
    if metered:
        # The proxy reads these bodies, so only encodings aiohttp always decodes.
        out["Accept-Encoding"] = "gzip, deflate"
    return out


def _response_headers(headers: Mapping[str, str], *, decoded: bool) -> list[tuple[str, str]]:
    """Upstream headers to send to the client; the proxy frames the body itself.

    A list: the response copies it into its own header dict, once.
    """
    drop = _connection_tokens(headers)
    skip = _SKIP_DECODED if decoded else _SKIP_RAW
    return [
        (name, value)
        for name, value in headers.items()
        if name.lower() not in skip and (not drop or name.lower() not in drop)
    ]


_SKIP_RAW = HOP_BY_HOP | {"content-length"}
_SKIP_DECODED = _SKIP_RAW | {"content-encoding"}


class _Members:
    """Decodes the few top-level members the proxy reads from a JSON object, and only them:
    the rest (a conversation of hundreds of kilobytes) is checked and skipped by msgspec,
    never built into Python objects (a 341 KiB request: 0.15 ms instead of json.loads's
    0.6 ms)."""

    def __init__(self, *names: str) -> None:
        self.names = names
        fields = [(name, object, msgspec.UNSET) for name in names]
        self.decoder = msgspec.json.Decoder(msgspec.defstruct("Members", fields))


_REQUEST_MEMBERS = _Members(
    "model",
    "stream",
    "stream_options",
    "n",
    *sorted({key for api in METERED.values() for key in api.max_output_keys}),
)
_RESPONSE_MEMBERS = _Members("id", "model", "usage")


def _members(members: _Members, data: bytes) -> dict[str, Any] | None:
    """``members.names`` present in the JSON object ``data``; None when it is not one."""
    try:
        decoded = members.decoder.decode(data)
    except msgspec.DecodeError:
        # What msgspec refuses (not UTF-8, NaN, a lone surrogate...) json.loads may read.
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        return {name: obj[name] for name in members.names if name in obj}
    unset = msgspec.UNSET
    return {name: value for name in members.names if (value := getattr(decoded, name)) is not unset}


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'
_EMPTY_OBJECT_REST = re.compile(rb"\s*\}")


def _ask_for_usage(body: bytes, payload: dict[str, Any]) -> bytes:
    """The chat request ``body`` with stream_options.include_usage set (``payload``: its
    top-level members that the proxy reads).

    The usual request has no stream_options: the member is then written in front of the
    others, and the rest of the body (the whole conversation) is sent as it came, not
    decoded and encoded again.
    """
    if "stream_options" not in payload and json.detect_encoding(body) == "utf-8":
        start = body.find(b"{")
        if (
            start >= 0
            and not body[:start].strip()
            and not _EMPTY_OBJECT_REST.match(body, start + 1)  # "{}" takes no comma
        ):
            return body[: start + 1] + _INCLUDE_USAGE + body[start + 1 :]
    whole = json.loads(body)
    options = whole.get("stream_options")
    whole["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return json.dumps(whole, ensure_ascii=False, separators=(",", ":")).encode()


def _error_response(
    api: Api,
    status: int,
    kind: str,
    message: str,
    *,
    code: str | None = None,
    retry: bool = True,
) -> web.Response:
    """An error in the shape the client's SDK expects from its provider."""
    if api.provider == "anthropic":
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "code": code or kind}}
    headers = {}
    if not retry:
        # The OpenAI and Anthropic SDKs honour this and do not retry a refused call.
        headers["x-should-retry"] = "false"
    return web.json_response(body, status=status, headers=headers)


# ---------------------------------------------------------------------------------------
# Running it


class RunningProxy:
    """A proxy serving from a background thread (see ``start_proxy_in_thread``)."""

    def __init__(
        self,
        proxy: MeteringProxy,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        url: str,
    ) -> None:
        self._proxy = proxy
        self._loop = loop
        self._thread = thread
        self.url = url
        self._stopped = False

    @property
    def openai_base_url(self) -> str:
        """Value for OPENAI_BASE_URL (the OpenAI SDKs expect the /v1 suffix)."""
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """Value for ANTHROPIC_BASE_URL (the Anthropic SDKs add /v1 themselves)."""
        return self.url

    @property
    def budget_exhausted(self) -> bool:
        """True once a call was refused by the cap or max_calls, or the cap is spent."""
        assert self._proxy.guard is not None
        return self._proxy.guard.exhausted.is_set()

    @property
    def budget_exhausted_event(self) -> threading.Event:
        """The same as a threading.Event, for ``wait(timeout)``."""
        assert self._proxy.guard is not None
        return self._proxy.guard.exhausted

    @property
    def warnings(self) -> list[str]:
        """Threshold warnings fired so far (warn_at_usd / warn_at_tokens), each once."""
        return list(self._proxy.writer.warnings)

    def spend(self) -> dict[str, Any]:
        """This proxy's spend: totals by model, truth split, calls, reserved and settled."""
        assert self._proxy.guard is not None
        snapshot = self._proxy.guard.snapshot()
        snapshot["mission_id"] = self._proxy.config.mission_id
        snapshot["warnings"] = self.warnings
        snapshot["ledger_write_errors"] = self._proxy.writer.write_errors
        return snapshot

    def spend_statement(self, base: str, digest: str) -> dict[str, Any] | None:
        """This mission's spend, signed with the proxy's attest key and bound to ``base`` and
        the change ``digest`` (``attest.change_digest`` of the mission's snapshot); None
        when the proxy was started without a key. Call it after ``flush()`` or ``stop()``,
        so that every call is settled."""
        from cage import attest

        key = self._proxy.config.attest_key
        if key is None:
            return None
        payload = attest.statement_payload(
            mission_id=self._proxy.config.mission_id or "",
            base=base,
            tree=digest,
            spend=self.spend(),
            cap_usd=self._proxy.config.budget_usd,
        )
        return attest.sign(payload, key)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until the calls in flight have ended and every call is in the ledger.

        False when that did not happen within ``timeout`` seconds (a stream still running).
        """
        assert self._proxy.guard is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._proxy.guard.wait_idle(timeout):
            return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._proxy.writer.flush(left)

    def stop(self) -> None:
        """Stop serving, record calls still in flight, write everything, join the threads."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._proxy.writer.stop()

    def __enter__(self) -> RunningProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_proxy_in_thread(
    *,
    mission_id: str | None,
    budget_usd: float | None,
    max_calls: int | None = None,
    ledger_path: str | None = None,
    upstream_openai: str | None = None,
    upstream_anthropic: str | None = None,
    mock: bool = False,
    warn_at_usd: float | None = None,
    warn_at_tokens: int | None = None,
    read_timeout_s: float = READ_TIMEOUT_S,
    attest_key: bytes | None = None,
) -> RunningProxy:
    """Start a metering proxy on 127.0.0.1 (a free port) in a background thread.

    ``budget_usd`` is the hard cap for ``mission_id`` (spend already in the ledger for this
    mission counts), ``max_calls`` the most LLM calls; None means no limit. ``mock`` answers
    locally instead of calling the real APIs. ``attest_key`` lets
    ``RunningProxy.spend_statement`` sign the mission's spend (see ``cage.attest``); a key
    that is too short is a UsageError. Raises ProxyError when it cannot start.
    """
    config = ProxyConfig(
        host="127.0.0.1",
        port=0,
        mission_id=mission_id,
        budget_usd=budget_usd,
        max_calls=max_calls,
        ledger_path=None if ledger_path is None else str(ledger_path),
        upstream_openai=upstream_openai,
        upstream_anthropic=upstream_anthropic,
        mock=mock,
        warn_at_usd=warn_at_usd,
        warn_at_tokens=warn_at_tokens,
        read_timeout_s=read_timeout_s,
        attest_key=attest_key,
    )
    if attest_key is not None:
        from cage import attest

        attest.check_key(attest_key, "the proxy's attest_key")
    proxy = MeteringProxy(config)
    proxy.open_ledger()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def serve_in_thread() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome["url"] = loop.run_until_complete(proxy.start())
        except Exception as exc:  # reported to the starting thread, raised there
            outcome["error"] = exc
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(proxy.stop())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=serve_in_thread, name="cage-proxy", daemon=True)
    thread.start()
    started.wait()
    if "error" in outcome:
        thread.join()
        proxy.writer.stop()
        error = outcome["error"]
        if isinstance(error, CageError):
            raise error
        raise ProxyError(f"the proxy could not start: {error}")
    _keep_gc_off_the_loop(own_process=False)
    return RunningProxy(proxy, loop, thread, outcome["url"])


async def serve(config: ProxyConfig, on_ready: Any = None) -> dict[str, Any]:
    """Run the proxy in the foreground until Ctrl-C or SIGTERM; returns the spend snapshot.

    ``on_ready(proxy)`` is called once it listens. Raises ProxyError when it cannot start.
    """
    import signal

    proxy = MeteringProxy(config)
    proxy.open_ledger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Handled in the loop, so stopping is orderly: calls in flight are recorded.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await proxy.start()
        _keep_gc_off_the_loop(own_process=True)
        if on_ready is not None:
            on_ready(proxy)
        await stop.wait()
    finally:
        await proxy.stop()
        proxy.writer.stop()
    assert proxy.guard is not None
    return proxy.guard.snapshot()
