"""`cage policy check|show|init`, driven through the real CLI entry point."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cage.cli import main
from cage.policy import load_policy_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "policies" / "runcap-v1.yaml"

GOOD = """\
version: v1
mission:
  name: Fix add
budget:
  mission_hard_limit_usd: 5
verification:
  command: python -m pytest -q
  guard: off
"""

BAD = GOOD.replace("mission_hard_limit_usd: 5", "mission_hard_limit_usd: 0").replace(
    "verification:", "verfication:"
)


def put_policy(root: Path, text: str) -> Path:
    path = root / ".runcap" / "mission.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- check


def test_check_default_path_is_relative_to_cwd(tmp_path, monkeypatch, capsys):
    put_policy(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path)
    assert main(["policy", "check"]) == 0
    assert capsys.readouterr().out == f"ok {sha(GOOD)}\n"


def test_check_with_repo_and_with_path(tmp_path, capsys):
    path = put_policy(tmp_path, GOOD)
    assert main(["policy", "check", "--repo", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"ok {sha(GOOD)}\n"
    assert main(["policy", "check", str(path)]) == 0
    assert capsys.readouterr().out == f"ok {sha(GOOD)}\n"


def test_check_path_and_repo_together_is_a_usage_error(tmp_path, capsys):
    path = put_policy(tmp_path, GOOD)
    assert main(["policy", "check", str(path), "--repo", str(tmp_path)]) == 2
    assert "give either PATH or --repo" in capsys.readouterr().err


def test_check_prints_every_problem_and_exits_1(tmp_path, monkeypatch, capsys):
    put_policy(tmp_path, BAD)
    monkeypatch.chdir(tmp_path)
    assert main(["policy", "check"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        ".runcap/mission.yaml:1:1: verification is required",
        ".runcap/mission.yaml:5:3: budget.mission_hard_limit_usd: must be greater than 0, got 0",
        ".runcap/mission.yaml:6:1: verfication: unknown key; did you mean 'verification'?",
    ]
    assert captured.err == "cage: 3 problems in .runcap/mission.yaml\n"


def test_check_json_ok_and_failure(tmp_path, capsys):
    good = put_policy(tmp_path / "good", GOOD)
    assert main(["policy", "check", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "path": str(good),
        "ok": True,
        "hash": sha(GOOD),
        "problems": [],
    }
    bad = put_policy(tmp_path / "bad", BAD)
    assert main(["policy", "check", str(bad), "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False and document["hash"] is None
    assert len(document["problems"]) == 3
    assert document["problems"][0] == f"{bad}:1:1: verification is required"


def test_check_missing_policy_says_how_to_create_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["policy", "check"]) == 1
    assert capsys.readouterr().out == (
        ".runcap/mission.yaml: no mission policy here; run `cage policy init` to create one\n"
    )


def test_check_runcap_v1_example_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "cage", "policy", "check", str(EXAMPLE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == f"ok {hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()}\n"
    assert done.stderr == ""


def test_policy_without_action_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "cage", "policy"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "ACTION" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- show


def test_show_text_is_readable_yaml_with_defaults(tmp_path, capsys):
    path = put_policy(tmp_path, GOOD)
    assert main(["policy", "show", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["path"] == str(path)
    assert shown["hash"] == sha(GOOD)
    assert shown["policy"]["verification"]["guard"] == "off"
    assert shown["policy"]["verification"]["timeout_seconds"] == 900
    assert shown["policy"]["verification"]["evidence"] == "auto"
    assert shown["policy"]["spend_evidence"] == "optional"


def test_show_json_is_one_document(tmp_path, capsys):
    put_policy(tmp_path, GOOD)
    assert main(["policy", "show", "--repo", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document) == {"path", "hash", "policy"}
    assert document["path"] == str(tmp_path / ".runcap" / "mission.yaml")
    assert document["policy"] == load_policy_file(document["path"]).to_dict()
    assert document["policy"]["budget"]["mission_hard_limit_usd"] == 5


def test_show_invalid_policy_exits_1_with_the_problems(tmp_path, capsys):
    path = put_policy(tmp_path, BAD)
    assert main(["policy", "show", str(path), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"cage: {path}:1:1: verification is required\n")


# --------------------------------------------------------------------------- init


def init(root: Path, *extra: str) -> int:
    return main(["policy", "init", "--repo", str(root), *extra])


def written(root: Path):
    return load_policy_file(root / ".runcap" / "mission.yaml")


def test_init_python_src_layout(tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'calc'\n")
    (tmp_path / "src" / "calc").mkdir(parents=True)
    assert init(tmp_path) == 0
    out = capsys.readouterr().out
    target = f"{tmp_path}/.runcap/mission.yaml"
    assert out.splitlines()[0] == f"wrote {target} (python project: `python -m pytest -q`)"
    assert "next: " in out and "cage policy check" in out
    policy = written(tmp_path)
    assert policy.verification.command == "python -m pytest -q"
    assert policy.verification.allow == ("src/**",)
    assert policy.verification.guard == "strict"
    assert policy.identity == {"project": tmp_path.name}
    # The file is commented for a reader.
    text = (tmp_path / ".runcap" / "mission.yaml").read_text()
    assert text.count("\n#") + text.count("\n  #") >= 8
    # And it passes `cage policy check`.
    assert main(["policy", "check", "--repo", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("ok ")


def test_init_python_package_dir(tmp_path):
    (tmp_path / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    for name in ("calc", "tests", "docs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    assert init(tmp_path) == 0
    assert written(tmp_path).verification.allow == ("calc/**",)


def test_init_python_single_module(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "calc.py").write_text("")
    (tmp_path / "test_calc.py").write_text("")
    assert init(tmp_path) == 0
    assert written(tmp_path).verification.allow == ("calc.py",)


def test_init_python_without_product_code_warns_about_empty_allow(tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text("")
    assert init(tmp_path) == 0
    assert written(tmp_path).verification.allow == ()
    assert "verification.allow is empty, so no change can PASS" in capsys.readouterr().out
    assert "An empty allow allows" in (tmp_path / ".runcap" / "mission.yaml").read_text()


def test_init_node(tmp_path):
    (tmp_path / "package.json").write_text(json.dumps({"scripts": {"test": "node --test"}}))
    (tmp_path / "lib").mkdir()
    assert init(tmp_path) == 0
    policy = written(tmp_path)
    assert policy.verification.command == "npm test"
    assert policy.verification.allow == ("lib/**",)
    assert (
        "package.json has no real test script"
        not in (tmp_path / ".runcap" / "mission.yaml").read_text()
    )


def test_init_node_without_test_script_says_so(tmp_path):
    (tmp_path / "package.json").write_text("{not json")
    (tmp_path / "src").mkdir()
    assert init(tmp_path) == 0
    assert written(tmp_path).verification.command == "npm test"
    assert (
        "package.json has no real test script"
        in (tmp_path / ".runcap" / "mission.yaml").read_text()
    )


def test_init_go(tmp_path, capsys):
    (tmp_path / "go.mod").write_text("module example.com/x\n")
    assert init(tmp_path, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["kind"] == "go"
    assert document["command"] == "go test ./..."
    assert document["hash"] == written(tmp_path).hash
    assert written(tmp_path).verification.allow == ("**/*.go",)


def test_init_unknown_project_writes_a_placeholder_that_fails_loudly(tmp_path, capsys):
    assert init(tmp_path) == 0
    assert "placeholder command" in capsys.readouterr().out
    policy = written(tmp_path)
    text = (tmp_path / ".runcap" / "mission.yaml").read_text()
    assert "PLACEHOLDER" in text
    done = subprocess.run(
        policy.verification.command, shell=True, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "edit verification.command" in done.stderr


def test_init_never_overwrites_without_force(tmp_path, capsys):
    path = put_policy(tmp_path, "# mine\n" + GOOD)
    assert init(tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cage: {tmp_path}/.runcap/mission.yaml already exists; not overwriting")
    assert "--force" in err
    assert path.read_text() == "# mine\n" + GOOD
    assert init(tmp_path, "--force") == 0
    assert path.read_text() != "# mine\n" + GOOD
    assert written(tmp_path).verification.guard == "strict"


def test_init_force_replaces_a_symlink_not_its_target(tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text(GOOD)
    repo = tmp_path / "repo"
    (repo / ".runcap").mkdir(parents=True)
    (repo / ".runcap" / "mission.yaml").symlink_to(outside)
    assert init(repo) == 1
    assert init(repo, "--force") == 0
    assert outside.read_text() == GOOD
    assert not (repo / ".runcap" / "mission.yaml").is_symlink()


def test_init_in_cwd_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["policy", "init"]) == 0
    assert capsys.readouterr().out.startswith("wrote .runcap/mission.yaml ")
    assert (tmp_path / ".runcap" / "mission.yaml").is_file()


def test_init_repo_must_be_a_directory(tmp_path, capsys):
    assert init(tmp_path / "missing") == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("marker", ["pyproject.toml", "package.json", "go.mod", "Cargo.toml"])
def test_every_starter_passes_check(tmp_path, marker, capsys):
    (tmp_path / marker).write_text("{}" if marker == "package.json" else "")
    (tmp_path / "src").mkdir()
    assert init(tmp_path) == 0
    capsys.readouterr()
    assert main(["policy", "check", "--repo", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("ok ")


def test_init_in_a_folder_whose_name_is_not_utf8(tmp_path):
    # The project name and a package folder come from file names, which need not be UTF-8.
    import os

    bad = os.fsdecode(b"proj\xff")
    root = tmp_path / bad
    root.mkdir()
    (root / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    for name in ("calc", os.fsdecode(b"pk\xffg")):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text("")
    assert init(root) == 0
    policy = written(root)
    assert policy.identity["project"] == "proj\ufffd"
    assert policy.verification.allow == ("calc/**",)


def test_init_refuses_a_bare_repository(tmp_path, capsys):
    # It used to write bare.git/.runcap/mission.yaml, where no commit would ever pick it up.
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    assert init(bare) == 2
    assert "bare git repository" in capsys.readouterr().err
    assert not (bare / ".runcap").exists()
