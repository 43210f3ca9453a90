"""The metering proxy against a real local upstream (aiohttp on 127.0.0.1, real sockets)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cage import mockupstream
from cage.ledger import Event, Ledger
from cage.pricing import Usage, price
from cage.proxy import RESERVE_BYTES_PER_TOKEN, model_rates, start_proxy_in_thread

PROMPT = "SECRET-PROMPT-tell-me-about-the-42-ducks"
API_KEY = "sk-SECRET-KEY-0123456789"


class ServerThread:
    """An aiohttp application served on 127.0.0.1 from a background thread."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)

        def serve() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                await self.runner.setup()
                site = web.TCPSite(self.runner, "127.0.0.1", 0)
                await site.start()
                self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())
            # The "hang" fault's handler never ends by itself.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture(scope="module")
def upstream():
    """The mock upstream plus a route that echoes the headers it received."""
    disconnects: list[str] = []

    @web.middleware
    async def note_disconnects(request: web.Request, handler):
        try:
            return await handler(request)
        except ConnectionResetError:
            # The proxy hung up on a stream: the upstream generation was cancelled.
            disconnects.append(request.path)
            raise

    bodies: list[bytes] = []

    @web.middleware
    async def note_bodies(request: web.Request, handler):
        if request.method == "POST":
            bodies.append(await request.read())
        return await handler(request)

    app = mockupstream.create_app()
    app.middlewares.append(note_disconnects)
    app.middlewares.append(note_bodies)
    seen: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"path": request.path_qs, "method": request.method})

    app.router.add_route("*", "/echo/{tail:.*}", echo)
    server = ServerThread(app)
    server.seen = seen
    server.disconnects = disconnects
    server.bodies = bodies
    yield server
    server.stop()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def proxy(upstream, ledger_path):
    running = start_proxy_in_thread(
        mission_id="m-test",
        budget_usd=None,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
    )
    yield running
    running.stop()


def events_of(ledger_path: Path, mission: str = "m-test") -> list[Event]:
    ledger = Ledger.open(ledger_path)
    try:
        return list(ledger.events(mission=mission))
    finally:
        ledger.close()


def call(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request with a fresh aiohttp client; returns status, headers, raw body."""

    async def go() -> tuple[int, dict, bytes]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + path, json=body, headers=headers or {}) as response,
        ):
            lowered = {k.lower(): v for k, v in response.headers.items()}
            return response.status, lowered, await response.read()

    return asyncio.run(go())


def chat(stream: bool = False, **extra) -> dict:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
    return {**body, "stream": stream, "max_tokens": 100, **extra}


def responses(stream: bool = False, **extra) -> dict:
    return {
        "model": "gpt-4o-mini",
        "input": PROMPT,
        "stream": stream,
        "max_output_tokens": 100,
        **extra,
    }


def messages(stream: bool = False, **extra) -> dict:
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": PROMPT}]}
    return {**body, "stream": stream, "max_tokens": 100, **extra}


def sse_data(raw: bytes) -> list:
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            value = line[6:]
            out.append(value if value == "[DONE]" else json.loads(value))
    return out


CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 80,
    "total_tokens": 1280,
    "prompt_tokens_details": {"cached_tokens": 1000},
    "completion_tokens_details": {"reasoning_tokens": 30},
}
RESPONSES_USAGE = {
    "input_tokens": 500,
    "input_tokens_details": {"cached_tokens": 100},
    "output_tokens": 40,
    "output_tokens_details": {"reasoning_tokens": 10},
    "total_tokens": 540,
}
MESSAGES_USAGE = {
    "input_tokens": 10,
    "cache_creation_input_tokens": 200,
    "cache_read_input_tokens": 3000,
    "output_tokens": 55,
}
# (path, body factory, raw usage, expected normalised usage)
CASES = [
    ("/v1/chat/completions", chat, CHAT_USAGE, Usage(200, 80, cache_read_tokens=1000)),
    ("/v1/responses", responses, RESPONSES_USAGE, Usage(400, 40, cache_read_tokens=100)),
    ("/v1/messages", messages, MESSAGES_USAGE, Usage(10, 55, 3000, 200)),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path,body,raw,expected", CASES, ids=["chat", "responses", "messages"])
def test_exact_usage_for_each_api(proxy, ledger_path, path, body, raw, expected, stream):
    status, headers, _data = call(
        proxy.url, path, body(stream), {"x-cage-mock-usage": json.dumps(raw)}
    )
    assert status == 200
    proxy.flush()
    (event,) = events_of(ledger_path)
    provider = "anthropic" if path == "/v1/messages" else "openai"
    assert (event.provider, event.source, event.truth, event.error_class) == (
        provider,
        "proxy",
        "measured",
        None,
    )
    got = Usage(
        event.input_tokens, event.output_tokens, event.cache_read_tokens, event.cache_write_tokens
    )
    assert got == expected
    assert event.cost_usd == pytest.approx(price(provider, event.model, expected))
    assert event.cost_usd > 0
    # The upstream's own request id names the event (canonical form <provider>:<id>), so a
    # re-import, or a transcript import of the same call, cannot count it twice.
    upstream_id = headers.get("request-id") or headers.get("x-request-id")
    assert event.request_id == f"{provider}:{upstream_id}"
    assert event.extra["stream"] is stream
    spend = proxy.spend()
    assert spend["calls"] == 1 and spend["reserved_usd"] == 0
    assert spend["by_model"][event.model]["output_tokens"] == expected.output_tokens


def test_chat_stream_usage_chunk_is_injected_and_hidden(proxy, ledger_path):
    status, _, data = call(proxy.url, "/v1/chat/completions", chat(stream=True))
    assert status == 200
    chunks = sse_data(data)
    assert chunks[-1] == "[DONE]"
    # The client did not ask for usage: it sees no usage-only chunk...
    assert all(c == "[DONE]" or c["choices"] != [] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c != "[DONE]")
    assert text == " ".join(mockupstream._reply_words(mockupstream.DEFAULT_REPLY_WORDS))
    proxy.flush()
    # ...and the ledger still has the measured usage the proxy asked for.
    (event,) = events_of(ledger_path)
    assert event.truth == "measured" and event.output_tokens == mockupstream.DEFAULT_REPLY_WORDS


def test_chat_stream_usage_chunk_kept_when_the_client_asked(proxy, ledger_path):
    body = chat(stream=True, stream_options={"include_usage": True})
    _, _, data = call(proxy.url, "/v1/chat/completions", body)
    usage_chunks = [c for c in sse_data(data) if c != "[DONE]" and c["choices"] == []]
    assert len(usage_chunks) == 1
    assert usage_chunks[0]["usage"]["completion_tokens"] == mockupstream.DEFAULT_REPLY_WORDS


@pytest.mark.parametrize(
    "raw",
    [
        # The usual request: the option is added in front, the rest goes as it came.
        b'{"model":"gpt-4o-mini","stream":true,"max_tokens":9,'
        b'"messages":[{"role":"user","content":"caf\\u00e9  \\"q\\""}]}',
        b' \n {"stream": true, "model": "gpt-4o-mini", "max_tokens": 9, "messages": []}',
        # Options the client set are kept; an encoding other than UTF-8 is re-encoded.
        b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":false,'
        b'"x":1},"messages":[]}',
        b'{"model":"gpt-4o-mini","stream":true,"stream_options":null,"messages":[]}',
        json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": []}).encode("utf-16"),
    ],
    ids=["compact", "spaced", "options", "null-options", "utf-16"],
)
def test_chat_stream_usage_is_asked_for_whatever_the_request_looks_like(
    upstream, proxy, ledger_path, raw
):
    async def go() -> bytes:
        async with (
            aiohttp.ClientSession() as session,
            session.post(proxy.url + "/v1/chat/completions", data=raw) as response,
        ):
            assert response.status == 200
            return await response.read()

    del upstream.bodies[:]
    chunks = sse_data(asyncio.run(go()))
    assert chunks[-1] == "[DONE]" and all(c == "[DONE]" or c["choices"] for c in chunks)
    (sent,) = upstream.bodies
    wanted = json.loads(raw)
    wanted["stream_options"] = {**(wanted.get("stream_options") or {}), "include_usage": True}
    assert json.loads(sent) == wanted
    if b"stream_options" not in raw and raw[:1] in b" {":
        start = raw.index(b"{") + 1
        assert sent == raw[:start] + b'"stream_options":{"include_usage":true},' + raw[start:]
    proxy.flush()
    (event,) = events_of(ledger_path)
    assert event.truth == "measured" and event.error_class is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"gpt-4o","stream":true,"max_tokens":9,"messages":[{"model":"x","n":2}]}',
        b'{"messages":[],"model":"a","model":"b","stream_options":{"include_usage":false}}',
        b'{"model":{"nested":[1,2]},"max_output_tokens":true,"n":3.5}',
        b'{"model":"m","temperature":NaN}',  # json.loads reads NaN; msgspec does not
        b'{"model":"m","x":"\\ud800"}',  # a lone surrogate, likewise
        '{"model":"m","stream":true}'.encode("utf-16"),
        b"\xef\xbb\xbf" + b'{"model":"m"}',
        b"{}",
        b"[1, 2]",
        b'{"model":"m"',
        b'{"model":"m"} trailing',
        b"\xff\xfe\xfd",
    ],
)
def test_request_members_are_what_json_loads_reads(raw):
    from cage.proxy import _REQUEST_MEMBERS, _members

    try:
        whole = json.loads(raw)
    except ValueError:
        whole = None
    expected = (
        {k: v for k, v in whole.items() if k in _REQUEST_MEMBERS.names}
        if isinstance(whole, dict)
        else None
    )
    assert _members(_REQUEST_MEMBERS, raw) == expected


def test_a_conversation_of_several_megabytes_is_metered(proxy, ledger_path):
    # aiohttp refuses bodies over 1 MiB unless told otherwise; agents send more than that.
    body = chat(messages=[{"role": "user", "content": "x" * (3 * 1024 * 1024)}])
    status, _, data = call(proxy.url, "/v1/chat/completions", body)
    assert status == 200 and json.loads(data)["usage"]["prompt_tokens"] > 3 * 1024 * 1024 // 4
    proxy.flush()
    (event,) = events_of(ledger_path)
    assert event.truth == "measured" and event.input_tokens > 3 * 1024 * 1024 // 4


def test_anthropic_message_delta_usage_is_cumulative_not_added(proxy, ledger_path):
    # message_start says output_tokens 1, message_delta says 55 (the total): 55, not 56.
    call(
        proxy.url,
        "/v1/messages",
        messages(stream=True),
        {"x-cage-mock-usage": json.dumps(MESSAGES_USAGE)},
    )
    proxy.flush()
    (event,) = events_of(ledger_path)
    assert event.output_tokens == 55


def _stream_cases() -> list[tuple[str, bool, bytes]]:
    """(api, hide usage chunk, raw SSE stream): the mock's streams and awkward variants."""
    words = mockupstream._reply_words(9)
    usage = {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    chat_events = mockupstream._chat_events("gpt-4o-mini", words, usage, include_usage=True)
    chat_stream = b"".join(chat_events)
    responses = b"".join(mockupstream._responses_events("gpt-4o", words, {"input_tokens": 3}))
    messages = b"".join(
        mockupstream._messages_events("claude-sonnet-4-5", words, {"input_tokens": 3})
    )
    # Text that looks like SSE or a delta marker, an error event, keys in another order,
    # extra blank lines, a comment line.
    tricky = (
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
        b'"text":"data: {\\"type\\":\\"message_delta\\"} \\n\\n"}}\n\n'
        b'data: {"index":0,"type":"content_block_delta","delta":{"text":"xyz"}}\n\n\n'
        b": keep-alive\n\n"
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'
    )
    cut = messages.index(b"event: content_block_stop")
    return [
        ("chat", True, chat_stream),
        ("chat", False, chat_stream),
        ("chat", True, chat_stream.replace(b"\n", b"\r\n")),
        ("chat", True, chat_events[0] + b'data: {"error":{"message":"boom"}}\n\n' + chat_stream),
        ("responses", False, responses),
        ("messages", False, messages),
        ("messages", False, messages[:cut] + tricky + messages[cut:]),
    ]


@pytest.mark.parametrize("api, hide, stream", _stream_cases())
@pytest.mark.parametrize("size", [1, 5, 64, 10**6])
def test_stream_metered_run_at_a_time_as_event_by_event(api, hide, stream, size):
    from cage.proxy import METERED, SSESplitter, StreamMeter, split_events

    endpoint = {"chat": "chat/completions", "responses": "responses", "messages": "messages"}
    spec = METERED["/v1/" + endpoint[api]]
    # Reference: every event parsed on its own.
    reference = StreamMeter(spec, hide_usage_chunk=hide)
    expected = b"".join(raw for raw in split_events(stream) if reference.on_event(raw))
    # The proxy's way: chunks of any size, runs of complete events, text deltas in bulk.
    meter, splitter, out = StreamMeter(spec, hide_usage_chunk=hide), SSESplitter(), []
    for i in range(0, len(stream), size):
        run = splitter.push(stream[i : i + size])
        if run:
            out.append(meter.feed(run))
    rest = splitter.rest()
    if rest and meter.on_event(rest):
        out.append(rest)
    assert b"".join(out) == expected
    for name in ("usage", "final", "text_chars", "malformed", "error", "model", "response_id"):
        assert getattr(meter, name) == getattr(reference, name), name
    assert meter.text_chars > 0
    if hide:
        assert b'"choices":[],"usage"' in stream and b'"choices":[],"usage"' not in expected


def test_stream_reaches_the_client_before_it_ends(ledger_path):
    """The first event is forwarded while the upstream still holds back the rest."""
    release = threading.Event()
    chunk = {"id": "chatcmpl-gated", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    first = {**chunk, "choices": [{"index": 0, "delta": {"content": "first"}}]}
    usage = {"prompt_tokens": 9, "completion_tokens": 1}
    last = {**chunk, "choices": [], "usage": usage}

    async def gated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + json.dumps(first).encode() + b"\n\n")
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        await response.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", gated)
    gate = ServerThread(app)
    try:
        with start_proxy_in_thread(
            mission_id="m-gate",
            budget_usd=1.0,
            ledger_path=str(ledger_path),
            upstream_openai=gate.url,
            upstream_anthropic=gate.url,
        ) as running:

            async def go() -> tuple[bytes, bytes]:
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(
                        running.url + "/v1/chat/completions", json=chat(stream=True)
                    ) as response,
                ):
                    # Arrives although the upstream has not finished (or buffering
                    # would make this wait forever).
                    head = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 20)
                    release.set()
                    return head, await response.read()

            head, rest = asyncio.run(go())
            running.flush()
    finally:
        release.set()
        gate.stop()
    assert b'"first"' in head
    assert rest == b"data: [DONE]\n\n"  # the usage chunk the client did not ask for: hidden
    (event,) = events_of(ledger_path, "m-gate")
    assert (event.truth, event.input_tokens, event.output_tokens) == ("measured", 9, 1)


def test_budget_refusal_has_each_providers_error_shape(upstream, ledger_path):
    with start_proxy_in_thread(
        mission_id="m-cap",
        budget_usd=0.0001,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
    ) as running:
        # claude-sonnet-4-5 at 100k max tokens could cost $1.50: never forwarded.
        status, headers, data = call(running.url, "/v1/messages", messages(max_tokens=100_000))
        assert status == 429
        assert headers["x-should-retry"] == "false"
        body = json.loads(data)
        assert body["type"] == "error" and body["error"]["type"] == "budget_guard"
        assert "cap" in body["error"]["message"]
        status, _, data = call(running.url, "/v1/chat/completions", chat(max_tokens=1_000_000))
        assert status == 429
        error = json.loads(data)["error"]
        assert (error["type"], error["code"]) == ("budget_guard", "budget_exceeded")
        assert running.budget_exhausted
        spend = running.spend()
        assert (spend["calls"], spend["refused"], spend["reserved_usd"]) == (0, 2, 0)
    assert events_of(ledger_path, "m-cap") == []


def test_fifty_concurrent_streams_never_cross_a_cap_that_fits_ten(upstream, ledger_path):
    body = chat(stream=True, max_tokens=200)
    # What the proxy sends (with include_usage injected) sizes the reservation.
    sent = dict(body, stream_options={"include_usage": True})
    size = len(json.dumps(sent, ensure_ascii=False, separators=(",", ":")).encode())
    rates = model_rates("openai", "gpt-4o-mini")
    worst = math.ceil(size / RESERVE_BYTES_PER_TOKEN) * max(rates.input, rates.cache_write)
    worst += 200 * rates.output
    cap = worst * 10.5
    # Each call really costs 90% of its worst case: no slack hides an overshoot.
    usage = {
        "prompt_tokens": math.ceil(size / RESERVE_BYTES_PER_TOKEN) - 1,
        "completion_tokens": 180,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    headers = {"x-cage-mock-usage": json.dumps(usage), "x-cage-mock-delay-ms": "20"}

    with start_proxy_in_thread(
        mission_id="m-conc",
        budget_usd=cap,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
    ) as running:

        async def one(session: aiohttp.ClientSession) -> int:
            async with session.post(
                running.url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                await response.read()
                return response.status

        async def all_at_once() -> list[int]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                return await asyncio.gather(*(one(session) for _ in range(50)))

        statuses = asyncio.run(all_at_once())
        running.flush()
        spend = running.spend()
    assert statuses.count(200) >= 10
    assert statuses.count(429) >= 30
    assert set(statuses) == {200, 429}
    recorded = events_of(ledger_path, "m-conc")
    assert len(recorded) == statuses.count(200)
    assert sum(e.cost_usd for e in recorded) <= cap
    assert spend["settled_usd"] <= cap and spend["reserved_usd"] == 0


def test_max_calls_and_earlier_mission_spend_count(upstream, ledger_path):
    ledger = Ledger.open(ledger_path)
    ledger.add(
        Event(
            timestamp="2026-11-23T10:00:00Z",
            provider="openai",
            model="gpt-4o-mini",
            input_tokens=10,
            output_tokens=10,
            cost_usd=0.5,
            truth="measured",
            mission_id="m-prior",
            request_id="earlier-1",
            source="meter",
        )
    )
    ledger.close()
    with start_proxy_in_thread(
        mission_id="m-prior",
        budget_usd=10.0,
        max_calls=3,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
    ) as running:
        assert running.spend()["prior_calls"] == 1
        statuses = [call(running.url, "/v1/chat/completions", chat())[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert running.budget_exhausted
    # Restarting does not reset the cap: $0.50 spent, so a $0.60 worst case is refused.
    with start_proxy_in_thread(
        mission_id="m-prior",
        budget_usd=1.0,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
    ) as running:
        assert call(running.url, "/v1/chat/completions", chat(max_tokens=1_000_000))[0] == 429
        assert call(running.url, "/v1/chat/completions", chat(max_tokens=100))[0] == 200


def test_warnings_fire_once(upstream, ledger_path):
    with start_proxy_in_thread(
        mission_id="m-warn",
        budget_usd=None,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
        warn_at_usd=0.000001,
        warn_at_tokens=10,
    ) as running:
        for _ in range(3):
            call(running.url, "/v1/chat/completions", chat())
            running.flush()
        warnings = running.warnings
    assert len(warnings) == 2
    assert any("warn_at_usd" in w for w in warnings)
    assert any("warn_at_tokens" in w for w in warnings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refused_connection_is_502_free_and_released(upstream, ledger_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with start_proxy_in_thread(
        mission_id="m-dead",
        budget_usd=5.0,
        ledger_path=str(ledger_path),
        upstream_openai=dead,
        upstream_anthropic=upstream.url,
    ) as running:
        status, _, data = call(running.url, "/v1/chat/completions", chat())
        assert status == 502
        assert json.loads(data)["error"]["type"] == "upstream_unreachable"
        spend = running.spend()
        assert (spend["calls"], spend["reserved_usd"], spend["in_flight"]) == (0, 0, 0)
        # Still serving.
        assert call(running.url, "/v1/messages", messages())[0] == 200
        running.flush()
    # Nothing reached the upstream, so nothing was spent: no event for the refused call.
    assert [e.provider for e in events_of(ledger_path, "m-dead")] == ["anthropic"]


def test_upstream_timeout_is_504_with_an_estimated_event(upstream, ledger_path):
    with start_proxy_in_thread(
        mission_id="m-slow",
        budget_usd=5.0,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
        read_timeout_s=0.3,
    ) as running:
        status, _, data = call(
            running.url, "/v1/messages", messages(), {"x-cage-mock-fault": "hang"}
        )
        assert status == 504
        assert json.loads(data)["error"]["type"] == "upstream_timeout"
        assert call(running.url, "/v1/messages", messages())[0] == 200
        running.flush()
        assert running.spend()["reserved_usd"] == 0
    slow, ok = events_of(ledger_path, "m-slow")
    assert (slow.truth, slow.error_class) == ("estimated", "upstream_timeout")
    assert slow.input_tokens > 0 and slow.cost_usd > 0  # never zero for an unknown
    assert ok.error_class is None


def test_upstream_5xx_is_passed_through_and_recorded_free(proxy, ledger_path):
    status, _, data = call(
        proxy.url, "/v1/chat/completions", chat(), {"x-cage-mock-fault": "status:503"}
    )
    assert status == 503
    assert json.loads(data)["error"]["message"] == "mock upstream error 503"
    assert call(proxy.url, "/v1/chat/completions", chat())[0] == 200
    proxy.flush()
    failed, ok = events_of(ledger_path)
    assert (failed.error_class, failed.cost_usd, failed.extra["status"]) == ("http_503", 0.0, 503)
    assert ok.error_class is None and proxy.spend()["reserved_usd"] == 0


@pytest.mark.parametrize(
    "path,body",
    [("/v1/chat/completions", chat), ("/v1/responses", responses), ("/v1/messages", messages)],
)
def test_stream_cut_midway_gives_partial_stream_and_estimate(proxy, ledger_path, path, body):
    async def go() -> tuple[bytes, BaseException | None]:
        received = b""
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                proxy.url + path,
                json=body(stream=True),
                headers={"x-cage-mock-fault": "cut", "x-cage-mock-output-tokens": "40"},
            ) as response,
        ):
            try:
                async for chunk in response.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError as exc:
                return received, exc
        return received, None

    received, error = asyncio.run(go())
    assert received  # the part the upstream sent
    assert error is not None  # and the client can tell it is truncated
    assert call(proxy.url, path, body())[0] == 200  # still serving
    proxy.flush()
    cut, ok = events_of(ledger_path)
    assert (cut.truth, cut.error_class) == ("estimated", "stream_cut")
    assert cut.output_tokens > 0 and cut.input_tokens > 0 and cut.cost_usd > 0
    if path == "/v1/messages":
        # message_start reported the input exactly; only the output is estimated.
        assert cut.input_tokens == ok.input_tokens
    assert proxy.spend()["reserved_usd"] == 0


def test_malformed_stream_is_passed_through_with_an_estimate(proxy, ledger_path):
    status, _, data = call(
        proxy.url, "/v1/messages", messages(stream=True), {"x-cage-mock-fault": "malformed"}
    )
    assert status == 200
    assert b"data: {not json" in data
    proxy.flush()
    (event,) = events_of(ledger_path)
    assert (event.truth, event.error_class) == ("estimated", "malformed_stream")
    assert event.cost_usd > 0


def test_client_disconnect_mid_stream(proxy, ledger_path, upstream):
    upstream.disconnects.clear()

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                proxy.url + "/v1/chat/completions",
                json=chat(stream=True),
                headers={"x-cage-mock-delay-ms": "200", "x-cage-mock-output-tokens": "50"},
            )
            await response.content.readuntil(b"\n\n")
            response.close()  # hang up mid-stream

    asyncio.run(go())
    assert proxy.flush(timeout=10)  # the abandoned call has ended and is recorded
    (event,) = events_of(ledger_path)
    assert (event.truth, event.error_class) == ("estimated", "client_disconnected")
    assert event.cost_usd > 0
    spend = proxy.spend()
    assert (spend["in_flight"], spend["reserved_usd"]) == (0, 0)
    assert call(proxy.url, "/v1/chat/completions", chat())[0] == 200
    # The upstream saw its stream abandoned long before its 10 s end.
    deadline = time.monotonic() + 5
    while not upstream.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.disconnects == ["/v1/chat/completions"]


def test_nothing_secret_is_stored_or_logged(upstream, ledger_path, caplog):
    caplog.set_level("DEBUG")
    with start_proxy_in_thread(
        mission_id="m-secret",
        budget_usd=5.0,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
    ) as running:
        for path, body in [
            ("/v1/chat/completions", chat),
            ("/v1/messages", messages),
            ("/v1/responses", responses),
        ]:
            for stream in (False, True):
                headers = {"Authorization": f"Bearer {API_KEY}", "x-api-key": API_KEY}
                assert call(running.url, path, body(stream), headers)[0] == 200
    assert len(events_of(ledger_path, "m-secret")) == 6
    stored = b"".join(p.read_bytes() for p in ledger_path.parent.glob("ledger.db*"))
    reply = " ".join(mockupstream._reply_words(5)).encode()
    for secret in (PROMPT.encode(), API_KEY.encode(), reply):
        assert secret not in stored
    assert API_KEY not in caplog.text and PROMPT not in caplog.text


def test_other_paths_pass_through_with_credentials_and_routing(upstream, ledger_path):
    other = ServerThread(mockupstream.create_app())
    try:
        with start_proxy_in_thread(
            mission_id="m-pass",
            budget_usd=1.0,
            ledger_path=str(ledger_path),
            upstream_openai=upstream.url + "/v1",
            upstream_anthropic=other.url,
        ) as running:

            async def go() -> tuple[int, dict, int]:
                async with aiohttp.ClientSession() as session:
                    async with session.get(
                        running.url + "/echo/x?limit=2",
                        headers={
                            "Authorization": f"Bearer {API_KEY}",
                            "Connection": "keep-alive, X-Drop",
                            "X-Drop": "1",
                            "Keep-Alive": "timeout=5",
                        },
                    ) as response:
                        echoed = await response.json()
                    # x-api-key routes to the Anthropic upstream, which has no /echo route.
                    async with session.get(
                        running.url + "/echo/x", headers={"x-api-key": API_KEY}
                    ) as response:
                        return response.status, echoed, len(upstream.seen)

            status, echoed, seen = asyncio.run(go())
            assert echoed == {"path": "/echo/x?limit=2", "method": "GET"}
            assert status == 404 and seen == 1
            headers = {k.lower(): v for k, v in upstream.seen[-1].items()}
            assert headers["authorization"] == f"Bearer {API_KEY}"
            assert "x-drop" not in headers and "keep-alive" not in headers
            assert running.spend()["calls"] == 0
    finally:
        other.stop()
        upstream.seen.clear()
    assert events_of(ledger_path, "m-pass") == []


def test_mock_mode_answers_all_three_apis(ledger_path):
    with start_proxy_in_thread(
        mission_id="m-mock", budget_usd=1.0, mock=True, ledger_path=str(ledger_path)
    ) as running:
        for path, body in [
            ("/v1/chat/completions", chat),
            ("/v1/messages", messages),
            ("/v1/responses", responses),
        ]:
            for stream in (False, True):
                assert call(running.url, path, body(stream))[0] == 200
        running.flush()
        spend = running.spend()
    assert spend["calls"] == 6 and spend["truth"]["measured"]["calls"] == 6
    assert len(events_of(ledger_path, "m-mock")) == 6


def test_cli_serves_until_interrupted(tmp_path):
    env = dict(os.environ, CAGE_LEDGER=str(tmp_path / "cli.db"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cage",
            "proxy",
            "--mock",
            "--port",
            "0",
            "--json",
            "--mission",
            "m-cli",
            "--budget-usd",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        info = json.loads(process.stdout.readline())
        assert info["openai_base_url"] == info["url"] + "/v1"
        assert call(info["url"], "/v1/messages", messages())[0] == 200
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0
    assert out == ""  # one JSON document, nothing else on stdout
    assert "stopped after 1 calls" in err and "Traceback" not in err
    assert len(events_of(tmp_path / "cli.db", "m-cli")) == 1


def test_unknown_model_is_reserved_and_charged_at_the_dearest_prices(upstream, ledger_path):
    body = chat(model="mystery-model-9000", max_tokens=100)
    # At gpt-4o-mini prices this call would fit in $0.05 many times; at the fallback
    # (the provider's dearest per-token prices) its worst case does not.
    with start_proxy_in_thread(
        mission_id="m-unknown",
        budget_usd=0.05,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
    ) as running:
        assert call(running.url, "/v1/chat/completions", body)[0] == 429
    with start_proxy_in_thread(
        mission_id="m-unknown",
        budget_usd=1.0,
        ledger_path=str(ledger_path),
        upstream_openai=upstream.url,
        upstream_anthropic=upstream.url,
    ) as running:
        assert call(running.url, "/v1/chat/completions", body)[0] == 200
        running.flush()
        spend = running.spend()
    (event,) = events_of(ledger_path, "m-unknown")
    assert event.cost_usd is None and event.truth == "measured"  # unpriced, never a silent 0
    assert spend["unpriced"] == 1 and spend["settled_usd"] > 0


def test_cli_without_aiohttp_says_how_to_install_it():
    code = (
        "import sys; sys.modules['aiohttp'] = None; from cage.cli import main;"
        "sys.exit(main(['proxy', '--mock']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "pip install 'cage-gate[proxy]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_compressed_upstream_answer_is_metered_and_relayed_decoded(ledger_path):
    async def gzipped(request: web.Request) -> web.Response:
        assert request.headers["Accept-Encoding"] == "gzip, deflate"
        body = {
            "id": "chatcmpl-gz",
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {"prompt_tokens": 70, "completion_tokens": 5},
        }
        response = web.json_response(body, headers={"x-request-id": "req_gz"})
        response.enable_compression(web.ContentCoding.gzip)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", gzipped)
    server = ServerThread(app)
    try:
        with start_proxy_in_thread(
            mission_id="m-gz",
            budget_usd=1.0,
            ledger_path=str(ledger_path),
            upstream_openai=server.url,
            upstream_anthropic=server.url,
        ) as running:
            status, headers, data = call(
                running.url, "/v1/chat/completions", chat(), {"Accept-Encoding": "br"}
            )
            running.flush()
    finally:
        server.stop()
    assert status == 200 and "content-encoding" not in headers
    assert json.loads(data)["usage"]["prompt_tokens"] == 70
    (event,) = events_of(ledger_path, "m-gz")
    assert (event.input_tokens, event.output_tokens, event.request_id) == (70, 5, "openai:req_gz")


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
def test_a_call_metered_by_the_proxy_and_imported_from_its_transcript_counts_once(
    tmp_path, ledger_path, stream
):
    # The upstream names the call in its request-id header, as Anthropic does; Claude Code
    # writes that header's value as the line's requestId. Both sources must give one row.
    usage = {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 100}
    message = {
        "id": "msg_01CrossSource",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": [{"type": "text", "text": "hi"}],
    }

    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {"request-id": "req_011CrossSource"}
        if not stream:
            return web.json_response({**message, "usage": usage}, headers=headers)
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = {"type": "message_start", "message": {**message, "usage": usage}}
        delta = {"type": "message_delta", "usage": {"output_tokens": usage["output_tokens"]}}
        for event in (start, delta, {"type": "message_stop"}):
            await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", answer)
    server = ServerThread(app)
    try:
        with start_proxy_in_thread(
            mission_id="m-x",
            budget_usd=None,
            ledger_path=str(ledger_path),
            upstream_openai=server.url,
            upstream_anthropic=server.url,
        ) as running:
            status, headers, _ = call(running.url, "/v1/messages", messages(stream=stream))
            running.flush()
    finally:
        server.stop()
    assert status == 200 and headers["request-id"] == "req_011CrossSource"

    line = {
        "type": "assistant",
        "sessionId": "s-1",
        "requestId": headers["request-id"],
        "timestamp": "2026-11-23T10:00:01.250Z",
        "message": {**message, "usage": usage},
    }
    project = tmp_path / "claude" / "projects" / "p"
    project.mkdir(parents=True)
    (project / "s-1.jsonl").write_text(json.dumps(line) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cage",
            "import",
            "claude-code",
            str(tmp_path / "claude"),
            "--ledger",
            str(ledger_path),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["imported"], json.loads(done.stdout)["duplicates"]) == (0, 1)
    with Ledger.open(ledger_path) as ledger:
        (event,) = ledger.events()
        (row,) = ledger.report("model")
    assert (event.source, event.request_id) == ("proxy", "anthropic:req_011CrossSource")
    assert (row["calls"], row["input_tokens"], row["cache_read_tokens"]) == (1, 12, 100)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--budget-usd", "nan"),  # NaN compares false: the cap would never stop a call
        ("--budget-usd", "inf"),
        ("--warn-at-usd", "nan"),
        ("--warn-at-tokens", "-3"),
    ],
)
def test_cli_refuses_a_cap_or_warning_that_could_never_fire(flag, value, capsys):
    from cage.cli import main

    assert main(["proxy", "--mock", "--port", "0", flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_cli_log_lines_carry_the_prefix_once(tmp_path):
    # A refusal was logged as "cage proxy: cage proxy: refused ...".
    env = dict(os.environ, CAGE_LEDGER=str(tmp_path / "cli.db"))
    argv = [sys.executable, "-m", "cage", "proxy", "--mock", "--port", "0", "--json"]
    process = subprocess.Popen(
        [*argv, "--budget-usd", "0.000001"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        info = json.loads(process.stdout.readline())
        assert call(info["url"], "/v1/chat/completions", chat())[0] == 429
    finally:
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=20)
    assert "cage proxy: refused" in err
    assert "cage proxy: cage proxy:" not in err
