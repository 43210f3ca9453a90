"""Every git call cage makes: resolve, diff, read blobs, worktrees.

One git process per operation, never one per file: the change is listed by one
``git diff-tree --raw -z``, the blobs of a change are read by one ``git cat-file --batch``
(every request written at once, the answers read as one stream), and a path question about
a commit is one ``git ls-tree``.

The repository under judgement is hostile input. Its tree chooses attributes
(``.gitattributes``), and code it ran earlier (a verify command in a worktree) may have
written to ``.git/config``. So every call runs with:

- ``-c`` overrides for each config key that can start a program during the operations cage
  runs: hooks (``core.hooksPath=/dev/null``: post-checkout and reference-transaction run on
  ``worktree add`` and ``checkout``), ``core.fsmonitor=false``, ``diff.external=``,
  ``submodule.recurse=false`` (a checkout must not fetch or check out submodules),
  ``protocol.allow=never`` (no transport at all, so nothing reaches the network),
  ``gc.auto=0`` and ``maintenance.auto=false`` (no background work in the user's repository);
- for the operations that write files (``worktree add``, ``checkout``, ``restore``), every
  filter driver configured anywhere (``git config --get-regexp ^filter\\.``, read afresh each
  time, since an earlier run may have added one) is switched off with
  ``filter.<name>.smudge= clean= process=`` and ``required=false``, ``lfs`` always included.
  An attribute ``filter=<name>`` in the tree can only select a configured driver, so this
  leaves the content exactly as committed. The cost: a repository that needs Git LFS content
  for its tests sees the pointer files in the replay worktree. These operations also run
  with parallel checkout: writing the worktree of a large repository is most of the git
  work a replay needs. A checkout cage waits for gets a worker per core
  (``checkout.workers=0``); the base worktree, written while cage reads and judges the
  change, one core fewer (that one is cage's), at least two;
- ``--no-textconv --no-ext-diff`` on the diff (``--raw`` reads no content anyway), and the
  plumbing ``diff-tree`` rather than ``diff``, so ``diff.*`` user settings
  (``diff.relative``, ``diff.ignoreSubmodules``, ``diff.renames``) cannot change the listing;
- an environment with ``LC_ALL=C``, ``GIT_TERMINAL_PROMPT=0``, ``GIT_OPTIONAL_LOCKS=0``,
  ``GIT_NO_REPLACE_OBJECTS=1`` (a SHA means the object it names, not a replacement),
  ``GIT_LITERAL_PATHSPECS=1`` (cage only ever passes literal paths, never globs or pathspec
  magic) and without the variables that would point git at another repository or run a
  program (``GIT_DIR``, ``GIT_WORK_TREE``, ``GIT_INDEX_FILE``, ``GIT_EXTERNAL_DIFF``, ...).

Paths are bytes in git. They are decoded as UTF-8 with ``surrogateescape`` everywhere in
cage, so any byte sequence survives the round trip and nothing raises on odd names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cage.errors import GitError
from cage.runtime import usable_cpus

ENCODING = "utf-8"
ERRORS = "surrogateescape"

NULL_MODE = "000000"
REGULAR_MODES = frozenset({"100644", "100755"})

# Config overrides on every git call: each key here can make git start a program (or touch
# the network, or do background work) during the operations cage runs.
SAFE_CONFIG: tuple[str, ...] = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "diff.external=",
    "submodule.recurse=false",
    "protocol.allow=never",
    "gc.auto=0",
    "maintenance.auto=false",
    "advice.detachedHead=false",
)

# Variables that would redirect git to another repository, index or program. cage always
# names the repository with -C, never inherits one.
_DROPPED_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_EXTERNAL_DIFF",
    "GIT_DIFF_OPTS",
    "GIT_PAGER",
    "GIT_EDITOR",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_ASKPASS",
    "GIT_PROXY_COMMAND",
    "GIT_ATTR_SOURCE",
)

_SET_ENV = {
    "LC_ALL": "C",
    "LANGUAGE": "C",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_OPTIONAL_LOCKS": "0",
    "GIT_NO_REPLACE_OBJECTS": "1",
    "GIT_LITERAL_PATHSPECS": "1",
}


def git_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every git call of cage runs with (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    for name in _DROPPED_ENV:
        env.pop(name, None)
    env.update(_SET_ENV)
    return env


def encode_path(path: str) -> bytes:
    """A cage path (str) back to git's bytes."""
    return path.encode(ENCODING, ERRORS)


def decode_path(raw: bytes) -> str:
    """Git's path bytes to a cage path; odd bytes survive as surrogates."""
    return raw.decode(ENCODING, ERRORS)


def _check_rev(rev: object) -> str:
    """Refuse revision values that git could read as something other than a revision."""
    if not isinstance(rev, str) or not rev.strip():
        raise GitError(f"empty revision {rev!r}: give a commit SHA or a ref")
    if rev.startswith("-"):
        raise GitError(
            f"refusing revision {rev!r}: it starts with '-' and git would read it as an option"
        )
    if "\0" in rev or "\n" in rev:
        raise GitError(f"refusing revision {rev!r}: it contains a NUL or newline character")
    return rev


def _is_clean_relpath(path: str) -> bool:
    """True for a normalised repository-relative path (no '', '.', '..' parts, no NUL)."""
    if not path or path.startswith("/") or "\0" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _tail(stderr: bytes, limit: int = 600) -> str:
    text = stderr.decode(ENCODING, "replace").strip()
    return text[-limit:] if text else "(no message from git)"


@dataclass(frozen=True)
class Change:
    """One changed path between two commits, as ``git diff --raw`` reports it."""

    status: str  # "A" added, "M" modified, "D" deleted, "T" type changed
    path: str
    old_mode: str  # "000000" when absent
    new_mode: str
    old_sha: str  # all zeros when absent
    new_sha: str


@dataclass(frozen=True)
class Snapshot:
    """A commit recording a working tree (``Repo.snapshot``), kept alive by ``ref``."""

    commit: str
    tree: str
    parent: str  # HEAD when the snapshot was taken
    ref: str


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a tree listing (``git ls-tree``)."""

    mode: str  # "100644", "100755", "120000" symlink, "160000" gitlink, "040000" tree
    type: str  # "blob", "tree", "commit"
    sha: str
    path: str


def _git_command(
    cwd: Path, args: Sequence[str | bytes], config: Sequence[str] = ()
) -> list[str | bytes]:
    """``git -C cwd -c SAFE... -c config... args``."""
    cmd: list[str | bytes] = ["git", "-C", str(cwd)]
    for item in (*SAFE_CONFIG, *config):
        cmd += ["-c", item]
    cmd += list(args)
    return cmd


def parse_raw_diff(out: bytes) -> list[Change]:
    """Parse ``git diff --raw -z`` output (``:om nm os ns S\\0path\\0``, two paths for R/C)."""
    fields = out.split(b"\0")
    changes: list[Change] = []
    i = 0
    while i < len(fields):
        header = fields[i]
        if not header:
            i += 1
            continue
        if not header.startswith(b":"):
            raise GitError(f"git diff: unexpected raw output near {header[:80]!r}")
        parts = header[1:].decode("ascii", "replace").split()
        if len(parts) != 5 or i + 1 >= len(fields):
            raise GitError(f"git diff: malformed raw record {header[:80]!r}")
        old_mode, new_mode, old_sha, new_sha, status = parts
        letter = status[:1]
        if letter in ("R", "C"):
            # Not produced with --no-renames; kept readable as deletion + addition so no
            # path can hide behind a rename record.
            if i + 2 >= len(fields):
                raise GitError(f"git diff: malformed raw record {header[:80]!r}")
            src, dst = decode_path(fields[i + 1]), decode_path(fields[i + 2])
            if letter == "R":
                changes.append(Change("D", src, old_mode, NULL_MODE, old_sha, "0" * len(old_sha)))
            changes.append(Change("A", dst, NULL_MODE, new_mode, "0" * len(new_sha), new_sha))
            i += 3
            continue
        changes.append(
            Change(letter, decode_path(fields[i + 1]), old_mode, new_mode, old_sha, new_sha)
        )
        i += 2
    return changes


def parse_ls_tree(out: bytes) -> list[TreeEntry]:
    """Parse ``git ls-tree -z`` output (``mode type sha\\tpath\\0``)."""
    entries = []
    for record in out.split(b"\0"):
        if not record:
            continue
        meta, sep, raw_path = record.partition(b"\t")
        parts = meta.decode("ascii", "replace").split()
        if not sep or len(parts) != 3:
            raise GitError(f"git ls-tree: malformed record {record[:80]!r}")
        entries.append(TreeEntry(parts[0], parts[1], parts[2], decode_path(raw_path)))
    return entries


_HEX = frozenset("0123456789abcdefABCDEF")


def parse_cat_file_batch(out: bytes, wanted: Sequence[str]) -> dict[str, bytes]:
    """Parse ``git cat-file --batch`` output: for each request in order, ``<sha> <type>
    <size>\n<content>\n``, or ``<name> missing`` / ``ambiguous``. GitError when an object
    is absent or the stream does not match the requests."""
    blobs: dict[str, bytes] = {}
    pos = 0
    for sha in wanted:
        eol = out.find(b"\n", pos)
        if eol < 0:
            raise GitError(f"git cat-file: the output ends before object {sha}")
        header = out[pos:eol].decode("ascii", "replace").split()
        if len(header) == 2 and header[1] in ("missing", "ambiguous"):
            raise GitError(f"git cat-file: object {sha} is {header[1]}")
        if len(header) != 3 or not header[2].isdigit():
            raise GitError(f"git cat-file: malformed header {out[pos:eol][:80]!r} for {sha}")
        name, size = header[0], int(header[2])
        if len(name) == len(sha) and name != sha.lower():
            raise GitError(f"git cat-file answered {name} when asked for {sha}")
        start, end = eol + 1, eol + 1 + size
        if out[end : end + 1] != b"\n":
            raise GitError(f"git cat-file: the content of {sha} is cut short")
        blobs[sha] = out[start:end]
        pos = end + 1
    return blobs


class Repo:
    """A git repository, accessed only through the git binary with safe settings."""

    def __init__(self, path: str | os.PathLike = ".") -> None:
        """Open the repository containing ``path``; GitError if there is none."""
        start = Path(path)
        if not start.is_dir():
            raise GitError(f"{str(start)!r} is not a directory; give the repository path")
        out = self._run_in(
            start,
            ["rev-parse", "--is-bare-repository", "--absolute-git-dir", "--show-cdup"],
            what=f"{str(start)!r} is not inside a git repository",
        )
        lines = out.decode(ENCODING, ERRORS).split("\n")
        self.bare = lines[0].strip() == "true"
        self.git_dir = Path(lines[1])
        cdup = lines[2] if len(lines) > 2 else ""
        self.root: Path = self.git_dir if self.bare else (start / cdup).resolve()

    # -- running git ------------------------------------------------------------------------

    @staticmethod
    def _run_in(
        cwd: Path,
        args: Sequence[str | bytes],
        *,
        what: str,
        config: Sequence[str] = (),
        input: bytes | None = None,
        ok_codes: tuple[int, ...] = (0,),
        env: dict[str, str] | None = None,
    ) -> bytes:
        cmd = _git_command(cwd, args, config)
        run_env = git_env()
        run_env.update(env or {})  # set after the scrub: e.g. a temporary GIT_INDEX_FILE
        try:
            done = subprocess.run(cmd, input=input, capture_output=True, env=run_env, check=False)
        except FileNotFoundError as exc:
            raise GitError("git is not installed or not on PATH; install git") from exc
        except OSError as exc:
            raise GitError(f"cannot run git {args[0]!s} ({what}): {exc}") from exc
        if done.returncode not in ok_codes:
            sub = args[0].decode() if isinstance(args[0], bytes) else args[0]
            raise GitError(f"git {sub} failed: {what}: {_tail(done.stderr)}")
        return done.stdout

    def _run(self, args: Sequence[str | bytes], *, what: str, **kw: Any) -> bytes:
        return self._run_in(self.root, args, what=what, **kw)

    def _checkout_config(self, cwd: Path, workers: int = 0) -> list[str]:
        """Config for commands that write files: every configured filter driver off (read
        afresh each time), and parallel checkout on with ``workers`` (0: one per core; the
        worktree of a large repository is most of cage's own cost)."""
        out = self._run_in(
            cwd,
            ["config", "-z", "--get-regexp", r"^filter\."],
            what="listing filter drivers",
            ok_codes=(0, 1),  # 1: no such keys
        )
        names = {"lfs"}
        for item in out.split(b"\0"):
            key = item.split(b"\n", 1)[0].decode(ENCODING, ERRORS)
            if key.startswith("filter.") and key.count(".") >= 2:
                name = key[len("filter.") : key.rindex(".")]
                if "=" in name:
                    # `-c` cannot name this driver, so it cannot be switched off: refuse.
                    raise GitError(
                        f"filter driver {name!r} in the git configuration of {cwd} cannot be "
                        "disabled safely; remove it from the configuration"
                    )
                names.add(name)
        config = [f"checkout.workers={workers}"]
        for name in sorted(names):
            config += [
                f"filter.{name}.smudge=",
                f"filter.{name}.clean=",
                f"filter.{name}.process=",
                f"filter.{name}.required=false",
            ]
        return config

    # -- revisions ---------------------------------------------------------------------------

    def resolve_commit(self, rev: str) -> str:
        """Full SHA of the commit ``rev`` names; GitError for '-' values and unknown revisions."""
        _check_rev(rev)
        out = self._run(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
            what=f"resolving {rev!r}",
            ok_codes=(0, 1),  # 1: does not resolve (judged below); other codes are real errors
        )
        sha = out.decode("ascii", "replace").strip()
        if not sha or not all(c in "0123456789abcdef" for c in sha):
            raise GitError(
                f"revision {rev!r} does not resolve to a commit in {self.root}: "
                "check the name, or fetch the full history (actions/checkout with fetch-depth: 0)"
            )
        return sha

    def tree_of(self, commit: str) -> str:
        """SHA of the root tree of ``commit``."""
        _check_rev(commit)
        out = self._run(
            ["rev-parse", "--verify", "--end-of-options", f"{commit}^{{tree}}"],
            what=f"revision {commit!r} has no tree (not a commit?)",
        )
        return out.decode("ascii").strip()

    # -- the change --------------------------------------------------------------------------

    def diff(self, base: str, head: str) -> list[Change]:
        """Every path changed from ``base`` to ``head``: one ``git diff-tree --raw -z`` call.

        No rename or copy detection (a rename is a deletion and an addition), no textconv,
        no external diff, submodule changes always listed, full object names.
        """
        _check_rev(base)
        _check_rev(head)
        out = self._run(
            [
                "diff-tree",
                "-r",
                "-z",
                "--raw",
                "--no-renames",
                "--no-textconv",
                "--no-ext-diff",
                "--no-abbrev",
                "--ignore-submodules=none",
                "--end-of-options",
                base,
                head,
            ],
            what=f"diff {base}..{head}",
        )
        return parse_raw_diff(out)

    # -- objects -----------------------------------------------------------------------------

    def read_blobs(self, shas: Iterable[str]) -> dict[str, bytes]:
        """Content of each object, all read by one ``git cat-file --batch``.

        Every request is written at once and the answers are read as one stream, as the
        git floor does: no round trip per object (writing a request and waiting for its
        answer costs ~40 us of both processes' time per blob, 2,000 of them for a change of
        1,000 files).
        """
        wanted = list(dict.fromkeys(shas))
        for sha in wanted:
            if not sha or len(sha) > 64 or not all(c in _HEX for c in sha):
                raise GitError(f"cannot read object {sha!r}: not a hexadecimal object name")
        if not wanted:
            return {}
        out = self._run(
            ["cat-file", "--batch"],
            what=f"reading {len(wanted)} object(s)",
            input="".join(f"{sha}\n" for sha in wanted).encode("ascii"),
        )
        return parse_cat_file_batch(out, wanted)

    def entry_at(self, commit: str, path: str) -> TreeEntry | None:
        """The tree entry at exactly ``path`` in ``commit`` (any type), or None."""
        _check_rev(commit)
        if not _is_clean_relpath(path):
            return None
        out = self._run(
            ["ls-tree", "-z", "--full-tree", "--end-of-options", commit, "--", encode_path(path)],
            what=f"listing {path!r} at {commit}",
        )
        for entry in parse_ls_tree(out):
            if entry.path == path:
                return entry
        return None

    def list_tree(self, commit: str) -> list[TreeEntry]:
        """Every blob and gitlink of ``commit``, recursively: one ``git ls-tree -r`` call."""
        _check_rev(commit)
        out = self._run(
            ["ls-tree", "-r", "-z", "--full-tree", "--end-of-options", commit],
            what=f"listing the tree of {commit}",
        )
        return parse_ls_tree(out)

    def read_file_at(self, commit: str, path: str) -> bytes | None:
        """Bytes of the regular file ``path`` at ``commit``; None when absent or not a file.

        A symlink, a submodule (gitlink) or a directory at ``path`` gives None: cage never
        follows a symlink out of the committed blob, so a symlinked policy reads as a missing
        policy. Callers wanting to say *why* can use :meth:`entry_at`.
        """
        entry = self.entry_at(commit, path)
        if entry is None or entry.type != "blob" or entry.mode not in REGULAR_MODES:
            return None
        return self.read_blobs([entry.sha])[entry.sha]

    def existing_files(self, commit: str, paths: Iterable[str]) -> set[str]:
        """Which of ``paths`` are regular files (mode 100644/100755) at ``commit``: one call."""
        _check_rev(commit)
        wanted = {p for p in paths if _is_clean_relpath(p)}
        if not wanted:
            return set()
        if len(wanted) <= 500:
            args: list[str | bytes] = ["ls-tree", "-z", "--full-tree", "--end-of-options"]
            args += [commit, "--", *sorted(encode_path(p) for p in wanted)]
        else:
            # Too many for one command line: list the whole tree once instead.
            args = ["ls-tree", "-r", "-z", "--full-tree", "--end-of-options", commit]
        out = self._run(args, what=f"listing files at {commit}")
        return {
            e.path
            for e in parse_ls_tree(out)
            if e.path in wanted and e.type == "blob" and e.mode in REGULAR_MODES
        }

    # -- the working tree (cage mission run) -------------------------------------------------

    def dirty_paths(self, skip_prefix: str | None = None) -> list[str]:
        """Paths of the working tree with uncommitted changes (tracked files, staged or not)
        and untracked files that are not ignored, except those under ``skip_prefix``: one
        ``git status``. Empty when the working tree is clean."""
        out = self._run(
            ["status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignore-submodules=none"],
            what="checking the working tree for uncommitted changes",
        )
        paths = []
        records = out.split(b"\0")
        i = 0
        while i < len(records):
            record = records[i]
            i += 1
            if len(record) < 4:
                continue
            path = decode_path(record[3:])
            if record[:1] in (b"R", b"C"):
                i += 1  # the source path of a rename or copy follows
            if skip_prefix and path.startswith(skip_prefix):
                continue
            paths.append(path)
        return paths

    def snapshot(self, *, ref: str, message: str, keep_from_head: str | None = None) -> Snapshot:
        """Record the working tree (commits since any base and uncommitted changes alike) as a
        commit whose parent is ``HEAD``, and point ``ref`` at it, without touching the branch,
        the index or the working tree.

        A temporary index (a copy of the real one, so git's stat cache spares re-hashing every
        file; ``read-tree HEAD`` if the copy cannot be used) gets ``git add -A`` (which honours
        .gitignore), then ``write-tree``, ``commit-tree`` and ``update-ref``. Paths under the
        folder ``keep_from_head`` (e.g. ``.runcap/outcomes``) are kept as they are at ``HEAD``.
        The commit is made by "cage <cage@localhost>"; no hook runs.
        """
        if not ref.startswith("refs/") or ref.endswith("/"):
            raise GitError(f"refusing snapshot ref {ref!r}: it must be a full ref name")
        parent = self.resolve_commit("HEAD")
        tmp = Path(tempfile.mkdtemp(prefix="cage-snapshot-"))
        try:
            index = tmp / "index"
            env = {"GIT_INDEX_FILE": str(index)}
            copied = False
            with contextlib.suppress(OSError):
                # copy2 keeps the index's mtime: git re-hashes "racily clean" entries (files
                # not older than the index), and a fresh mtime on the copy would hide a quick
                # same-size edit behind stale stat data.
                shutil.copy2(self.git_dir / "index", index)
                copied = True
            what = "staging the working tree in a temporary index"
            try:
                if not copied:
                    raise GitError("no index to copy")
                self._run(["add", "-A"], what=what, env=env)
            except GitError:
                with contextlib.suppress(OSError):
                    index.unlink()
                self._run(
                    ["read-tree", parent], what="reading HEAD into a temporary index", env=env
                )
                self._run(["add", "-A"], what=what, env=env)
            if keep_from_head:
                folder = keep_from_head.rstrip("/")
                self._run(
                    ["rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", folder],
                    what=f"keeping {folder} as at HEAD",
                    env=env,
                )
                listed = self._run(
                    [
                        "ls-tree",
                        "-r",
                        "-z",
                        "--full-tree",
                        "--end-of-options",
                        parent,
                        "--",
                        folder,
                    ],
                    what=f"listing {folder} at HEAD",
                )
                if listed:
                    self._run(
                        ["update-index", "-z", "--index-info"],
                        input=listed,
                        what=f"keeping {folder} as at HEAD",
                        env=env,
                    )
            tree = self._run(["write-tree"], what="writing the snapshot tree", env=env)
            tree_sha = tree.decode("ascii").strip()
            who = {
                "GIT_AUTHOR_NAME": "cage",
                "GIT_AUTHOR_EMAIL": "cage@localhost",
                "GIT_COMMITTER_NAME": "cage",
                "GIT_COMMITTER_EMAIL": "cage@localhost",
            }
            out = self._run(
                ["commit-tree", tree_sha, "-p", parent, "-m", message],
                what="writing the snapshot commit",
                env=who,
            )
            commit = out.decode("ascii").strip()
            self._run(["update-ref", ref, commit], what=f"pointing {ref} at the snapshot")
            return Snapshot(commit=commit, tree=tree_sha, parent=parent, ref=ref)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- worktrees ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def worktree(self, commit: str) -> Iterator[Worktree]:
        """A detached worktree of ``commit`` in the system temporary directory.

        Removed and unregistered on exit whatever happens (error, KeyboardInterrupt).
        """
        with contextlib.ExitStack() as stack:
            yield self.start_worktree_in(stack, commit).wait()

    def start_worktree_in(self, stack: contextlib.ExitStack, commit: str) -> PendingWorktree:
        """``start_worktree``, its removal registered in ``stack`` before any signal can act.

        Ctrl-C, SIGTERM (a cancelled job) or SIGHUP arriving while the directory is made and
        git started is held (``proctree.Interrupts``) and raised once ``stack`` owns the
        worktree: raised earlier, it left the directory, or git writing a registered
        worktree, to no one.
        """
        from cage.proctree import Interrupts

        with Interrupts():
            return stack.enter_context(self.start_worktree(commit))

    def start_worktree(self, commit: str) -> PendingWorktree:
        """Start ``git worktree add --detach`` of ``commit`` (system temporary directory) in
        the background and return at once; use the result as a context manager.

        Writing the worktree of a large repository is the largest single cost of a replay,
        so ``cage ci`` starts it as soon as base is known and reads the policy, the change
        and its blobs meanwhile. ``PendingWorktree.wait()`` gives the :class:`Worktree`;
        leaving the ``with`` block (or ``close()``) stops git if it still runs, then removes
        and unregisters the worktree, whatever happened (error, KeyboardInterrupt).
        """
        _check_rev(commit)
        # Read right before the add, as always. cage works on while git writes (Python: one
        # core), so git gets the other cores, but never fewer than two workers: where file
        # creation is slow (ext4 without a journal), a serial checkout took four times as
        # long as two workers.
        config = self._checkout_config(self.root, max(2, usable_cpus() - 1))
        path = Path(tempfile.mkdtemp(prefix="cage-wt-", dir=tempfile.gettempdir()))
        pending = PendingWorktree(self, commit, path)
        try:
            pending._start(config)
        except BaseException:
            pending.close()
            raise
        return pending

    def _remove_worktree(self, path: Path) -> None:
        """Remove and unregister a worktree; survives a second Ctrl-C during the cleanup."""
        interrupted: BaseException | None = None
        for _ in range(3):
            try:
                self._remove_worktree_once(path)
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _remove_worktree_once(self, path: Path) -> None:
        try:
            self._run(
                ["worktree", "remove", "--force", "--force", str(path)],
                what=f"removing the worktree at {path}",
            )
        except GitError:
            # Half-made (interrupted add) or damaged: delete it ourselves, unlock our admin
            # entry (an interrupted add leaves it locked, and prune skips locked entries),
            # then let git forget every entry whose directory is gone.
            shutil.rmtree(path, ignore_errors=True)
            for admin in self._admin_dirs_for(path):
                with contextlib.suppress(OSError):
                    (admin / "locked").unlink()
            self._run(["worktree", "prune"], what="pruning worktree entries")
        shutil.rmtree(path, ignore_errors=True)

    def _admin_dirs_for(self, path: Path) -> list[Path]:
        """Our ``worktrees/<name>`` entries that belong to ``path``.

        Found from the repository's side (each entry's ``gitdir`` file), never from the
        worktree's ``.git`` file, which code run in the worktree could have rewritten.
        """
        common = self.git_dir
        with contextlib.suppress(OSError):
            common = (self.git_dir / (self.git_dir / "commondir").read_text().strip()).resolve()
        wanted = {str(path / ".git"), str(path.resolve() / ".git")}
        found = []
        for admin in (common / "worktrees").glob("*"):
            try:
                target = (admin / "gitdir").read_text(ENCODING, ERRORS).strip()
            except OSError:
                continue
            if target in wanted:
                found.append(admin)
        return found


class PendingWorktree:
    """A ``git worktree add --detach`` running in the background (:meth:`Repo.start_worktree`).

    git runs in its own session (process group), so that ``close()`` can stop it together
    with the processes it starts (``reset --hard``, parallel checkout workers) before the
    directory is removed; a Ctrl-C reaches cage, whose ``close()`` does the same. The add
    runs with the same safe settings as every other git call: no hook, no filter driver.
    """

    def __init__(self, repo: Repo, commit: str, path: Path) -> None:
        self.repo = repo
        self.commit = commit
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._worktree: Worktree | None = None
        self._closed = False

    def _start(self, config: Sequence[str]) -> None:
        cmd = _git_command(
            self.repo.root,
            ["worktree", "add", "--detach", "--quiet", str(self.path), self.commit],
            config,
        )
        # A file, not a pipe: nobody reads while git runs, and a full pipe would stall it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env=git_env(),
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise GitError("git is not installed or not on PATH; install git") from exc
        except OSError as exc:
            raise GitError(f"cannot run git worktree (creating {self.path}): {exc}") from exc

    def wait(self) -> Worktree:
        """Wait for git; the worktree, or GitError when the add failed."""
        if self._worktree is not None:
            return self._worktree
        if self._closed or self._proc is None:
            raise GitError(f"the worktree of {self.commit} at {self.path} was cancelled")
        if self._proc.wait() != 0:
            self._stderr.seek(0)
            raise GitError(
                f"git worktree failed: creating a worktree of {self.commit} at {self.path}: "
                f"{_tail(self._stderr.read())}"
            )
        self._worktree = Worktree(self.repo, self.path)
        return self._worktree

    def close(self) -> None:
        """Stop git if it still runs, then remove and unregister the worktree (idempotent;
        survives a second Ctrl-C while stopping git)."""
        if self._closed:
            return
        self._closed = True
        interrupted: BaseException | None = None
        for _ in range(3):
            try:
                self._stop()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        try:
            if self._stderr is not None:
                self._stderr.close()
            self.repo._remove_worktree(self.path)
        finally:
            if interrupted is not None:
                raise interrupted

    def _stop(self) -> None:
        """Stop git and every process of its group, and wait until they are gone."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)  # git removes its half-made worktree
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Children of git (reset --hard, checkout workers) may outlive it for a moment: the
        # directory is removed only when the whole group is gone, so none writes after that.
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-proc.pid, os.WNOHANG)[0]:  # orphans cage adopted as subreaper
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
            except ProcessLookupError:
                return
            except OSError:
                return
            if time.monotonic() > deadline + 5:
                return
            time.sleep(0.01)

    def __enter__(self) -> PendingWorktree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Worktree:
    """A detached worktree made by :meth:`Repo.worktree`."""

    def __init__(self, repo: Repo, path: Path) -> None:
        self.repo = repo
        self.path = path

    def _git(self, args: Sequence[str | bytes], *, what: str, **kw: Any) -> bytes:
        return Repo._run_in(self.path, args, what=what, **kw)

    def switch(self, commit: str) -> None:
        """Detach to ``commit``, then ``git clean -ffdx``: nothing of the previous run survives.

        ``--force`` throws away edits to tracked files; ``-ffdx`` removes untracked and
        ignored files and nested repositories.
        """
        _check_rev(commit)
        self._git(
            ["checkout", "--detach", "--force", "--quiet", "--no-recurse-submodules", commit],
            what=f"switching the worktree {self.path} to {commit}",
            config=self.repo._checkout_config(self.path),
        )
        self._git(["clean", "-ffdxq"], what=f"cleaning the worktree {self.path}")

    def restore_paths_from(self, commit: str, paths: Iterable[str]) -> None:
        """Put ``paths`` back as they are at ``commit`` (deleting those absent there).

        One ``git restore --source`` call with NUL-separated literal paths; index and files
        both. Paths known neither at ``commit`` nor in the worktree are skipped.
        """
        _check_rev(commit)
        wanted = sorted({p for p in paths if _is_clean_relpath(p)})
        if not wanted:
            return
        config = self.repo._checkout_config(self.path)
        try:
            self._restore(commit, wanted, config)
        except GitError as exc:
            if "did not match" not in str(exc):
                raise
            # Some path exists nowhere (git refuses a pathspec that matches nothing): keep
            # those known at commit or in the worktree's index and try once more.
            known = self.repo.existing_files(commit, wanted)
            out = self._git(
                ["ls-files", "-z", "--", *(encode_path(p) for p in wanted)],
                what=f"listing paths in the worktree {self.path}",
            )
            known |= {decode_path(raw) for raw in out.split(b"\0") if raw}
            wanted = [p for p in wanted if p in known]
            if wanted:
                self._restore(commit, wanted, config)

    def _restore(self, commit: str, paths: list[str], config: list[str]) -> None:
        self._git(
            [
                "restore",
                "--quiet",
                "--no-overlay",
                f"--source={commit}",
                "--staged",
                "--worktree",
                "--pathspec-from-file=-",
                "--pathspec-file-nul",
            ],
            input=b"\0".join(encode_path(p) for p in paths) + b"\0",
            what=f"restoring {len(paths)} path(s) from {commit} in {self.path}",
            config=config,
        )
