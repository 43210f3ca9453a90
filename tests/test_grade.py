"""`cage ci --mode grade`: receipts read from the head commit's objects, ledger spend,
everything marked claimed, never a gate."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from cage import grade
from cage.errors import UsageError
from cage.ledger import Event, Ledger
from tests.test_outcome import receipt


def namespace(repo, base=None, head=None, as_json=True) -> argparse.Namespace:
    return argparse.Namespace(
        mode="grade", base=base, head=head, repo=str(repo), json=as_json, spend_evidence=None
    )


@pytest.fixture
def pr(git_repo):
    """base: code plus an old receipt; head: two new receipts (one broken) and a change."""
    git_repo.write("src/a.py", "A = 1\n")
    git_repo.write(".runcap/outcomes/old/receipt.json", json.dumps(receipt("old")))
    base = git_repo.commit("base")
    git_repo.write("src/a.py", "A = 2\n")
    good = receipt("m1", "PASS", 0.25)
    good["base"] = base
    git_repo.write(".runcap/outcomes/m1/receipt.json", json.dumps(good))
    git_repo.write(".runcap/outcomes/m2/receipt.json", "{not json")
    head = git_repo.commit("head")
    git_repo.base, git_repo.head_sha = base, head
    return git_repo


def test_reports_receipts_of_the_change_from_git_objects(pr, capsys, monkeypatch):
    # The working tree says something else: grade mode reads the head commit only.
    pr.write(".runcap/outcomes/m1/receipt.json", json.dumps(receipt("m1", "PASS", 99.0)))
    pr.write(".runcap/outcomes/wt/receipt.json", json.dumps(receipt("wt")))
    summary = pr.path.parent / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    with Ledger.open(os.environ["CAGE_LEDGER"]) as ledger:
        ledger.add(
            Event(
                timestamp="2026-11-23T10:00:00Z",
                provider="anthropic",
                model="claude-sonnet-4-5",
                input_tokens=10,
                output_tokens=5,
                cost_usd=0.125,
                truth="measured",
                mission_id="m1",
                request_id="r1",
            )
        )
    code = grade.run(namespace(pr.path, pr.base, pr.head_sha))
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema"] == "cage.grade/v1" and report["advisory"] is True
    by_path = {e["path"]: e for e in report["receipts"]}
    assert set(by_path) == {
        ".runcap/outcomes/m1/receipt.json",
        ".runcap/outcomes/m2/receipt.json",
    }  # not the base's old receipt, not the working tree's
    m1 = by_path[".runcap/outcomes/m1/receipt.json"]
    assert m1["status"] == "claimed (not attested)" and m1["attested"] is False
    assert m1["spend_usd"] == 0.25 and m1["verdict"] == "PASS" and m1["base_matches"] is True
    assert m1["ledger"]["cost_usd"] == pytest.approx(0.125) and m1["ledger"]["calls"] == 1
    m2 = by_path[".runcap/outcomes/m2/receipt.json"]
    assert m2["status"] == "unreadable" and "not valid JSON" in m2["error"]
    totals = report["totals"]
    assert totals["receipts"] == 2 and totals["unreadable"] == 1
    assert totals["claimed_spend_usd"] == 0.25
    assert totals["ledger_spend_usd"] == pytest.approx(0.125)
    assert totals["voc"]["verified_spend_usd"] == 0.25
    text = summary.read_text()
    assert "cage grade (advisory)" in text and "claimed (not attested)" in text
    assert "m1" in text


def test_text_output_and_no_ledger_is_created(pr, capsys, monkeypatch, tmp_path):
    missing = tmp_path / "none" / "ledger.db"
    monkeypatch.setenv("CAGE_LEDGER", str(missing))
    assert grade.run(namespace(pr.path, pr.base, pr.head_sha, as_json=False)) == 0
    out = capsys.readouterr().out
    assert "advisory, never gates" in out
    assert "m1: PASS, $0.2500 in 3 call(s), claimed (not attested)" in out
    assert "unreadable" in out
    assert not missing.exists()


def test_receipt_content_is_escaped_in_the_summary(git_repo, capsys, monkeypatch):
    git_repo.write("x", "1")
    base = git_repo.commit()
    evil = receipt("evil")
    evil["schema"] = "<img src=y>"  # quoted into the error message: must be escaped
    git_repo.write(".runcap/outcomes/evil/receipt.json", json.dumps(evil))
    head = git_repo.commit()
    summary = git_repo.path.parent / "s.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert grade.run(namespace(git_repo.path, base, head)) == 0
    assert "img src" in json.loads(capsys.readouterr().out)["receipts"][0]["error"]
    text = summary.read_text()
    assert "unreadable" in text and "img" in text and "<img" not in text


def test_no_receipts_is_fine(git_repo, capsys):
    git_repo.write("x", "1")
    base = git_repo.commit()
    git_repo.write("x", "2")
    head = git_repo.commit()
    assert grade.run(namespace(git_repo.path, base, head)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["receipts"] == [] and report["totals"]["claimed_spend_usd"] == 0


def test_wrong_use_is_a_usage_error(git_repo, monkeypatch):
    git_repo.write("x", "1")
    base = git_repo.commit()
    monkeypatch.delenv("GITHUB_EVENT_NAME", raising=False)
    monkeypatch.delenv("GITHUB_EVENT_PATH", raising=False)
    with pytest.raises(UsageError, match="both --base and --head"):
        grade.run(namespace(git_repo.path, base, None))
    with pytest.raises(UsageError, match="no --base/--head"):
        grade.run(namespace(git_repo.path))
    with pytest.raises(UsageError, match="does not resolve"):
        grade.run(namespace(git_repo.path, base, "no-such-ref"))


def test_event_gives_the_revisions(pr, capsys, monkeypatch, tmp_path):
    event = tmp_path / "event.json"
    event.write_text(
        json.dumps({"pull_request": {"base": {"sha": pr.base}, "head": {"sha": pr.head_sha}}})
    )
    monkeypatch.setenv("GITHUB_EVENT_NAME", "pull_request")
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(event))
    assert grade.run(namespace(pr.path)) == 0
    assert json.loads(capsys.readouterr().out)["head"] == pr.head_sha


def test_cage_ci_mode_grade_dispatches_here(pr, capsys):
    from cage.cli import main

    code = main(
        ["ci", "--mode", "grade", "--repo", str(pr.path), "--base", pr.base, "--head", pr.head_sha]
    )
    assert code == 0
    assert "claimed (not attested)" in capsys.readouterr().out
    assert main(["ci", "--mode", "grade", "--repo", str(pr.path), "--base", pr.base]) == 2
