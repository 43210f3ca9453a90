"""Start, watch and kill a process tree: child subreaper, process group, every descendant
including setsid escapers.

A tree is one program cage starts (the *leader*: a verify command's shell, a mission's
agent) and everything it starts in turn. ``start`` runs the leader in its own process
group, in a session of its own or in cage's (so that it can be given the terminal). On
Linux cage first makes itself the *child subreaper* (``prepare_cage_process``): processes
that leave the group with ``setsid`` or by double-forking are re-parented to cage instead
of init, where cleanup still finds them. The tree is then the leader, cage's children that
did not exist before the leader started, and all their descendants; without a subreaper
(not Linux), members of the leader's process group or session found anywhere.

The leader's exit status is left for ``Popen`` to collect (``tree.leader.wait()``) after
cleanup: until then its pid, and so its group and session id, cannot be reused, and
``os.killpg`` reaches no stranger. The zombies of the other processes are reaped here.

Limits: processes that another service starts on the tree's behalf (``docker run -d``,
``systemd-run``) are not its descendants and are out of reach. Cleanup tells escapers by
their being cage's *new* children, so a process watches one tree at a time
(``ONE_TREE_AT_A_TIME``).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

PR_SET_CHILD_SUBREAPER = 36
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
KILL_DEADLINE_S = 5.0  # SIGKILL rounds give up after this (a process stuck in the kernel)

# Cleanup finds a tree's escapers among cage's new children: two trees watched at once
# from two threads would take each other's processes for their own.
ONE_TREE_AT_A_TIME = threading.Lock()

Identity = tuple[int, float]  # (pid, create time): a pid alone may be reused

_subreaper: bool | None = None


def prepare_cage_process() -> bool:
    """Once per process, on Linux: make cage the child subreaper, so orphans of a tree are
    re-parented to cage, not init, and cleanup finds setsid escapers and double forks; and
    mark cage non-dumpable, so a program running as the same user cannot read cage's
    environment (CI tokens, the attestation key) or memory through ``/proc/<pid>/environ``,
    ``/proc/<pid>/mem`` or ptrace. Returns whether cage is the subreaper; elsewhere it is
    not, and cleanup falls back on the leader's process group and session."""
    global _subreaper
    if _subreaper is None:
        _subreaper = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
                libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
            except (OSError, AttributeError):
                pass
    return _subreaper


def start(args: Sequence[str], *, own_session: bool, **popen_kwargs: Any) -> ProcessTree:
    """Start ``args`` as the leader of a new tree and return the tree.

    ``own_session=True`` runs the leader in a new session (``setsid``): no controlling
    terminal, nothing of it can read or signal through the user's terminal (verify
    commands). ``own_session=False`` gives it a new process group in cage's session, so
    that cage can hand it the terminal with ``tcsetpgrp`` (an interactive agent). Either
    way the leader's pid is its group id. ``popen_kwargs`` go to ``subprocess.Popen``
    (``cwd``, ``env``, ``stdin``, ``stdout``...). Raises OSError when it cannot start.
    """
    prepare_cage_process()
    known = _cage_children()
    if own_session:
        popen_kwargs["start_new_session"] = True
    elif sys.version_info >= (3, 11):
        popen_kwargs["process_group"] = 0
    else:  # pragma: no cover - Python 3.10
        popen_kwargs["preexec_fn"] = os.setpgrp
    leader = subprocess.Popen(list(args), **popen_kwargs)
    return ProcessTree(leader, known)


def _identity(proc: psutil.Process) -> Identity | None:
    import psutil

    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def _cage_children() -> frozenset[Identity]:
    import psutil

    pids = _child_pids()
    if pids is None:
        return frozenset(i for i in map(_identity, psutil.Process().children()) if i is not None)
    return frozenset(_identities_of(pids))


def _identities_of(pids: set[int]) -> set[Identity]:
    """The identity of each of ``pids`` that still exists (zombies included)."""
    import psutil

    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.add((pid, psutil.Process(pid).create_time()))
    return found


def _child_pids(pid: int | str = "self") -> set[int] | None:
    """The pids of a process's children as the kernel lists them (Linux
    ``/proc/<pid>/task/*/children``: one small read per thread, where finding them in the
    process table reads every process); None where the list is not available."""
    task_dir = f"/proc/{pid}/task"
    try:
        tasks = os.listdir(task_dir)
    except OSError:
        return None
    found: set[int] = set()
    for task in tasks:
        try:
            with open(f"{task_dir}/{task}/children", "rb") as handle:
                found.update(int(p) for p in handle.read().split())
        except FileNotFoundError:
            continue  # the thread has ended
        except (OSError, ValueError):
            return None  # no such file on this kernel (CONFIG_PROC_CHILDREN off)
    return found


class ProcessTree:
    """A started leader (``leader``, its ``Popen``) and the processes it started.

    ``known_children`` are cage's children from before the leader started: they and their
    descendants are never part of the tree. Nothing here reaps the leader.
    """

    def __init__(self, leader: subprocess.Popen, known_children: frozenset[Identity]) -> None:
        self.leader = leader
        self.known_children = known_children

    def processes(self) -> list[psutil.Process]:
        """Every process of the tree that still exists (zombies included): cage's children
        that did not exist before the leader (the leader and the orphans re-parented to
        cage), all their descendants, and without a subreaper the members of the leader's
        process group or session found elsewhere (orphans went to init)."""
        import psutil

        # One pass over the process table (a per-process children() call rescans the
        # whole table each time, quadratic when hundreds of orphans land on cage at once).
        me = os.getpid()
        children_of: dict[int, list[psutil.Process]] = {}
        everyone: list[psutil.Process] = []
        for proc in psutil.process_iter(["ppid"]):
            everyone.append(proc)
            children_of.setdefault(proc.info["ppid"], []).append(proc)
        found: dict[int, psutil.Process] = {}
        stack = [
            child
            for child in children_of.get(me, [])
            if (ident := _identity(child)) is not None and ident not in self.known_children
        ]
        while stack:
            proc = stack.pop()
            if proc.pid not in found:
                found[proc.pid] = proc
                stack.extend(children_of.get(proc.pid, []))
        if not _subreaper:
            leader = self.leader.pid
            for proc in everyone:
                if proc.pid in found or proc.pid == me:
                    continue
                with contextlib.suppress(OSError):
                    if leader in (os.getpgid(proc.pid), os.getsid(proc.pid)):
                        found[proc.pid] = proc
        return list(found.values())

    def wait_for_exit(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` (0: just look) until the leader exits, without reaping
        it (its pid must stay reserved while its group is signalled). True when it has
        exited, False on timeout."""
        deadline = time.monotonic() + timeout_s
        pidfd = -1
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(self.leader.pid)
        if pidfd >= 0:
            try:
                import select

                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                while True:
                    remaining = deadline - time.monotonic()
                    if poller.poll(max(0, math.ceil(remaining * 1000))):
                        return True
                    if remaining <= 0:
                        return False
            finally:
                os.close(pidfd)
        delay = 0.001
        while True:
            remaining = deadline - time.monotonic()
            if hasattr(os, "waitid"):
                flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
                if os.waitid(os.P_PID, self.leader.pid, flags):
                    return True
            elif self.leader.poll() is not None:  # no waitid: reaping is the best we can do
                return True
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def kill(self, ended: set[Identity] | None = None) -> int:
        """SIGKILL the whole tree in rounds until nothing of it is alive or unreaped (a
        process forking during a round is found in the next one; zombies of a dying parent
        re-parent to cage and are reaped), for at most ``KILL_DEADLINE_S``. Returns how many
        processes other than the leader were ended, counting those already in ``ended``."""
        import psutil

        ended = set() if ended is None else ended
        leader = self.leader.pid
        if self._only_the_dead_leader():
            return len(ended)
        deadline = time.monotonic() + KILL_DEADLINE_S
        while True:
            procs = self.processes()
            live = self._live(procs)
            others = [p for p in procs if p.pid != leader]
            if not live and not others:
                break
            self._signal(live, signal.SIGKILL)
            for proc in live:
                ident = _identity(proc)
                if ident is not None and proc.pid != leader:
                    ended.add(ident)
            if time.monotonic() > deadline:
                break
            waiting = [p for p in live if p.pid != leader]
            if waiting:
                psutil.wait_procs(waiting, timeout=0.2)  # reaps those that are our children
            else:
                time.sleep(0.005)  # zombies whose parent is dying re-parent to cage shortly
        return len(ended)

    def _only_the_dead_leader(self) -> bool:
        """True when, with cage the child subreaper, the tree is just its exited leader: the
        leader is cage's only new child and has no children left. (Every process the leader
        started either has a live parent in the tree or was re-parented to cage, so it would
        be one of cage's new children.) The usual end of a verify command, found without
        reading the whole process table."""
        if not _subreaper or not hasattr(os, "waitid"):
            return False
        leader = self.leader.pid
        try:
            if not os.waitid(os.P_PID, leader, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return False  # still running
        except ChildProcessError:
            return False
        mine = _child_pids()
        if mine is None or leader not in mine:
            return False
        # The others must all be known children (not new processes that got a known child's
        # pid); one that cannot be looked at counts against.
        others = mine - {leader}
        known = _identities_of(others) & self.known_children
        return len(known) == len(others) and _child_pids(leader) == set()

    def stop(self, grace_s: float, hurry: threading.Event | None = None) -> int:
        """SIGTERM the whole tree, give it up to ``grace_s`` to exit (cut short when
        ``hurry`` is set), then ``kill`` what is left. Returns how many processes other than
        the leader were ended, by SIGTERM or SIGKILL."""
        live = self._live(self.processes())
        leader = self.leader.pid
        ended = {i for i in map(_identity, live) if i is not None and i[0] != leader}
        if live:
            self._signal(live, signal.SIGTERM)
        grace_end = time.monotonic() + grace_s
        while time.monotonic() < grace_end and not (hurry is not None and hurry.is_set()):
            if not self._live(self.processes()):
                break
            time.sleep(0.05)
        return self.kill(ended)

    def _signal(self, procs: list[psutil.Process], sig: int) -> None:
        import psutil

        with contextlib.suppress(OSError):
            os.killpg(self.leader.pid, sig)  # the leader is unreaped: its group id is ours
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)  # psutil checks the create time: no reused pid

    def _live(self, procs: list[psutil.Process]) -> list[psutil.Process]:
        """Reap the zombies among ``procs`` that are cage's children (never the leader,
        whose status ``Popen`` collects) and return the processes still alive."""
        import psutil

        live = []
        for proc in procs:
            try:
                zombie = proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                continue
            if not zombie:
                live.append(proc)
            elif proc.pid != self.leader.pid:
                with contextlib.suppress(OSError):  # ChildProcessError: not ours (yet)
                    os.waitpid(proc.pid, os.WNOHANG)
        return live


class Interrupts:
    """SIGINT, SIGTERM and SIGHUP while a tree runs, raised as KeyboardInterrupt only where
    the caller can clean up.

    SIGTERM (a cancelled CI job) and SIGHUP (a closed terminal) are handled like Ctrl-C, so
    the tree is still stopped. A signal is raised at once only while armed (``arm``), that
    is where the caller's cleanup handler is in place; one arriving while the tree is being
    started or cleaned up is held (a signal inside ``Popen`` would leave the started tree to
    no one) and raised when the ``with`` block ends, unless the caller takes it
    (``take_held``). ``hurry``, when given, is set by a signal arriving while disarmed after
    the first ``arm``: during cleanup, so the caller can cut a grace period short. Handlers
    can only be set in the main thread; elsewhere this does nothing. A signal the process
    ignores stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, hurry: threading.Event | None = None) -> None:
        self.armed = False
        self.pending = False
        self._hurry = hurry
        self._was_armed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:
                    self._previous[sig] = previous
                    signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.armed:
            self.armed = False  # one interrupt: more during the cleanup are held
            raise KeyboardInterrupt
        self.pending = True
        if self._was_armed and self._hurry is not None:
            self._hurry.set()

    def arm(self) -> None:
        """From here on an interrupt is raised at once (a held one too)."""
        self._was_armed = True
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
        self.armed = True

    def disarm(self) -> None:
        """From here on interrupts are held until the block ends."""
        self.armed = False

    def take_held(self) -> bool:
        """Whether an interrupt is held; it is then the caller's, not raised at the end."""
        held, self.pending = self.pending, False
        return held

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.armed = False
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        if self.pending and exc_type is None:
            raise KeyboardInterrupt
