"""cage.policy: loading, validation messages, normalisation and hashing, from real files."""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from pathlib import Path

import jsonschema
import pytest

from cage.errors import PolicyError
from cage.policy import (
    MAX_DEPTH,
    POLICY_PATH,
    Budget,
    Mission,
    Policy,
    Verification,
    hash_policy,
    load_policy,
    load_policy_file,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policies" / "runcap-v1.yaml"

MINIMAL = """\
version: v1
mission:
  name: Fix add
budget:
  mission_hard_limit_usd: 5
verification:
  command: python -m pytest -q
"""

FULL = """\
version: v1
identity: {project: calc, team: core, owner: alice, environment: ci}
mission:
  name: Fix add
  task_class: bugfix
  description: add() drops the carry
  issue: "123"
budget:
  mission_hard_limit_usd: 5
  max_llm_calls: 200
  max_runtime_minutes: 30
  warn_at_usd: 4
  warn_at_tokens: 2000000
verification:
  command: "python -m pytest -q tests/test_ops.py"
  regression: "python -m pytest -q"
  setup: "python -m pip install -e ."
  timeout_seconds: 600
  guard: strict
  allow: ["src/**"]
  protect: ["fixtures/**"]
  allow_deletions: true
  evidence: junit
spend_evidence: required
"""


def write(tmp_path: Path, text: str | bytes, name: str = "mission.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def problems_of(tmp_path: Path, text: str | bytes) -> list[str]:
    """Load a policy written to a real file and return its problem lines (must fail)."""
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert info.value.message == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(tmp_path: Path, text: str | bytes) -> str:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    return problems[0]


def with_line(base: str, section: str, line: str) -> str:
    """MINIMAL with ``line`` added as the first entry of ``section`` ("" = top level)."""
    if not section:
        return base + line + "\n"
    return base.replace(f"{section}:\n", f"{section}:\n  {line}\n", 1)


# --------------------------------------------------------------------------- valid policies


def test_minimal_policy_fills_every_default(tmp_path):
    path = write(tmp_path, MINIMAL)
    policy = load_policy_file(path)
    assert policy == Policy(
        version="v1",
        mission=Mission(name="Fix add"),
        budget=Budget(mission_hard_limit_usd=5.0),
        verification=Verification(command="python -m pytest -q"),
        identity={},
        spend_evidence="optional",
        source=str(path),
        hash=hashlib.sha256(MINIMAL.encode()).hexdigest(),
    )
    v = policy.verification
    assert (v.timeout_seconds, v.guard, v.evidence, v.allow, v.protect, v.allow_deletions) == (
        900,
        "strict",
        "auto",
        (),
        (),
        False,
    )


def test_full_policy_reads_every_key(tmp_path):
    policy = load_policy_file(write(tmp_path, FULL))
    assert policy.identity == {
        "project": "calc",
        "team": "core",
        "owner": "alice",
        "environment": "ci",
    }
    assert policy.mission == Mission("Fix add", "bugfix", "add() drops the carry", "123")
    assert policy.budget == Budget(5.0, 200, 30.0, 4.0, 2000000)
    assert policy.verification == Verification(
        command="python -m pytest -q tests/test_ops.py",
        regression="python -m pytest -q",
        setup="python -m pip install -e .",
        timeout_seconds=600.0,
        guard="strict",
        allow=("src/**",),
        protect=("fixtures/**",),
        allow_deletions=True,
        evidence="junit",
    )
    assert policy.spend_evidence == "required"


def test_to_dict_is_json_ready_and_complete(tmp_path):
    data = load_policy_file(write(tmp_path, MINIMAL)).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert list(data) == [
        "version",
        "identity",
        "mission",
        "budget",
        "verification",
        "spend_evidence",
    ]
    assert data["verification"] == {
        "command": "python -m pytest -q",
        "regression": None,
        "setup": None,
        "timeout_seconds": 900,
        "guard": "strict",
        "allow": [],
        "protect": [],
        "allow_deletions": False,
        "evidence": "auto",
    }
    assert data["budget"]["max_llm_calls"] is None
    assert data["spend_evidence"] == "optional"


def test_runcap_v1_example_checks_ok():
    policy = load_policy_file(EXAMPLE)
    assert policy.verification.guard == "strict"
    assert policy.verification.allow and policy.verification.protect
    assert policy.budget.max_llm_calls == 300
    assert policy.budget.max_runtime_minutes == 45
    assert policy.mission.issue == "482"


def test_source_defaults_to_policy_path():
    assert POLICY_PATH == ".runcap/mission.yaml"
    assert load_policy(MINIMAL.encode()).source == POLICY_PATH


def test_policy_path_constant_matches_command_module():
    from cage.commands import policy as command

    assert command.POLICY_PATH == POLICY_PATH


def test_schema_is_valid_package_data():
    from importlib import resources

    schema = json.loads(resources.files("cage").joinpath("policy.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)


# --------------------------------------------------------------------------- hash


def test_hash_is_sha256_of_exact_bytes(tmp_path):
    data = MINIMAL.encode()
    assert hash_policy(data) == hashlib.sha256(data).hexdigest()
    assert load_policy(data).hash == hash_policy(data)
    # A comment changes the bytes, so it changes the hash, though the policy is the same.
    commented = b"# note\n" + data
    assert load_policy(commented).hash != load_policy(data).hash
    assert load_policy(commented).to_dict() == load_policy(data).to_dict()
    assert hash_policy(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_hash_covers_a_byte_order_mark(tmp_path):
    data = b"\xef\xbb\xbf" + MINIMAL.encode()
    policy = load_policy_file(write(tmp_path, data))
    assert policy.mission.name == "Fix add"
    assert policy.hash == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- error format


def test_error_names_file_line_column_and_key_path(tmp_path):
    text = FULL.replace("timeout_seconds: 600", "timeout_seconds: ten")
    line = one_problem(tmp_path, text)
    number = text.splitlines().index("  timeout_seconds: ten") + 1
    assert line == (
        f"{tmp_path / 'mission.yaml'}:{number}:3: "
        "verification.timeout_seconds: 'ten' is not a number"
    )


def test_source_is_named_as_given():
    text = with_line(MINIMAL, "verification", "timeout_seconds: ten")
    with pytest.raises(PolicyError) as info:
        load_policy(text.encode())
    assert info.value.problems == [
        ".runcap/mission.yaml:7:3: verification.timeout_seconds: 'ten' is not a number"
    ]
    with pytest.raises(PolicyError) as info:
        load_policy(text.encode(), "base:.runcap/mission.yaml")
    assert info.value.problems[0].startswith("base:.runcap/mission.yaml:7:3: ")


def test_all_problems_are_reported_sorted_by_line(tmp_path):
    text = textwrap.dedent(
        """\
        spend_evidence: maybe
        version: v1
        mission:
          name: ""
        budget:
          mission_hard_limit_usd: -1
        verification:
          command: x
          guard: lenient
        """
    )
    problems = problems_of(tmp_path, text)
    src = tmp_path / "mission.yaml"
    assert problems == [
        f"{src}:1:1: spend_evidence: 'maybe' is not one of off, optional, required",
        f"{src}:4:3: mission.name: must not be empty",
        f"{src}:6:3: budget.mission_hard_limit_usd: must be greater than 0, got -1",
        f"{src}:9:3: verification.guard: 'lenient' is not one of strict, off",
    ]


# --------------------------------------------------------------------------- unknown keys


def test_misspelt_section_is_an_error_with_a_suggestion(tmp_path):
    text = MINIMAL.replace("verification:", "verfication:")
    problems = problems_of(tmp_path, text)
    src = tmp_path / "mission.yaml"
    assert f"{src}:6:1: verfication: unknown key; did you mean 'verification'?" in problems
    assert f"{src}:1:1: verification is required" in problems


@pytest.mark.parametrize(
    ("section", "line", "expected"),
    [
        ("mission", "nmae: x", "mission.nmae: unknown key; did you mean 'name'?"),
        (
            "budget",
            "max_llm_call: 3",
            "budget.max_llm_call: unknown key; did you mean 'max_llm_calls'?",
        ),
        (
            "verification",
            "timeout: 3",
            "verification.timeout: unknown key; allowed under verification: ",
        ),
        (
            "",
            "colour: blue",
            "colour: unknown key; allowed at the top level: budget, identity, mission",
        ),
    ],
)
def test_unknown_key_at_every_level(tmp_path, section, line, expected):
    problem = one_problem(tmp_path, with_line(MINIMAL, section, line))
    assert expected in problem


def test_unknown_identity_key(tmp_path):
    problem = one_problem(tmp_path, MINIMAL + "identity: {project: a, tema: b}\n")
    assert problem.endswith(":8:24: identity.tema: unknown key; did you mean 'team'?")


# --------------------------------------------------------------------------- duplicates


def test_duplicate_section_is_an_error_at_the_second_occurrence(tmp_path):
    text = MINIMAL + "verification:\n  command: 'true'\n"
    problem = one_problem(tmp_path, text)
    assert problem == (
        f"{tmp_path / 'mission.yaml'}:8:1: verification: duplicate key (first defined at line 6); "
        "keep only one"
    )


def test_duplicate_nested_key_is_an_error(tmp_path):
    text = with_line(MINIMAL, "budget", "mission_hard_limit_usd: 500")
    problem = one_problem(tmp_path, text)
    assert problem.endswith(
        ":6:3: budget.mission_hard_limit_usd: duplicate key (first defined at line 5); "
        "keep only one"
    )


def test_duplicate_keys_in_flow_mapping_and_quoted_spelling(tmp_path):
    text = MINIMAL + 'identity: {project: a, "project": b}\n'
    problem = one_problem(tmp_path, text)
    assert problem.endswith(
        ":8:24: identity.project: duplicate key (first defined at line 8); keep only one"
    )


# --------------------------------------------------------------------------- required + version


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  name: Fix add\n", "  task_class: x\n", ":2:1: mission.name is required"),
        (
            "  mission_hard_limit_usd: 5\n",
            "  max_llm_calls: 3\n",
            ":4:1: budget.mission_hard_limit_usd is required",
        ),
        (
            "  command: python -m pytest -q\n",
            "  guard: strict\n",
            ":6:1: verification.command is required",
        ),
        ("version: v1\n", "", ":1:1: version is required (write `version: v1`)"),
        ("mission:\n  name: Fix add\n", "", ":1:1: mission is required"),
    ],
)
def test_required_keys(tmp_path, old, new, expected):
    assert old in MINIMAL
    problem = one_problem(tmp_path, MINIMAL.replace(old, new))
    assert problem.endswith(expected)


@pytest.mark.parametrize(("written", "shown"), [("v2", "'v2'"), ("1", "1"), ("'1.0'", "'1.0'")])
def test_unsupported_version_names_the_supported_one(tmp_path, written, shown):
    # Only the version is reported: the other keys would be judged by the wrong rules.
    text = MINIMAL.replace("version: v1", f"version: {written}") + "newkey: 1\n"
    problem = one_problem(tmp_path, text)
    assert problem.endswith(
        f":1:1: version: {shown} is not supported; this cage reads version v1 (write `version: v1`)"
    )


@pytest.mark.parametrize("value", ['""', "'   '"])
def test_command_must_not_be_empty(tmp_path, value):
    problem = one_problem(
        tmp_path, MINIMAL.replace("command: python -m pytest -q", f"command: {value}")
    )
    assert problem.endswith(":7:3: verification.command: must not be empty")


def test_empty_value_is_reported_as_empty(tmp_path):
    problem = one_problem(tmp_path, MINIMAL.replace("command: python -m pytest -q", "command:"))
    assert problem.endswith(":7:3: verification.command: is empty; expected a string")


def test_empty_section(tmp_path):
    problem = one_problem(
        tmp_path, MINIMAL.replace("budget:\n  mission_hard_limit_usd: 5\n", "budget:\n")
    )
    assert problem.endswith(":4:1: budget: is empty; expected a mapping")


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be greater than 0, got 0"),
        ("-3", "must be greater than 0, got -3"),
        ("true", "true is a boolean, not a number (YAML reads yes/no/on/off as booleans)"),
        ("yes", "true is a boolean, not a number (YAML reads yes/no/on/off as booleans)"),
        ("'5'", "'5' is not a number"),
        (".nan", ".nan is not a finite number"),
        (".inf", ".inf is not a finite number"),
        ("-.inf", "-.inf is not a finite number"),
        ("[5]", "[5] is not a number"),
    ],
)
def test_hard_limit_must_be_a_positive_finite_number(tmp_path, value, message):
    text = MINIMAL.replace("mission_hard_limit_usd: 5", f"mission_hard_limit_usd: {value}")
    problem = one_problem(tmp_path, text)
    assert problem.endswith(f":5:3: budget.mission_hard_limit_usd: {message}")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_llm_calls", "2.5", "2.5 is not a whole number"),
        ("max_llm_calls", "0", "must be greater than 0, got 0"),
        (
            "max_llm_calls",
            "false",
            "false is a boolean, not a whole number (YAML reads yes/no/on/off as booleans)",
        ),
        ("warn_at_tokens", "ten", "'ten' is not a whole number"),
        ("warn_at_usd", "0", "must be greater than 0, got 0"),
        ("max_runtime_minutes", "0", "must be greater than 0, got 0"),
        ("max_runtime_minutes", "'30m'", "'30m' is not a number"),
    ],
)
def test_budget_limits(tmp_path, key, value, message):
    problem = one_problem(tmp_path, with_line(MINIMAL, "budget", f"{key}: {value}"))
    assert problem.endswith(f":5:3: budget.{key}: {message}")


def test_fractional_runtime_minutes_are_kept():
    text = with_line(MINIMAL, "budget", "max_runtime_minutes: 0.5")
    assert load_policy(text.encode()).budget.max_runtime_minutes * 60 == 30


def test_integral_float_llm_calls_become_int():
    policy = load_policy(with_line(MINIMAL, "budget", "max_llm_calls: 20.0").encode())
    assert policy.budget.max_llm_calls == 20
    assert isinstance(policy.budget.max_llm_calls, int)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be greater than 0, got 0"),
        ("-1", "must be greater than 0, got -1"),
        ("ten", "'ten' is not a number"),
        (".inf", ".inf is not a finite number"),
        ("on", "true is a boolean, not a number (YAML reads yes/no/on/off as booleans)"),
    ],
)
def test_timeout_seconds(tmp_path, value, message):
    problem = one_problem(tmp_path, with_line(MINIMAL, "verification", f"timeout_seconds: {value}"))
    assert problem.endswith(f":7:3: verification.timeout_seconds: {message}")


def test_timeout_seconds_accepts_fractions():
    policy = load_policy(with_line(MINIMAL, "verification", "timeout_seconds: 0.25").encode())
    assert policy.verification.timeout_seconds == 0.25
    assert math.isfinite(policy.verification.timeout_seconds)


# --------------------------------------------------------------------------- off handling


@pytest.mark.parametrize("written", ["off", "Off", "OFF", "false", "'off'", '"off"'])
def test_guard_off_in_every_spelling(written):
    policy = load_policy(with_line(MINIMAL, "verification", f"guard: {written}").encode())
    assert policy.verification.guard == "off"


@pytest.mark.parametrize("written", ["off", "false", "'off'"])
def test_spend_evidence_off_in_every_spelling(written):
    policy = load_policy((MINIMAL + f"spend_evidence: {written}\n").encode())
    assert policy.spend_evidence == "off"
    assert policy.to_dict()["spend_evidence"] == "off"


@pytest.mark.parametrize(
    ("written", "shown"), [("on", "true"), ("'none'", "'none'"), ("Strict", "'Strict'")]
)
def test_guard_other_values_are_errors(tmp_path, written, shown):
    problem = one_problem(tmp_path, with_line(MINIMAL, "verification", f"guard: {written}"))
    assert problem.endswith(f":7:3: verification.guard: {shown} is not one of strict, off")


def test_off_is_not_accepted_for_evidence(tmp_path):
    problem = one_problem(tmp_path, with_line(MINIMAL, "verification", "evidence: off"))
    assert problem.endswith(
        ":7:3: verification.evidence: false is not one of auto, junit, exit-code"
    )


@pytest.mark.parametrize("value", ["auto", "junit", "exit-code"])
def test_evidence_values(value):
    policy = load_policy(with_line(MINIMAL, "verification", f"evidence: {value}").encode())
    assert policy.verification.evidence == value


def test_spend_evidence_bad_value(tmp_path):
    problem = one_problem(tmp_path, MINIMAL + "spend_evidence: true\n")
    assert problem.endswith(":8:1: spend_evidence: true is not one of off, optional, required")


# --------------------------------------------------------------------------- allow / protect


def test_allow_as_single_string_is_a_clear_error(tmp_path):
    problem = one_problem(tmp_path, with_line(MINIMAL, "verification", "allow: src/**"))
    assert problem.endswith(
        ":7:3: verification.allow: 'src/**' is a single string; write a list, "
        "e.g. [\"src/**\"] or one '- src/**' item per line"
    )


def test_protect_as_single_string_is_a_clear_error(tmp_path):
    problem = one_problem(tmp_path, with_line(MINIMAL, "verification", "protect: fixtures"))
    assert "verification.protect: 'fixtures' is a single string; write a list" in problem


def test_pattern_items_are_checked_one_by_one(tmp_path):
    text = (
        MINIMAL + "  allow:\n    - src/**\n    - ''\n    - 3\n    -\n    - '!src/x'\n    - '#c'\n"
    )
    problems = problems_of(tmp_path, text)
    assert [p.split(": ", 1)[0].rsplit(":", 2)[1:] for p in problems] == [
        ["10", "7"],
        ["11", "7"],
        ["12", "6"],
        ["13", "7"],
        ["14", "7"],
    ]
    assert [p.split(": ", 1)[1] for p in problems] == [
        "verification.allow[1]: must not be empty",
        "verification.allow[2]: 3 is not a string",
        "verification.allow[3]: is empty; expected a string",
        "verification.allow[4]: '!src/x' is a negation; list only the paths you mean "
        "(negations are not supported)",
        "verification.allow[5]: '#c' starts with '#', "
        "which makes it a comment that matches nothing",
    ]


def test_invalid_gitignore_pattern(tmp_path):
    problem = one_problem(tmp_path, with_line(MINIMAL, "verification", "protect: ['\\']"))
    assert "verification.protect[0]: '\\\\' is not a valid pattern" in problem


def test_allow_missing_or_empty_gives_empty_tuple():
    assert load_policy(MINIMAL.encode()).verification.allow == ()
    policy = load_policy(with_line(MINIMAL, "verification", "allow: []").encode())
    assert policy.verification.allow == ()


def test_allow_deletions_must_be_a_boolean(tmp_path):
    problem = one_problem(tmp_path, with_line(MINIMAL, "verification", "allow_deletions: 'no'"))
    assert problem.endswith(":7:3: verification.allow_deletions: 'no' is not true or false")


# --------------------------------------------------------------------------- identity / mission


def test_issue_may_be_a_number_and_is_stored_as_text():
    policy = load_policy(with_line(MINIMAL, "mission", "issue: 42").encode())
    assert policy.mission.issue == "42"
    assert policy.to_dict()["mission"]["issue"] == "42"


def test_issue_must_not_be_a_boolean(tmp_path):
    problem = one_problem(tmp_path, with_line(MINIMAL, "mission", "issue: true"))
    assert problem.endswith(
        ":3:3: mission.issue: true is a boolean, not a string or a whole number "
        "(YAML reads yes/no/on/off as booleans)"
    )


def test_identity_values_are_strings(tmp_path):
    problem = one_problem(tmp_path, MINIMAL + "identity:\n  project: calc\n  team: [a]\n")
    assert problem.endswith(':10:3: identity.team: ["a"] is not a string')


def test_mission_name_that_looks_like_a_date_stays_text():
    policy = load_policy(MINIMAL.replace("name: Fix add", "name: 2026-11-23").encode())
    assert policy.mission.name == "2026-11-23"


def test_mission_name_must_be_text(tmp_path):
    problem = one_problem(tmp_path, MINIMAL.replace("name: Fix add", "name: 12"))
    assert problem.endswith(":3:3: mission.name: 12 is not a string")


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("data", [b"", b"   \n\n", b"\t\n  \n", b"# only a comment\n", b"---\n"])
def test_empty_file(tmp_path, data):
    problem = one_problem(tmp_path, data)
    assert problem.startswith(f"{tmp_path / 'mission.yaml'}: the policy is empty")


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (b"- version: v1\n", "found a list"),
        (b"hello\n", "found a single value 'hello'"),
        (b"42\n", "found a single value 42"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path, data, found):
    problem = one_problem(tmp_path, data)
    assert problem == (
        f"{tmp_path / 'mission.yaml'}:1:1: the policy must be a mapping of keys "
        f"(version, mission, budget, verification, ...), {found}"
    )


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    text = MINIMAL.replace("  name: Fix add\n", "  name: Fix add\n   bad: [\n")
    problem = one_problem(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'mission.yaml'}:4:7: invalid YAML: ")
    assert "mapping values are not allowed here" in problem


def test_unclosed_flow_sequence_names_where_it_started(tmp_path):
    problem = one_problem(tmp_path, MINIMAL + "  allow: [src/**\nspend_evidence: off\n")
    assert ":9:15: invalid YAML: " in problem
    assert "started at line 8" in problem


def test_second_document_is_an_error(tmp_path):
    problem = one_problem(tmp_path, MINIMAL + "---\nversion: v1\n")
    assert problem.startswith(f"{tmp_path / 'mission.yaml'}:8:1: invalid YAML: ")
    assert "single document" in problem


def test_binary_file(tmp_path):
    problem = one_problem(tmp_path, b"version: v1\x00\x01\x02")
    assert problem == (
        f"{tmp_path / 'mission.yaml'}: the policy is binary (it contains a NUL byte); "
        "it must be UTF-8 YAML text"
    )


def test_non_utf8_bytes(tmp_path):
    problem = one_problem(tmp_path, MINIMAL.encode().replace(b"Fix add", b"Fix caf\xe9"))
    assert problem == (
        f"{tmp_path / 'mission.yaml'}:3:16: the policy is not valid UTF-8 "
        "(byte 0xe9 at offset 36); save it as UTF-8"
    )


def test_control_character(tmp_path):
    problem = one_problem(tmp_path, MINIMAL.replace("Fix add", "Fix\x07add"))
    assert problem == (
        f"{tmp_path / 'mission.yaml'}:3:12: character U+0007 is not allowed in YAML text; remove it"
    )


def test_file_over_one_mebibyte(tmp_path):
    data = MINIMAL.encode() + b"#" * (1024 * 1024)
    problem = one_problem(tmp_path, data)
    assert problem.startswith(f"{tmp_path / 'mission.yaml'}: the policy is larger than 1 MiB")


def test_file_of_exactly_one_mebibyte_is_read(tmp_path):
    data = MINIMAL.encode() + b"#" * (1024 * 1024 - len(MINIMAL) - 1) + b"\n"
    assert len(data) == 1024 * 1024
    assert load_policy_file(write(tmp_path, data)).mission.name == "Fix add"


def test_alias_bomb_is_refused_before_expansion(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    problem = one_problem(tmp_path, "\n".join(lines) + "\n")
    assert problem.endswith(
        ":1:5: YAML anchor &a0 is not allowed in a mission policy (write the value out in full)"
    )


def test_alias_without_anchor_is_refused(tmp_path):
    problem = one_problem(tmp_path, MINIMAL + "identity: *x\n")
    assert problem.endswith(
        ":8:11: YAML alias *x is not allowed in a mission policy (write the value out in full)"
    )


def test_merge_key_is_refused(tmp_path):
    problems = problems_of(tmp_path, with_line(MINIMAL, "budget", "<<: {max_llm_calls: 3}"))
    assert problems == [
        f"{tmp_path / 'mission.yaml'}:5:3: budget.<<: YAML merge keys are not allowed in a "
        "mission policy (write the keys out in full)"
    ]


@pytest.mark.parametrize(
    ("text", "tag", "where"),
    [
        ("!!python/object/apply:os.system ['echo hi']\n", "!!python/object/apply:os.system", "1:1"),
        (
            MINIMAL.replace("name: Fix add", "name: !!python/name:os.system ''"),
            "!!python/name:os.system",
            "3:9",
        ),
        (MINIMAL.replace("name: Fix add", "name: !custom x"), "!custom", "3:9"),
        (MINIMAL.replace("name: Fix add", "name: !!binary aGk="), "!!binary", "3:9"),
        (MINIMAL + "identity: !!set {a, b}\n", "!!set", "8:11"),
    ],
)
def test_tags_are_refused(tmp_path, text, tag, where):
    problem = one_problem(tmp_path, text)
    assert problem == (
        f"{tmp_path / 'mission.yaml'}:{where}: YAML tag {tag} is not allowed in a mission policy "
        "(only text, numbers, true/false, lists and mappings)"
    )


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    problem = one_problem(tmp_path, b"[" * 200_000)
    assert problem.endswith(f"the policy is nested more than {MAX_DEPTH} levels deep")


def test_non_string_keys_are_unknown_keys_not_crashes(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + "1: one\ntrue: yes\n? [a, b]\n: c\n")
    src = tmp_path / "mission.yaml"
    assert problems[0] == f"{src}:8:1: 1: unknown key; allowed at the top level: " + (
        "budget, identity, mission, spend_evidence, verification, version"
    )
    assert problems[1].startswith(f"{src}:9:1: true: unknown key")
    assert problems[2] == f"{src}:10:3: a key must be a plain word, found a sequence"


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy_file(tmp_path / "nope.yaml")
    assert info.value.message == (
        f"{tmp_path / 'nope.yaml'}: no mission policy here; run `cage policy init` to create one"
    )


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy_file(tmp_path)
    assert info.value.message == f"{tmp_path}: is a directory, not a policy file"


def test_top_level_list_after_comments_points_at_the_list(tmp_path):
    problem = one_problem(tmp_path, b"# a policy\n\n- version: v1\n")
    assert problem.startswith(f"{tmp_path / 'mission.yaml'}:3:1: the policy must be a mapping")


def test_missing_top_level_key_points_at_the_first_key(tmp_path):
    problem = one_problem(tmp_path, "# header\n" + MINIMAL.replace("version: v1\n", ""))
    assert problem == f"{tmp_path / 'mission.yaml'}:2:1: version is required (write `version: v1`)"


def test_a_fifo_or_device_as_the_policy_file_never_hangs(tmp_path):
    # A FIFO nobody writes to once blocked open() forever; now it reads as empty.
    import os

    fifo = tmp_path / "mission.yaml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match=r"mission\.yaml: the policy is empty"):
        load_policy_file(fifo)
    with pytest.raises(PolicyError, match="/dev/null: not a regular file"):
        load_policy_file("/dev/null")
