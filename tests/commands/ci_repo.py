"""A small Python project with a real bug, built once and copied per test, and a runner.

src/calc/ops.py has ``add`` returning ``a - b``; tests/test_ops.py catches it. The policy's
verify command runs those tests; the regression command runs the whole suite. Each test
gets a copy of the template repository, so the git work of building it is paid once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GitRepo

PYTEST = "PYTHONPATH=src python -m pytest -q -p no:cacheprovider"
COMMAND = f"{PYTEST} tests/test_ops.py"
REGRESSION = f"{PYTEST} tests"

OPS_BUGGY = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
OPS_FIXED = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
TEST_OPS = (
    "from calc.ops import add\n\n\n"
    "def test_add():\n    assert add(2, 3) == 5\n\n\n"
    "def test_add_zero():\n    assert add(0, 0) == 0\n"
)
TEST_MUL = "from calc.ops import mul\n\n\ndef test_mul():\n    assert mul(2, 3) == 6\n"


def policy_text(**verification: Any) -> str:
    """A valid policy; keyword arguments override ``verification`` keys (JSON is YAML)."""
    v: dict[str, Any] = {"command": COMMAND, "timeout_seconds": 60, "allow": ["src/**"]}
    v.update(verification)
    v = {k: val for k, val in v.items() if val is not None}
    return (
        "version: v1\n"
        "mission:\n  name: Fix add\n"
        "budget:\n  mission_hard_limit_usd: 5\n"
        f"verification: {json.dumps(v)}\n"
    )


class Project(GitRepo):
    """A copy of the template; ``base`` is the commit with the bug and the policy."""

    base: str

    def set_policy(self, **verification: Any) -> str:
        """Commit a new policy and make that commit the base."""
        self.write(".runcap/mission.yaml", policy_text(**verification))
        self.base = self.commit("policy")
        return self.base

    def fix(self) -> None:
        self.write("src/calc/ops.py", OPS_FIXED)


def _build_template(path: Path) -> GitRepo:
    repo = GitRepo(path)
    repo.write(".runcap/mission.yaml", policy_text())
    repo.write("src/calc/__init__.py", "")
    repo.write("src/calc/ops.py", OPS_BUGGY)
    repo.write("tests/test_ops.py", TEST_OPS)
    repo.write("tests/test_mul.py", TEST_MUL)
    repo.write("README.md", "# calc\n")
    repo.commit("calc with a bug")
    return repo


def build_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template repository (a session fixture in each test module builds it once)."""
    return _build_template(tmp_path_factory.mktemp("ci-template") / "repo").path


def make_project(template_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A private copy of the template, with a GitHub-free environment and `python` on PATH."""
    for var in (
        "GITHUB_EVENT_NAME",
        "GITHUB_EVENT_PATH",
        "GITHUB_OUTPUT",
        "GITHUB_STEP_SUMMARY",
        "GITHUB_ACTIONS",
        "PYTEST_ADDOPTS",
    ):
        monkeypatch.delenv(var, raising=False)
    # The verify command runs under /bin/sh: `python` must be this virtualenv's.
    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
    dest = tmp_path / "project"
    shutil.copytree(template_repo, dest, symlinks=True)
    repo = Project(dest)
    repo.base = repo.head()
    return repo


def run_ci(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """Run `cage ci --mode adjudicate --json ARGS` in-process: (exit code, document, stderr)."""
    from cage.cli import main

    code = main(["ci", "--mode", "adjudicate", "--json", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def adjudicate(capsys: pytest.CaptureFixture[str], repo: Project, head: str | None = None):
    """Adjudicate ``repo.base``..``head`` (default: HEAD) of ``repo``."""
    head = head or repo.head()
    return run_ci(capsys, "--repo", str(repo.path), "--base", repo.base, "--head", head)


def codes(doc: dict[str, Any]) -> set[str]:
    """The reason codes of a verdict document."""
    return {r["code"] for r in doc["reasons"]}


def finding_codes(doc: dict[str, Any], path: str) -> set[str]:
    """The finding codes of one changed path."""
    for change in doc["changes"]:
        if change["path"] == path:
            return {f["code"] for f in change["findings"]}
    raise AssertionError(f"{path!r} not among the changes")
