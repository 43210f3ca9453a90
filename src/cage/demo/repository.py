"""The demo repository: a tiny Python package with a real bug, its test and a mission policy.

``add()`` in ``src/calc/ops.py`` subtracts. ``tests/test_ops.py`` catches it, so the verify
command fails at the base commit, as the gate requires. The policy allows ``src/**`` only and
caps each mission at :data:`BUDGET_USD`, a cap the spinner agent reaches in about ten calls.

The verify command names the interpreter that runs the demo by its absolute path, so the
virtualenv cage was installed into runs the tests. pytest is used when that interpreter has
it (JUnit evidence: ``VERIFIED_STRONG``); a plain ``pip install '.[proxy]'`` may not, and then
the same tests run under unittest, judged by exit status (``evidence: exit-code``,
``VERIFIED_WEAK``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

from cage.errors import GitError

# Per-mission hard cap. The honest agents spend well under a cent; the spinner's calls cost
# about $0.003 each and reserve about $0.019 (see cage.demo.agent), so the proxy refuses
# its call once about $0.031 is spent: spend stays under the cap, as the guard promises.
BUDGET_USD = 0.05
# A safety net only: no scripted agent should come near it.
MAX_RUNTIME_MINUTES = 2
VERIFY_TIMEOUT_S = 60

BUGGY_LINE = "    return a - b  # add"
FIXED_LINE = "    return a + b  # add"

OPS_PY = f'''"""Arithmetic for the calc package."""


def add(a, b):
    """Return the sum of a and b."""
{BUGGY_LINE}


def sub(a, b):
    """Return a minus b."""
    return a - b
'''

TEST_OPS_PY = '''"""Tests for calc.ops; they run under pytest and under unittest alike."""

import unittest

from calc.ops import add, sub


class OpsTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_add_negative(self):
        self.assertEqual(add(-1, 1), 0)

    def test_sub(self):
        self.assertEqual(sub(5, 3), 2)
'''

README_MD = """# calc

A tiny calculator, made by `cage demo`.

Issue 1: `add(2, 3)` returns `-1`. `add()` in `src/calc/ops.py` subtracts.
"""

GITIGNORE = """__pycache__/
.pytest_cache/
"""

# The product code, committed first; the policy is committed on top as its own commit.
PRODUCT_FILES: dict[str, str] = {
    "README.md": README_MD,
    ".gitignore": GITIGNORE,
    "src/calc/__init__.py": '"""calc: arithmetic."""\n',
    "src/calc/ops.py": OPS_PY,
    "tests/test_ops.py": TEST_OPS_PY,
}

POLICY_PATH = ".runcap/mission.yaml"
OUTCOMES_DIR = ".runcap/outcomes"
OPS_PATH = "src/calc/ops.py"
TEST_PATH = "tests/test_ops.py"

# Commits are made with a fixed identity and without the user's git configuration (a
# global commit.gpgsign or hooks template must not stall or change the demo).
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "cage demo",
    "GIT_AUTHOR_EMAIL": "demo@cage.invalid",
    "GIT_COMMITTER_NAME": "cage demo",
    "GIT_COMMITTER_EMAIL": "demo@cage.invalid",
}


def git_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with a fixed git identity and no user git config.

    Every inherited ``GIT_*`` variable is dropped: a ``GIT_DIR`` or ``GIT_WORK_TREE`` left by
    a hook or a shell would point the demo's ``git reset --hard`` at the user's repository.
    """
    env = {
        name: value
        for name, value in (os.environ if base is None else base).items()
        if not name.startswith("GIT_")
    }
    env.update(GIT_IDENTITY)
    env["GIT_CONFIG_GLOBAL"] = os.devnull
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def has_pytest() -> bool:
    """True when this interpreter can import pytest (without importing it)."""
    return importlib.util.find_spec("pytest") is not None


def verify_command(python: str, pytest: bool) -> tuple[str, str]:
    """The policy's verify command and evidence mode for interpreter ``python``."""
    interpreter = shlex.quote(python)
    if pytest:
        return f"PYTHONPATH=src {interpreter} -m pytest -q {TEST_PATH}", "auto"
    return f"PYTHONPATH=src {interpreter} -m unittest -q tests.test_ops", "exit-code"


def policy_text(command: str, evidence: str) -> str:
    """The demo's ``.runcap/mission.yaml``."""
    # JSON strings are valid YAML double-quoted scalars: the command may hold any path.
    return f"""# Mission policy of the cage demo repository (see docs/policy.md).
version: v1
mission:
  name: fix-add
  task_class: bugfix
  description: add() in src/calc/ops.py subtracts; make tests/test_ops.py pass.
  issue: "1"
budget:
  mission_hard_limit_usd: {BUDGET_USD}
  max_runtime_minutes: {MAX_RUNTIME_MINUTES}
verification:
  command: {json.dumps(command)}
  timeout_seconds: {VERIFY_TIMEOUT_S}
  guard: strict
  evidence: {evidence}
  allow: ["src/**"]
"""


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo`` with the demo's environment; stdout as text. GitError on failure."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=repo,
            env=git_environment(),
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise GitError("git is not installed (or not on PATH): the demo needs it") from None
    if done.returncode != 0:
        raise GitError(
            f"`git {' '.join(args)}` failed in {repo} (exit {done.returncode}): "
            f"{done.stderr.strip()}"
        )
    return done.stdout


def _write(repo: Path, rel: str, text: str) -> None:
    target = repo / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def create_repository(repo: Path, command: str, evidence: str) -> str:
    """Create the demo repository at ``repo`` (two commits); returns the base commit SHA."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "symbolic-ref", "HEAD", "refs/heads/main")
    for rel, text in PRODUCT_FILES.items():
        _write(repo, rel, text)
    git(repo, "add", "--", *PRODUCT_FILES)
    git(repo, "commit", "-q", "--no-verify", "-m", "calc: add and sub (issue 1: add subtracts)")
    _write(repo, POLICY_PATH, policy_text(command, evidence))
    git(repo, "add", "--", POLICY_PATH)
    git(repo, "commit", "-q", "--no-verify", "-m", f"policy: mission fix-add, ${BUDGET_USD:g} cap")
    return git(repo, "rev-parse", "HEAD").strip()


def reset_repository(repo: Path, base: str) -> None:
    """Put ``repo`` back at ``base``: branch, index and files; receipts stay."""
    git(repo, "checkout", "-q", "-f", "main")
    git(repo, "reset", "-q", "--hard", base)
    # Receipts are untracked (cage mission run leaves them out of its snapshots): kept.
    git(repo, "clean", "-q", "-fd", "-e", f"/{OUTCOMES_DIR}/")
    age_checkout(repo)


def age_checkout(repo: Path, seconds: float = 60.0) -> None:
    """Date the tracked files ``seconds`` back and refresh the index's stat cache.

    A scripted agent edits a file within a second of this reset, often without changing its
    size (``-`` -> ``+``). git's stat cache cannot tell such an edit from the checked-out file
    when the index it reads is newer than the edit, and ``cage mission run`` snapshots from a
    copy of the index (a fresh file, so newer): the edit would vanish from the snapshot. With
    the recorded times a minute old, any edit changes the file's mtime in whole seconds.
    """
    listed = git(repo, "ls-files", "-z")
    then = time.time() - seconds
    for rel in filter(None, listed.split("\0")):
        os.utime(repo / rel, (then, then), follow_symlinks=False)
    git(repo, "update-index", "-q", "--refresh")
