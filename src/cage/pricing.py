"""Tokens -> dollars, with truth labels. Prices come from genai-prices' bundled data, offline.

Normalisation happens once, here. cage's :class:`Usage` (like :class:`cage.ledger.Event`)
counts *disjoint* buckets:

- ``input_tokens``: prompt tokens neither read from nor written to the cache,
- ``cache_read_tokens``, ``cache_write_tokens`` (of which ``cache_write_1h_tokens`` were
  written with Anthropic's 1-hour TTL),
- ``output_tokens``: everything generated, reasoning tokens included.

Providers count differently (the rows of :data:`USAGE_FIELDS`): Anthropic's ``input_tokens``
already excludes the cache; OpenAI's ``prompt_tokens`` (Chat Completions) and
``input_tokens`` (Responses API, Codex) include the cached part, which is subtracted here.
genai-prices in turn wants ``input_tokens`` to *include* cache reads and writes (it prices
the remainder at the input rate), so :func:`price` adds them back.

Price lookups are cached per (provider, model, UTC day) — prices change on dates — and the
arithmetic is done here from the looked-up rates, because genai-prices' own per-call
calculation costs ~100 µs, too slow for a million-line import. Each cached rate set is
checked once against genai-prices' own calculation; a model whose prices cage cannot
reproduce exactly is priced by genai-prices on every call instead.

Free models: a call is priced 0 only when it is declared free, either by the provider name
``local`` (a model on the user's own hardware) or by ``CAGE_FREE_MODELS``, a comma-separated
list of ``provider`` or ``provider/model`` entries (``ollama,lmstudio/qwen3-8b``). Nothing is
free by guess: ``ollama`` also serves paid cloud models.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cage.ledger import Event

FREE_PROVIDERS: frozenset[str] = frozenset({"local"})


@dataclass(frozen=True)
class Usage:
    """Disjoint token counts of one call (see the module docstring)."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0  # part of cache_write_tokens, not in addition to it

    @property
    def total_tokens(self) -> int:
        """Every token of the call, each counted once."""
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )


# ---------------------------------------------------------------------------------------
# Normalisation: one table row per provider convention.


def _get(obj: Any, key: str) -> Any:
    """Read ``key`` from a mapping or an object (SDK pydantic models expose attributes)."""
    if type(obj) is dict:  # the common case (decoded JSON), without the ABC check
        return obj.get(key)
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _count(obj: Any, *path: str) -> int:
    value = obj
    for key in path:
        value = _get(value, key)
        if value is None:
            return 0
    if isinstance(value, bool):
        return 0
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return value if isinstance(value, int) and value > 0 else 0


def normalise_anthropic(usage: Mapping) -> Usage:
    """Anthropic Messages ``usage`` (also Claude Code's ``message.usage``) -> Usage.

    ``input_tokens`` already excludes the cache. ``cache_creation`` (when present) splits
    cache writes by TTL; its two parts are then the cache-write count.
    """
    creation = _get(usage, "cache_creation")
    write_5m = _count(creation, "ephemeral_5m_input_tokens")
    write_1h = _count(creation, "ephemeral_1h_input_tokens")
    if creation is not None and (write_5m or write_1h):
        cache_write = write_5m + write_1h
    else:
        cache_write = _count(usage, "cache_creation_input_tokens")
        write_1h = 0
    return Usage(
        input_tokens=_count(usage, "input_tokens"),
        output_tokens=_count(usage, "output_tokens"),
        cache_read_tokens=_count(usage, "cache_read_input_tokens"),
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=write_1h,
    )


def normalise_openai(usage: Mapping) -> Usage:
    """OpenAI usage (Chat Completions, Responses API, Codex ``token_count``) -> Usage.

    The prompt count includes cached tokens: ``prompt_tokens`` with
    ``prompt_tokens_details.cached_tokens`` (Chat Completions), ``input_tokens`` with
    ``input_tokens_details.cached_tokens`` (Responses) or ``cached_input_tokens`` (Codex).
    The cached part is subtracted once, here. Reasoning tokens are already in the output.
    """
    if _get(usage, "prompt_tokens") is not None:
        prompt = _count(usage, "prompt_tokens")
        output = _count(usage, "completion_tokens")
        cached = _count(usage, "prompt_tokens_details", "cached_tokens")
    else:
        prompt = _count(usage, "input_tokens")
        output = _count(usage, "output_tokens")
        cached = _count(usage, "input_tokens_details", "cached_tokens") or _count(
            usage, "cached_input_tokens"
        )
    cached = min(cached, prompt)
    return Usage(input_tokens=prompt - cached, output_tokens=output, cache_read_tokens=cached)


def normalise_cage(usage: Mapping) -> Usage:
    """A usage already in cage's disjoint form (an Event-shaped dict)."""
    return Usage(
        input_tokens=_count(usage, "input_tokens"),
        output_tokens=_count(usage, "output_tokens"),
        cache_read_tokens=_count(usage, "cache_read_tokens"),
        cache_write_tokens=_count(usage, "cache_write_tokens"),
        cache_write_1h_tokens=_count(usage, "cache_write_1h_tokens"),
    )


# Which convention a usage follows, decided by the first marker key present. Providers that
# speak the OpenAI wire format (most of them) follow OpenAI's counting.
USAGE_FIELDS: tuple[tuple[str, Callable[[Any], Usage]], ...] = (
    ("cache_read_input_tokens", normalise_anthropic),
    ("cache_creation_input_tokens", normalise_anthropic),
    ("cache_creation", normalise_anthropic),
    ("prompt_tokens", normalise_openai),
    ("input_tokens_details", normalise_openai),
    ("cached_input_tokens", normalise_openai),
    ("cache_read_tokens", normalise_cage),
    ("cache_write_tokens", normalise_cage),
)

PROVIDER_NORMALISERS: dict[str, Callable[[Any], Usage]] = {
    "anthropic": normalise_anthropic,
    "openai": normalise_openai,
}


def normalise_usage(usage: Any, provider: str | None = None) -> Usage:
    """Any provider's usage (mapping or SDK object) -> Usage.

    The shape decides first (its marker keys, :data:`USAGE_FIELDS`), then the provider;
    a bare ``{input_tokens, output_tokens}`` means the same in every convention.
    """
    if isinstance(usage, Usage):
        return usage
    for marker, normaliser in USAGE_FIELDS:
        if _get(usage, marker) is not None:
            return normaliser(usage)
    normaliser = PROVIDER_NORMALISERS.get((provider or "").lower(), normalise_cage)
    return normaliser(usage)


# ---------------------------------------------------------------------------------------
# Prices


def is_free(provider: str, model: str) -> bool:
    """True when the call is declared free: provider ``local`` or listed in CAGE_FREE_MODELS."""
    provider = provider.lower()
    if provider in FREE_PROVIDERS:
        return True
    spec = os.environ.get("CAGE_FREE_MODELS")
    if not spec:
        return False
    entries = _free_models(spec)
    return (provider, "*") in entries or (provider, model.lower()) in entries


@lru_cache(maxsize=8)
def _free_models(spec: str) -> frozenset[tuple[str, str]]:
    entries = set()
    for item in spec.split(","):
        item = item.strip().lower()
        if not item:
            continue
        provider, _, model = item.partition("/")
        entries.add((provider, model or "*"))
    return frozenset(entries)


# (cage Usage field, genai-prices usage key, price key). genai-prices treats cache reads
# and writes as parts of input_tokens and 1h writes as part of cache writes; a part whose
# price a model lacks is charged at its parent's price.
_SLOTS: tuple[tuple[str, str], ...] = (
    ("input", "input_mtok"),
    ("output", "output_mtok"),
    ("cache_read", "cache_read_mtok"),
    ("cache_write", "cache_write_mtok"),
    ("cache_write_1h", "cache_write_1h_mtok"),
)
# Usages the fast path is checked against: plain, every cache kind, and a prompt above the
# usual 128k/200k tier thresholds.
_PROBES = (
    Usage(1000, 100),
    Usage(1000, 100, 300, 200, 50),
    Usage(250_000, 1000, 10_000, 5000, 0),
)
_PARENT = {"cache_read": "input", "cache_write": "input", "cache_write_1h": "cache_write"}


@dataclass(frozen=True)
class _Rates:
    """Per-token prices of one model on one day; ``fallback`` = let genai-prices compute."""

    model_price: Any  # genai_prices.types.ModelPrice
    # slot -> (base price per token, ((tier start, price per token), ...) highest first)
    slots: Mapping[str, tuple[float, tuple[tuple[int, float], ...]]]
    fallback: bool

    @property
    def owners(self) -> Mapping[str, tuple[float, tuple[tuple[int, float], ...]]]:
        """slot -> the rates that charge it: its own, else its parent's (as genai-prices)."""
        return self._owners  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        owners = {}
        for slot, _ in _SLOTS:
            owner = slot
            while owner not in self.slots and owner in _PARENT:
                owner = _PARENT[owner]
            if owner in self.slots:
                owners[slot] = self.slots[owner]
        object.__setattr__(self, "_owners", owners)


@lru_cache(maxsize=4096)
def _model_info(provider: str, model: str) -> tuple[Any, bool] | None:
    """genai-prices' ModelInfo for (provider, model) and whether its price varies by time
    of day; None when genai-prices does not know the provider or the model."""
    from genai_prices import data_snapshot
    from genai_prices.types import ModelPrice, TimeOfDateConstraint

    snapshot = data_snapshot.get_snapshot()
    try:
        _, info = snapshot.find_provider_model(model, None, provider or None, None)
    except LookupError:
        return None
    prices = info.prices
    by_time_of_day = not isinstance(prices, ModelPrice) and any(
        isinstance(p.constraint, TimeOfDateConstraint) for p in prices
    )
    return info, by_time_of_day


@lru_cache(maxsize=16384)
def _rates(provider: str, model: str, when: str) -> _Rates | None:
    """Rates for (provider, model) at ``when`` (a UTC day, or a minute for models whose
    price depends on the time of day)."""
    found = _model_info(provider, model)
    if found is None:
        return None
    info, _ = found
    stamp = datetime.fromisoformat(when if "T" in when else when + "T00:00:00").replace(
        tzinfo=timezone.utc
    )
    model_price = info.get_prices(stamp)
    from genai_prices.types import TieredPrices

    slots: dict[str, tuple[float, tuple[tuple[int, float], ...]]] = {}
    for slot, key in _SLOTS:
        value = getattr(model_price, key, None)
        if value is None:
            continue
        if isinstance(value, TieredPrices):
            tiers = tuple(
                (int(t.start), float(t.price) / 1e6)
                for t in sorted(value.tiers, key=lambda t: t.start, reverse=True)
            )
            slots[slot] = (float(value.base) / 1e6, tiers)
        else:
            slots[slot] = (float(value) / 1e6, ())
    # Prices for units cage never reports (audio, per-modality text, searches) count zero
    # here, but could in principle change how genai-prices splits our counts. So prove the
    # fast arithmetic equals genai-prices' own on probes (one slow call each per model and
    # day) and price the model the slow, exact way if any probe differs.
    rates = _Rates(model_price, slots, fallback=False)
    for probe in _PROBES:
        expected = _slow(rates, probe)
        got = _fast(rates, probe)
        if not math.isclose(expected, got, rel_tol=1e-9, abs_tol=1e-12):
            return replace(rates, fallback=True)
    return rates


def _genai_usage(usage: Usage) -> Any:
    from genai_prices import Usage as GenaiUsage

    # genai-prices counts cache reads and writes inside input_tokens.
    return GenaiUsage(
        input_tokens=usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=min(usage.cache_write_1h_tokens, usage.cache_write_tokens),
    )


def _slow(rates: _Rates, usage: Usage) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(rates.model_price.calc_price(_genai_usage(usage))["total_price"])


def _fast(rates: _Rates, usage: Usage) -> float:
    return _fast_counts(
        rates,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
    )


def _fast_counts(
    rates: _Rates, inp: int, out: int, cache_read: int, cache_write: int, write_1h: int
) -> float:
    write_1h = min(write_1h, cache_write)
    # genai-prices picks a tier by the whole prompt (its input_tokens, cache included).
    prompt = inp + cache_read + cache_write
    total = 0.0
    for slot, count in (
        ("input", inp),
        ("output", out),
        ("cache_read", cache_read),
        ("cache_write", cache_write - write_1h),
        ("cache_write_1h", write_1h),
    ):
        if not count:
            continue
        found = rates.owners.get(slot)
        if found is None:
            continue  # no price for it or any parent: genai-prices charges 0 too
        base, tiers = found
        rate = base
        for start, tier_rate in tiers:
            if prompt > start:
                rate = tier_rate
                break
        total += count * rate
    return total


def _when_key(provider: str, model: str, when: datetime | None) -> str:
    if when is None:
        when = datetime.now(timezone.utc)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    else:
        when = when.astimezone(timezone.utc)
    found = _model_info(provider, model)
    if found is not None and found[1]:
        return when.strftime("%Y-%m-%dT%H:%M")
    return when.strftime("%Y-%m-%d")


def price(provider: str, model: str, usage: Usage, when: datetime | None = None) -> float | None:
    """Dollars for one call, or None when the model is unknown (never a silent 0).

    ``when`` is the request time (prices change over time); None means now. A model
    declared free (:func:`is_free`) costs 0.0.
    """
    if is_free(provider, model):
        return 0.0
    provider = provider.lower()
    model = model.lower()
    rates = _rates(provider, model, _when_key(provider, model, when))
    if rates is None:
        return None
    return _slow(rates, usage) if rates.fallback else _fast(rates, usage)


def price_of_day(provider: str, model: str, usage: Usage, stamp: str) -> float | None:
    """:func:`price` with the request time as ISO text in UTC (``2026-11-23T10:00:00Z``)."""
    return _price_counts(
        provider,
        model,
        stamp,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
    )


_BY_TIME_OF_DAY = object()


@lru_cache(maxsize=16384)
def _rates_on_day(provider: str, model: str, day: str) -> Any:
    """_rates for a UTC day, or _BY_TIME_OF_DAY when the price depends on the hour."""
    provider = provider.lower()
    model = model.lower()
    found = _model_info(provider, model)
    if found is None:
        return None
    if found[1]:
        return _BY_TIME_OF_DAY
    return _rates(provider, model, day)


def _price_counts(
    provider: str,
    model: str,
    stamp: str,
    inp: int,
    out: int,
    cache_read: int,
    cache_write: int,
    write_1h: int,
) -> float | None:
    # The hot path of an import: two cache hits and a few multiplications.
    if is_free(provider, model):
        return 0.0
    rates = _rates_on_day(provider, model, stamp[:10])
    if rates is _BY_TIME_OF_DAY:
        rates = _rates(provider.lower(), model.lower(), stamp[:16])
    if rates is None:
        return None
    if rates.fallback:
        return _slow(rates, Usage(inp, out, cache_read, cache_write, write_1h))
    return _fast_counts(rates, inp, out, cache_read, cache_write, write_1h)


def usage_of_event(event: Event) -> Usage:
    """The event's token counts as a Usage (1h cache writes from ``extra``)."""
    return Usage(
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        cache_read_tokens=event.cache_read_tokens,
        cache_write_tokens=event.cache_write_tokens,
        cache_write_1h_tokens=int(event.extra.get("cache_write_1h_tokens", 0) or 0)
        if event.extra
        else 0,
    )


def apply_usage(event: Event, usage: Usage) -> Event:
    """Copy a normalised Usage into an event (1h cache writes go to ``extra``)."""
    event.input_tokens = usage.input_tokens
    event.output_tokens = usage.output_tokens
    event.cache_read_tokens = usage.cache_read_tokens
    event.cache_write_tokens = usage.cache_write_tokens
    if usage.cache_write_1h_tokens:
        event.extra = {**event.extra, "cache_write_1h_tokens": usage.cache_write_1h_tokens}
    return event


def price_event(event: Event) -> Event:
    """Fill ``cost_usd`` and ``truth`` when the source did not report a cost.

    Truth rules: a cost the source gave is kept as it is (a provider-reported cost is
    ``measured``). Otherwise the price table is applied: tokens from the provider's usage
    (truth ``measured`` or ``modeled`` on input) become ``modeled``; ``estimated`` tokens
    stay ``estimated``. An unknown model leaves ``cost_usd`` None. Returns the same event.
    """
    if event.cost_usd is not None:
        return event
    stamp = event.timestamp
    if not isinstance(stamp, str):
        stamp = stamp.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    elif not (len(stamp) >= 10 and stamp[4] == "-" and stamp.endswith(("Z", "z"))):
        from cage.ledger import normalise_timestamp

        try:
            stamp = normalise_timestamp(stamp)
        except ValueError:
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    extra = event.extra
    event.cost_usd = _price_counts(
        event.provider,
        event.model,
        stamp,
        event.input_tokens,
        event.output_tokens,
        event.cache_read_tokens,
        event.cache_write_tokens,
        int(extra.get("cache_write_1h_tokens") or 0) if extra else 0,
    )
    if event.truth != "estimated":
        event.truth = "modeled"
    return event


def per_token_prices(provider: str, model: str, when: datetime | None = None) -> dict | None:
    """genai-prices' per-million-token prices for a model (for docs, tests and --json)."""
    provider = provider.lower()
    model = model.lower()
    rates = _rates(provider, model, _when_key(provider, model, when))
    if rates is None:
        return None
    out = {}
    for key, value in vars(rates.model_price).items():
        if value is not None and not key.startswith("_"):
            out[key] = str(value) if isinstance(value, Decimal) else repr(value)
    return out


@lru_cache(maxsize=1024)
def guess_provider(model: str) -> str | None:
    """The provider genai-prices associates with a model name (``claude-…`` -> anthropic),
    or None. Used only when a source does not say which provider served the call."""
    from genai_prices import data_snapshot

    try:
        provider = data_snapshot.get_snapshot().find_provider(model.lower(), None, None)
    except LookupError:
        return None
    return provider.id


_FREE = object()
_GENERIC = object()


class Pricer:
    """Prices many calls in a row (an import): :func:`price` per call, faster.

    The plan for each (provider, model, UTC day) is worked out once: free, unknown, a set of
    flat per-token rates (then a call costs five multiplications), or the general path for
    tiered and time-of-day prices and models priced by genai-prices itself. The result is
    the same float :func:`price_event` gives (same products, added in the same order).
    ``CAGE_FREE_MODELS`` is read when the Pricer is made.
    """

    def __init__(self) -> None:
        self._plans: dict[tuple[str, str, str], Any] = {}
        self._free_spec = os.environ.get("CAGE_FREE_MODELS")

    def load(self) -> None:
        """Load genai-prices' table now (it is loaded on the first call otherwise), so that
        processes forked afterwards share it instead of each loading their own."""
        from genai_prices import data_snapshot

        data_snapshot.get_snapshot()

    def __call__(
        self,
        provider: str,
        model: str,
        stamp: str,
        inp: int,
        out: int,
        cache_read: int,
        cache_write: int,
        write_1h: int = 0,
    ) -> float | None:
        """Dollars for one call at ``stamp`` (ISO text in UTC), or None when unpriced."""
        key = (provider, model, stamp[:10])
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(provider, model, stamp[:10])
        if type(plan) is tuple:
            a, b, c, d, e = plan
            if write_1h > cache_write:
                write_1h = cache_write
            return inp * a + out * b + cache_read * c + (cache_write - write_1h) * d + write_1h * e
        if plan is _FREE:
            return 0.0
        if plan is _GENERIC:
            return _price_counts(
                provider, model, stamp, inp, out, cache_read, cache_write, write_1h
            )
        return None  # unknown model

    def _plan(self, provider: str, model: str, day: str) -> Any:
        lowered = provider.lower()
        if lowered in FREE_PROVIDERS:
            return _FREE
        if self._free_spec:
            entries = _free_models(self._free_spec)
            if (lowered, "*") in entries or (lowered, model.lower()) in entries:
                return _FREE
        rates = _rates_on_day(provider, model, day)
        if rates is None:
            return "unknown"
        if rates is _BY_TIME_OF_DAY or rates.fallback:
            return _GENERIC
        flat = []
        for slot, _ in _SLOTS:
            found = rates.owners.get(slot)
            if found is None:
                flat.append(0.0)  # no price for it or any parent: genai-prices charges 0
                continue
            base, tiers = found
            if tiers:
                return _GENERIC
            flat.append(base)
        return tuple(flat)
