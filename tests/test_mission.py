"""The mission runner's parts: the agent's environment, stopping a process tree, the
snapshot (gitio.Repo.snapshot) and combining mission facts with the verdict."""

from __future__ import annotations

import os
import re
import sys
import time

import psutil
import pytest

from cage import gitio, mission


def test_agent_env_sets_proxy_and_hides_the_attestation_key():
    env = mission.agent_env(
        {
            "CAGE_ATTEST_KEY": "k",
            "CAGE_ATTEST_KEY_FILE": "/k",
            "OPENAI_API_KEY": "sk-mine",
            "NO_PROXY": "corp.example",
            "PATH": "/bin",
        },
        "http://127.0.0.1:5000",
        "m1",
    )
    assert "CAGE_ATTEST_KEY" not in env and "CAGE_ATTEST_KEY_FILE" not in env
    assert env["OPENAI_API_KEY"] == "sk-mine" and env["PATH"] == "/bin"
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:5000/v1"
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:5000"
    assert env["CAGE_MISSION_ID"] == "m1"
    assert env["NO_PROXY"] == "corp.example,127.0.0.1,localhost"
    assert env["no_proxy"] == "127.0.0.1,localhost"


def test_new_mission_ids_are_valid_and_unique():
    ids = {mission.new_mission_id() for _ in range(50)}
    assert len(ids) == 50
    for mid in ids:
        assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", mid)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_run_agent_stops_a_tree_with_a_setsid_escaper_at_the_runtime_limit(tmp_path):
    pidfile = tmp_path / "escaper.pid"
    script = (
        "import os, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import os, sys, time; os.setsid(); "
        'open(sys.argv[1], "w").write(str(os.getpid())); time.sleep(60)\', sys.argv[1]])\n'
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # ignores TERM: KILL
        "time.sleep(60)\n"
    )
    run = mission.run_agent(
        [sys.executable, "-c", script, str(pidfile)],
        cwd=tmp_path,
        env=dict(os.environ),
        max_runtime_s=1.0,
        budget_exhausted=lambda: False,
        grace_s=0.2,
    )
    assert run.stopped_by == "runtime"
    assert run.exit_code == -9  # it ignored SIGTERM, so the grace period ended in SIGKILL
    assert run.processes_stopped >= 2
    assert _gone(int(pidfile.read_text()))


def test_run_agent_stops_when_the_budget_is_spent(tmp_path):
    flag = tmp_path / "spent"
    started = time.monotonic()
    run = mission.run_agent(
        [sys.executable, "-c", f"open({str(flag)!r}, 'w'); import time; time.sleep(60)"],
        cwd=tmp_path,
        env=dict(os.environ),
        max_runtime_s=None,
        budget_exhausted=flag.exists,
        grace_s=5,
    )
    assert run.stopped_by == "budget"
    assert run.exit_code == -15  # SIGTERM was enough
    assert time.monotonic() - started < 30


def test_run_agent_cleans_up_leftovers_of_an_agent_that_exited(tmp_path):
    pidfile = tmp_path / "bg.pid"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
    )
    run = mission.run_agent(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=dict(os.environ),
        max_runtime_s=30,
        budget_exhausted=lambda: False,
        grace_s=1,
    )
    assert run.stopped_by is None and run.exit_code == 0
    assert run.processes_stopped == 1
    assert _gone(int(pidfile.read_text()))


def test_combine_puts_mission_stops_first():
    verdict = {"verdict": "HUMAN_APPROVAL_REQUIRED", "reasons": [{"code": "verifier_touched"}]}
    stop = [{"code": "budget_exceeded", "message": "m"}]
    assert mission._combine(stop, verdict) == (
        "BLOCKED",
        [{"code": "budget_exceeded", "message": "m"}, {"code": "verifier_touched"}],
    )
    info = [{"code": "agent_exit_nonzero", "message": "m"}]
    assert mission._combine(info, {"verdict": "PASS", "reasons": []}) == ("PASS", info)
    assert mission._combine([], None)[0] == "BLOCKED"


# --- gitio.Repo.snapshot, as the mission uses it ---
@pytest.fixture
def worked_on(git_repo):
    git_repo.write(".gitignore", "build/\n")
    git_repo.write("a.txt", "a\n")
    git_repo.write("b.txt", "b\n")
    git_repo.write(".runcap/outcomes/old/receipt.json", "{}\n")
    base = git_repo.commit("base")
    git_repo.write("a.txt", "a2\n")  # unstaged edit
    git_repo.write("c.txt", "c\n")
    git_repo.git("add", "c.txt")  # staged addition
    git_repo.git("rm", "-q", "b.txt")  # staged deletion
    git_repo.write("new/d.txt", "d\n")  # untracked
    git_repo.write("build/out.bin", "ignored\n")  # ignored
    git_repo.write(".runcap/outcomes/m/receipt.json", "{}\n")  # a receipt: not the agent's
    git_repo.write(".runcap/outcomes/old/receipt.json", "{edited}\n")
    return git_repo, base


def test_snapshot_records_everything_and_touches_nothing(worked_on):
    repo, base = worked_on
    before = (
        repo.git("rev-parse", "HEAD"),
        repo.git("symbolic-ref", "HEAD"),
        repo.git("diff", "--cached"),
        repo.git("status", "--porcelain", "--untracked-files=all"),
        (repo.path / ".git/index").read_bytes(),
    )
    r = gitio.Repo(repo.path)
    snap = r.snapshot(ref="refs/cage/missions/m", message="snap", keep_from_head=".runcap/outcomes")
    after = (
        repo.git("rev-parse", "HEAD"),
        repo.git("symbolic-ref", "HEAD"),
        repo.git("diff", "--cached"),
        repo.git("status", "--porcelain", "--untracked-files=all"),
        (repo.path / ".git/index").read_bytes(),
    )
    assert before == after
    assert snap.parent == base
    assert repo.git("rev-parse", "refs/cage/missions/m").strip() == snap.commit
    assert repo.git("log", "-1", "--format=%P %an %s", snap.commit).strip() == f"{base} cage snap"
    files = set(repo.git("ls-tree", "-r", "--name-only", snap.commit).split())
    assert files == {
        ".gitignore",
        "a.txt",
        "c.txt",
        "new/d.txt",
        ".runcap/outcomes/old/receipt.json",
    }
    assert repo.git("show", f"{snap.commit}:a.txt") == "a2\n"
    assert repo.git("show", f"{snap.commit}:.runcap/outcomes/old/receipt.json") == "{}\n"
    assert repo.git("rev-parse", f"{snap.commit}^{{tree}}").strip() == snap.tree


def test_dirty_paths_skip_receipts(worked_on):
    repo, _base = worked_on
    r = gitio.Repo(repo.path)
    assert set(r.dirty_paths(skip_prefix=".runcap/outcomes/")) == {
        "a.txt",
        "b.txt",
        "c.txt",
        "new/d.txt",
    }
    repo.commit("everything")
    r = gitio.Repo(repo.path)
    assert r.dirty_paths(skip_prefix=".runcap/outcomes/") == []


def test_mission_reason_codes_are_documented_and_distinct_from_the_gates():
    from pathlib import Path

    from cage import adjudicate

    docs = (Path(mission.__file__).parent.parent.parent / "docs" / "missions.md").read_text()
    for code in mission.MISSION_REASONS:
        assert f"`{code}`" in docs, code
        assert code not in adjudicate.REASON_CODES


def test_snapshot_sees_a_same_size_edit_in_the_index_timestamp(git_repo):
    """A "racily clean" entry (file not older than the index) must be re-read: the copied
    index keeps the real one's mtime, or git would trust stale stat data."""
    git_repo.git("config", "core.trustctime", "false")  # as on file systems without ctime
    path = git_repo.write("a.txt", "old\n")
    stamp = 1_700_000_000
    os.utime(path, (stamp, stamp))
    git_repo.commit("base")
    os.utime(git_repo.path / ".git" / "index", (stamp, stamp))
    path.write_text("new\n")  # same size, same mtime: only the content tells
    os.utime(path, (stamp, stamp))
    r = gitio.Repo(git_repo.path)
    snap = r.snapshot(ref="refs/cage/missions/racy", message="snap")
    assert git_repo.git("show", f"{snap.commit}:a.txt") == "new\n"


@pytest.mark.parametrize("grace", [float("nan"), float("inf"), -1.0])
def test_a_grace_period_that_never_ends_or_is_negative_is_refused(grace, tmp_path):
    # NaN passed the old "< 0" check; the agent would then never get its SIGKILL.
    from cage.errors import UsageError

    options = mission.MissionOptions(argv=["true"], repo=str(tmp_path), grace_s=grace)
    with pytest.raises(UsageError, match="--grace must be a finite number"):
        mission.run_mission(options)


def test_an_outcomes_file_in_the_way_is_refused_before_the_agent_starts(git_repo, tmp_path):
    # It used to surface only when the receipt was due, as a traceback, after the spend.
    git_repo.write(".runcap/outcomes", "not a folder\n")
    git_repo.commit("outcomes is a file")
    marker = tmp_path / "agent-ran"
    options = mission.MissionOptions(argv=["touch", str(marker)], repo=str(git_repo.path))
    from cage.errors import CageError

    with pytest.raises(CageError, match=r"outcomes is not a directory"):
        mission.run_mission(options)
    assert not marker.exists()
