"""`cage mission run` end to end: real git repositories, a real proxy against its mock
upstream, a scripted agent process that calls it over HTTP and edits the repository, and the
real CI adjudication of the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from cage.ledger import Ledger
from tests.conftest import GitRepo

BUGGY = "def add(a, b):\n    return a - b\n"
FIXED = "def add(a, b):\n    return a + b\n"
TEST = (
    "import os, sys\n"
    "sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'src'))\n"
    "from calc import add\n\n\n"
    "def test_add():\n    assert add(2, 3) == 5\n"
)

# The stand-in agent: talks to the LLM through the proxy (ANTHROPIC_BASE_URL), as a real
# agent does, and edits the repository. Side records go to OUT (outside the repository).
AGENT = r"""
import json, os, subprocess, sys, time, urllib.error, urllib.request

mode, out = sys.argv[1], sys.argv[2]

def call(max_tokens=64):
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "fix the add bug"}]}).encode()
    req = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=body,
        headers={"content-type": "application/json", "x-api-key": "sk-ant-test",
                 "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(req) as resp:
            resp.read()
            return 200, None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())

def write(rel, text):
    with open(rel, "w") as fh:
        fh.write(text)

def record(name, value):
    with open(os.path.join(out, name), "w") as fh:
        fh.write(value if isinstance(value, str) else json.dumps(value))

record("agent.pid", str(os.getpid()))
if mode in ("fix", "env", "commit"):
    call()
    write("src/calc.py", "def add(a, b):\n    return a + b\n")
if mode == "env":
    record("env.json", dict(os.environ))
if mode == "commit":
    git = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True, text=True).stdout
    git("add", "src/calc.py")
    git("commit", "-q", "-m", "agent fix")
    write("NOTES.txt", "uncommitted work\n")
    write("src/extra.txt", "X = 1\n")
    git("add", "src/extra.txt")
    record("state.json", {"head": git("rev-parse", "HEAD").strip(),
                          "cached": git("diff", "--cached"),
                          "status": git("status", "--porcelain")})
if mode == "edit-test":
    call()
    write("tests/test_calc.py", open("tests/test_calc.py").read().replace("== 5", "== -1"))
if mode == "spin":
    n = 0
    while True:
        status, body = call(max_tokens=2000)
        if status != 200:
            record("refusal.json", {"calls": n, "status": status, "body": body})
            break
        n += 1
    time.sleep(60)  # cage stops the agent once the budget is spent
if mode == "sleep":
    child = subprocess.Popen([sys.executable, "-c",
        "import os, sys, time; os.setsid(); open(sys.argv[1], 'w').write(str(os.getpid())); "
        "time.sleep(60)", os.path.join(out, "escaper.pid")])
    while not os.path.exists(os.path.join(out, "escaper.pid")):
        time.sleep(0.01)
    record("ready", "1")
    time.sleep(60)
if mode == "fail":
    write("src/calc.py", "def add(a, b):\n    return a + b\n")
    sys.exit(7)
"""


def policy(**budget: Any) -> str:
    limits = {"mission_hard_limit_usd": 0.05, "max_runtime_minutes": 1}
    limits.update(budget)
    return (
        "version: v1\n"
        "mission: {name: Fix add}\n"
        f"budget: {json.dumps(limits)}\n"
        "verification:\n"
        "  command: python -m pytest -q -p no:cacheprovider tests/test_calc.py\n"
        "  timeout_seconds: 60\n"
        "  allow: ['src/**']\n"
    )


class Mission:
    """A repository with the bug, its test and a policy committed; runs `cage mission run`."""

    def __init__(self, tmp_path: Path, **budget: Any) -> None:
        self.repo = GitRepo(tmp_path / "repo")
        self.repo.write("src/calc.py", BUGGY)
        self.repo.write("tests/test_calc.py", TEST)
        self.repo.write(".gitignore", "__pycache__/\n")
        self.repo.write(".runcap/mission.yaml", policy(**budget))
        self.base = self.repo.commit("bug, test, policy")
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.agent = tmp_path / "agent.py"
        self.agent.write_text(AGENT)
        # `python` in the verify command must be this interpreter (the venv's).
        self.env = dict(os.environ)
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env["PATH"]

    def argv(self, mode: str, *cage_args: str, extra: tuple[str, ...] = ()) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cage",
            "mission",
            "run",
            "--mock",
            "--grace",
            "1",
            *cage_args,
            "--",
            sys.executable,
            str(self.agent),
            mode,
            str(self.out),
            *extra,
        ]

    def run(
        self, mode: str, *cage_args: str, extra: tuple[str, ...] = (), env: dict | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(mode, *cage_args, extra=extra),
            cwd=self.repo.path,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def receipt(self, mission_id: str) -> dict[str, Any]:
        path = self.repo.path / ".runcap/outcomes" / mission_id / "receipt.json"
        return json.loads(path.read_text())


def codes(receipt: dict[str, Any]) -> list[str]:
    return [r["code"] for r in receipt["reasons"]]


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def mission(tmp_path: Path) -> Mission:
    return Mission(tmp_path)


def test_honest_fix_passes_and_writes_a_receipt(mission):
    done = mission.run("fix", "--id", "honest", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # one JSON document, the agent's output is not in it
    receipt = mission.receipt("honest")
    assert doc["receipt"] == receipt and doc["exit_code"] == 0
    assert doc["receipt_path"].endswith(".runcap/outcomes/honest/receipt.json")
    assert receipt["schema"] == "cage.outcome-receipt/v1"
    assert receipt["verdict"] == "PASS" and receipt["reasons"] == []
    assert receipt["base"] == mission.base
    assert receipt["verification"]["status"] == "VERIFIED_STRONG"
    assert receipt["agent"]["exit_code"] == 0 and receipt["agent"]["stopped_by"] is None
    assert receipt["policy"]["source"] == "base"
    assert len(receipt["policy"]["hash"]) == 64
    spend = receipt["spend"]
    assert spend["calls"] == 1 and spend["total_usd"] > 0 and spend["unpriced"] == 0
    assert spend["budget_status"] == "within" and spend["cap_usd"] == 0.05
    [row] = spend["by_model"]
    assert row["provider"] == "anthropic" and row["model"] == "claude-sonnet-4-5"
    assert sum(row["truth"].values()) == 1
    assert [c["path"] for c in receipt["changes"]] == ["src/calc.py"]
    assert receipt["spend_statement"] is None
    # The snapshot is a real commit with the agent's (uncommitted) fix, kept by a ref.
    snap = receipt["snapshot"]
    assert mission.repo.git("rev-parse", "refs/cage/missions/honest").strip() == snap["commit"]
    assert mission.repo.git("show", f"{snap['commit']}:src/calc.py") == FIXED
    assert mission.repo.git("rev-parse", f"{snap['commit']}^{{tree}}").strip() == snap["tree"]
    # The ledger holds the same spend under the mission id.
    with Ledger.open(os.environ["CAGE_LEDGER"]) as ledger:
        assert ledger.mission_spend("honest")["calls"] == 1
    # A second run under the same id would overwrite the record: refused before it starts.
    done = mission.run("fix", "--id", "honest")
    assert done.returncode == 2 and "already exists" in done.stderr


def test_agent_over_budget_is_stopped_and_blocked_with_spend_under_the_cap(tmp_path):
    mission = Mission(tmp_path, mission_hard_limit_usd=0.2)
    done = mission.run("spin", "--id", "spin")
    assert done.returncode == 1, done.stderr
    receipt = mission.receipt("spin")
    assert receipt["verdict"] == "BLOCKED"
    assert codes(receipt)[0] == "budget_exceeded"
    assert receipt["agent"]["stopped_by"] == "budget"
    refusal = json.loads((mission.out / "refusal.json").read_text())
    assert refusal["status"] == 429
    assert refusal["body"]["error"]["type"] == "budget_guard"
    # The refusal reaches the user as it happens, prefixed once (it read "cage proxy: cage
    # proxy: refused ..." while this command set up the proxy's log on its own).
    assert "cage proxy: refused" in done.stderr
    assert "cage proxy: cage proxy:" not in done.stderr
    spend = receipt["spend"]
    assert spend["calls"] == refusal["calls"] > 0
    assert 0 < spend["total_usd"] <= 0.2
    assert spend["refused_calls"] >= 1 and spend["budget_status"] == "exceeded"
    with Ledger.open(os.environ["CAGE_LEDGER"]) as ledger:
        assert ledger.mission_spend("spin")["cost_usd"] <= 0.2
    assert is_gone(int((mission.out / "agent.pid").read_text()))


def test_runtime_limit_kills_the_whole_tree_and_blocks(tmp_path):
    mission = Mission(tmp_path, max_runtime_minutes=0.02)  # 1.2 s
    done = mission.run("sleep", "--id", "slow")
    assert done.returncode == 1, done.stderr
    receipt = mission.receipt("slow")
    assert receipt["verdict"] == "BLOCKED"
    assert codes(receipt)[0] == "runtime_exceeded"
    assert receipt["agent"]["stopped_by"] == "runtime"
    assert receipt["agent"]["processes_stopped"] >= 2
    assert (mission.out / "ready").exists()
    assert is_gone(int((mission.out / "agent.pid").read_text()))
    # The child that left the agent's session with setsid died too.
    assert is_gone(int((mission.out / "escaper.pid").read_text()))


def test_ctrl_c_stops_the_agent_and_still_writes_the_receipt(mission):
    proc = subprocess.Popen(
        mission.argv("sleep", "--id", "interrupted"),
        cwd=mission.repo.path,
        env=mission.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (mission.out / "ready").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the agent never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    receipt = mission.receipt("interrupted")
    assert receipt["verdict"] == "BLOCKED"
    assert codes(receipt)[0] == "mission_interrupted"
    assert receipt["agent"]["stopped_by"] == "interrupt"
    assert receipt["verification"]["replayed"] is False
    assert receipt["snapshot"]["commit"]
    assert is_gone(int((mission.out / "agent.pid").read_text()))
    assert is_gone(int((mission.out / "escaper.pid").read_text()))


def test_snapshot_leaves_branch_index_and_working_tree_alone(mission):
    done = mission.run("commit", "--id", "committer")
    assert done.returncode == 1, done.stderr  # NOTES.txt is out of scope
    state = json.loads((mission.out / "state.json").read_text())
    repo = mission.repo
    # Exactly as the agent left them: its commit on the branch, its staged and unstaged work.
    assert repo.git("rev-parse", "HEAD").strip() == state["head"] != mission.base
    assert repo.git("symbolic-ref", "HEAD").strip() == "refs/heads/main"
    assert repo.git("diff", "--cached") == state["cached"]
    status = [
        line
        for line in repo.git("status", "--porcelain").splitlines()
        if not line.startswith("?? .runcap/")
    ]
    assert status == state["status"].splitlines()
    receipt = mission.receipt("committer")
    snap = receipt["snapshot"]
    assert snap["parent"] == state["head"]
    # The snapshot holds the commit, the staged file and the untracked note alike.
    files = repo.git("ls-tree", "-r", "--name-only", snap["commit"]).split()
    assert {"src/calc.py", "src/extra.txt", "NOTES.txt"} <= set(files)
    assert ".runcap/outcomes/committer/receipt.json" not in files
    assert {c["path"] for c in receipt["changes"]} == {"src/calc.py", "src/extra.txt", "NOTES.txt"}
    assert receipt["verdict"] == "BLOCKED" and "out_of_scope" in codes(receipt)  # NOTES.txt


def test_agent_env_and_secrets_redacted_from_the_receipt(mission):
    env = dict(
        mission.env, CAGE_ATTEST_KEY="the-signing-key-0123456789", ANTHROPIC_API_KEY="sk-ant-mine"
    )
    secret_args = (
        "--api-key",
        "sk-ant-api03-SECRETSECRETSECRET",
        "--token=ghp_abcdefghijklmnopqrstuvwxyz012345",
        "OPENAI_API_KEY=plain-secret-value",
        "prompt with sk-proj-INLINESECRET123 inside",
    )
    done = mission.run("env", "--id", "envcheck", extra=secret_args, env=env)
    assert done.returncode == 0, done.stderr
    # The text summary: verdict, spend by model, where the receipt is.
    assert "mission envcheck: PASS" in done.stdout
    assert "anthropic/claude-sonnet-4-5" in done.stdout
    assert "outcomes/envcheck/receipt.json" in done.stdout
    seen = json.loads((mission.out / "env.json").read_text())
    assert "CAGE_ATTEST_KEY" not in seen
    assert "the-signing-key" not in json.dumps(seen)
    assert seen["ANTHROPIC_API_KEY"] == "sk-ant-mine"  # the agent's own keys pass through
    assert seen["CAGE_MISSION_ID"] == "envcheck"
    assert seen["ANTHROPIC_BASE_URL"].startswith("http://127.0.0.1:")
    assert seen["OPENAI_BASE_URL"] == seen["ANTHROPIC_BASE_URL"] + "/v1"
    text = (mission.repo.path / ".runcap/outcomes/envcheck/receipt.json").read_text()
    for secret in ("SECRETSECRETSECRET", "ghp_abcdef", "plain-secret-value", "INLINESECRET"):
        assert secret not in text
    assert json.loads(text)["agent"]["argv"][-5:] == [
        "--api-key",
        "[REDACTED]",
        "--token=[REDACTED]",
        "OPENAI_API_KEY=[REDACTED]",
        "prompt with [REDACTED] inside",
    ]


def test_dirty_tree_is_refused_unless_allowed_and_exit_status_does_not_decide(mission):
    mission.repo.write("src/scratch.txt", "Y = 2\n")
    done = mission.run("fail", "--id", "dirty")
    assert done.returncode == 1
    assert "uncommitted changes (src/scratch.txt)" in done.stderr
    assert "--allow-dirty" in done.stderr and "Traceback" not in done.stderr
    assert not (mission.repo.path / ".runcap/outcomes/dirty").exists()
    assert not (mission.out / "agent.pid").exists()  # the agent never started
    done = mission.run("fail", "--id", "dirty", "--allow-dirty")
    assert "counted as the agent's work" in done.stderr
    assert done.returncode == 0, done.stderr
    receipt = mission.receipt("dirty")
    assert {c["path"] for c in receipt["changes"]} == {"src/scratch.txt", "src/calc.py"}
    # The agent exited 7: recorded, but the change (which verifies) decides, as it will in CI.
    assert receipt["agent"]["exit_code"] == 7
    assert receipt["verdict"] == "PASS" and codes(receipt) == ["agent_exit_nonzero"]


def test_bad_mission_id_is_refused(mission):
    done = mission.run("fix", "--id=../x")
    assert done.returncode == 2
    assert "mission id" in done.stderr and "Traceback" not in done.stderr
    assert not (mission.out / "agent.pid").exists()


def test_missing_agent_program_and_missing_command(mission):
    done = subprocess.run(
        [sys.executable, "-m", "cage", "mission", "run", "--mock", "--", "no-such-agent-xyz"],
        cwd=mission.repo.path,
        env=mission.env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "no-such-agent-xyz" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "cage", "mission", "run", "--mock"],
        cwd=mission.repo.path,
        env=mission.env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "after `--`" in done.stderr


def test_agent_that_edits_the_test_needs_a_human_policy_file_recorded(mission, tmp_path):
    other = tmp_path / "mission.yaml"
    other.write_text(policy(mission_hard_limit_usd=0.07))
    mission.repo.remove(".runcap/mission.yaml")  # no policy at base: the file is the policy
    mission.repo.commit("no policy yet")
    done = mission.run("edit-test", "--id", "cheat", "--policy", str(other))
    assert done.returncode == 3, done.stderr
    assert "CI reads the policy from the base commit" in done.stderr
    receipt = mission.receipt("cheat")
    assert receipt["verdict"] == "HUMAN_APPROVAL_REQUIRED"
    assert "verifier_touched" in codes(receipt)
    assert receipt["verification"]["status"] == "VERIFIER_COMPROMISED"
    assert receipt["policy"]["source"] == "file"
    assert receipt["policy"]["path"] == str(other)
    assert receipt["spend"]["cap_usd"] == 0.07
    # The adjudication ran under the same file (not policy_missing at base).
    assert receipt["policy"]["verdict_policy"]["source"] == "file"
    assert receipt["policy"]["verdict_policy"]["hash"] == receipt["policy"]["hash"]


def test_no_policy_at_base_is_refused(tmp_path):
    repo = GitRepo(tmp_path / "bare")
    repo.write("a.txt", "a\n")
    repo.commit("no policy")
    done = subprocess.run(
        [sys.executable, "-m", "cage", "mission", "run", "--mock", "--", "true"],
        cwd=repo.path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert ".runcap/mission.yaml does not exist at the base commit" in done.stderr


TTY_AGENT = r"""
import os, sys, time
line = input("your answer: ")
with open(sys.argv[1], "w") as fh:
    fh.write(f"{line}|{os.tcgetpgrp(0) == os.getpgrp()}")
print("waiting", flush=True)
time.sleep(60)
"""


def test_interactive_agent_gets_the_terminal_and_ctrl_c(mission, tmp_path):
    """In a terminal the agent's process group is in the foreground: it reads the terminal
    (no SIGTTIN stop) and Ctrl-C reaches it; cage records an interrupted mission."""
    import pty
    import select

    agent = tmp_path / "tty_agent.py"
    agent.write_text(TTY_AGENT)
    seen = tmp_path / "seen.txt"
    argv = [sys.executable, "-m", "cage", "mission", "run", "--mock", "--id", "tty", "--"]
    argv += [sys.executable, str(agent), str(seen)]
    pid, fd = pty.fork()
    if pid == 0:  # the child: cage in a fresh terminal
        try:
            os.chdir(mission.repo.path)
            os.execve(sys.executable, argv, mission.env)
        finally:
            os._exit(127)
    output = b""
    answered = interrupted = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # the terminal closed: cage exited
                    break
                if not data:
                    break
                output += data
            if b"your answer:" in output and not answered:
                os.write(fd, b"hello\n")
                answered = True
            if b"waiting" in output and not interrupted:
                os.write(fd, b"\x03")  # Ctrl-C typed on the terminal
                interrupted = True
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, output.decode(errors="replace")
    assert seen.read_text() == "hello|True"
    receipt = mission.receipt("tty")
    assert receipt["agent"]["stopped_by"] == "interrupt"
    assert codes(receipt) == ["mission_interrupted"]
