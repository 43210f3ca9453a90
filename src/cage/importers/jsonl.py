"""AttributionEvent-style JSONL (one event object per line) -> ledger events.

Each line holds the fields of ``cage.ledger.Event``: ``timestamp``, ``provider``, ``model``,
token counts, ``cost_usd``, ``truth``, ``role``, ``caller``, ``mission_id``, ``duration_s``,
``error_class``, ``request_id``, ``extra``. Accepted aliases: ``cached_tokens`` (and
``cache_read_input_tokens``) for ``cache_read_tokens``, ``cache_creation_tokens`` for
``cache_write_tokens``, ``mesh_peer`` for ``mission_id``, ``prompt_tokens`` /
``completion_tokens`` for input / output (then read with OpenAI counting: the cached part is
taken out of ``prompt_tokens``). A missing ``provider`` is inferred from the model name.

Truth: a line with ``cost_usd`` keeps its ``truth`` label when it gives a valid one, else it
is ``measured``; a line without a cost is priced from the price table (``modeled``).

Ledger id: the line's ``request_id`` as written (so an event already recorded by the proxy
or ``meter()`` under that id is not counted again); a line without one gets
``jsonl:<sha256 of the event's canonical JSON>``, so the same event found in two files, or
imported twice, is recorded once. Two distinct calls identical in every field (same
timestamp, model and counts) would also collapse; give them request ids to keep both.

``extra`` keeps numbers, booleans and short strings only (ids, labels), and never a key that
names content (``prompt``, ``messages``, ``answer``…): counts, never content.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cage.importers.common import (
    BadLine,
    ImportReport,
    iter_files,
    load_object,
    normalise_timestamp,
    parse_lines,
    token_count,
)

SOURCE = "jsonl"
TRUTH_LABELS = ("measured", "modeled", "estimated")
MAX_EXTRA_STRING = 200
# Keys that name what was said, not a count or an id: dropped whatever their value, so a short
# prompt or answer never reaches the ledger.
CONTENT_KEYS = frozenset(
    {
        "prompt", "prompts", "completion", "completions", "content", "contents", "text",
        "message", "messages", "input", "output", "response", "responses", "query",
        "question", "answer", "system", "instructions", "body",
    }
)  # fmt: skip

# (alias, field): the first alias present wins; the canonical name is listed first.
_TOKEN_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_tokens", ("input_tokens",)),
    ("output_tokens", ("output_tokens", "completion_tokens")),
    ("cache_read_tokens", ("cache_read_tokens", "cached_tokens", "cache_read_input_tokens")),
    (
        "cache_write_tokens",
        ("cache_write_tokens", "cache_creation_tokens", "cache_creation_input_tokens"),
    ),
)
# Model-name prefix -> provider, for lines that do not name the provider.
_PROVIDER_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("claude", "anthropic"),
    ("gpt", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("codex", "openai"),
    ("gemini", "google"),
    ("mistral", "mistral"),
    ("grok", "xai"),
    ("deepseek", "deepseek"),
)
_TEXT_FIELDS = ("role", "caller", "mission_id", "error_class")


def find_files(root: Path, report: ImportReport) -> list[Path]:
    """A file given is taken as it is; a directory gives every ``*.jsonl`` under it."""
    return iter_files(root, "*.jsonl", report)


def infer_provider(model: str) -> str | None:
    """The provider a model name belongs to, from its prefix; None when unknown."""
    lowered = model.lower().split("/")[-1]
    for prefix, provider in _PROVIDER_BY_PREFIX:
        if lowered.startswith(prefix):
            return provider
    return None


class FileParser:
    """Parses one JSONL file line by line into event field sets."""

    def __init__(self, path: Path, context: dict | None = None) -> None:
        self.path = path
        self.skipped = 0
        self.context: dict = {}

    def parse(self, raw: bytes, line_no: int) -> list[tuple[Any, tuple, dict]]:
        """The event on one line (or none for a blank line); ``BadLine`` when unusable."""
        if not raw.strip():
            return []
        obj = load_object(raw)
        return [(None, (), event_fields(obj))]


def event_fields(obj: dict) -> dict:
    """Event fields from one AttributionEvent-style object; raises ``BadLine`` naming the field."""
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise BadLine("model is missing or not a string")
    provider = obj.get("provider")
    if provider is None:
        provider = infer_provider(model)
        if provider is None:
            raise BadLine(f"provider is missing and cannot be told from model {model[:60]!r}")
    elif not isinstance(provider, str) or not provider:
        raise BadLine("provider is not a string")
    timestamp = normalise_timestamp(obj.get("timestamp"))

    counts: dict[str, int] = {}
    for name, aliases in _TOKEN_ALIASES:
        key = next((a for a in aliases if obj.get(a) is not None), aliases[0])
        counts[name] = token_count(obj, key)
    if obj.get("input_tokens") is None and obj.get("prompt_tokens") is not None:
        # OpenAI counting: prompt_tokens includes the cached part.
        prompt = token_count(obj, "prompt_tokens")
        counts["input_tokens"] = max(prompt - counts["cache_read_tokens"], 0)

    cost = obj.get("cost_usd")
    if cost is not None:
        # NaN and Infinity (or 1e400) are refused: one inf row would make every later
        # report's total inf, which is not even valid JSON.
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or cost != cost:
            raise BadLine("cost_usd is not a number")
        if cost in (float("inf"), float("-inf")):
            raise BadLine("cost_usd is not a finite number")
        if cost < 0:
            raise BadLine(f"cost_usd = {cost} is negative")
        cost = float(cost)
    truth = obj.get("truth")
    if truth is not None and truth not in TRUTH_LABELS:
        raise BadLine(f"truth {str(truth)[:40]!r} is not one of {', '.join(TRUTH_LABELS)}")
    if truth is None:
        # Counts in such a log come from the API's usage: measured tokens (and a cost given
        # with them is the provider's). Without a cost the price table applies -> modeled.
        truth = "measured"

    fields: dict[str, Any] = {
        "timestamp": timestamp,
        "provider": provider,
        "model": model,
        **counts,
        "cost_usd": cost,
        "truth": truth,
        "source": SOURCE,
    }
    for name in _TEXT_FIELDS:
        value = obj.get(name)
        if name == "mission_id" and value is None:
            value = obj.get("mesh_peer")
        if value is not None and not isinstance(value, str):
            raise BadLine(f"{name} is a {type(value).__name__}, not a string")
        fields[name] = value
    duration = obj.get("duration_s")
    if duration is not None:
        if (
            isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not 0 <= duration < float("inf")
        ):
            raise BadLine("duration_s is not a non-negative number")
        duration = float(duration)
    fields["duration_s"] = duration

    extra = _counts_and_ids(obj.get("extra"))
    for name in ("cached", "source"):
        value = obj.get(name)
        if isinstance(value, (bool, int, float)) or (
            isinstance(value, str) and len(value) <= MAX_EXTRA_STRING
        ):
            extra["origin_source" if name == "source" else name] = value
    fields["extra"] = extra

    request_id = obj.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        raise BadLine("request_id is not a non-empty string")
    if request_id is None:
        canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        request_id = f"{SOURCE}:{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:32]}"
    fields["request_id"] = request_id
    return fields


def _counts_and_ids(extra: Any) -> dict:
    """The scalar entries of ``extra`` (numbers, booleans, short strings) whose key does not
    name content (``CONTENT_KEYS``); the rest dropped."""
    if not isinstance(extra, dict):
        return {}
    kept: dict[str, Any] = {}
    for key, value in extra.items():
        if str(key).lower() in CONTENT_KEYS:
            continue
        short_text = isinstance(value, str) and len(value) <= MAX_EXTRA_STRING
        if value is None or isinstance(value, (bool, int, float)) or short_text:
            kept[str(key)] = value
    return kept


def parse_file(path: str | os.PathLike) -> Iterator[dict]:
    """Every event field set in one file (pure: no ledger, no state); bad lines skipped."""
    return parse_lines(FileParser(Path(path)), path)
