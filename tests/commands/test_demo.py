"""`cage demo` end to end: real `cage mission run` children, real proxy, real ledger.

One full demo run (`cage demo --json` as a child process, shared by the tests that read its
document) and one in-process run of the spinner mission alone, given a wrong expectation, for
the text output, `--keep` and the self-test's failure path. Each mission takes seconds.
"""

from __future__ import annotations

import dataclasses
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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`cage demo --json` with a user ledger in CAGE_LEDGER and a private TMPDIR."""
    tmp = tmp_path_factory.mktemp("demo-json")
    user_ledger = tmp / "user-ledger.db"
    before = _user_ledger(user_ledger)
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir()
    env = dict(os.environ, CAGE_LEDGER=str(user_ledger), TMPDIR=str(tmpdir))
    done = subprocess.run(
        [sys.executable, "-m", "cage", "demo", "--json"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)  # stdout is one JSON document and nothing else
    return done, document, tmpdir, user_ledger.read_bytes() == before


def test_three_missions_get_the_expected_verdicts(demo_run):
    _, document, _, _ = demo_run
    assert document["schema"] == "cage.demo/v1"
    assert document["ok"] is True
    got = {m["id"]: m["verdict"] for m in document["missions"]}
    assert got == EXPECTED
    by_id = {m["id"]: m for m in document["missions"]}
    assert "verifier_touched" in by_id["test-editor"]["reasons"]
    assert "budget_exceeded" in by_id["spinner"]["reasons"]
    assert all(m["as_expected"] and m["error"] is None for m in document["missions"])


def test_spend_is_real_ledger_data_and_the_spinner_stays_under_the_cap(demo_run):
    _, document, _, _ = demo_run
    by_id = {m["id"]: m for m in document["missions"]}
    for mission in document["missions"]:
        assert mission["spend"]["calls"] > 0
        assert 0 < mission["spend"]["cost_usd"] <= BUDGET_USD
        assert mission["spend"]["unpriced"] == 0
    spinner = by_id["spinner"]
    assert spinner["budget_guard_refusals"], "the spinner never saw a 429 budget_guard"
    assert "cap" in spinner["budget_guard_refusals"][0]
    assert spinner["spend"]["cost_usd"] > 10 * by_id["honest-fix"]["spend"]["cost_usd"]
    totals = document["totals"]
    assert totals["calls"] == sum(m["spend"]["calls"] for m in document["missions"])
    assert totals["cost_usd"] == pytest.approx(
        sum(m["spend"]["cost_usd"] for m in document["missions"]), abs=1e-5
    )
    assert len(totals["by_model"]) == 2
    voc = document["verified_outcome_cost"]
    assert (voc["outcomes"], voc["verified_outcomes"]) == (3, 1)
    assert voc["verified_spend_usd"] == pytest.approx(
        by_id["honest-fix"]["spend"]["cost_usd"], abs=1e-6
    )


def test_the_users_ledger_is_untouched_and_the_directory_removed(demo_run):
    _, document, tmpdir, user_ledger_untouched = demo_run
    assert user_ledger_untouched
    assert Path(document["ledger"]).parent == Path(document["directory"])
    assert document["kept"] is False
    # Everything the demo made in the temporary directory is gone (repo, worktrees, logs).
    assert list(tmpdir.iterdir()) == []


def test_progress_goes_to_stderr(demo_run):
    done, _, _, _ = demo_run
    for number in (1, 2, 3):
        assert f"mission {number}/3:" in done.stderr
    assert "PASS in" in done.stderr
    assert "Traceback" not in done.stderr


def test_text_keep_and_an_unexpected_verdict(monkeypatch, capsys, tmp_path):
    """The spinner alone, told to expect PASS: text output, --keep, exit 1 with why; and as
    on a fresh `pip install '.[proxy]'`, without pytest: unittest, exit-code evidence."""
    from cage.cli import main
    from cage.demo import missions, repository

    monkeypatch.setattr(repository, "has_pytest", lambda: False)

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    wrong = dataclasses.replace(missions.SCENARIOS[2], expected="PASS")
    monkeypatch.setattr(missions, "SCENARIOS", (wrong,))
    assert main(["demo", "--keep"]) == 1
    out, err = capsys.readouterr()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("cage-demo-")]
    try:
        assert len(kept) == 1 and f"kept {kept[0]}" in err
        assert "BLOCKED" in out and "budget_exceeded" in out
        assert "the agent got HTTP 429 budget_guard: cage budget guard:" in out
        assert "spend, from the demo's own ledger" in out and "claude-sonnet-4-5" in out
        assert "\033[" not in out  # no colour when stdout is not a terminal
        assert "-m unittest -q tests.test_ops  (evidence: exit-code)" in out
        assert "pytest is not installed here" in out
        assert "Verified Outcome Cost over 1 mission(s), 0 verified" in out
        assert "FAILED" in out
        assert "spinner ended BLOCKED, expected PASS" in err
        receipt = kept[0] / "calc" / ".runcap" / "outcomes" / "spinner" / "receipt.json"
        assert json.loads(receipt.read_text())["verdict"] == "BLOCKED"
        assert str(receipt.parent.parent) in out
    finally:
        for path in kept:
            shutil.rmtree(path, ignore_errors=True)
