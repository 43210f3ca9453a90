"""Path rules: the built-in protected set, policy globs (allow, protect), receipts, and the
files a verify command names.

Globs are gitwildmatch (the ``.gitignore`` language) as pathspec implements it. cage takes
each pattern's regular expression from pathspec and compiles it once, combined, so that
classifying thousands of paths costs one regex search per path in the common case.

Matching is case-sensitive, as git is: ``Conftest.py`` is not ``conftest.py``. On a
case-insensitive checkout (macOS, Windows) a tool may still load such a file; cage replays
on Linux in CI, and docs/protected-paths.md says so.
"""

from __future__ import annotations

import functools
import posixpath
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from cage.errors import PolicyError


@dataclass(frozen=True)
class ProtectedRule:
    """One row of the built-in protected set: a stable name, its globs, and why."""

    name: str
    patterns: tuple[str, ...]
    why: str


# The built-in protected set (DESIGN.md, "Classifying the change"). Patterns match at any
# depth: a pattern without a slash matches a file or directory name anywhere, and
# directory rules are written ``**/<dir>/**``. Keep docs/protected-paths.md in step (a test
# checks every rule name appears there).
PROTECTED_RULES: tuple[ProtectedRule, ...] = (
    # -- cage and the repository's own trust configuration ----------------------------------
    ProtectedRule(
        "runcap",
        ("**/.runcap/**",),
        "the mission policy and everything under .runcap/ (receipts excepted) decide what "
        "the gate checks",
    ),
    ProtectedRule(
        "github",
        ("**/.github/**",),
        "workflows, actions and repository settings run with CI credentials and decide "
        "which checks exist; includes .github/copilot-instructions.md",
    ),
    ProtectedRule(
        "codeowners",
        ("CODEOWNERS",),
        "decides who must review a change, wherever the file lives",
    ),
    ProtectedRule(
        "git_metadata",
        (".gitattributes", ".gitmodules", ".lfsconfig"),
        "attributes select filters and diff drivers; submodules and LFS settings pull in "
        "content from elsewhere",
    ),
    ProtectedRule(
        "other_ci_config",
        (
            ".gitlab-ci.yml",
            "**/.circleci/**",
            "**/.buildkite/**",
            "azure-pipelines.yml",
            "Jenkinsfile",
            ".travis.yml",
            "bitbucket-pipelines.yml",
            ".woodpecker.yml",
            "**/.woodpecker/**",
        ),
        "other CI systems' pipelines decide which checks run and hold credentials",
    ),
    # -- tests ------------------------------------------------------------------------------
    ProtectedRule(
        "test_directories",
        (
            "**/tests/**",
            "**/test/**",
            "**/__tests__/**",
            "**/spec/**",
            "**/testdata/**",
            "**/__snapshots__/**",
            "**/__mocks__/**",
        ),
        "tests, fixtures, snapshots and mocks are the verifier: editing them can make any "
        "code pass (spec/ is RSpec's test directory, testdata/ Go's fixtures)",
    ),
    ProtectedRule(
        "python_test_files",
        ("test_*.py", "*_test.py", "tests.py", "test.py", "conftest.py", "runtests.py"),
        "pytest and unittest collect these; conftest.py runs inside the test process",
    ),
    ProtectedRule(
        "js_test_files",
        ("*.test.*", "*.spec.*"),
        "Jest, Vitest, Mocha and Jasmine test files",
    ),
    ProtectedRule(
        "other_test_files",
        (
            "*_test.*",
            "*_spec.*",
            "*Test.java",
            "*Tests.java",
            "*IT.java",
            "*Test.kt",
            "*Tests.kt",
            "*Test.cs",
            "*Tests.cs",
        ),
        "Go, Ruby, C/C++, JVM and .NET test files by naming convention",
    ),
    ProtectedRule(
        "test_framework_shadows",
        (
            "pytest.py",
            "py.py",
            "**/pytest/**",
            "**/_pytest/**",
            "pluggy.py",
            "**/pluggy/**",
            "unittest.py",
            "**/unittest/**",
            "**/node_modules/**",
            "**/site-packages/**",
        ),
        "a module with the test framework's name, or committed dependencies, can shadow the "
        "real framework and report anything",
    ),
    # -- harness and interpreter start-up -----------------------------------------------------
    ProtectedRule(
        "python_startup_hooks",
        ("sitecustomize.py", "usercustomize.py", "*.pth"),
        "the interpreter runs these at start-up, before and around every test",
    ),
    ProtectedRule(
        "python_test_config",
        (
            "pytest.ini",
            ".pytest.ini",
            "pytest.toml",
            ".pytest.toml",
            "tox.ini",
            "setup.cfg",
            "noxfile.py",
            ".coveragerc",
        ),
        "configure the test run: options, plugins, paths, what is collected or skipped",
    ),
    ProtectedRule(
        "js_test_config",
        (
            "jest.config.*",
            "jest.setup.*",
            "vitest.config.*",
            "vitest.workspace.*",
            "vite.config.*",
            "karma.conf.*",
            ".mocharc*",
            "playwright.config.*",
            "cypress.config.*",
            "babel.config.*",
            ".babelrc*",
            "tsconfig*.json",
            "jsconfig.json",
        ),
        "configure the JavaScript test run, or compile the code under test (tsconfig "
        "decides what tsc checks)",
    ),
    ProtectedRule(
        "other_test_config",
        (".rspec", "phpunit.xml", "phpunit.xml.dist", ".env", ".env.*", ".envrc"),
        "RSpec and PHPUnit options; dotenv files and direnv scripts that tests load",
    ),
    ProtectedRule(
        "lint_config",
        (
            "ruff.toml",
            ".ruff.toml",
            "mypy.ini",
            ".mypy.ini",
            ".flake8",
            ".pylintrc",
            "pylintrc",
            ".eslintrc*",
            "eslint.config.*",
            ".golangci.*",
            "clippy.toml",
            ".clippy.toml",
            ".rubocop.yml",
        ),
        "when the verify command is a linter or type checker, its configuration is the verifier",
    ),
    ProtectedRule(
        "dev_hooks",
        (
            ".pre-commit-config.yaml",
            ".pre-commit-hooks.yaml",
            "**/.husky/**",
            "**/.githooks/**",
            "lefthook.yml",
            ".lefthook.yml",
        ),
        "hooks run code on developer machines and in CI",
    ),
    # -- build and dependency manifests, lockfiles ---------------------------------------------
    ProtectedRule(
        "python_manifests",
        (
            "pyproject.toml",
            "setup.py",
            "requirements*.txt",
            "**/requirements/**",
            "constraints*.txt",
            "Pipfile*",
            "poetry.lock",
            "uv.lock",
            "uv.toml",
            "pdm.lock",
            "pylock.toml",
            "pylock.*.toml",
            "environment.yml",
            "environment.yaml",
            "pixi.toml",
            "pixi.lock",
            "hatch.toml",
            ".python-version",
        ),
        "decide what is installed and run: build backends, dependencies, plugins, "
        "the interpreter, tool configuration in pyproject.toml",
    ),
    ProtectedRule(
        "node_manifests",
        (
            "package.json",
            "package-lock.json",
            "npm-shrinkwrap.json",
            "yarn.lock",
            "pnpm-lock.yaml",
            "pnpm-workspace.yaml",
            ".pnpmfile.cjs",
            ".npmrc",
            ".yarnrc*",
            "**/.yarn/**",
            "bun.lockb",
            "bun.lock",
            "bunfig.toml",
            "deno.json",
            "deno.jsonc",
            "deno.lock",
            ".nvmrc",
            ".node-version",
        ),
        "npm scripts and install hooks run code; lockfiles and registries decide what is installed",
    ),
    ProtectedRule(
        "rust_manifests",
        (
            "Cargo.toml",
            "Cargo.lock",
            "build.rs",
            "rust-toolchain",
            "rust-toolchain.toml",
            "**/.cargo/**",
        ),
        "build scripts run at build time; .cargo/config can replace the test runner",
    ),
    ProtectedRule(
        "go_manifests",
        ("go.mod", "go.sum", "go.work", "go.work.sum"),
        "module versions and replace directives decide what code is built",
    ),
    ProtectedRule(
        "ruby_manifests",
        ("Gemfile*", "*.gemspec", "Rakefile", "rakefile", "gems.rb", "gems.locked"),
        "Bundler files and Rake tasks decide what is installed and run",
    ),
    ProtectedRule(
        "jvm_manifests",
        (
            "pom.xml",
            "build.gradle*",
            "settings.gradle*",
            "gradle.properties",
            "gradlew",
            "gradlew.bat",
            "**/gradle/wrapper/**",
            "libs.versions.toml",
            "mvnw",
            "mvnw.cmd",
            "**/.mvn/**",
            "build.sbt",
        ),
        "Maven, Gradle and sbt builds and wrappers run code and choose dependencies",
    ),
    ProtectedRule(
        "dotnet_manifests",
        (
            "*.csproj",
            "*.fsproj",
            "*.vbproj",
            "*.sln",
            "Directory.Build.props",
            "Directory.Build.targets",
            "Directory.Packages.props",
            "NuGet.Config",
            "nuget.config",
            "global.json",
            "packages.lock.json",
        ),
        "MSBuild files run targets and choose packages",
    ),
    ProtectedRule(
        "other_manifests",
        (
            "composer.json",
            "composer.lock",
            "mix.exs",
            "mix.lock",
            "Package.swift",
            "Package.resolved",
            "pubspec.yaml",
            "pubspec.lock",
            "*.cabal",
            "cabal.project",
            "stack.yaml",
            "flake.nix",
            "flake.lock",
            "shell.nix",
            "devbox.json",
            ".tool-versions",
            "mise.toml",
            ".mise.toml",
        ),
        "PHP, Elixir, Swift, Dart, Haskell and Nix manifests; tool-version managers",
    ),
    ProtectedRule(
        "build_scripts",
        (
            "Makefile",
            "makefile",
            "GNUmakefile",
            "*.mk",
            "CMakeLists.txt",
            "*.cmake",
            "meson.build",
            "BUILD",
            "BUILD.bazel",
            "WORKSPACE",
            "WORKSPACE.bazel",
            "MODULE.bazel",
            "*.bzl",
            ".bazelrc",
            ".bazelversion",
            "Justfile",
            "justfile",
            "Taskfile.yml",
            "Taskfile.yaml",
        ),
        "verify commands are often make or task targets: the recipe is the verifier",
    ),
    ProtectedRule(
        "containers",
        (
            "Dockerfile*",
            "Containerfile*",
            "*.dockerfile",
            "docker-compose*",
            "compose.yaml",
            "compose.yml",
            ".dockerignore",
            "**/.devcontainer/**",
        ),
        "container builds decide the environment the tests run in",
    ),
    # -- agent instructions -------------------------------------------------------------------
    ProtectedRule(
        "agent_instructions",
        (
            "AGENTS.md",
            "CLAUDE.md",
            "CLAUDE.local.md",
            "GEMINI.md",
            ".mcp.json",
            "**/.cursor/**",
            ".cursorrules",
            "**/.claude/**",
            ".windsurfrules",
            "**/.windsurf/**",
            ".clinerules",
            "**/.clinerules/**",
            "**/.codex/**",
            "**/.gemini/**",
            "**/.junie/**",
            ".aider*",
            "**/.vscode/mcp.json",
        ),
        "instructions and tool configuration for the next agent run: an agent must not "
        "rewrite its own rules",
    ),
)

# A receipt: .runcap/outcomes/<id>/receipt.json, one id segment of safe characters that
# cannot be "." or ".." (it starts with a letter or digit).
_RECEIPT_RE = re.compile(r"\.runcap/outcomes/[A-Za-z0-9][A-Za-z0-9._-]*/receipt\.json")

_NAMED_GROUP = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


def _pattern_regex(pattern: str) -> tuple[str | None, bool | None]:
    """(regex, include) for one gitwildmatch pattern; regex None for blanks and comments."""
    try:
        from pathspec.patterns.gitignore.basic import GitIgnoreBasicPattern as Pattern
    except ImportError:  # pathspec < 1.0
        from pathspec.patterns.gitwildmatch import GitWildMatchPattern as Pattern
    try:
        regex, include = Pattern.pattern_to_regex(pattern)
    except Exception as exc:  # pathspec raises its own error type for malformed globs
        raise PolicyError(f"invalid glob pattern {pattern!r}: {exc}") from exc
    if regex is None:
        return None, None
    # Drop named groups so that many patterns can share one combined expression.
    return _NAMED_GROUP.sub("(?:", regex), bool(include)


_GLOB_CHARS = frozenset("*?[\\")

# A combined expression, then each member with its rule index (to name the match).
_Globs = tuple[re.Pattern[str], tuple[tuple[re.Pattern[str], int], ...]]


@dataclass(frozen=True)
class _BuiltinIndex:
    """The built-in set split by shape, so most questions are set lookups.

    A pattern without a slash is a *name*: it matches any path component (as in
    ``.gitignore``, a directory of that name covers everything under it). ``**/<x>/**`` is a
    *directory* name: it matches any component but the last. Anything else is matched
    against the whole path. Literal names go in dictionaries; globs become one combined
    regular expression per shape (translated by pathspec). Each maps to the index of its
    rule, and the first rule of the table wins.
    """

    literal_names: dict[str, int]
    literal_dirs: dict[str, int]
    glob_names: _Globs | None
    glob_dirs: _Globs | None
    whole_paths: tuple[tuple[re.Pattern[str], int], ...]


def _combine(items: list[tuple[str, int]]) -> _Globs | None:
    if not items:
        return None
    combined = re.compile("|".join(f"(?:{regex})" for regex, _ in items))
    return combined, tuple((re.compile(regex), index) for regex, index in items)


@functools.lru_cache(maxsize=1)
def _builtin_index() -> _BuiltinIndex:
    literal_names: dict[str, int] = {}
    literal_dirs: dict[str, int] = {}
    glob_names: list[tuple[str, int]] = []
    glob_dirs: list[tuple[str, int]] = []
    whole: list[tuple[re.Pattern[str], int]] = []
    for index, rule in enumerate(PROTECTED_RULES):
        for pattern in rule.patterns:
            if pattern.startswith("**/") and pattern.endswith("/**") and "/" not in pattern[3:-3]:
                core, literals, globs = pattern[3:-3], literal_dirs, glob_dirs
            elif "/" not in pattern:
                core, literals, globs = pattern, literal_names, glob_names
            else:
                regex, include = _pattern_regex(pattern)
                if regex is None or not include:
                    raise ValueError(f"built-in pattern {pattern!r} must be a positive glob")
                whole.append((re.compile(regex), index))
                continue
            if _GLOB_CHARS.isdisjoint(core):
                literals.setdefault(core, index)
            else:
                # Anchored, the regex of "/<core>" matches one whole component.
                regex, include = _pattern_regex("/" + core)
                if regex is None or not include:
                    raise ValueError(f"built-in pattern {pattern!r} must be a positive glob")
                globs.append((regex, index))
    return _BuiltinIndex(
        literal_names, literal_dirs, _combine(glob_names), _combine(glob_dirs), tuple(whole)
    )


def _glob_hits(globs: _Globs | None, parts: Sequence[str]) -> list[int]:
    if globs is None:
        return []
    combined, singles = globs
    hits = []
    for part in parts:
        if combined.match(part):
            hits.extend(index for regex, index in singles if regex.match(part))
    return hits


def builtin_rule(path: str) -> ProtectedRule | None:
    """The first built-in protected rule that matches ``path`` (receipts included)."""
    index = _builtin_index()
    parts = path.split("/")
    dirs = parts[:-1]
    hits = [index.literal_names[p] for p in parts if p in index.literal_names]
    hits += [index.literal_dirs[p] for p in dirs if p in index.literal_dirs]
    hits += _glob_hits(index.glob_names, parts)
    hits += _glob_hits(index.glob_dirs, dirs)
    hits += [i for regex, i in index.whole_paths if regex.match(path)]
    return PROTECTED_RULES[min(hits)] if hits else None


def anchor(pattern: str) -> str:
    """A policy glob anchored at the repository root (as if it began with ``/``)."""
    negate = pattern.startswith("!")
    body = pattern[1:] if negate else pattern
    while body.startswith("./"):  # "./src/" is how many people write "the top-level src"
        body = body[2:]
    if body and not body.startswith("/") and not body.startswith("#"):
        body = "/" + body
    return ("!" if negate else "") + body


@functools.lru_cache(maxsize=64)
def _anchored_matchers(patterns: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str], bool], ...]:
    """(pattern, regex, include) per policy pattern, anchored, blanks and comments dropped."""
    out = []
    for pattern in patterns:
        regex, include = _pattern_regex(anchor(pattern.strip()))
        if regex is not None:
            out.append((pattern, re.compile(regex), bool(include)))
    return tuple(out)


def _last_match(path: str, patterns: Sequence[str]) -> str | None:
    """The policy pattern that decides ``path`` (last match wins), if it includes it."""
    for pattern, regex, include in reversed(_anchored_matchers(tuple(patterns))):
        if regex.match(path):
            return pattern if include else None
    return None


def in_scope(path: str, allow: Sequence[str]) -> bool:
    """Whether ``allow`` (root-anchored gitwildmatch globs) admits ``path``.

    ``src`` and ``src/`` mean everything under the top-level ``src`` (not ``srcx/``, not
    ``lib/src/``); ``src/**/*.py`` means Python files under it; an empty ``allow`` admits
    nothing. A pattern starting with ``!`` takes paths back out; the last pattern that
    matches decides (so ``["src/", "!src/secret/"]`` keeps ``src/secret/`` out of scope).
    Receipts are not special here: the caller exempts them (see :func:`is_receipt_path`).
    """
    if not allow:
        return False
    return _last_match(path, allow) is not None


def protected_reason(path: str, extra_protect: Sequence[str] = ()) -> str | None:
    """Why ``path`` belongs to the verifier: a built-in rule name, or ``policy protect: <p>``.

    Built-in rules match at any depth; ``extra_protect`` patterns are root-anchored like
    ``allow`` (a ``!`` pattern can only take back what an earlier protect pattern added,
    never a built-in rule). Receipt paths are evidence, not code: always None.
    """
    if is_receipt_path(path):
        return None
    rule = builtin_rule(path)
    if rule is not None:
        return rule.name
    if extra_protect:
        pattern = _last_match(path, extra_protect)
        if pattern is not None:
            return f"policy protect: {pattern}"
    return None


def is_receipt_path(path: str) -> bool:
    """True for exactly ``.runcap/outcomes/<id>/receipt.json`` with one safe id segment."""
    return _RECEIPT_RE.fullmatch(path) is not None


def _split_command(command: str) -> list[str]:
    """Shell words of ``command`` (operators split off); never raises."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: a plain whitespace split still names the files
        return command.split()


def _normalise(word: str) -> str | None:
    """A repository-relative path from a shell word, or None (absolute, escaping, empty)."""
    if not word or "\0" in word or word.startswith(("/", "~")):
        return None
    while word.startswith("./"):
        word = word[2:]
    if not word:
        return None
    norm = posixpath.normpath(word)
    if norm in (".", "..") or norm.startswith("../") or norm.startswith("/"):
        return None
    return norm


def _module_files(module: str) -> set[str]:
    """Files ``python -m <module>`` may run: the module, its package ``__init__``s."""
    if not module or not all(part.isidentifier() for part in module.split(".")):
        return set()
    parts = module.split(".")
    base = "/".join(parts)
    found = {f"{base}.py", f"{base}/__main__.py", f"{base}/__init__.py"}
    found |= {"/".join(parts[:i]) + "/__init__.py" for i in range(1, len(parts))}
    return found | {f"src/{f}" for f in found}


def command_file_candidates(command: str) -> set[str]:
    """Repository-relative paths a shell command may name as files.

    Each shell word counts, and so do the value of ``NAME=value`` and ``--option=value``,
    the path part of a pytest node id (``tests/test_x.py::test_y``), and the module files of
    ``python -m pkg.mod``. Leading ``./`` is dropped and paths are normalised; absolute paths
    and paths leaving the repository are dropped. Directories and names that are not files
    are the caller's to filter (``Repo.existing_files`` at base). Globs are kept as words;
    :func:`command_file_globs` picks them out for matching.
    """
    found: set[str] = set()
    words = _split_command(command)
    for index, word in enumerate(words):
        pieces = {word}
        if "=" in word:
            pieces.add(word.split("=", 1)[1])
        for piece in list(pieces):
            if "::" in piece:
                pieces.add(piece.split("::", 1)[0])
        if word.startswith("-") or not word.strip("&|;<>()"):
            pieces.discard(word)  # an option or a shell operator itself names no file
        for piece in pieces:
            path = _normalise(piece)
            if path is not None:
                found.add(path)
        if word == "-m" and index + 1 < len(words):
            found |= _module_files(words[index + 1])
        elif word.startswith("-m") and len(word) > 2 and not word.startswith("--"):
            found |= _module_files(word[2:])
    return found


def rules_table_markdown() -> str:
    """The built-in protected set as the Markdown table in docs/protected-paths.md."""
    lines = ["| rule | patterns (any depth) | why |", "|---|---|---|"]
    for rule in PROTECTED_RULES:
        patterns = ", ".join(f"`{p}`" for p in rule.patterns)
        why = rule.why.replace("|", "\\|")
        lines.append(f"| `{rule.name}` | {patterns} | {why} |")
    return "\n".join(lines) + "\n"


def command_file_globs(command: str) -> list[str]:
    """The candidates of :func:`command_file_candidates` that a shell would expand as globs.

    A command such as ``python checks/*.py`` names files through a glob, which no exact
    lookup finds. Match changed paths against these with :func:`in_scope` (root-anchored
    gitwildmatch: ``*`` stays within one directory, as in the shell; it also matches dot
    files, which errs on the side of protecting).
    """
    return sorted(c for c in command_file_candidates(command) if not _GLOB_CHARS.isdisjoint(c))
