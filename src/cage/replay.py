"""Run a verify command in a worktree: scrubbed environment, timeout, process-tree cleanup,
test evidence.

Each command runs as ``/bin/sh -c COMMAND`` in its own session (and so its own process
group), with stdin from ``/dev/null`` and stdout/stderr going to files in ``log_dir`` (not
pipes: a lingering child holding a pipe open would keep us waiting). On Linux the cage
process makes itself a *child subreaper*, so processes that escape the group with
``setsid`` or by double-forking are re-parented to cage instead of init, where cage can
still find them. When the command ends, or its timeout expires, every process it started
is killed and reaped (``cage.proctree``, which the mission's agent shares).

Test evidence: ``PYTEST_ADDOPTS`` makes any pytest run in the command write a JUnit XML
report to a fresh, randomly named file in ``log_dir``; cage parses it after the whole
process tree is dead.

Trust notes (see also docs/trust-model.md):

- The report path is random per run, so nothing planted earlier (by a previous command, a
  ``setup`` step or a file in the change) is read as evidence, and every stale report in
  ``log_dir`` is deleted before the run. The path is still visible to product code through
  ``PYTEST_ADDOPTS``: code that reads it and writes a fake report is what the tamper
  scanner (``cage.tamper``) looks for; the replay cannot tell such a report from pytest's.
- One ``PYTEST_ADDOPTS`` means one report path: if a command runs pytest several times,
  each run overwrites the report and only the last run's cases are evidence (the exit
  status still covers all of them). A nested pytest (a test running pytest in a
  subprocess) finishes before the outer one, so the outer run's report wins.
- The command runs with cage's user id and file system; the environment scrub
  (``ENV_SCRUB_RULES``) removes credentials passed by name, it is not a sandbox. cage makes
  itself non-dumpable, so the command cannot read cage's own environment or memory through
  ``/proc``; cage's ancestors (the CI step's shell) are out of its reach, so secrets should
  not be given to the gate's step at all. ``HOME`` is left alone: a fake ``HOME`` hides
  nothing from a process that can open the real one by absolute path, and it would break
  package caches and tools' configuration.
- Processes that another service starts on the command's behalf (``docker run -d``,
  ``systemd-run``) are not its descendants and are out of cleanup's reach.
- pytest's cache goes to a fresh folder next to the report (``-o cache_dir``), not into
  the worktree, so no state of an earlier run (``--lf``) carries over.
- The runner's file commands (``GITHUB_OUTPUT``, ``GITHUB_STEP_SUMMARY``, ``GITHUB_ENV``,
  ``GITHUB_PATH``, ``GITHUB_STATE``) are scrubbed from the environment, but the files sit
  in a predictable folder, so each is snapshotted before the command and put back after
  it; ``CommandResult.runner_files_restored`` names those the command changed.
- A credential-like variable a test needs (``DJANGO_SECRET_KEY``) is scrubbed too: set it
  in the verify command itself (``DJANGO_SECRET_KEY=test python -m pytest``), where the
  policy shows it. A missing variable fails at base and head alike, never a false PASS.
- SIGTERM (a cancelled job) and SIGHUP (a closed terminal) are handled like Ctrl-C while a
  command runs; an interrupt that arrives while the command is being started is held until
  cleanup can run.
- ``run_command`` calls are serialised by a lock: cleanup finds the command's escaped
  processes among cage's new children, which needs one command at a time per process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cage.errors import CageError

if TYPE_CHECKING:
    from cage.policy import Verification

# ---------------------------------------------------------------------------------------
# Environment scrub (data: each rule with the reason it exists)


@dataclass(frozen=True)
class EnvRule:
    """One environment scrub rule. ``kind`` is "exact", "prefix" or "suffix"; names are
    compared upper-cased. A suffix rule such as ``_TOKEN`` also matches the bare ``TOKEN``."""

    kind: str
    pattern: str
    why: str

    def matches(self, name: str) -> bool:
        """True when the variable ``name`` falls under this rule."""
        upper = name.upper()
        if self.kind == "exact":
            return upper == self.pattern
        if self.kind == "prefix":
            return upper.startswith(self.pattern)
        return upper.endswith(self.pattern) or upper == self.pattern.lstrip("_")


ENV_SCRUB_RULES: tuple[EnvRule, ...] = (
    # CI credentials: the verify command is code from the pull request.
    EnvRule("exact", "GITHUB_TOKEN", "the workflow token can write to the repository"),
    EnvRule("exact", "GH_TOKEN", "token read by the gh CLI"),
    EnvRule(
        "prefix",
        "ACTIONS_",
        "runner service credentials and URLs: ACTIONS_RUNTIME_TOKEN (cache and artifacts), "
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN/URL (OIDC tokens for clouds), ACTIONS_CACHE_URL",
    ),
    # Runner file commands: whoever writes these files sets the gate's outputs, step
    # summary, and the environment and PATH of later steps.
    EnvRule("exact", "GITHUB_OUTPUT", "a test could set the gate's outputs (verdict)"),
    EnvRule("exact", "GITHUB_STEP_SUMMARY", "a test could write the gate's step summary"),
    EnvRule("exact", "GITHUB_ENV", "a test could set variables for later steps"),
    EnvRule("exact", "GITHUB_PATH", "a test could put its own programs on later steps' PATH"),
    EnvRule("exact", "GITHUB_STATE", "a test could set the action's post-step state"),
    # cage's own configuration: the attestation key, the ledger, the proxy.
    EnvRule("prefix", "CAGE_", "cage's own keys and configuration (CAGE_ATTEST_KEY, ledger)"),
    # Credentials by naming convention. Broad on purpose: a verify command needs none of
    # them, and a missing variable fails at base and at head alike, never a false PASS.
    EnvRule("suffix", "_TOKEN", "credentials by convention (NPM_TOKEN, AWS_SESSION_TOKEN)"),
    EnvRule("suffix", "_SECRET", "credentials by convention (CLIENT_SECRET)"),
    EnvRule("suffix", "_KEY", "credentials by convention (OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY)"),
    EnvRule("suffix", "_PASSWORD", "credentials by convention"),
    EnvRule("suffix", "_PASSWD", "credentials by convention"),
    EnvRule("suffix", "_CREDENTIALS", "credential files by convention"),
    EnvRule("exact", "SSH_AUTH_SOCK", "the SSH agent signs as the runner"),
    EnvRule("exact", "GIT_ASKPASS", "hands out git credentials"),
    EnvRule("exact", "SSH_ASKPASS", "hands out SSH credentials"),
    # Variables that point git at another repository than the worktree.
    EnvRule("exact", "GIT_DIR", "git in the worktree would act on another repository"),
    EnvRule("exact", "GIT_WORK_TREE", "git in the worktree would act on another work tree"),
    EnvRule("exact", "GIT_INDEX_FILE", "git in the worktree would use another index"),
    EnvRule("exact", "GIT_COMMON_DIR", "git in the worktree would act on another repository"),
    EnvRule("exact", "GIT_OBJECT_DIRECTORY", "git would read and write other objects"),
    EnvRule("exact", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "git would read other objects"),
    EnvRule("exact", "GIT_NAMESPACE", "git would act on another ref namespace"),
    # Test harness and interpreter.
    EnvRule("exact", "PYTEST_ADDOPTS", "replaced by cage's own: the report path cage owns"),
    EnvRule(
        "exact",
        "PYTHONPATH",
        "would import code from outside the worktree (e.g. the pull request's checkout)",
    ),
    EnvRule("exact", "PYTHONSTARTUP", "start-up code from outside the worktree"),
)


def scrubbed_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return a copy of ``env`` (default ``os.environ``) without any variable matched by
    ``ENV_SCRUB_RULES``. ``PYTEST_ADDOPTS`` is removed here; ``run_command`` sets its own."""
    source = os.environ if env is None else env
    return {
        name: value
        for name, value in source.items()
        if not any(rule.matches(name) for rule in ENV_SCRUB_RULES)
    }


# ---------------------------------------------------------------------------------------
# Results


OUTCOMES = ("passed", "failed", "error", "skipped")
# Worst first: when one test id appears more than once, the worst outcome wins, so a
# duplicate passing case (a second pytest run, a forged case) never masks a failure.
_SEVERITY = {"error": 3, "failed": 2, "skipped": 1, "passed": 0}


@dataclass
class TestReport:
    """Test cases of one JUnit report: ``"classname::name"`` -> passed|failed|error|skipped."""

    __test__ = False  # not a pytest test class, despite the name

    cases: dict[str, str]

    @property
    def counts(self) -> dict[str, int]:
        """Number of cases per outcome; every outcome is present, 0 when none."""
        tally = Counter(self.cases.values())
        return {outcome: tally.get(outcome, 0) for outcome in OUTCOMES}

    @property
    def total(self) -> int:
        """Number of distinct test ids in the report."""
        return len(self.cases)


@dataclass
class CommandResult:
    """What one command did. ``exit_code`` is None on timeout; negative when the shell was
    killed by a signal (``-signal``, as subprocess reports it)."""

    name: str  # setup | command | regression
    command: str
    exit_code: int | None
    timed_out: bool
    duration_s: float
    stdout_path: Path
    stderr_path: Path
    report: TestReport | None
    report_error: str | None
    leftover_processes_killed: int
    report_path: Path | None = None  # where PYTEST_ADDOPTS pointed pytest
    # Runner files (GITHUB_OUTPUT...) the command changed and cage put back: evidence that
    # the command tried to write the gate's outputs (a tamper finding for the gate).
    runner_files_restored: tuple[str, ...] = ()

    @property
    def succeeded(self) -> bool:
        """Exit status 0 within the timeout (the report is judged separately)."""
        return not self.timed_out and self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings)."""
        return {
            "name": self.name,
            "command": self.command,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "duration_s": round(self.duration_s, 3),
            "stdout_path": str(self.stdout_path),
            "stderr_path": str(self.stderr_path),
            "tests": None if self.report is None else self.report.counts,
            "report_error": self.report_error,
            "leftover_processes_killed": self.leftover_processes_killed,
            "runner_files_restored": list(self.runner_files_restored),
        }


@dataclass
class SideResult:
    """The runs at one side (base or head). ``command`` is None when ``setup`` failed."""

    label: str
    setup: CommandResult | None
    command: CommandResult | None
    regression: CommandResult | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary of the three runs."""
        return {
            "label": self.label,
            "setup": None if self.setup is None else self.setup.to_dict(),
            "command": None if self.command is None else self.command.to_dict(),
            "regression": None if self.regression is None else self.regression.to_dict(),
        }


# ---------------------------------------------------------------------------------------
# JUnit XML


MAX_REPORT_BYTES = 50 * 1024 * 1024


class ReportError(ValueError):
    """A JUnit report exists but is not one cage can trust (malformed, too big, DTD...)."""


def parse_junit(data: bytes) -> TestReport:
    """Parse JUnit XML (pytest xunit2 or xunit1, nested ``<testsuites>``) into a TestReport.

    Refuses documents that are not UTF-8, contain NUL, or declare a DOCTYPE or ENTITY (no
    DTD means no entity expansion, so no "billion laughs"). The parser is forced to UTF-8
    whatever the XML declaration says, so the check above sees what the parser sees.
    Raises ReportError.
    """
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError(f"report is larger than {MAX_REPORT_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReportError(f"report is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if "\x00" in text:
        raise ReportError("report contains a NUL character (not UTF-8 XML)")
    folded = text.upper()
    for marker in ("<!DOCTYPE", "<!ENTITY"):
        if marker in folded:
            raise ReportError(f"report declares {marker[2:]}: refused (entity expansion)")
    # Fed as text, expat reads UTF-8 whatever the declaration says. Parsed as a stream,
    # each <testcase> dropped once judged, so memory stays small for large reports.
    parser = ET.XMLPullParser(events=("start", "end"))
    cases: dict[str, str] = {}
    root_seen = False
    try:
        for offset in range(0, len(text), _FEED_CHARS):
            parser.feed(text[offset : offset + _FEED_CHARS])
            root_seen = _take_events(parser, cases, root_seen)
        parser.close()
        _take_events(parser, cases, root_seen)
    except ET.ParseError as exc:
        raise ReportError(f"report is not well-formed XML ({exc})") from None
    return TestReport(cases=cases)


_FEED_CHARS = 1 << 20


def _take_events(parser: ET.XMLPullParser, cases: dict[str, str], root_seen: bool) -> bool:
    """Record every finished <testcase> into ``cases`` (worst outcome per id wins)."""
    for event, element in parser.read_events():
        if event == "start":
            if not root_seen and element.tag not in ("testsuites", "testsuite"):
                raise ReportError(
                    f"report root is <{element.tag}>, not <testsuites> or <testsuite>"
                )
            root_seen = True
        elif element.tag == "testcase":
            name = element.get("name")
            if not name:
                raise ReportError("report has a <testcase> without a name")
            classname = element.get("classname") or ""
            # Always "classname::name": pytest's collection errors have an empty classname,
            # so their ids start with "::" (the gate relies on that to recognise them).
            test_id = f"{classname}::{name}"
            outcome = _case_outcome(element)
            previous = cases.get(test_id)
            if previous is None or _SEVERITY[outcome] > _SEVERITY[previous]:
                cases[test_id] = outcome
            element.clear()
    return root_seen


_CHILD_OUTCOMES = {"error": "error", "failure": "failed", "skipped": "skipped"}


def _case_outcome(case: ET.Element) -> str:
    # A case can carry several results (a failure in the call and an error in teardown):
    # the worst one counts.
    outcome = "passed"
    for child in case:
        found = _CHILD_OUTCOMES.get(child.tag)
        if found is not None and _SEVERITY[found] > _SEVERITY[outcome]:
            outcome = found
    return outcome


def read_report(path: Path) -> tuple[TestReport | None, str | None]:
    """Read the report at ``path``: ``(None, None)`` when there is none, ``(report, None)``
    when it parses, ``(None, message)`` when it exists but cannot be trusted. Symlinks and
    non-regular files are refused (product code could point the path elsewhere)."""
    try:
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if path.is_symlink():
            return None, f"{path}: report is a symbolic link: refused"
        return None, f"{path}: cannot open report ({exc.strerror})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, f"{path}: report is not a regular file: refused"
        if info.st_size > MAX_REPORT_BYTES:
            return None, f"{path}: report is larger than {MAX_REPORT_BYTES} bytes: refused"
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_REPORT_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return parse_junit(data), None
    except ReportError as exc:
        return None, f"{path}: {exc}"


# ---------------------------------------------------------------------------------------
# Processes


TERM_GRACE_S = 2.0  # after a timeout: SIGTERM, this long to exit, then SIGKILL


# Files the GitHub runner reads back after the step: outputs, step summary, environment and
# PATH of later steps, post-step state. Their variables are scrubbed, but the files sit in a
# predictable folder ($RUNNER_TEMP/_runner_file_commands), so the command could still find
# and write them; cage snapshots them before each command and puts them back after.
RUNNER_FILE_VARS = (
    "GITHUB_OUTPUT",
    "GITHUB_STEP_SUMMARY",
    "GITHUB_ENV",
    "GITHUB_PATH",
    "GITHUB_STATE",
)
_RUNNER_FILE_MAX = 16 * 1024 * 1024
_UNREADABLE = b"\0unreadable"  # never equal to real content read below


def _read_runner_file(path: str) -> bytes | None:
    try:
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )
    except FileNotFoundError:
        return None
    except OSError:
        return _UNREADABLE
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return _UNREADABLE
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(_RUNNER_FILE_MAX + 1)
    finally:
        os.close(fd)


def _snapshot_runner_files() -> dict[str, tuple[str, bytes | None]]:
    snapshot = {}
    for var in RUNNER_FILE_VARS:
        path = os.environ.get(var)
        if path:
            content = _read_runner_file(path)
            # Not a regular readable file, or too big to hold: nothing cage could restore.
            if content is None or (content != _UNREADABLE and len(content) <= _RUNNER_FILE_MAX):
                snapshot[var] = (path, content)
    return snapshot


def _restore_runner_files(snapshot: dict[str, tuple[str, bytes | None]]) -> tuple[str, ...]:
    """Put every snapshotted runner file back as it was; return the variables whose file
    the command changed (content, deletion, creation, or a symlink/folder in its place)."""
    changed = []
    for var, (path, before) in snapshot.items():
        if _read_runner_file(path) == before:
            continue
        changed.append(var)
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            if before is not None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(before)
        except OSError as exc:
            # Fail closed: outputs the command may have forged must not reach the runner.
            raise CageError(
                f"the verify command changed {var} ({path}) and cage cannot put it back: "
                f"{exc.strerror}; the gate's outputs cannot be trusted, re-run the job"
            ) from None
    return tuple(changed)


def _pytest_addopts(report_path: Path, cache_dir: Path) -> str:
    # pytest splits PYTEST_ADDOPTS with shlex, so quote paths (temp dirs may hold spaces).
    # The cache goes outside the worktree, fresh per run (nothing from an earlier run, such
    # as --lf state, carries over); -p no:cacheprovider would break commands using --lf.
    options = [
        f"--junitxml={report_path}",
        "-o",
        "junit_family=xunit2",
        "-o",
        "junit_logging=no",
        "-o",
        f"cache_dir={cache_dir}",
    ]
    return " ".join(shlex.quote(option) for option in options)


def _fresh_log(path: Path) -> Any:
    """A new regular file at ``path``, opened for writing, whatever was there before.

    An earlier command in the same log folder runs code from the change, and that code can
    learn the folder from PYTEST_ADDOPTS: it could leave a FIFO here (``open`` for writing
    would block cage forever) or a symlink (cage would truncate a file elsewhere). So the
    path is cleared and created exclusively, without following links.
    """
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise CageError(
            f"cannot create the log file {path}: {exc.strerror}; something replaced it "
            "while the previous command ran"
        ) from None
    return os.fdopen(fd, "wb")


def _remove_stale(log_dir: Path, name: str) -> None:
    # Reports and caches of earlier runs of this name: never evidence for this one.
    for stale in log_dir.glob(f"{name}-junit*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def run_command(
    name: str, command: str, cwd: Path, timeout_s: float, log_dir: Path
) -> CommandResult:
    """Run ``command`` with ``/bin/sh -c`` in ``cwd`` and return what happened.

    The environment is ``scrubbed_env()`` plus a ``PYTEST_ADDOPTS`` that points pytest's
    JUnit report at a fresh random path in ``log_dir`` (keep ``log_dir`` outside the
    worktree). stdout and stderr go to ``log_dir/<name>-stdout.log`` and ``-stderr.log``.
    The command gets its own session; when it exits every process it started is killed
    (SIGKILL) and reaped, including ``setsid`` escapers and double forks on Linux. After
    ``timeout_s`` the whole tree gets SIGTERM, then SIGKILL 2 s later; ``timed_out`` is
    True and ``exit_code`` None. On KeyboardInterrupt the tree is killed and the interrupt
    re-raised. Raises CageError when the command cannot be started at all.
    """
    from cage import proctree

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(log_dir, name)
    token = secrets.token_hex(8)
    report_path = log_dir / f"{name}-junit-{token}.xml"
    cache_dir = log_dir / f"{name}-junit-{token}.cache"
    stdout_path = log_dir / f"{name}-stdout.log"
    stderr_path = log_dir / f"{name}-stderr.log"

    env = scrubbed_env()
    env["PYTEST_ADDOPTS"] = _pytest_addopts(report_path, cache_dir)
    # A .pth planted in the user's site directory by one run must not load into the next.
    env["PYTHONNOUSERSITE"] = "1"

    with proctree.ONE_TREE_AT_A_TIME, proctree.Interrupts() as interrupts:
        runner_files = _snapshot_runner_files()
        interrupts.arm()  # an interrupt held so far: raise it before anything starts
        interrupts.disarm()
        started = time.monotonic()
        with _fresh_log(stdout_path) as out, _fresh_log(stderr_path) as err:
            try:
                tree = proctree.start(
                    ["/bin/sh", "-c", command],
                    own_session=True,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                )
            except OSError as exc:
                raise CageError(
                    f"cannot start {name} command {command!r} in {cwd}: {exc.strerror}; "
                    "check that the directory exists and /bin/sh is available"
                ) from None
        timed_out = False
        try:
            interrupts.arm()
            if tree.wait_for_exit(timeout_s):
                leftovers = tree.kill()
            else:
                timed_out = True
                leftovers = tree.stop(TERM_GRACE_S)
            interrupts.disarm()
        except BaseException:
            # Ctrl-C (or any error) while waiting: nothing the command started may outlive us.
            interrupts.disarm()
            tree.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                tree.leader.wait(timeout=proctree.KILL_DEADLINE_S)
            with contextlib.suppress(CageError):
                _restore_runner_files(runner_files)
            raise
        returncode = tree.leader.wait()
        duration = time.monotonic() - started
        restored = _restore_runner_files(runner_files)

    report, report_error = read_report(report_path)
    return CommandResult(
        name=name,
        command=command,
        exit_code=None if timed_out else returncode,
        timed_out=timed_out,
        duration_s=duration,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        report=report,
        report_error=report_error,
        leftover_processes_killed=leftovers,
        report_path=report_path,
        runner_files_restored=restored,
    )


def run_side(label: str, workdir: Path, verification: Verification, log_dir: Path) -> SideResult:
    """Run ``setup`` (when given), ``command``, then ``regression`` (when given) in
    ``workdir``, each with ``verification.timeout_seconds``, logs in ``log_dir/<label>``.
    A failed or timed-out setup stops the side: ``command`` and ``regression`` stay None.
    ``regression`` runs whatever ``command`` did (at base the command is meant to fail)."""
    side_dir = Path(log_dir) / label
    timeout = float(verification.timeout_seconds)
    setup = None
    if verification.setup:
        setup = run_command("setup", verification.setup, workdir, timeout, side_dir)
        if not setup.succeeded:
            return SideResult(label=label, setup=setup, command=None, regression=None)
    command = run_command("command", verification.command, workdir, timeout, side_dir)
    regression = None
    if verification.regression:
        regression = run_command("regression", verification.regression, workdir, timeout, side_dir)
    return SideResult(label=label, setup=setup, command=command, regression=regression)
