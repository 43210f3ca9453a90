"""Shared fixtures: real git repositories in tmp_path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# Tests never read the developer's git configuration or ledger.
os.environ["GIT_CONFIG_GLOBAL"] = os.devnull
os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
os.environ.setdefault("GIT_AUTHOR_NAME", "cage-test")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "cage-test")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")


class GitRepo:
    """A throw-away git repository driven by the real git binary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str, input: bytes | None = None) -> str:
        """Run git in the repository and return its stdout (text)."""
        done = subprocess.run(
            ["git", *args], cwd=self.path, input=input, capture_output=True, check=True
        )
        return done.stdout.decode("utf-8", "surrogateescape")

    def write(self, rel: str, content: str | bytes, mode: int | None = None) -> Path:
        """Write a file (creating folders); ``mode`` sets permission bits."""
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        target.write_bytes(content)
        if mode is not None:
            target.chmod(mode)
        return target

    def remove(self, rel: str) -> None:
        """Delete a tracked file from the working tree and the index."""
        self.git("rm", "-q", "--", rel)

    def commit(self, message: str = "change") -> str:
        """Stage everything and commit; returns the new commit SHA."""
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").strip()


@pytest.fixture
def git_repo(tmp_path: Path) -> GitRepo:
    """An empty git repository on branch main."""
    return GitRepo(tmp_path / "repo")


@pytest.fixture(autouse=True)
def _private_ledger(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own ledger file, never the user's."""
    monkeypatch.setenv("CAGE_LEDGER", str(tmp_path_factory.mktemp("ledger") / "ledger.db"))
