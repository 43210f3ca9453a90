"""The composite Action's gate step, run as GitHub would run it: bash, real cage, real repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.commands.ci_repo import build_template, make_project

ACTION = Path(__file__).resolve().parent.parent / "action.yml"


@pytest.fixture(scope="module")
def template_repo(tmp_path_factory):
    return build_template(tmp_path_factory)


def gate_step() -> dict:
    steps = yaml.safe_load(ACTION.read_text())["runs"]["steps"]
    return next(step for step in steps if step.get("id") == "gate")


def run_step(tmp_path: Path, repo, head: str, **inputs: str) -> tuple[int, str, str]:
    """Run the step's script with the env GitHub would give it for these inputs."""
    action_path = tmp_path / "action"
    (action_path / ".cage-venv" / "bin").mkdir(parents=True)
    (action_path / ".cage-venv" / "bin" / "cage").symlink_to(Path(sys.executable).parent / "cage")
    event = tmp_path / "event.json"
    event.write_text(
        json.dumps({"pull_request": {"base": {"sha": repo.base}, "head": {"sha": head}}})
    )
    output = tmp_path / "github_output"
    output.write_text("")
    mode = inputs.get("mode", "adjudicate")
    key = inputs.get("attest-key", "")
    env = {
        **os.environ,
        "GITHUB_ACTION_PATH": str(action_path),
        "GITHUB_EVENT_NAME": "pull_request",
        "GITHUB_EVENT_PATH": str(event),
        "GITHUB_OUTPUT": str(output),
        "CAGE_ON_HUMAN": inputs.get("on-human", "fail"),
        "CAGE_MODE": mode,
        "CAGE_SPEND_ELSEWHERE": inputs.get("spend-elsewhere", "false"),
        # `inputs.mode == 'spend' && inputs.attest-key || ''`, as GitHub evaluates it
        "CAGE_ATTEST_KEY": key if mode == "spend" else "",
        "CAGE_KEY_GIVEN": "true" if key else "false",
    }
    done = subprocess.run(
        ["bash", "-e", "-c", gate_step()["run"]],
        cwd=repo.path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, output.read_text()


def test_the_step_passes_the_key_only_in_spend_mode():
    env = gate_step()["env"]
    assert env["CAGE_ATTEST_KEY"] == "${{ inputs.mode == 'spend' && inputs.attest-key || '' }}"


def test_pass_is_green_and_sets_outputs(template_repo, tmp_path, monkeypatch):
    repo = make_project(template_repo, tmp_path, monkeypatch)
    repo.fix()
    code, log, outputs = run_step(tmp_path, repo, repo.commit("fix add"))
    assert code == 0, log
    assert "verdict=PASS" in outputs


def test_human_approval_fails_the_check_by_default_and_warn_lets_it_pass(
    template_repo, tmp_path, monkeypatch
):
    repo = make_project(template_repo, tmp_path, monkeypatch)
    repo.write("tests/test_ops.py", "def test_add():\n    assert True\n")
    head = repo.commit("edit the test")
    code, log, outputs = run_step(tmp_path, repo, head)
    assert code == 3, log
    assert "verdict=HUMAN_APPROVAL_REQUIRED" in outputs
    code, log, _ = run_step(tmp_path / "warn", repo, head, **{"on-human": "warn"})
    assert code == 0
    assert "::warning::cage: HUMAN_APPROVAL_REQUIRED" in log


def test_blocked_fails_the_check(template_repo, tmp_path, monkeypatch):
    repo = make_project(template_repo, tmp_path, monkeypatch)
    repo.write("README.md", "# calc, out of scope\n")
    code, log, outputs = run_step(tmp_path, repo, repo.commit("docs"))
    assert code == 1, log
    assert "verdict=BLOCKED" in outputs


def test_a_key_in_the_adjudicate_job_is_refused_before_cage_runs(
    template_repo, tmp_path, monkeypatch
):
    repo = make_project(template_repo, tmp_path, monkeypatch)
    repo.fix()
    code, log, outputs = run_step(tmp_path, repo, repo.commit("fix"), **{"attest-key": "k" * 32})
    assert code == 2
    assert "::error::cage: attest-key is only for a separate job with mode: spend" in log
    assert outputs == ""


def test_spend_mode_runs_no_replay(template_repo, tmp_path, monkeypatch):
    repo = make_project(template_repo, tmp_path, monkeypatch)
    repo.fix()
    head = repo.commit("fix")
    code, log, outputs = run_step(tmp_path, repo, head, mode="spend", **{"attest-key": "k" * 32})
    assert code == 0, log
    assert "verdict=PASS" in outputs
    assert "replaying" not in log


def test_an_unknown_mode_is_refused(template_repo, tmp_path, monkeypatch):
    repo = make_project(template_repo, tmp_path, monkeypatch)
    code, log, _ = run_step(tmp_path, repo, repo.head(), mode="grade")
    assert code == 2
    assert "mode must be adjudicate or spend" in log
