"""`cage demo` end to end: a real child process running three real `cage mission run`s.

Two demo runs in all (each a few seconds): one `--json --keep`, shared by the tests that read
its document and its kept directory, and one in text mode that must clean up after itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cage.ledger import Event, Ledger

EXPECTED = {
    "honest-fix": "PASS",
    "test-editor": "HUMAN_APPROVAL_REQUIRED",
    "spinner": "BLOCKED",
}
BUDGET_USD = 0.05


def _user_ledger(path: Path) -> bytes:
    """A user's ledger with one event in it; returns its bytes, to check it is untouched."""
    with Ledger.open(path) as ledger:
        ledger.add(
            Event(
                timestamp="2026-11-01T10:00:00Z",
                provider="openai",
                model="gpt-4.1-mini",
                input_tokens=10,
                output_tokens=5,
                request_id="user-1",
                mission_id="user-mission",
            )
        )
    return path.read_bytes()


def _run_demo(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path, bytes]:
    user_ledger = tmp / "user-ledger.db"
    before = _user_ledger(user_ledger)
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir()
    env = dict(os.environ, CAGE_LEDGER=str(user_ledger), TMPDIR=str(tmpdir))
    env.pop("NO_COLOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "cage", "demo", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert user_ledger.read_bytes() == before, "the demo wrote to the user's ledger"
    return done, tmpdir, before


@pytest.fixture(scope="module")
def kept_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo-json")
    done, tmpdir, _ = _run_demo(tmp, "--json", "--keep")
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)  # stdout is one JSON document and nothing else
    yield done, document, tmpdir
    shutil.rmtree(document["directory"], ignore_errors=True)


def test_three_missions_get_the_expected_verdicts(kept_demo):
    _, document, _ = kept_demo
    assert document["schema"] == "cage.demo/v1"
    assert document["ok"] is True
    got = {m["id"]: m["verdict"] for m in document["missions"]}
    assert got == EXPECTED
    by_id = {m["id"]: m for m in document["missions"]}
    assert "verifier_touched" in by_id["test-editor"]["reasons"]
    assert any("budget" in code for code in by_id["spinner"]["reasons"])
    assert all(m["as_expected"] and m["error"] is None for m in document["missions"])


def test_spend_is_real_ledger_data_and_the_spinner_stays_under_the_cap(kept_demo):
    _, document, _ = kept_demo
    by_id = {m["id"]: m for m in document["missions"]}
    for mission in document["missions"]:
        assert mission["spend"]["calls"] > 0
        assert 0 < mission["spend"]["cost_usd"] <= BUDGET_USD
        assert mission["spend"]["unpriced"] == 0
    spinner = by_id["spinner"]
    assert spinner["budget_guard_refusals"], "the spinner never saw a 429 budget_guard"
    assert "cap" in spinner["budget_guard_refusals"][0]
    assert spinner["spend"]["cost_usd"] > by_id["honest-fix"]["spend"]["cost_usd"]
    totals = document["totals"]
    assert totals["calls"] == sum(m["spend"]["calls"] for m in document["missions"])
    assert totals["cost_usd"] == pytest.approx(
        sum(m["spend"]["cost_usd"] for m in document["missions"]), abs=1e-5
    )
    assert len(totals["by_model"]) == 2
    # The demo's ledger holds exactly what the report says, and lives in the demo directory.
    assert Path(document["ledger"]).parent == Path(document["directory"])
    with Ledger.open(document["ledger"]) as ledger:
        assert ledger.mission_spend("spinner")["calls"] == spinner["spend"]["calls"]
        assert ledger.mission_spend("user-mission")["calls"] == 0


def test_keep_leaves_the_repository_receipts_and_logs(kept_demo):
    done, document, tmpdir = kept_demo
    directory = Path(document["directory"])
    assert document["kept"] is True
    assert directory.is_dir() and directory.parent == tmpdir
    assert f"kept {directory}" in done.stderr
    for mission_id, verdict in EXPECTED.items():
        receipt = Path(document["receipts"]) / mission_id / "receipt.json"
        assert json.loads(receipt.read_text())["verdict"] == verdict
    repo = Path(document["repository"])
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True
    )
    # Left at its base commit; the receipts are the only untracked files.
    assert status.stdout == "?? .runcap/outcomes/\n"


def test_progress_goes_to_stderr(kept_demo):
    done, _, _ = kept_demo
    for number in (1, 2, 3):
        assert f"mission {number}/3:" in done.stderr
    assert "PASS in" in done.stderr
    assert "Traceback" not in done.stderr


def test_text_mode_prints_verdicts_reasons_spend_and_cleans_up(tmp_path):
    done, tmpdir, _ = _run_demo(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for verdict in EXPECTED.values():
        assert verdict in out
    assert "verifier_touched" in out
    assert "HTTP 429 budget_guard" in out
    assert "spend, from the demo's own ledger" in out
    assert "receipts were in" in out
    assert "\033[" not in out  # no colour when stdout is not a terminal
    # Everything the demo made in the temporary directory is gone (repo, worktrees, logs).
    assert list(tmpdir.iterdir()) == []
