"""Replay: real subprocesses, real process trees, real pytest runs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cage import proctree, replay
from cage.errors import CageError
from cage.policy import Verification
from cage.replay import (
    ENV_SCRUB_RULES,
    ReportError,
    TestReport,
    parse_junit,
    read_report,
    run_command,
    run_side,
    scrubbed_env,
)
from tests.process_trees import (
    DOUBLE_FORK,
    IGNORE_TERM,
    SETSID_ESCAPER,
    assert_dead,
    assert_no_zombie_children,
    read_pids,
    wait_for_file,
)

PY = shlex.quote(sys.executable)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path / "logs"


# --- exit status, output, stdin ---------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 3])
def test_exit_code_is_reported(work, logs, code):
    result = run_command("command", f"exit {code}", work, 10, logs)
    assert result.exit_code == code
    assert result.timed_out is False
    assert result.succeeded is (code == 0)
    assert result.leftover_processes_killed == 0
    assert result.report is None and result.report_error is None


def test_shell_killed_by_a_signal_reports_the_negative_signal(work, logs):
    result = run_command("command", "kill -KILL $$", work, 10, logs)
    assert result.exit_code == -signal.SIGKILL
    assert result.succeeded is False


def test_stdout_and_stderr_go_to_files_in_log_dir(work, logs):
    result = run_command("command", "echo out; echo err >&2; pwd", work, 10, logs)
    assert result.stdout_path.parent == logs
    assert result.stdout_path.read_text().splitlines() == ["out", str(work)]
    assert result.stderr_path.read_text() == "err\n"


def test_planted_fifo_or_symlink_at_a_log_path_is_replaced(work, logs, tmp_path):
    """An earlier command's code knows the log folder: a FIFO there must not block cage,
    a symlink must not make cage truncate a file elsewhere (red team, docs/redteam.md)."""
    logs.mkdir(parents=True, exist_ok=True)
    os.mkfifo(logs / "regression-stdout.log")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (logs / "regression-stderr.log").symlink_to(victim)
    result = run_command("regression", "echo out; echo err >&2", work, 10, logs)
    assert result.stdout_path.read_text() == "out\n"
    assert not result.stderr_path.is_symlink()
    assert result.stderr_path.read_text() == "err\n"
    assert victim.read_text() == "keep me\n"


def test_stdin_is_dev_null(work, logs):
    # `cat` would wait forever on a terminal or an inherited pipe.
    result = run_command("command", "cat; echo done", work, 10, logs)
    assert result.exit_code == 0
    assert result.stdout_path.read_text() == "done\n"


def test_missing_workdir_is_a_clear_error(tmp_path, logs):
    with pytest.raises(CageError, match="cannot start command"):
        run_command("command", "true", tmp_path / "absent", 10, logs)


# --- process-tree cleanup -----------------------------------------------------------------


def test_background_job_is_killed_after_exit(work, logs):
    result = run_command("command", "sleep 300 & echo $! > pids", work, 10, logs)
    assert result.exit_code == 0
    assert_dead(read_pids(work / "pids"))
    assert result.leftover_processes_killed >= 1
    assert_no_zombie_children()


def test_setsid_escaper_is_killed(work, logs):
    (work / "escape.py").write_text(SETSID_ESCAPER)
    escaper = f"{PY} escape.py &"
    result = run_command("command", wait_for_file(escaper, "pids"), work, 10, logs)
    assert result.exit_code == 0
    pids = read_pids(work / "pids")
    assert_dead(pids)
    assert result.leftover_processes_killed >= 1
    assert_no_zombie_children()


def test_double_fork_is_killed(work, logs):
    (work / "daemon.py").write_text(DOUBLE_FORK)
    command = wait_for_file(f"{PY} daemon.py", "pids")
    result = run_command("command", command, work, 10, logs)
    assert result.exit_code == 0
    assert_dead(read_pids(work / "pids"))
    assert result.leftover_processes_killed >= 1
    assert_no_zombie_children()


def test_timeout_kills_the_whole_tree(work, logs):
    started = time.monotonic()
    result = run_command("command", "sleep 60 & echo $! > pids; sleep 60", work, 1, logs)
    elapsed = time.monotonic() - started
    assert result.timed_out is True
    assert result.exit_code is None
    assert result.succeeded is False
    # Bound, not a benchmark: the call must not wait for the 60 s sleeps.
    assert elapsed < 1 + replay.TERM_GRACE_S + 10
    assert_dead(read_pids(work / "pids"))
    assert_no_zombie_children()


def test_timeout_kills_children_that_ignore_sigterm(work, logs, monkeypatch):
    monkeypatch.setattr(replay, "TERM_GRACE_S", 0.3)  # the SIGKILL path, sooner
    (work / "stubborn.py").write_text(IGNORE_TERM)
    # The shell ignores TERM too, so only SIGKILL ends the run.
    command = f"trap '' TERM; {PY} stubborn.py & {PY} stubborn.py"
    started = time.monotonic()
    result = run_command("command", command, work, 1, logs)
    elapsed = time.monotonic() - started
    assert result.timed_out is True
    assert elapsed < 1 + replay.TERM_GRACE_S + 10
    assert_dead(read_pids(work / "pids"))
    assert result.leftover_processes_killed >= 2
    assert_no_zombie_children()


def test_keyboard_interrupt_kills_the_tree_and_propagates(work, logs):
    pidfile = work / "pids"

    def interrupt_once_started() -> None:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_started)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_command("command", "sleep 300 & echo $! > pids; wait", work, 30, logs)
    finally:
        thread.join()
    assert_dead(read_pids(pidfile))
    assert_no_zombie_children()


def test_sigterm_kills_the_tree_like_ctrl_c_and_restores_the_handler(work, logs):
    pidfile = work / "pids"
    before = signal.getsignal(signal.SIGTERM)

    def terminate_once_started() -> None:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=terminate_once_started)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_command("command", "sleep 300 & echo $! > pids; wait", work, 30, logs)
    finally:
        thread.join()
    assert_dead(read_pids(pidfile))
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_cage_becomes_subreaper_and_non_dumpable(work, logs):
    import ctypes

    run_command("command", "true", work, 10, logs)
    libc = ctypes.CDLL(None)
    assert libc.prctl(proctree.PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    flag = ctypes.c_int(0)
    assert libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    assert flag.value == 1


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() == 0,
    reason="root reads every /proc entry; CI runners are not root",
)
def test_command_cannot_read_cage_environment_through_proc(work, logs):
    result = run_command("command", "cat /proc/$PPID/environ > env.txt", work, 10, logs)
    assert result.exit_code != 0
    assert (work / "env.txt").read_bytes() == b""


def test_concurrent_calls_do_not_kill_each_other(work, logs):
    # Cleanup kills cage's new children, so calls from several threads are serialised.
    results = {}

    def run(label: str, command: str) -> None:
        results[label] = run_command("command", command, work, 20, logs / label)

    threads = [
        threading.Thread(target=run, args=("slow", "sleep 0.5; echo slow")),
        threading.Thread(target=run, args=("quick", "sleep 300 & echo quick")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["slow"].exit_code == 0
    assert results["slow"].stdout_path.read_text() == "slow\n"
    assert results["quick"].exit_code == 0
    assert results["quick"].leftover_processes_killed == 1


def test_processes_that_existed_before_are_left_alone(work, logs):
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        run_command("command", "sleep 300 & true", work, 10, logs)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# --- environment --------------------------------------------------------------------------


SECRETS = {
    "GITHUB_TOKEN": "ghs_secret",
    "GH_TOKEN": "gho_secret",
    "ACTIONS_RUNTIME_TOKEN": "runtime",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc",
    "ACTIONS_ID_TOKEN_REQUEST_URL": "https://oidc.invalid",
    "ACTIONS_CACHE_URL": "https://cache.invalid",
    "GITHUB_OUTPUT": "/tmp/out",
    "GITHUB_STEP_SUMMARY": "/tmp/summary",
    "GITHUB_ENV": "/tmp/env",
    "GITHUB_PATH": "/tmp/path",
    "CAGE_ATTEST_KEY": "hmac",
    "OPENAI_API_KEY": "sk-x",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "PYTHONPATH": "/elsewhere",
    "PYTEST_ADDOPTS": "--junitxml=/tmp/forged.xml",
}


def test_command_does_not_see_ci_credentials(work, logs, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PLAIN_SETTING", "kept")
    result = run_command("command", "env > env.txt", work, 10, logs)
    assert result.exit_code == 0
    seen = dict(
        line.split("=", 1) for line in (work / "env.txt").read_text().splitlines() if "=" in line
    )
    for name in SECRETS:
        if name != "PYTEST_ADDOPTS":
            assert name not in seen
    assert seen["PLAIN_SETTING"] == "kept"
    assert "forged" not in seen["PYTEST_ADDOPTS"]
    assert str(result.report_path) in seen["PYTEST_ADDOPTS"]


def test_runner_files_written_by_the_command_are_put_back(work, logs, tmp_path, monkeypatch):
    # The variables are scrubbed, but the files sit in a predictable folder on a runner.
    output = tmp_path / "runner" / "set_output"
    summary = tmp_path / "runner" / "step_summary"
    env_file = tmp_path / "runner" / "set_env"
    output.parent.mkdir()
    output.write_text("earlier=1\n")
    summary.write_text("# earlier\n")
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ENV", str(env_file))  # absent before the command
    monkeypatch.setenv("GITHUB_PATH", str(tmp_path / "runner" / "untouched"))
    command = (
        f"echo verdict=PASS >> {output}; rm {summary}; ln -s /etc/passwd {summary}; "
        f"echo EVIL=1 > {env_file}"
    )
    result = run_command("command", command, work, 10, logs)
    assert result.exit_code == 0
    assert output.read_text() == "earlier=1\n"
    assert not summary.is_symlink() and summary.read_text() == "# earlier\n"
    assert not env_file.exists()
    assert result.runner_files_restored == ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_ENV")
    assert result.to_dict()["runner_files_restored"] == list(result.runner_files_restored)


def test_untouched_runner_files_are_not_reported(work, logs, tmp_path, monkeypatch):
    output = tmp_path / "set_output"
    output.write_text("earlier=1\n")
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    result = run_command("command", "true", work, 10, logs)
    assert result.runner_files_restored == ()
    assert output.read_text() == "earlier=1\n"


@pytest.mark.parametrize("rule", ENV_SCRUB_RULES, ids=lambda rule: rule.pattern)
def test_each_scrub_rule_removes_its_variables(rule):
    if rule.kind == "exact":
        names = [rule.pattern, rule.pattern.lower()]
    elif rule.kind == "prefix":
        names = [rule.pattern + "ANYTHING"]
    else:
        names = ["SOME" + rule.pattern, rule.pattern.lstrip("_")]
    env = {name: "x" for name in names}
    env["PATH"] = "/usr/bin"
    assert scrubbed_env(env) == {"PATH": "/usr/bin"}


@pytest.mark.parametrize(
    "name", ["PATH", "HOME", "LANG", "GITHUB_SHA", "GITHUB_ACTIONS", "CI", "VIRTUAL_ENV", "KEYS"]
)
def test_ordinary_variables_are_kept(name):
    assert scrubbed_env({name: "v"}) == {name: "v"}


def test_scrubbed_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "secret")
    monkeypatch.setenv("PLAIN_SETTING", "kept")
    env = scrubbed_env()
    assert "GITHUB_TOKEN" not in env
    assert env["PLAIN_SETTING"] == "kept"
    assert os.environ["GITHUB_TOKEN"] == "secret"  # a copy: the caller's env is untouched


# --- test evidence from a real pytest run -----------------------------------------------------


TEST_FILE = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture error")

def test_passes():
    assert True

def test_fails():
    assert 1 == 2

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass

def test_errors(broken):
    pass

class TestGroup:
    @pytest.mark.parametrize("n", [1, 2])
    def test_param(self, n):
        assert n
"""


def test_pytest_run_produces_a_parsed_report(work, logs):
    (work / "pytest.ini").write_text("[pytest]\n")
    (work / "test_sample.py").write_text(TEST_FILE)
    result = run_command("command", f"{PY} -m pytest -q test_sample.py", work, 60, logs)
    assert result.exit_code == 1
    assert result.report_error is None
    assert result.report is not None
    assert result.report.counts == {"passed": 3, "failed": 1, "error": 1, "skipped": 1}
    assert result.report.total == 6
    assert result.report.cases["test_sample::test_fails"] == "failed"
    assert result.report.cases["test_sample.TestGroup::test_param[2]"] == "passed"
    # The report and pytest's cache live in log_dir, never in the worktree.
    assert result.report_path is not None and result.report_path.parent == logs
    assert not (work / ".pytest_cache").exists()
    assert result.to_dict()["tests"] == result.report.counts


def test_report_path_is_fresh_for_every_run(work, logs):
    first = run_command("command", "true", work, 10, logs)
    second = run_command("command", "true", work, 10, logs)
    assert first.report_path != second.report_path


def test_stale_reports_are_removed_before_the_run(work, logs):
    logs.mkdir()
    passing = b'<testsuites><testsuite><testcase classname="t" name="ok"/></testsuite></testsuites>'
    (logs / "command-junit.xml").write_bytes(passing)
    (logs / "command-junit-0123456789abcdef.xml").write_bytes(passing)
    result = run_command("command", "true", work, 10, logs)
    assert result.report is None
    assert result.report_error is None
    assert sorted(p.name for p in logs.iterdir() if "junit" in p.name) == []


WRITE_REPORT = """
import os, shlex
args = shlex.split(os.environ["PYTEST_ADDOPTS"])
path = next(a.split("=", 1)[1] for a in args if a.startswith("--junitxml="))
with open(path, "wb") as f:
    f.write(open("content.xml", "rb").read())
"""


def test_truncated_report_gives_report_error(work, logs):
    (work / "content.xml").write_bytes(b'<testsuites><testsuite><testcase classname="t" name')
    (work / "write.py").write_text(WRITE_REPORT)
    result = run_command("command", f"{PY} write.py", work, 10, logs)
    assert result.exit_code == 0
    assert result.report is None
    assert "not well-formed" in result.report_error


def test_report_written_by_the_command_is_read(work, logs):
    (work / "content.xml").write_bytes(
        b'<testsuite><testcase classname="t" name="a"><failure/></testcase></testsuite>'
    )
    (work / "write.py").write_text(WRITE_REPORT)
    result = run_command("command", f"{PY} write.py", work, 10, logs)
    assert result.report == TestReport(cases={"t::a": "failed"})


def test_lingering_process_cannot_write_the_report_after_the_command(work, logs):
    (work / "content.xml").write_bytes(b'<testsuite><testcase classname="t" name="a"/></testsuite>')
    (work / "write.py").write_text(WRITE_REPORT)
    result = run_command("command", f"(sleep 1; {PY} write.py) & exit 0", work, 10, logs)
    assert result.leftover_processes_killed >= 1
    assert result.report is None
    assert not result.report_path.exists()


def test_symlinked_report_is_refused(work, logs):
    target = work / "elsewhere.xml"
    target.write_bytes(b'<testsuite><testcase classname="t" name="a"/></testsuite>')
    command = (
        f"{PY} -c \"import os, shlex; a = shlex.split(os.environ['PYTEST_ADDOPTS'])[0]; "
        f"os.symlink('{target}', a.split('=', 1)[1])\""
    )
    result = run_command("command", command, work, 10, logs)
    assert result.report is None
    assert "symbolic link" in result.report_error


# --- JUnit parsing ------------------------------------------------------------------------------


def junit(*cases: str, root: str = "testsuites") -> bytes:
    body = "".join(cases)
    if root == "testsuites":
        return f"<testsuites><testsuite name='pytest'>{body}</testsuite></testsuites>".encode()
    return f"<testsuite name='pytest'>{body}</testsuite>".encode()


def case(name: str, inner: str = "", classname: str = "tests.test_x") -> str:
    return f"<testcase classname='{classname}' name='{name}'>{inner}</testcase>"


def test_outcomes_map_from_child_elements():
    report = parse_junit(
        junit(
            case("ok"),
            case("bad", "<failure message='x'>trace</failure>"),
            case("boom", "<error message='x'/>"),
            case("later", "<skipped type='pytest.skip'/>"),
            case("noisy", "<system-out>hi</system-out>"),
        )
    )
    assert report.cases == {
        "tests.test_x::ok": "passed",
        "tests.test_x::bad": "failed",
        "tests.test_x::boom": "error",
        "tests.test_x::later": "skipped",
        "tests.test_x::noisy": "passed",
    }
    assert report.counts == {"passed": 2, "failed": 1, "error": 1, "skipped": 1}


def test_xunit1_root_and_nested_suites():
    assert parse_junit(junit(case("a"), root="testsuite")).cases == {"tests.test_x::a": "passed"}
    nested = (
        b"<testsuites><testsuites><testsuite>"
        b"<testsuite><testcase classname='c' name='deep'><failure/></testcase></testsuite>"
        b"</testsuite></testsuites></testsuites>"
    )
    assert parse_junit(nested).cases == {"c::deep": "failed"}


def test_case_without_classname_keeps_the_separator():
    # pytest's collection errors: classname "" and the module as name.
    report = parse_junit(junit(case("tests.test_x", "<error/>", classname="")))
    assert report.cases == {"::tests.test_x": "error"}


COLLECTION_ERROR = "import no_such_module_anywhere\n\ndef test_never():\n    pass\n"


def test_pytest_collection_error_is_an_error_case(work, logs):
    (work / "pytest.ini").write_text("[pytest]\n")
    (work / "test_broken.py").write_text(COLLECTION_ERROR)
    result = run_command("command", f"{PY} -m pytest -q", work, 60, logs)
    assert result.exit_code == 2
    assert result.report is not None
    assert result.report.cases == {"::test_broken": "error"}


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("", "<failure/>", "failed"),
        ("<failure/>", "", "failed"),
        ("<failure/>", "<error/>", "error"),
        ("<skipped/>", "", "skipped"),
        ("", "", "passed"),
    ],
)
def test_duplicate_test_ids_worst_outcome_wins(first, second, expected):
    report = parse_junit(junit(case("dup", first), case("dup", second)))
    assert report.cases == {"tests.test_x::dup": expected}
    assert report.total == 1


def test_case_with_failure_and_teardown_error_is_an_error():
    assert parse_junit(junit(case("t", "<failure/><error/>"))).cases["tests.test_x::t"] == "error"


def test_empty_report_has_no_cases():
    report = parse_junit(b"<testsuites><testsuite tests='0'/></testsuites>")
    assert report.total == 0
    assert report.counts == {"passed": 0, "failed": 0, "error": 0, "skipped": 0}


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">]>
<testsuites><testsuite><testcase classname="a" name="&lol2;"/></testsuite></testsuites>"""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BILLION_LAUGHS, "DOCTYPE"),
        (b"<testsuites><!ENTITY x 'y'></testsuites>", "ENTITY"),
        (BILLION_LAUGHS.decode().encode("utf-16"), "not UTF-8|NUL"),
        ("<testsuites/>".encode("utf-16-le"), "NUL"),
        (b"<testsuites><testsuite>", "not well-formed"),
        (b"", "not well-formed"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"<html><testcase classname='a' name='b'/></html>", "not <testsuites>"),
        (b"<testsuite><testcase classname='a'/></testsuite>", "without a name"),
    ],
)
def test_untrustworthy_reports_are_refused(data, message):
    with pytest.raises(ReportError, match=message):
        parse_junit(data)


def test_declared_encoding_cannot_hide_a_doctype():
    # The parser is forced to UTF-8, so a declaration naming another single-byte encoding
    # cannot make expat see markup the DOCTYPE check did not.
    data = b'<?xml version="1.0" encoding="cp037"?>' + "<testsuites/>".encode("cp037")
    with pytest.raises(ReportError):
        parse_junit(data)


def test_oversized_report_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(replay, "MAX_REPORT_BYTES", 100)
    path = tmp_path / "big.xml"
    path.write_bytes(junit(*(case(f"t{i}") for i in range(20))))
    report, error = read_report(path)
    assert report is None
    assert "larger than 100 bytes" in error


def test_missing_report_is_none_without_error(tmp_path):
    assert read_report(tmp_path / "absent.xml") == (None, None)


def test_directory_in_place_of_report_is_refused(tmp_path):
    (tmp_path / "report.xml").mkdir()
    report, error = read_report(tmp_path / "report.xml")
    assert report is None
    assert "not a regular file" in error


# --- run_side -----------------------------------------------------------------------------------


def test_side_runs_setup_command_and_regression_in_order(work, logs):
    verification = Verification(
        setup="echo setup >> order",
        command="echo command >> order; exit 1",
        regression="echo regression >> order",
        timeout_seconds=10,
    )
    side = run_side("base", work, verification, logs)
    assert (work / "order").read_text().split() == ["setup", "command", "regression"]
    assert side.label == "base"
    assert side.setup.exit_code == 0
    assert side.command.exit_code == 1  # a failing command does not stop the regression
    assert side.regression.exit_code == 0
    assert side.command.stdout_path.parent == logs / "base"
    assert side.to_dict()["command"]["exit_code"] == 1


def test_failed_setup_stops_the_side(work, logs):
    verification = Verification(
        setup="exit 2", command="touch ran", regression="touch ran", timeout_seconds=10
    )
    side = run_side("head", work, verification, logs)
    assert side.setup.exit_code == 2
    assert side.command is None and side.regression is None
    assert not (work / "ran").exists()


def test_timed_out_setup_stops_the_side(work, logs):
    verification = Verification(setup="sleep 60", command="touch ran", timeout_seconds=0.5)
    side = run_side("head", work, verification, logs)
    assert side.setup.timed_out is True
    assert side.command is None
    assert not (work / "ran").exists()


def test_side_without_setup_or_regression(work, logs):
    side = run_side("head", work, Verification(command="true", timeout_seconds=10), logs)
    assert side.setup is None and side.regression is None
    assert side.command.exit_code == 0


def test_sides_log_to_separate_folders(work, logs):
    base = run_side("base", work, Verification(command="echo base", timeout_seconds=10), logs)
    head = run_side("head", work, Verification(command="echo head", timeout_seconds=10), logs)
    assert base.command.stdout_path.read_text() == "base\n"
    assert head.command.stdout_path.read_text() == "head\n"
