"""cage.gitio against real git repositories."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from cage.errors import GitError
from cage.gitio import Change, Repo, parse_cat_file_batch, parse_raw_diff

ZERO = "0" * 40

# Paths git allows and shells and parsers get wrong.
ODD_PATHS = [
    "with space/a file.py",
    "unicodé/naïve-日本.txt",
    "new\nline.txt",
    "tab\there.txt",
    "-leading-dash.txt",
    'quote"s and \\backslash.txt',
    ":(glob)*magic.txt",
]


def worktrees(repo) -> list[str]:
    out = repo.git("worktree", "list", "--porcelain")
    return [line[len("worktree ") :] for line in out.splitlines() if line.startswith("worktree ")]


# -- opening ----------------------------------------------------------------------------------


def test_not_a_repository_is_a_git_error(tmp_path):
    with pytest.raises(GitError, match="not inside a git repository"):
        Repo(tmp_path)


def test_missing_directory_is_a_git_error(tmp_path):
    with pytest.raises(GitError, match="not a directory"):
        Repo(tmp_path / "nope")


def test_root_found_from_a_subdirectory(git_repo):
    git_repo.write("pkg/sub/x.py", "x = 1\n")
    git_repo.commit()
    repo = Repo(git_repo.path / "pkg" / "sub")
    assert repo.root == git_repo.path.resolve()


# -- revisions --------------------------------------------------------------------------------


def test_resolve_commit_gives_full_sha_for_refs_and_shas(git_repo):
    git_repo.write("a.txt", "1")
    first = git_repo.commit()
    git_repo.write("a.txt", "2")
    second = git_repo.commit()
    repo = Repo(git_repo.path)
    assert repo.resolve_commit("main") == second
    assert repo.resolve_commit("HEAD~1") == first
    assert repo.resolve_commit(first[:10]) == first


@pytest.mark.parametrize("rev", ["-x", "--all", "--output=/tmp/pwned", "-"])
def test_resolve_commit_refuses_option_like_values(git_repo, rev):
    git_repo.commit()
    with pytest.raises(GitError, match="starts with '-'"):
        Repo(git_repo.path).resolve_commit(rev)


@pytest.mark.parametrize("rev", ["", "   ", "a\0b"])
def test_resolve_commit_refuses_empty_and_nul(git_repo, rev):
    git_repo.commit()
    with pytest.raises(GitError):
        Repo(git_repo.path).resolve_commit(rev)


def test_resolve_commit_names_the_unknown_revision(git_repo):
    git_repo.commit()
    with pytest.raises(GitError, match="'no-such-branch' does not resolve to a commit"):
        Repo(git_repo.path).resolve_commit("no-such-branch")


def test_resolve_commit_refuses_trees_and_blobs(git_repo):
    git_repo.write("a.txt", "1")
    commit = git_repo.commit()
    repo = Repo(git_repo.path)
    tree = git_repo.git("rev-parse", f"{commit}^{{tree}}").strip()
    blob = git_repo.git("rev-parse", f"{commit}:a.txt").strip()
    for sha in (tree, blob, "0" * 40):
        with pytest.raises(GitError, match="does not resolve to a commit"):
            repo.resolve_commit(sha)


def test_tree_of(git_repo):
    git_repo.write("a.txt", "1")
    commit = git_repo.commit()
    assert Repo(git_repo.path).tree_of(commit) == git_repo.git("rev-parse", "HEAD^{tree}").strip()


# -- diff -------------------------------------------------------------------------------------


def test_diff_lists_odd_paths_exactly(git_repo):
    git_repo.write("keep.txt", "k")
    base = git_repo.commit()
    for path in ODD_PATHS:
        git_repo.write(path, f"content of {path}")
    head = git_repo.commit()
    repo = Repo(git_repo.path)
    changes = repo.diff(base, head)
    assert sorted(c.path for c in changes) == sorted(ODD_PATHS)
    assert {c.status for c in changes} == {"A"}
    blobs = repo.read_blobs(c.new_sha for c in changes)
    for change in changes:
        assert blobs[change.new_sha] == f"content of {change.path}".encode()


def test_diff_non_utf8_path_survives_round_trip(git_repo):
    base = git_repo.commit()
    raw = b"bad-\xff\xfe.txt"
    (git_repo.path / os.fsdecode(raw)).write_bytes(b"x")
    head = git_repo.commit()
    repo = Repo(git_repo.path)
    [change] = repo.diff(base, head)
    assert change.path.encode("utf-8", "surrogateescape") == raw
    assert repo.existing_files(head, [change.path]) == {change.path}
    assert repo.read_file_at(head, change.path) == b"x"


def test_diff_statuses_modes_and_full_shas(git_repo):
    git_repo.write("mod.txt", "old")
    git_repo.write("gone.txt", "bye")
    git_repo.write("script.sh", "echo hi\n")
    git_repo.write("becomes_link", "file")
    base = git_repo.commit()
    git_repo.write("mod.txt", "new")
    git_repo.remove("gone.txt")
    (git_repo.path / "script.sh").chmod(0o755)
    (git_repo.path / "becomes_link").unlink()
    os.symlink("mod.txt", git_repo.path / "becomes_link")
    os.symlink("../outside", git_repo.path / "new_link")
    head = git_repo.commit()
    changes = {c.path: c for c in Repo(git_repo.path).diff(base, head)}

    assert changes["mod.txt"].status == "M"
    assert changes["gone.txt"] == Change(
        "D", "gone.txt", "100644", "000000", changes["gone.txt"].old_sha, ZERO
    )
    assert (changes["script.sh"].status, changes["script.sh"].new_mode) == ("M", "100755")
    assert changes["script.sh"].old_sha == changes["script.sh"].new_sha
    assert (changes["becomes_link"].status, changes["becomes_link"].new_mode) == ("T", "120000")
    assert (changes["new_link"].status, changes["new_link"].new_mode) == ("A", "120000")
    for change in changes.values():
        assert len(change.old_sha) == 40 and len(change.new_sha) == 40


def test_diff_lists_gitlinks_and_never_renames(git_repo):
    git_repo.write("big.txt", "line\n" * 200)
    base = git_repo.commit()
    git_repo.git("mv", "big.txt", "moved.txt")
    git_repo.git("update-index", "--add", "--cacheinfo", f"160000,{base},vendor/sub")
    git_repo.git("commit", "-q", "-m", "rename and submodule")
    head = git_repo.head()
    changes = {c.path: c for c in Repo(git_repo.path).diff(base, head)}
    assert changes["big.txt"].status == "D"
    assert changes["moved.txt"].status == "A"
    assert changes["vendor/sub"].new_mode == "160000"
    assert changes["vendor/sub"].new_sha == base


def test_diff_refuses_option_like_revisions(git_repo):
    git_repo.commit()
    with pytest.raises(GitError, match="starts with '-'"):
        Repo(git_repo.path).diff("--output=x", "HEAD")


def test_diff_ignores_an_inherited_git_dir(git_repo, tmp_path, monkeypatch):
    git_repo.write("a.txt", "1")
    base = git_repo.commit()
    git_repo.write("a.txt", "2")
    head = git_repo.commit()
    other = tmp_path / "other"
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    repo = Repo(git_repo.path)
    [change] = repo.diff(base, head)
    assert repo.read_blobs([change.new_sha]) == {change.new_sha: b"2"}


def test_parse_raw_diff_splits_rename_records_into_delete_and_add():
    old, new = "a" * 40, "b" * 40
    out = f":100644 100644 {old} {new} R087\0from.py\0to.py\0".encode()
    assert parse_raw_diff(out) == [
        Change("D", "from.py", "100644", "000000", old, ZERO),
        Change("A", "to.py", "000000", "100644", ZERO, new),
    ]


def test_parse_raw_diff_rejects_garbage():
    with pytest.raises(GitError):
        parse_raw_diff(b"not raw output\0")


# -- blobs ------------------------------------------------------------------------------------


def test_read_blobs_reads_1500_blobs_through_one_process(git_repo, tmp_path, monkeypatch):
    base = git_repo.commit()
    # One fast-import stream builds the 1,500-file commit without touching the disk per file.
    stream = [f"commit refs/heads/main\ncommitter t <t@t> 0 +0000\ndata 4\nhead\nfrom {base}\n"]
    for i in range(1500):
        content = f"value = {i}\n" + "x" * (i % 97) * 50  # sizes vary, some over a pipe buffer
        stream.append(f"M 100644 inline pkg/m{i}.py\ndata {len(content)}\n{content}\n")
    git_repo.git("fast-import", "--quiet", input="".join(stream).encode())
    head = git_repo.git("rev-parse", "main").strip()
    repo = Repo(git_repo.path)
    changes = repo.diff(base, head)
    assert len(changes) == 1500

    # A `git` first on PATH that logs each call, then runs the real one.
    real_git = shutil.which("git")
    log = tmp_path / "git-calls.log"
    wrapper = tmp_path / "bin" / "git"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real_git} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")

    blobs = repo.read_blobs(c.new_sha for c in changes)
    assert log.read_text().count("cat-file") == 1
    assert len(blobs) == 1500
    for i, change in enumerate(sorted(changes, key=lambda c: int(c.path[5:-3]))):
        assert blobs[change.new_sha] == (f"value = {i}\n" + "x" * (i % 97) * 50).encode()


def test_read_blobs_missing_object_is_a_git_error_and_reading_stays_in_step(git_repo):
    git_repo.write("a.txt", "alpha")
    git_repo.write("b.txt", "beta")
    commit = git_repo.commit()
    a = git_repo.git("rev-parse", f"{commit}:a.txt").strip()
    b = git_repo.git("rev-parse", f"{commit}:b.txt").strip()
    repo = Repo(git_repo.path)
    assert repo.read_blobs([a]) == {a: b"alpha"}
    with pytest.raises(GitError, match="missing"):
        repo.read_blobs([b, "1" * 40])
    with pytest.raises(GitError, match="not a hexadecimal"):
        repo.read_blobs(["HEAD:a.txt"])
    assert repo.read_blobs([b, a]) == {b: b"beta", a: b"alpha"}


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (b"", "ends before"),
        (b"aaaa blob 5\nabc", "cut short"),
        (b"aaaa blob 5\nabcdefgh\n", "cut short"),
        (b"bbbb blob 1\nx\n", "answered bbbb"),
        (b"aaaa blob five\nx\n", "malformed header"),
        (b"aaaa ambiguous\n", "ambiguous"),
    ],
)
def test_a_cat_file_stream_out_of_step_is_a_git_error(out, message):
    with pytest.raises(GitError, match=message):
        parse_cat_file_batch(out, ["aaaa"])


def test_a_cat_file_stream_keeps_newlines_inside_content():
    out = b"aaaa blob 3\n\n\n\n\nbbbb blob 0\n\n"
    assert parse_cat_file_batch(out, ["aaaa", "bbbb"]) == {"aaaa": b"\n\n\n", "bbbb": b""}


def test_read_blobs_binary_content_is_exact(git_repo):
    payload = bytes(range(256)) * 50 + b"\n\n\0"
    git_repo.write("blob.bin", payload)
    commit = git_repo.commit()
    repo = Repo(git_repo.path)
    assert repo.read_file_at(commit, "blob.bin") == payload


# -- files at a commit ------------------------------------------------------------------------


@pytest.fixture
def tree_repo(git_repo):
    """A commit holding a file, an executable, a dir, a symlink, a gitlink and odd paths."""
    git_repo.write(".runcap/mission.yaml", "version: v1\n")
    git_repo.write("run.sh", "#!/bin/sh\n", mode=0o755)
    git_repo.write("src/pkg/mod.py", "x = 1\n")
    git_repo.write("real.yaml", "real\n")
    os.symlink("real.yaml", git_repo.path / "linked.yaml")
    for path in ODD_PATHS:
        git_repo.write(path, path)
    first = git_repo.commit()
    git_repo.git("update-index", "--add", "--cacheinfo", f"160000,{first},sub")
    git_repo.git("commit", "-q", "-m", "gitlink")
    return git_repo


def test_read_file_at(tree_repo):
    repo = Repo(tree_repo.path)
    head = tree_repo.head()
    assert repo.read_file_at(head, ".runcap/mission.yaml") == b"version: v1\n"
    assert repo.read_file_at(head, "run.sh") == b"#!/bin/sh\n"
    for path in ODD_PATHS:
        assert repo.read_file_at(head, path) == path.encode()
    # Absent, a directory, a symlink (never followed), a gitlink, unclean paths: None.
    for path in (
        "nope.yaml",
        "src",
        "src/pkg",
        "linked.yaml",
        "sub",
        "",
        "./real.yaml",
        "src/../real.yaml",
        "/real.yaml",
        "src/pkg/mod.py/x",
        "linked.yaml/x",
    ):
        assert repo.read_file_at(head, path) is None, path


def test_entry_at_says_what_is_there(tree_repo):
    repo = Repo(tree_repo.path)
    head = tree_repo.head()
    assert repo.entry_at(head, "linked.yaml").mode == "120000"
    assert repo.entry_at(head, "sub").type == "commit"
    assert repo.entry_at(head, "src").type == "tree"
    assert repo.entry_at(head, "nope") is None


def test_existing_files_keeps_only_regular_files(tree_repo):
    repo = Repo(tree_repo.path)
    head = tree_repo.head()
    asked = [
        "run.sh",
        "src",
        "src/pkg/mod.py",
        "linked.yaml",
        "sub",
        "missing.py",
        "..",
        "/etc/passwd",
        "src/../run.sh",
        *ODD_PATHS,
    ]
    expected = {"run.sh", "src/pkg/mod.py", *ODD_PATHS}
    assert repo.existing_files(head, asked) == expected
    # Past the command-line size limit it lists the whole tree instead: same answer.
    many = asked + [f"ghost/{i}.py" for i in range(600)]
    assert repo.existing_files(head, many) == expected
    assert repo.existing_files(head, []) == set()


# -- worktrees --------------------------------------------------------------------------------


def two_commits(git_repo):
    git_repo.write("a.txt", "base\n")
    git_repo.write(".gitignore", "ignored/\n*.log\n")
    base = git_repo.commit("base")
    git_repo.write("a.txt", "head\n")
    git_repo.write("b.txt", "only at head\n")
    head = git_repo.commit("head")
    return base, head


def test_worktree_is_detached_in_tmp_and_removed(git_repo):
    base, _ = two_commits(git_repo)
    repo = Repo(git_repo.path)
    with repo.worktree(base) as wt:
        path = wt.path
        assert path.parent == Path(tempfile.gettempdir())
        assert (path / "a.txt").read_text() == "base\n"
        assert not (path / "b.txt").exists()
        head_ref = subprocess.run(
            ["git", "-C", str(path), "symbolic-ref", "-q", "HEAD"], capture_output=True
        )
        assert head_ref.returncode != 0  # detached
        assert len(worktrees(git_repo)) == 2
    assert not path.exists()
    assert worktrees(git_repo) == [str(git_repo.path)]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_worktree_removed_and_unregistered_after_an_error(git_repo, error):
    base, _ = two_commits(git_repo)
    repo = Repo(git_repo.path)
    with pytest.raises(error), repo.worktree(base) as wt:
        path = wt.path
        (path / "junk.txt").write_text("dirty")
        (path / "a.txt").write_text("modified")
        raise error()
    assert not path.exists()
    assert worktrees(git_repo) == [str(git_repo.path)]
    assert not list((git_repo.path / ".git" / "worktrees").glob("*"))


def test_worktree_cleanup_after_the_directory_vanished(git_repo):
    base, _ = two_commits(git_repo)
    repo = Repo(git_repo.path)
    import shutil

    with repo.worktree(base) as wt:
        shutil.rmtree(wt.path)
    assert worktrees(git_repo) == [str(git_repo.path)]


def test_worktree_cleanup_of_a_locked_entry_whose_git_file_was_rewritten(git_repo, tmp_path):
    base, _ = two_commits(git_repo)
    repo = Repo(git_repo.path)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "locked").write_text("must survive")
    with repo.worktree(base) as wt:
        [admin] = (git_repo.path / ".git" / "worktrees").iterdir()
        (admin / "locked").write_text("initializing")  # as an interrupted `worktree add` leaves
        (wt.path / ".git").write_text(f"gitdir: {decoy}\n")  # code in the tree rewrote it
        path = wt.path
    assert not path.exists()
    assert worktrees(git_repo) == [str(git_repo.path)]
    assert (decoy / "locked").read_text() == "must survive"


def test_worktree_of_unknown_commit_leaves_nothing(git_repo, tmp_path, monkeypatch):
    two_commits(git_repo)
    repo = Repo(git_repo.path)
    # A private temporary directory: parallel tests create worktrees in the shared one.
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with pytest.raises(GitError, match="worktree"), repo.worktree("1" * 40):
        pass
    assert list(private.iterdir()) == []
    assert worktrees(git_repo) == [str(git_repo.path)]


def processes_naming(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if any(str(path) in arg for arg in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("delay", [0, 0.01, 0.05])
def test_started_worktree_cancelled_while_git_writes_leaves_nothing(git_repo, delay):
    for i in range(300):
        git_repo.write(f"pkg{i % 10}/f{i}.txt", f"{i}\n" * 50)
    base = git_repo.commit("many files")
    repo = Repo(git_repo.path)
    pending = repo.start_worktree(base)
    path = pending.path
    time.sleep(delay)
    pending.close()  # git is most likely still writing: it is stopped, then all is removed
    assert not path.exists()
    assert worktrees(git_repo) == [str(git_repo.path)]
    assert not list((git_repo.path / ".git" / "worktrees").glob("*"))
    assert processes_naming(path) == []
    with pytest.raises(GitError, match="cancelled"):
        pending.wait()


@pytest.mark.parametrize("when", ["directory made", "git started"])
def test_ctrl_c_while_a_worktree_is_started_leaves_nothing(git_repo, tmp_path, monkeypatch, when):
    # A signal landing between making the directory and handing the started git to the
    # caller's cleanup used to leave the directory (or git writing a registered worktree)
    # to no one: it is held until the cleanup owns them, then raised.
    import signal
    import tempfile

    from cage import gitio

    base, _ = two_commits(git_repo)
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    real_mkdtemp, real_popen = tempfile.mkdtemp, subprocess.Popen

    def mkdtemp(*args, **kwargs):
        made = real_mkdtemp(*args, **kwargs)
        if when == "directory made":
            os.kill(os.getpid(), signal.SIGINT)
        return made

    def popen(args, **kwargs):
        started = real_popen(args, **kwargs)
        if when == "git started" and "add" in args:  # the worktree add, not the later calls
            os.kill(os.getpid(), signal.SIGINT)
        return started

    monkeypatch.setattr(gitio.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(gitio.subprocess, "Popen", popen)
    with pytest.raises(KeyboardInterrupt), Repo(git_repo.path).worktree(base):
        pytest.fail("the interrupt must come before the worktree is used")
    assert list(private.iterdir()) == []
    assert worktrees(git_repo) == [str(git_repo.path)]
    assert not list((git_repo.path / ".git" / "worktrees").glob("*"))


def test_started_worktree_is_the_commit_and_is_removed(git_repo):
    base, _ = two_commits(git_repo)
    repo = Repo(git_repo.path)
    with repo.start_worktree(base) as pending:
        wt = pending.wait()
        assert wt is pending.wait()
        assert (wt.path / "a.txt").read_text() == "base\n"
        assert not (wt.path / "b.txt").exists()
    assert not wt.path.exists()
    assert worktrees(git_repo) == [str(git_repo.path)]


def test_switch_cleans_everything_from_the_previous_run(git_repo):
    base, head = two_commits(git_repo)
    repo = Repo(git_repo.path)
    with repo.worktree(base) as wt:
        (wt.path / "a.txt").write_text("edited by the base run")
        (wt.path / "untracked.py").write_text("x")
        (wt.path / "run.log").write_text("ignored file")
        (wt.path / "ignored").mkdir()
        (wt.path / "ignored" / "cache.bin").write_bytes(b"\0")
        nested = wt.path / "nested"
        subprocess.run(["git", "init", "-q", str(nested)], check=True)
        (nested / "file").write_text("in a nested repository")

        wt.switch(head)

        names = sorted(p.name for p in wt.path.iterdir())
        assert names == [".git", ".gitignore", "a.txt", "b.txt"]
        assert (wt.path / "a.txt").read_text() == "head\n"
        rev = subprocess.run(
            ["git", "-C", str(wt.path), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        assert rev.stdout.strip() == head
    assert worktrees(git_repo) == [str(git_repo.path)]


def test_restore_paths_from_base(git_repo):
    git_repo.write("tests/test_a.py", "assert False\n")
    git_repo.write("tests/old.py", "old\n")
    git_repo.write("new\nline.py", "base\n")
    git_repo.write("src/code.py", "code = 1\n")
    base = git_repo.commit()
    git_repo.write("tests/test_a.py", "assert True\n")
    git_repo.remove("tests/old.py")
    git_repo.write("tests/added.py", "planted\n")
    git_repo.write("new\nline.py", "head\n")
    git_repo.write("src/code.py", "code = 2\n")
    head = git_repo.commit()
    repo = Repo(git_repo.path)
    with repo.worktree(head) as wt:
        wt.restore_paths_from(
            base,
            ["tests/test_a.py", "tests/old.py", "tests/added.py", "new\nline.py", "ghost.py"],
        )
        assert (wt.path / "tests/test_a.py").read_text() == "assert False\n"
        assert (wt.path / "tests/old.py").read_text() == "old\n"
        assert not (wt.path / "tests/added.py").exists()
        assert (wt.path / "new\nline.py").read_text() == "base\n"
        assert (wt.path / "src/code.py").read_text() == "code = 2\n"  # not asked: untouched
        wt.restore_paths_from(base, [])  # nothing to do is fine


# -- nothing in the repository runs code --------------------------------------------------------


def test_hooks_filters_and_fsmonitor_never_run(git_repo, tmp_path):
    marker = tmp_path / "ran"
    script = tmp_path / "evil.sh"
    script.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\ncat\n')
    script.chmod(0o755)
    hooks = git_repo.path / ".git" / "hooks"
    for hook in ("post-checkout", "reference-transaction"):
        (hooks / hook).write_text(f"#!/bin/sh\necho {hook} >> {marker}\n")
        (hooks / hook).chmod(0o755)
    git_repo.git("config", "filter.evil.smudge", str(script))
    git_repo.git("config", "filter.evil.clean", "cat")
    git_repo.git("config", "filter.evil.required", "true")
    git_repo.git("config", "core.fsmonitor", str(script))
    git_repo.write(".gitattributes", "*.txt filter=evil\n")
    git_repo.write("a.txt", "as committed\n")
    base = git_repo.commit()
    git_repo.write("a.txt", "head\n")
    head = git_repo.commit()
    marker.unlink(missing_ok=True)  # the fixture's own commits may have run them

    repo = Repo(git_repo.path)
    repo.diff(base, head)
    with repo.worktree(base) as wt:
        assert (wt.path / "a.txt").read_text() == "as committed\n"
        wt.switch(head)
        wt.restore_paths_from(base, ["a.txt"])
        assert (wt.path / "a.txt").read_text() == "as committed\n"
    assert not marker.exists(), marker.read_text()
