"""Process trees: real subprocesses that background, escape with setsid, double-fork and
ignore SIGTERM; each must be dead after the kill."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cage import proctree
from tests import process_trees as trees

PY = shlex.quote(sys.executable)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")


def shell(command: str, cwd: Path, *, own_session: bool = True) -> proctree.ProcessTree:
    return proctree.start(
        ["/bin/sh", "-c", command],
        own_session=own_session,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


ESCAPES = {
    "background job": (None, "sleep 300 & echo $! > pids"),
    "setsid escaper": (trees.SETSID_ESCAPER, trees.wait_for_file(f"{PY} escape.py &", "pids")),
    "double fork": (trees.DOUBLE_FORK, trees.wait_for_file(f"{PY} escape.py", "pids")),
}


@pytest.mark.parametrize(("script", "command"), ESCAPES.values(), ids=list(ESCAPES))
def test_every_process_is_dead_after_the_kill(tmp_path, script, command):
    if script is not None:
        (tmp_path / "escape.py").write_text(script)
    tree = shell(command, tmp_path)
    assert tree.wait_for_exit(20)
    assert tree.kill() >= 1
    assert tree.leader.wait() == 0
    trees.assert_dead(trees.read_pids(tmp_path / "pids"))
    trees.assert_no_zombie_children()


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(tmp_path):
    (tmp_path / "stubborn.py").write_text(trees.IGNORE_TERM)
    # The leader ignores TERM too and is still running: only SIGKILL ends it.
    tree = shell(f"trap '' TERM; {PY} stubborn.py & sleep 300", tmp_path)
    trees.wait_until_written(tmp_path / "pids")
    assert not tree.wait_for_exit(0)
    ended = tree.stop(grace_s=0.3)
    assert ended >= 2  # the stubborn child and the leader's sleep; the leader not counted
    assert tree.leader.wait() == -signal.SIGKILL
    trees.assert_dead(trees.read_pids(tmp_path / "pids"))
    trees.assert_no_zombie_children()


def test_stop_with_sigterm_is_enough_for_a_tree_that_obeys(tmp_path):
    tree = shell("sleep 300 & echo $! > pids; wait", tmp_path)
    trees.wait_until_written(tmp_path / "pids")
    assert tree.stop(grace_s=30) == 1
    assert tree.leader.wait() == -signal.SIGTERM
    trees.assert_dead(trees.read_pids(tmp_path / "pids"))


def test_hurry_cuts_the_grace_period_short(tmp_path):
    (tmp_path / "stubborn.py").write_text(trees.IGNORE_TERM)
    tree = shell(f"{PY} stubborn.py & wait", tmp_path)
    trees.wait_until_written(tmp_path / "pids")
    hurry = threading.Event()
    hurry.set()
    started = time.monotonic()
    tree.stop(grace_s=300, hurry=hurry)
    assert time.monotonic() - started < 200  # bound, not a benchmark: not the 300 s grace
    tree.leader.wait()
    trees.assert_dead(trees.read_pids(tmp_path / "pids"))


def test_wait_for_exit_does_not_reap_the_leader(tmp_path):
    tree = shell("exit 3", tmp_path)
    assert tree.wait_for_exit(20)
    assert psutil.Process(tree.leader.pid).status() == psutil.STATUS_ZOMBIE
    assert tree.leader.returncode is None
    assert tree.kill() == 0
    assert tree.leader.wait() == 3


def test_wait_for_exit_times_out_while_the_leader_runs(tmp_path):
    tree = proctree.start(["sleep", "300"], own_session=True, cwd=tmp_path)
    assert tree.wait_for_exit(0) is False
    assert tree.wait_for_exit(0.05) is False
    assert tree.kill() == 0  # the leader itself is not a leftover
    assert tree.leader.wait() == -signal.SIGKILL


@pytest.mark.parametrize("own_session", [True, False])
def test_leader_gets_its_own_group_and_session_only_when_asked(tmp_path, own_session):
    tree = shell("sleep 300", tmp_path, own_session=own_session)
    try:
        pid = tree.leader.pid
        assert os.getpgid(pid) == pid
        assert (os.getsid(pid) == pid) is own_session
        if not own_session:
            assert os.getsid(pid) == os.getsid(0)  # cage's session: it can have the terminal
    finally:
        tree.kill()
        tree.leader.wait()


def test_processes_cage_started_before_are_left_alone(tmp_path):
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        tree = shell("sleep 300 & echo started", tmp_path)
        assert tree.wait_for_exit(20)
        assert tree.kill() == 1
        assert tree.leader.wait() == 0
        assert bystander.poll() is None
        assert bystander.pid not in {p.pid for p in tree.processes()}
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc children lists")
def test_the_quick_look_finds_a_tree_empty_only_when_it_is(tmp_path):
    # The usual end (the leader alone, exited) is found from the kernel's children lists;
    # anything else left (an escaper re-parented to cage, a bystander with a reused pid
    # aside) sends kill() through the whole process table.
    tree = shell("true", tmp_path)
    assert tree.wait_for_exit(20)
    assert tree._only_the_dead_leader()
    assert tree.kill() == 0
    tree.leader.wait()

    (tmp_path / "escape.py").write_text(trees.SETSID_ESCAPER)
    tree = shell(trees.wait_for_file(f"{PY} escape.py &", "pids"), tmp_path)
    assert tree.wait_for_exit(20)
    assert not tree._only_the_dead_leader()
    assert tree.kill() >= 1
    tree.leader.wait()
    trees.assert_dead(trees.read_pids(tmp_path / "pids"))

    bystander = subprocess.Popen(["sleep", "300"])  # started before: known, not the tree's
    try:
        tree = shell("true", tmp_path)
        assert tree.wait_for_exit(20)
        assert tree._only_the_dead_leader()
        running = shell("sleep 300", tmp_path)  # not exited: never "only the dead leader"
        assert not running._only_the_dead_leader()
        running.kill()
        running.leader.wait()
    finally:
        bystander.kill()
        bystander.wait()
        tree.kill()
        tree.leader.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_prepare_makes_cage_subreaper_and_non_dumpable():
    import ctypes

    assert proctree.prepare_cage_process() is True
    libc = ctypes.CDLL(None)
    assert libc.prctl(proctree.PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    flag = ctypes.c_int(0)
    assert libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    assert flag.value == 1


# --- interrupts -----------------------------------------------------------------------


def test_interrupt_during_start_is_held_until_armed():
    with proctree.Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)  # "during Popen": not raised here
        assert interrupts.pending
        with pytest.raises(KeyboardInterrupt):
            interrupts.arm()
        assert not interrupts.pending


def test_interrupt_while_armed_is_raised_at_once():
    with proctree.Interrupts() as interrupts:
        interrupts.arm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler runs at the latest here


def test_interrupt_held_during_cleanup_is_raised_at_the_end_unless_taken():
    with pytest.raises(KeyboardInterrupt), proctree.Interrupts() as interrupts:
        interrupts.arm()
        interrupts.disarm()
        os.kill(os.getpid(), signal.SIGTERM)
    with proctree.Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.take_held() is True
    assert interrupts.take_held() is False


def test_hurry_is_set_only_by_a_signal_after_the_tree_was_armed():
    hurry = threading.Event()
    with proctree.Interrupts(hurry) as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)  # during the start: held, no hurry
        assert not hurry.is_set()
        with pytest.raises(KeyboardInterrupt):
            interrupts.arm()
        os.kill(os.getpid(), signal.SIGTERM)  # during the cleanup: held, and hurry
        assert hurry.is_set()
        assert interrupts.take_held()


def test_handlers_are_restored_and_an_ignored_signal_stays_ignored():
    before = {sig: signal.getsignal(sig) for sig in proctree.Interrupts.SIGNALS}
    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with proctree.Interrupts() as interrupts:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not interrupts.pending
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous_hup)
    assert {sig: signal.getsignal(sig) for sig in proctree.Interrupts.SIGNALS} == before
