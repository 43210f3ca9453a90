"""`cage ci --mode adjudicate` end to end: real git repositories, real replays."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from cage.cli import main
from tests.commands.ci_repo import (
    OPS_FIXED,
    REGRESSION,
    adjudicate,
    codes,
    finding_codes,
    run_ci,
)


# --- the honest path and the plain failures ---
def test_honest_fix_passes_with_the_base_policy_hash(project, capsys):
    policy_bytes = (project.path / ".runcap/mission.yaml").read_bytes()
    project.fix()
    head = project.commit("fix add")
    code, doc, err = adjudicate(capsys, project, head)
    assert code == 0, doc["reasons"]
    assert doc["schema"] == "cage.verdict/v1"
    assert doc["verdict"] == "PASS"
    assert doc["policy"] == {
        "path": ".runcap/mission.yaml",
        "hash": hashlib.sha256(policy_bytes).hexdigest(),
        "source": "base",
    }
    assert doc["base"] == project.base and doc["head"] == head
    assert doc["verification"]["status"] == "VERIFIED_STRONG"
    assert doc["verification"]["base"]["command"]["exit_code"] != 0
    assert doc["verification"]["head"]["command"]["exit_code"] == 0
    assert doc["verification"]["head"]["command"]["tests"]["passed"] == 2
    assert [c["path"] for c in doc["changes"]] == ["src/calc/ops.py"]
    assert "replaying at base" in err and "replaying at head" in err
    assert "spend" in doc and "timings" in doc


def test_change_that_does_not_fix_is_blocked(project, capsys):
    project.write(
        "src/calc/ops.py",
        "def add(a, b):\n    return a - b + 0\n\n\ndef mul(a, b):\n    return a * b\n",
    )
    code, doc, _ = adjudicate(capsys, project, project.commit("not a fix"))
    assert code == 1
    assert doc["verdict"] == "BLOCKED" and "verification_failed" in codes(doc)
    assert doc["verification"]["status"] == "UNVERIFIED"


def test_baseline_already_green_is_blocked(project, capsys):
    project.set_policy(
        command="PYTHONPATH=src python -m pytest -q -p no:cacheprovider tests/test_mul.py"
    )
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1 and codes(doc) == {"baseline_already_green"}
    # head was not replayed: the base run decided
    assert doc["verification"]["head"] is None


def test_out_of_scope_edit_is_blocked_without_replay(project, capsys):
    project.fix()
    project.write("README.md", "# calc, now correct\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("fix + readme"))
    assert code == 1
    assert "out_of_scope" in codes(doc) and "replay_skipped" in codes(doc)
    assert finding_codes(doc, "README.md") == {"out_of_scope"}
    assert finding_codes(doc, "src/calc/ops.py") == set()
    assert doc["verification"]["replayed"] is False


# --- the verifier ---
@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("tests/test_ops.py", "def test_add():\n    assert True\n"),  # test edited
        ("tests/test_new.py", "def test_new():\n    assert True\n"),  # test added
        (".runcap/mission.yaml", "version: v1\n"),  # policy edited
        (".github/workflows/ci.yml", "on: push\n"),  # workflow added
        ("src/conftest.py", "import pytest\n"),  # harness hook inside the allowed scope
        ("src/calc/sitecustomize.py", "print(1)\n"),
        ("src/calc/pytest.ini", "[pytest]\n"),
    ],
)
def test_touching_the_verifier_needs_a_human(project, capsys, path, content):
    project.fix()
    project.write(path, content)
    code, doc, _ = adjudicate(capsys, project, project.commit("touch the verifier"))
    assert code == 3, doc["reasons"]
    assert doc["verdict"] == "HUMAN_APPROVAL_REQUIRED"
    assert "verifier_touched" in finding_codes(doc, path)
    assert doc["verification"]["status"] == "VERIFIER_COMPROMISED"
    assert doc["verification"]["replayed"] is False


def test_policy_edit_is_judged_by_the_base_policy(project, capsys):
    base_hash = hashlib.sha256((project.path / ".runcap/mission.yaml").read_bytes()).hexdigest()
    project.write(
        ".runcap/mission.yaml", "version: v1\nverification: {command: 'true', allow: ['**']}\n"
    )
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("loosen the policy"))
    assert code == 3
    assert doc["policy"]["hash"] == base_hash


@pytest.mark.parametrize(
    "path",
    [
        "src/pyproject.toml",
        "src/deep/er/requirements-dev.txt",
        "src/web/package.json",
        "src/web/app/yarn.lock",
        "src/svc/go.mod",
        "src/rs/crate/Cargo.toml",
        "src/rb/Gemfile",
    ],
)
def test_manifest_at_any_depth_needs_a_human(project, capsys, path):
    project.fix()
    project.write(path, "x = 1\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("manifest"))
    assert code == 3
    assert "verifier_touched" in finding_codes(doc, path)


def test_receipt_is_exempt_from_scope_and_verifier_but_not_structure(project, capsys):
    project.fix()
    project.write(".runcap/outcomes/abc123/receipt.json", '{"schema": "cage.outcome-receipt/v1"}\n')
    code, doc, _ = adjudicate(capsys, project, project.commit("fix + receipt"))
    assert code == 0, doc["reasons"]
    assert finding_codes(doc, ".runcap/outcomes/abc123/receipt.json") == set()
    project.write(".runcap/outcomes/abc123/receipt.json", b"\x00binary")
    code, doc, _ = adjudicate(capsys, project, project.commit("binary receipt"))
    assert code == 1
    assert finding_codes(doc, ".runcap/outcomes/abc123/receipt.json") == {"binary_content"}
    # anything else under .runcap/outcomes is protected
    project.write(".runcap/outcomes/abc123/run.py", "print(1)\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("not a receipt"))
    assert code in (1, 3)
    assert "verifier_touched" in finding_codes(doc, ".runcap/outcomes/abc123/run.py")


# --- structure ---
def _structural(project, action) -> dict:
    project.set_policy(allow=["**"])
    project.fix()
    action(project)
    return project.commit("structural")


@pytest.mark.parametrize(
    ("name", "action", "path", "code"),
    [
        ("deletion", lambda p: p.remove("README.md"), "README.md", "deleted_path"),
        (
            "rename",
            lambda p: p.git("mv", "README.md", "src/README.md"),
            "README.md",
            "deleted_path",
        ),
        (
            "mode change",
            lambda p: p.write("src/calc/__init__.py", "", mode=0o755),
            "src/calc/__init__.py",
            "mode_changed",
        ),
        (
            "new executable",
            lambda p: p.write("src/calc/run.sh", "#!/bin/sh\n", mode=0o755),
            "src/calc/run.sh",
            "new_executable",
        ),
        (
            "symlink",
            lambda p: os.symlink("../../tests/test_ops.py", p.path / "src/calc/link.py"),
            "src/calc/link.py",
            "symlink",
        ),
        (
            "binary",
            lambda p: p.write("src/calc/blob.dat", b"ab\x00cd"),
            "src/calc/blob.dat",
            "binary_content",
        ),
        (
            "lfs pointer",
            lambda p: p.write(
                "src/calc/model.bin",
                "version https://git-lfs.github.com/spec/v1\noid sha256:"
                + "0" * 64
                + "\nsize 12\n",
            ),
            "src/calc/model.bin",
            "lfs_pointer",
        ),
        (
            "not utf-8",
            lambda p: p.write("src/calc/latin.py", "x = 'caf\xe9'\n".encode("latin-1")),
            "src/calc/latin.py",
            "not_utf8",
        ),
    ],
)
def test_structural_findings_block(project, capsys, name, action, path, code):
    head = _structural(project, action)
    exit_code, doc, _ = adjudicate(capsys, project, head)
    assert exit_code == 1, name
    assert code in finding_codes(doc, path), name
    assert doc["verification"]["replayed"] is False


def test_rename_with_deletions_allowed_is_judged_as_deletion_plus_addition(project, capsys):
    project.set_policy(allow_deletions=True, allow=["src/**"])
    project.fix()
    project.git("mv", "src/calc/__init__.py", "src/calc/__init___.py")
    project.write("src/calc/__init__.py", "")
    project.git("mv", "README.md", "src/README.md")
    code, doc, _ = adjudicate(capsys, project, project.commit("rename"))
    # README.md left the scope: the deletion side is out of scope even though deletions are allowed
    assert code == 1
    assert finding_codes(doc, "README.md") == {"out_of_scope"}
    assert finding_codes(doc, "src/README.md") == set()


def test_gitlink_blocks(project, capsys):
    project.set_policy(allow=["**"])
    project.fix()
    sha = project.base
    project.git("update-index", "--add", "--cacheinfo", f"160000,{sha},src/vendored")
    project.git("commit", "-q", "-m", "submodule")
    code, doc, _ = adjudicate(capsys, project)
    assert code == 1
    assert "gitlink" in finding_codes(doc, "src/vendored")


# --- scope ---
@pytest.mark.parametrize(
    ("allow", "path", "in_scope"),
    [
        (["src/**/*.py"], "src/calc/extra.py", True),
        (["src/**/*.py"], "src/calc/data.txt", False),
        (["src"], "src/calc/data.txt", True),
        (["src/"], "src/calc/data.txt", True),
        (["src"], "srcx/data.txt", False),
        (["src/"], "lib/src/data.txt", False),
        ([], "src/calc/data.txt", False),
    ],
)
def test_scope(project, capsys, allow, path, in_scope):
    project.set_policy(allow=allow)
    project.write(path, "x = 1\n")
    project.write("README.md", "always out of scope: no replay needed to judge the path\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("scope"))
    assert code == 1
    assert ("out_of_scope" in finding_codes(doc, path)) is (not in_scope)


def test_empty_allow_never_passes(project, capsys):
    project.set_policy(allow=None)
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1
    assert finding_codes(doc, "src/calc/ops.py") == {"out_of_scope"}


# --- regression ---
def test_regression_holding_and_the_pass_summary(project, capsys, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    project.set_policy(regression=REGRESSION)
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 0, doc["reasons"]
    reg = doc["verification"]["regression"]
    assert reg["base"]["tests"]["passed"] >= 1 and reg["head"]["exit_code"] == 0
    text = summary.read_text()
    assert "| command at head |" in text
    assert "2 passed" in text
    assert "| regression at head |" in text


def test_regression_broken(project, capsys):
    project.set_policy(regression=REGRESSION)
    project.write("src/calc/ops.py", OPS_FIXED.replace("return a * b", "return a ** b"))
    code, doc, _ = adjudicate(capsys, project, project.commit("fix add, break mul"))
    assert code == 1
    assert codes(doc) >= {"regression_failed"}
    assert any("test_mul" in r["message"] for r in doc["reasons"])


# --- bad input ---
def test_base_without_head_is_a_usage_error(project, capsys):
    assert main(["ci", "--mode", "adjudicate", "--base", "HEAD"]) == 2
    assert "--head" in capsys.readouterr().err


def test_grade_mode_without_revisions_is_a_usage_error(capsys, monkeypatch):
    # Grade mode itself is tested in tests/test_grade.py.
    monkeypatch.delenv("GITHUB_EVENT_NAME", raising=False)
    monkeypatch.delenv("GITHUB_EVENT_PATH", raising=False)
    assert main(["ci", "--mode", "grade"]) == 2
    assert "grade mode: no --base/--head given" in capsys.readouterr().err


def test_option_looking_revision_is_refused(project, capsys):
    code, doc, _ = run_ci(
        capsys, "--repo", str(project.path), "--base=--output=/tmp/x", "--head", "HEAD"
    )
    assert code == 1 and codes(doc) == {"bad_revision"}


def test_unresolvable_revision(project, capsys):
    code, doc, _ = run_ci(capsys, "--repo", str(project.path), "--base", "0" * 40, "--head", "HEAD")
    assert code == 1 and codes(doc) == {"unresolvable_revision"}
    assert "fetch-depth" in doc["reasons"][0]["message"]


def test_not_a_repository(tmp_path, capsys):
    code, doc, _ = run_ci(capsys, "--repo", str(tmp_path), "--base", "a", "--head", "b")
    assert code == 1 and codes(doc) == {"not_a_repository"}


def test_policy_missing_at_base(project, capsys):
    project.remove(".runcap/mission.yaml")
    project.base = project.commit("no policy")
    project.fix()
    # a policy in the working tree (even committed at head) does not count
    project.write(".runcap/mission.yaml", "version: v1\n")
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1 and codes(doc) == {"policy_missing"}


def test_policy_invalid_at_base(project, capsys):
    project.write(
        ".runcap/mission.yaml",
        "version: v1\nmission: {name: x}\nbudget: {mission_hard_limit_usd: 5}\n"
        "verification: {command: x, timeout_seconds: ten}\n",
    )
    project.base = project.commit("broken policy")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1 and codes(doc) == {"policy_invalid"}
    assert any("timeout_seconds" in r["message"] for r in doc["reasons"])
    assert len(doc["policy"]["hash"]) == 64


def test_empty_change(project, capsys):
    code, doc, _ = adjudicate(capsys, project, project.base)
    assert code == 1 and codes(doc) == {"empty_change"}


# --- events ---
def _event(tmp_path, monkeypatch, name, payload):
    path = tmp_path / "event.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    monkeypatch.setenv("GITHUB_EVENT_NAME", name)
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(path))


def test_pull_request_event(project, capsys, tmp_path, monkeypatch):
    project.fix()
    head = project.commit("fix")  # replayed: the event path ends in a real PASS
    _event(
        tmp_path,
        monkeypatch,
        "pull_request",
        {"pull_request": {"base": {"sha": project.base}, "head": {"sha": head}}},
    )
    code, doc, _ = run_ci(capsys, "--repo", str(project.path))
    assert code == 0 and doc["head"] == head


def test_merge_group_event(project, capsys, tmp_path, monkeypatch):
    project.write("README.md", "out of scope\n")
    head = project.commit("readme")
    _event(
        tmp_path,
        monkeypatch,
        "merge_group",
        {"merge_group": {"base_sha": project.base.upper(), "head_sha": head}},
    )
    code, doc, _ = run_ci(capsys, "--repo", str(project.path))
    assert code == 1 and codes(doc) == {"out_of_scope", "replay_skipped"}
    assert doc["base"] == project.base and doc["head"] == head


@pytest.mark.parametrize(
    ("name", "payload", "code", "needle"),
    [
        ("pull_request_target", {}, "untrusted_event", "pull_request_target"),
        ("push", {"before": "a" * 40, "after": "b" * 40}, "untrusted_event", "push"),
        ("workflow_run", {}, "untrusted_event", "workflow_run"),
        ("issue_comment", {}, "untrusted_event", "issue_comment"),
        ("", {}, "bad_event", "GITHUB_EVENT_NAME"),
        ("pull_request", "{not json", "bad_event", "not valid JSON"),
        ("pull_request", {"pull_request": {"base": {}}}, "bad_event", "pull_request.base.sha"),
        (
            "pull_request",
            {"pull_request": {"base": {"sha": "abc123"}, "head": {"sha": "0" * 40}}},
            "bad_event",
            "full hexadecimal",
        ),
        (
            "merge_group",
            {"merge_group": {"base_sha": "main", "head_sha": "HEAD"}},
            "bad_event",
            "full hexadecimal",
        ),
        ("pull_request", [1, 2], "bad_event", "pull_request.base.sha"),
    ],
)
def test_event_rules(project, capsys, tmp_path, monkeypatch, name, payload, code, needle):
    _event(tmp_path, monkeypatch, name, payload)
    exit_code, doc, _ = run_ci(capsys, "--repo", str(project.path))
    assert exit_code == 1
    assert codes(doc) == {code}
    assert needle in doc["reasons"][0]["message"]


def test_unreadable_event_file(project, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_EVENT_NAME", "pull_request")
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(tmp_path / "missing.json"))
    code, doc, _ = run_ci(capsys, "--repo", str(project.path))
    assert code == 1 and codes(doc) == {"bad_event"}
    assert "missing.json" in doc["reasons"][0]["message"]


def test_event_shas_that_do_not_resolve(project, capsys, tmp_path, monkeypatch):
    _event(
        tmp_path,
        monkeypatch,
        "pull_request",
        {"pull_request": {"base": {"sha": "1" * 40}, "head": {"sha": "2" * 40}}},
    )
    code, doc, _ = run_ci(capsys, "--repo", str(project.path))
    assert code == 1 and codes(doc) == {"unresolvable_revision"}


def test_no_revisions_and_no_event(project, capsys):
    code, doc, _ = run_ci(capsys, "--repo", str(project.path))
    assert code == 1 and codes(doc) == {"no_revisions"}


# --- outputs ---
def test_json_mode_prints_exactly_one_document(project):
    project.fix()
    head = project.commit("fix")
    env = dict(os.environ, GITHUB_ACTIONS="true")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cage",
            "ci",
            "--mode",
            "adjudicate",
            "--json",
            "--repo",
            str(project.path),
            "--base",
            project.base,
            "--head",
            head,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["verdict"] == "PASS"
    assert "Traceback" not in done.stderr


def test_text_mode_reasons_first_and_next_step(project, capsys):
    project.fix()
    project.write("README.md", "x\n")
    head = project.commit("fix + readme")
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
    lines = out.splitlines()
    assert lines[0].startswith("BLOCKED:")
    assert lines[1] == "reasons:"
    assert "out_of_scope" in lines[2]
    assert lines[-1].startswith("next:")


def test_github_outputs_summary_and_annotations(project, capsys, tmp_path, monkeypatch):
    output = tmp_path / "out.txt"
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    project.fix()
    project.write("docs/<img src=x onerror=alert(1)>|`x`.md", "x\n")
    head = project.commit("fix + odd path")
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
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    policy_hash = hashlib.sha256(
        subprocess.run(
            ["git", "-C", str(project.path), "show", f"{project.base}:.runcap/mission.yaml"],
            capture_output=True,
            check=True,
        ).stdout
    ).hexdigest()
    assert outputs == {
        "verdict": "BLOCKED",
        "policy-hash": policy_hash,
        "verification-status": "UNVERIFIED",
    }
    text = summary.read_text()
    assert "cage: BLOCKED" in text and "out_of_scope" in text
    assert "<img" not in text and "`x`" not in text and "|`" not in text
    annotations = [line for line in out.splitlines() if line.startswith("::error ")]
    assert 1 <= len(annotations) <= 10
    assert annotations[0].startswith("::error file=docs/")


def test_symlinked_policy_at_base_counts_as_missing(project, capsys):
    project.write("policy.yaml", (project.path / ".runcap/mission.yaml").read_text())
    project.remove(".runcap/mission.yaml")
    (project.path / ".runcap").mkdir(exist_ok=True)
    (project.path / ".runcap/mission.yaml").symlink_to("../policy.yaml")
    project.base = project.commit("symlinked policy")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("fix"))
    assert code == 1 and codes(doc) == {"policy_missing"}
    assert "not a regular file (mode 120000)" in doc["reasons"][0]["message"]


def test_collection_error_at_base_then_every_head_test_passes(project, capsys):
    project.write("src/calc/ops.py", "def mul(a, b):\n    return a * b\n")  # no add: ImportError
    project.base = project.commit("add is missing")
    project.fix()
    code, doc, _ = adjudicate(capsys, project, project.commit("add add"))
    assert code == 0, doc["reasons"]
    base_tests = doc["verification"]["base"]["command"]["tests"]
    assert base_tests["error"] >= 1 and base_tests["passed"] == 0
    assert doc["verification"]["status"] == "VERIFIED_STRONG"
