"""`cage ci`: attested spend in the verdict, end to end with real git repositories.

Each test plays a mission: the agent's change is committed (the mission's snapshot), a spend
statement is signed over the snapshot's change digest with ``attest.sign`` (what the proxy
does), the receipt carrying it is committed on top, and CI adjudicates base..head with the
key in ``CAGE_ATTEST_KEY``. The verify command is a shell test that also fails when the
key reaches the replay's environment, so every PASS here proves the key stayed out of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from cage import attest
from cage.gitio import Repo
from tests.commands.ci_repo import (
    OPS_FIXED,
    Project,
    adjudicate,
    codes,
    finding_codes,
    run_ci,
)

KEY = "test-attest-key-0123456789abcdef"
OTHER_KEY = "another-key-fedcba9876543210xyz"
# Fails at base (add is buggy), passes at head; fails anywhere the attest key leaked into.
COMMAND = 'sh -c \'test -z "$CAGE_ATTEST_KEY" && grep -rq "a + b" src\''


def policy(limit: float = 5, spend_evidence: str | None = None) -> str:
    v = {"command": COMMAND, "timeout_seconds": 60, "allow": ["src/**"], "evidence": "exit-code"}
    text = (
        "version: v1\n"
        "mission:\n  name: Fix add\n"
        f"budget:\n  mission_hard_limit_usd: {limit}\n"
        f"verification: {json.dumps(v)}\n"
    )
    if spend_evidence is not None:
        text += f"spend_evidence: {spend_evidence}\n"
    return text


@pytest.fixture
def project(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    """The template project with this module's policy, and the attest key set."""
    repo = project
    repo.write(".runcap/mission.yaml", policy())
    repo.base = repo.commit("policy for spend tests")
    monkeypatch.setenv("CAGE_ATTEST_KEY", KEY)
    return repo


def set_policy(project: Project, **kw: Any) -> None:
    project.write(".runcap/mission.yaml", policy(**kw))
    project.base = project.commit("policy")


def spend(cost: float) -> dict[str, Any]:
    """A proxy spend snapshot: two calls of one model."""
    return {
        "by_model": {
            "gpt-4o": {
                "provider": "openai",
                "calls": 2,
                "input_tokens": 1200,
                "output_tokens": 300,
                "cache_read_tokens": 0,
                "cache_write_tokens": 0,
                "cost_usd": cost,
                "unpriced": 0,
            }
        },
        "truth": {"measured": {"calls": 2, "cost_usd": cost}},
        "prior_cost_usd": 0.0,
    }


def statement_for(
    project: Project,
    snapshot: str,
    *,
    cost: float = 0.75,
    key: str = KEY,
    base: str | None = None,
    mission_id: str = "m-1",
) -> dict[str, Any]:
    """What the mission's proxy signs: its spend, bound to base and the snapshot's change."""
    digest = attest.change_digest(Repo(project.path), snapshot)
    payload = attest.statement_payload(
        mission_id=mission_id,
        base=base or project.base,
        tree=digest,
        spend=spend(cost),
        cap_usd=5,
    )
    return attest.sign(payload, key.encode())


def receipt(statement: Any, mission_id: str = "m-1", claimed: float = 0.75) -> str:
    doc = {
        "schema": "cage.outcome-receipt/v1",
        "id": mission_id,
        "spend": {"cost_usd": claimed, "calls": 2},
        "verdict": "PASS",
        "spend_statement": statement,
    }
    return json.dumps(doc, indent=2) + "\n"


def receipt_path(mission_id: str = "m-1") -> str:
    return f".runcap/outcomes/{mission_id}/receipt.json"


def mission(project: Project, mission_id: str = "m-1", **kw: Any) -> dict[str, Any]:
    """The honest agent fixes add; the mission signs its spend; the receipt is committed."""
    project.fix()
    snapshot = project.commit("fix add")
    statement = statement_for(project, snapshot, mission_id=mission_id, **kw)
    project.write(receipt_path(mission_id), receipt(statement, mission_id))
    project.commit("mission receipt")
    return statement


def invalid_checks(doc: dict[str, Any]) -> list[str]:
    return [s["check"] for s in doc["spend"]["statements"] if not s["valid"]]


# -- honest missions -------------------------------------------------------------------------


def test_signed_spend_under_the_limit_passes_and_is_shown(project, capsys, monkeypatch, tmp_path):
    mission(project)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, doc, _ = adjudicate(capsys, project)
    assert code == 0 and doc["verdict"] == "PASS", doc["reasons"]
    spend = doc["spend"]
    assert spend["status"] == "attested"
    assert spend["total_usd"] == 0.75 and spend["calls"] == 2 and spend["limit_usd"] == 5
    assert spend["by_model"][0]["model"] == "gpt-4o"
    assert spend["statements"] == [
        {
            "source": receipt_path(),
            "valid": True,
            "check": "ok",
            "mission_id": "m-1",
            "cost_usd": 0.75,
            "prior_cost_usd": 0.0,
            "calls": 2,
            "unpriced": 0,
            "cap_usd": 5.0,
            "issued_at": spend["statements"][0]["issued_at"],
        }
    ]
    # The receipt is evidence: no scope or verifier finding.
    assert finding_codes(doc, receipt_path()) == set()
    text = summary.read_text()
    assert "### Spend" in text and "Attested spend **$0.7500**" in text
    assert KEY not in json.dumps(doc) and KEY not in text


def test_text_report_shows_attested_spend(project, capsys):
    mission(project)
    from cage.cli import main

    args = ["--repo", str(project.path), "--base", project.base, "--head", project.head()]
    code = main(["ci", "--mode", "adjudicate", *args])
    out = capsys.readouterr().out
    assert code == 0
    assert "spend: attested $0.7500 in 2 call(s) (limit $5)" in out


def test_signed_spend_over_the_limit_is_blocked(project, capsys):
    mission(project, cost=7.5)
    code, doc, _ = adjudicate(capsys, project)
    assert code == 1 and doc["verdict"] == "BLOCKED"
    assert codes(doc) == {"spend_over_limit"}
    assert doc["verification"]["replayed"]  # the change itself still verifies
    reason = next(r for r in doc["reasons"] if r["code"] == "spend_over_limit")
    assert "$7.5000" in reason["message"] and "$5" in reason["message"]
    assert doc["spend"]["total_usd"] == 7.5


def test_two_missions_for_the_same_change_are_summed(project, capsys):
    project.fix()
    snapshot = project.commit("fix add")
    for mission_id in ("m-1", "m-2"):
        statement = statement_for(project, snapshot, cost=3.0, mission_id=mission_id)
        project.write(receipt_path(mission_id), receipt(statement, mission_id))
    project.commit("two receipts")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 1 and "spend_over_limit" in codes(doc)
    assert doc["spend"]["total_usd"] == 6.0


# -- forgeries: ignored as evidence, each with the check that failed -----------------------


def test_unsigned_receipt_is_not_evidence(project, capsys):
    project.fix()
    project.write(receipt_path(), receipt(None, claimed=0.01))
    project.commit("fix with an unsigned receipt")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 0  # optional: informational only
    assert "spend_evidence_invalid" in codes(doc)
    assert doc["spend"]["status"] == "unattested" and doc["spend"]["total_usd"] is None
    assert invalid_checks(doc) == ["unsigned"]
    reason = next(r for r in doc["reasons"] if r["code"] == "spend_evidence_invalid")
    assert reason["path"] == receipt_path() and "unsigned" in reason["message"]


def test_statement_signed_with_another_key(project, capsys):
    mission(project, key=OTHER_KEY)
    _, doc, _ = adjudicate(capsys, project)
    assert invalid_checks(doc) == ["wrong_key"] and doc["spend"]["status"] == "unattested"


def test_edited_totals_break_the_signature(project, capsys):
    # The mission overspent; the agent lowers the figures in the committed receipt.
    statement = mission(project, cost=9.0)
    statement["payload"]["totals"]["cost_usd"] = 0.5
    statement["payload"]["by_model"][0]["cost_usd"] = 0.5
    project.write(receipt_path(), receipt(statement, claimed=0.5))
    project.commit("edit the receipt")
    code, doc, _ = adjudicate(capsys, project)
    assert invalid_checks(doc) == ["bad_signature"]
    assert "spend_over_limit" not in codes(doc) and code == 0


def test_edited_totals_under_required_need_a_human(project, capsys):
    set_policy(project, spend_evidence="required")
    statement = mission(project, cost=9.0)
    statement["payload"]["totals"]["cost_usd"] = 0.5
    project.write(receipt_path(), receipt(statement, claimed=0.5))
    project.commit("edit the receipt")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 3 and doc["verdict"] == "HUMAN_APPROVAL_REQUIRED"
    assert {"spend_unattested", "spend_evidence_invalid"} <= codes(doc)


def test_statement_moved_to_another_base(project, capsys):
    old_base = project.base
    project.write("README.md", "# calc, base moved on\n")
    project.base = project.commit("base moves on")
    # A statement made for the same change on the old base.
    mission(project, base=old_base)
    _, doc, _ = adjudicate(capsys, project)
    assert invalid_checks(doc) == ["wrong_base"]
    reason = next(r for r in doc["reasons"] if r["code"] == "spend_evidence_invalid")
    assert old_base[:12] in reason["message"]


def test_statement_moved_to_another_change(project, capsys):
    # An extra edit after the mission: head is no longer what the mission produced.
    mission(project)
    project.write("src/calc/ops.py", OPS_FIXED + "\n\ndef sub(a, b):\n    return a - b\n")
    project.commit("extra edit after the mission")
    code, doc, _ = adjudicate(capsys, project)
    assert invalid_checks(doc) == ["wrong_change"]
    assert code == 0 and doc["spend"]["status"] == "unattested"


def test_statement_copied_from_another_pull_request(project, capsys):
    # Pull request A: a cheap mission with another change, from the same base.
    project.write("src/calc/ops.py", OPS_FIXED.replace("a * b", "b * a"))
    other = project.commit("pull request A")
    stolen = statement_for(project, other, cost=0.01, mission_id="cheap")
    project.git("reset", "-q", "--hard", project.base)
    # Pull request B: its own expensive mission's receipt replaced by A's.
    project.fix()
    project.commit("pull request B")
    project.write(receipt_path("cheap"), receipt(stolen, "cheap", claimed=0.01))
    project.commit("receipt copied from A")
    _, doc, _ = adjudicate(capsys, project)
    assert invalid_checks(doc) == ["wrong_change"]


def test_receipt_that_is_not_json(project, capsys):
    project.fix()
    project.write(receipt_path(), "{not json")
    project.commit("broken receipt")
    _, doc, _ = adjudicate(capsys, project)
    assert invalid_checks(doc) == ["unreadable"]


# -- the policy's spend_evidence modes ---------------------------------------------------------


def test_off_ignores_statements_entirely(project, capsys):
    set_policy(project, spend_evidence="off")
    mission(project, cost=50.0)  # would be over the limit
    code, doc, _ = adjudicate(capsys, project)
    assert code == 0 and doc["spend"]["status"] == "off"
    assert doc["spend"]["statements"] == [] and not codes(doc) & {
        "spend_over_limit",
        "spend_evidence_invalid",
    }


def test_optional_without_statements_passes_unattested(project, capsys):
    project.fix()
    project.commit("fix without a mission")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 0 and doc["spend"]["status"] == "unattested"
    assert doc["spend"]["statements"] == []


def test_required_with_a_valid_statement_passes(project, capsys):
    set_policy(project, spend_evidence="required")
    mission(project)
    code, doc, _ = adjudicate(capsys, project)
    assert code == 0 and doc["spend"]["status"] == "attested", doc["reasons"]


def test_required_without_a_statement_needs_a_human(project, capsys):
    set_policy(project, spend_evidence="required")
    project.fix()
    project.commit("fix without a mission")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 3 and codes(doc) == {"spend_unattested"}
    # The person asked to approve still learns whether the change verifies.
    assert doc["verification"]["status"] == "VERIFIED_WEAK"


# -- the CI key ----------------------------------------------------------------------------


def test_no_key_configured_in_ci(project, capsys, monkeypatch):
    mission(project)
    monkeypatch.setenv("CAGE_ATTEST_KEY", "")  # the Action's default when attest-key is unset
    code, doc, _ = adjudicate(capsys, project)
    assert code == 0 and invalid_checks(doc) == ["no_key_configured"]
    assert doc["spend"]["key_configured"] is False


def test_no_key_configured_under_required(project, capsys, monkeypatch):
    set_policy(project, spend_evidence="required")
    mission(project)
    monkeypatch.delenv("CAGE_ATTEST_KEY")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 3 and "spend_unattested" in codes(doc)
    message = next(r["message"] for r in doc["reasons"] if r["code"] == "spend_unattested")
    assert "no attest key is configured" in message


def test_short_key_is_a_usage_error_that_hides_the_key(project, capsys, monkeypatch):
    from cage.cli import main

    monkeypatch.setenv("CAGE_ATTEST_KEY", "tooshortkey")
    mission(project)
    code = main(["ci", "--mode", "adjudicate", "--base", project.base, "--head", project.head()])
    out, err = capsys.readouterr()
    assert code == 2 and "11 bytes" in err and "tooshortkey" not in err + out


def test_key_file_option(project, capsys, monkeypatch, tmp_path):
    mission(project)
    monkeypatch.delenv("CAGE_ATTEST_KEY")
    key_file = tmp_path / "attest.key"
    key_file.write_text(KEY + "\n")
    code, doc, _ = run_ci(
        capsys,
        "--repo",
        str(project.path),
        "--base",
        project.base,
        "--head",
        project.head(),
        "--attest-key-file",
        str(key_file),
    )
    assert code == 0 and doc["spend"]["status"] == "attested"


# -- --spend-evidence ------------------------------------------------------------------------


def test_spend_evidence_file(project, capsys, tmp_path):
    project.fix()
    head = project.commit("fix; the statement travels outside the repository")
    evidence = tmp_path / "statement.json"
    evidence.write_text(json.dumps(statement_for(project, head, cost=1.25)))
    code, doc, _ = run_ci(
        capsys,
        "--repo",
        str(project.path),
        "--base",
        project.base,
        "--head",
        head,
        "--spend-evidence",
        str(evidence),
    )
    assert code == 0 and doc["spend"]["status"] == "attested"
    assert doc["spend"]["total_usd"] == 1.25
    assert doc["spend"]["statements"][0]["source"] == str(evidence)
    assert doc["spend"]["evidence_path"] == str(evidence)


def test_spend_evidence_file_missing_is_a_usage_error(project, capsys, tmp_path):
    """A path the workflow names but that is not there must not read as "no evidence"."""
    from cage.cli import main

    set_policy(project, spend_evidence="required")
    project.fix()
    head = project.commit("fix")
    gone = tmp_path / "gone.json"
    args = ["ci", "--json", "--repo", str(project.path), "--base", project.base, "--head", head]
    code = main([*args, "--spend-evidence", str(gone)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert f"--spend-evidence {gone}: no such file" in err
    code = main([*args, "--spend-evidence", str(tmp_path)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert "is a directory, not a file" in err


# -- receipts are exempt from scope and verifier findings, and only receipts ---------------


def test_only_the_receipt_file_is_exempt(project, capsys):
    mission(project)
    project.write(".runcap/outcomes/m-1/evil.py", "import os\n")
    project.commit("a file beside the receipt")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 3 and doc["verdict"] == "HUMAN_APPROVAL_REQUIRED"
    assert finding_codes(doc, receipt_path()) == set()
    assert "verifier_touched" in finding_codes(doc, ".runcap/outcomes/m-1/evil.py")
    # The statement itself still verifies: the digest ignores .runcap/outcomes/.
    assert doc["spend"]["status"] == "attested"


def test_receipts_already_at_base_are_not_evidence(project, capsys):
    mission(project)
    project.base = project.head()  # the first pull request merged, receipt and all
    project.write("src/calc/ops.py", OPS_FIXED + "\n\ndef sub(a, b):\n    return a - b\n")
    project.commit("next pull request, no mission")
    _, doc, _ = adjudicate(capsys, project)
    assert doc["spend"]["statements"] == [] and "spend_evidence_invalid" not in codes(doc)


# -- end to end: `cage mission run` signs, `cage ci` verifies ---------------------------------

AGENT = r"""
import json, os, sys, urllib.request

body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "fix the add bug"}]}).encode()
request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=body,
    headers={"content-type": "application/json", "x-api-key": "sk-ant-test",
             "anthropic-version": "2023-06-01"})
with urllib.request.urlopen(request) as response:
    response.read()
with open(sys.argv[1], "w") as fh:
    json.dump(sorted(k for k in os.environ if "ATTEST" in k.upper()), fh)
with open("src/calc/ops.py", "w") as fh:
    fh.write(sys.argv[2])
"""


CAGE = [sys.executable, "-m", "cage"]


def test_mission_run_signs_and_ci_verifies(project, capsys, tmp_path):
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    seen = tmp_path / "seen.json"
    agent_argv = [sys.executable, str(agent), str(seen), OPS_FIXED]
    done = subprocess.run(
        [*CAGE, "mission", "run", "--mock", "--id", "e2e", "--json", "--", *agent_argv],
        cwd=project.path,
        env=dict(os.environ, CAGE_ATTEST_KEY=KEY),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(seen.read_text()) == []  # the agent never saw the key
    receipt_doc = json.loads((project.path / receipt_path("e2e")).read_text())
    statement = receipt_doc["spend_statement"]
    assert statement["key_id"] == attest.key_id(KEY.encode())
    assert statement["payload"]["base"] == project.base
    assert statement["payload"]["totals"]["calls"] == 1
    assert KEY not in json.dumps(receipt_doc) + done.stdout + done.stderr
    # The mission's own verdict already counted its signed spend.
    assert receipt_doc["verdict"] == "PASS"
    from cage.cli import main

    assert main(["outcome", "show", "e2e", "--repo", str(project.path)]) == 0
    shown = capsys.readouterr().out
    assert f"spend statement: signed HMAC-SHA256, key id {statement['key_id']}" in shown

    project.commit("the agent's fix and its receipt")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 0 and doc["spend"]["status"] == "attested", doc["reasons"]
    assert doc["spend"]["calls"] == 1
    assert doc["spend"]["total_usd"] == statement["payload"]["totals"]["cost_usd"] > 0
    assert doc["spend"]["by_model"][0]["model"] == "claude-sonnet-4-5"

    # A maintainer's fix-up after the mission: the statement no longer describes the change.
    project.write("src/calc/ops.py", OPS_FIXED + "# reviewed\n")
    project.commit("fix-up")
    _, doc, _ = adjudicate(capsys, project)
    assert invalid_checks(doc) == ["wrong_change"]


# -- two jobs: the key only where no code of the change runs --------------------------------


def test_spend_mode_judges_statements_without_running_the_change(project, capsys):
    from cage.cli import main

    set_policy(project, spend_evidence="required")
    mission(project)
    args = ["--repo", str(project.path), "--base", project.base, "--head", project.head()]
    code = main(["ci", "--mode", "spend", "--json", *args])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verdict"] == "PASS" and doc["spend"]["status"] == "attested"
    # No worktree, no replay: nothing of the change ran in the job that holds the key.
    assert doc["verification"]["replayed"] is False
    assert "--mode spend" in doc["verification"]["skipped_reason"]
    assert not any(k.startswith(("worktree", "replay")) for k in doc["timings"])
    assert project.git("worktree", "list").count("\n") == 1


def test_spend_mode_blocks_over_the_limit_and_needs_a_human_without_a_statement(project, capsys):
    from cage.cli import main

    set_policy(project, spend_evidence="required")
    mission(project, cost=9.0)
    args = ["--repo", str(project.path), "--base", project.base, "--head", project.head()]
    assert main(["ci", "--mode", "spend", "--json", *args]) == 1
    assert codes(json.loads(capsys.readouterr().out)) == {"spend_over_limit"}
    project.write(receipt_path(), receipt(None))
    project.commit("receipt without a statement")
    args[-1] = project.head()
    assert main(["ci", "--mode", "spend", "--json", *args]) == 3
    assert "spend_unattested" in codes(json.loads(capsys.readouterr().out))


def test_spend_elsewhere_leaves_spend_to_the_other_job(project, capsys, monkeypatch):
    set_policy(project, spend_evidence="required")
    project.fix()
    project.commit("fix, no statement: the spend job decides")
    monkeypatch.delenv("CAGE_ATTEST_KEY")
    code, doc, err = run_ci(
        capsys,
        "--repo",
        str(project.path),
        "--base",
        project.base,
        "--head",
        project.head(),
        "--spend-elsewhere",
    )
    assert code == 0 and doc["spend"]["status"] == "elsewhere" and "warning" not in err
    assert not codes(doc) & {"spend_unattested", "spend_evidence_invalid"}
