"""GitHub edges: event payloads, escaping, outputs, step summary, annotations."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cage import github
from cage.adjudicate import Finding, Reason, Verdict, blocked

SHA_A = "a" * 40
SHA_B = "B" * 40


def event(tmp_path, name, payload):
    path = tmp_path / "event.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return {"GITHUB_EVENT_NAME": name, "GITHUB_EVENT_PATH": str(path)}


def test_pull_request_and_merge_group_are_trusted(tmp_path):
    env = event(
        tmp_path, "pull_request", {"pull_request": {"base": {"sha": SHA_A}, "head": {"sha": SHA_B}}}
    )
    assert github.revisions_from_event(env) == (SHA_A, SHA_B.lower())
    env = event(tmp_path, "merge_group", {"merge_group": {"base_sha": SHA_A, "head_sha": "c" * 64}})
    assert github.revisions_from_event(env) == (SHA_A, "c" * 64)


@pytest.mark.parametrize(
    "name", ["pull_request_target", "push", "workflow_run", "release", "x\n::error::y"]
)
def test_other_events_are_untrusted_and_named(tmp_path, name):
    reason = github.revisions_from_event(event(tmp_path, name, {}))
    assert isinstance(reason, Reason) and reason.code == "untrusted_event"
    assert github.printable(name) in reason.message
    assert "\n" not in reason.message


@pytest.mark.parametrize(
    "sha",
    [
        "a" * 39,
        "a" * 41,
        "g" * 40,
        "HEAD",
        "-" + "a" * 39,
        12345,
        None,
        ["a" * 40],
        "a" * 40 + "\n",
    ],
)
def test_only_full_hex_shas_from_the_payload(tmp_path, sha):
    env = event(
        tmp_path, "pull_request", {"pull_request": {"base": {"sha": sha}, "head": {"sha": SHA_A}}}
    )
    reason = github.revisions_from_event(env)
    assert isinstance(reason, Reason) and reason.code == "bad_event"


def test_missing_event_pieces(tmp_path):
    assert github.revisions_from_event({}).code == "no_revisions"
    assert github.revisions_from_event({"GITHUB_EVENT_PATH": "/x"}).code == "bad_event"
    assert github.revisions_from_event({"GITHUB_EVENT_NAME": "pull_request"}).code == "bad_event"
    bad = github.revisions_from_event(
        event(tmp_path, "pull_request", b"\xff\xfe".decode("latin-1"))
    )
    assert bad.code == "bad_event"
    (tmp_path / "dir").mkdir()
    env = {"GITHUB_EVENT_NAME": "pull_request", "GITHUB_EVENT_PATH": str(tmp_path / "dir")}
    assert github.revisions_from_event(env).code == "bad_event"


def test_printable_escapes_control_characters():
    assert github.printable("a\nb\rc\x1bd\u2028e") == "a\\nb\\rc\\x1bd\\x2028e"
    assert github.printable("caf\u00e9") == "caf\u00e9"
    assert github.printable("bad\udcffbyte").isprintable()


def test_markdown_escape_neutralises_html_tables_and_code():
    text = github.md("<img src=x onerror=alert(1)> | `code` [link](http://x) *b* \n::error::x")
    for bad in ("<", ">", "|", "`", "[", "](", "*", "\n"):
        assert bad not in text
    assert "&#60;img" in text


def test_workflow_command_escaping():
    assert github.escape_data("50%\r\nx") == "50%25%0D%0Ax"
    assert github.escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"


def verdict_with_paths(paths, code="out_of_scope"):
    changes = [
        SimpleNamespace(path=p, status="A", old_mode="000000", new_mode="100644") for p in paths
    ]
    findings = [Finding(p, "scope", code, "outside verification.allow") for p in paths]
    return Verdict(
        "BLOCKED",
        [f.reason() for f in findings],
        base=SHA_A,
        head=SHA_A,
        policy={"path": ".runcap/mission.yaml", "hash": "f" * 64, "source": "base"},
        changes=changes,
        findings=findings,
    )


def test_annotations_are_capped_escaped_and_point_at_paths():
    paths = [f"docs/f{i},x:y\n::warning::z.md" for i in range(25)]
    lines = github.annotations(verdict_with_paths(paths))
    assert len(lines) == 10
    for line in lines:
        assert line.startswith("::error file=docs/f")
        assert "\n" not in line and "\r" not in line
        props = line.split("::")[1]
        assert props.count(",") == 1  # file=...,title=... : commas in the path are escaped
        assert "title=cage%3A out_of_scope" in props


def test_annotations_carry_the_line_of_tamper_findings():
    f = Finding("src/a.py", "tamper", "tamper_ends_process_at_import", "os._exit at import", 7)
    v = Verdict("HUMAN_APPROVAL_REQUIRED", [f.reason()], findings=[f])
    assert github.annotations(v) == [
        "::error file=src/a.py,line=7,title=cage%3A tamper_ends_process_at_import::"
        "src/a.py:7: os._exit at import"
    ]


def test_outputs_are_single_lines(tmp_path):
    out = tmp_path / "out"
    v = verdict_with_paths(["a"])
    v.policy["hash"] = "abc\nverdict=PASS"
    github.write_outputs(v, str(out))
    lines = out.read_text().splitlines()
    assert lines == [
        "verdict=BLOCKED",
        "policy-hash=abc verdict=PASS",
        "verification-status=UNVERIFIED",
    ]


def test_summary_escapes_hostile_paths(tmp_path):
    hostile = [
        "src/<script>alert(1)</script>.py",
        "src/a|b`c`.py",
        "src/line\nbreak.md",
        "src/@org/team.md",
    ]
    path = tmp_path / "summary.md"
    github.write_summary(verdict_with_paths(hostile), str(path))
    text = path.read_text()
    assert "<script>" not in text and "a|b" not in text and "`c`" not in text and "@org" not in text
    assert "line&#92;nbreak" in text
    assert "## ⛔ cage: BLOCKED" in text
    assert text.count("<details") == text.count("</details>")


def test_summary_is_cut_under_the_limit_at_a_line_boundary(tmp_path):
    paths = [f"data/{'x' * 200}/{i}.txt" for i in range(8000)]  # ~2 MB of Markdown
    path = tmp_path / "summary.md"
    github.write_summary(verdict_with_paths(paths), str(path))
    data = path.read_bytes()
    assert len(data) <= github.SUMMARY_LIMIT_BYTES < 1024 * 1024
    text = data.decode("utf-8")
    assert "cut here" in text
    assert text.count("<details") == text.count("</details>")
    kept = [line for line in text.splitlines() if line.startswith("- data/")]
    assert kept and all(line.endswith(".txt") for line in kept)


def test_limit_summary_never_splits_a_multibyte_character():
    text = ("é" * 99 + "\n") * 100
    cut = github.limit_summary(text, limit=5000)
    assert len(cut.encode()) <= 5000
    assert all(line in ("é" * 99, "") or "cut here" in line for line in cut.splitlines())


def test_publish_writes_both_files_and_reports_problems(tmp_path):
    v = blocked("no_revisions", "nothing")
    env = {
        "GITHUB_OUTPUT": str(tmp_path / "o"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "nodir" / "s"),
    }
    problems = github.publish(v, env)
    assert (tmp_path / "o").read_text().startswith("verdict=BLOCKED\n")
    assert len(problems) == 1 and "GITHUB_STEP_SUMMARY" in problems[0]


def test_fenced_output_uses_a_fresh_token():
    lines = github.fenced_output("::error::forged\nok")
    assert lines[0].startswith("::stop-commands::")
    token = lines[0].split("::")[2]
    assert len(token) == 32 and lines[-1] == f"::{token}::"
    assert github.fenced_output("x")[0] != lines[0]


def test_each_tamper_finding_keeps_its_own_line():
    found = [
        Finding("src/a.py", "tamper", "tamper_x", "first", 3),
        Finding("src/a.py", "tamper", "tamper_x", "second", 9),
    ]
    v = Verdict("HUMAN_APPROVAL_REQUIRED", [f.reason() for f in found], findings=found)
    lines = github.annotations(v)
    assert [line.split(",")[1] for line in lines] == ["line=3", "line=9"]


def test_event_file_that_is_a_fifo_is_a_bad_event_not_a_hang(tmp_path):
    import os

    fifo = tmp_path / "event.json"
    os.mkfifo(fifo)
    env = {"GITHUB_EVENT_NAME": "pull_request", "GITHUB_EVENT_PATH": str(fifo)}
    reason = github.revisions_from_event(env)
    assert reason.code == "bad_event" and "not valid JSON" in reason.message
