"""Run the demo's three missions and gather what they proved.

Each mission is a real ``cage mission run --mock`` child process of this interpreter, with a
scripted agent (:mod:`cage.demo.agent`) as its agent command, in the demo repository reset to
the same base commit. The verdict and reasons come from the mission's receipt; the spend
comes from the demo's own ledger (``CAGE_LEDGER`` set for the children: never the user's),
which the metering proxy wrote call by call.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cage.demo import repository

PASS = "PASS"
BLOCKED = "BLOCKED"
HUMAN = "HUMAN_APPROVAL_REQUIRED"

# The mission runner, as a child of this very interpreter (the venv cage is installed in).
MISSION_RUN = ("-m", "cage", "mission", "run", "--mock")
# `cage mission run` exits with the shell's code for Ctrl-C when it was interrupted.
EXIT_INTERRUPTED = 130
# How long an interrupted mission gets to stop its agent and write its receipt.
INTERRUPT_GRACE_S = 15
# Generous: a mission takes seconds; this only stops a hung child from hanging the demo.
MISSION_TIMEOUT_S = 300
# Environment the children must not inherit: the demo is offline and sets its own.
_DROP_ENV_SUFFIXES = ("_API_KEY",)
_DROP_ENV = frozenset(
    # CAGE_ATTEST_KEY: the demo's missions are unsigned; a user's key must not change them.
    {
        "OPENAI_BASE_URL",
        "ANTHROPIC_BASE_URL",
        "CAGE_MISSION_ID",
        "PYTEST_ADDOPTS",
        "CAGE_ATTEST_KEY",
    }
)


@dataclass(frozen=True)
class Scenario:
    """One scripted mission: which agent, what it does, which verdict it must get."""

    mission_id: str
    agent: str
    title: str
    does: str
    expected: str


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "honest-fix",
        "honest",
        "honest fix",
        f"fixes add() in {repository.OPS_PATH}",
        PASS,
    ),
    Scenario(
        "test-editor",
        "test-editor",
        "test editor",
        f"edits {repository.TEST_PATH} to expect the wrong value",
        HUMAN,
    ),
    Scenario(
        "spinner",
        "spinner",
        "spinner",
        "half-fixes add(), then calls the model until the budget guard refuses",
        BLOCKED,
    ),
)


@dataclass
class MissionResult:
    """What one mission ended with."""

    scenario: Scenario
    verdict: str | None
    reasons: list[dict[str, Any]]
    verification_status: str | None
    exit_code: int | None
    duration_s: float
    receipt_path: Path
    agent_calls: list[dict[str, Any]]
    spend: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def as_expected(self) -> bool:
        """The verdict is the one this scenario must produce."""
        return self.verdict == self.scenario.expected

    @property
    def refusals(self) -> list[str]:
        """Messages of the calls the budget guard refused, as the agent received them."""
        return [
            str(call.get("message", ""))
            for call in self.agent_calls
            if call.get("status") == 429 and call.get("error_type") == "budget_guard"
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (reason codes first, full reasons after)."""
        return {
            "id": self.scenario.mission_id,
            "agent": self.scenario.agent,
            "does": self.scenario.does,
            "expected": self.scenario.expected,
            "verdict": self.verdict,
            "as_expected": self.as_expected,
            "reasons": [r.get("code") for r in self.reasons],
            "reason_details": self.reasons,
            "verification_status": self.verification_status,
            "exit_code": self.exit_code,
            "duration_s": round(self.duration_s, 3),
            "spend": self.spend,
            "agent_calls": len(self.agent_calls),
            "budget_guard_refusals": self.refusals,
            "receipt": str(self.receipt_path),
            "error": self.error,
        }


@dataclass
class DemoResult:
    """All three missions, the totals and where everything was."""

    directory: Path
    repo: Path
    ledger: Path
    base: str
    verify_command: str
    evidence: str
    missions: list[MissionResult]
    totals: dict[str, Any]
    duration_s: float
    voc: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """Every mission got its expected verdict."""
        return all(m.as_expected for m in self.missions)

    @property
    def receipts_dir(self) -> Path:
        """Where the missions' receipts are."""
        return self.repo / ".runcap" / "outcomes"

    def to_dict(self, kept: bool) -> dict[str, Any]:
        """The ``cage.demo/v1`` JSON document."""
        return {
            "schema": "cage.demo/v1",
            "ok": self.ok,
            "missions": [m.to_dict() for m in self.missions],
            "totals": self.totals,
            "verified_outcome_cost": self.voc,
            "budget_usd": repository.BUDGET_USD,
            "verify": {
                "command": self.verify_command,
                "evidence": self.evidence,
                "runner": "pytest" if self.evidence == "auto" else "unittest",
            },
            "base": self.base,
            "directory": str(self.directory),
            "repository": str(self.repo),
            "receipts": str(self.receipts_dir),
            "ledger": str(self.ledger),
            "kept": kept,
            "duration_s": round(self.duration_s, 3),
        }


def child_environment(ledger: Path) -> dict[str, str]:
    """The children's environment: the demo ledger, a fixed git identity, no API keys."""
    env = repository.git_environment()
    for name in list(env):
        if name in _DROP_ENV or name.endswith(_DROP_ENV_SUFFIXES):
            del env[name]
    env["CAGE_LEDGER"] = str(ledger)
    return env


def run_demo(
    directory: Path,
    progress: Callable[[str, bool], None] | None = None,
    *,
    python: str | None = None,
    pytest: bool | None = None,
) -> DemoResult:
    """Create the repository in ``directory`` and run the three missions there, in order.

    ``progress(message, pending)`` gets one line per step; ``pending`` is True for a line
    that the next one completes (a terminal may overwrite it). ``python`` is the interpreter
    for the missions, agents and verify command (default this one); ``pytest`` chooses the
    verify command (default: whether this interpreter has pytest).
    """
    say = progress or (lambda message, pending: None)
    started = time.monotonic()
    python = python or sys.executable
    if pytest is None:
        pytest = repository.has_pytest()
    command, evidence = repository.verify_command(python, pytest)
    repo = directory / "calc"
    ledger = directory / "ledger.db"
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = repository.create_repository(repo, command, evidence)
    tests_by = "pytest" if pytest else "unittest (pytest is not installed: exit-code evidence)"
    say(f"demo repository {repo} at {base[:12]}; tests run with {tests_by}", False)
    env = child_environment(ledger)
    results: list[MissionResult] = []
    for number, scenario in enumerate(SCENARIOS, start=1):
        repository.reset_repository(repo, base)
        say(f"mission {number}/{len(SCENARIOS)}: {scenario.title} ({scenario.does})…", True)
        result = run_mission(scenario, repo, logs, env, python)
        if result.exit_code in (EXIT_INTERRUPTED, -signal.SIGINT):
            # Ctrl-C reached the mission (and its receipt says so): the demo stops too.
            raise KeyboardInterrupt
        results.append(result)
        outcome = result.verdict or "no verdict"
        say(
            f"mission {number}/{len(SCENARIOS)}: {scenario.title}… {outcome} "
            f"in {result.duration_s:.1f} s",
            False,
        )
    repository.reset_repository(repo, base)
    totals = collect_spend(ledger, results)
    return DemoResult(
        voc=verified_outcome_cost(results),
        directory=directory,
        repo=repo,
        ledger=ledger,
        base=base,
        verify_command=command,
        evidence=evidence,
        missions=results,
        totals=totals,
        duration_s=time.monotonic() - started,
    )


def run_mission(
    scenario: Scenario, repo: Path, logs: Path, env: dict[str, str], python: str
) -> MissionResult:
    """One ``cage mission run --mock`` with a scripted agent; reads back its receipt."""
    agent_log = logs / f"{scenario.mission_id}.agent.jsonl"
    out_path = logs / f"{scenario.mission_id}.out"
    err_path = logs / f"{scenario.mission_id}.err"
    argv = [
        python,
        *MISSION_RUN,
        "--id",
        scenario.mission_id,
        "--",
        python,
        "-m",
        "cage.demo.agent",
        scenario.agent,
        "--log",
        str(agent_log),
    ]
    receipt_path = repo / ".runcap" / "outcomes" / scenario.mission_id / "receipt.json"
    started = time.monotonic()
    exit_code: int | None
    error: str | None = None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            argv, cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        try:
            exit_code = _wait_for_mission(proc)
        except subprocess.TimeoutExpired:
            exit_code = None
            error = f"`cage mission run` did not finish within {MISSION_TIMEOUT_S} s"
    duration = time.monotonic() - started
    verdict, reasons, status = None, [], None
    if receipt_path.is_file():
        try:
            verdict, reasons, status = read_receipt(receipt_path)
        except ValueError as exc:
            error = error or f"{receipt_path}: {exc}"
    elif error is None:
        error = (
            f"`cage mission run` exited {exit_code} and wrote no receipt at {receipt_path}"
            + _tail(err_path)
        )
    return MissionResult(
        scenario=scenario,
        verdict=verdict,
        reasons=reasons,
        verification_status=status,
        exit_code=exit_code,
        duration_s=duration,
        receipt_path=receipt_path,
        agent_calls=read_agent_log(agent_log),
        error=error,
    )


def _wait_for_mission(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``cage mission run``; on timeout stop it (TimeoutExpired is re-raised)."""
    try:
        return proc.wait(timeout=MISSION_TIMEOUT_S)
    except KeyboardInterrupt:
        # The same Ctrl-C reached the mission: give it time to stop its agent's process
        # tree and write its receipt (a second Ctrl-C cuts that short), then stop the demo.
        try:
            proc.wait(timeout=INTERRUPT_GRACE_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
        raise
    except subprocess.TimeoutExpired:
        proc.terminate()  # cage mission run stops its agent and writes a receipt on SIGTERM
        try:
            proc.wait(timeout=INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def verified_outcome_cost(results: list[MissionResult]) -> dict[str, Any] | None:
    """The Verified Outcome Cost over the missions' receipts (``cage outcome list``'s)."""
    from cage import outcome

    receipts = [outcome.read_receipt(r.receipt_path) for r in results if r.verdict is not None]
    return outcome.verified_outcome_cost(receipts) if receipts else None


def read_receipt(path: Path) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """(verdict, reasons as {code, message, path?}, verification status) of a receipt."""
    try:
        receipt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable receipt: {exc}") from None
    if not isinstance(receipt, dict):
        raise ValueError("the receipt is not a JSON object")
    verdict: Any = receipt.get("verdict")
    reasons: Any = receipt.get("reasons")
    if isinstance(verdict, dict):  # a nested cage.verdict/v1 document
        reasons = reasons if reasons is not None else verdict.get("reasons")
        verdict = verdict.get("verdict")
    if not isinstance(verdict, str):
        raise ValueError("the receipt has no verdict")
    clean = [
        {k: v for k, v in reason.items() if k in ("code", "message", "path") and v is not None}
        for reason in (reasons if isinstance(reasons, list) else [])
        if isinstance(reason, dict)
    ]
    verification = receipt.get("verification")
    status = verification.get("status") if isinstance(verification, dict) else None
    return verdict, clean, status if isinstance(status, str) else None


def read_agent_log(path: Path) -> list[dict[str, Any]]:
    """The scripted agent's call records (one JSON object a line); [] when there is none."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a killed agent: the others still count
        if isinstance(record, dict):
            records.append(record)
    return records


def collect_spend(ledger_path: Path, results: list[MissionResult]) -> dict[str, Any]:
    """Fill each result's spend from the demo ledger; return the totals by model."""
    from cage.ledger import Ledger, total_of

    empty = {"cost_usd": 0.0, "calls": 0, "unpriced": 0, "by_model": {}}
    if not ledger_path.exists():
        for result in results:
            result.spend = dict(empty)
        return dict(empty)
    with Ledger.open(ledger_path) as ledger:
        for result in results:
            spend = ledger.mission_spend(result.scenario.mission_id)
            result.spend = _spend_summary(spend, spend["by_model"])
        rows = ledger.report("model")
    by_model = {row["key"]: row for row in rows}
    return _spend_summary(total_of(rows), by_model)


def _spend_summary(total: dict[str, Any], by_model: dict[str, Any]) -> dict[str, Any]:
    def short(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "calls": row["calls"],
            "input_tokens": row["input_tokens"],
            "output_tokens": row["output_tokens"],
            "cost_usd": round(row["cost_usd"], 6),
            "unpriced": row["unpriced"],
            "truth": row["truth"],
        }

    summary = short(total)
    summary["by_model"] = {str(model): short(row) for model, row in by_model.items()}
    return summary


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    if not text:
        return ""
    return ":\n" + "\n".join("    " + line for line in text.splitlines()[-lines:])
