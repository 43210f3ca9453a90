"""The pure core of the gate: facts in, verdict out (no git, no processes)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from cage import adjudicate as adj
from cage.adjudicate import Finding, Reason


# --- plain-data stand-ins for replay results (same attributes as cage.replay's) ----------
def report(**cases: str) -> SimpleNamespace:
    cases = {k.replace("__", "::"): v for k, v in cases.items()}
    counts = {
        s: sum(1 for v in cases.values() if v == s)
        for s in ("passed", "failed", "error", "skipped")
    }
    return SimpleNamespace(cases=cases, counts=counts, total=len(cases))


def run(exit_code=0, rep=None, name="command", timed_out=False, report_error=None, killed=0):
    return SimpleNamespace(
        name=name,
        command="python -m pytest -q",
        exit_code=exit_code,
        timed_out=timed_out,
        duration_s=1.0,
        report=rep,
        report_error=report_error,
        leftover_processes_killed=killed,
    )


def side(label, command=None, setup=None, regression=None):
    return SimpleNamespace(label=label, setup=setup, command=command, regression=regression)


def verification(**kw):
    base = dict(evidence="auto", guard="strict", regression=None)
    base.update(kw)
    return SimpleNamespace(**base)


def codes(reasons):
    return [r.code for r in reasons]


# --- decide: the four rules in order ---
@pytest.mark.parametrize(
    ("codes_in", "expected"),
    [
        ([], adj.PASS),
        (["replay_skipped", "processes_killed"], adj.PASS),
        (["out_of_scope"], adj.BLOCKED),
        (["verifier_touched", "out_of_scope"], adj.HUMAN_APPROVAL_REQUIRED),
        (["tamper_exit_at_import"], adj.HUMAN_APPROVAL_REQUIRED),
        (["verifier_touched", "symlink"], adj.BLOCKED),
        (["spend_unattested", "verification_failed"], adj.HUMAN_APPROVAL_REQUIRED),
        (["spend_over_limit"], adj.BLOCKED),
        (["some_code_nobody_defined"], adj.BLOCKED),
    ],
)
def test_decide_first_rule_wins(codes_in, expected):
    verdict, ordered = adj.decide(Reason(c, c) for c in codes_in)
    assert verdict == expected
    # the deciding reasons come first
    assert [adj.rule_of(r.code) for r in ordered] == sorted(adj.rule_of(c) for c in codes_in)


def test_every_rule_has_a_verdict_and_exit_code():
    assert adj.EXIT_CODES == {"PASS": 0, "BLOCKED": 1, "HUMAN_APPROVAL_REQUIRED": 3}


def test_every_reason_code_used_in_the_source_is_in_the_table_and_the_docs():
    root = Path(adj.__file__).parent
    sources = [root / "adjudicate.py", root / "github.py", root / "commands" / "ci.py"]
    used: set[str] = set()
    for src in sources:
        text = src.read_text()
        used |= set(re.findall(r'Reason\(\s*"([a-z0-9_]+)"', text))
        used |= set(re.findall(r'blocked\(\s*"([a-z0-9_]+)"', text))
        used |= set(
            re.findall(
                r'Finding\([^)]*?"(?:structural|scope|verifier|restored)",\s*"([a-z0-9_]+)"', text
            )
        )
    assert used, "the regexes found no reason code"
    missing = sorted(c for c in used if c not in adj.REASON_CODES)
    assert missing == []
    docs = (root.parent.parent / "docs" / "ci.md").read_text()
    for code in adj.REASON_CODES:
        assert f"`{code}`" in docs, code


def test_tamper_codes_are_human_and_documented_as_a_family():
    assert adj.rule_of("tamper_anything") == adj.RULE_HUMAN
    assert "tamper_*" in adj.REASON_CODES


# --- content and mode findings ---
@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"print('hi')\n", None),
        (b"x" * 9000 + b"\0", None),  # NUL after the first 8,000 bytes: text, as git decides
        (b"abc\0def", "binary_content"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 3\n", "lfs_pointer"),
        ("caf\u00e9".encode("latin-1"), "not_utf8"),
        ("caf\u00e9 \u2603\n".encode(), None),
    ],
)
def test_content_findings(data, code):
    found = adj.content_findings("src/x.py", data)
    assert [f.code for f in found] == ([code] if code else [])
    assert all(f.kind == "structural" for f in found)


def change(status, path="src/a.py", old="100644", new="100644"):
    if status == "A":
        old = "000000"
    if status == "D":
        new = "000000"
    return SimpleNamespace(
        status=status, path=path, old_mode=old, new_mode=new, old_sha="1" * 40, new_sha="2" * 40
    )


@pytest.mark.parametrize(
    ("ch", "allow_deletions", "expected"),
    [
        (change("M"), False, []),
        (change("A"), False, []),
        (change("D"), False, ["deleted_path"]),
        (change("D"), True, []),
        (change("M", old="100644", new="100755"), False, ["mode_changed"]),
        (change("M", old="100755", new="100644"), False, ["mode_changed"]),
        (change("T", old="100644", new="120000"), False, ["mode_changed", "symlink"]),
        (change("A", new="100755"), False, ["new_executable"]),
        (change("A", new="120000"), False, ["symlink"]),
        (change("M", old="120000", new="120000"), False, ["symlink"]),
        (change("A", new="160000"), False, ["gitlink"]),
        (change("M", old="160000", new="160000"), False, ["gitlink"]),
        (change("D", old="160000"), True, ["gitlink"]),
        (change("C"), False, ["unsupported_change"]),
    ],
)
def test_mode_findings(ch, allow_deletions, expected):
    assert [f.code for f in adj.mode_findings(ch, allow_deletions)] == expected


def test_command_module_names():
    assert adj.command_module_names(["python -m pytest -q tests/x.py"]) >= {"pytest", "python"}
    assert "mytool" in adj.command_module_names(["PYTHONHASHSEED=0 python3 -mmytool.cli run"])
    assert "tox" in adj.command_module_names(["tox -e py", None, "unbalanced 'quote"])


# --- judging the verify command ---
def test_honest_fix_is_strong():
    base = run(1, report(t__a="failed", t__b="passed"))
    head = run(0, report(t__a="passed", t__b="passed"))
    reasons, strong = adj.judge_command(base, head, "auto")
    assert reasons == [] and strong


def test_baseline_already_green():
    base = run(0, report(t__a="passed"))
    reasons, _ = adj.judge_command(base, run(0, report(t__a="passed")), "auto")
    assert codes(reasons) == ["baseline_already_green"]


def test_base_exit_zero_with_a_failing_report_counts_as_failing():
    base = run(0, report(t__a="failed"))
    reasons, _ = adj.judge_command(base, run(0, report(t__a="passed")), "auto")
    assert reasons == []


def test_head_exit_zero_without_report_after_base_report_blocks():
    """An interpreter that exits 0 before the report is written does not pass."""
    base = run(1, report(t__a="failed"))
    reasons, _ = adj.judge_command(base, run(0, None), "auto")
    assert codes(reasons) == ["head_report_missing"]


def test_head_report_malformed_blocks():
    base = run(1, report(t__a="failed"))
    reasons, _ = adj.judge_command(base, run(0, None, report_error="truncated XML"), "auto")
    assert codes(reasons) == ["report_invalid"]


def test_failed_at_base_skipped_at_head_blocks():
    base = run(1, report(t__a="failed"))
    reasons, _ = adj.judge_command(base, run(0, report(t__a="skipped", t__b="passed")), "auto")
    assert codes(reasons) == ["test_skipped"]


def test_failed_at_base_vanished_at_head_blocks():
    base = run(1, report(t__a="failed", t__b="passed"))
    reasons, _ = adj.judge_command(base, run(0, report(t__b="passed")), "auto")
    assert codes(reasons) == ["test_not_run"]


def test_no_test_ran_at_head_blocks():
    base = run(1, report(t__a="failed"))
    reasons, _ = adj.judge_command(base, run(0, report(t__a="skipped")), "auto")
    assert "no_tests_run" in codes(reasons)


def test_head_failures_and_exit_status_block():
    base = run(1, report(t__a="failed"))
    reasons, _ = adj.judge_command(base, run(1, report(t__a="failed")), "auto")
    assert set(codes(reasons)) == {"verification_failed"}
    reasons, _ = adj.judge_command(base, run(3, report(t__a="passed")), "auto")
    assert codes(reasons) == ["verification_failed"]


def test_collection_error_at_base_requires_every_head_test_to_pass():
    base = run(2, report(**{"__tests.test_ops": "error"}))
    reasons, strong = adj.judge_command(base, run(0, report(t__a="passed", t__b="passed")), "auto")
    assert reasons == [] and strong
    reasons, _ = adj.judge_command(base, run(0, report(t__a="passed", t__b="skipped")), "auto")
    assert codes(reasons) == ["test_skipped"]


def test_base_failing_with_empty_report_is_a_collection_error():
    base = run(4, report())
    reasons, _ = adj.judge_command(base, run(0, report(t__a="passed", t__b="skipped")), "auto")
    assert codes(reasons) == ["test_skipped"]


def test_no_report_is_judged_by_exit_status_and_is_weak():
    reasons, strong = adj.judge_command(run(1), run(0), "auto")
    assert reasons == [] and not strong
    reasons, _ = adj.judge_command(run(0), run(0), "auto")
    assert codes(reasons) == ["baseline_already_green"]
    reasons, _ = adj.judge_command(run(1), run(1), "auto")
    assert codes(reasons) == ["verification_failed"]


def test_exit_code_evidence_ignores_reports():
    base = run(1, report(t__a="failed"))
    reasons, strong = adj.judge_command(base, run(0, None), "exit-code")
    assert reasons == [] and not strong


def test_junit_evidence_requires_a_base_report():
    reasons, _ = adj.judge_command(run(1), run(0), "junit")
    assert codes(reasons) == ["base_report_missing"]


def test_killed_by_signal_is_not_a_pass():
    base = run(1, report(t__a="failed"))
    reasons, _ = adj.judge_command(base, run(None, report(t__a="passed")), "auto")
    assert codes(reasons) == ["verification_failed"]


def test_timeouts():
    reasons, _ = adj.judge_command(run(None, timed_out=True), None, "auto")
    assert codes(reasons) == ["timeout"]
    reasons, _ = adj.judge_command(run(1), run(None, timed_out=True), "auto")
    assert codes(reasons) == ["timeout"]


# --- regression ---
def test_regression_holding_and_broken():
    base = run(1, report(r__a="passed", r__b="failed"), name="regression")
    assert adj.judge_regression(base, run(1, report(r__a="passed", r__b="failed")), "auto") == []
    broken = adj.judge_regression(base, run(1, report(r__a="failed", r__b="passed")), "auto")
    assert codes(broken) == ["regression_failed"]
    skipped = adj.judge_regression(base, run(0, report(r__a="skipped", r__b="passed")), "auto")
    assert codes(skipped) == ["regression_failed"]
    vanished = adj.judge_regression(base, run(0, report(r__b="passed")), "auto")
    assert codes(vanished) == ["regression_failed"]
    no_report = adj.judge_regression(base, run(0, None), "auto")
    assert codes(no_report) == ["regression_failed"]


def test_regression_without_report_needs_exit_zero():
    assert adj.judge_regression(run(0), run(0), "auto") == []
    assert codes(adj.judge_regression(run(0), run(1), "auto")) == ["regression_failed"]
    green = run(0, report(r__a="passed"))
    assert codes(adj.judge_regression(green, run(1, report(r__a="passed")), "auto")) == [
        "regression_failed"
    ]


# --- the whole replay judgement ---
def test_setup_failure_blocks_and_is_unverified():
    base = side("base", setup=run(1, name="setup"))
    reasons, status = adj.judge_replay(base, None, verification())
    assert codes(reasons) == ["setup_failed"] and status == adj.UNVERIFIED
    ok_base = side("base", setup=run(0, name="setup"), command=run(1))
    head = side("head", setup=run(None, name="setup", timed_out=True))
    reasons, _ = adj.judge_replay(ok_base, head, verification())
    assert codes(reasons) == ["timeout"]


def test_status_strong_weak():
    base = side("base", command=run(1, report(t__a="failed")))
    head = side("head", command=run(0, report(t__a="passed")))
    assert adj.judge_replay(base, head, verification()) == ([], adj.VERIFIED_STRONG)
    assert adj.judge_replay(base, head, verification(guard="off"))[1] == adj.VERIFIED_WEAK
    assert adj.judge_replay(base, head, verification(evidence="exit-code"))[1] == adj.VERIFIED_WEAK
    weak = adj.judge_replay(
        side("base", command=run(1)), side("head", command=run(0)), verification()
    )
    assert weak == ([], adj.VERIFIED_WEAK)


def test_killed_processes_are_listed_but_do_not_block():
    base = side("base", command=run(1, report(t__a="failed")))
    head = side("head", command=run(0, report(t__a="passed"), killed=2))
    reasons, status = adj.judge_replay(base, head, verification())
    assert codes(reasons) == ["processes_killed"] and status == adj.VERIFIED_STRONG
    assert adj.decide(reasons)[0] == adj.PASS


def test_regression_only_judged_after_the_command_passes():
    base = side(
        "base",
        command=run(1, report(t__a="failed")),
        regression=run(0, report(r__x="passed"), name="regression"),
    )
    head = side(
        "head",
        command=run(0, report(t__a="passed")),
        regression=run(1, report(r__x="failed"), name="regression"),
    )
    reasons, status = adj.judge_replay(base, head, verification(regression="python -m pytest -q"))
    assert set(codes(reasons)) == {"regression_failed"} and status == adj.UNVERIFIED


def test_verification_status_compromised_on_verifier_findings():
    f = [Finding("tests/t.py", "verifier", "verifier_touched", "x")]
    assert adj.verification_status(f, None) == adj.VERIFIER_COMPROMISED
    assert adj.verification_status([], None) == adj.UNVERIFIED
    assert adj.verification_status([], adj.VERIFIED_WEAK) == adj.VERIFIED_WEAK


def test_verdict_document_shape():
    v = adj.blocked("bad_event", "nope")
    doc = v.to_dict()
    assert doc["schema"] == "cage.verdict/v1"
    assert doc["verdict"] == "BLOCKED" and doc["exit_code"] == 1
    assert doc["reasons"] == [{"code": "bad_event", "message": "nope"}]
    for key in ("policy", "base", "head", "changes", "verification", "spend", "timings"):
        assert key in doc
    assert set(doc["verification"]) >= {"status", "base", "head", "regression"}


def test_every_tamper_pattern_is_in_the_docs():
    from cage import tamper

    docs = (Path(adj.__file__).parent.parent.parent / "docs" / "ci.md").read_text()
    missing = [r.code for r in tamper.RULES if f"`tamper_{r.code}`" not in docs]
    assert missing == []


def test_passed_at_base_must_not_vanish_or_be_skipped_at_head():
    base = run(1, report(t__a="failed", t__b="passed", t__c="passed"))
    reasons, _ = adj.judge_command(base, run(0, report(t__a="passed", t__c="skipped")), "auto")
    assert sorted(codes(reasons)) == ["test_not_run", "test_skipped"]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("argparse.py", "argparse"),
        ("src/textwrap.py", "textwrap"),
        ("lib/email/__init__.py", "email"),
        ("src/calc/json.py", None),  # calc.json: inside a package, shadows nothing
        ("calc/types.py", None),
        ("src/calc.py", None),
        ("src/argparse.txt", None),
    ],
)
def test_added_top_level_module_named_like_the_stdlib(path, name):
    assert adj._shadowed_stdlib(path) == name


# --- classify with plain data (real pathrules, tamper and policy) ---------------------------
def policy(**verification):
    from cage.policy import load_policy

    v = {"command": "python -m pytest -q tests/test_ops.py", "allow": ["src/**"]}
    v.update(verification)
    text = (
        "version: v1\nmission: {name: m}\nbudget: {mission_hard_limit_usd: 1}\n"
        f"verification: {json.dumps(v)}\n"
    )
    return load_policy(text.encode())


def by_path(findings):
    out = {}
    for f in findings:
        out.setdefault(f.path, set()).add(f.code)
    return out


def test_classify_plain_data():
    changes = [
        change("M", "src/calc/ops.py"),
        change("A", "README.md"),
        change("A", "tests/test_new.py"),
        change("D", "src/calc/old.py"),
        change("A", "src/calc/missing.py"),
        change("A", ".runcap/outcomes/r1/receipt.json"),
    ]
    blobs = {
        "2" * 40: b"def add(a, b):\n    return a + b\n",
        "1" * 40: b"def add(a, b):\n    return a - b\n",
    }
    # every change above shares new_sha "2"*40, except the missing one
    changes[4] = SimpleNamespace(**{**vars(changes[4]), "new_sha": "3" * 40})
    found = by_path(adj.classify(changes, blobs, policy(), set()))
    assert "src/calc/ops.py" not in found
    assert found["README.md"] == {"out_of_scope"}
    assert found["tests/test_new.py"] == {"out_of_scope", "verifier_touched"}
    assert found["src/calc/old.py"] == {"deleted_path"}
    assert found["src/calc/missing.py"] == {"unreadable_content"}
    assert ".runcap/outcomes/r1/receipt.json" not in found


def test_classify_guard_off_turns_verifier_findings_into_restores():
    changes = [change("M", "tests/test_ops.py")]
    blobs = {"2" * 40: b"def test_add():\n    assert True\n"}
    findings = adj.classify(changes, blobs, policy(guard="off", allow=["**"]), set())
    assert [(f.kind, f.code) for f in findings] == [("restored", "verifier_restored")]
    assert adj.restore_paths(findings) == ["tests/test_ops.py"]


def test_classify_scans_changed_python_for_tamper():
    changes = [change("M", "src/calc/ops.py")]
    blobs = {"1" * 40: b"def add(a, b):\n    return a - b\n", "2" * 40: b"import os\nos._exit(0)\n"}
    findings = adj.classify(changes, blobs, policy(), set())
    assert findings and all(f.kind == "tamper" and f.code.startswith("tamper_") for f in findings)
    assert findings[0].line == 2


def test_classify_command_files():
    changes = [change("A", "src/check.sh")]
    findings = adj.classify(changes, {"2" * 40: b"exit 0\n"}, policy(), {"src/check.sh"})
    assert [f.code for f in findings] == ["verifier_touched"]


@pytest.mark.parametrize(
    ("path", "module"),
    [
        ("src/calc/ops.py", "src/calc"),
        ("src/anyio/__init__.py", "src/anyio"),
        ("src/helpers.py", "src/helpers"),
        ("calc/ops.py", "calc"),
        ("setup.py", "setup"),
        ("lib/x/y/z.py", "lib/x"),
        ("src/calc/data.txt", None),
    ],
)
def test_top_level_module(path, module):
    assert adj.top_level_module(path) == module


def test_new_top_level_module_needs_a_human():
    changes = [change("A", "src/anyio/__init__.py"), change("A", "src/calc/extra.py")]
    blobs = {"2" * 40: b"X = 1\n"}
    found = by_path(adj.classify(changes, blobs, policy(), set(), {"src/anyio"}))
    assert found == {"src/anyio/__init__.py": {"new_top_level_module"}}


@pytest.mark.parametrize(
    ("data", "codec"),
    [
        (b"# -*- coding: utf-7 -*-\nx = 1\n", "utf-7"),
        (b"#!/usr/bin/python\n# coding=unicode_escape\n", "unicode-escape"),
        (b"# coding: utf-8\n", None),
        (b"# -*- coding: UTF_8 -*-\n", None),
        (b"# coding: utf-8-sig\n", None),
        (b"x = 1\n# coding: latin-1\n", None),  # after a statement: not a cookie
    ],
)
def test_python_source_encoding(data, codec):
    assert adj.python_source_encoding("src/a.py", data) == codec
    if not data.startswith(b"#!"):  # a Python script is Python whatever its name
        assert adj.python_source_encoding("README.md", data) is None


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("....\n1 failed, 1 passed in 0.05s\n", {"failed": 1, "passed": 1}),
        ("==== 2 passed, 1 warning in 0.03s ====\n", {"passed": 2, "warning": 1}),
        ("3 passed in 61.20s (0:01:01)", {"passed": 3}),
        ("no tests ran in 0.01s", {}),
        ("1 passed, 2 errors in 1.0s\ntrailing output", {"passed": 1, "error": 2}),
        ("nothing like a summary", None),
    ],
)
def test_parse_pytest_summary(text, counts):
    assert adj.parse_pytest_summary(text) == counts


def test_summary_cross_check():
    base = run(1, report(t__a="failed"))
    head = run(0, report(t__a="passed"))
    assert adj.judge_summary(base, head, {"failed": 1}, {"passed": 1}) == []
    assert codes(adj.judge_summary(base, head, {"failed": 1}, None)) == ["report_unconfirmed"]
    assert codes(adj.judge_summary(base, head, {"failed": 1}, {"passed": 3})) == [
        "report_unconfirmed"
    ]
    assert codes(adj.judge_summary(base, head, {"failed": 1}, {"passed": 1, "failed": 1})) == [
        "report_unconfirmed"
    ]
    # a base run without pytest's summary (terminal plugin off): nothing to compare
    assert adj.judge_summary(base, head, None, None) == []


def test_finding_reason_names_the_place_once():
    assert Finding("a.py", "tamper", "tamper_x", "a.py:3: bad", 3).reason().message == "a.py:3: bad"
    assert Finding("a.py", "tamper", "tamper_x", "bad", 3).reason().message == "a.py:3: bad"
    assert Finding("a.py", "scope", "out_of_scope", "outside").reason().message == "a.py: outside"


def test_a_huge_revision_is_refused_without_echoing_it(git_repo):
    git_repo.write("a.txt", "a\n")
    git_repo.commit("base")
    verdict = adj.adjudicate(git_repo.path, "a" * 100_000, "HEAD")
    assert verdict.verdict == "BLOCKED"
    (reason,) = verdict.reasons
    assert reason.code == "bad_revision" and "100000 characters" in reason.message
    assert len(reason.message) < 300
