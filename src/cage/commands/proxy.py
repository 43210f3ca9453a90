"""`cage proxy`: run the metering proxy with a hard budget cap in the foreground."""

from __future__ import annotations

import argparse
import json
import sys

from cage.errors import ProxyError, UsageError

DEFAULT_PORT = 8788


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `proxy` command's arguments."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument("--mission", metavar="ID", help="mission id recorded on every call")
    parser.add_argument(
        "--budget-usd",
        type=float,
        metavar="X",
        help="hard cap in dollars: a call whose worst case would cross it gets HTTP 429 "
        "(the mission's spend already in the ledger counts)",
    )
    parser.add_argument("--max-calls", type=int, metavar="N", help="refuse LLM calls after N")
    parser.add_argument("--warn-at-usd", type=float, metavar="X", help="warn once at this spend")
    parser.add_argument("--warn-at-tokens", type=int, metavar="N", help="warn once at N tokens")
    add_traffic_arguments(
        parser, mock_help="answer locally with deterministic text and usage (no network, no keys)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (URLs and settings) on stdout once listening",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="do not log each call on stderr")


def add_traffic_arguments(parser: argparse.ArgumentParser, *, mock_help: str) -> None:
    """Where metered calls go and where they are recorded: ``--upstream-openai``,
    ``--upstream-anthropic``, ``--mock`` and ``--ledger`` (`cage proxy`, `cage mission run`)."""
    parser.add_argument(
        "--upstream-openai",
        metavar="URL",
        help="OpenAI-compatible upstream (default https://api.openai.com)",
    )
    parser.add_argument(
        "--upstream-anthropic",
        metavar="URL",
        help="Anthropic upstream (default https://api.anthropic.com)",
    )
    parser.add_argument("--mock", action="store_true", help=mock_help)
    parser.add_argument(
        "--ledger", metavar="PATH", help="ledger file (default: $CAGE_LEDGER or user data dir)"
    )


def show_log(level: int) -> None:
    """Send the proxy's log records of ``level`` and above to stderr, each line prefixed once
    with ``cage proxy: `` (`cage proxy`, and `cage mission run` for refusals and warnings)."""
    import logging

    from cage import proxy

    class _Prefixed(logging.Formatter):
        # Most proxy messages carry the prefix already: add it only where it is missing.
        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record)
            return text if text.startswith("cage proxy: ") else "cage proxy: " + text

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Prefixed("%(message)s"))
    proxy.log.addHandler(handler)
    proxy.log.setLevel(level)
    proxy.log.propagate = False


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; print the spend summary on stderr when stopping."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ProxyError(
            "`cage proxy` needs aiohttp, an optional dependency: pip install 'cage-gate[proxy]'"
        ) from None
    # "not 0 < x < inf" also refuses NaN, which compares false with everything: a NaN cap
    # would never stop a call.
    if args.budget_usd is not None and not 0 < args.budget_usd < float("inf"):
        raise UsageError(f"--budget-usd must be a finite number > 0, not {args.budget_usd:g}")
    if args.warn_at_usd is not None and not 0 < args.warn_at_usd < float("inf"):
        raise UsageError(f"--warn-at-usd must be a finite number > 0, not {args.warn_at_usd:g}")
    if args.warn_at_tokens is not None and args.warn_at_tokens <= 0:
        raise UsageError(f"--warn-at-tokens must be > 0, not {args.warn_at_tokens}")
    if args.max_calls is not None and args.max_calls < 0:
        raise UsageError(f"--max-calls must be >= 0, not {args.max_calls}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {args.port}")

    import asyncio
    import logging

    from cage import proxy

    show_log(logging.WARNING if args.quiet else logging.INFO)

    config = proxy.ProxyConfig(
        host=args.host,
        port=args.port,
        mission_id=args.mission,
        budget_usd=args.budget_usd,
        max_calls=args.max_calls,
        ledger_path=args.ledger,
        upstream_openai=args.upstream_openai,
        upstream_anthropic=args.upstream_anthropic,
        mock=args.mock,
        warn_at_usd=args.warn_at_usd,
        warn_at_tokens=args.warn_at_tokens,
    )

    def announce(running: proxy.MeteringProxy) -> None:
        url = running.url
        info = {
            "url": url,
            "openai_base_url": f"{url}/v1",
            "anthropic_base_url": url,
            "mission_id": args.mission,
            "budget_usd": args.budget_usd,
            "max_calls": args.max_calls,
            "mock": args.mock,
            "upstreams": running.upstreams,
            "ledger": running.writer.location,
        }
        if args.json:
            print(json.dumps(info), flush=True)
            return
        cap = f"${args.budget_usd:.2f} cap" if args.budget_usd is not None else "no cap"
        lines = [
            f"cage proxy listening on {url} (mission {args.mission or '-'}, {cap}"
            + (f", at most {args.max_calls} calls" if args.max_calls is not None else "")
            + ")",
            f"  OpenAI SDK, Codex:           export OPENAI_BASE_URL={url}/v1",
            f"  Claude Code, Anthropic SDK:  export ANTHROPIC_BASE_URL={url}",
            "  upstreams: "
            + (
                "local mock"
                if args.mock
                else ", ".join(f"{k} {v}" for k, v in running.upstreams.items())
            ),
            f"  ledger: {running.writer.location}",
            "Press Ctrl-C to stop.",
        ]
        print("\n".join(lines), flush=True)

    try:
        spend = asyncio.run(proxy.serve(config, on_ready=announce))
    except KeyboardInterrupt:
        spend = None
    if spend is not None:
        print(
            f"cage proxy: stopped after {spend['calls']} calls, ${spend['cost_usd']:.4f}"
            + (f", {spend['refused']} refused by the cap" if spend["refused"] else "")
            + (f", {spend['unpriced']} unpriced" if spend["unpriced"] else ""),
            file=sys.stderr,
        )
    return 0
