"""`cage outcome show|list`: receipts in the working tree, VOC numbers, errors."""

from __future__ import annotations

import json

import pytest

from cage.cli import main
from tests.test_outcome import receipt, write


@pytest.fixture
def repo(git_repo):
    git_repo.write("README.md", "x\n")
    git_repo.commit("init")
    write(git_repo.path, receipt("m1", "PASS", 0.30, started="2026-11-23T10:00:00Z"))
    write(
        git_repo.path,
        receipt(
            "m2",
            "BLOCKED",
            0.50,
            started="2026-11-23T11:00:00Z",
            reasons=[{"code": "budget_exceeded", "message": "cap"}],
        ),
    )
    write(git_repo.path, receipt("m3", "PASS", 0.20, started="2026-11-23T12:00:00Z"))
    return git_repo


def test_list_json_has_every_receipt_and_voc(repo, capsys):
    assert main(["outcome", "list", "--repo", str(repo.path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [o["id"] for o in doc["outcomes"]] == ["m1", "m2", "m3"]
    assert doc["outcomes"][1]["reasons"] == ["budget_exceeded"]
    voc = doc["voc"]
    assert voc["total_spend_usd"] == pytest.approx(1.0)
    assert voc["verified_spend_usd"] == pytest.approx(0.5)
    assert voc["unverified_share"] == pytest.approx(0.5)
    assert voc["cost_per_verified_outcome_usd"] == pytest.approx(0.5)


def test_list_text(repo, capsys):
    assert main(["outcome", "list", "--repo", str(repo.path)]) == 0
    out = capsys.readouterr().out
    assert "m2  2026-11-23T11:00:00Z  BLOCKED" in out and "budget_exceeded" in out
    assert "verified spend        $0.5000" in out
    assert "bought nothing        $0.5000 (50.0% of the spend)" in out


def test_show_latest_and_by_id(repo, capsys):
    assert main(["outcome", "show", "--repo", str(repo.path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["receipt"]["id"] == "m3"
    assert doc["receipt_path"].endswith(".runcap/outcomes/m3/receipt.json")
    assert doc["voc"]["outcomes"] == 3
    assert main(["outcome", "show", "m2", "--repo", str(repo.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mission m2: BLOCKED")
    assert "budget_exceeded: cap" in out
    assert "anthropic/claude-sonnet-4-5" in out and "measured" in out
    assert "bought nothing verified" in out


def test_show_from_a_subdirectory_finds_the_repository_root(repo, capsys, monkeypatch):
    (repo.path / "sub").mkdir()
    monkeypatch.chdir(repo.path / "sub")
    assert main(["outcome", "show", "m1"]) == 0
    assert "mission m1: PASS" in capsys.readouterr().out


def test_malformed_receipt_is_an_error_naming_the_file(repo, capsys):
    bad = repo.path / ".runcap/outcomes/m9/receipt.json"
    bad.parent.mkdir()
    bad.write_text("{broken")
    assert main(["outcome", "list", "--repo", str(repo.path)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid JSON" in err


def test_unknown_id_and_no_receipts(git_repo, capsys):
    git_repo.write("a", "a")
    git_repo.commit()
    assert main(["outcome", "show", "nope", "--repo", str(git_repo.path)]) == 1
    assert "no such receipt" in capsys.readouterr().err
    assert main(["outcome", "show", "--repo", str(git_repo.path)]) == 1
    assert "no receipts in" in capsys.readouterr().err
    assert main(["outcome", "list", "--repo", str(git_repo.path)]) == 0
    assert "no mission receipts yet" in capsys.readouterr().out
    assert main(["outcome"]) == 2


def test_a_corrupt_or_fifo_receipt_does_not_hide_the_others(repo, capsys):
    import os

    bad = repo.path / ".runcap/outcomes/m9/receipt.json"
    bad.parent.mkdir()
    bad.write_text("")
    fifo = repo.path / ".runcap/outcomes/m8/receipt.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    assert main(["outcome", "list", "--repo", str(repo.path), "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [o["id"] for o in doc["outcomes"]] == ["m1", "m2", "m3"]
    assert str(bad) in doc["unreadable"][0] and str(bad) in captured.err
    # The good receipts stay readable one by one; the FIFO is refused, never waited on.
    assert main(["outcome", "show", "m2", "--repo", str(repo.path)]) == 1
    assert capsys.readouterr().out.startswith("mission m2: BLOCKED")
    assert main(["outcome", "show", "m8", "--repo", str(repo.path)]) == 1
    assert "m8/receipt.json: not a regular file" in capsys.readouterr().err
