"""The CLI shell: help, version, exit codes, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys

from cage import __version__
from cage.cli import COMMANDS, main


def run_cage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cage", *args], capture_output=True, text=True, check=False
    )


def test_version():
    done = run_cage("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"cage {__version__}"


def test_help_lists_every_command_with_one_line():
    done = run_cage("--help")
    assert done.returncode == 0
    for name, _module, help_line in COMMANDS:
        assert name in done.stdout
        assert help_line.split()[0] in done.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error():
    done = run_cage("no-such-command")
    assert done.returncode == 2
    assert "cage: error:" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_imports_no_heavy_dependency():
    """`cage --help` and the CI gate start fast: heavy libraries load only when used."""
    code = (
        "import sys, json; from cage.cli import build_parser; build_parser();"
        "heavy = {'git', 'yaml', 'aiohttp', 'jsonschema', 'genai_prices', 'psutil', 'sqlite3',"
        " 'pathspec'};"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def test_a_command_loads_only_its_own_module():
    """`cage ci ...` (the required check, run on every pull request) sets up one command."""
    code = (
        "import sys, json; from cage.cli import build_parser;"
        "build_parser(['ci', '--help']);"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cage.commands.'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == ["cage.commands.ci"]


def test_command_help_still_works_with_one_command_set_up():
    done = run_cage("ci", "--help")
    assert done.returncode == 0
    assert "--base" in done.stdout
    done = run_cage("report", "--help")
    assert done.returncode == 0
    assert "--by" in done.stdout
