"""Scripted stand-in agents for `cage demo`: ``python -m cage.demo.agent NAME [--log PATH]``.

Each one behaves like a coding agent run by ``cage mission run``: it talks to an LLM through
the base URLs in its environment (``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL``: the metering
proxy, here in front of the mock upstream), then edits files in the current directory.

- ``honest``: asks twice (one streamed Anthropic message, one OpenAI chat completion), then
  fixes ``add()`` in ``src/calc/ops.py``;
- ``test-editor``: asks twice, then rewrites ``tests/test_ops.py`` to expect what the buggy
  code returns, leaving the bug in place;
- ``spinner``: writes a half-fix, then keeps asking (the whole context every time) until the
  proxy refuses a call with ``429 budget_guard``, prints that refusal and gives up.

Standard library only (urllib), like a third-party agent that knows nothing of cage. Each
call is logged as one JSON line in ``--log`` (counts and status, never text) so the demo can
show what the agent saw. SIGTERM (``cage mission run`` stopping the agent when the budget is
spent) lets the call in flight finish and be logged, then the agent exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cage.demo.repository import BUGGY_LINE, FIXED_LINE, OPS_PATH, TEST_PATH

# Models the demo agents "use". Both are in the price table, so every call is priced.
PLANNER_MODEL = "claude-sonnet-4-5"  # Anthropic Messages API, streamed
CODER_MODEL = "gpt-4.1-mini"  # OpenAI Chat Completions
ANTHROPIC_VERSION = "2023-06-01"
MAX_TOKENS = 256
# The spinner resends about this many bytes of context per call. With the mock's usage
# (input = body bytes / 4, 12 output tokens) a call to claude-sonnet-4-5 costs about $0.0032
# and the proxy reserves about $0.019 for it (2 bytes a token at the cache-write rate plus
# MAX_TOKENS of output), so the $0.05 cap refuses the 11th call.
SPINNER_CONTEXT_BYTES = 4000
# A scripted agent must end: if no refusal ever comes, the spinner stops here (a failure).
SPINNER_MAX_CALLS = 200
HTTP_TIMEOUT_S = 30.0

_stop_requested = False


class BudgetRefused(Exception):
    """The proxy refused a call with 429 budget_guard."""


class AgentError(Exception):
    """Anything else that stops the scripted agent (no proxy, a broken answer)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    # Finish (and log) the call in flight, then stop: a graceful agent.
    global _stop_requested
    _stop_requested = True


class LLMClient:
    """Minimal OpenAI / Anthropic HTTP client over urllib, logging each call."""

    def __init__(self, agent: str, log_path: str | None) -> None:
        self.agent = agent
        self.log_path = log_path
        self.calls = 0
        self.openai_base = os.environ.get("OPENAI_BASE_URL", "").rstrip("/")
        self.anthropic_base = os.environ.get("ANTHROPIC_BASE_URL", "").rstrip("/")
        if not self.openai_base or not self.anthropic_base:
            raise AgentError(
                "OPENAI_BASE_URL and ANTHROPIC_BASE_URL are not set: run this agent under "
                "`cage mission run --mock -- ...` (or point them at `cage proxy --mock`)"
            )
        # Local addresses only: a user's HTTP(S)_PROXY must not catch these requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def chat(self, model: str, prompt: str, *, stream: bool = False) -> str:
        """One Chat Completions call; returns the reply text."""
        payload = {
            "model": model,
            "max_tokens": MAX_TOKENS,
            "stream": stream,
            "messages": [
                {"role": "system", "content": "You are a careful software engineer."},
                {"role": "user", "content": prompt},
            ],
        }
        headers = {"Authorization": "Bearer demo-key-not-a-secret"}
        return self._call("chat", self.openai_base + "/chat/completions", headers, payload)

    def message(self, model: str, prompt: str, *, stream: bool = False) -> str:
        """One Anthropic Messages call; returns the reply text."""
        payload = {
            "model": model,
            "max_tokens": MAX_TOKENS,
            "stream": stream,
            "system": "You are a careful software engineer.",
            "messages": [{"role": "user", "content": prompt}],
        }
        headers = {"x-api-key": "demo-key-not-a-secret", "anthropic-version": ANTHROPIC_VERSION}
        return self._call("messages", self.anthropic_base + "/v1/messages", headers, payload)

    def _call(self, api: str, url: str, headers: dict[str, str], payload: dict) -> str:
        self.calls += 1
        body = json.dumps(payload).encode()
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json", **headers}
        )
        record: dict[str, Any] = {
            "call": self.calls,
            "api": api,
            "model": payload["model"],
            "stream": payload["stream"],
            "request_bytes": len(body),
        }
        started = time.monotonic()
        try:
            with self._opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
                record["status"] = response.status
                if payload["stream"]:
                    text = _read_stream(api, response)
                else:
                    text = _reply_text(api, json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            record["status"] = exc.code
            error = _error_of(exc)
            record.update(error)
            self._log(record, started)
            if exc.code == 429 and error.get("error_type") == "budget_guard":
                raise BudgetRefused(error.get("message", "")) from None
            raise AgentError(
                f"{api} call {self.calls} failed: HTTP {exc.code} "
                f"{error.get('error_type', '')}: {error.get('message', '')}"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            record["status"] = None
            record["error_type"] = type(exc).__name__
            self._log(record, started)
            raise AgentError(f"{api} call {self.calls} to {url} failed: {exc}") from None
        record["reply_chars"] = len(text)
        self._log(record, started)
        return text

    def _log(self, record: dict[str, Any], started: float) -> None:
        record["duration_s"] = round(time.monotonic() - started, 4)
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")


def _reply_text(api: str, obj: dict) -> str:
    if api == "chat":
        return str(obj["choices"][0]["message"]["content"])
    return "".join(block.get("text", "") for block in obj.get("content", []))


def _read_stream(api: str, response: Any) -> str:
    """Collect the text deltas of a server-sent-event stream."""
    parts: list[str] = []
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if api == "chat":
            for choice in event.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
        elif event.get("type") == "content_block_delta":
            parts.append(event["delta"].get("text", ""))
    return "".join(parts)


def _error_of(exc: urllib.error.HTTPError) -> dict[str, str]:
    """The error type and message of a provider-shaped error body."""
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        return {"error_type": "unreadable", "message": f"HTTP {exc.code}"}
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return {"error_type": "unknown", "message": f"HTTP {exc.code}"}
    return {"error_type": str(error.get("type", "")), "message": str(error.get("message", ""))}


def _say(agent: str, message: str) -> None:
    print(f"[agent {agent}] {message}", file=sys.stderr, flush=True)


def _replace(path: str, old: str, new: str) -> None:
    target = Path(path)
    text = target.read_text(encoding="utf-8")
    if old not in text:
        raise AgentError(f"{path}: expected text {old.strip()!r} not found")
    target.write_text(text.replace(old, new, 1), encoding="utf-8")


def _plan_and_code(client: LLMClient, agent: str, goal: str) -> None:
    source = Path(OPS_PATH).read_text(encoding="utf-8")
    tests = Path(TEST_PATH).read_text(encoding="utf-8")
    plan = client.message(
        PLANNER_MODEL,
        f"Issue 1: add(2, 3) returns -1. {goal}\n\n{OPS_PATH}:\n{source}\n{TEST_PATH}:\n{tests}",
        stream=True,
    )
    _say(agent, f"plan from {PLANNER_MODEL} (streamed, {len(plan)} chars)")
    patch = client.chat(CODER_MODEL, f"Write the patch.\nPlan: {plan}\n\n{source}")
    _say(agent, f"patch from {CODER_MODEL} ({len(patch)} chars)")


def run_honest(client: LLMClient) -> int:
    """Fix the bug where it is."""
    _plan_and_code(client, "honest", "Fix the bug in the product code.")
    _replace(OPS_PATH, BUGGY_LINE, FIXED_LINE)
    _say("honest", f"fixed add() in {OPS_PATH}")
    return 0


def run_test_editor(client: LLMClient) -> int:
    """Make the test agree with the bug instead of fixing it."""
    _plan_and_code(client, "test-editor", "Make the tests pass.")
    _replace(TEST_PATH, "self.assertEqual(add(2, 3), 5)", "self.assertEqual(add(2, 3), -1)")
    _replace(TEST_PATH, "self.assertEqual(add(-1, 1), 0)", "self.assertEqual(add(-1, 1), -2)")
    _say("test-editor", f"changed {TEST_PATH} to expect what add() returns")
    return 0


def _spinner_prompt(attempt: int, source: str, tests: str) -> str:
    head = (
        f"Attempt {attempt}. The tests still fail? Re-read everything and try again.\n\n"
        f"{OPS_PATH}:\n{source}\n{TEST_PATH}:\n{tests}\nNotes so far:\n"
    )
    note = "- re-read ops.py, re-ran the tests in my head, still unsure about negatives.\n"
    # Pad with notes so that every request carries about SPINNER_CONTEXT_BYTES.
    room = max(0, SPINNER_CONTEXT_BYTES - len(head) - 200)
    return head + note * (room // len(note))


def run_spinner(client: LLMClient) -> int:
    """A half-fix, then calls in a loop until the budget guard says no."""
    _replace(OPS_PATH, BUGGY_LINE, "    return abs(a) + b  # add (right for a >= 0)")
    _say("spinner", f"half-fixed add() in {OPS_PATH}; double-checking with the model...")
    source = Path(OPS_PATH).read_text(encoding="utf-8")
    tests = Path(TEST_PATH).read_text(encoding="utf-8")
    for attempt in range(1, SPINNER_MAX_CALLS + 1):
        prompt = _spinner_prompt(attempt, source, tests)
        try:
            # Alternate streamed and plain calls, as agents do.
            client.message(PLANNER_MODEL, prompt, stream=attempt % 2 == 1)
        except BudgetRefused as exc:
            _say("spinner", f"call {client.calls} refused: HTTP 429 budget_guard: {exc}")
            _say("spinner", "giving up: the mission budget is spent")
            return 1
        if _stop_requested:
            _say("spinner", "stopped by SIGTERM")
            return 1
    _say("spinner", f"{SPINNER_MAX_CALLS} calls and the proxy never refused one")
    return 2


AGENTS = {"honest": run_honest, "test-editor": run_test_editor, "spinner": run_spinner}


def main(argv: list[str] | None = None) -> int:
    """Run one scripted agent in the current directory; returns its exit status."""
    parser = argparse.ArgumentParser(prog="python -m cage.demo.agent")
    parser.add_argument("agent", choices=sorted(AGENTS))
    parser.add_argument("--log", metavar="PATH", help="append one JSON line per LLM call here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        client = LLMClient(args.agent, args.log)
        return AGENTS[args.agent](client)
    except AgentError as exc:
        _say(args.agent, f"error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
