"""Benchmark: `cage import claude-code` + `cage report` against ccusage on the same transcripts.

Generates a synthetic Claude Code tree (default 1,000,000 assistant lines, ~1.2 KB each,
with dummy content text, streaming copies of the same response on neighbouring lines and
sidechain copies in subagent files), then measures, each in its own process (wall time and
peak RSS of the process tree):

1. `cage import claude-code DIR` into a fresh ledger, then `cage report --by model --json`;
2. the same import again (incremental: nothing new to read);
3. the peer, ccusage 20.0.24 from npm: `ccusage daily --json --offline` with
   CLAUDE_CONFIG_DIR pointing at the tree (HOME moved to an empty folder so that no other
   agent's logs are read).

Both sides run `--rounds` times (default 3), interleaved in a random order, and their medians
are compared: on a shared VM the CPU time of the same work varies by a third from minute to
minute, so one run of each side says little. Per-model token totals must be equal exactly
and dollar totals within $0.01 (OK/MISMATCH printed per model). If the peer cannot run, it
says "peer unavailable: <why>" and goes on.

    python bench/ledger_import.py                 # 1,000,000 lines (about 1.3 GB on disk)
    python bench/ledger_import.py --lines 100000  # quicker
    python bench/ledger_import.py --keep DIR      # generate into DIR and keep it

Targets (issue 5): first import at most ccusage's wall time, under 200 MB resident; the
second run under a tenth of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PEER_PACKAGE = "ccusage@20.0.24"
# (model, share of responses). Prices of these are the same in genai-prices and in the
# price table ccusage bundles, so dollars can be compared.
MODELS = (
    ("claude-sonnet-4-20250514", 0.6),
    ("claude-opus-4-1-20250805", 0.1),
    ("claude-3-5-haiku-20241022", 0.3),
)
LINES_PER_SESSION = 2000
STREAM_COPY_SHARE = 0.10  # responses written again on the next line(s), usage growing
SIDECHAIN_COPY_SHARE = 0.02  # responses copied into a subagent file (isSidechain: true)
_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua refactor the parser and add a test for the edge case"
)
WORDS = tuple(_TEXT.split(" "))
ID_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# Bumped when the generated tree changes, so that --keep does not reuse an older one.
TREE_FORMAT = 2


# ---------------------------------------------------------------------------------------------
# The synthetic tree


def _assistant(
    rng: random.Random,
    *,
    session: str,
    msg_id: str,
    req_id: str,
    model: str,
    ts: str,
    usage: tuple[int, int, int, int],
    text: str,
    sidechain: bool,
    uuid: str,
) -> str:
    inp, out, cw, cr = usage
    # Built as text: json.dumps per line would make generating 1M lines slow.
    return (
        '{"parentUuid":"p-'
        + uuid
        + '","isSidechain":'
        + ("true" if sidechain else "false")
        + ',"userType":"external","cwd":"/home/dev/project","sessionId":"'
        + session
        + '","version":"2.0.14","gitBranch":"main","message":{"id":"'
        + msg_id
        + '","type":"message","role":"assistant","model":"'
        + model
        + '","content":[{"type":"text","text":"'
        + text
        + '"}],"stop_reason":"end_turn",'
        + '"stop_sequence":null,"usage":{"input_tokens":'
        + str(inp)
        + ',"cache_creation_input_tokens":'
        + str(cw)
        + ',"cache_read_input_tokens":'
        + str(cr)
        + ',"output_tokens":'
        + str(out)
        + ',"service_tier":"standard"}},"requestId":"'
        + req_id
        + '","type":"assistant","uuid":"'
        + uuid
        + '","timestamp":"'
        + ts
        + '"}\n'
    )


def _user(session: str, ts: str, text: str, uuid: str) -> str:
    return (
        '{"parentUuid":null,"isSidechain":false,"userType":"external","cwd":"/home/dev/project",'
        '"sessionId":"' + session + '","version":"2.0.14","type":"user","message":{"role":"user",'
        '"content":"' + text + '"},"uuid":"' + uuid + '","timestamp":"' + ts + '"}\n'
    )


def generate_tree(root: Path, lines: int, seed: int = 7) -> dict:
    """Write ``lines`` assistant lines under ``root/projects``; returns counts."""
    rng = random.Random(seed)
    projects = root / "projects"
    names = [m for m, _ in MODELS]
    weights = [w for _, w in MODELS]
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 160))) for _ in range(64)]
    written = responses = 0
    session_no = 0
    total_bytes = 0
    while written < lines:
        session_no += 1
        project = projects / f"-home-dev-project-{session_no % 20:02d}"
        project.mkdir(parents=True, exist_ok=True)
        session = f"5e55{session_no:04x}-0000-4000-8000-{session_no:012d}"
        main_path = project / f"{session}.jsonl"
        side_lines: list[str] = []
        day = 1 + (session_no % 28)
        with open(main_path, "w", encoding="utf-8") as main:
            in_session = 0
            while in_session < LINES_PER_SESSION and written < lines:
                responses += 1
                second = in_session * 7
                clock = f"{8 + second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
                ts = f"2025-10-{day:02d}T{clock}.{rng.randint(0, 999):03d}Z"
                model = rng.choices(names, weights)[0]
                # Random, like the API's ids: the ledger's unique index then works as it
                # does on real transcripts (counters would all land at the end of the index).
                msg_id = "msg_01" + "".join(rng.choices(ID_ALPHABET, k=22))
                req_id = "req_011C" + "".join(rng.choices(ID_ALPHABET, k=22))
                usage = [
                    rng.randint(1, 60),
                    rng.randint(20, 2000),
                    rng.choice((0, 0, rng.randint(100, 20000))),
                    rng.randint(0, 150000),
                ]
                if in_session % 5 == 0:
                    main.write(_user(session, ts, texts[responses % 64][:400], f"u{responses}"))
                copies = 1 + (rng.random() < STREAM_COPY_SHARE) * rng.randint(1, 2)
                for copy in range(copies):
                    if written >= lines:
                        break
                    grown = list(usage)
                    if copy < copies - 1:
                        grown[1] = max(
                            1, usage[1] // (copies - copy + 1)
                        )  # earlier copy: less output
                    line = _assistant(
                        rng,
                        session=session,
                        msg_id=msg_id,
                        req_id=req_id,
                        model=model,
                        ts=ts,
                        usage=tuple(grown),
                        text=texts[(responses + copy) % 64],
                        sidechain=False,
                        uuid=f"a{responses}-{copy}",
                    )
                    main.write(line)
                    total_bytes += len(line)
                    written += 1
                    in_session += 1
                if written < lines and rng.random() < SIDECHAIN_COPY_SHARE:
                    side_lines.append(
                        _assistant(
                            rng,
                            session=session,
                            msg_id=msg_id,
                            req_id=req_id,
                            model=model,
                            ts=ts,
                            usage=tuple(usage),
                            text=texts[responses % 64],
                            sidechain=True,
                            uuid=f"s{responses}",
                        )
                    )
                    written += 1
                    in_session += 1
        if side_lines:
            side = project / session / "subagents" / "agent-1.jsonl"
            side.parent.mkdir(parents=True, exist_ok=True)
            side.write_text("".join(side_lines), encoding="utf-8")
            total_bytes += sum(len(s) for s in side_lines)
    return {
        "assistant_lines": written,
        "responses": responses,
        "bytes": total_bytes,
        "format": TREE_FORMAT,
    }


# ---------------------------------------------------------------------------------------------
# Measuring


# CPU seconds (user + system, the child and what it waited for) of each measured run: on a
# shared machine wall time depends on the load, CPU time much less.
CPU_SECONDS: dict[int, float] = {}


def cpu(done: subprocess.CompletedProcess) -> float:
    """CPU seconds of a run returned by ``measure``."""
    return CPU_SECONDS.get(id(done), 0.0)


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run ``cmd``; (wall seconds, peak RSS bytes, result).

    The peak is the kernel's ``ru_maxrss`` from ``wait4`` for that child: the largest
    resident set of it or of any descendant it waited for (ccusage's launcher waits for
    its native binary), exact where sampling could miss a short peak.
    """
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def drain(stream, sink: list[bytes]) -> None:  # type: ignore[no-untyped-def]
        for chunk in iter(lambda: stream.read(65536), b""):
            sink.append(chunk)

    readers = [
        threading.Thread(target=drain, args=(proc.stdout, chunks["out"]), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, chunks["err"]), daemon=True),
    ]
    for reader in readers:
        reader.start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    for reader in readers:
        reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    done = subprocess.CompletedProcess(
        cmd, proc.returncode, b"".join(chunks["out"]).decode(), b"".join(chunks["err"]).decode()
    )
    CPU_SECONDS[id(done)] = usage.ru_utime + usage.ru_stime
    return wall, usage.ru_maxrss * 1024, done


def cage_totals(ledger: Path, env: dict[str, str]) -> tuple[dict, float, int, str, float]:
    """Per-model totals from `cage report --by model --json` (or the Ledger API as fallback)."""
    cmd = [
        sys.executable,
        "-m",
        "cage",
        "report",
        "--by",
        "model",
        "--json",
        "--ledger",
        str(ledger),
    ]
    wall, peak, done = measure(cmd, env)
    cpu_r = cpu(done)
    how = "cage report --by model --json"
    rows = None
    if done.returncode == 0:
        try:
            doc = json.loads(done.stdout)
            rows = doc if isinstance(doc, list) else doc.get("rows") or doc.get("groups")
        except ValueError:
            rows = None
    if rows is None:
        from cage.ledger import Ledger

        how = f"Ledger.report('model') (cage report failed: {done.stderr.strip()[:120]})"
        led = Ledger.open(ledger)
        try:
            rows = led.report("model")
        finally:
            led.close()
    totals = {}
    for row in rows:
        name = row.get("key") or row.get("model")
        tokens = row.get("tokens") if isinstance(row.get("tokens"), dict) else row
        totals[name] = {
            "input": int(tokens.get("input_tokens", tokens.get("input", 0))),
            "output": int(tokens.get("output_tokens", tokens.get("output", 0))),
            "cache_write": int(tokens.get("cache_write_tokens", tokens.get("cache_write", 0))),
            "cache_read": int(tokens.get("cache_read_tokens", tokens.get("cache_read", 0))),
            "cost": float(row.get("cost_usd") or 0.0),
        }
    return totals, wall, peak, how, cpu_r


def install_peer(workdir: Path) -> tuple[Path | None, str]:
    """ccusage installed under ``workdir``: (its cli.js, "") or (None, why not)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        return None, "peer unavailable: node/npm not installed"
    prefix = workdir / "peer"
    install = subprocess.run(
        ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", PEER_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    cli = prefix / "node_modules" / "ccusage" / "src" / "cli.js"
    if install.returncode != 0 or not cli.exists():
        why = (install.stderr.strip().splitlines() or ["npm install failed"])[-1]
        return None, f"peer unavailable: {why}"
    return cli, ""


def peer_totals(cli: Path, tree: Path, workdir: Path) -> tuple[dict | None, float, int, str, float]:
    """Run ccusage over the tree; (per-model totals, wall, peak RSS, note, cpu seconds)."""
    home = workdir / "peer-home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(tree),
        "TZ": "UTC",
        "NO_COLOR": "1",
    }
    wall, peak, done = measure(
        ["node", str(cli), "daily", "--json", "--offline", "--timezone", "UTC"], env
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return None, wall, peak, f"peer unavailable: ccusage failed: {why}", 0.0
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        return None, wall, peak, "peer unavailable: ccusage printed no JSON", 0.0
    totals: dict = defaultdict(
        lambda: {"input": 0, "output": 0, "cache_write": 0, "cache_read": 0, "cost": 0.0}
    )
    for day in doc.get("daily", []):
        for item in day.get("modelBreakdowns", []):
            t = totals[item["modelName"]]
            t["input"] += int(item.get("inputTokens", 0))
            t["output"] += int(item.get("outputTokens", 0))
            t["cache_write"] += int(item.get("cacheCreationTokens", 0))
            t["cache_read"] += int(item.get("cacheReadTokens", 0))
            t["cost"] += float(item.get("cost", 0.0))
    note = f"ccusage {PEER_PACKAGE.split('@')[1]} (cpu {cpu(done):.2f} s)"
    return dict(totals), wall, peak, note, cpu(done)


def mib(n: int) -> str:
    return f"{n / (1024 * 1024):,.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="assistant lines to generate")
    parser.add_argument(
        "--keep", metavar="DIR", help="generate into DIR and keep it (reused if present)"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip ccusage")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved runs of each side (medians compared)"
    )
    args = parser.parse_args()

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cage-bench-import-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tree = workdir / "claude"
    try:
        marker = workdir / "generated.json"
        if marker.exists() and (
            json.loads(marker.read_text()).get("assistant_lines") == args.lines
            and json.loads(marker.read_text()).get("format") == TREE_FORMAT
        ):
            info = json.loads(marker.read_text())
            print(
                f"reusing {tree}: {info['assistant_lines']:,} assistant lines, {mib(info['bytes'])}"
            )
        else:
            shutil.rmtree(tree, ignore_errors=True)
            t0 = time.perf_counter()
            info = generate_tree(tree, args.lines)
            marker.write_text(json.dumps(info))
            print(
                f"generated {info['assistant_lines']:,} assistant lines ({info['responses']:,} "
                f"responses), {mib(info['bytes'])} in {time.perf_counter() - t0:.1f} s"
            )

        # The machine's load changes wall times a lot: say it, and interleave the two sides.
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        ledger = workdir / "ledger.db"
        env = dict(os.environ, CAGE_LEDGER=str(ledger))
        cmd = [sys.executable, "-m", "cage", "import", "claude-code", str(tree), "--json"]
        cli, why = (None, "peer unavailable: skipped (--no-peer)")
        if not args.no_peer:
            cli, why = install_peer(workdir)
        ours: list[tuple[float, float]] = []  # (wall, cpu) of import + report, per round
        theirs: list[tuple[float, float]] = []
        order = random.Random(0)
        for round_no in range(1, args.rounds + 1):
            sides = ["cage", "peer"] if cli is not None else ["cage"]
            for side in order.sample(sides, len(sides)):
                if side == "peer":
                    peer, wall_p, peak_p, note, cpu_p = peer_totals(cli, tree, workdir)
                    if peer is None:
                        print(note)
                        return 0
                    theirs.append((wall_p, cpu_p))
                    print(
                        f"  round {round_no}: {note} daily --json --offline: "
                        f"{wall_p:7.2f} s  peak {mib(peak_p)}"
                    )
                    continue
                for suffix in ("", "-wal", "-shm"):
                    Path(str(ledger) + suffix).unlink(missing_ok=True)
                wall1, peak1, first = measure(cmd, env)
                if first.returncode != 0:
                    print(f"cage import failed (exit {first.returncode}):\n{first.stderr}")
                    return 1
                doc1 = json.loads(first.stdout)
                totals, wall_r, peak_r, how, cpu_r = cage_totals(ledger, env)
                ours.append((wall1 + wall_r, cpu(first) + cpu_r))
                print(
                    f"  round {round_no}: cage import (first): {wall1:7.2f} s  "
                    f"(cpu {cpu(first):6.2f} s)  peak {mib(peak1)}  "
                    f"imported {doc1['imported']:,}, duplicates {doc1['duplicates']:,}, "
                    f"bad lines {doc1['bad_lines']}; report by model {wall_r:.2f} s, "
                    f"peak {mib(peak_r)}"
                )
        print(f"cage report by model: {wall_r:7.2f} s  peak {mib(peak_r)}  ({how})")
        wall2, peak2, second = measure(cmd, env)
        doc2 = json.loads(second.stdout) if second.returncode == 0 else {}
        print(
            f"cage import (second): {wall2:7.2f} s  (cpu {cpu(second):6.2f} s)  peak {mib(peak2)}  "
            f"imported {doc2.get('imported')}, "
            + f"unchanged files {doc2.get('files_unchanged')}/{doc2.get('files')}"
        )
        if cli is None:
            print(why)
            return 0
        ok = True
        print(f"{'model':<30} {'tokens (in/out/cw/cr)':>48}  {'cage $':>12} {'peer $':>12}")
        for model in sorted(set(totals) | set(peer)):
            a = totals.get(model)
            b = peer.get(model)
            if a is None or b is None:
                ok = False
                print(f"{model:<30} only in {'ccusage' if a is None else 'cage'}  MISMATCH")
                continue
            same_tokens = all(
                a[k] == b[k] for k in ("input", "output", "cache_write", "cache_read")
            )
            same_cost = abs(a["cost"] - b["cost"]) <= 0.01
            ok = ok and same_tokens and same_cost
            toks = f"{a['input']}/{a['output']}/{a['cache_write']}/{a['cache_read']}"
            print(
                f"{model:<30} {toks:>48}  {a['cost']:12.4f} {b['cost']:12.4f}  "
                f"{'OK' if same_tokens and same_cost else 'MISMATCH'}"
            )
            if not same_tokens:
                peer_toks = f"{b['input']}/{b['output']}/{b['cache_write']}/{b['cache_read']}"
                print(f"{'':<30} peer tokens {peer_toks}")
        print(f"totals: {'OK' if ok else 'MISMATCH'}")
        wall_c, cpu_c = (statistics.median(x) for x in zip(*ours, strict=True))
        wall_p, cpu_p = (statistics.median(x) for x in zip(*theirs, strict=True))
        print(
            f"medians of {args.rounds} round(s): cage import + report {wall_c:.2f} s "
            f"(cpu {cpu_c:.2f} s), ccusage {wall_p:.2f} s (cpu {cpu_p:.2f} s)"
        )
        print(
            f"time ratio cage (import + report) / ccusage: {wall_c / wall_p:.2f}x "
            f"(target <= 1); second (incremental) import / ccusage: {wall2 / wall_p:.3f}x "
            "(target < 0.1)"
        )
        if cpu_p > 0:
            print(f"cpu ratio cage (import + report) / ccusage: {cpu_c / cpu_p:.2f}x")
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
