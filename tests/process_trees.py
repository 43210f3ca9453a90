"""Process trees that try to outlive their leader, and the checks that they did not: shared
by tests/test_proctree.py (the module) and tests/test_replay.py (verify commands)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

# Leaves its session, records its pid, sleeps.
SETSID_ESCAPER = """
import os, time
os.setsid()
open("pids", "w").write(str(os.getpid()))
time.sleep(300)
"""

# A daemon: forks, leaves the session, forks again; the middle process exits.
DOUBLE_FORK = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open("pids", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
    os._exit(0)  # the middle process exits: the grandchild is orphaned
os.wait()
"""

# Ignores SIGTERM: only SIGKILL ends it. Appends its pid, so several can share the file.
IGNORE_TERM = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open("pids", "a") as f:
    f.write(f"{os.getpid()} ")
time.sleep(60)
"""


def wait_for_file(command: str, pidfile: str) -> str:
    """Shell text: run ``command`` then block until ``pidfile`` has content, so the main
    shell exits only after the escaper recorded its pid."""
    return f"{command}\nwhile [ ! -s {pidfile} ]; do sleep 0.01; done\n"


def wait_until_written(path: Path) -> None:
    """Block until ``path`` has content (a process of the tree recorded its pid)."""
    deadline = time.monotonic() + 20
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"nothing wrote {path}"
        time.sleep(0.01)


def read_pids(path: Path) -> list[int]:
    """The pids written to ``path``, separated by white space."""
    return [int(word) for word in path.read_text().split()]


def assert_dead(pids: list[int]) -> None:
    """Each of ``pids`` is gone from the process table (a zombie would be listed)."""
    assert pids, "the command recorded no pid"
    for pid in pids:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            continue
        raise AssertionError(f"process {pid} survived the command (status {status})")


def assert_no_zombie_children() -> None:
    """Every child of this process that ended has been reaped."""
    zombies = [
        child.pid for child in psutil.Process().children() if child.status() == psutil.STATUS_ZOMBIE
    ]
    assert zombies == []
