"""A local stand-in for the OpenAI and Anthropic APIs, for demos, tests and benchmarks.

It answers ``POST /v1/chat/completions``, ``POST /v1/responses`` and ``POST /v1/messages``,
streaming (SSE) and not, with deterministic text and usage, and ``GET /v1/models``. Nothing
leaves the machine and no key is checked.

Usage is derived from the request: input tokens = request body bytes / 4 (at least 1),
output tokens = the number of words in the reply (12 by default, never more than the
request's max tokens). Request headers steer it, for tests and benchmarks:

- ``x-cage-mock-output-tokens: N``: reply with N words (one stream event per word);
- ``x-cage-mock-usage: {json}``: report this raw usage object verbatim, in the provider's
  own shape (so tests can check normalisation exactly);
- ``x-cage-mock-fault: cut|malformed|status:NNN|hang|no-usage``: misbehave (cut the stream
  half-way, send broken SSE, answer an error status, never answer, omit usage);
- ``x-cage-mock-delay-ms: N``: wait N ms between stream events.

Run it alone with ``python -m cage.mockupstream --port 8790``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from aiohttp import web

DEFAULT_REPLY_WORDS = 12
_WORDS = ("cage", "mock", "reply", "the", "change", "is", "verified", "and", "its", "cost", "known")


def _reply_words(n: int) -> list[str]:
    return [_WORDS[i % len(_WORDS)] for i in range(n)]


def _output_words(request: web.Request, payload: dict[str, Any]) -> int:
    wanted = request.headers.get("x-cage-mock-output-tokens")
    n = int(wanted) if wanted and wanted.isdigit() else DEFAULT_REPLY_WORDS
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        limit = payload.get(key)
        if isinstance(limit, int) and limit > 0:
            n = min(n, limit)
    return n


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def _headers(api: str) -> dict[str, str]:
    # Unique per call, like the real services: the proxy uses it as the ledger request id.
    name = "request-id" if api == "messages" else "x-request-id"
    return {name: _new_id("req_mock_")}


def _error_body(api: str, status: int) -> dict[str, Any]:
    message = f"mock upstream error {status}"
    if api == "messages":
        return {"type": "error", "error": {"type": "api_error", "message": message}}
    return {"error": {"message": message, "type": "server_error", "code": None}}


def _usage(api: str, input_tokens: int, output_tokens: int, raw: str | None) -> dict[str, Any]:
    if raw:
        return json.loads(raw)
    if api == "chat":
        return {
            "prompt_tokens": input_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
    if api == "responses":
        return {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def _chat_events(model: str, words: list[str], usage: dict, include_usage: bool) -> list[bytes]:
    cid, created = _new_id("chatcmpl-mock"), int(time.time())
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        return _sse({**base, "choices": [choice], **extra})

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": (" " if i else "") + w}, None) for i, w in enumerate(words)]
    events.append(chunk({}, "stop"))
    if include_usage:
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        events.append(_sse({**base, "choices": [], "usage": usage}))
    events.append(_sse("[DONE]"))
    return events


def _responses_events(model: str, words: list[str], usage: dict | None) -> list[bytes]:
    rid, created = _new_id("resp_mock"), int(time.time())
    text = " ".join(words)
    base = {"id": rid, "object": "response", "created_at": created, "model": model}
    events = [
        _sse(
            {"type": "response.created", "response": {**base, "status": "in_progress"}},
            "response.created",
        ),
    ]
    for i, w in enumerate(words):
        delta = {
            "type": "response.output_text.delta",
            "output_index": 0,
            "content_index": 0,
            "delta": (" " if i else "") + w,
        }
        events.append(_sse(delta, "response.output_text.delta"))
    done = {
        **base,
        "status": "completed",
        "output": [
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text}],
            }
        ],
        "usage": usage,
    }
    events.append(_sse({"type": "response.completed", "response": done}, "response.completed"))
    return events


def _messages_events(model: str, words: list[str], usage: dict | None) -> list[bytes]:
    mid = _new_id("msg_mock")
    start_usage = dict(usage or {})
    if usage is not None:
        # Like the real service: message_start carries the input side and a first output
        # count; message_delta carries the cumulative output count.
        start_usage["output_tokens"] = min(1, int(usage.get("output_tokens") or 0))
    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "usage": start_usage,
    }
    events = [
        _sse({"type": "message_start", "message": message}, "message_start"),
        _sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    for i, w in enumerate(words):
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": (" " if i else "") + w},
        }
        events.append(_sse(delta, "content_block_delta"))
    events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    final = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    if usage is not None:
        final["usage"] = {"output_tokens": usage.get("output_tokens", 0)}
    events.append(_sse(final, "message_delta"))
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return events


def _json_reply(api: str, model: str, words: list[str], usage: dict | None) -> dict[str, Any]:
    text = " ".join(words)
    if api == "chat":
        body = {
            "id": _new_id("chatcmpl-mock"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
        }
    elif api == "responses":
        body = {
            "id": _new_id("resp_mock"),
            "object": "response",
            "status": "completed",
            "created_at": int(time.time()),
            "model": model,
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text}],
                }
            ],
        }
    else:
        body = {
            "id": _new_id("msg_mock"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
        }
    if usage is not None:
        body["usage"] = usage
    return body


async def _answer(request: web.Request, api: str) -> web.StreamResponse:
    raw = await request.read()
    fault = request.headers.get("x-cage-mock-fault", "")
    if fault == "hang":
        await asyncio.sleep(3600)
    if fault.startswith("status:"):
        status = int(fault.split(":", 1)[1])
        return web.json_response(_error_body(api, status), status=status, headers=_headers(api))
    try:
        payload = json.loads(raw)
    except ValueError:
        return web.json_response(_error_body(api, 400), status=400, headers=_headers(api))
    model = str(payload.get("model") or "mock-model")
    words = _reply_words(_output_words(request, payload))
    usage = _usage(api, max(1, len(raw) // 4), len(words), request.headers.get("x-cage-mock-usage"))
    if fault == "no-usage":
        usage = None
    if not payload.get("stream"):
        return web.json_response(_json_reply(api, model, words, usage), headers=_headers(api))

    if api == "chat":
        options = payload.get("stream_options") or {}
        events = _chat_events(model, words, usage, bool(options.get("include_usage")))
    elif api == "responses":
        events = _responses_events(model, words, usage)
    else:
        events = _messages_events(model, words, usage)
    if fault == "malformed":
        events = [b"data: {not json\n\n", b"event: ??\ndata: [[[\n\n", *events[1:-2]]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_headers(api)}
    )
    await response.prepare(request)
    delay = int(request.headers.get("x-cage-mock-delay-ms", "0") or 0) / 1000
    cut_at = len(events) // 2 if fault == "cut" else None
    for i, event in enumerate(events):
        if i == cut_at:
            # Drop the connection mid-stream, without the final chunk: a truncated stream.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write(event)
        if delay:
            await asyncio.sleep(delay)
    await response.write_eof()
    return response


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "chat")


async def _responses(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "responses")


async def _messages(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "messages")


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "mock-model", "object": "model"}]})


def create_app() -> web.Application:
    """The mock upstream as an aiohttp application (mount it on any runner)."""
    # Like the real services, it takes conversations larger than aiohttp's 1 MiB default.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_get("/v1/models", _models)
    return app


def main(argv: list[str] | None = None) -> int:
    """Serve the mock upstream in the foreground; prints its URL on the first line."""
    parser = argparse.ArgumentParser(prog="python -m cage.mockupstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args(argv)

    async def serve() -> None:
        runner = web.AppRunner(create_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"http://{args.host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
