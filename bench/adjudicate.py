"""Adjudication overhead against the git floor, measured in the same run.

The floor is the least git work a correct replay needs (DESIGN.md, "Performance budgets"):
one `git diff --raw`, one read of every changed blob (one `cat-file --batch`), one detached
worktree of base, switched to head and cleaned between the two runs of the verify command,
then removed. Both sides run the same trivial verify command (fails at base, passes at head),
in the system temporary directory, on the same file system.

    python bench/adjudicate.py                  # N=20,000 files, K = 1, 100, 1,000
    python bench/adjudicate.py --files 2000 --changes 1,100 --repeat 3

Prints one line per K: floor and cage medians and their ratio (target: <= 1.25);
`--verbose` also prints every pair and cage's own phase timings.

The repository is packed (as a clone or a CI checkout has it) and its automatic gc is off:
a commit of 20,000 loose objects otherwise starts `git gc --auto`, which packs them in the
background while runs are timed. Each pair runs in a random order, after a sync. On a
small VM the time of the same worktree add still swings 2x from run to run (the previous
run deleted 20,000 files), so medians of many pairs are needed (default 9); the ratio of
the fastest runs is printed beside it.

On ext4 without a journal (some VMs' root file system), every file creation skips the
inodes deleted in the last minute or more (the kernel's `recently_deleted()`), so the same
add takes 0.5 s to 6 s depending on the runs before it: the bench says so, and a journaled
file system or tmpfs gives comparable figures (`TMPDIR=/dev/shm python bench/adjudicate.py`).

cage runs as installed: with its bytecode cached (pip compiles it at install time). A
PYTHONDONTWRITEBYTECODE in the environment would make every run compile cage's sources
again (~60 ms of CPU), so the runs get a private PYTHONPYCACHEPREFIX under the bench's
temporary directory instead, filled by one untimed warm-up run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

POLICY = """\
version: v1
mission:
  name: bench
budget:
  mission_hard_limit_usd: 5
verification:
  command: "grep -rqs CAGE_BENCH_FIXED src"
  evidence: exit-code
  allow: ["src/**"]
"""
VERIFY = "grep -rqs CAGE_BENCH_FIXED src"
GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def git(repo: Path, *args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", *args], cwd=repo, env=GIT_ENV, input=input, capture_output=True, check=True
    ).stdout


def build_repo(root: Path, files: int) -> tuple[Path, str]:
    """A repository with `files` small Python files under src/, committed once (fast import)."""
    repo = root / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    # No `git gc --auto` in the background (a commit of 20,000 loose objects starts one,
    # which then packs them while the runs are timed); the bench packs the objects itself,
    # as a clone or a CI checkout has them.
    git(repo, "config", "gc.auto", "0")
    (repo / ".runcap").mkdir()
    (repo / ".runcap" / "mission.yaml").write_text(POLICY)
    per_dir = 200
    for i in range(files):
        d = repo / "src" / f"pkg{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        (d / f"mod{i % per_dir:03d}.py").write_text(
            f"VALUE_{i} = {i}\n\n\ndef f{i}(x):\n    return x + {i}\n"
        )
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    git(repo, "repack", "-adq")
    return repo, git(repo, "rev-parse", "HEAD").decode().strip()


def make_head(repo: Path, base: str, changes: int) -> str:
    """A head commit changing `changes` files; the first carries the fix the command greps for."""
    git(repo, "checkout", "-q", "--detach", base)
    listed = git(repo, "ls-files", "-z", "src").split(b"\0")
    paths = [p.decode() for p in listed if p][:changes]
    for i, rel in enumerate(paths):
        with open(repo / rel, "a") as fh:
            fh.write("# CAGE_BENCH_FIXED\n" if i == 0 else "# changed by the bench\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"head with {changes} changes")
    git(repo, "repack", "-adq")
    return git(repo, "rev-parse", "HEAD").decode().strip()


def floor(repo: Path, base: str, head: str) -> float:
    """The least git work a correct replay needs, with the same verify command runs."""
    start = time.perf_counter()
    raw = git(repo, "diff", "--raw", "-z", "--no-renames", "--abbrev=40", base, head)
    fields = raw.split(b"\0")
    shas = [f.split()[3] for f in fields[0::2] if f.startswith(b":")]
    git(repo, "cat-file", "--batch", input=b"".join(s + b"\n" for s in shas))
    wt = Path(tempfile.gettempdir()) / f"cage-bench-floor-{uuid.uuid4().hex}"
    git(repo, "-c", "checkout.workers=0", "worktree", "add", "--detach", "--quiet", str(wt), base)
    try:
        base_rc = subprocess.run(["sh", "-c", VERIFY], cwd=wt, check=False).returncode
        git(wt, "-c", "checkout.workers=0", "checkout", "--quiet", "--detach", "--force", head)
        git(wt, "clean", "-ffdxq")
        head_rc = subprocess.run(["sh", "-c", VERIFY], cwd=wt, check=False).returncode
    finally:
        git(repo, "worktree", "remove", "--force", str(wt))
    assert base_rc != 0 and head_rc == 0, "verify command must fail at base and pass at head"
    return time.perf_counter() - start


def unjournaled_ext4(path: str) -> str | None:
    """The device when ``path`` is on ext4 without a journal (Linux), else None."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    real = os.path.realpath(path)
    inside = [m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")]
    if not inside:
        return None
    device, _, fstype = max(inside, key=lambda m: len(m[1]))
    journal = Path("/sys/fs/ext4", os.path.basename(device), "journal_task")
    with contextlib.suppress(OSError):
        if fstype == "ext4" and journal.read_text().strip() == "<none>":
            return device
    return None


def cage_env(pycache: Path) -> dict[str, str]:
    """GIT_ENV, with cage's bytecode cached in ``pycache`` (as an installed cage has it)."""
    env = {k: v for k, v in GIT_ENV.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def cage_run(repo: Path, base: str, head: str, env: dict[str, str]) -> tuple[float, dict]:
    """Wall time of `cage ci --mode adjudicate` and cage's own timings; the verdict must be
    PASS."""
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cage",
            "ci",
            "--mode",
            "adjudicate",
            "--base",
            base,
            "--head",
            head,
            "--json",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(
            f"cage did not PASS (exit {done.returncode}):\n"
            f"{done.stdout.decode()}\n{done.stderr.decode()}"
        )
    return elapsed, json.loads(done.stdout)["timings"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--changes", default="1,100,1000", help="comma-separated K values")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--verbose", action="store_true", help="print every pair of runs")
    args = parser.parse_args()
    device = unjournaled_ext4(tempfile.gettempdir())
    if device:
        print(
            f"warning: {tempfile.gettempdir()} is on ext4 without a journal ({device}): file "
            "creation there slows down for a minute after many deletions, so each run's "
            "time depends on the runs before it; set TMPDIR to a journaled file system or "
            "tmpfs for comparable figures"
        )
    root = Path(tempfile.mkdtemp(prefix="cage-bench-"))
    try:
        t0 = time.perf_counter()
        repo, base = build_repo(root, args.files)
        print(f"repository: {args.files} files, built in {time.perf_counter() - t0:.1f}s")
        worst = 0.0
        env = cage_env(root / "pycache")
        for n, k in enumerate(int(x) for x in args.changes.split(",")):
            head = make_head(repo, base, k)
            os.sync()  # the set-up's writes must not land on either side's timing
            if n == 0:
                cage_run(repo, base, head, env)  # warm-up: fills the bytecode cache
            floors, cages = [], []
            # Interleaved, so drift hits both sides alike, and in a random order within each
            # pair: file-system work a run leaves behind (deleting 20,000 files) lands on
            # whichever runs next, so a fixed order would charge it to one side.
            order = random.Random(k)
            for _ in range(args.repeat):
                times = {}
                for side in order.sample(("floor", "cage"), 2):
                    os.sync()  # neither side pays for the other's deferred writeback
                    if side == "floor":
                        times[side] = floor(repo, base, head)
                    else:
                        times[side], timings = cage_run(repo, base, head, env)
                floors.append(times["floor"])
                cages.append(times["cage"])
                if args.verbose:
                    phases = " ".join(f"{k[:-2]} {v * 1000:.0f}" for k, v in timings.items())
                    f_ms, c_ms = times["floor"] * 1000, times["cage"] * 1000
                    print(f"  floor {f_ms:.0f} ms, cage {c_ms:.0f} ms ({phases})")
            f, c = statistics.median(floors), statistics.median(cages)
            worst = max(worst, c / f)
            print(
                f"K={k}: floor {f * 1000:.0f} ms, cage {c * 1000:.0f} ms, "
                f"ratio {c / f:.2f}x (target <= 1.25x); "
                f"fastest runs {min(floors) * 1000:.0f} / {min(cages) * 1000:.0f} ms, "
                f"{min(cages) / min(floors):.2f}x"
            )
        print(f"worst ratio: {worst:.2f}x {'OK' if worst <= 1.25 else 'OVER BUDGET'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
