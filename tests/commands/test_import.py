"""`cage import` as a user runs it: sub-commands, help, --json purity, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.importers.conftest import claude_line, write_lines


def cage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cage", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_the_three_sources():
    done = cage("import", "--help")
    assert done.returncode == 0
    for source in ("claude-code", "codex", "jsonl"):
        assert source in done.stdout


def test_no_source_is_a_usage_error():
    done = cage("import")
    assert done.returncode == 2
    assert "claude-code|codex|jsonl" in done.stderr
    assert "Traceback" not in done.stderr


def test_jsonl_needs_a_file():
    done = cage("import", "jsonl")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_json_output_is_one_document_and_ledger_flag_is_used(tmp_path: Path):
    write_lines(tmp_path / "claude" / "projects" / "p" / "s.jsonl", [claude_line(), "{broken"])
    ledger = tmp_path / "elsewhere.db"
    done = cage(
        "import", "claude-code", str(tmp_path / "claude"), "--ledger", str(ledger), "--json"
    )
    assert done.returncode == 1  # a bad line: reported, the rest imported
    doc = json.loads(done.stdout)
    assert (doc["imported"], doc["bad_lines"], doc["ledger"]) == (1, 1, str(ledger))
    assert done.stderr.startswith("cage: 1 bad line")
    assert doc["errors"][0]["line"] == 2
    assert ledger.exists()


def test_unreadable_ledger_is_a_clear_error(tmp_path: Path):
    write_lines(tmp_path / "claude" / "projects" / "p" / "s.jsonl", [claude_line()])
    bad = tmp_path / "not-a-db"
    bad.write_bytes(b"this is not sqlite" * 100)
    done = cage("import", "claude-code", str(tmp_path / "claude"), "--ledger", str(bad))
    assert done.returncode == 1
    assert done.stderr.startswith("cage: ")
    assert "Traceback" not in done.stderr


def test_unreadable_file_is_named_and_the_rest_imported(tmp_path: Path):
    if os.geteuid() == 0:
        # root reads anything: make the file unreadable another way (a directory in its place
        # is skipped by the glob, so use a dangling symlink, which open() cannot follow).
        target = tmp_path / "claude" / "projects" / "p" / "gone.jsonl"
        target.parent.mkdir(parents=True)
        target.symlink_to(tmp_path / "missing-target.jsonl")
    else:
        target = write_lines(
            tmp_path / "claude" / "projects" / "p" / "locked.jsonl", [claude_line()]
        )
        target.chmod(0)
    write_lines(tmp_path / "claude" / "projects" / "p" / "ok.jsonl", [claude_line("msg_ok", "r")])
    done = cage("import", "claude-code", str(tmp_path / "claude"), "--json")
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert doc["imported"] == 1
    assert doc["failures"][0]["file"] == str(target)
    assert str(target) in done.stderr


def test_a_path_with_a_tilde_for_an_unknown_user_is_a_missing_file_not_a_traceback(capsys):
    from cage.cli import main

    assert main(["import", "jsonl", "~nosuchuser-cage-qa/x.jsonl"]) == 1
    assert "~nosuchuser-cage-qa/x.jsonl: no such file" in capsys.readouterr().out
