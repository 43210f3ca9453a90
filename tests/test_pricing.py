"""Pricing: normalisation rules, genai-prices rates, truth labels, free and unknown models."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from cage.ledger import Event
from cage.pricing import (
    Usage,
    guess_provider,
    is_free,
    normalise_anthropic,
    normalise_openai,
    normalise_usage,
    price,
    price_event,
)

WHEN = datetime(2026, 11, 1, tzinfo=timezone.utc)


def rates(provider: str, model: str) -> dict[str, Decimal]:
    """genai-prices' own per-million-token prices for a model on WHEN."""
    found = calc_price(
        GenaiUsage(input_tokens=1), model, provider_id=provider, genai_request_timestamp=WHEN
    )
    return {k: v for k, v in vars(found.model_price).items() if isinstance(v, Decimal)}


def dollars(**counts_and_rates: tuple[int, Decimal]) -> float:
    return float(sum(Decimal(n) * r for n, r in counts_and_rates.values()) / Decimal(1_000_000))


# --- normalisation: one row per rule --------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # Anthropic: input_tokens already excludes the cache.
        (
            {
                "input_tokens": 10,
                "output_tokens": 5,
                "cache_read_input_tokens": 300,
                "cache_creation_input_tokens": 40,
            },
            Usage(10, 5, 300, 40, 0),
        ),
        # The TTL breakdown, when present, is the cache-write count.
        (
            {
                "input_tokens": 10,
                "output_tokens": 5,
                "cache_creation_input_tokens": 40,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 15,
                    "ephemeral_1h_input_tokens": 25,
                },
            },
            Usage(10, 5, 0, 40, 25),
        ),
    ],
)
def test_normalise_anthropic(usage, expected):
    assert normalise_anthropic(usage) == expected
    assert normalise_usage(usage) == expected


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # Chat Completions: prompt_tokens includes the cached part.
        (
            {
                "prompt_tokens": 1000,
                "completion_tokens": 50,
                "prompt_tokens_details": {"cached_tokens": 800},
                "completion_tokens_details": {"reasoning_tokens": 30},
            },
            Usage(200, 50, 800),
        ),
        # Responses API: input_tokens includes input_tokens_details.cached_tokens.
        (
            {
                "input_tokens": 1000,
                "output_tokens": 70,
                "input_tokens_details": {"cached_tokens": 600},
                "output_tokens_details": {"reasoning_tokens": 20},
            },
            Usage(400, 70, 600),
        ),
        # Codex token_count: cached_input_tokens; reasoning already inside output_tokens.
        (
            {
                "input_tokens": 500,
                "cached_input_tokens": 100,
                "output_tokens": 40,
                "reasoning_output_tokens": 10,
            },
            Usage(400, 40, 100),
        ),
        # Never negative, whatever the provider sends.
        (
            {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 9},
            },
            Usage(0, 1, 5),
        ),
    ],
)
def test_normalise_openai(usage, expected):
    assert normalise_openai(usage) == expected
    assert normalise_usage(usage, "openai") == expected


def test_normalise_reads_sdk_objects_by_attribute():
    class Details:
        cached_tokens = 3

    class SdkUsage:
        prompt_tokens = 10
        completion_tokens = 2
        prompt_tokens_details = Details()

    assert normalise_usage(SdkUsage()) == Usage(7, 2, 3)


# --- prices ------------------------------------------------------------------------------


def test_anthropic_cache_pricing_matches_genai_prices_rates():
    r = rates("anthropic", "claude-sonnet-4-20250514")
    usage = normalise_anthropic(
        {
            "input_tokens": 1000,
            "output_tokens": 500,
            "cache_read_input_tokens": 3000,
            "cache_creation_input_tokens": 2000,
        }
    )
    expected = dollars(
        i=(1000, r["input_mtok"]),
        o=(500, r["output_mtok"]),
        cr=(3000, r["cache_read_mtok"]),
        cw=(2000, r["cache_write_mtok"]),
    )
    assert price("anthropic", "claude-sonnet-4-20250514", usage, WHEN) == pytest.approx(
        expected, rel=1e-12
    )
    # $3 in, $15 out, $0.30 read, $3.75 write per million: the table this test relies on.
    assert expected == pytest.approx(0.003 + 0.0075 + 0.0009 + 0.0075)


def test_anthropic_1h_cache_writes_are_priced_at_their_own_rate():
    r = rates("anthropic", "claude-sonnet-4-20250514")
    usage = normalise_anthropic(
        {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 1000,
            "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
        }
    )
    expected = dollars(w5=(400, r["cache_write_mtok"]), w1=(600, r["cache_write_1h_mtok"]))
    assert price("anthropic", "claude-sonnet-4-20250514", usage, WHEN) == pytest.approx(
        expected, rel=1e-12
    )


def test_openai_cached_prompt_pricing_matches_genai_prices_rates():
    r = rates("openai", "gpt-4o")
    usage = normalise_openai(
        {
            "prompt_tokens": 5000,
            "completion_tokens": 300,
            "prompt_tokens_details": {"cached_tokens": 4000},
        }
    )
    expected = dollars(
        i=(1000, r["input_mtok"]), cr=(4000, r["cache_read_mtok"]), o=(300, r["output_mtok"])
    )
    assert price("openai", "gpt-4o", usage, WHEN) == pytest.approx(expected, rel=1e-12)
    # Subtracting the cached part matters: pricing all 5000 at the input rate is dearer.
    assert expected < dollars(i=(5000, r["input_mtok"]), o=(300, r["output_mtok"]))


@pytest.mark.parametrize(
    ("provider", "model", "usage"),
    [
        ("anthropic", "claude-sonnet-4-5", Usage(250_000, 1000, 10_000, 5000, 1000)),  # tiered
        ("anthropic", "claude-3-5-haiku-latest", Usage(1000, 100, 300, 200, 50)),
        ("openai", "gpt-5", Usage(1000, 100, 300)),
        ("google", "gemini-2.5-pro", Usage(300_000, 100, 3000)),  # tiered
    ],
)
def test_fast_path_equals_genai_prices_own_calculation(provider, model, usage):
    theirs = calc_price(
        GenaiUsage(
            input_tokens=usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            cache_write_1h_tokens=usage.cache_write_1h_tokens,
        ),
        model,
        provider_id=provider,
        genai_request_timestamp=WHEN,
    ).total_price
    assert price(provider, model, usage, WHEN) == pytest.approx(float(theirs), rel=1e-12)


def test_unknown_model_is_none_never_zero():
    assert price("openai", "no-such-model-xyz", Usage(10, 10), WHEN) is None
    assert price("no-such-provider", "gpt-4o", Usage(10, 10), WHEN) is None


def test_local_models_are_free_only_when_declared(monkeypatch):
    monkeypatch.delenv("CAGE_FREE_MODELS", raising=False)
    assert price("local", "llama3", Usage(10, 10)) == 0.0
    assert price("ollama", "llama3", Usage(10, 10)) is None
    monkeypatch.setenv("CAGE_FREE_MODELS", "ollama, lmstudio/qwen3-8b")
    assert is_free("ollama", "anything")
    assert price("ollama", "llama3", Usage(10, 10)) == 0.0
    assert price("lmstudio", "qwen3-8b", Usage(10, 10)) == 0.0
    assert price("lmstudio", "other", Usage(10, 10)) is None


def test_guess_provider():
    assert guess_provider("claude-sonnet-4-20250514") == "anthropic"
    assert guess_provider("gpt-4o") == "openai"
    assert guess_provider("my-own-model") is None


# --- truth labels ------------------------------------------------------------------------


def event(**fields) -> Event:
    base = {
        "timestamp": "2026-11-01T10:00:00Z",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 1000,
        "output_tokens": 100,
    }
    base.update(fields)
    return Event(**base)


def test_provider_reported_cost_stays_measured():
    e = price_event(event(cost_usd=0.123, truth="measured"))
    assert (e.cost_usd, e.truth) == (0.123, "measured")


def test_measured_tokens_priced_from_the_table_are_modeled():
    e = price_event(event(truth="measured"))
    assert e.truth == "modeled"
    assert e.cost_usd == pytest.approx(price("openai", "gpt-4o", Usage(1000, 100), WHEN))


def test_estimated_tokens_stay_estimated_even_when_priced():
    e = price_event(event(truth="estimated"))
    assert e.truth == "estimated"
    assert e.cost_usd is not None and e.cost_usd > 0


def test_unknown_model_event_stays_unpriced():
    e = price_event(event(model="no-such-model-xyz", truth="measured"))
    assert e.cost_usd is None
    assert e.truth == "modeled"


def test_event_1h_cache_writes_come_from_extra():
    plain = price_event(
        event(
            provider="anthropic",
            model="claude-sonnet-4-20250514",
            input_tokens=0,
            output_tokens=0,
            cache_write_tokens=1000,
        )
    )
    hour = price_event(
        event(
            provider="anthropic",
            model="claude-sonnet-4-20250514",
            input_tokens=0,
            output_tokens=0,
            cache_write_tokens=1000,
            extra={"cache_write_1h_tokens": 1000},
        )
    )
    r = rates("anthropic", "claude-sonnet-4-20250514")
    assert plain.cost_usd == pytest.approx(dollars(w=(1000, r["cache_write_mtok"])))
    assert hour.cost_usd == pytest.approx(dollars(w=(1000, r["cache_write_1h_mtok"])))


def test_the_import_pricer_gives_exactly_what_price_event_gives(monkeypatch):
    # Pricer (the import's hot path) must be the same float as price_event, call for call:
    # flat rates, tiered prompts, 1h cache writes, unknown and free models.
    import random

    from cage.ledger import Event
    from cage.pricing import Pricer, price_event

    monkeypatch.setenv("CAGE_FREE_MODELS", "ollama")
    rng = random.Random(5)
    models = [
        ("anthropic", "claude-sonnet-4-20250514"),
        ("anthropic", "claude-sonnet-4-5"),
        ("anthropic", "claude-opus-4-1-20250805"),
        ("anthropic", "claude-3-5-haiku-20241022"),
        ("openai", "gpt-4o"),
        ("openai", "gpt-5"),
        ("google", "gemini-2.5-pro"),
        ("deepseek", "deepseek-chat"),
        ("anthropic", "no-such-model-xyz"),
        ("ollama", "llama3"),
        ("local", "mine"),
    ]
    pricer = Pricer()
    for _ in range(400):
        provider, model = rng.choice(models)
        counts = [rng.choice((0, rng.randint(1, 300_000))) for _ in range(4)]
        write_1h = rng.choice((0, 0, rng.randint(0, counts[3] + 10)))
        month, day, hour = rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23)
        stamp = f"2025-{month:02d}-{day:02d}T{hour:02d}:00:00Z"
        event = Event(
            timestamp=stamp,
            provider=provider,
            model=model,
            input_tokens=counts[0],
            output_tokens=counts[1],
            cache_read_tokens=counts[2],
            cache_write_tokens=counts[3],
            truth="measured",
            extra={"cache_write_1h_tokens": write_1h} if write_1h else {},
        )
        expected = price_event(event).cost_usd
        assert pricer(provider, model, stamp, *counts, write_1h) == expected, (model, counts)
