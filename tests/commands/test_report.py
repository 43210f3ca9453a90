"""`cage report` and `cage ledger path` on real ledgers."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cage.cli import main
from cage.ledger import Event, Ledger


def run_cage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cage", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        ledger.add_many(
            [
                Event(
                    "2026-11-20T09:00:00Z",
                    "anthropic",
                    "claude-sonnet-4",
                    1000,
                    200,
                    300,
                    40,
                    cost_usd=1.234567,
                    truth="modeled",
                    caller="bot",
                    mission_id="m1",
                    request_id="1",
                ),
                Event(
                    "2026-11-21T09:00:00Z",
                    "anthropic",
                    "claude-sonnet-4",
                    10,
                    20,
                    cost_usd=0.5,
                    truth="measured",
                    caller="bot",
                    mission_id="m2",
                    request_id="2",
                ),
                Event(
                    "2026-11-21T10:00:00Z",
                    "openai",
                    "gpt-4o",
                    5,
                    5,
                    cost_usd=2.0,
                    truth="modeled",
                    caller="ci",
                    request_id="3",
                ),
                Event(
                    "2026-11-22T10:00:00Z",
                    "acme",
                    "mystery-1",
                    7,
                    7,
                    cost_usd=None,
                    truth="estimated",
                    caller="ci",
                    request_id="4",
                ),
            ]
        )
    return path


def test_table_has_rows_sorted_by_cost_a_total_and_the_unpriced_note(filled, capsys):
    assert main(["report", "--ledger", str(filled)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["model", "calls", "input"]
    assert out[1].split()[:2] == ["gpt-4o", "1"]
    assert out[2].split() == [
        "claude-sonnet-4",
        "2",
        "1,010",
        "220",
        "300",
        "40",
        "1.73",
        "0",
        "1/1/0",
    ]
    assert out[3].split()[0] == "mystery-1"
    assert out[5].split() == ["total", "4", "1,022", "232", "300", "40", "3.73", "1", "1/2/1"]
    assert "1 call(s) unpriced" in out[6]


def test_json_is_one_document_with_six_decimals(filled, capsys):
    assert main(["report", "--ledger", str(filled), "--by", "caller", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "cage.report/v1"
    assert [row["key"] for row in doc["rows"]] == ["ci", "bot"]
    bot = doc["rows"][1]
    assert bot["cost_usd"] == 1.734567
    assert bot["truth"] == {"measured": 1, "modeled": 1, "estimated": 0}
    assert doc["total"]["unpriced"] == 1
    assert doc["total"]["calls"] == 4


def test_csv(filled, capsys):
    assert main(["report", "--ledger", str(filled), "--by", "day", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["day"] for r in rows] == ["2026-11-21", "2026-11-20", "2026-11-22"]
    assert rows[0]["cost_usd"] == "2.500000"
    assert rows[2]["unpriced"] == "1"


def test_filters(filled, capsys):
    assert (
        main(
            [
                "report",
                "--ledger",
                str(filled),
                "--since",
                "2026-11-21",
                "--until",
                "2026-11-21",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["total"]["calls"] == 2
    assert main(["report", "--ledger", str(filled), "--mission", "m1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["key"], r["calls"]) for r in doc["rows"]] == [("claude-sonnet-4", 1)]


def test_bad_date_is_a_usage_error(filled):
    done = run_cage("report", "--ledger", str(filled), "--since", "last tuesday")
    assert done.returncode == 2
    assert "cage: --since: not a date or timestamp: 'last tuesday'" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_cage(
        "report", "--ledger", str(filled), "--since", "2026-11-22", "--until", "2026-11-21"
    )
    assert done.returncode == 2
    assert "after --until" in done.stderr


@pytest.mark.parametrize("mission", ["", "  "])
def test_empty_mission_id_is_a_usage_error_not_every_mission(filled, capsys, mission):
    assert main(["report", "--ledger", str(filled), "--mission", mission, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--mission: the mission id is empty" in captured.err


def test_missing_ledger_is_an_empty_report_with_a_note(tmp_path):
    missing = tmp_path / "nothing-here.db"
    done = run_cage("report", "--ledger", str(missing))
    assert done.returncode == 0
    assert "total" in done.stdout
    assert f"no ledger at {missing}" in done.stderr
    assert not missing.exists()
    done = run_cage("report", "--json", env={"CAGE_LEDGER": str(missing)})
    doc = json.loads(done.stdout)
    assert doc["rows"] == [] and doc["total"]["calls"] == 0 and "note" in doc


def test_ledger_path(tmp_path):
    where = tmp_path / "spend.db"
    done = run_cage("ledger", "path", env={"CAGE_LEDGER": str(where)})
    assert done.returncode == 0
    assert done.stdout.strip() == str(where)
    done = run_cage("ledger", "path", "--json", env={"CAGE_LEDGER": str(where)})
    assert json.loads(done.stdout) == {"path": str(where), "from": "CAGE_LEDGER", "exists": False}
    assert not where.exists()
    done = run_cage("ledger")
    assert done.returncode == 2 and "cage ledger path" in done.stderr


def test_postgres_ledger_is_a_clear_error():
    done = run_cage("report", "--ledger", "postgresql://u:pw@host/db")
    assert done.returncode == 1
    assert "PostgreSQL ledgers are not supported in this build" in done.stderr
    assert "pw@" not in done.stderr


def test_a_non_finite_cost_from_an_older_cage_is_flagged_and_json_stays_valid(tmp_path, capsys):
    # Before the importers refused them, costUSD 1e400 (inf) reached the ledger unchecked.
    from cage.ledger import RowBatch

    path = tmp_path / "old.db"
    batch = RowBatch()
    batch.add_fields(
        {
            "timestamp": "2026-11-20T10:00:00Z",
            "provider": "anthropic",
            "model": "claude-sonnet-4",
            "cost_usd": float("inf"),
            "truth": "measured",
            "request_id": "r-inf",
        }
    )
    with Ledger.open(path) as ledger:
        ledger.add_batch(batch)
    assert main(["report", "--ledger", str(path), "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out, parse_constant=lambda name: pytest.fail(name))
    assert doc["total"]["cost_usd"] == 0 and doc["total"]["unpriced"] == 1
    assert "not a finite number (claude-sonnet-4)" in captured.err
