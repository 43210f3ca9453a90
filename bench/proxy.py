"""Proxy overhead against a local upstream, with the LiteLLM proxy as a peer, in one run.

Three processes serve HTTP on 127.0.0.1: the fake upstream (``python -m cage.mockupstream``),
``cage proxy`` in front of it (its ledger in a temporary file, a cap it never reaches), and,
when it can be installed, the LiteLLM proxy (``litellm[proxy]`` in a separate virtualenv under
the system temporary directory, one worker, no database) configured with the same upstream
as an OpenAI-compatible model. This script is the client: one keep-alive aiohttp session per
target, requests interleaved (direct, cage, peer, direct, ...) so drift hits all alike.

For each concurrency (1 and 50) it measures non-streaming chat completions (latency) and
streaming ones (time to first byte, total), and prints p50/p99 and what each proxy adds to
the direct figures, plus CPU time per call of each proxy process (psutil).

    python bench/proxy.py            # full run
    python bench/proxy.py --quick    # smoke run, a few seconds
    python bench/proxy.py --no-peer  # skip LiteLLM
    python bench/proxy.py --no-peer --baseline HEAD~3   # this proxy.py against an older one
    python bench/proxy.py --no-peer --body-kb 300       # conversations the size agents send

``--baseline REF`` adds a fourth target, ``cage@REF``: the same ``cage proxy`` with
``src/cage/proxy.py`` as it was at the git revision REF (every other module as it is now),
measured interleaved with the others. On a machine shared with other work, timings move with
the load from one run to the next; two versions measured in the same run, call after call,
share it, so their difference (above all in CPU per call) is the figure to trust.

Targets (DESIGN.md, "Performance budgets"; issue 6): added p50 < 1 ms and p99 < 5 ms at
concurrency 1, added p50 < 10 ms at concurrency 50, < 1 ms of proxy CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

PEER_VENV = Path(tempfile.gettempdir()) / "cage-bench-litellm"
PEER_KEY = "sk-cage-bench"
MODEL = "gpt-4o-mini"
STREAM_WORDS = "20"  # stream events per streamed reply


@dataclass
class Target:
    name: str
    url: str  # base URL; requests go to url + /v1/chat/completions
    process: subprocess.Popen | None = None
    headers: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # (kind, concurrency) -> list of seconds
    calls: int = 0
    cpu_s: float = 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> bool:
    """Poll until something answers HTTP at url (any status)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            urllib.request.urlopen(url, timeout=1)
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.2)
    return False


def start_upstream() -> Target:
    process = subprocess.Popen(
        [sys.executable, "-m", "cage.mockupstream", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    url = process.stdout.readline().strip()
    return Target("direct", url, process)


# Runs `cage proxy ARGS` with cage.proxy loaded from the file named by CAGE_BENCH_PROXY.
_SWAPPED_PROXY = (
    "import importlib.util, os, sys\n"
    "import cage\n"
    "spec = importlib.util.spec_from_file_location('cage.proxy', os.environ['CAGE_BENCH_PROXY'])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules['cage.proxy'] = cage.proxy = module\n"
    "spec.loader.exec_module(module)\n"
    "from cage import cli\n"
    "sys.exit(cli.main(['proxy', *sys.argv[1:]]))\n"
)


def baseline_source(ref: str, workdir: Path) -> Path:
    """src/cage/proxy.py as it was at git revision ``ref``, written under workdir."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["git", "-C", str(root), "show", f"{ref}:src/cage/proxy.py"],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        raise SystemExit(f"bench: cannot read src/cage/proxy.py at {ref!r}: {message}")
    path = workdir / "proxy_baseline.py"
    path.write_bytes(done.stdout)
    return path


def start_cage(
    upstream: str, workdir: Path, name: str = "cage", proxy_file: Path | None = None
) -> Target:
    ledger = "ledger.db" if proxy_file is None else "ledger-baseline.db"
    env = dict(os.environ, CAGE_LEDGER=str(workdir / ledger))
    if proxy_file is None:
        command = [sys.executable, "-m", "cage", "proxy"]
    else:
        env["CAGE_BENCH_PROXY"] = str(proxy_file)
        command = [sys.executable, "-c", _SWAPPED_PROXY]
    process = subprocess.Popen(
        [
            *command,
            "--port",
            "0",
            "--json",
            "--quiet",
            "--mission",
            "bench",
            "--budget-usd",
            "1000000",
            "--upstream-openai",
            upstream,
            "--upstream-anthropic",
            upstream,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    info = json.loads(process.stdout.readline())
    return Target(name, info["url"], process)


def ensure_peer(quiet: bool) -> tuple[Path | None, str]:
    """The LiteLLM executable in its own virtualenv, installing it on first use."""
    exe = PEER_VENV / "bin" / "litellm"
    if exe.exists():
        return exe, ""
    if not quiet:
        print(f"installing litellm[proxy] into {PEER_VENV} (first run only) ...", flush=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(PEER_VENV)], check=True, capture_output=True
        )
        done = subprocess.run(
            [str(PEER_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot create a virtualenv for it: {exc}"
    if done.returncode != 0 or not exe.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"pip install 'litellm[proxy]' failed: {tail[0]}"
    return exe, ""


def start_peer(upstream: str, workdir: Path, quiet: bool) -> tuple[Target | None, str]:
    exe, why = ensure_peer(quiet)
    if exe is None:
        return None, why
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: sk-fake\n"
        "general_settings:\n"
        f"  master_key: {PEER_KEY}\n"
    )
    port = free_port()
    env = dict(
        os.environ,
        LITELLM_MASTER_KEY=PEER_KEY,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
    )
    env.pop("DATABASE_URL", None)
    log = open(workdir / "litellm.log", "w")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [
            str(exe),
            "--config",
            str(config),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--num_workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_http(url + "/health/liveliness", 120, process):
        process.kill()
        tail = (workdir / "litellm.log").read_text(errors="replace").strip().splitlines()[-1:]
        return None, f"LiteLLM did not start: {tail[0] if tail else 'no output'}"
    return Target("litellm", url, process, {"Authorization": f"Bearer {PEER_KEY}"}), ""


# Extra conversation in every request (--body-kb): agents resend the whole history.
HISTORY: list[dict] = []


def body(stream: bool) -> dict:
    return {
        "model": MODEL,
        "messages": [
            *HISTORY,
            {"role": "user", "content": "Say something short about budgets."},
        ],
        "max_tokens": 64,
        "stream": stream,
    }


def make_history(kib: int) -> list[dict]:
    """About ``kib`` KiB of earlier turns, 2 KiB of text each (like an agent's history)."""
    words = ("budget", "cap", "ledger", "proxy", "token", "stream", "verify", "merge")
    text = " ".join(words[i % len(words)] for i in range(300))[:2000]
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {text}"}
        for i in range(max(0, kib // 2))
    ]


async def one_call(
    session: aiohttp.ClientSession, target: Target, stream: bool
) -> tuple[float, float]:
    """(time to first byte, total) of one call, in seconds."""
    headers = {**target.headers, "x-cage-mock-output-tokens": STREAM_WORDS}
    started = time.perf_counter()
    async with session.post(
        target.url + "/v1/chat/completions", json=body(stream), headers=headers
    ) as response:
        first = None
        async for _chunk in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{target.name} answered {response.status}")
    total = time.perf_counter() - started
    return (first if first is not None else total), total


async def measure(targets: list[Target], concurrency: int, rounds: int) -> None:
    sessions = {
        t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) for t in targets
    }
    try:
        # Warm up: connections open, caches filled.
        for t in targets:
            for stream in (False, True):
                await asyncio.gather(
                    *(one_call(sessions[t.name], t, stream) for _ in range(concurrency))
                )
        for t in targets:
            t.cpu_before = cpu_of(t)
            t.calls_before = t.calls
        order = random.Random(concurrency)
        for _ in range(rounds):
            for stream in (False, True):
                # Interleaved, every target once per round, in a random order, each batch
                # started when the previous one's work is done.
                for t in order.sample(targets, len(targets)):
                    if concurrency > 1:  # (single calls leave nothing behind worth a pause)
                        await settle(targets)
                    results = await asyncio.gather(
                        *(one_call(sessions[t.name], t, stream) for _ in range(concurrency))
                    )
                    t.calls += concurrency
                    if stream:
                        t.samples.setdefault(("ttfb", concurrency), []).extend(
                            r[0] for r in results
                        )
                        t.samples.setdefault(("stream", concurrency), []).extend(
                            r[1] for r in results
                        )
                    else:
                        t.samples.setdefault(("json", concurrency), []).extend(
                            r[1] for r in results
                        )
        for t in targets:
            t.cpu_s += cpu_of(t) - t.cpu_before
    finally:
        for session in sessions.values():
            await session.close()


async def settle(targets: list[Target], step_s: float = 0.02, limit_s: float = 3.0) -> None:
    """Wait until no target's processes use CPU: work a batch leaves behind (LiteLLM's, after
    50 calls) must not land on the next target's timing."""
    deadline = time.monotonic() + limit_s
    last = [cpu_of(t) for t in targets]
    while time.monotonic() < deadline:
        await asyncio.sleep(step_s)
        now = [cpu_of(t) for t in targets]
        if all(b - a < step_s * 0.1 for a, b in zip(last, now, strict=True)):
            return
        last = now


def cpu_of(target: Target) -> float:
    if target.process is None:
        return 0.0
    proc = psutil.Process(target.process.pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(targets: list[Target], levels: list[int]) -> None:
    direct = targets[0]
    kinds = [
        ("json", "non-streaming latency"),
        ("ttfb", "stream first byte"),
        ("stream", "stream total"),
    ]
    print()
    print(f"{'':24}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}")
    for c in levels:
        for kind, label in kinds:
            print(f"concurrency {c}, {label}")
            base = direct.samples[(kind, c)]
            b50, b99 = pct(base, 50) * 1e3, pct(base, 99) * 1e3
            for t in targets:
                s = t.samples[(kind, c)]
                p50, p99 = pct(s, 50) * 1e3, pct(s, 99) * 1e3
                added = "" if t is direct else f"{p50 - b50:>+11.2f}{p99 - b99:>+11.2f}"
                print(f"  {t.name:22}{p50:>9.2f}{p99:>9.2f}{added}")
    print()
    for t in targets[1:]:
        print(
            f"{t.name}: {t.cpu_s / max(1, t.calls) * 1e3:.3f} ms CPU per call "
            f"({t.calls} calls, {t.cpu_s:.2f} s CPU)"
        )


def verdict(targets: list[Target]) -> None:
    cage = next(t for t in targets if t.name == "cage")
    direct = targets[0]
    rows = []
    for kind in ("json", "ttfb", "stream"):
        for c, limit50, limit99 in ((1, 1.0, 5.0), (50, 10.0, None)):
            if (kind, c) not in cage.samples:
                continue
            a50 = (pct(cage.samples[(kind, c)], 50) - pct(direct.samples[(kind, c)], 50)) * 1e3
            a99 = (pct(cage.samples[(kind, c)], 99) - pct(direct.samples[(kind, c)], 99)) * 1e3
            ok = a50 < limit50 and (limit99 is None or a99 < limit99)
            rows.append(ok)
            target = f"p50 < {limit50:g} ms" + (f", p99 < {limit99:g} ms" if limit99 else "")
            print(f"target {kind:6} c={c:<3} {target:24} {'met' if ok else 'MISSED'}")
    cpu = cage.cpu_s / max(1, cage.calls) * 1e3
    print(f"target cpu/call < 1 ms{'':19} {'met' if cpu < 1 else 'MISSED'} ({cpu:.3f} ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--no-peer", action="store_true", help="do not run LiteLLM")
    parser.add_argument("--rounds-c1", type=int, default=300)
    parser.add_argument("--rounds-c50", type=int, default=20)
    parser.add_argument(
        "--body-kb",
        type=int,
        default=0,
        metavar="N",
        help="add about N KiB of earlier conversation to every request (default 0)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure cage with src/cage/proxy.py as at git revision REF",
    )
    args = parser.parse_args(argv)
    rounds1, rounds50 = (30, 3) if args.quick else (args.rounds_c1, args.rounds_c50)
    HISTORY[:] = make_history(args.body_kb)

    workdir = Path(tempfile.mkdtemp(prefix="cage-bench-proxy-"))
    targets: list[Target] = []
    try:
        upstream = start_upstream()
        targets.append(upstream)
        targets.append(start_cage(upstream.url, workdir))
        if args.baseline:
            source = baseline_source(args.baseline, workdir)
            targets.append(start_cage(upstream.url, workdir, f"cage@{args.baseline}", source))
        if args.no_peer:
            print("peer unavailable: skipped (--no-peer)")
        else:
            peer, why = start_peer(upstream.url, workdir, args.quick)
            if peer is None:
                print(f"peer unavailable: {why}")
            else:
                targets.append(peer)
        print(
            f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
            f"aiohttp {aiohttp.__version__}; targets: {', '.join(t.name for t in targets)}"
        )
        print(
            f"rounds: {rounds1} at concurrency 1, {rounds50} at concurrency 50 "
            "(each round: one non-streaming and one streaming batch per target); "
            f"request body {len(json.dumps(body(False))) / 1024:.1f} KiB"
        )
        asyncio.run(measure(targets, 1, rounds1))
        asyncio.run(measure(targets, 50, rounds50))
        report(targets, [1, 50])
        print()
        verdict(targets)
    finally:
        for t in reversed(targets):
            if t.process is not None and t.process.poll() is None:
                t.process.terminate()
                try:
                    t.process.wait(10)
                except subprocess.TimeoutExpired:
                    t.process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
