"""cage.pathrules: the built-in protected set, policy globs, receipts, command files."""

from __future__ import annotations

import re
from pathlib import Path

import pathspec
import pytest

from cage.errors import PolicyError
from cage.pathrules import (
    PROTECTED_RULES,
    command_file_candidates,
    command_file_globs,
    in_scope,
    is_receipt_path,
    protected_reason,
    rules_table_markdown,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protected-paths.md"
RULE_NAMES = [rule.name for rule in PROTECTED_RULES]

# Realistic paths per rule: each must be protected by exactly that rule, at top level and
# nested deeper in a monorepo.
EXAMPLES: dict[str, list[str]] = {
    "runcap": [".runcap/mission.yaml", ".runcap/outcomes/x/other.json", ".runcap/hook.py"],
    "github": [".github/workflows/ci.yml", ".github/copilot-instructions.md"],
    "codeowners": ["CODEOWNERS", "docs/CODEOWNERS"],
    "git_metadata": [".gitattributes", ".gitmodules", ".lfsconfig"],
    "other_ci_config": [".gitlab-ci.yml", ".circleci/config.yml", "Jenkinsfile"],
    "test_directories": [
        "tests/test_ops.py",
        "tests/fixtures/data.json",
        "test/helpers.js",
        "__tests__/app.js",
        "spec/models/user_spec_helper.rb",
        "testdata/golden.txt",
        "__snapshots__/app.snap",
        "__mocks__/fs.js",
    ],
    "python_test_files": ["test_ops.py", "ops_test.py", "conftest.py", "tests.py", "runtests.py"],
    "js_test_files": ["app.test.ts", "app.spec.js", "button.test.tsx"],
    "other_test_files": ["ops_test.go", "user_spec.rb", "OpsTest.java", "OpsTests.cs"],
    "test_framework_shadows": [
        "pytest.py",
        "_pytest/runner.py",
        "pytest/__init__.py",
        "unittest.py",
        "node_modules/jest/index.js",
    ],
    "python_startup_hooks": ["sitecustomize.py", "usercustomize.py", "evil.pth"],
    "python_test_config": ["pytest.ini", "tox.ini", "setup.cfg", "noxfile.py", ".coveragerc"],
    "js_test_config": [
        "jest.config.js",
        "vitest.config.ts",
        "karma.conf.js",
        ".mocharc.yml",
        "tsconfig.json",
        "tsconfig.build.json",
        ".babelrc",
    ],
    "other_test_config": [".rspec", "phpunit.xml.dist", ".env", ".env.test", ".envrc"],
    "lint_config": ["ruff.toml", "mypy.ini", ".flake8", ".eslintrc.json", "eslint.config.mjs"],
    "dev_hooks": [".pre-commit-config.yaml", ".husky/pre-commit"],
    "python_manifests": [
        "pyproject.toml",
        "setup.py",
        "requirements.txt",
        "requirements-dev.txt",
        "requirements/base.txt",
        "constraints.txt",
        "Pipfile",
        "Pipfile.lock",
        "poetry.lock",
        "uv.lock",
        "pdm.lock",
    ],
    "node_manifests": [
        "package.json",
        "package-lock.json",
        "npm-shrinkwrap.json",
        "yarn.lock",
        "pnpm-lock.yaml",
        ".npmrc",
        ".yarnrc.yml",
        "bun.lockb",
    ],
    "rust_manifests": ["Cargo.toml", "Cargo.lock", "build.rs", ".cargo/config.toml"],
    "go_manifests": ["go.mod", "go.sum", "go.work"],
    "ruby_manifests": ["Gemfile", "Gemfile.lock", "calc.gemspec", "Rakefile"],
    "jvm_manifests": [
        "pom.xml",
        "build.gradle",
        "build.gradle.kts",
        "settings.gradle.kts",
        "gradlew",
        "gradle/wrapper/gradle-wrapper.properties",
    ],
    "dotnet_manifests": ["Calc.csproj", "Calc.sln", "Directory.Build.props"],
    "other_manifests": ["composer.json", "mix.exs", "Package.swift", "flake.nix"],
    "build_scripts": ["Makefile", "GNUmakefile", "rules.mk", "CMakeLists.txt", "BUILD.bazel"],
    "containers": ["Dockerfile", "Dockerfile.test", "docker-compose.yml", "compose.yaml"],
    "agent_instructions": [
        "AGENTS.md",
        "CLAUDE.md",
        ".mcp.json",
        ".cursor/rules/x.mdc",
        ".cursorrules",
        ".claude/settings.json",
        ".vscode/mcp.json",
    ],
}

# Paths that look like protected ones and are not.
LOOK_ALIKES = [
    "src/contest.py",
    "src/testing_utils.py",
    "latest/x.py",
    "src/latest.py",
    "src/attest.py",
    "src/testimony.py",
    "src/tests_helper.py",
    "src/mytests/x.py",
    "src/testsuite/x.py",
    "docs/testing.md",
    "src/specification.py",
    "src/inspect/x.py",
    "src/conftest_helpers.py",
    "src/requirements.py",
    "src/pyproject.py",
    "src/package_json.py",
    "src/Makefile.py",
    "src/dockerfile_gen.py",
    "src/github_api.py",
    "src/codeowners.py",
    "runcap/x.py",
    ".runcap-notes.md",
    "src/agents.py",
    "src/.environment",
    "src/build.py",
    "src/test_data.go",
    "src/Conftest.py",  # case-sensitive, as git is (documented)
]


def test_rule_names_are_unique_snake_case():
    assert len(set(RULE_NAMES)) == len(RULE_NAMES)
    for rule in PROTECTED_RULES:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", rule.name)
        assert rule.patterns and rule.why


def test_every_rule_has_examples():
    assert set(EXAMPLES) == set(RULE_NAMES)


@pytest.mark.parametrize(
    ("rule", "path"), [(rule, path) for rule, paths in EXAMPLES.items() for path in paths]
)
@pytest.mark.parametrize("prefix", ["", "packages/web/", "a/b/c/"])
def test_rule_matches_at_any_depth(rule, path, prefix):
    assert protected_reason(prefix + path) == rule


def _sample(pattern: str) -> str:
    """A path that the glob matches: stars become 'x', directory globs get a file."""
    if pattern.startswith("**/") and pattern.endswith("/**"):
        return pattern[3:-3] + "/inner.txt"
    return pattern.replace("**/", "").replace("*", "x")


@pytest.mark.parametrize(
    ("rule", "pattern"), [(r.name, p) for r in PROTECTED_RULES for p in r.patterns]
)
def test_every_pattern_fires(rule, pattern):
    sample = _sample(pattern)
    assert protected_reason(sample) == rule
    assert protected_reason("deep/er/" + sample) == rule


@pytest.mark.parametrize("path", LOOK_ALIKES)
def test_look_alikes_are_not_protected(path):
    assert protected_reason(path) is None


def test_index_agrees_with_pathspec():
    """The fast matcher answers exactly as pathspec does over all built-in patterns."""
    try:
        from pathspec.patterns.gitignore.basic import GitIgnoreBasicPattern as Pattern
    except ImportError:  # pathspec < 1.0
        from pathspec.patterns.gitwildmatch import GitWildMatchPattern as Pattern
    spec = pathspec.PathSpec.from_lines(
        Pattern, [p for rule in PROTECTED_RULES for p in rule.patterns]
    )
    corpus = set(LOOK_ALIKES)
    for paths in EXAMPLES.values():
        for path in paths:
            corpus |= {path, "x/" + path, path + "/under", "src/" + path.replace("/", "_")}
    for rule in PROTECTED_RULES:
        for pattern in rule.patterns:
            corpus |= {_sample(pattern), "q/" + _sample(pattern)}
    for path in sorted(corpus):
        if path.startswith(".runcap/outcomes/") and path.endswith("/receipt.json"):
            continue
        assert (protected_reason(path) is not None) == spec.match_file(path), path


# -- receipts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".runcap/outcomes/abc/receipt.json",
        ".runcap/outcomes/20261123T101500Z-3f2a/receipt.json",
        ".runcap/outcomes/run.1_x-y/receipt.json",
    ],
)
def test_receipts(path):
    assert is_receipt_path(path)
    assert protected_reason(path) is None
    assert protected_reason(path, [".runcap/**"]) is None


@pytest.mark.parametrize(
    "path",
    [
        ".runcap/outcomes/x/other.json",
        ".runcap/outcomes/x/y/receipt.json",
        ".runcap/outcomes/../receipt.json",
        ".runcap/outcomes/./receipt.json",
        ".runcap/outcomes/..x/receipt.json",
        ".runcap/outcomes//receipt.json",
        ".runcap/outcomes/receipt.json",
        ".runcap/outcomes/x/receipt.json/more",
        ".runcap/outcomes/x/receipt.jsonx",
        "pkg/.runcap/outcomes/x/receipt.json",
        ".runcap/outcomes/a b/receipt.json",
        ".runcap/outcomes/x\n/receipt.json",
    ],
)
def test_not_receipts_are_protected(path):
    assert not is_receipt_path(path)
    assert protected_reason(path) == "runcap"


# -- policy protect ---------------------------------------------------------------------------


def test_policy_protect_is_anchored_and_named():
    protect = ["fixtures/**", "data/golden.json"]
    assert protected_reason("fixtures/a.json", protect) == "policy protect: fixtures/**"
    assert protected_reason("data/golden.json", protect) == "policy protect: data/golden.json"
    assert protected_reason("src/fixtures/a.json", protect) is None
    assert protected_reason("src/data/golden.json", protect) is None


def test_builtin_rule_wins_and_cannot_be_negated():
    assert protected_reason("tests/x.py", ["tests/**"]) == "test_directories"
    assert protected_reason("tests/x.py", ["!tests/**"]) == "test_directories"


def test_policy_protect_negation_takes_back_earlier_patterns():
    protect = ["fixtures/", "!fixtures/scratch/"]
    assert protected_reason("fixtures/a.json", protect) == "policy protect: fixtures/"
    assert protected_reason("fixtures/scratch/tmp.json", protect) is None


# -- scope ------------------------------------------------------------------------------------


@pytest.mark.parametrize("allow", [["src"], ["src/"], ["/src"], ["src/**"], ["./src/"]])
def test_bare_directory_means_everything_under_it_at_the_root(allow):
    assert in_scope("src/a.py", allow)
    assert in_scope("src/deep/er/b.txt", allow)
    assert not in_scope("srcx/a.py", allow)
    assert not in_scope("lib/src/a.py", allow)
    assert not in_scope("a.py", allow)


def test_glob_allows_only_matching_files_under_the_directory():
    allow = ["src/**/*.py"]
    assert in_scope("src/a.py", allow)
    assert in_scope("src/pkg/b.py", allow)
    assert not in_scope("src/data.json", allow)
    assert not in_scope("lib/src/a.py", allow)
    assert not in_scope("a.py", allow)


def test_top_level_glob_is_anchored():
    assert in_scope("README.md", ["*.md"])
    assert not in_scope("docs/guide.md", ["*.md"])
    assert in_scope("docs/guide.md", ["**/*.md"])


def test_empty_allow_allows_nothing():
    assert not in_scope("src/a.py", [])
    assert not in_scope("src/a.py", ())
    assert not in_scope("src/a.py", ["", "# a comment"])


def test_negation_last_match_wins():
    allow = ["src/", "!src/secret/", "src/secret/ok.py"]
    assert in_scope("src/a.py", allow)
    assert not in_scope("src/secret/key.py", allow)
    assert in_scope("src/secret/ok.py", allow)


def test_odd_paths_in_scope():
    allow = ["src/"]
    for name in ("a file.py", "naïve.py", "new\nline.py", "tab\t.py", "[x].py", "*.py"):
        assert in_scope(f"src/{name}", allow)
        assert not in_scope(name, allow)


def test_literal_brackets_and_escapes_follow_gitwildmatch():
    assert in_scope("src/[id].tsx", ["src/\\[id\\].tsx"])
    assert not in_scope("src/i.tsx", ["src/\\[id\\].tsx"])
    assert in_scope("src/i.tsx", ["src/[id].tsx"])


def test_invalid_glob_is_a_policy_error():
    with pytest.raises(PolicyError, match="invalid glob pattern"):
        in_scope("src/a.py", ["!"])


# -- command files ----------------------------------------------------------------------------


def test_command_words_options_and_node_ids():
    found = command_file_candidates(
        "PYTEST_ADDOPTS=-q CFG=./conf/ci.ini python -m pytest -c pytest.ini "
        "--cov-config=./.coveragerc tests/test_ops.py::TestAdd::test_add ./scripts/../check.sh"
    )
    for path in (
        "conf/ci.ini",
        "pytest.ini",
        ".coveragerc",
        "tests/test_ops.py",
        "check.sh",
        "pytest.py",
        "pytest/__main__.py",
    ):
        assert path in found, path
    assert "-c" not in found and "-m" not in found


def test_command_drops_absolute_and_escaping_paths():
    found = command_file_candidates("python /usr/bin/check.py ../outside.py a/../../b.py ~/x.py")
    assert found.isdisjoint({"/usr/bin/check.py", "../outside.py", "../b.py", "~/x.py"})
    assert "python" in found


def test_command_shell_operators_and_redirections():
    found = command_file_candidates("make check&&./run.sh<input.txt;bash verify.sh|tee out.log")
    assert {"check", "run.sh", "input.txt", "verify.sh", "out.log"} <= found
    assert not any(set(word) <= set("&|;<>") for word in found)


def test_command_quoted_paths():
    found = command_file_candidates("python 'checks/my check.py' \"data/a b.json\"")
    assert {"checks/my check.py", "data/a b.json"} <= found


def test_command_unbalanced_quotes_never_crash():
    found = command_file_candidates('pytest "tests/test_a.py')
    assert "pytest" in found
    assert command_file_candidates("") == set()


def test_command_module_files():
    found = command_file_candidates("python -m tools.verify.run")
    assert {"tools/verify/run.py", "tools/__init__.py", "src/tools/verify/run.py"} <= found


def test_command_globs_match_the_files_a_shell_would_expand():
    globs = command_file_globs("python checks/*.py && ./run_[ab].sh data/?.json tests/x.py")
    assert globs == ["checks/*.py", "data/?.json", "run_[ab].sh"]
    assert in_scope("checks/verify.py", globs)
    assert in_scope("run_a.sh", globs)
    assert in_scope("data/1.json", globs)
    assert not in_scope("checks/deep/verify.py", globs)
    assert not in_scope("src/checks/verify.py", globs)
    assert command_file_globs("pytest -q tests/test_ops.py") == []


# -- the document -----------------------------------------------------------------------------


def test_doc_names_every_rule():
    text = DOC.read_text(encoding="utf-8")
    for name in RULE_NAMES:
        assert f"`{name}`" in text, name


def test_doc_table_is_the_generated_one():
    text = DOC.read_text(encoding="utf-8")
    start = text.index("-->\n", text.index("<!-- BEGIN PROTECTED RULES")) + len("-->\n")
    end = text.index("<!-- END PROTECTED RULES -->")
    assert text[start:end] == rules_table_markdown()
