"""`cage ledger path`: where the ledger is, and a location that cannot be one."""

from __future__ import annotations

import json

from cage.cli import main


def test_path_naming_a_directory_is_printed_and_flagged(tmp_path, capsys):
    assert main(["ledger", "path", "--json", "--ledger", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["path"] == str(tmp_path)
    assert "is a directory, not a ledger file" in captured.err
    assert main(["ledger", "path", "--ledger", str(tmp_path / "l.db")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "l.db")
