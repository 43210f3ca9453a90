"""`cage policy check|show|init`: validate, print or create `.runcap/mission.yaml`.

Only the standard library and cage.errors are imported at module level (``cage --help``
must stay fast); cage.policy and yaml load inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from cage.errors import CageError, PolicyError, UsageError

# Kept equal to cage.policy.POLICY_PATH (tests check); not imported to keep start-up light.
POLICY_PATH = ".runcap/mission.yaml"

# Top-level folders that hold tests, docs or tooling, never the product code to allow.
_NOT_PRODUCT_DIRS = frozenset(
    {"tests", "test", "testing", "docs", "doc", "examples", "example", "scripts", "bench",
     "benchmarks", "build", "dist", "node_modules", "vendor", "venv", ".venv", "env"}
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure `cage policy check|show|init`."""
    sub = parser.add_subparsers(
        dest="policy_action", metavar="ACTION", required=True, parser_class=type(parser)
    )
    check = sub.add_parser(
        "check",
        help="validate the policy: prints `ok <hash>` or every problem (exit 0 / 1)",
        description="Validate the mission policy and print `ok <sha256>` or every problem.",
    )
    show = sub.add_parser(
        "show",
        help="print the normalised policy (defaults filled in) and its hash",
        description="Print the normalised policy, with every default filled in, and its hash.",
    )
    for command in (check, show):
        command.add_argument(
            "path",
            nargs="?",
            metavar="PATH",
            help=f"policy file (default: {POLICY_PATH} in the current directory or --repo)",
        )
        command.add_argument("--repo", metavar="DIR", help=f"read DIR/{POLICY_PATH}")
        command.add_argument("--json", action="store_true", help="one JSON document on stdout")
    init = sub.add_parser(
        "init",
        help="write a commented starter policy fitted to the repository",
        description=(
            f"Write a commented starter {POLICY_PATH} fitted to the repository: its test "
            "command and the folder of its product code."
        ),
    )
    init.add_argument("--repo", metavar="DIR", help="repository root (default: current directory)")
    init.add_argument("--force", action="store_true", help="overwrite an existing policy")
    init.add_argument("--json", action="store_true", help="one JSON document on stdout")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    actions = {"check": _check, "show": _show, "init": _init}
    return actions[args.policy_action](args)


# --------------------------------------------------------------------------- check / show


def _policy_path(args: argparse.Namespace) -> str:
    """PATH as given, else .runcap/mission.yaml under --repo or the current directory."""
    if args.path and args.repo:
        raise UsageError("give either PATH or --repo, not both")
    if args.path:
        return args.path
    if args.repo:
        return os.path.join(args.repo, POLICY_PATH)
    return POLICY_PATH


def _check(args: argparse.Namespace) -> int:
    from cage.policy import load_policy_file

    path = _policy_path(args)
    try:
        policy = load_policy_file(path)
    except PolicyError as exc:
        if args.json:
            _print_json({"path": path, "ok": False, "hash": None, "problems": exc.problems})
        else:
            for line in exc.problems:
                print(line)
            count = len(exc.problems)
            print(f"cage: {count} problem{'s' if count != 1 else ''} in {path}", file=sys.stderr)
        return 1
    if args.json:
        _print_json({"path": path, "ok": True, "hash": policy.hash, "problems": []})
    else:
        print(f"ok {policy.hash}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from cage.policy import load_policy_file

    path = _policy_path(args)
    policy = load_policy_file(path)  # a PolicyError is printed by the CLI, exit 1
    document = {"path": path, "hash": policy.hash, "policy": policy.to_dict()}
    if args.json:
        _print_json(document)
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100))
    return 0


def _print_json(document: dict) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False))


# --------------------------------------------------------------------------- init


@dataclass(frozen=True)
class _Fit:
    """What `init` learned about the repository."""

    kind: str  # python | node | go | rust | unknown
    command: str
    command_note: str
    allow: tuple[str, ...]
    allow_note: str


def _init(args: argparse.Namespace) -> int:
    from cage.policy import load_policy

    root = Path(args.repo) if args.repo else Path.cwd()
    if not root.is_dir():
        raise UsageError(f"--repo {args.repo}: not a directory")
    if (root / "HEAD").is_file() and (root / "objects").is_dir() and (root / "refs").is_dir():
        # A bare repository (or a .git folder) has no working tree: a policy written here
        # would never be committed.
        raise UsageError(
            f"{args.repo or root}: is a bare git repository (or a .git folder), not a working "
            "tree; run `cage policy init` in a clone of it"
        )
    target = root / POLICY_PATH
    shown = os.path.join(args.repo, POLICY_PATH) if args.repo else POLICY_PATH
    if (target.exists() or target.is_symlink()) and not args.force:
        raise CageError(
            f"{shown} already exists; not overwriting it. Check it with `cage policy check`, "
            "or run `cage policy init --force` to replace it with a starter"
        )
    fit = _fit_repository(root)
    text = _starter_text(fit, _project_name(root))
    policy = load_policy(text.encode("utf-8"), shown)  # never write a policy that fails check
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()  # --force replaces the link itself, never the file it points to
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CageError(f"{shown}: cannot write the policy: {exc.strerror or exc}") from None
    next_step = (
        f"edit mission, budget, verification.command and verification.allow in {shown}, "
        "run `cage policy check`, then commit it: the gate reads the policy from the base commit"
    )
    if args.json:
        _print_json(
            {
                "path": shown,
                "hash": policy.hash,
                "kind": fit.kind,
                "command": fit.command,
                "allow": list(fit.allow),
                "next": next_step,
            }
        )
    else:
        if fit.kind == "unknown":
            print(f"wrote {shown} with a placeholder command that fails until you edit it")
        else:
            print(f"wrote {shown} ({fit.kind} project: `{fit.command}`)")
        if not fit.allow:
            print("note: verification.allow is empty, so no change can PASS until you fill it")
        print(f"next: {next_step}")
    return 0


def _project_name(root: Path) -> str:
    return root.resolve().name or "project"


def _fit_repository(root: Path) -> _Fit:
    """Guess the test command and product folder from the files at the root."""
    if any((root / name).is_file() for name in ("pyproject.toml", "setup.py", "setup.cfg",
                                                "pytest.ini", "tox.ini")):  # fmt: skip
        return _fit_python(root)
    if (root / "package.json").is_file():
        return _fit_node(root)
    if (root / "go.mod").is_file():
        return _Fit(
            "go",
            "go test ./...",
            "go test runs every package; narrow it to the test that shows the bug.",
            ("**/*.go",),
            "Go sources anywhere; *_test.go, go.mod and go.sum stay protected.",
        )
    if (root / "Cargo.toml").is_file():
        return _Fit(
            "rust",
            "cargo test",
            "Narrow it to the test that shows the bug: cargo test NAME.",
            _first_dirs(root, ("src",)) or (),
            "The crate's sources." if (root / "src").is_dir() else _EMPTY_ALLOW_NOTE,
        )
    return _Fit(
        "unknown",
        # Fails loudly until edited: a placeholder must never pass verification.
        "echo 'cage: edit verification.command in .runcap/mission.yaml' >&2; exit 1",
        "PLACEHOLDER: no known project files found. Replace it with the command that runs "
        "the test showing the bug; until then every verification fails.",
        _first_dirs(root, ("src", "lib")) or (),
        "" if _first_dirs(root, ("src", "lib")) else _EMPTY_ALLOW_NOTE,
    )


_EMPTY_ALLOW_NOTE = (
    'EMPTY: list the paths the agent may change, e.g. ["src/**"]. '
    "An empty allow allows nothing, so no change can PASS."
)


def _first_dirs(root: Path, names: tuple[str, ...]) -> tuple[str, ...]:
    for name in names:
        if (root / name).is_dir():
            return (f"{name}/**",)
    return ()


def _fit_python(root: Path) -> _Fit:
    command = "python -m pytest -q"
    note = "Narrow it to the test that shows the bug, e.g. python -m pytest -q tests/test_x.py."
    if (root / "src").is_dir():
        return _Fit("python", command, note, ("src/**",), "The src layout's packages.")
    packages = sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir()
        and not entry.name.startswith(".")
        and entry.name not in _NOT_PRODUCT_DIRS
        and (entry / "__init__.py").is_file()
    )
    if packages:
        return _Fit(
            "python", command, note, tuple(f"{p}/**" for p in packages), "The package folders."
        )
    modules = sorted(
        entry.name
        for entry in root.glob("*.py")
        if entry.is_file()
        and entry.name not in ("setup.py", "conftest.py", "noxfile.py")
        and not entry.name.startswith("test_")
        and not entry.name.endswith("_test.py")
    )
    if modules:
        return _Fit("python", command, note, tuple(modules), "The top-level modules.")
    return _Fit("python", command, note, (), _EMPTY_ALLOW_NOTE)


def _fit_node(root: Path) -> _Fit:
    note = "Runs package.json's test script; narrow it with npm test -- ARGS."
    try:
        manifest = json.loads((root / "package.json").read_text(encoding="utf-8"))
        scripts = manifest.get("scripts") if isinstance(manifest, dict) else None
        test_script = scripts.get("test") if isinstance(scripts, dict) else None
    except (OSError, ValueError):
        test_script = None
    if not isinstance(test_script, str) or "no test specified" in test_script:
        note = (
            "package.json has no real test script yet: add one (npm test fails until then) "
            "or replace this command."
        )
    allow = _first_dirs(root, ("src", "lib"))
    return _Fit(
        "node", "npm test", note, allow, "The package sources." if allow else _EMPTY_ALLOW_NOTE
    )


def _starter_text(fit: _Fit, project: str) -> str:
    """The commented starter policy. Strings are written as JSON, which YAML reads as is."""

    def q(value: str) -> str:
        # A file name that is not UTF-8 (surrogate-escaped) cannot go into UTF-8 YAML as is.
        text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return json.dumps(text, ensure_ascii=False)

    def utf8(value: str) -> bool:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    # A pattern with a replaced character would match nothing: leave such folders out.
    allow = "[" + ", ".join(q(p) for p in fit.allow if utf8(p)) + "]"
    allow_comment = "".join(f"  # {line}\n" for line in textwrap.wrap(fit.allow_note, 84))
    command_comment = "".join(f"  # {line}\n" for line in textwrap.wrap(fit.command_note, 84))
    return f"""\
# Mission policy for cage (runcap v1 compatible). Every key: docs/policy.md.
# The CI gate reads this file from the BASE commit of a pull request, so a change to it
# only takes effect once merged, and a pull request that edits it needs a human.
version: v1
identity:
  project: {q(project)}
mission:
  name: {q("Describe the task given to the agent")}
  task_class: bugfix
budget:
  # Hard cap in US dollars for the LLM calls of one mission.
  mission_hard_limit_usd: 5
  max_llm_calls: 200
  max_runtime_minutes: 30
verification:
  # FAIL_TO_PASS: must fail before the change and pass after it.
{command_comment}  command: {q(fit.command)}
  # PASS_TO_PASS (optional): everything that passed before must still pass.
  # regression: {q(fit.command)}
  timeout_seconds: 900
  # strict: any change to the verifier (tests, harness, manifests, CI, this file)
  # needs a human. off: the verifier is restored from base and the result is weak.
  guard: strict
  # Paths the change may touch, anchored at the repository root; a bare folder
  # means everything under it.
{allow_comment}  allow: {allow}
  # Extra verifier paths to protect, on top of the built-in set.
  protect: []
  allow_deletions: false
  evidence: auto
spend_evidence: optional
"""
