"""`cage ci`: ways an agent could try to get a PASS without fixing the code.

Each test is an attack; each must end in BLOCKED or HUMAN_APPROVAL_REQUIRED, never PASS.
Also the replay's hygiene: timeouts, leftover processes, worktrees, tokens.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from cage.cli import main
from tests.commands.ci_repo import (
    COMMAND,
    OPS_FIXED,
    REGRESSION,
    adjudicate,
    codes,
    finding_codes,
)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """cage's worktrees and logs go here, so the test can see what is left behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pids_in(path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


# --- product code that reaches into the test run ---
@pytest.mark.parametrize(
    ("source", "code_prefix"),
    [
        ("import os\nos._exit(0)\n", "tamper_"),  # pytest exits 0 before running anything
        ("import pytest\npytest.skip('later', allow_module_level=True)\n", "tamper_"),
        ("import sys\nsys.modules['calc.ops'] = None\n", "tamper_"),
        ("import builtins\nbuiltins.AssertionError = Exception\n", "tamper_"),
    ],
)
def test_tampering_product_code_needs_a_human(project, capsys, source, code_prefix):
    project.write("src/calc/ops.py", source + OPS_FIXED.replace("a + b", "a - b"))
    code, doc, _ = adjudicate(capsys, project, project.commit("tamper"))
    assert code == 3, doc["reasons"]
    found = finding_codes(doc, "src/calc/ops.py")
    assert any(c.startswith(code_prefix) for c in found)
    assert doc["verification"]["status"] == "VERIFIER_COMPROMISED"


def _with_exec_channel(project) -> None:
    """Base code that executes a data file: a channel the Python scanner cannot read."""
    project.write(
        "src/calc/ops.py",
        OPS_FIXED.replace("a + b", "a - b")
        + "\n\nimport pathlib  # noqa\n\n_HOOK = pathlib.Path(__file__).with_name('hook.txt')\n"
        "exec(compile(_HOOK.read_text(), str(_HOOK), 'exec'))\n",
    )
    project.write("src/calc/hook.txt", "pass\n")
    project.base = project.commit("base executes hook.txt")


def test_exit_zero_before_the_report_is_blocked_by_the_evidence_rule(project, capsys):
    """The scanner never sees hook.txt; pytest exits 0 without a report: no PASS."""
    _with_exec_channel(project)
    project.write("src/calc/hook.txt", "import os\nos._exit(0)\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("exit 0 from data"))
    assert code == 1, doc["reasons"]
    assert doc["verification"]["head"]["command"]["exit_code"] == 0
    assert "head_report_missing" in codes(doc)


def test_test_skipped_from_product_code_is_blocked_by_the_evidence_rule(project, capsys):
    _with_exec_channel(project)
    project.write(
        "src/calc/hook.txt", "import pytest\npytest.skip('no', allow_module_level=True)\n"
    )
    code, doc, _ = adjudicate(capsys, project, project.commit("skip from data"))
    assert code == 1, doc["reasons"]
    assert codes(doc) & {"test_not_run", "test_skipped", "no_tests_run"}


def test_failed_test_skipped_at_head_is_blocked(project, capsys):
    """Product code skips the very tests that failed at base (at run time, not at import)."""
    _with_exec_channel(project)
    project.write(
        "src/calc/hook.txt", "import pytest\n\n\ndef add(a, b):\n    pytest.skip('flaky')\n"
    )
    code, doc, _ = adjudicate(capsys, project, project.commit("skip the failing tests"))
    assert code == 1, doc["reasons"]
    assert doc["verification"]["head"]["command"]["tests"]["skipped"] == 2
    assert {"test_skipped", "no_tests_run"} <= codes(doc)


def test_honest_fix_through_the_exec_channel_base_passes(project, capsys):
    """Control for the three tests above: the same base with an honest fix passes."""
    _with_exec_channel(project)
    project.write("src/calc/hook.txt", "def add(a, b):\n    return a + b\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("fix via hook"))
    assert code == 0, doc["reasons"]


def test_compiled_extension_is_structural(project, capsys):
    project.write(
        "src/calc/_speedups.cpython-311-x86_64-linux-gnu.so",
        b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 64,
    )
    code, doc, _ = adjudicate(capsys, project, project.commit("binary"))
    assert code == 1
    assert "binary_content" in finding_codes(
        doc, "src/calc/_speedups.cpython-311-x86_64-linux-gnu.so"
    )


@pytest.mark.parametrize(
    "path",
    [
        "src/pytest.py",  # shadows the runner (src is on PYTHONPATH)
        "src/_pytest/__init__.py",
        "src/calc_plugin-1.0.dist-info/entry_points.txt",  # [pytest11] plugin registration
        "src/calc.egg-info/entry_points.txt",
        "src/calc/zz.pth",
        "src/calc/conftest.py",
        "src/calc/sitecustomize.py",
        "src/TESTS/test_extra.py",
        "src/textwrap.py",  # shadows the standard library inside the pytest process
        "src/inspect/__init__.py",
        "src/CALC_PLUGIN-1.0.DIST-INFO/entry_points.txt",  # found case-insensitively
        "src/anyio/__init__.py",  # a new top-level package can replace an installed plugin
        "src/helpers.py",
    ],
)
def test_ways_into_the_test_process_without_tamper_need_a_human(project, capsys, path):
    project.fix()
    project.write(path, "[pytest11]\nx = calc.ops\n" if path.endswith(".txt") else "X = 1\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("sneak in"))
    assert code == 3, doc["reasons"]
    assert finding_codes(doc, path) & {
        "verifier_touched",
        "package_metadata",
        "shadows_test_module",
        "new_top_level_module",
        "tamper_shadows_test_framework_module",
    }


def test_script_named_by_the_command_but_absent_at_base_is_the_verifier(project, capsys):
    project.set_policy(command="sh src/check.sh")
    project.fix()
    project.write("src/check.sh", "exit 0\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("supply the verifier"))
    assert code == 3
    assert "verifier_touched" in finding_codes(doc, "src/check.sh")


def test_protect_patterns_are_the_verifier(project, capsys):
    project.set_policy(protect=["src/calc/golden/**"])
    project.fix()
    project.write("src/calc/golden/expected.txt", "5\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("edit golden"))
    assert code == 3
    assert "verifier_touched" in finding_codes(doc, "src/calc/golden/expected.txt")


# --- guard: off ---
def test_guard_off_restores_the_verifier_before_the_head_replay(project, capsys):
    project.set_policy(guard="off", allow=["src/**", "tests/**"])
    project.write("tests/test_ops.py", "def test_add():\n    assert True\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("weaken the test, no fix"))
    assert code == 1, doc["reasons"]
    assert doc["verification"]["restored_paths"] == ["tests/test_ops.py"]
    assert "verification_failed" in codes(doc) or "test_not_run" in codes(doc)


def test_guard_off_honest_fix_is_weak(project, capsys):
    project.set_policy(guard="off", allow=["src/**", "tests/**"])
    project.fix()
    project.write("tests/test_ops.py", "def test_add():\n    assert True\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("fix + test edit"))
    assert code == 0, doc["reasons"]
    assert doc["verification"]["status"] == "VERIFIED_WEAK"
    assert "verifier_restored" in codes(doc)


# --- nothing from the working tree ---
def test_planted_policy_receipt_and_tests_in_the_working_tree_are_ignored(project, capsys):
    base_policy = (project.path / ".runcap/mission.yaml").read_bytes()
    project.write("src/calc/ops.py", OPS_FIXED.replace("a + b", "b - a"))  # still wrong
    head = project.commit("not a fix")
    # planted after the commit, never committed
    project.write(
        ".runcap/mission.yaml", "version: v1\nverification: {command: 'true', allow: ['**']}\n"
    )
    project.write(".runcap/outcomes/forged/receipt.json", json.dumps({"verdict": "PASS"}))
    project.write("tests/test_ops.py", "def test_add():\n    assert True\n")
    code, doc, _ = adjudicate(capsys, project, head)
    assert code == 1
    assert "verification_failed" in codes(doc)
    import hashlib

    assert doc["policy"]["hash"] == hashlib.sha256(base_policy).hexdigest()
    assert [c["path"] for c in doc["changes"]] == ["src/calc/ops.py"]


# --- odd paths and big changes ---
def test_paths_with_spaces_non_ascii_and_newlines(project, capsys):
    odd = [
        "src/calc/my module.py",
        "src/calc/caf\u00e9.py",
        "src/calc/new\nline.py",
        "src/calc/tab\there.py",
    ]
    project.fix()
    for path in odd:
        project.write(path, "X = 1\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("odd names"))
    assert code == 0, doc["reasons"]
    assert sorted(c["path"] for c in doc["changes"]) == sorted([*odd, "src/calc/ops.py"])
    project.write("docs/new\nline \u00fc.md", "x\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("odd out of scope"))
    assert code == 1
    assert finding_codes(doc, "docs/new\nline \u00fc.md") == {"out_of_scope"}


def test_1500_files_out_of_scope(project, capsys):
    project.fix()
    for i in range(1500):
        project.write(f"data/{i:04d}.txt", f"{i}\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("1500 files"))
    assert code == 1
    assert len(doc["changes"]) == 1501
    assert sum(1 for r in doc["reasons"] if r["code"] == "out_of_scope") == 1500
    assert doc["verification"]["replayed"] is False


def test_1500_files_in_scope_are_read_and_scanned(project, capsys):
    project.fix()
    for i in range(1500):
        project.write(f"src/calc/gen/m{i:04d}.py", f"VALUE = {i}\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("1500 modules"))
    assert code == 0, doc["reasons"][:3]
    assert len(doc["changes"]) == 1501


# --- replay hygiene ---
def test_timeout_kills_everything_and_leaves_no_worktree(project, capsys, tmp_path, private_tmp):
    pidfile = tmp_path / "pids"
    quoted = shlex.quote(str(pidfile))
    command = f"echo $$ >> {quoted}; sleep 60 & echo $! >> {quoted}; wait"
    project.set_policy(command=command, timeout_seconds=1)
    project.fix()
    head = project.commit("fix")
    started = time.monotonic()
    code, doc, _ = adjudicate(capsys, project, head)
    elapsed = time.monotonic() - started
    assert code == 1 and "timeout" in codes(doc)
    assert elapsed < 15  # 1 s timeout + TERM grace + cleanup, with a wide margin
    pids = pids_in(pidfile)
    assert len(pids) == 2 and not any(alive(p) for p in pids)
    worktrees = project.git("worktree", "list", "--porcelain")
    assert worktrees.count("worktree ") == 1
    assert list(private_tmp.iterdir()) == []


def test_background_setsid_and_double_fork_processes_are_killed(
    project, capsys, tmp_path, private_tmp
):
    pidfile = shlex.quote(str(tmp_path / "pids"))
    command = (
        f"sleep 60 & echo $! >> {pidfile}; "
        f"setsid sleep 61 & echo $! >> {pidfile}; "
        f"sh -c 'sleep 62 & echo $! >> {pidfile}' & "
        f"{COMMAND}"
    )
    project.set_policy(command=command)
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 0, doc["reasons"]
    pids = pids_in(tmp_path / "pids")
    assert len(pids) == 6  # three per side
    assert not any(alive(p) for p in pids)
    assert "processes_killed" in codes(doc)
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize(
    "case", ["out_of_scope", "policy_invalid", "policy_missing", "empty_change"]
)
def test_worktree_started_early_is_removed_when_no_replay_runs(project, capsys, private_tmp, case):
    # The base worktree is started as soon as base is known; a verdict decided without a
    # replay stops it and removes it.
    if case == "policy_missing":
        project.remove(".runcap/mission.yaml")
        project.base = project.commit("no policy")
        project.fix()
    if case == "policy_invalid":
        project.write(".runcap/mission.yaml", "version: v1\nmission: {name: x}\n")
        project.base = project.commit("broken policy")
    if case == "out_of_scope":
        project.write("README.md", "# calc, edited\n")
    head = project.base if case == "empty_change" else project.commit("change")
    code, doc, _ = adjudicate(capsys, project, head)
    assert code == 1 and case in codes(doc)
    assert project.git("worktree", "list", "--porcelain").count("worktree ") == 1
    assert list(private_tmp.iterdir()) == []


def test_worktree_refused_early_changes_no_verdict_that_needs_no_replay(
    project, capsys, private_tmp
):
    # A filter driver cage cannot switch off: the worktree is refused. Without a replay the
    # verdict stays what the findings say; with one, the refusal blocks (fail closed).
    project.git("config", "filter.a=b.smudge", "cat")
    project.write("README.md", "# calc, edited\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("out of scope"))
    assert code == 1 and "out_of_scope" in codes(doc) and "internal_error" not in codes(doc)
    project.write("README.md", "# calc\n")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1 and codes(doc) == {"internal_error"}
    assert "cannot be disabled safely" in doc["reasons"][0]["message"]
    assert project.git("worktree", "list", "--porcelain").count("worktree ") == 1
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_sigterm_while_the_early_worktree_is_written_leaves_nothing(project, tmp_path, delay):
    # git writes the base worktree in its own process group: a cancelled job (SIGTERM to
    # cage) must still stop it and remove the worktree, as Ctrl-C does.
    for i in range(2000):
        project.write(f"data/d{i % 20}/f{i}.txt", f"{i}\n")
    project.set_policy(command="sleep 30")
    project.fix()
    head = project.commit("fix")
    tmp = tmp_path / "private-tmp"
    tmp.mkdir()
    cmd = [sys.executable, "-m", "cage", "ci", "--mode", "adjudicate", "--json"]
    cmd += ["--repo", str(project.path), "--base", project.base, "--head", head]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not list(tmp.glob("cage-wt-*")) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert project.git("worktree", "list", "--porcelain").count("worktree ") == 1
    assert list(tmp.iterdir()) == []


def test_interrupt_while_the_early_worktree_is_written_leaves_nothing(
    project, private_tmp, monkeypatch
):
    from cage import adjudicate as adj

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adj, "classify", interrupted)  # a Ctrl-C during classification
    project.fix()
    head = project.commit("fix")
    with pytest.raises(KeyboardInterrupt):
        adj.adjudicate(project.path, project.base, head)
    assert project.git("worktree", "list", "--porcelain").count("worktree ") == 1
    assert not list((project.path / ".git" / "worktrees").glob("*"))
    assert list(private_tmp.iterdir()) == []


def test_ci_tokens_are_not_in_the_verify_commands_environment(
    project, capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("GITHUB_TOKEN", "ghs_secret_token_value")
    monkeypatch.setenv("ACTIONS_RUNTIME_TOKEN", "actions_runtime_secret")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "oidc_secret")
    envdir = tmp_path / "env"
    envdir.mkdir()
    project.set_policy(command=f"env > {shlex.quote(str(envdir))}/$$.txt; {COMMAND}")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 0, doc["reasons"]
    dumps = [p.read_text() for p in envdir.iterdir()]
    assert len(dumps) == 2
    for text in dumps:
        assert "PATH=" in text
        assert "secret" not in text


def test_setup_failure_blocks(project, capsys):
    project.set_policy(setup="exit 7")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1 and "setup_failed" in codes(doc)


def test_evidence_junit_needs_a_report(project, capsys):
    project.set_policy(command="exit 1", evidence="junit")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1 and codes(doc) == {"base_report_missing"}


def test_exit_code_evidence_is_weak(project, capsys):
    project.set_policy(evidence="exit-code")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 0 and doc["verification"]["status"] == "VERIFIED_WEAK"


def test_spend_required_needs_a_human(project, capsys):
    text = (project.path / ".runcap/mission.yaml").read_text() + "spend_evidence: required\n"
    project.write(".runcap/mission.yaml", text)
    project.base = project.commit("require spend evidence")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 3 and "spend_unattested" in codes(doc)
    # still replayed: whoever approves needs to know that the change verifies
    assert doc["verification"]["status"] == "VERIFIED_STRONG"


# --- failing closed ---
def test_an_internal_error_is_blocked_not_a_traceback(project, capsys, monkeypatch):
    from cage import replay

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(replay, "run_side", broken)
    project.fix()
    code, doc, err = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1 and codes(doc) == {"internal_error"}
    assert "disk on fire" in err and "Traceback" not in err


def test_workflow_commands_in_paths_cannot_reach_the_log(project, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    project.fix()
    project.write("docs/x\n::set-output name=verdict::PASS\n.md", "x\n")
    head = project.commit("inject")
    code = main(
        [
            "ci",
            "--mode",
            "adjudicate",
            "--repo",
            str(project.path),
            "--base",
            project.base,
            "--head",
            head,
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert not any(line.startswith("::set-output") for line in out.splitlines())


def test_verify_command_output_never_reaches_cages_stdout(project):
    project.set_policy(command=f"echo '::error::forged by the command'; {COMMAND}")
    project.fix()
    head = project.commit("fix")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cage",
            "ci",
            "--mode",
            "adjudicate",
            "--repo",
            str(project.path),
            "--base",
            project.base,
            "--head",
            head,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "forged by the command" not in done.stdout + done.stderr


def test_failed_output_is_shown_fenced_against_workflow_commands(project, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    project.set_policy(
        command=f"echo '::error::forged by the command'; printf '\\033[2J'; {COMMAND}"
    )
    project.write("src/calc/ops.py", OPS_FIXED.replace("a + b", "b - a"))
    head = project.commit("not a fix")
    code = main(
        [
            "ci",
            "--mode",
            "adjudicate",
            "--repo",
            str(project.path),
            "--base",
            project.base,
            "--head",
            head,
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    start = next(i for i, line in enumerate(lines) if line.startswith("::stop-commands::"))
    token = lines[start].split("::")[2]
    end = lines.index(f"::{token}::")
    forged = [i for i, line in enumerate(lines) if "forged by the command" in line]
    assert any(start < i < end for i in forged)
    outside = [lines[i] for i in forged if not start < i < end]
    assert not any(line.lstrip().startswith("::") for line in outside)
    assert not any("\033" in line for line in lines)
    assert any("1 failed" in line or "assert" in line for line in lines[start:end])


FORGING_CONFTEST = """
import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    outcome.get_result().outcome = "passed"
"""


def test_head_command_run_cannot_plant_files_for_the_regression_run(project, capsys):
    """Head code writes tests/conftest.py during the command; the regression must not load it."""
    project.set_policy(regression=REGRESSION)
    _with_exec_channel(project)
    hook = (
        "def add(a, b):\n    return a + b\n\n\n"
        "def mul(a, b):\n    return a + b\n\n\n"  # breaks test_mul
        "import pathlib\n"
        f"pathlib.Path('tests/conftest.py').write_text({FORGING_CONFTEST!r})\n"
    )
    project.write("src/calc/hook.txt", hook)
    code, doc, _ = adjudicate(capsys, project, project.commit("fix add, break mul, plant conftest"))
    assert code == 1, doc["reasons"]
    assert "regression_failed" in codes(doc)
    assert any("test_mul" in r["message"] for r in doc["reasons"])


def test_undecodable_path_bytes_do_not_crash_any_output(project, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    project.write("docs/caf\udcff.md", "x\n")  # the byte 0xff, not UTF-8
    head = project.commit("latin-1 name")
    code, doc, _ = adjudicate(capsys, project, head)
    assert code == 1
    assert finding_codes(doc, "docs/caf\udcff.md") == {"out_of_scope"}
    args = ["--repo", str(project.path), "--base", project.base, "--head", head]
    assert main(["ci", "--mode", "adjudicate", *args]) == 1
    out = capsys.readouterr().out
    assert "docs/caf\\udcff.md" in out or "docs/caf\\xff.md" in out
    assert "caf" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    "cookie",
    [
        b"# -*- coding: utf-7 -*-\n",
        b"# coding=unicode_escape\n",
        b"#!/usr/bin/env python\n# vim: fileencoding=latin-1\n",
    ],
)
def test_source_encoding_cookie_is_structural(project, capsys, cookie):
    """Python decodes with the declared codec; the diff and the reviewer see other code."""
    project.write("src/calc/ops.py", cookie + OPS_FIXED.encode())
    code, doc, _ = adjudicate(capsys, project, project.commit("cookie"))
    assert code == 1
    assert finding_codes(doc, "src/calc/ops.py") == {"not_utf8"}


def test_new_module_inside_an_existing_package_is_fine(project, capsys):
    project.write("src/calc/helpers.py", "def plus(a, b):\n    return a + b\n")
    project.write(
        "src/calc/ops.py",
        "from calc.helpers import plus\n\n\ndef add(a, b):\n    return plus(a, b)\n\n\n"
        "def mul(a, b):\n    return a * b\n",
    )
    code, doc, _ = adjudicate(capsys, project, project.commit("fix with a helper"))
    assert code == 0, doc["reasons"]


FORGED_REPORT = (
    '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" '
    'failures="0" skipped="0" tests="2">'
    '<testcase classname="tests.test_ops" name="test_add"/>'
    '<testcase classname="tests.test_ops" name="test_add_zero"/>'
    "</testsuite></testsuites>"
)
FORGER = (
    "import os\n"
    f"REPORT = {FORGED_REPORT!r}\n"
    "for _v in list(os.environ.values()):\n"
    "    for _w in _v.split():\n"
    "        if _w.startswith('--junitxml='):\n"
    "            with open(_w.split('=', 1)[1].strip(\"'\"), 'w') as _f:\n"
    "                _f.write(REPORT)\n"
    "            os._exit(0)\n"
)


def test_forged_report_through_a_channel_the_scanner_cannot_read(project, capsys):
    """hook.txt writes a passing report and exits 0: pytest's own summary line is missing."""
    _with_exec_channel(project)
    project.write("src/calc/hook.txt", FORGER)
    code, doc, _ = adjudicate(capsys, project, project.commit("forge from data"))
    assert code == 1, doc["reasons"]
    head = doc["verification"]["head"]["command"]
    assert head["exit_code"] == 0 and head["tests"]["passed"] == 2  # the forgery "worked"
    assert codes(doc) >= {"report_unconfirmed"}


def test_forger_that_also_erases_the_base_logs_is_still_blocked(project, capsys):
    """Head code knows the log directory (from PYTEST_ADDOPTS) and wipes base's output."""
    _with_exec_channel(project)
    wipe = (
        "import glob, os.path\n"
        "for _v in list(os.environ.values()):\n"
        "    for _w in _v.split():\n"
        "        if _w.startswith('--junitxml='):\n"
        "            _logs = os.path.dirname(os.path.dirname(_w.split('=', 1)[1].strip(\"'\")))\n"
        "            for _p in glob.glob(os.path.join(_logs, '*', '*.log')):\n"
        "                open(_p, 'w').close()\n"
    )
    project.write("src/calc/hook.txt", wipe + FORGER)
    code, doc, _ = adjudicate(capsys, project, project.commit("forge and wipe"))
    assert code == 1, doc["reasons"]
    assert "report_unconfirmed" in codes(doc)
