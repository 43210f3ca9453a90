"""meter(): SDK-shaped responses -> events, writers, errors, and never any content.

The OpenAI and Anthropic SDKs are not installed here, so the responses are small objects of
the same shape (attributes, as the SDKs' pydantic models expose them) and plain dicts.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from cage.ledger import Ledger, canonical_request_id
from cage.meter import JsonlWriter, LedgerWriter, NullWriter, meter, record
from cage.pricing import Usage, price

SECRET_PROMPT = "PROMPT-TEXT-the-launch-codes-are-0000"
SECRET_ANSWER = "COMPLETION-TEXT-ssh-rsa-AAAAB3Nza"


def anthropic_message(**usage) -> NS:
    counts = {
        "input_tokens": 12,
        "output_tokens": 7,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 50,
    }
    counts.update(usage)
    return NS(
        id="msg_01ABC",
        type="message",
        role="assistant",
        model="claude-sonnet-4-20250514",
        content=[NS(type="text", text=SECRET_ANSWER)],
        stop_reason="end_turn",
        usage=NS(**counts),
    )


def openai_chat_completion() -> NS:
    return NS(
        id="chatcmpl-123",
        object="chat.completion",
        model="gpt-4o-2024-08-06",
        choices=[NS(index=0, message=NS(role="assistant", content=SECRET_ANSWER))],
        usage=NS(
            prompt_tokens=1000,
            completion_tokens=50,
            total_tokens=1050,
            prompt_tokens_details=NS(cached_tokens=800),
            completion_tokens_details=NS(reasoning_tokens=0),
        ),
    )


def openai_response() -> dict:
    # The Responses API, as a dict (e.g. from a raw HTTP client).
    return {
        "id": "resp_456",
        "object": "response",
        "model": "gpt-4o",
        "instructions": SECRET_PROMPT,
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": SECRET_ANSWER}]}
        ],
        "usage": {
            "input_tokens": 900,
            "output_tokens": 40,
            "input_tokens_details": {"cached_tokens": 100},
            "output_tokens_details": {"reasoning_tokens": 10},
        },
    }


class ListWriter:
    def __init__(self) -> None:
        self.events = []

    def write(self, event) -> None:
        self.events.append(event)


def test_anthropic_message_becomes_one_priced_event():
    sink = ListWriter()
    with meter(caller="bot", mission_id="m1", writer=sink) as m:
        event = m.record(anthropic_message())
    assert sink.events == [event]
    assert (event.provider, event.model, event.caller, event.mission_id) == (
        "anthropic",
        "claude-sonnet-4-20250514",
        "bot",
        "m1",
    )
    assert (event.input_tokens, event.output_tokens) == (12, 7)
    assert (event.cache_read_tokens, event.cache_write_tokens) == (100, 50)
    assert event.truth == "modeled"
    assert event.request_id == "anthropic:msg_01ABC"
    assert event.source == "meter"
    assert event.duration_s is not None and event.duration_s >= 0
    assert event.cost_usd == pytest.approx(
        price("anthropic", "claude-sonnet-4-20250514", Usage(12, 7, 100, 50))
    )


def test_sdk_request_id_is_the_call_id_the_proxy_uses():
    # The SDKs expose the request-id header as `_request_id`; the proxy keys the same call
    # by that header, so a call seen by both is stored once.
    response = anthropic_message()
    response._request_id = "req_011CXYZ"
    with meter(writer=NullWriter()) as m:
        event = m.record(response)
    assert event.request_id == canonical_request_id("anthropic", "req_011CXYZ")


def test_openai_chat_completion_subtracts_cached_prompt_tokens():
    with meter(writer=NullWriter()) as m:
        event = m.record(openai_chat_completion())
    assert event.provider == "openai"
    assert (event.input_tokens, event.cache_read_tokens, event.output_tokens) == (200, 800, 50)
    assert event.cost_usd == pytest.approx(
        price("openai", "gpt-4o-2024-08-06", Usage(200, 50, 800))
    )


def test_openai_responses_dict():
    with meter(writer=NullWriter()) as m:
        event = m.record(openai_response())
    assert (event.input_tokens, event.cache_read_tokens, event.output_tokens) == (800, 100, 40)
    assert event.request_id == "openai:resp_456"


def test_plain_usage_dict_with_provider_and_model():
    with meter(writer=NullWriter()) as m:
        event = m.record({"input_tokens": 5, "output_tokens": 6}, provider="openai", model="gpt-4o")
        unknown = m.record({"input_tokens": 5, "output_tokens": 6}, model="my-own-model")
    assert (event.provider, event.model, event.input_tokens) == ("openai", "gpt-4o", 5)
    assert event.cost_usd is not None
    assert (unknown.provider, unknown.cost_usd) == ("unknown", None)


def test_provider_reported_cost_is_measured():
    with meter(writer=NullWriter()) as m:
        event = m.record(
            {
                "model": "openai/gpt-4o",
                "id": "gen-1",
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "cost": 0.0042},
            },
            provider="openrouter",
        )
    assert (event.cost_usd, event.truth) == (0.0042, "measured")


def test_response_without_usage_records_nothing_and_warns():
    sink = ListWriter()
    with meter(writer=sink) as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert m.record(NS(id="chatcmpl-1", model="gpt-4o", usage=None)) is None
    assert sink.events == []
    assert any("no usage" in str(w.message) for w in caught)


def test_decorator_records_with_the_function_as_caller():
    sink = ListWriter()

    @meter(writer=sink, mission_id="m9")
    def summarise() -> str:
        record(anthropic_message())
        return "done"

    assert summarise() == "done"
    assert summarise() == "done"
    assert len(sink.events) == 2
    assert sink.events[0].caller.endswith(
        "test_decorator_records_with_the_function_as_caller.<locals>.summarise"
    )
    assert sink.events[0].mission_id == "m9"


def test_async_decorator():
    sink = ListWriter()

    @meter(caller="async-bot", writer=sink)
    async def call() -> None:
        await asyncio.sleep(0)
        record(openai_chat_completion())

    asyncio.run(call())
    assert [e.caller for e in sink.events] == ["async-bot"]


def test_an_error_before_any_record_is_one_error_event():
    sink = ListWriter()

    class RateLimitError(Exception):
        pass

    with pytest.raises(RateLimitError), meter(writer=sink, provider="openai", model="gpt-4o"):
        raise RateLimitError("429")
    (event,) = sink.events
    assert event.error_class == "RateLimitError"
    assert (event.input_tokens, event.output_tokens, event.cost_usd) == (0, 0, None)

    # After a recorded call, a later error records nothing more (it may not be a call).
    sink.events.clear()
    with pytest.raises(KeyError), meter(writer=sink) as m:
        m.record(openai_chat_completion())
        raise KeyError("post-processing bug")
    assert [e.error_class for e in sink.events] == [None]


def test_mission_id_from_environment(monkeypatch):
    monkeypatch.setenv("CAGE_MISSION_ID", "mission-from-env")
    with meter(writer=NullWriter()) as m:
        event = m.record(openai_chat_completion())
    assert event.mission_id == "mission-from-env"


def test_jsonl_writer_appends_one_line_per_event(tmp_path: Path):
    path = tmp_path / "logs" / "spend.jsonl"
    writer = JsonlWriter(path)
    with meter(caller="a", writer=writer) as m:
        m.record(anthropic_message())
        m.record(openai_chat_completion())
    lines = path.read_text().splitlines()
    assert [json.loads(line)["provider"] for line in lines] == ["anthropic", "openai"]
    assert json.loads(lines[1])["cache_read_tokens"] == 800


def test_default_writer_is_the_default_ledger(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CAGE_LEDGER", str(tmp_path / "default.db"))
    import cage.meter as meter_module

    monkeypatch.setattr(meter_module, "_default_writer", None)
    with meter(caller="defaults") as m:
        m.record(anthropic_message())
        m.record(anthropic_message())  # same message id: recorded once
    meter_module._default().close()
    with Ledger.open(tmp_path / "default.db") as ledger:
        (row,) = ledger.report("caller")
    assert (row["key"], row["calls"]) == ("defaults", 1)


def test_no_content_reaches_the_ledger_or_the_jsonl_file(tmp_path: Path):
    ledger_path = tmp_path / "ledger.db"
    jsonl_path = tmp_path / "spend.jsonl"
    ledger_writer = LedgerWriter(ledger_path)
    for writer in (ledger_writer, JsonlWriter(jsonl_path)):
        with meter(caller="c", writer=writer) as m:
            m.record(anthropic_message())
            m.record(openai_chat_completion())
            m.record(openai_response())
    ledger_writer.close()
    with Ledger.open(ledger_path) as ledger:
        assert sum(r["calls"] for r in ledger.report("model")) == 3
    stored = b"".join(
        p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(("ledger.db", "spend"))
    )
    assert b"claude-sonnet-4" in stored  # the files hold the events...
    for secret in (SECRET_PROMPT, SECRET_ANSWER):
        assert secret.encode() not in stored  # ...and never the content
