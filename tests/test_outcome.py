"""Receipts: ids, secret redaction, atomic writes, strict reading, the Verified Outcome Cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cage import outcome
from cage.errors import ReceiptError


def receipt(
    mission_id: str,
    verdict: str = "PASS",
    total: float = 0.1,
    started: str = "2026-11-23T10:00:00Z",
    unpriced: int = 0,
    reasons: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A minimal valid receipt (the shape `cage mission run` writes)."""
    return {
        "schema": outcome.SCHEMA,
        "id": mission_id,
        "started_at": started,
        "ended_at": started,
        "runtime_s": 1.5,
        "agent": {"argv": ["claude", "-p", "fix"], "exit_code": 0, "stopped_by": None},
        "policy": {"path": ".runcap/mission.yaml", "source": "base", "hash": "ab" * 32},
        "base": "1" * 40,
        "snapshot": {"commit": "2" * 40, "tree": "3" * 40},
        "spend": {
            "total_usd": total,
            "calls": 3,
            "unpriced": unpriced,
            "by_model": [
                {
                    "provider": "anthropic",
                    "model": "claude-sonnet-4-5",
                    "calls": 3,
                    "cost_usd": total,
                    "unpriced": unpriced,
                    "truth": {"measured": 3, "modeled": 0, "estimated": 0},
                }
            ],
            "truth": {"measured": 3, "modeled": 0, "estimated": 0},
            "cap_usd": 1.0,
            "budget_status": "within",
        },
        "verification": {"status": "VERIFIED_STRONG", "replayed": True},
        "verdict": verdict,
        "reasons": reasons or [],
        "spend_statement": None,
    }


# --- ids ---
@pytest.mark.parametrize("good", ["a", "20261123T100000Z-abc123", "fix.add_1-2", "x" * 64])
def test_valid_mission_ids(good):
    assert outcome.check_mission_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "x" * 65, "../x", "a/b", "a..b", ".hidden", "-opt", "a b", "é", "x.lock"]
)
def test_invalid_mission_ids(bad):
    with pytest.raises(ReceiptError, match="mission id"):
        outcome.check_mission_id(bad)


# --- redaction ---
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["claude", "--api-key", "abc", "-p", "hi"],
            ["claude", "--api-key", "[REDACTED]", "-p", "hi"],
        ),
        (["tool", "--api-key=abc"], ["tool", "--api-key=[REDACTED]"]),
        (["tool", "--token", "t0k"], ["tool", "--token", "[REDACTED]"]),
        (["tool", "--github-token=t0k"], ["tool", "--github-token=[REDACTED]"]),
        (["tool", "-k", "secret"], ["tool", "-k", "[REDACTED]"]),
        (["tool", "--password", "pw"], ["tool", "--password", "[REDACTED]"]),
        (
            ["env", "OPENAI_API_KEY=abc", "MODE=fast"],
            ["env", "OPENAI_API_KEY=[REDACTED]", "MODE=fast"],
        ),
        (["env", "db_password=pw"], ["env", "db_password=[REDACTED]"]),
        (
            ["codex", "exec", "use sk-ant-api03-abcdefgh please"],
            ["codex", "exec", "use [REDACTED] please"],
        ),
        (["x", "ghp_0123456789abcdefghij"], ["x", "[REDACTED]"]),
        (["x", "github_pat_0123456789abcdefghij"], ["x", "[REDACTED]"]),
        (["x", "xoxb-1234-5678-abcdefgh"], ["x", "[REDACTED]"]),
        (
            ["curl", "-H", "Authorization: Bearer abcdefghijkl"],
            ["curl", "-H", "Authorization: [REDACTED]"],
        ),
        (["x", "AKIAABCDEFGHIJKLMNOP"], ["x", "[REDACTED]"]),
        (["claude", "-p", "fix the add bug"], ["claude", "-p", "fix the add bug"]),
        (["python", "agent.py", "--verbose"], ["python", "agent.py", "--verbose"]),
    ],
)
def test_redact_argv(argv, expected):
    assert outcome.redact_argv(argv) == expected


def test_redaction_at_the_end_of_argv_does_not_fail():
    assert outcome.redact_argv(["tool", "--api-key"]) == ["tool", "--api-key"]


# --- writing and reading ---
def test_write_is_atomic_and_reads_back(tmp_path):
    path = outcome.receipt_path(tmp_path, "m1")
    outcome.write_receipt(path, receipt("m1"))
    assert outcome.read_receipt(path) == receipt("m1")
    assert [p.name for p in path.parent.iterdir()] == ["receipt.json"]  # no temp file left


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "not a JSON object"),
        (json.dumps({**receipt("m"), "schema": "other/v9"}).encode(), "schema is 'other/v9'"),
        (json.dumps({**receipt("m"), "verdict": "MAYBE"}).encode(), "'verdict' is 'MAYBE'"),
        (json.dumps({**receipt("m"), "reasons": [{"code": 1}]}).encode(), "reasons[0]"),
        (json.dumps({**receipt("m"), "spend": {"total_usd": "1"}}).encode(), "spend.total_usd"),
        (json.dumps({**receipt("m"), "id": None}).encode(), "'id' is not a string"),
    ],
)
def test_malformed_receipts_name_the_file(tmp_path, data, message):
    path = tmp_path / ".runcap/outcomes/m/receipt.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with pytest.raises(ReceiptError) as info:
        outcome.read_receipt(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_receipt_names_the_file(tmp_path):
    with pytest.raises(ReceiptError, match="no such receipt"):
        outcome.find_receipt(tmp_path, "nothere")
    with pytest.raises(ReceiptError, match="no receipts in"):
        outcome.find_receipt(tmp_path, "latest")


def test_latest_is_the_most_recently_started(tmp_path):
    for mid, started in (("b", "2026-11-23T12:00:00Z"), ("a", "2026-11-23T13:00:00Z")):
        outcome.write_receipt(outcome.receipt_path(tmp_path, mid), receipt(mid, started=started))
    path, found = outcome.find_receipt(tmp_path, "latest")
    assert found["id"] == "a" and path == outcome.receipt_path(tmp_path, "a")
    assert [r["id"] for _p, r in outcome.load_receipts(tmp_path)] == ["b", "a"]


def test_receipt_moved_to_another_folder_is_refused(tmp_path):
    outcome.write_receipt(outcome.receipt_path(tmp_path, "x"), receipt("y"))
    with pytest.raises(ReceiptError, match="not its folder's name"):
        outcome.load_receipts(tmp_path)


# --- Verified Outcome Cost ---
def test_voc_counts_verified_spend_and_waste():
    voc = outcome.verified_outcome_cost(
        [
            receipt("a", "PASS", 0.30),
            receipt("b", "BLOCKED", 0.50, unpriced=2),
            receipt("c", "HUMAN_APPROVAL_REQUIRED", 0.20),
            receipt("d", "PASS", 0.10),
        ]
    )
    assert voc["outcomes"] == 4 and voc["verified_outcomes"] == 2
    assert voc["total_spend_usd"] == pytest.approx(1.10)
    assert voc["verified_spend_usd"] == pytest.approx(0.40)
    assert voc["unverified_spend_usd"] == pytest.approx(0.70)
    assert voc["unverified_share"] == pytest.approx(0.70 / 1.10, abs=1e-6)
    assert voc["cost_per_verified_outcome_usd"] == pytest.approx(0.55)
    assert voc["unpriced_calls"] == 2
    assert voc["by_verdict"] == {"PASS": 2, "BLOCKED": 1, "HUMAN_APPROVAL_REQUIRED": 1}


def test_voc_without_verified_outcomes_or_spend():
    assert outcome.verified_outcome_cost([])["unverified_share"] is None
    voc = outcome.verified_outcome_cost([receipt("a", "BLOCKED", 0.2)])
    assert voc["cost_per_verified_outcome_usd"] is None
    assert voc["unverified_share"] == 1.0


def test_show_lines_never_print_control_characters():
    bad = receipt("m", "BLOCKED", reasons=[{"code": "x\x1b[2J", "message": "a\nb"}])
    text = "\n".join(outcome.show_lines(bad))
    assert "\x1b" not in text and "a?b" in text
    assert "bought nothing verified" in text


def test_show_lines_label_spend_by_model_with_truth():
    text = "\n".join(
        outcome.show_lines(receipt("m"), outcome.verified_outcome_cost([receipt("m")]))
    )
    assert "anthropic/claude-sonnet-4-5: $0.1000, 3 call(s) (3 measured)" in text
    assert "Verified Outcome Cost over 1 mission(s), 1 verified" in text


def write(root: Path, r: dict[str, Any]) -> Path:
    """Helper for other test modules: write ``r`` where `cage mission run` would."""
    return outcome.write_receipt(outcome.receipt_path(root, r["id"]), r)


def test_a_huge_mission_id_is_refused_without_echoing_all_of_it():
    with pytest.raises(ReceiptError) as caught:
        outcome.check_mission_id("9" * 5000)
    assert "(5000 characters)" in caught.value.message
    assert len(caught.value.message) < 300


def test_write_receipt_that_cannot_be_written_is_a_receipt_error(tmp_path):
    (tmp_path / "outcomes").write_text("a file where a folder should be\n")
    with pytest.raises(ReceiptError, match="cannot write the receipt"):
        outcome.write_receipt(tmp_path / "outcomes" / "m1" / "receipt.json", {"id": "m1"})
    (tmp_path / "m2" / "receipt.json").mkdir(parents=True)
    with pytest.raises(ReceiptError, match="Is a directory"):
        outcome.write_receipt(tmp_path / "m2" / "receipt.json", {"id": "m2"})
    assert [p.name for p in (tmp_path / "m2").iterdir()] == ["receipt.json"]  # no temp left


def test_a_receipt_with_an_infinite_or_nan_spend_is_malformed():
    # It was accepted and made the Verified Outcome Cost inf/NaN (and `--json` invalid).
    for bad in ("Infinity", "NaN", "1e400"):
        doc = receipt("m1")
        text = json.dumps(doc).replace('"total_usd": 0.1', f'"total_usd": {bad}')
        with pytest.raises(ReceiptError, match=r"'spend\.total_usd' is not a number"):
            outcome.parse_receipt(text.encode(), "r.json")
