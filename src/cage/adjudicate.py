"""Change classification + replay results -> Verdict.

The core is pure: ``classify`` turns the changed paths of base..head into findings,
``judge_replay`` turns the base and head runs of the verify command into reasons, and
``decide`` applies the four rules of DESIGN.md ("Verdict", first rule that applies wins).
``adjudicate`` is the thin pipeline around it: git objects in (never the working tree),
one worktree, one ``Verdict`` out.

Fail closed: every reason code belongs to exactly one rule in ``REASON_CODES``; a code that
is not in the table is treated as an integrity failure (``BLOCKED``), never ignored.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

SCHEMA = "cage.verdict/v1"

PASS = "PASS"
BLOCKED = "BLOCKED"
HUMAN_APPROVAL_REQUIRED = "HUMAN_APPROVAL_REQUIRED"
EXIT_CODES = {PASS: 0, BLOCKED: 1, HUMAN_APPROVAL_REQUIRED: 3}

VERIFIED_STRONG = "VERIFIED_STRONG"
VERIFIED_WEAK = "VERIFIED_WEAK"
UNVERIFIED = "UNVERIFIED"
VERIFIER_COMPROMISED = "VERIFIER_COMPROMISED"

# Which verdict rule a reason belongs to (DESIGN.md "Verdict"; first rule that applies wins).
RULE_INTEGRITY = 1  # BLOCKED: bad input or integrity failure, structural findings
RULE_HUMAN = 2  # HUMAN_APPROVAL_REQUIRED: verifier or tamper findings, unattested spend
RULE_BLOCKED = 3  # BLOCKED: scope, verification, regression, timeout, spend over limit
RULE_INFO = 4  # listed, never decides the verdict

_RULE_VERDICT = {
    RULE_INTEGRITY: BLOCKED,
    RULE_HUMAN: HUMAN_APPROVAL_REQUIRED,
    RULE_BLOCKED: BLOCKED,
}

TAMPER_PREFIX = "tamper_"

# Every reason code cage emits: code -> (rule, one-line meaning). docs/ci.md lists this table;
# a test checks that every code the code base emits is here and in the docs.
REASON_CODES: dict[str, tuple[int, str]] = {
    # rule 1: bad input, integrity
    "no_revisions": (RULE_INTEGRITY, "neither --base/--head nor a GitHub event was given"),
    "bad_revision": (
        RULE_INTEGRITY,
        "a revision given on the command line is refused (starts with '-')",
    ),
    "bad_event": (
        RULE_INTEGRITY,
        "the GitHub event is missing, unreadable, malformed or lacks full SHAs",
    ),
    "untrusted_event": (
        RULE_INTEGRITY,
        "the workflow was triggered by an event cage does not trust",
    ),
    "not_a_repository": (RULE_INTEGRITY, "the repository path is not a git repository"),
    "unresolvable_revision": (
        RULE_INTEGRITY,
        "base or head does not resolve to a commit in the repository",
    ),
    "policy_missing": (RULE_INTEGRITY, "the base commit has no .runcap/mission.yaml"),
    "policy_invalid": (RULE_INTEGRITY, "the policy at the base commit does not validate"),
    "empty_change": (RULE_INTEGRITY, "base and head have identical trees: nothing to adjudicate"),
    "internal_error": (RULE_INTEGRITY, "cage itself failed; the gate fails closed"),
    "deleted_path": (RULE_INTEGRITY, "a path is deleted (or renamed) and allow_deletions is false"),
    "mode_changed": (RULE_INTEGRITY, "a path changed type or file mode (e.g. 100644 -> 100755)"),
    "new_executable": (RULE_INTEGRITY, "an added file is executable (mode 100755)"),
    "symlink": (RULE_INTEGRITY, "a symbolic link is added or changed"),
    "gitlink": (RULE_INTEGRITY, "a submodule (gitlink) is added, changed or removed"),
    "binary_content": (RULE_INTEGRITY, "a changed file has a NUL byte in its first 8,000 bytes"),
    "lfs_pointer": (
        RULE_INTEGRITY,
        "a changed file is a Git LFS pointer: its content is not in the change",
    ),
    "not_utf8": (RULE_INTEGRITY, "a changed text file is not valid UTF-8"),
    "unsupported_change": (RULE_INTEGRITY, "git reported a change status cage does not know"),
    "unreadable_content": (RULE_INTEGRITY, "a changed file's content could not be read from git"),
    # rule 2: the verifier or trusted configuration was touched
    "verifier_touched": (
        RULE_HUMAN,
        "a path of the verifier (protected set, `protect`, a file the commands name) changed",
    ),
    "package_metadata": (
        RULE_HUMAN,
        "a *.dist-info / *.egg-info path changed: it can register test plugins",
    ),
    "shadows_test_module": (
        RULE_HUMAN,
        "a changed Python file can shadow the test runner or a module the command runs",
    ),
    "new_top_level_module": (
        RULE_HUMAN,
        "an added Python file creates a new top-level module (root, src/, lib/...): it can "
        "shadow an installed package or test plugin",
    ),
    "environment_changed": (
        RULE_HUMAN,
        "the head command run changed files outside the worktree that the regression run "
        "would load (git objects or configuration, Python start-up files, site-packages)",
    ),
    "tamper_*": (
        RULE_HUMAN,
        "product code reaches into the verifier at run time (see tamper.py; one code per pattern)",
    ),
    "spend_unattested": (
        RULE_HUMAN,
        "spend_evidence is required and no valid spend statement was given",
    ),
    # rule 3: out of scope, not verified
    "out_of_scope": (RULE_BLOCKED, "a changed path is outside verification.allow"),
    "setup_failed": (RULE_BLOCKED, "verification.setup failed at base or head: nothing is proven"),
    "baseline_already_green": (
        RULE_BLOCKED,
        "the verify command already passes at base: the change proves nothing",
    ),
    "base_report_missing": (RULE_BLOCKED, "evidence: junit and the base run wrote no test report"),
    "verification_failed": (RULE_BLOCKED, "the verify command does not pass at head"),
    "head_report_missing": (
        RULE_BLOCKED,
        "the base run wrote a test report and the head run did not",
    ),
    "report_invalid": (RULE_BLOCKED, "the head run's test report is malformed or truncated"),
    "report_unconfirmed": (
        RULE_BLOCKED,
        "the head test report has no matching pytest summary line although the base run "
        "printed one: the report may be forged",
    ),
    "no_tests_run": (RULE_BLOCKED, "the head report shows no test that actually ran"),
    "test_skipped": (
        RULE_BLOCKED,
        "a test that failed at base (or any test after a collection error) is skipped at head",
    ),
    "test_not_run": (RULE_BLOCKED, "a test that failed at base is absent from the head report"),
    "regression_failed": (
        RULE_BLOCKED,
        "a test that passed at base fails, is skipped or vanished at head",
    ),
    "timeout": (RULE_BLOCKED, "a command ran past verification.timeout_seconds and was killed"),
    "spend_over_limit": (RULE_BLOCKED, "attested spend is over budget.mission_hard_limit_usd"),
    # informational
    "replay_skipped": (RULE_INFO, "the replay did not run because the verdict was already certain"),
    "verifier_restored": (
        RULE_INFO,
        "guard: off: a changed verifier path was restored from base for the replay",
    ),
    "processes_killed": (RULE_INFO, "a command left processes behind; cage killed them"),
    "spend_evidence_invalid": (
        RULE_INFO,
        "a spend statement was given but could not be verified; it is ignored",
    ),
}


def rule_of(code: str) -> int:
    """The verdict rule a reason code belongs to; unknown codes fail closed (rule 1)."""
    if code.startswith(TAMPER_PREFIX):
        return RULE_HUMAN
    entry = REASON_CODES.get(code)
    return entry[0] if entry else RULE_INTEGRITY


@dataclass(frozen=True)
class Reason:
    """One reason for the verdict: a stable code, a sentence for people, the path at fault."""

    code: str
    message: str
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{code, message, path?}``."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.path is not None:
            out["path"] = self.path
        return out


@dataclass(frozen=True)
class Finding:
    """What classification found about one changed path."""

    path: str
    kind: str  # structural | scope | verifier | tamper | restored (guard: off, informational)
    code: str
    message: str
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, without the path (findings are listed under their change)."""
        out: dict[str, Any] = {"kind": self.kind, "code": self.code, "message": self.message}
        if self.line is not None:
            out["line"] = self.line
        return out

    def reason(self) -> Reason:
        """The finding as a verdict reason (message prefixed with ``path[:line]: ``, once)."""
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        if self.message.startswith(f"{where}: "):
            return Reason(self.code, self.message, self.path)
        return Reason(self.code, f"{where}: {self.message}", self.path)


# ---------------------------------------------------------------------------------------
# Classification (pure)

MODE_ABSENT = "000000"
MODE_FILE = "100644"
MODE_EXECUTABLE = "100755"
MODE_SYMLINK = "120000"
MODE_GITLINK = "160000"
REGULAR_MODES = frozenset({MODE_FILE, MODE_EXECUTABLE, "100664"})

BINARY_SNIFF_BYTES = 8000  # git's own heuristic: a NUL byte in the first 8,000 bytes
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"

# Python modules a test run imports before or around the tests: a changed file named like one
# of them, wherever it sits, can be put on sys.path ahead of the real one (src layout,
# PYTHONPATH, rootdir insertion) and replace the test runner. Names of modules a command runs
# with `python -m NAME` or as its first word are added per policy.
SHADOWED_MODULES = frozenset(
    {
        "pytest",
        "_pytest",
        "pluggy",
        "py",
        "unittest",
        "doctest",
        "site",
        "coverage",
        "xdist",
        "nose",
        "nose2",
        "hypothesis",
        "sitecustomize",
        "usercustomize",
    }
)

# Package metadata directories: importlib.metadata finds them on sys.path, and an
# entry_points.txt there registers pytest plugins (``[pytest11]``) that run inside the tests.
PACKAGE_METADATA_SUFFIXES = (".dist-info", ".egg-info", ".egg-link")


def content_findings(path: str, data: bytes) -> list[Finding]:
    """Structural findings about the bytes of a changed regular file."""
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        return [
            Finding(
                path,
                "structural",
                "binary_content",
                "binary content (NUL byte) cannot be reviewed or verified as text",
            )
        ]
    if data.startswith(LFS_POINTER_PREFIX):
        return [
            Finding(
                path,
                "structural",
                "lfs_pointer",
                "Git LFS pointer: the real content is not part of the change",
            )
        ]
    try:
        data.decode("utf-8", "strict")
    except UnicodeDecodeError as exc:
        return [Finding(path, "structural", "not_utf8", f"not valid UTF-8 (byte {exc.start})")]
    codec = python_source_encoding(path, data)
    if codec is not None:
        return [
            Finding(
                path,
                "structural",
                "not_utf8",
                f"declares the source encoding {codec!r}: Python reads it differently from the "
                "bytes a reviewer (and the diff) sees",
            )
        ]
    return []


# PEP 263: a comment in line 1 or 2 matching this regex sets the codec Python decodes with.
_CODING_RE = re.compile(rb"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")
_UTF8_NAMES = frozenset({"utf-8", "utf8", "u8", "utf", "cp65001"})
PYTHON_SUFFIXES = (".py", ".pyw", ".pyi")


def python_source_encoding(path: str, data: bytes) -> str | None:
    """The codec a Python file declares when it is not UTF-8 (``# coding: utf-7``), else None.

    A cookie such as ``unicode_escape`` or ``utf-7`` makes Python run code that the byte-level
    diff and the reviewer see as one harmless line.
    """
    script = data.startswith(b"#!") and b"python" in data[:128]
    if not (path.endswith(PYTHON_SUFFIXES) or script):
        return None
    for line in data.split(b"\n", 2)[:2]:
        match = _CODING_RE.match(line)
        if match:
            name = match.group(1).decode("ascii", "replace").lower().replace("_", "-")
            # utf-8-sig and the like decode the same text
            return None if name in _UTF8_NAMES or name.startswith("utf-8-") else name
        if line.strip() and not line.lstrip().startswith(b"#"):
            return None  # the cookie only counts before the first statement
    return None


def mode_findings(change: Any, allow_deletions: bool) -> list[Finding]:
    """Structural findings from a change's status and modes (no content needed)."""
    path, status = change.path, change.status
    old, new = change.old_mode, change.new_mode
    out: list[Finding] = []
    if status not in ("A", "M", "D", "T"):
        out.append(
            Finding(
                path,
                "structural",
                "unsupported_change",
                f"git change status {status!r} is not one cage adjudicates",
            )
        )
        return out
    if MODE_GITLINK in (old, new):
        out.append(
            Finding(
                path,
                "structural",
                "gitlink",
                "submodule (gitlink): its content is outside this repository",
            )
        )
    if status == "D":
        if not allow_deletions:
            out.append(
                Finding(
                    path,
                    "structural",
                    "deleted_path",
                    "deleted (a rename is deletion + addition); allow_deletions is false",
                )
            )
        return out
    if status == "T" or (status == "M" and old != new):
        out.append(Finding(path, "structural", "mode_changed", f"mode changed {old} -> {new}"))
    if status == "A" and new == MODE_EXECUTABLE:
        out.append(
            Finding(path, "structural", "new_executable", "added as an executable file (100755)")
        )
    if new == MODE_SYMLINK or (old == MODE_SYMLINK and status != "A"):
        out.append(
            Finding(
                path, "structural", "symlink", "symbolic link: it can point the verifier anywhere"
            )
        )
    return out


def command_module_names(commands: Iterable[str | None]) -> set[str]:
    """Top-level module names the commands run: ``python -m NAME`` and a bare first word."""
    names: set[str] = set()
    for command in commands:
        if not command:
            continue
        try:
            words = shlex.split(command)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if word == "-m" and i + 1 < len(words):
                names.add(words[i + 1].split(".")[0])
            elif word.startswith("-m") and len(word) > 2 and word[2:3].isidentifier():
                names.add(word[2:].split(".")[0])
        # `pytest -q`, `tox -e py`: the first word after NAME=value assignments
        first = next((w for w in words if "=" not in w), None)
        if first:
            stem = PurePosixPath(first).name
            if stem.isidentifier():
                names.add(stem)
    return names


def _shadowed_module(path: str, names: Iterable[str]) -> str | None:
    """The module name a Python path can shadow (``pytest.py``, ``pytest/__init__.py``...)."""
    if not path.endswith(".py"):
        return None
    parts = PurePosixPath(path).parts
    stem = parts[-1][: -len(".py")]
    for name in names:
        if stem == name or name in parts[:-1]:
            return name
    return None


# Directories that are commonly put on sys.path (src layout, PYTHONPATH=src/lib), besides the
# repository root. A module added directly in one of them is importable under its bare name.
SOURCE_ROOTS = ("", "src", "lib", "python", "source")


def _stdlib_names() -> frozenset[str]:
    names = getattr(sys, "stdlib_module_names", None)  # Python >= 3.10
    return frozenset(names) if names else frozenset(sys.builtin_module_names)


def _shadowed_stdlib(path: str) -> str | None:
    """The standard-library module an added top-level module would shadow, if any.

    Entries of PYTHONPATH (and the script directory) come before the standard library on
    sys.path, so an added ``src/argparse.py`` runs inside pytest when pytest imports argparse.
    """
    if not path.endswith(".py"):
        return None
    parts = PurePosixPath(path).parts
    rest = parts[1:] if len(parts) > 1 and parts[0] in SOURCE_ROOTS else parts
    if len(rest) == 1:
        name = rest[0][: -len(".py")]
    elif len(rest) == 2 and rest[1] == "__init__.py":
        name = rest[0]
    else:
        return None
    return name if name in _stdlib_names() else None


def top_level_module(path: str) -> str | None:
    """``root/name`` of the top-level module a Python path belongs to (``src/calc``), or None.

    The root is the repository root or one of SOURCE_ROOTS; ``name`` is the module or package
    that ``import name`` would find there.
    """
    if not path.endswith(".py"):
        return None
    parts = PurePosixPath(path).parts
    if len(parts) > 1 and parts[0] in SOURCE_ROOTS:
        root, rest = parts[0], parts[1:]
    else:
        root, rest = "", parts
    name = rest[0][: -len(".py")] if len(rest) == 1 else rest[0]
    return f"{root}/{name}" if root else name


def _verifier_reason(
    path: str, protect: Sequence[str], command_files: set[str]
) -> tuple[str, str] | None:
    """(code, message) when the path belongs to the verifier, else None."""
    from cage import pathrules

    why = pathrules.protected_reason(path, protect)
    if why is None and path.lower() != path:
        # Case-insensitive file systems (macOS, Windows runners) check out `Tests/` as `tests/`.
        why = pathrules.protected_reason(path.lower(), protect)
    if why is not None:
        return "verifier_touched", f"part of the verifier ({why})"
    if path in command_files:
        return "verifier_touched", "a file named by the verification command, regression or setup"
    for part in PurePosixPath(path).parts:
        # importlib.metadata matches these names case-insensitively (`X-1.0.DIST-INFO`).
        if part.lower().endswith(PACKAGE_METADATA_SUFFIXES):
            return (
                "package_metadata",
                f"package metadata ({part}) can register test plugins that run with the tests",
            )
    return None


def classify(
    changes: Sequence[Any],
    blobs: Mapping[str, bytes],
    policy: Any,
    command_files: set[str],
    new_modules: Collection[str] = (),
) -> list[Finding]:
    """Findings for every changed path: structural, scope, verifier (or restored), tamper.

    ``blobs`` maps blob SHAs to bytes (new side of added/modified regular files, old side of
    modified ones). ``command_files`` are the repository paths the commands name.
    ``new_modules`` are the top-level modules (``top_level_module``) the change creates, that
    did not exist at base. Pure: no git, no processes, no working tree.
    """
    from cage import pathrules, tamper

    v = policy.verification
    strict = v.guard != "off"
    modules = SHADOWED_MODULES | command_module_names((v.command, v.regression, v.setup))
    findings: list[Finding] = []
    for change in changes:
        path = change.path
        here = mode_findings(change, v.allow_deletions)
        regular_new = change.status != "D" and change.new_mode in REGULAR_MODES
        data = blobs.get(change.new_sha) if regular_new else None
        if regular_new:
            if data is None:
                here.append(
                    Finding(path, "structural", "unreadable_content", "content could not be read")
                )
            else:
                here.extend(content_findings(path, data))
        receipt = pathrules.is_receipt_path(path)
        if not receipt:
            if not pathrules.in_scope(path, v.allow):
                here.append(Finding(path, "scope", "out_of_scope", "outside verification.allow"))
            verifier = _verifier_reason(path, v.protect, command_files)
            shadow = _shadowed_module(path, modules) if change.status != "D" else None
            if shadow is None and change.status == "A":
                shadow = _shadowed_stdlib(path)
            if verifier is None and shadow is not None:
                verifier = (
                    "shadows_test_module",
                    f"named like the module `{shadow}` the test run imports",
                )
            module = top_level_module(path) if change.status == "A" else None
            if verifier is None and module is not None and module in new_modules:
                verifier = (
                    "new_top_level_module",
                    f"adds the top-level module `{module.rsplit('/', 1)[-1]}`: placed ahead of "
                    "site-packages on sys.path, it can replace an installed package or test "
                    "plugin inside the test run",
                )
            if verifier is not None:
                code, message = verifier
                if strict:
                    here.append(Finding(path, "verifier", code, message))
                else:
                    here.append(
                        Finding(
                            path,
                            "restored",
                            "verifier_restored",
                            f"{message}; guard: off restores it from base for the replay",
                        )
                    )
            elif data is not None and not any(f.kind == "structural" for f in here):
                old = blobs.get(change.old_sha) if change.status == "M" else None
                for hit in tamper.scan_change(path, old, data):
                    here.append(
                        Finding(
                            hit.path or path,
                            "tamper",
                            TAMPER_PREFIX + hit.code,
                            hit.message,
                            hit.line,
                        )
                    )
        findings.extend(here)
    return findings


def restore_paths(findings: Iterable[Finding]) -> list[str]:
    """Paths guard: off restores from base before the head replay (sorted, unique)."""
    return sorted({f.path for f in findings if f.kind == "restored"})


# ---------------------------------------------------------------------------------------
# Judging the replay (pure)

BAD_STATES = ("failed", "error")


def _is_collection_error(test_id: str) -> bool:
    """pytest reports a module that cannot be collected as an error with an empty classname."""
    return test_id.startswith("::") or test_id.endswith("::")


def _failed_ids(report: Any) -> list[str]:
    return sorted(t for t, s in report.cases.items() if s in BAD_STATES)


def _ran_count(report: Any) -> int:
    return sum(1 for s in report.cases.values() if s in ("passed", "failed", "error"))


def _timeout_reason(result: Any, side: str) -> Reason | None:
    if result is not None and result.timed_out:
        return Reason(
            "timeout",
            f"{result.name} at {side} timed out after {result.duration_s:.0f}s and was killed: "
            f"`{result.command}`",
        )
    return None


def judge_setup(side: Any) -> list[Reason]:
    """Reasons from the setup command of one side (timeout or failure)."""
    setup = side.setup
    if setup is None:
        return []
    timeout = _timeout_reason(setup, side.label)
    if timeout:
        return [timeout]
    if setup.exit_code != 0:
        return [
            Reason(
                "setup_failed",
                f"setup at {side.label} exited {setup.exit_code}: `{setup.command}`; "
                "nothing can be proven",
            )
        ]
    return []


def judge_command(base: Any, head: Any | None, evidence: str) -> tuple[list[Reason], bool]:
    """Judge the verify command: must fail at base and pass at head.

    Returns (reasons, strong): ``strong`` is True when the pass rests on test reports rather
    than on exit statuses alone.
    """
    timeout = _timeout_reason(base, "base")
    if timeout:
        return [timeout], False
    use_reports = evidence != "exit-code"
    base_report = base.report if use_reports else None
    if evidence == "junit" and base_report is None:
        detail = f" ({base.report_error})" if base.report_error else ""
        return [
            Reason(
                "base_report_missing",
                f"evidence: junit, but the base run wrote no test report{detail}",
            )
        ], False
    base_green = base.exit_code == 0 and not (base_report is not None and _failed_ids(base_report))
    if base_green:
        return [
            Reason(
                "baseline_already_green",
                f"`{base.command}` already passes at base: the change proves nothing",
            )
        ], False
    if head is None:
        return [Reason("verification_failed", "the verify command did not run at head")], False
    timeout = _timeout_reason(head, "head")
    if timeout:
        return [timeout], False
    reasons: list[Reason] = []
    if head.exit_code != 0:
        reasons.append(
            Reason("verification_failed", f"`{head.command}` exited {head.exit_code} at head")
        )
    if use_reports and head.report_error:
        reasons.append(
            Reason("report_invalid", f"the head test report cannot be read: {head.report_error}")
        )
    if base_report is None:
        # Exit status only: weak evidence, but a head report that shows failures still counts.
        if use_reports and head.report is not None and _failed_ids(head.report):
            reasons.append(
                Reason(
                    "verification_failed",
                    f"the head report has failing tests: {', '.join(_failed_ids(head.report)[:5])}",
                )
            )
        return reasons, False
    head_report = head.report
    if head_report is None:
        if not head.report_error:
            reasons.append(
                Reason(
                    "head_report_missing",
                    "the base run wrote a test report and the head run did not: "
                    "the tests may never have run",
                )
            )
        return reasons, True
    if _ran_count(head_report) == 0:
        reasons.append(Reason("no_tests_run", "the head report shows no test that ran"))
    for test_id in _failed_ids(head_report):
        reasons.append(
            Reason("verification_failed", f"test {test_id} {head_report.cases[test_id]} at head")
        )
    base_failed = _failed_ids(base_report)
    collection_error = any(_is_collection_error(t) for t in base_failed) or not base_failed
    for test_id in base_failed:
        if _is_collection_error(test_id):
            continue
        state = head_report.cases.get(test_id)
        if state is None:
            reasons.append(
                Reason("test_not_run", f"test {test_id} failed at base and is absent at head")
            )
        elif state == "skipped":
            reasons.append(
                Reason("test_skipped", f"test {test_id} failed at base and is skipped at head")
            )
    # Tests of the verify command that passed at base must still run and pass: otherwise
    # product data (an emptied parametrize list, a skip condition) could quietly drop them.
    for test_id, state in sorted(base_report.cases.items()):
        if state != "passed":
            continue
        now = head_report.cases.get(test_id)
        if now is None:
            reasons.append(
                Reason("test_not_run", f"test {test_id} passed at base and is absent at head")
            )
        elif now == "skipped":
            reasons.append(
                Reason("test_skipped", f"test {test_id} passed at base and is skipped at head")
            )
    if collection_error:
        for test_id, state in sorted(head_report.cases.items()):
            if state == "skipped":
                reasons.append(
                    Reason(
                        "test_skipped",
                        f"test {test_id} is skipped at head after a collection error at base: "
                        "every test must pass",
                    )
                )
    return reasons, True


def judge_regression(base: Any | None, head: Any | None, evidence: str) -> list[Reason]:
    """PASS_TO_PASS: every test that passed at base passes at head, not skipped, not vanished."""
    if base is None and head is None:
        return []
    for result, side in ((base, "base"), (head, "head")):
        timeout = _timeout_reason(result, side)
        if timeout:
            return [timeout]
    if head is None:
        return [Reason("regression_failed", "the regression command did not run at head")]
    use_reports = evidence != "exit-code"
    base_report = base.report if (use_reports and base is not None) else None
    reasons: list[Reason] = []
    must_exit_zero = base_report is None or (base is not None and base.exit_code == 0)
    if must_exit_zero and head.exit_code != 0:
        reasons.append(
            Reason("regression_failed", f"`{head.command}` exited {head.exit_code} at head")
        )
    if base_report is None:
        return reasons
    head_report = head.report
    if head_report is None:
        reasons.append(
            Reason(
                "regression_failed",
                "the base regression run wrote a test report and the head run did not"
                + (f": {head.report_error}" if head.report_error else ""),
            )
        )
        return reasons
    for test_id, state in sorted(base_report.cases.items()):
        if state != "passed":
            continue
        now = head_report.cases.get(test_id)
        if now is None:
            reasons.append(
                Reason("regression_failed", f"test {test_id} passed at base and vanished at head")
            )
        elif now != "passed":
            reasons.append(
                Reason("regression_failed", f"test {test_id} passed at base and is {now} at head")
            )
    return reasons


# pytest's closing line: "1 failed, 2 passed, 1 warning in 0.05s" (with -q) or the same
# between "=" rulers; long runs add "(0:01:05)".
_SUMMARY_RE = re.compile(
    r"^=*\s*(?P<body>(?:\d+ [a-z]+(?:, )?)+|no tests ran) in [\d.]+s(?: \([\d:]+\))?\s*=*\s*$"
)
SUMMARY_TAIL_BYTES = 16 * 1024


def parse_pytest_summary(text: str) -> dict[str, int] | None:
    """Counts from the last pytest summary line in ``text`` ({"passed": 2, ...}), or None."""
    for line in reversed(text.splitlines()):
        match = _SUMMARY_RE.match(line.strip())
        if match:
            counts: dict[str, int] = {}
            body = match.group("body")
            if body != "no tests ran":
                for item in body.split(", "):
                    number, word = item.split(" ", 1)
                    word = {"errors": "error", "warnings": "warning"}.get(word, word)
                    counts[word] = counts.get(word, 0) + int(number)
            return counts
    return None


def pytest_summary_of(result: Any) -> dict[str, int] | None:
    """The pytest summary at the end of a run's stdout log (read while the log exists)."""
    path = getattr(result, "stdout_path", None)
    if path is None:
        return None
    data = read_log_tail(path, SUMMARY_TAIL_BYTES)
    return None if data is None else parse_pytest_summary(data.decode("utf-8", "replace"))


def read_log_tail(path: str | os.PathLike[str], limit: int) -> bytes | None:
    """The last ``limit`` bytes of a command's log, or None when it is not a regular file.

    The command ran code from the change, and that code can replace its own log (it knows
    the folder from PYTEST_ADDOPTS): a FIFO would block a plain open() forever, a symlink
    would show another file. So: no symlinks, no blocking, regular files only.
    """
    import stat

    try:
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
        )
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        os.lseek(fd, max(0, info.st_size - limit), os.SEEK_SET)
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def judge_summary(
    base: Any,
    head: Any,
    base_summary: dict[str, int] | None,
    head_summary: dict[str, int] | None,
) -> list[Reason]:
    """Cross-check the head report against pytest's own closing line.

    pytest writes its JUnit report and then its summary line at the end of the session.
    Product code that forges the report and ends the process early leaves no summary (or
    one that disagrees with the report). Only applied when the base run printed a summary:
    the command is then known to let pytest's terminal output through.
    """
    if base_summary is None or head is None or head.report is None:
        return []
    name = head.name
    if head_summary is None:
        return [
            Reason(
                "report_unconfirmed",
                f"the {name} run at head has a test report but no pytest summary line, "
                "although the base run printed one: the report may not come from pytest",
            )
        ]
    counts = head.report.counts
    passed = head_summary.get("passed", 0) + head_summary.get("xpassed", 0)
    bad = head_summary.get("failed", 0) + head_summary.get("error", 0)
    if passed != counts.get("passed", 0) or (bad == 0) != (
        counts.get("failed", 0) + counts.get("error", 0) == 0
    ):
        return [
            Reason(
                "report_unconfirmed",
                f"the {name} report at head ({counts.get('passed', 0)} passed) disagrees "
                f"with pytest's summary line ({passed} passed, {bad} failed or errors)",
            )
        ]
    return []


def judge_replay(
    base: Any,
    head: Any | None,
    verification: Any,
    summary_of: Callable[[Any], dict[str, int] | None] | None = None,
) -> tuple[list[Reason], str]:
    """Reasons and verification status from the base and head ``SideResult`` of a replay.

    ``summary_of`` reads pytest's summary line of a run (``pytest_summary_of``); without it
    the report is not cross-checked against pytest's own output.
    """
    evidence = verification.evidence
    reasons = judge_setup(base)
    if reasons:
        return reasons, UNVERIFIED
    if base.command is None:
        return [Reason("verification_failed", "the verify command did not run at base")], UNVERIFIED
    if head is not None:
        reasons = judge_setup(head)
        if reasons:
            return reasons, UNVERIFIED
    reasons, strong = judge_command(base.command, head.command if head else None, evidence)
    if not reasons and summary_of is not None and evidence != "exit-code" and head is not None:
        reasons = judge_summary(
            base.command, head.command, summary_of(base.command), summary_of(head.command)
        )
    if not reasons and verification.regression:
        reasons = judge_regression(base.regression, head.regression if head else None, evidence)
        checkable = head is not None and base.regression is not None
        if not reasons and summary_of is not None and evidence != "exit-code" and checkable:
            reasons = judge_summary(
                base.regression,
                head.regression,
                summary_of(base.regression),
                summary_of(head.regression) if head.regression else None,
            )
    for side in (base, head):
        if side is None:
            continue
        for result in (side.setup, side.command, side.regression):
            killed = getattr(result, "leftover_processes_killed", 0) if result else 0
            if killed:
                reasons.append(
                    Reason(
                        "processes_killed",
                        f"{result.name} at {side.label} left {killed} process(es) running; "
                        "cage killed them",
                    )
                )
    if any(rule_of(r.code) < RULE_INFO for r in reasons):
        return reasons, UNVERIFIED
    strong = strong and verification.guard != "off" and evidence != "exit-code"
    return reasons, VERIFIED_STRONG if strong else VERIFIED_WEAK


# ---------------------------------------------------------------------------------------
# The verdict (pure)


def decide(reasons: Iterable[Reason]) -> tuple[str, list[Reason]]:
    """The verdict and the reasons ordered by the rule that decided (DESIGN.md "Verdict")."""
    ordered = sorted(reasons, key=lambda r: rule_of(r.code))  # stable: keeps discovery order
    deciding = min((rule_of(r.code) for r in ordered), default=RULE_INFO)
    return _RULE_VERDICT.get(deciding, PASS), ordered


def verification_status(findings: Iterable[Finding], replay_status: str | None) -> str:
    """VERIFIER_COMPROMISED when the verifier was touched, else the replay's status."""
    if any(f.kind in ("verifier", "tamper") for f in findings):
        return VERIFIER_COMPROMISED
    return replay_status or UNVERIFIED


@dataclass
class Verdict:
    """The gate's answer with everything needed to explain it (schema ``cage.verdict/v1``)."""

    verdict: str
    reasons: list[Reason]
    status: str = UNVERIFIED
    base: str | None = None
    head: str | None = None
    policy: dict[str, Any] | None = None
    changes: list[Any] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    spend: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # internal error text, for stderr (never decides alone)

    @property
    def exit_code(self) -> int:
        """PASS 0, BLOCKED 1, HUMAN_APPROVAL_REQUIRED 3."""
        return EXIT_CODES.get(self.verdict, 1)

    def to_dict(self) -> dict[str, Any]:
        """The ``cage.verdict/v1`` JSON document."""
        by_path: dict[str, list[dict[str, Any]]] = {}
        for f in self.findings:
            by_path.setdefault(f.path, []).append(f.to_dict())
        changes = [
            {
                "path": c.path,
                "status": c.status,
                "old_mode": c.old_mode,
                "new_mode": c.new_mode,
                "findings": by_path.get(c.path, []),
            }
            for c in self.changes
        ]
        verification = {"status": self.status, "base": None, "head": None, "regression": None}
        verification.update(self.verification)
        verification["status"] = self.status
        return {
            "schema": SCHEMA,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "reasons": [r.to_dict() for r in self.reasons],
            "policy": self.policy,
            "base": self.base,
            "head": self.head,
            "changes": changes,
            "verification": verification,
            "spend": self.spend or spend_not_evaluated(None, None),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def blocked(code: str, message: str, **fields: Any) -> Verdict:
    """A BLOCKED verdict for bad input or an integrity failure before any classification."""
    verdict = Verdict(BLOCKED, [Reason(code, message)], **fields)
    verdict.verdict, verdict.reasons = decide(verdict.reasons)
    return verdict


def spend_not_evaluated(policy: Any, evidence_path: str | None) -> dict[str, Any]:
    """The ``spend`` section when the verdict is decided before spend is looked at."""
    return {
        "status": "not_evaluated",
        "policy": getattr(policy, "spend_evidence", None),
        "evidence_path": evidence_path,
        "total_usd": None,
        "cost_usd": None,
        "limit_usd": getattr(getattr(policy, "budget", None), "mission_hard_limit_usd", None),
        "statements": [],
    }


# ---------------------------------------------------------------------------------------
# The pipeline (I/O at the edges: gitio, replay)


def _command_dict(result: Any) -> dict[str, Any] | None:
    if result is None:
        return None
    report = result.report
    return {
        "command": result.command,
        "exit_code": result.exit_code,
        "timed_out": result.timed_out,
        "duration_s": round(result.duration_s, 3),
        "tests": dict(report.counts, total=report.total) if report is not None else None,
        "report_error": result.report_error,
        "leftover_processes_killed": result.leftover_processes_killed,
        "output_tail": _output_tail(result) if not result.succeeded else None,
    }


TAIL_LINES = 30
TAIL_BYTES = 4000


def _output_tail(result: Any) -> str | None:
    """The last lines of a failed run's stdout and stderr (untrusted text: callers escape)."""
    parts = []
    for path in (result.stdout_path, result.stderr_path):
        data = read_log_tail(path, TAIL_BYTES)
        if data is None:
            continue
        lines = data.decode("utf-8", "replace").splitlines()[-TAIL_LINES:]
        if lines:
            parts.append("\n".join(lines))
    return "\n".join(parts) if parts else None


def _side_dict(side: Any) -> dict[str, Any] | None:
    if side is None:
        return None
    return {"setup": _command_dict(side.setup), "command": _command_dict(side.command)}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a cancelled job) and SIGHUP (a closed terminal) raise KeyboardInterrupt, as
    Ctrl-C does, while the pipeline runs: git writes the base worktree in its own process
    group from the start, so only cage's own cleanup can stop it and remove the worktree.
    Handlers set by someone else stay; outside the main thread nothing changes."""
    replaced: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                replaced[sig] = signal.signal(sig, _interrupt)
    except ValueError:  # not the main thread: signal handlers cannot be set here
        pass
    try:
        yield
    finally:
        for sig, previous in replaced.items():
            signal.signal(sig, previous)


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


# Longer than any git ref name can be (PATH_MAX): refused before git sees it.
MAX_REVISION_CHARS = 4096


def adjudicate(
    repo_path: str | os.PathLike[str],
    base_rev: str,
    head_rev: str,
    *,
    spend_evidence_path: str | None = None,
    progress: Callable[[str], None] | None = None,
    policy: Any = None,
    attest_key: bytes | None = None,
    spend_statements: Sequence[Any] = (),
    spend_elsewhere: bool = False,
) -> Verdict:
    """The whole gate: resolve, read the base policy, classify, replay if it can matter, decide.

    ``policy`` (a ``cage.policy.Policy``, for ``cage mission run --policy FILE``) replaces the
    base commit's policy and is reported with ``source: "file"``; CI never passes one.

    Spend statements (receipts the change adds, the ``spend_evidence_path`` file, and
    ``spend_statements`` given in memory) are verified with ``attest_key`` (see
    ``cage.attest``); without a key none verifies. ``spend_elsewhere`` leaves spend to a
    separate ``cage ci --mode spend`` job (the only one that needs the key).

    Never raises for bad input or an internal failure: those become a ``BLOCKED`` verdict
    (``internal_error`` keeps the error text in ``Verdict.error``). KeyboardInterrupt
    propagates after the worktree is removed.
    """
    started = time.monotonic()
    try:
        # The base worktree is started early (see _adjudicate); whatever happens, it is
        # removed and unregistered when this block ends.
        with _terminate_as_interrupt(), contextlib.ExitStack() as cleanup:
            verdict = _adjudicate(
                repo_path,
                base_rev,
                head_rev,
                spend_evidence_path,
                progress,
                attest_key,
                spend_statements,
                given_policy=policy,
                spend_elsewhere=spend_elsewhere,
                cleanup=cleanup,
            )
    except Exception as exc:  # fail closed: an unexpected error must never look like a PASS
        verdict = blocked(
            "internal_error", f"cage failed while adjudicating: {type(exc).__name__}: {exc}"
        )
        verdict.error = f"{type(exc).__name__}: {exc}"
    verdict.timings["total_s"] = time.monotonic() - started
    return verdict


def _adjudicate(
    repo_path: str | os.PathLike[str],
    base_rev: str,
    head_rev: str,
    spend_evidence_path: str | None,
    progress: Callable[[str], None] | None,
    attest_key: bytes | None = None,
    spend_statements: Sequence[Any] = (),
    given_policy: Any = None,
    spend_elsewhere: bool = False,
    cleanup: contextlib.ExitStack | None = None,
) -> Verdict:
    from cage import gitio
    from cage.errors import GitError

    timings: dict[str, float] = {}
    clock = time.monotonic()
    for label, rev in (("base", base_rev), ("head", head_rev)):
        if len(rev or "") > MAX_REVISION_CHARS:
            # No ref or SHA is this long; echoing it would flood the verdict and the log.
            return blocked(
                "bad_revision",
                f"the {label} revision {rev[:40]!r}... is refused: {len(rev)} characters, "
                f"more than {MAX_REVISION_CHARS}; give a commit SHA or a ref",
            )
        if not rev or rev.startswith("-"):
            return blocked(
                "bad_revision",
                f"the {label} revision {rev!r} is refused: "
                "a revision must not be empty or start with '-'",
            )
    try:
        repo = gitio.Repo(repo_path)
    except GitError as exc:
        return blocked("not_a_repository", f"{repo_path}: not a git repository ({exc})")
    shas: dict[str, str] = {}
    for label, rev in (("base", base_rev), ("head", head_rev)):
        try:
            shas[label] = repo.resolve_commit(rev)
        except GitError as exc:
            return blocked(
                "unresolvable_revision",
                f"the {label} revision {rev!r} does not resolve to a commit in {repo.root} "
                f"({exc}); "
                "fetch it (actions/checkout with fetch-depth: 0)",
            )
    base, head = shas["base"], shas["head"]
    timings["resolve_s"] = time.monotonic() - clock

    clock = time.monotonic()
    pending = None
    if cleanup is not None:
        # Writing the base worktree is the largest single cost of a replay: git starts on it
        # first, while cage loads the rest of itself and reads and judges the policy, the
        # change and its blobs. No code of the repository runs (same safe settings as any
        # checkout); when the verdict turns out certain without a replay (a missing policy
        # too), git is stopped and the worktree removed.
        try:
            pending = repo.start_worktree_in(cleanup, base)
        except GitError:
            pending = None  # the replay, if it runs, tries again and reports the error
    from cage import attest, pathrules
    from cage import policy as policy_mod
    from cage.errors import PolicyError

    policy_path = policy_mod.POLICY_PATH
    # A policy given by the caller (`cage mission run --policy FILE`) replaces the base's.
    entry = repo.entry_at(base, policy_path) if given_policy is None else None
    found = entry is not None and entry.type == "blob" and entry.mode in gitio.REGULAR_MODES
    data = b"" if given_policy is not None else None
    if found:
        data = repo.read_blobs([entry.sha])[entry.sha]
    if data is None:
        what = "does not exist" if entry is None else f"is not a regular file (mode {entry.mode})"
        return blocked(
            "policy_missing",
            f"{policy_path} {what} at the base commit {base[:12]}; "
            "commit a policy to the base branch first (`cage policy init`)",
            base=base,
            head=head,
            timings=timings,
        )
    policy_info = {"path": policy_path, "hash": policy_mod.hash_policy(data), "source": "base"}
    try:
        policy = given_policy or policy_mod.load_policy(data, f"{policy_path}@{base[:12]}")
    except PolicyError as exc:
        verdict = Verdict(
            BLOCKED,
            [Reason("policy_invalid", line, policy_path) for line in exc.problems],
            base=base,
            head=head,
            policy=policy_info,
            timings=timings,
        )
        verdict.verdict, verdict.reasons = decide(verdict.reasons)
        return verdict
    policy_info["hash"] = policy.hash
    if given_policy is not None:
        policy_info.update(path=given_policy.source, source="file")
    timings["policy_s"] = time.monotonic() - clock
    spend = spend_not_evaluated(policy, spend_evidence_path)

    clock = time.monotonic()
    changes = repo.diff(base, head)
    timings["diff_s"] = time.monotonic() - clock
    if not changes:
        verdict = blocked(
            "empty_change",
            f"base {base[:12]} and head {head[:12]} have the same content: "
            "there is nothing to adjudicate",
            base=base,
            head=head,
            policy=policy_info,
            spend=spend,
            timings=timings,
        )
        return verdict

    clock = time.monotonic()
    v = policy.verification
    wanted: set[str] = set()
    for c in changes:
        if c.status != "D" and c.new_mode in REGULAR_MODES:
            wanted.add(c.new_sha)
            if c.status == "M" and c.old_mode in REGULAR_MODES:
                wanted.add(c.old_sha)
    blobs = repo.read_blobs(sorted(wanted)) if wanted else {}
    candidates: set[str] = set()
    for command in (v.command, v.regression, v.setup):
        if command:
            candidates |= pathrules.command_file_candidates(command)
    command_files = repo.existing_files(base, candidates) if candidates else set()
    # A file the command names that is absent at base and added by the change is the
    # verifier too: otherwise "run ./check.sh" fails at base and the change supplies it.
    command_files |= {c.path for c in changes if c.path in candidates}
    findings = classify(changes, blobs, policy, command_files, _new_modules(repo, base, changes))
    timings["classify_s"] = time.monotonic() - clock

    reasons = [f.reason() for f in findings]
    clock = time.monotonic()
    assessment = attest.assess_change(
        repo,
        base=base,
        head=head,
        changes=changes,
        mode=attest.ELSEWHERE if spend_elsewhere else policy.spend_evidence,
        limit_usd=policy.budget.mission_hard_limit_usd,
        key=attest_key,
        evidence_path=spend_evidence_path,
        statements=spend_statements,
    )
    spend = assessment.spend
    reasons.extend(Reason(code, message, path) for code, message, path in assessment.reasons)
    timings["spend_s"] = time.monotonic() - clock
    verification: dict[str, Any] = {
        "evidence": v.evidence,
        "guard": v.guard,
        "replayed": False,
        "skipped_reason": None,
        "restored_paths": restore_paths(findings),
    }
    replay_status: str | None = None
    # The replay can only add rule-3 reasons or confirm a PASS: after a structural, scope,
    # verifier or tamper finding it cannot change the verdict, so it is skipped. Unattested
    # spend does not skip it: the person asked to approve needs to know whether the change
    # verifies.
    certain = sorted({f.kind + " findings" for f in findings if f.kind != "restored"})
    if certain:
        why = f"the verdict is already certain ({', '.join(certain)})"
        verification["skipped_reason"] = why
        reasons.append(Reason("replay_skipped", f"the verify command was not replayed: {why}"))
    else:
        replay_reasons, replay_status = _replay(
            repo, base, head, policy, verification, timings, progress, pending
        )
        reasons.extend(replay_reasons)

    verdict_name, ordered = decide(reasons)
    return Verdict(
        verdict_name,
        ordered,
        status=verification_status(findings, replay_status),
        base=base,
        head=head,
        policy=policy_info,
        changes=changes,
        findings=findings,
        verification=verification,
        spend=spend,
        timings=timings,
    )


MAX_MODULE_LOOKUPS = 64


def _new_modules(repo: Any, base: str, changes: Sequence[Any]) -> set[str]:
    """Top-level modules the change adds that do not exist at base (one lookup per name)."""
    wanted = sorted(
        {m for c in changes if c.status == "A" for m in [top_level_module(c.path)] if m}
    )
    if len(wanted) > MAX_MODULE_LOOKUPS:
        return set(wanted)  # too many to look up one by one: all count as new (fail closed)
    new = set()
    for module in wanted:
        if repo.entry_at(base, module) is None and repo.entry_at(base, module + ".py") is None:
            new.add(module)
    return new


def _replay(
    repo: Any,
    base: str,
    head: str,
    policy: Any,
    verification: dict[str, Any],
    timings: dict[str, float],
    progress: Callable[[str], None] | None,
    pending: Any = None,
) -> tuple[list[Reason], str]:
    """One worktree of base, run, switch to head (cleaned), freeze the verifier, run, judge.

    ``pending`` is the base worktree already being written (``Repo.start_worktree``).
    """
    import psutil  # noqa: F401  (replay needs it: imported while git writes the worktree)

    from cage import replay

    v = policy.verification
    steps = ", ".join(
        n
        for n, c in (("setup", v.setup), ("command", v.command), ("regression", v.regression))
        if c
    )
    log_dir = tempfile.mkdtemp(prefix="cage-logs-")
    head_side = None
    try:
        clock = time.monotonic()
        with contextlib.ExitStack() as stack:
            if pending is None:
                pending = repo.start_worktree_in(stack, base)
            else:
                stack.enter_context(pending)
            worktree = pending.wait()
            timings["worktree_s"] = time.monotonic() - clock
            _say(
                progress,
                f"replaying at base {base[:12]}: {steps} (timeout {v.timeout_seconds:g}s each)",
            )
            clock = time.monotonic()
            base_side = replay.run_side("base", worktree.path, v, Path(log_dir))
            timings["replay_base_s"] = time.monotonic() - clock
            verification["replayed"] = True
            verification["base"] = _side_dict(base_side)
            # Read base's pytest summaries now: head code learns the log directory from its
            # own PYTEST_ADDOPTS and could rewrite base's logs to switch the cross-check off.
            summaries = {
                id(r): pytest_summary_of(r) for r in (base_side.command, base_side.regression) if r
            }
            base_regression = _command_dict(base_side.regression)
            if _worth_running_head(base_side, v.evidence):
                clock = time.monotonic()
                _switch_and_freeze(worktree, head, base, verification["restored_paths"])
                timings["switch_s"] = time.monotonic() - clock
                _say(
                    progress,
                    f"replaying at head {head[:12]}: {steps} (timeout {v.timeout_seconds:g}s each)",
                )
                clock = time.monotonic()
                head_side = _run_head(replay, worktree, head, base, v, verification, log_dir)
                timings["replay_head_s"] = time.monotonic() - clock
                verification["head"] = _side_dict(head_side)
            else:
                verification["skipped_reason"] = (
                    "the base run already decides the verdict; head was not replayed"
                )
        if v.regression:
            verification["regression"] = {
                "command": v.regression,
                "base": base_regression,
                "head": _command_dict(head_side.regression) if head_side else None,
            }
        # Judged while the logs exist: pytest's summary lines are read from them.
        if head_side is not None:
            for result in (head_side.command, head_side.regression):
                if result is not None:
                    summaries[id(result)] = pytest_summary_of(result)
        reasons, status = judge_replay(base_side, head_side, v, lambda r: summaries.get(id(r)))
        changed = verification.get("environment_changed")
        if changed:
            reasons.append(
                Reason(
                    "environment_changed",
                    f"the head command run changed {len(changed)} file(s) outside the worktree "
                    f"that the regression run would load (first: {changed[0]}); the regression "
                    "was not run",
                )
            )
            status = UNVERIFIED
        return reasons, status
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _switch_and_freeze(worktree: Any, head: str, base: str, restored: list[str]) -> None:
    """Check out head cleanly; under guard: off, put base's verifier back."""
    worktree.switch(head)
    if restored:
        worktree.restore_paths_from(base, restored)


def _run_head(
    replay: Any,
    worktree: Any,
    head: str,
    base: str,
    v: Any,
    verification: dict[str, Any],
    log_dir: str,
) -> Any:
    """Setup and command at head; then the regression in a worktree reset to head.

    Head code runs during the command: it could leave files in the worktree (a conftest.py,
    a forged ``__pycache__`` entry) that steer the regression run. So before the regression
    the worktree is checked out and cleaned again (``git clean -ffdx``) and setup re-run.
    """
    if not v.regression:
        return replay.run_side("head", worktree.path, v, Path(log_dir))
    timeout = float(v.timeout_seconds)
    side_dir = Path(log_dir) / "head"
    setup = None
    if v.setup:  # setup may install into site-packages: the snapshot is taken after it
        setup = replay.run_command("setup", v.setup, worktree.path, timeout, side_dir)
        if not setup.succeeded:  # judged as a setup failure
            return replay.SideResult("head", setup, None, None)
    before = shared_state(worktree.repo, worktree.path)
    command = replay.run_command("command", v.command, worktree.path, timeout, side_dir)
    side = replay.SideResult("head", setup, command, None)
    changed = state_changes(before, shared_state(worktree.repo, worktree.path))
    if changed:
        # The regression run would load what head code left outside the worktree.
        verification["environment_changed"] = changed[:20]
        return side
    _switch_and_freeze(worktree, head, base, verification["restored_paths"])
    if v.setup:
        again = replay.run_command(
            "setup", v.setup, worktree.path, timeout, Path(log_dir) / "head-reset"
        )
        if not again.succeeded:
            side.setup = again  # judged as a setup failure at head
            return side
    side.regression = replay.run_command(
        "regression", v.regression, worktree.path, timeout, Path(log_dir) / "head"
    )
    return side


# ---------------------------------------------------------------------------------------
# State shared by the head command run and the head regression run (outside the worktree)

MAX_STATE_FILES = 200_000  # a walk this large is abandoned (and judged changed)


def _python_roots(path_env: str) -> tuple[list[Path], set[Path]]:
    """Folders whose files the `python` and `python3` on ``path_env`` load at start-up or
    import: the standard library and site-packages of the interpreter's prefix (and the
    standard library of the base interpreter a virtual environment links to), and the user
    site. Second: site-packages folders to leave out (a venv's base, not on its path)."""
    import glob

    roots: set[Path] = set()
    skipped: set[Path] = set()
    for name in ("python3", "python"):
        exe = shutil.which(name, path=path_env)
        if exe is None:
            continue
        venv = (Path(exe).parent.parent / "pyvenv.cfg").is_file()
        for candidate in {Path(exe), Path(exe).resolve()}:
            prefix = candidate.parent.parent
            found = {Path(p).resolve() for p in glob.glob(str(prefix / "lib*/python3*"))}
            roots.update(found)
            if venv and not (prefix / "pyvenv.cfg").is_file():
                skipped.update(f / "site-packages" for f in found)
            if not venv:
                roots.update(
                    Path(p).resolve() for p in glob.glob(str(prefix / "lib/python3/dist-packages"))
                )
    home = os.path.expanduser("~")
    roots.update(Path(p).resolve() for p in glob.glob(os.path.join(home, ".local/lib/python3*")))
    return sorted(r for r in roots if r.is_dir()), skipped


# Standard-library folders no test run imports (large, and not on the start-up path).
_UNWATCHED_DIRS = frozenset(
    {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data"}
)


def _walk_state(
    root: Path,
    out: dict[str, tuple[int, int, int]],
    skip_new_pyc: bool,
    skipped: Collection[Path] = (),
) -> None:
    """(inode, size, ctime) of every file under ``root``; ctime cannot be set back."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if len(out) > MAX_STATE_FILES:
                out["<too many files>"] = (0, 0, 0)
                return
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in _UNWATCHED_DIRS and Path(entry.path) not in skipped:
                        stack.append(Path(entry.path))
                    continue
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            key = entry.path
            if skip_new_pyc and entry.name.endswith(".pyc"):
                key = "pyc:" + key  # new byte code is written by honest imports
            out[key] = (info.st_ino, info.st_size, info.st_ctime_ns)


def shared_state(repo: Any, worktree_path: Path) -> dict[str, tuple[int, int, int]]:
    """What the head regression run depends on besides the worktree's own files.

    Head code runs during the head command with the runner's file system. It could rewrite
    a loose object (git does not verify a loose object's hash when it reads it) or the
    worktree's ``.git`` file, and the checkout before the regression would restore the tests
    from it; or plant a ``.pth``, ``sitecustomize.py`` or a plugin in site-packages, which
    the regression's fresh interpreter would load. Every such file is recorded here.
    """
    state: dict[str, tuple[int, int, int]] = {}
    git_dir = Path(repo.git_dir)
    common = git_dir
    with contextlib.suppress(OSError):
        common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
    for part in ("objects", "info", "config", "worktrees", "hooks"):
        target = common / part
        if target.is_dir():
            _walk_state(target, state, skip_new_pyc=False)
        elif target.exists():
            info = target.stat()
            state[str(target)] = (info.st_ino, info.st_size, info.st_ctime_ns)
    with contextlib.suppress(OSError):
        info = (worktree_path / ".git").lstat()
        state[str(worktree_path / ".git")] = (info.st_ino, info.st_size, info.st_ctime_ns)
    roots, skipped = _python_roots(os.environ.get("PATH", ""))
    for root in roots:
        _walk_state(root, state, skip_new_pyc=True, skipped=skipped)
    return state


def state_changes(
    before: Mapping[str, tuple[int, int, int]], after: Mapping[str, tuple[int, int, int]]
) -> list[str]:
    """Paths changed, removed or added between two ``shared_state`` snapshots.

    Allowed: new loose git objects (git in a test may write some; a loose object never
    shadows one that exists) and new byte code (``*.pyc`` written by imports), and the
    index and logs of worktrees (git status refreshes them).
    """
    changed = []
    for path in sorted(set(before) | set(after)):
        if before.get(path) == after.get(path):
            continue
        if path not in before and _may_appear(path):
            continue
        if _volatile(path):
            continue
        changed.append(path[len("pyc:") :] if path.startswith("pyc:") else path)
    return changed


def _may_appear(path: str) -> bool:
    if path.startswith("pyc:"):
        return True
    parts = Path(path).parts
    if "objects" in parts:
        rest = parts[parts.index("objects") + 1 :]
        return len(rest) == 2 and len(rest[0]) == 2 and rest[0] not in ("pa", "in")
    return False


def _volatile(path: str) -> bool:
    parts = Path(path).parts
    if "worktrees" in parts:
        name = parts[-1]
        return name in ("index", "index.lock", "ORIG_HEAD", "FETCH_HEAD") or "logs" in parts
    return False


def _worth_running_head(base_side: Any, evidence: str) -> bool:
    """Head runs only when the base run leaves the verdict open (saves a whole replay)."""
    if judge_setup(base_side) or base_side.command is None:
        return False
    reasons, _ = judge_command(base_side.command, None, evidence)
    # judge_command with no head says "did not run at head" exactly when base was fine.
    return [r.code for r in reasons] == ["verification_failed"]
