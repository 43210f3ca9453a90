"""meter(): record the spend of LLM calls made from Python code, and the writer protocol.

    from cage.meter import meter

    with meter(caller="triage-bot") as m:
        response = client.chat.completions.create(...)
        m.record(response)              # one event: tokens, model, duration, price

    @meter(caller="summarise")
    def summarise(text):
        response = anthropic_client.messages.create(...)
        record(response)                # the innermost active meter records it
        return response

Only usage counts, the model name and the request id (the SDK's ``_request_id``, else the
response's ``id``) are read from a response: never its content. Responses are duck-typed
(``.usage`` / ``.model`` / ``.id`` attributes or dict keys), so neither SDK needs to be
installed. Where events go is a *writer*: anything with ``write(event)``.
:class:`LedgerWriter` (the default, on the default ledger), :class:`JsonlWriter` and
:class:`NullWriter` come with cage.

Decisions:
- ``duration_s`` of a recorded call is the time since the block started or since the
  previous ``record()`` in it, whichever is later (or the ``duration_s`` you pass).
- An exception that leaves the block before any ``record()`` records one event with the
  exception's class in ``error_class``, zero tokens and ``cost_usd`` None: the attempt is
  counted, its cost is unknown. An exception after a ``record()`` records nothing more
  (it may not come from an LLM call at all); use ``m.record_error()`` to say otherwise.
- A response without usage (a stream read without ``include_usage``) records nothing and
  warns: a guessed zero would be a silent wrong number.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cage.ledger import Event, Ledger, canonical_request_id
from cage.pricing import (
    _get,
    apply_usage,
    guess_provider,
    normalise_anthropic,
    normalise_openai,
    normalise_usage,
    price_event,
)

F = TypeVar("F", bound=Callable[..., Any])

_ACTIVE: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("cage_meter", default=None)


class Writer(Protocol):
    """Where metered events go: anything with ``write(event)``."""

    def write(self, event: Event) -> None:
        """Store one event."""


class NullWriter:
    """Discards events (metering on, recording off)."""

    def write(self, event: Event) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Nothing to release."""


class JsonlWriter:
    """Appends one JSON object per event to a file, flushed per event.

    Each line is written with a single ``write`` on a file opened with O_APPEND, so lines
    from several processes appending to the same file do not interleave.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def write(self, event: Event) -> None:
        """Append the event as one JSON line."""
        line = json.dumps(event.to_dict(), separators=(",", ":"), sort_keys=True) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Nothing held open between events."""


class LedgerWriter:
    """Adds events to a ledger (default: the default ledger), opened on first use."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = path
        self._ledger: Ledger | None = None
        self._lock = threading.Lock()

    def write(self, event: Event) -> None:
        """Add the event (one committed transaction)."""
        with self._lock:
            if self._ledger is None:
                self._ledger = Ledger.open(self.path)
            self._ledger.add(event)

    def close(self) -> None:
        """Close the ledger if it was opened."""
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None


# One shared default writer per process, so meters do not each open the ledger.
_default_writer: LedgerWriter | None = None
_default_lock = threading.Lock()


def _default() -> LedgerWriter:
    global _default_writer
    with _default_lock:
        if _default_writer is None:
            _default_writer = LedgerWriter()
        return _default_writer


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# How a response object's shape names its provider: (marker on the response, value, provider,
# normaliser). Checked in order; the first row that matches wins.
RESPONSE_SHAPES: tuple[tuple[str, str, str, Callable[[Any], Any]], ...] = (
    ("type", "message", "anthropic", normalise_anthropic),  # Anthropic Message
    ("object", "chat.completion", "openai", normalise_openai),  # Chat Completions
    ("object", "response", "openai", normalise_openai),  # Responses API
)


class Meter:
    """Records LLM calls as ledger events; a context manager and a decorator (see module)."""

    def __init__(
        self,
        caller: str | None = None,
        mission_id: str | None = None,
        writer: Writer | None = None,
        provider: str | None = None,
        model: str | None = None,
        role: str | None = None,
    ) -> None:
        self.caller = caller
        self.mission_id = mission_id or os.environ.get("CAGE_MISSION_ID") or None
        self.writer = writer
        self.provider = provider
        self.model = model
        self.role = role
        self.events: list[Event] = []
        self._started = time.monotonic()
        self._last = self._started
        self._recorded_in_block = 0
        self._token: contextvars.Token | None = None

    # -- recording ------------------------------------------------------------------------

    def record(
        self,
        response_or_usage: Any,
        provider: str | None = None,
        model: str | None = None,
        *,
        duration_s: float | None = None,
        role: str | None = None,
    ) -> Event | None:
        """Record one call from an SDK response, or a usage mapping; returns the event.

        Reads only ``usage``, ``model`` and ``id`` (and ``type``/``object`` to tell the
        provider): never content. Returns None (and warns) when there is no usage.
        """
        now = time.monotonic()
        if duration_s is None:
            duration_s = now - self._last
        self._last = now
        obj = response_or_usage
        usage = _get(obj, "usage")
        is_response = usage is not None
        if not is_response:
            # A usage mapping itself (or a response whose usage is missing).
            if _get(obj, "model") is not None or _get(obj, "id") is not None:
                warnings.warn(
                    "cage.meter: the response has no usage (a stream read without "
                    "include_usage?); nothing recorded",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
            usage = obj
        if usage is None:
            return None
        shape_provider = None
        normaliser = None
        if is_response:
            for marker, value, name, shape_normaliser in RESPONSE_SHAPES:
                if _get(obj, marker) == value:
                    shape_provider, normaliser = name, shape_normaliser
                    break
        model_name = model or (_get(obj, "model") if is_response else None) or self.model
        if not isinstance(model_name, str) or not model_name:
            model_name = "unknown"
        provider_name = (
            provider or self.provider or shape_provider or guess_provider(model_name) or "unknown"
        )
        counts = normaliser(usage) if normaliser else normalise_usage(usage, provider_name)
        # The SDKs keep the API's request-id header as ``_request_id``: with it the call gets
        # the id `cage proxy` gives the same call (cage.ledger.canonical_request_id), so a
        # call both metered here and through the proxy is recorded once.
        response_id = (_get(obj, "_request_id") or _get(obj, "id")) if is_response else None
        event = Event(
            timestamp=_now(),
            provider=provider_name,
            model=model_name,
            truth="measured",  # tokens from the provider's usage; priced below -> modeled
            role=role or self.role,
            caller=self.caller,
            mission_id=self.mission_id,
            duration_s=round(duration_s, 6),
            request_id=canonical_request_id(provider_name, response_id)
            if isinstance(response_id, str) and response_id
            else None,
            source="meter",
        )
        apply_usage(event, counts)
        reported = _get(usage, "cost")  # e.g. OpenRouter reports the charged cost
        if isinstance(reported, (int, float)) and not isinstance(reported, bool):
            event.cost_usd = float(reported)
            event.truth = "measured"
        else:
            price_event(event)
        self._emit(event)
        return event

    def record_error(
        self,
        error: BaseException | str,
        provider: str | None = None,
        model: str | None = None,
        usage: Any = None,
    ) -> Event:
        """Record a failed call: ``error_class`` set, tokens from ``usage`` if any."""
        now = time.monotonic()
        duration = now - self._last
        self._last = now
        name = error if isinstance(error, str) else type(error).__name__
        model_name = model or self.model or "unknown"
        provider_name = provider or self.provider or guess_provider(model_name) or "unknown"
        event = Event(
            timestamp=_now(),
            provider=provider_name,
            model=model_name,
            truth="estimated",
            role=self.role,
            caller=self.caller,
            mission_id=self.mission_id,
            duration_s=round(duration, 6),
            error_class=name,
            source="meter",
        )
        if usage is not None:
            apply_usage(event, normalise_usage(usage, provider_name))
            event.truth = "measured"
            price_event(event)
        self._emit(event)
        return event

    def _emit(self, event: Event) -> None:
        self._recorded_in_block += 1
        self.events.append(event)
        (self.writer if self.writer is not None else _default()).write(event)

    # -- context manager and decorator -----------------------------------------------------

    def __enter__(self) -> Meter:
        self._started = self._last = time.monotonic()
        self._recorded_in_block = 0
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None
        if exc is not None and self._recorded_in_block == 0 and isinstance(exc, Exception):
            self.record_error(exc)
        # Never swallow the exception: metering observes, it does not change behaviour.

    async def __aenter__(self) -> Meter:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def _fresh(self, caller: str | None) -> Meter:
        return Meter(
            caller=self.caller or caller,
            mission_id=self.mission_id,
            writer=self.writer,
            provider=self.provider,
            model=self.model,
            role=self.role,
        )

    def __call__(self, func: F) -> F:
        """Decorate ``func``: each call runs inside its own meter (caller = the function's
        qualified name unless given); ``record()`` inside it records there."""
        caller = f"{func.__module__}.{func.__qualname__}"
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._fresh(caller):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh(caller):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def meter(
    caller: str | None = None,
    mission_id: str | None = None,
    writer: Writer | None = None,
    *,
    provider: str | None = None,
    model: str | None = None,
    role: str | None = None,
) -> Meter:
    """A meter: use as ``with meter(...) as m:`` or as ``@meter(...)``.

    ``mission_id`` defaults to ``$CAGE_MISSION_ID``; ``writer`` to a LedgerWriter on the
    default ledger (``$CAGE_LEDGER`` or the user data directory), opened on first event.
    """
    return Meter(
        caller=caller,
        mission_id=mission_id,
        writer=writer,
        provider=provider,
        model=model,
        role=role,
    )


def current_meter() -> Meter | None:
    """The innermost active meter in this thread/task, or None."""
    return _ACTIVE.get()


def record(
    response_or_usage: Any, provider: str | None = None, model: str | None = None
) -> Event | None:
    """Record with the innermost active meter (e.g. inside a ``@meter`` function).

    Outside any meter, records with a one-off default meter (caller None).
    """
    active = _ACTIVE.get()
    if active is None:
        active = Meter()
    return active.record(response_or_usage, provider=provider, model=model)
