"""`cage mission run`: one agent task under the mission policy, metered, stopped at its
limits, snapshotted, adjudicated like CI, and written down as a receipt.

The steps, in order:

1. the base is the commit checked out (``HEAD``); a dirty working tree is refused, since
   pre-existing changes would be judged as the agent's (``--allow-dirty`` accepts that);
2. the policy is the base commit's ``.runcap/mission.yaml`` (what CI reads), or ``--policy``;
3. a metering proxy (``cage.proxy``) starts on a free local port with the policy's cap and
   call limit; the agent gets ``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL`` and
   ``CAGE_MISSION_ID``, never ``CAGE_ATTEST_KEY`` (issue 8: the key the agent must not hold);
4. the agent runs in its own process group; at ``max_runtime_minutes``, when the budget is
   spent, or on Ctrl-C / SIGTERM it is stopped: SIGTERM to its whole tree, a grace period,
   then SIGKILL. Escapers (``setsid``, double forks) are found because cage is the child
   subreaper on Linux: orphans are re-parented to cage, not init (``cage.proctree``, the
   code the CI replay stops verify commands with);
5. the agent's result (its commits and its uncommitted changes) becomes a commit object
   made with a temporary index and ``git commit-tree``, kept by ``refs/cage/missions/<id>``;
   the user's branch, index and working tree are not touched;
6. base..snapshot is adjudicated by ``cage.adjudicate.adjudicate`` (the CI code), then the
   mission's own facts are added: budget spent, runtime exceeded, interrupted;
7. the receipt is written atomically to ``.runcap/outcomes/<id>/receipt.json``.

Decisions (docs/missions.md explains them to users):

- Stopping reasons decide before the change is judged: ``budget_exceeded``,
  ``runtime_exceeded`` and ``mission_interrupted`` give ``BLOCKED`` whatever the
  adjudication says (a mission that ran out of its mandate is not a finished outcome).
- A non-zero agent exit on its own does not block: the verdict judges the change, exactly
  as CI will, and the exit status is recorded (reason ``agent_exit_nonzero``, informational).
- Ctrl-C skips the replay (the user wants out) but still stops the agent, snapshots its work
  and writes the receipt; the exit status is then 130, the shell's code for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cage import outcome
from cage.errors import CageError, GitError, PolicyError, ReceiptError, UsageError

SNAPSHOT_REF_PREFIX = "refs/cage/missions/"
DEFAULT_GRACE_S = 5.0
POLL_S = 0.2
EXIT_INTERRUPTED = 130

# Variables the agent must never see: the attestation key signs spend statements the agent
# could otherwise forge (issue 8). Matched as prefixes, so CAGE_ATTEST_KEY_FILE goes too.
HIDDEN_FROM_AGENT = ("CAGE_ATTEST_KEY",)

# Reason codes of the mission itself (the adjudication adds its own, see cage.adjudicate).
MISSION_REASONS: dict[str, str] = {
    "budget_exceeded": "the budget cap or call limit was reached; the proxy refused calls "
    "and the agent was stopped",
    "runtime_exceeded": "the agent ran past max_runtime_minutes and was stopped",
    "mission_interrupted": "the mission was interrupted (Ctrl-C or SIGTERM); not replayed",
    "snapshot_failed": "cage could not record the agent's result as a commit",
    "agent_exit_nonzero": "the agent exited with a non-zero status (recorded, not decisive)",
}
_BLOCKING_MISSION_REASONS = (
    "mission_interrupted",
    "budget_exceeded",
    "runtime_exceeded",
    "snapshot_failed",
)


@dataclass
class MissionOptions:
    """Everything ``run_mission`` needs; the CLI fills it from its arguments."""

    argv: list[str]
    repo: str = "."
    policy_path: str | None = None
    mission_id: str | None = None
    allow_dirty: bool = False
    grace_s: float = DEFAULT_GRACE_S
    ledger: str | None = None
    upstream_openai: str | None = None
    upstream_anthropic: str | None = None
    mock: bool = False
    attest_key_file: str | None = None  # else $CAGE_ATTEST_KEY; the agent never gets either
    agent_stdout_to_stderr: bool = False  # --json: stdout holds one JSON document only
    progress: Callable[[str], None] | None = None


@dataclass
class MissionResult:
    """The receipt written, where, and the exit status for the command."""

    receipt: dict[str, Any]
    path: Path
    exit_code: int
    warnings: list[str] = field(default_factory=list)


def new_mission_id() -> str:
    """A fresh mission id: UTC timestamp plus 6 random hex digits (sortable, unique)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _say(options: MissionOptions, message: str) -> None:
    if options.progress is not None:
        options.progress(message)


# ---------------------------------------------------------------------------------------
# The agent's processes


class _Terminal:
    """Hands the controlling terminal to the agent's process group while it runs, so an
    interactive agent can read it and gets Ctrl-C itself; takes it back (and restores the
    terminal's modes, which a killed full-screen agent leaves raw) afterwards."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.attrs: Any = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = sys.stdin.fileno()
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                self.fd = fd
                self.attrs = termios.tcgetattr(fd)

    def give(self, pgid: int) -> None:
        if self.fd is None:
            return
        self._set_foreground(pgid)
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGCONT)  # in case it read the terminal before it was its

    def take_back(self) -> None:
        if self.fd is None:
            return
        self._set_foreground(os.getpgrp())
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(self.fd, termios.TCSANOW, self.attrs)

    def _set_foreground(self, pgid: int) -> None:
        assert self.fd is not None
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # we are in the background
        try:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(self.fd, pgid)
        finally:
            signal.signal(signal.SIGTTOU, previous)


@contextlib.contextmanager
def _shielded(hurry: threading.Event) -> Iterator[None]:
    """Cleanup that must finish (stopping the agent, the snapshot, the receipt): Ctrl-C and
    SIGTERM only set ``hurry``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in saved:
        signal.signal(s, lambda signum, frame: hurry.set())
    try:
        yield
    finally:
        for s, h in saved.items():
            # getsignal() gives None for a handler installed outside Python: restore the default.
            signal.signal(s, signal.SIG_DFL if h is None else h)


def agent_env(base_env: dict[str, str], proxy_url: str, mission_id: str) -> dict[str, str]:
    """The agent's environment: the caller's (API keys pass through), the proxy's base
    URLs and the mission id set, the attestation key removed, the proxy exempt from any
    HTTP(S)_PROXY the user has."""
    env = {k: v for k, v in base_env.items() if not k.upper().startswith(HIDDEN_FROM_AGENT)}
    env["OPENAI_BASE_URL"] = proxy_url + "/v1"
    env["ANTHROPIC_BASE_URL"] = proxy_url
    env["CAGE_MISSION_ID"] = mission_id
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        for host in ("127.0.0.1", "localhost"):
            if host not in hosts:
                hosts.append(host)
        env[name] = ",".join(hosts)
    return env


@dataclass
class AgentRun:
    """How the agent's run ended."""

    exit_code: int | None
    stopped_by: str | None  # None | "runtime" | "budget" | "interrupt"
    processes_stopped: int
    runtime_s: float


def run_agent(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str],
    max_runtime_s: float | None,
    budget_exhausted: Callable[[], bool],
    grace_s: float,
    stdout_to_stderr: bool = False,
) -> AgentRun:
    """Run the agent in its own process group and wait for it, stopping it (SIGTERM to its
    whole tree, ``grace_s``, SIGKILL) at ``max_runtime_s``, when ``budget_exhausted()``
    turns true, or on Ctrl-C / SIGTERM / SIGHUP. Leftover processes of an agent that exited
    by itself are stopped the same way. Raises UsageError when the program cannot start."""
    from cage import proctree

    terminal = _Terminal()
    hurry = threading.Event()
    stopped_by: str | None = None
    # Until armed, an interrupt is held: one during the start would leave the agent to no one.
    with proctree.ONE_TREE_AT_A_TIME, proctree.Interrupts(hurry) as interrupts:
        started = time.monotonic()
        try:
            # Its own process group in cage's session, so that it can have the terminal.
            tree = proctree.start(
                argv,
                own_session=False,
                cwd=cwd,
                env=env,
                stdout=sys.stderr.fileno() if stdout_to_stderr else None,
            )
        except OSError as exc:
            raise UsageError(
                f"cannot start the agent {argv[0]!r}: {exc.strerror}; check the command after "
                "`--` (is it installed and on PATH?)"
            ) from None
        try:
            terminal.give(tree.leader.pid)
            interrupts.arm()
            deadline = None if max_runtime_s is None else started + max_runtime_s
            while True:
                wait = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
                if tree.wait_for_exit(max(0.0, wait)):
                    break
                if budget_exhausted():
                    stopped_by = "budget"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    stopped_by = "runtime"
                    break
        except KeyboardInterrupt:
            stopped_by = "interrupt"
        finally:
            # Whatever ended the wait, the agent's tree is stopped; a signal from here on is
            # held and only cuts the grace period short (``hurry``).
            interrupts.disarm()
            try:
                running = not tree.wait_for_exit(0)
                count = tree.stop(grace_s, hurry) + running  # the agent itself, if stopped
                exit_code = tree.leader.wait()
            finally:
                terminal.take_back()
        if interrupts.take_held() and stopped_by is None:
            stopped_by = "interrupt"  # during the cleanup of an agent that had exited
    if stopped_by is None and exit_code == -signal.SIGINT:
        stopped_by = "interrupt"  # Ctrl-C on the terminal reached the agent, not cage
    return AgentRun(
        exit_code=exit_code,
        stopped_by=stopped_by,
        processes_stopped=count,
        runtime_s=time.monotonic() - started,
    )


# ---------------------------------------------------------------------------------------
# Spend


def _spend_section(
    mission_id: str, ledger: str | None, proxy_spend: dict[str, Any], cap: float
) -> dict[str, Any]:
    """The receipt's ``spend``: the ledger's rows for the mission (so spend of an earlier run
    under the same id counts, as it does in the cap), the proxy's totals if the ledger
    cannot be read."""
    from cage.errors import LedgerError
    from cage.ledger import Ledger

    providers = {m: row.get("provider") for m, row in (proxy_spend.get("by_model") or {}).items()}
    source = "ledger"
    try:
        with Ledger.open(ledger) as book:
            found = book.mission_spend(mission_id)
        rows = found["by_model"]
    except LedgerError:
        source = "proxy"
        rows = {
            model: {**row, "truth": None}
            for model, row in (proxy_spend.get("by_model") or {}).items()
        }
    by_model = []
    truth_total = dict.fromkeys(outcome.TRUTH_LABELS, 0)
    totals = {
        k: 0
        for k in (
            "calls",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
        )
    }
    total_usd = 0.0
    unpriced = 0
    for model, row in rows.items():
        calls = int(row.get("calls") or 0)
        row_unpriced = int(row.get("unpriced") or 0)
        cost = float(row.get("cost_usd") or 0.0)
        truth = row.get("truth")
        entry = {
            "provider": providers.get(model),
            "model": model,
            "calls": calls,
            "input_tokens": int(row.get("input_tokens") or 0),
            "output_tokens": int(row.get("output_tokens") or 0),
            "cache_read_tokens": int(row.get("cache_read_tokens") or 0),
            "cache_write_tokens": int(row.get("cache_write_tokens") or 0),
            "cost_usd": None if calls and row_unpriced == calls else round(cost, 9),
            "unpriced": row_unpriced,
            "truth": truth,
        }
        by_model.append(entry)
        for k in totals:
            totals[k] += entry[k]
        total_usd += cost
        unpriced += row_unpriced
        for label in outcome.TRUTH_LABELS:
            truth_total[label] += int((truth or {}).get(label) or 0)
    by_model.sort(key=lambda r: (-(r["cost_usd"] or 0.0), r["model"]))
    exhausted = bool(proxy_spend.get("budget_exhausted"))
    return {
        "total_usd": round(total_usd, 9),
        **totals,
        "unpriced": unpriced,
        "truth": truth_total if source == "ledger" else None,
        "by_model": by_model,
        "cap_usd": cap,
        "max_calls": proxy_spend.get("max_calls"),
        "refused_calls": int(proxy_spend.get("refused") or 0),
        "budget_status": "exceeded" if exhausted else "within",
        "warnings": list(proxy_spend.get("warnings") or []),
        "source": source,
    }


# ---------------------------------------------------------------------------------------
# The mission


def _load_policy(options: MissionOptions, repo: Any, base: str) -> tuple[Any, dict[str, Any]]:
    from cage import policy as policy_mod

    if options.policy_path is not None:
        policy = policy_mod.load_policy_file(options.policy_path)
        return policy, {"path": options.policy_path, "source": "file", "hash": policy.hash}
    data = repo.read_file_at(base, policy_mod.POLICY_PATH)
    if data is None:
        raise PolicyError(
            f"{policy_mod.POLICY_PATH} does not exist at the base commit {base[:12]}: commit a "
            "policy first (`cage policy init`), or pass --policy PATH"
        )
    policy = policy_mod.load_policy(data, f"{policy_mod.POLICY_PATH}@{base[:12]}")
    return policy, {"path": policy_mod.POLICY_PATH, "source": "base", "hash": policy.hash}


def _reason(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _mission_reasons(run: AgentRun, spend: dict[str, Any], policy: Any) -> list[dict[str, Any]]:
    reasons = []
    budget = policy.budget
    if run.stopped_by == "interrupt":
        reasons.append(
            _reason(
                "mission_interrupted",
                f"the mission was interrupted after {run.runtime_s:.1f}s; the agent was stopped "
                "and its work recorded, but not verified",
            )
        )
    if run.stopped_by == "budget" or spend["budget_status"] == "exceeded":
        calls_hit = budget.max_llm_calls is not None and spend["calls"] >= budget.max_llm_calls
        limit = (
            f"its limit of {budget.max_llm_calls} LLM calls"
            if calls_hit
            else f"its ${budget.mission_hard_limit_usd:g} cap"
        )
        refused = spend["refused_calls"]
        reasons.append(
            _reason(
                "budget_exceeded",
                # Reservations refuse a call that *could* cross the cap, so spend usually
                # stays below it: say the next call would have crossed it.
                f"the mission hit {limit}: the next call could have crossed it "
                f"(spent {outcome.money(spend['total_usd'])} in "
                f"{spend['calls']} call(s)"
                + (f", {refused} call(s) refused by the budget guard" if refused else "")
                + ")"
                + ("; the agent was stopped" if run.stopped_by == "budget" else ""),
            )
        )
    if run.stopped_by == "runtime":
        reasons.append(
            _reason(
                "runtime_exceeded",
                f"the agent ran past max_runtime_minutes ({budget.max_runtime_minutes:g}) and "
                "was stopped",
            )
        )
    if run.exit_code not in (0, None) and run.stopped_by is None:
        reasons.append(
            _reason(
                "agent_exit_nonzero",
                f"the agent exited with status {run.exit_code}; the verdict judges its change",
            )
        )
    return reasons


def _combine(
    mission_reasons: list[dict[str, Any]], verdict_doc: dict[str, Any] | None
) -> tuple[str, list[dict[str, Any]]]:
    """Mission stops block first; then the adjudication's verdict and reasons stand."""
    blocking = [r for r in mission_reasons if r["code"] in _BLOCKING_MISSION_REASONS]
    info = [r for r in mission_reasons if r["code"] not in _BLOCKING_MISSION_REASONS]
    adjudicated = list((verdict_doc or {}).get("reasons") or [])
    if blocking:
        return "BLOCKED", blocking + adjudicated + info
    if verdict_doc is None:
        return "BLOCKED", adjudicated + info
    return verdict_doc["verdict"], adjudicated + info


def run_mission(options: MissionOptions) -> MissionResult:
    """Run one mission end to end (module docstring) and write its receipt.

    Raises a CageError before the agent starts (dirty tree, no policy, bad id, agent not
    found); once it has started, a receipt is always written.
    """
    from cage import __version__, attest, gitio
    from cage import proxy as proxy_mod
    from cage.policy import POLICY_PATH

    argv = list(options.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("give the agent command after `--`: cage mission run -- claude -p '...'")
    # NaN passes a "< 0" test and inf never ends: both are refused.
    if not 0 <= options.grace_s < float("inf"):
        raise UsageError(
            f"--grace must be a finite number >= 0 of seconds, not {options.grace_s:g}"
        )
    repo = gitio.Repo(options.repo)
    root = repo.root
    try:
        base = repo.resolve_commit("HEAD")
    except GitError:
        raise CageError(
            f"{root} has no commit checked out: commit the code (and the policy) first, "
            "the mission's base is the commit you start from"
        ) from None
    try:
        mission_id = (
            outcome.check_mission_id(options.mission_id)
            if options.mission_id is not None
            else new_mission_id()
        )
    except ReceiptError as exc:
        raise UsageError(f"--id: {exc}") from None
    path = outcome.receipt_path(root, mission_id)
    for folder in (path.parent.parent.parent, path.parent.parent):
        if folder.exists() and not folder.is_dir():
            # Found now, before the agent spends anything, not when the receipt is due.
            raise CageError(
                f"{folder} is not a directory: the mission's receipt goes under "
                f"{path.parent.parent}; move that file away"
            )
    if path.exists():
        raise UsageError(
            f"a receipt for mission {mission_id} already exists ({path}); choose another --id"
        )
    warnings: list[str] = []
    dirty = repo.dirty_paths(skip_prefix=outcome.OUTCOMES_DIR + "/")
    if dirty:
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        if not options.allow_dirty:
            raise CageError(
                f"the working tree of {root} has uncommitted changes ({shown}): they would "
                "be judged as the agent's work. Commit or stash them first, or pass "
                "--allow-dirty to count them as part of the mission"
            )
        warnings.append(
            f"--allow-dirty: uncommitted changes ({shown}) are counted as the agent's work"
        )
    policy, policy_info = _load_policy(options, repo, base)
    if policy_info["source"] == "file":
        warnings.append(
            f"--policy {options.policy_path}: the mission runs under this file, but CI reads "
            f"the policy from the base commit ({POLICY_PATH}), which may differ"
        )
    for line in warnings:
        _say(options, f"warning: {line}")

    # The key that signs the spend statement: held by the proxy in this process only
    # (agent_env drops CAGE_ATTEST_KEY*; this process is non-dumpable). A bad key stops the
    # mission before the agent starts.
    attest_key = attest.load_key(options.attest_key_file)
    budget = policy.budget
    cap = float(budget.mission_hard_limit_usd)
    started_at = _now()
    clock = time.monotonic()
    running = proxy_mod.start_proxy_in_thread(
        mission_id=mission_id,
        budget_usd=cap,
        max_calls=budget.max_llm_calls,
        ledger_path=options.ledger,
        upstream_openai=options.upstream_openai,
        upstream_anthropic=options.upstream_anthropic,
        mock=options.mock,
        warn_at_usd=budget.warn_at_usd,
        warn_at_tokens=budget.warn_at_tokens,
        attest_key=attest_key,
    )
    try:
        _say(
            options,
            f"mission {mission_id}: base {base[:12]}, cap ${cap:g}"
            + (f", {budget.max_llm_calls} calls" if budget.max_llm_calls is not None else "")
            + (
                f", {budget.max_runtime_minutes:g} min"
                if budget.max_runtime_minutes is not None
                else ""
            )
            + f"; proxy {running.url}"
            + (" (mock upstream)" if options.mock else ""),
        )
        env = agent_env(dict(os.environ), running.url, mission_id)
        run = run_agent(
            argv,
            cwd=Path(options.repo),
            env=env,
            max_runtime_s=None
            if budget.max_runtime_minutes is None
            else float(budget.max_runtime_minutes) * 60.0,
            budget_exhausted=lambda: running.budget_exhausted,
            grace_s=options.grace_s,
            stdout_to_stderr=options.agent_stdout_to_stderr,
        )
        # A Ctrl-C from here on is remembered (the replay is then skipped), never lost.
        late_interrupt = threading.Event()
        with _shielded(late_interrupt):
            running.flush(timeout=10.0)
            running.stop()
            proxy_spend = running.spend()
            spend = _spend_section(mission_id, options.ledger, proxy_spend, cap)
    except BaseException:
        running.stop()
        raise

    # The snapshot and the receipt must survive a Ctrl-C; the replay may be interrupted.
    snapshot: Any = None  # gitio.Snapshot
    snapshot_error: str | None = None
    with _shielded(late_interrupt):
        try:
            snapshot = gitio.Repo(root).snapshot(
                ref=SNAPSHOT_REF_PREFIX + mission_id,
                message=f"cage mission {mission_id} snapshot",
                keep_from_head=outcome.OUTCOMES_DIR,
            )
        except GitError as exc:
            snapshot_error = str(exc)
    spend_statement: dict[str, Any] | None = None
    if snapshot is not None and attest_key is not None:
        # Signed over the snapshot's change digest: CI finds the same digest for a head
        # that holds exactly this change (receipts aside), and no other.
        try:
            with _shielded(threading.Event()):
                digest = attest.change_digest(gitio.Repo(root), snapshot.commit)
            spend_statement = running.spend_statement(base, digest)
        except GitError as exc:  # the receipt must still be written: unsigned, and said so
            warnings.append(f"the spend statement could not be signed: {exc}")
    mission_reasons = _mission_reasons(run, spend, policy)
    if snapshot_error is not None:
        mission_reasons.insert(
            0,
            _reason(
                "snapshot_failed", f"the agent's result could not be recorded: {snapshot_error}"
            ),
        )
    interrupted = run.stopped_by == "interrupt"
    if late_interrupt.is_set() and not interrupted:
        interrupted = True
        mission_reasons.insert(
            0,
            _reason(
                "mission_interrupted",
                "the mission was interrupted after the agent finished; its work is recorded, "
                "but not verified",
            ),
        )
    verdict_doc: dict[str, Any] | None = None
    # Like the CI replay, the adjudication runs only when it can change the verdict: after a
    # stop for budget, runtime or Ctrl-C the mission is BLOCKED whatever the change is.
    certain = [r["code"] for r in mission_reasons if r["code"] in _BLOCKING_MISSION_REASONS]
    if snapshot is not None and not certain:
        given = policy if policy_info["source"] == "file" else None
        verdict_doc, interrupted_now = _adjudicate(
            root, base, snapshot.commit, options, given, attest_key, spend_statement
        )
        if interrupted_now:
            interrupted = True
            certain = ["mission_interrupted"]
            mission_reasons.insert(
                0,
                _reason(
                    "mission_interrupted",
                    "the mission was interrupted during verification; the change is not verified",
                ),
            )
    verdict, reasons = _combine(mission_reasons, verdict_doc)
    ended_at = _now()
    if verdict_doc is not None:
        verification = verdict_doc["verification"]
        changes = [
            {
                "path": c["path"],
                "status": c["status"],
                "findings": [f["code"] for f in c.get("findings") or []],
            }
            for c in verdict_doc.get("changes") or []
        ]
    else:
        why = f"the verdict is already certain ({', '.join(certain)})"
        verification = {
            "status": "UNVERIFIED",
            "replayed": False,
            "skipped_reason": why,
            "base": None,
            "head": None,
            "regression": None,
        }
        changes = _changes_without_findings(root, base, snapshot)
    receipt: dict[str, Any] = {
        "schema": outcome.SCHEMA,
        "id": mission_id,
        "cage_version": __version__,
        "started_at": started_at,
        "ended_at": ended_at,
        "runtime_s": round(time.monotonic() - clock, 3),
        "agent": {
            "argv": outcome.redact_argv(argv),
            "exit_code": run.exit_code,
            "stopped_by": run.stopped_by,
            "runtime_s": round(run.runtime_s, 3),
            "processes_stopped": run.processes_stopped,
        },
        "mission": {
            "name": policy.mission.name,
            "task_class": policy.mission.task_class,
            "issue": policy.mission.issue,
        },
        "policy": {**policy_info, "verdict_policy": _verdict_policy(verdict_doc)},
        "limits": {
            "mission_hard_limit_usd": cap,
            "max_llm_calls": budget.max_llm_calls,
            "max_runtime_minutes": budget.max_runtime_minutes,
        },
        "base": base,
        "snapshot": None
        if snapshot is None
        else {
            "commit": snapshot.commit,
            "tree": snapshot.tree,
            "parent": snapshot.parent,
            "ref": snapshot.ref,
        },
        "spend": spend,
        "verification": verification,
        "changes": changes,
        "verdict": verdict,
        "reasons": reasons,
        "warnings": warnings,
        "spend_statement": spend_statement,
    }
    with _shielded(threading.Event()):
        try:
            written = outcome.write_receipt(path, receipt)
        except ReceiptError as exc:
            # The agent has run and spent: keep its receipt somewhere rather than nowhere.
            import tempfile

            fallback = Path(tempfile.gettempdir()) / f"cage-receipt-{mission_id}.json"
            try:
                outcome.write_receipt(fallback, receipt)
            except ReceiptError:
                raise exc from None
            raise ReceiptError(
                f"{exc.message}; the receipt was saved to {fallback} instead (verdict "
                f"{verdict}; the agent's work is kept at {snapshot.ref}, its spend in the ledger)"
            ) from None
    if interrupted:
        code = EXIT_INTERRUPTED
    else:
        code = {"PASS": 0, "BLOCKED": 1, "HUMAN_APPROVAL_REQUIRED": 3}[verdict]
    return MissionResult(receipt=receipt, path=written, exit_code=code, warnings=warnings)


def _verdict_policy(verdict_doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The policy the adjudication used (path, hash, source), as the verdict reports it."""
    if verdict_doc is None:
        return None
    return verdict_doc.get("policy")


def _changes_without_findings(root: Path, base: str, snapshot: Any) -> list[dict[str, Any]]:
    """The paths the agent changed (one ``git diff-tree``), when nothing was adjudicated."""
    from cage import gitio

    if snapshot is None:
        return []
    try:
        found = gitio.Repo(root).diff(base, snapshot.commit)
    except (GitError, KeyboardInterrupt):
        return []
    return [{"path": c.path, "status": c.status, "findings": []} for c in found]


def _adjudicate(
    root: Path,
    base: str,
    head: str,
    options: MissionOptions,
    policy: Any = None,
    attest_key: bytes | None = None,
    spend_statement: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, bool]:
    """The CI adjudication of base..head, under ``policy`` when given (``--policy FILE``)
    instead of the base commit's; returns (verdict document, interrupted). The mission's own
    signed statement is evidence, as it will be in CI once the receipt is committed."""
    from cage.adjudicate import adjudicate

    _say(options, f"adjudicating {base[:12]}..{head[:12]} (the same code as `cage ci`)")
    try:
        verdict = adjudicate(
            root,
            base,
            head,
            progress=options.progress,
            policy=policy,
            attest_key=attest_key,
            spend_statements=[spend_statement] if spend_statement else [],
        )
    except KeyboardInterrupt:
        return None, True
    if verdict.error:
        _say(options, f"internal error during adjudication: {verdict.error}")
    return verdict.to_dict(), False
