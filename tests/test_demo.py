"""The demo's parts: its repository, its scripted agents against a real proxy, its readers.

`cage demo` end to end (real `cage mission run` children) is in tests/commands/test_demo.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cage.demo import agent, missions, repository
from cage.ledger import Ledger
from cage.policy import load_policy_file
from cage.proxy import start_proxy_in_thread


def _verify(repo: Path, command: str) -> int:
    # No bytecode cache: the fix below keeps ops.py's size and may land in the same second
    # as the run before it, and Python would then import the stale cached ops.
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(command, shell=True, cwd=repo, capture_output=True, env=env).returncode


@pytest.fixture
def demo_repo(tmp_path: Path) -> tuple[Path, str]:
    command, evidence = repository.verify_command(sys.executable, repository.has_pytest())
    repo = tmp_path / "calc"
    base = repository.create_repository(repo, command, evidence)
    return repo, base


@pytest.mark.parametrize("pytest_runner", [True, False])
def test_verify_command_fails_at_base_and_passes_with_the_fix(tmp_path, pytest_runner):
    command, evidence = repository.verify_command(sys.executable, pytest_runner)
    assert evidence == ("auto" if pytest_runner else "exit-code")
    assert ("-m pytest" in command) is pytest_runner
    repo = tmp_path / "calc"
    repository.create_repository(repo, command, evidence)
    assert _verify(repo, command) != 0
    ops = repo / repository.OPS_PATH
    ops.write_text(ops.read_text().replace(repository.BUGGY_LINE, repository.FIXED_LINE))
    assert _verify(repo, command) == 0


def test_repository_commits_product_then_policy_and_is_clean(demo_repo):
    repo, base = demo_repo
    log = repository.git(repo, "log", "--format=%s", base).splitlines()
    assert len(log) == 2 and log[0].startswith("policy:")
    assert repository.git(repo, "status", "--porcelain") == ""
    assert repository.git(repo, "symbolic-ref", "--short", "HEAD").strip() == "main"
    policy = load_policy_file(repo / repository.POLICY_PATH)
    assert policy.budget.mission_hard_limit_usd == repository.BUDGET_USD
    assert policy.verification.allow == ("src/**",)
    assert policy.verification.guard == "strict"
    # The interpreter is named by its absolute path: the venv that runs the demo runs the tests.
    assert sys.executable in policy.verification.command


def test_reset_restores_base_and_keeps_receipts(demo_repo):
    repo, base = demo_repo
    (repo / repository.OPS_PATH).write_text("broken\n")
    (repo / "src" / "new.py").write_text("x = 1\n")
    receipt = repo / ".runcap" / "outcomes" / "m1" / "receipt.json"
    receipt.parent.mkdir(parents=True)
    receipt.write_text("{}")
    repository.reset_repository(repo, base)
    assert repository.git(repo, "status", "--porcelain") == "?? .runcap/outcomes/\n"
    assert repository.BUGGY_LINE in (repo / repository.OPS_PATH).read_text()
    assert not (repo / "src" / "new.py").exists()
    assert receipt.exists()


def test_a_quick_same_size_edit_after_a_reset_reaches_the_mission_snapshot(demo_repo):
    """The agent's one-character fix lands within a second of the reset; the snapshot
    (`cage mission run`'s, from a copy of the index) must still see it."""
    from cage import gitio

    repo, base = demo_repo
    repository.reset_repository(repo, base)
    ops = repo / repository.OPS_PATH
    ops.write_text(ops.read_text().replace(repository.BUGGY_LINE, repository.FIXED_LINE))
    time.sleep(1.02 - time.time() % 1.0)  # the index copy is made in a later second
    snapshot = gitio.Repo(repo).snapshot(ref="refs/cage/missions/quick", message="snapshot")
    assert snapshot.tree != repository.git(repo, "rev-parse", f"{base}^{{tree}}").strip()


def _run_agent(name: str, repo: Path, proxy, log: Path) -> subprocess.CompletedProcess[str]:
    env = missions.child_environment(Path(os.environ["CAGE_LEDGER"]))
    env["OPENAI_BASE_URL"] = proxy.openai_base_url
    env["ANTHROPIC_BASE_URL"] = proxy.anthropic_base_url
    return subprocess.run(
        [sys.executable, "-m", "cage.demo.agent", name, "--log", str(log)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_honest_agent_fixes_the_bug_through_the_proxy(demo_repo, tmp_path):
    repo, _ = demo_repo
    ledger_path = os.environ["CAGE_LEDGER"]
    with start_proxy_in_thread(
        mission_id="honest", budget_usd=repository.BUDGET_USD, ledger_path=ledger_path, mock=True
    ) as proxy:
        done = _run_agent("honest", repo, proxy, tmp_path / "agent.jsonl")
        proxy.flush()
    assert done.returncode == 0, done.stderr
    assert repository.git(repo, "status", "--porcelain").split() == ["M", repository.OPS_PATH]
    assert repository.FIXED_LINE in (repo / repository.OPS_PATH).read_text()
    calls = missions.read_agent_log(tmp_path / "agent.jsonl")
    assert [(c["api"], c["stream"], c["status"]) for c in calls] == [
        ("messages", True, 200),
        ("chat", False, 200),
    ]
    with Ledger.open(ledger_path) as ledger:
        spend = ledger.mission_spend("honest")
    assert spend["calls"] == 2 and spend["unpriced"] == 0
    assert set(spend["by_model"]) == {agent.PLANNER_MODEL, agent.CODER_MODEL}
    assert 0 < spend["cost_usd"] < repository.BUDGET_USD / 10


def test_test_editor_changes_only_the_test(demo_repo, tmp_path):
    repo, _ = demo_repo
    with start_proxy_in_thread(
        mission_id="editor", budget_usd=repository.BUDGET_USD, mock=True
    ) as proxy:
        done = _run_agent("test-editor", repo, proxy, tmp_path / "agent.jsonl")
    assert done.returncode == 0, done.stderr
    assert repository.git(repo, "status", "--porcelain").split() == ["M", repository.TEST_PATH]
    command, _ = repository.verify_command(sys.executable, repository.has_pytest())
    # The edited test agrees with the bug: only the gate's verifier rule can catch this.
    assert _verify(repo, command) == 0


def test_spinner_is_refused_by_the_budget_guard_and_spend_stays_under_the_cap(demo_repo, tmp_path):
    repo, _ = demo_repo
    ledger_path = os.environ["CAGE_LEDGER"]
    with start_proxy_in_thread(
        mission_id="spinner", budget_usd=repository.BUDGET_USD, ledger_path=ledger_path, mock=True
    ) as proxy:
        done = _run_agent("spinner", repo, proxy, tmp_path / "agent.jsonl")
        proxy.flush()
        snapshot = proxy.spend()
    assert done.returncode == 1
    assert "HTTP 429 budget_guard" in done.stderr
    calls = missions.read_agent_log(tmp_path / "agent.jsonl")
    assert calls[-1]["status"] == 429 and calls[-1]["error_type"] == "budget_guard"
    assert all(c["status"] == 200 for c in calls[:-1]) and len(calls) > 3
    assert snapshot["refused"] == 1
    with Ledger.open(ledger_path) as ledger:
        spend = ledger.mission_spend("spinner")
    # Refused calls never reach the upstream and are not in the ledger.
    assert spend["calls"] == len(calls) - 1
    assert repository.BUDGET_USD / 2 < spend["cost_usd"] <= repository.BUDGET_USD
    # It left a half-fix behind: in scope, still failing.
    assert repository.git(repo, "status", "--porcelain").split() == ["M", repository.OPS_PATH]


def test_agent_outside_a_mission_says_what_to_do(demo_repo):
    repo, _ = demo_repo
    env = {k: v for k, v in os.environ.items() if not k.endswith("_BASE_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "cage.demo.agent", "honest"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cage mission run" in done.stderr
    assert "Traceback" not in done.stderr
    assert repository.git(repo, "status", "--porcelain") == ""


def test_inherited_git_variables_cannot_point_the_demo_at_another_repository(
    monkeypatch, tmp_path, git_repo
):
    git_repo.write("keep.txt", "user's work\n")
    user_head = git_repo.commit("user")
    git_repo.write("keep.txt", "uncommitted user work\n")
    monkeypatch.setenv("GIT_DIR", str(git_repo.path / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(git_repo.path))
    command, evidence = repository.verify_command(sys.executable, False)
    base = repository.create_repository(tmp_path / "calc", command, evidence)
    repository.reset_repository(tmp_path / "calc", base)
    assert git_repo.head() == user_head
    assert (git_repo.path / "keep.txt").read_text() == "uncommitted user work\n"
    assert repository.git(tmp_path / "calc", "rev-parse", "HEAD").strip() == base


def test_child_environment_uses_the_demo_ledger_and_drops_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-key")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://elsewhere.invalid/v1")
    env = missions.child_environment(tmp_path / "ledger.db")
    assert env["CAGE_LEDGER"] == str(tmp_path / "ledger.db")
    assert not {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL"} & set(env)
    assert env["GIT_CONFIG_GLOBAL"] == os.devnull


def test_read_receipt_top_level_and_nested_verdicts(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(
        json.dumps(
            {
                "verdict": "BLOCKED",
                "reasons": [{"code": "budget_exceeded", "message": "cap", "path": None}],
                "verification": {"status": "UNVERIFIED"},
            }
        )
    )
    assert missions.read_receipt(flat) == (
        "BLOCKED",
        [{"code": "budget_exceeded", "message": "cap"}],
        "UNVERIFIED",
    )
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"verdict": {"verdict": "PASS", "reasons": []}}))
    assert missions.read_receipt(nested) == ("PASS", [], None)
    for bad in ("[1]", "{not json", json.dumps({"reasons": []})):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError):
            missions.read_receipt(tmp_path / "bad.json")


def test_agent_log_survives_a_cut_line(tmp_path):
    log = tmp_path / "a.jsonl"
    log.write_text('{"call": 1, "status": 200}\n{"call": 2, "sta')
    assert missions.read_agent_log(log) == [{"call": 1, "status": 200}]
    assert missions.read_agent_log(tmp_path / "missing.jsonl") == []


def test_a_mission_that_writes_no_receipt_is_reported_with_its_error(tmp_path):
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    env = missions.child_environment(tmp_path / "ledger.db")
    result = missions.run_mission(missions.SCENARIOS[0], not_a_repo, tmp_path, env, sys.executable)
    assert result.verdict is None and not result.as_expected
    assert "wrote no receipt" in result.error
    assert "git" in result.error  # the tail of cage mission run's own message
    assert result.exit_code not in (0, None)
