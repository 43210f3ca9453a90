"""Load, validate and hash the mission policy (``.runcap/mission.yaml``).

The policy is read from bytes (the adjudicator takes them from the base commit's blob), so
nothing here touches git or the working tree except :func:`load_policy_file`. Validation is
JSON Schema (``policy.schema.json``, shipped as package data) run over what a strict YAML
loader built; every problem is reported at once, each with the file, line, column and key
path, in words a user can act on.

Decisions (also in docs/policy.md):

- duplicate keys are errors: PyYAML silently keeps the last one, which would let a second
  ``verification:`` block replace the first unseen;
- anchors, aliases and merge keys (``&a``, ``*a``, ``<<``) are refused: a policy never needs
  them, and refusing them rules out alias bombs without a size heuristic;
- nesting deeper than :data:`MAX_DEPTH` is refused (PyYAML composes recursively);
- YAML 1.1 reads an unquoted ``off`` as ``false``: for ``guard`` and ``spend_evidence``
  ``false`` means ``"off"`` so runcap policies keep working;
- timestamps stay strings (``name: 2026-01-01`` is a name, not a date).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cage.errors import PolicyError

POLICY_PATH = ".runcap/mission.yaml"
SUPPORTED_VERSION = "v1"
MAX_POLICY_BYTES = 1024 * 1024
MAX_DEPTH = 32

# Keys whose runcap value ``off`` arrives from YAML 1.1 as ``False``.
_OFF_KEYS: tuple[tuple[str, ...], ...] = (("verification", "guard"), ("spend_evidence",))

# JSON Schema type names as a user reads them.
_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "number": "a number",
    "integer": "a whole number",
    "boolean": "true or false",
    "null": "empty",
}

_Path = tuple[Any, ...]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Mission:
    """What the agent is asked to do."""

    name: str
    task_class: str | None = None
    description: str | None = None
    issue: str | None = None


@dataclass(frozen=True)
class Budget:
    """Spend and run-time limits of one mission."""

    mission_hard_limit_usd: float
    max_llm_calls: int | None = None
    max_runtime_minutes: float | None = None
    warn_at_usd: float | None = None
    warn_at_tokens: int | None = None


@dataclass(frozen=True)
class Verification:
    """How the change is verified and which paths it may touch."""

    command: str
    regression: str | None = None
    setup: str | None = None
    timeout_seconds: float = 900
    guard: str = "strict"  # "strict" | "off"
    allow: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()
    allow_deletions: bool = False
    evidence: str = "auto"  # "auto" | "junit" | "exit-code"


@dataclass(frozen=True)
class Policy:
    """A validated mission policy, with the file it came from and the hash of its bytes."""

    version: str
    mission: Mission
    budget: Budget
    verification: Verification
    identity: dict[str, str] = field(default_factory=dict)
    spend_evidence: str = "optional"  # "off" | "optional" | "required"
    source: str = POLICY_PATH
    hash: str = ""

    def to_dict(self) -> dict:
        """The normalised policy (defaults filled in) as JSON-ready data, in file order."""
        v = self.verification
        return {
            "version": self.version,
            "identity": dict(self.identity),
            "mission": {
                "name": self.mission.name,
                "task_class": self.mission.task_class,
                "description": self.mission.description,
                "issue": self.mission.issue,
            },
            "budget": {
                "mission_hard_limit_usd": self.budget.mission_hard_limit_usd,
                "max_llm_calls": self.budget.max_llm_calls,
                "max_runtime_minutes": self.budget.max_runtime_minutes,
                "warn_at_usd": self.budget.warn_at_usd,
                "warn_at_tokens": self.budget.warn_at_tokens,
            },
            "verification": {
                "command": v.command,
                "regression": v.regression,
                "setup": v.setup,
                "timeout_seconds": v.timeout_seconds,
                "guard": v.guard,
                "allow": list(v.allow),
                "protect": list(v.protect),
                "allow_deletions": v.allow_deletions,
                "evidence": v.evidence,
            },
            "spend_evidence": self.spend_evidence,
        }


# --------------------------------------------------------------------------- public API


def hash_policy(data: bytes) -> str:
    """SHA-256 of the exact policy bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def load_policy_file(path: str | os.PathLike) -> Policy:
    """Read a policy file and load it; errors name ``path`` as given."""
    from cage.fileio import NotRegularFile, read_no_wait

    source = os.fspath(path)
    try:
        # Read one byte past the limit: enough to know it is too big, never more.
        data = read_no_wait(path, MAX_POLICY_BYTES + 1)
    except NotRegularFile:
        raise PolicyError(
            f"{source}: not a regular file (a socket or device); "
            "give the path of the policy YAML file"
        ) from None
    except FileNotFoundError:
        raise PolicyError(
            f"{source}: no mission policy here; run `cage policy init` to create one"
        ) from None
    except IsADirectoryError:
        raise PolicyError(f"{source}: is a directory, not a policy file") from None
    except OSError as exc:
        raise PolicyError(f"{source}: cannot read the policy: {exc.strerror or exc}") from None
    return load_policy(data, source)


def load_policy(data: bytes, source: str = POLICY_PATH) -> Policy:
    """Parse, validate and normalise policy bytes; raise PolicyError listing every problem."""
    text = _decode(data, source)
    document, marks, problems = _parse_yaml(text, source)
    if document is None:
        raise PolicyError(
            f"{source}: the policy is empty; it needs at least version, mission, budget and "
            "verification (run `cage policy init` for a starter)"
        )
    if not isinstance(document, dict):
        found = "a list" if isinstance(document, list) else f"a single value {_show(document)}"
        problem = _Problem(
            marks.get(()),
            "the policy must be a mapping of keys (version, mission, budget, verification, "
            f"...), found {found}",
        )
        raise _policy_error(source, [problem])
    _normalise_off(document)
    version = document.get("version", SUPPORTED_VERSION)
    if version != SUPPORTED_VERSION:
        # Other checks would judge a different format by v1 rules: only say what matters.
        problem = _Problem(
            _mark_of(marks, ("version",)),
            f"version: {_show(version)} is not supported; this cage reads version "
            f"{SUPPORTED_VERSION} (write `version: {SUPPORTED_VERSION}`)",
        )
        raise _policy_error(source, [problem])
    problems.extend(_schema_problems(document, marks))
    problems.extend(_pattern_problems(document, marks))
    if problems:
        raise _policy_error(source, problems)
    return _build(document, source, hash_policy(data))


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class _Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass(frozen=True)
class _Problem:
    mark: _Mark | None
    text: str


def _policy_error(source: str, problems: list[_Problem]) -> PolicyError:
    """One PolicyError whose lines are sorted by position, duplicates dropped."""
    ordered = sorted(
        set(problems),
        key=lambda p: (p.mark.line, p.mark.column, p.text) if p.mark else (0, 0, p.text),
    )
    lines = [
        f"{source}:{p.mark.line}:{p.mark.column}: {p.text}" if p.mark else f"{source}: {p.text}"
        for p in ordered
    ]
    return PolicyError("\n".join(lines), lines)


def _mark_of(marks: dict[_Path, _Mark], path: _Path) -> _Mark | None:
    """The mark of ``path``, or of its closest ancestor that has one."""
    path = tuple(path)
    while path not in marks and path:
        path = path[:-1]
    return marks.get(path)


def _dotted(path: _Path) -> str:
    """``("verification", "allow", 0)`` -> ``verification.allow[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _show(value: Any) -> str:
    """A value as a user wrote it, short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (str, bytes)):
        text = repr(value)
    elif isinstance(value, float) and not math.isfinite(value):
        text = {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except ValueError:  # circular; cannot happen without aliases, but never crash
            text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- bytes -> text


def _decode(data: bytes, source: str) -> str:
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(
            f"{source}: the policy is larger than 1 MiB ({MAX_POLICY_BYTES} bytes); "
            "a mission policy is a few dozen lines"
        )
    if b"\x00" in data:
        raise PolicyError(
            f"{source}: the policy is binary (it contains a NUL byte); it must be UTF-8 YAML text"
        )
    try:
        # utf-8-sig: an editor's byte order mark is not a reason to refuse the file.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line, column = before.count(b"\n") + 1, len(before) - (before.rfind(b"\n") + 1) + 1
        raise PolicyError(
            f"{source}:{line}:{column}: the policy is not valid UTF-8 "
            f"(byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None


# --------------------------------------------------------------------------- YAML


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[_Path, _Mark], list[_Problem]]:
    """YAML text -> (document, key path -> mark, problems found while loading).

    Syntax errors raise at once (nothing after them can be trusted); duplicate and merge
    keys are collected so they are reported with the schema problems.
    """
    import yaml

    if not text.strip():
        return None, {}, []
    try:
        loader = _policy_loader_class()(text)
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        marks = _index_marks(node, (), loader.node_paths, {})
        document = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise PolicyError(_yaml_error_line(exc, source)) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow in a file
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        raise PolicyError(
            f"{source}:{line}:{column}: character U+{exc.character:04X} is not allowed in "
            "YAML text; remove it"
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    return document, marks, loader.problems


def _yaml_error_line(exc: Any, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = exc.problem or "invalid YAML"
    if getattr(exc, "_cage_own", False):
        return f"{where}: {problem}"
    detail = f"invalid YAML: {problem}"
    if exc.context:
        ctx_line = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        detail += f" ({exc.context}{ctx_line})"
    return f"{where}: {detail}"


def _index_marks(
    node: Any, path: _Path, node_paths: dict[int, _Path], marks: dict[_Path, _Mark]
) -> dict[_Path, _Mark]:
    """Record the position of every key path, and each node's path for the constructor.

    A mapping entry's mark is where its key starts (``timeout_seconds: ten`` is reported
    at the start of the line); a list item's mark is where the item starts. The first
    occurrence of a duplicate key wins, as in the loaded data.
    """
    import yaml

    node_paths[id(node)] = path
    if path not in marks:
        marks[path] = _Mark(node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            child = (*path, key_node.value)
            if child in marks:
                continue
            marks[child] = _Mark(key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _index_marks(value_node, child, node_paths, marks)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_marks(item, (*path, index), node_paths, marks)
    return marks


@functools.lru_cache(maxsize=1)
def _policy_loader_class() -> type:
    """A SafeLoader that refuses aliases, anchors and deep nesting and reports duplicates.

    Built on first use so that importing cage.policy does not import yaml.
    """
    import yaml

    merge_tag = "tag:yaml.org,2002:merge"

    def own_error(message: str, mark: Any) -> yaml.MarkedYAMLError:
        error = yaml.composer.ComposerError(None, None, message, mark)
        error._cage_own = True  # type: ignore[attr-defined]  # already in user words
        return error

    class PolicyLoader(yaml.SafeLoader):
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.problems: list[_Problem] = []
            self.node_paths: dict[int, _Path] = {}
            self._depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise own_error(
                    f"YAML alias *{event.anchor} is not allowed in a mission policy "
                    "(write the value out in full)",
                    event.start_mark,
                )
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                raise own_error(
                    f"YAML anchor &{anchor} is not allowed in a mission policy "
                    "(write the value out in full)",
                    event.start_mark,
                )
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise own_error(
                        f"the policy is nested more than {MAX_DEPTH} levels deep",
                        event.start_mark,
                    )
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            if not isinstance(node, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    None, None, f"expected a mapping, found {node.id}", node.start_mark
                )
            path = self.node_paths.get(id(node), ())
            mapping: dict[str, Any] = {}
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                mark = _Mark(key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key_node.tag == merge_tag:
                    self.problems.append(
                        _Problem(
                            mark,
                            f"{_dotted((*path, '<<'))}: YAML merge keys are not "
                            "allowed in a mission policy (write the keys out in full)",
                        )
                    )
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problems.append(
                        _Problem(
                            mark,
                            f"{_dotted(path)}: a key must be a plain word, found a {key_node.id}"
                            if path
                            else f"a key must be a plain word, found a {key_node.id}",
                        )
                    )
                    continue
                # The key as written: `1:` or `true:` is an (unknown) key, not a number.
                key = key_node.value
                if key in first_line:
                    self.problems.append(
                        _Problem(
                            mark,
                            f"{_dotted((*path, key))}: duplicate key (first "
                            f"defined at line {first_line[key]}); keep only one",
                        )
                    )
                    continue
                first_line[key] = mark.line
                mapping[key] = self.construct_object(value_node, deep=deep)
            return mapping

        def construct_undefined(self, node: Any) -> Any:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise own_error(
                f"YAML tag {tag} is not allowed in a mission policy (only text, numbers, "
                "true/false, lists and mappings)",
                node.start_mark,
            )

    PolicyLoader.add_constructor(None, PolicyLoader.construct_undefined)
    for tag in ("binary", "set", "omap", "pairs"):
        PolicyLoader.add_constructor(f"tag:yaml.org,2002:{tag}", PolicyLoader.construct_undefined)
    # Timestamps stay text: a mission named 2026-01-01 is a name.
    PolicyLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
    return PolicyLoader


def _normalise_off(document: dict) -> None:
    """YAML 1.1 ``off`` -> ``False`` -> ``"off"`` for the keys whose values include off."""
    for path in _OFF_KEYS:
        parent: Any = document
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get(path[-1]) is False:
            parent[path[-1]] = "off"


# --------------------------------------------------------------------------- schema


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """The policy JSON Schema, read from package data."""
    from importlib import resources

    return json.loads(resources.files("cage").joinpath("policy.schema.json").read_text("utf-8"))


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    """Draft 2020-12 where NaN and infinities are not numbers (booleans never are)."""
    import jsonschema

    base = jsonschema.Draft202012Validator

    def is_finite_number(checker: Any, instance: Any) -> bool:
        return base.TYPE_CHECKER.is_type(instance, "number") and math.isfinite(instance)

    checker = base.TYPE_CHECKER.redefine("number", is_finite_number)
    validator_class = jsonschema.validators.extend(base, type_checker=checker)
    return validator_class(_schema())


def _schema_problems(document: dict, marks: dict[_Path, _Mark]) -> Iterator[_Problem]:
    for error in _validator().iter_errors(document):
        yield from _explain(error, marks)


def _explain(error: Any, marks: dict[_Path, _Mark]) -> Iterator[_Problem]:
    """Rewrite one jsonschema error in user words, at the right place."""
    path: _Path = tuple(error.absolute_path)
    kind = error.validator
    value = error.instance
    here = _dotted(path)
    mark = _mark_of(marks, path)

    if kind == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        for key in sorted(set(value) - set(known)):
            yield _Problem(_mark_of(marks, (*path, key)), _unknown_key(path, key, known))
        return
    if kind == "required":
        for key in error.validator_value:
            if key not in value:
                hint = " (write `version: v1`)" if path == () and key == "version" else ""
                yield _Problem(mark, f"{_dotted((*path, key))} is required{hint}")
        return
    if kind == "type":
        yield _Problem(mark, f"{here}: {_type_message(value, error.validator_value, path)}")
        return
    if kind == "enum":
        choices = ", ".join(str(c) for c in error.validator_value)
        yield _Problem(mark, f"{here}: {_show(value)} is not one of {choices}")
        return
    if kind in ("exclusiveMinimum", "minimum"):
        bound = error.validator_value
        relation = "greater than" if kind == "exclusiveMinimum" else "at least"
        yield _Problem(mark, f"{here}: must be {relation} {bound}, got {_show(value)}")
        return
    if kind in ("pattern", "minLength"):
        yield _Problem(mark, f"{here}: must not be empty")
        return
    yield _Problem(mark, f"{here}: {error.message}")


def _type_message(value: Any, expected: str | list[str], path: _Path) -> str:
    wanted = [expected] if isinstance(expected, str) else list(expected)
    words = " or ".join(_TYPE_WORDS.get(w, w) for w in wanted)
    if value is None:
        return f"is empty; expected {words}"
    if wanted == ["array"] and isinstance(value, str):
        return (
            f"{_show(value)} is a single string; write a list, e.g. [{json.dumps(value)}] "
            f"or one '- {value}' item per line"
        )
    if isinstance(value, float) and not math.isfinite(value):
        return f"{_show(value)} is not a finite number"
    if isinstance(value, bool) and "boolean" not in wanted:
        return f"{_show(value)} is a boolean, not {words} (YAML reads yes/no/on/off as booleans)"
    if "number" in wanted or "integer" in wanted:
        noun = words.removeprefix("a ")
        return f"{_show(value)} is not {'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    return f"{_show(value)} is not {words}"


def _unknown_key(path: _Path, key: str, known: list[str]) -> str:
    here = _dotted((*path, key))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return f"{here}: unknown key; did you mean '{close[0]}'?"
    where = f"under {_dotted(path)}" if path else "at the top level"
    return f"{here}: unknown key; allowed {where}: {', '.join(known)}"


def _pattern_problems(document: dict, marks: dict[_Path, _Mark]) -> Iterator[_Problem]:
    """allow/protect entries must be gitignore-style patterns pathspec can compile.

    Negations (``!x``) are refused: in ``protect`` they would un-protect part of the
    verifier, and in ``allow`` an exclusion list is easy to misread; list what you mean.
    """
    verification = document.get("verification")
    if not isinstance(verification, dict):
        return
    for key in ("allow", "protect"):
        patterns = verification.get(key)
        if not isinstance(patterns, list):
            continue
        for index, pattern in enumerate(patterns):
            if not isinstance(pattern, str) or not pattern.strip():
                continue  # the schema already reports it
            path = ("verification", key, index)
            reason = _pattern_fault(pattern)
            if reason:
                yield _Problem(_mark_of(marks, path), f"{_dotted(path)}: {_show(pattern)} {reason}")


def _pattern_fault(pattern: str) -> str | None:
    import pathspec

    if pattern.startswith("!"):
        return "is a negation; list only the paths you mean (negations are not supported)"
    if pattern.startswith("#"):
        return "starts with '#', which makes it a comment that matches nothing"
    try:
        pathspec.PathSpec.from_lines("gitignore", [pattern])
    except Exception as exc:  # pathspec raises several types for a bad pattern
        return f"is not a valid pattern ({exc})"
    return None


# --------------------------------------------------------------------------- build


def _build(doc: dict, source: str, digest: str) -> Policy:
    """Validated data -> Policy with defaults filled in."""
    mission = doc["mission"]
    budget = doc["budget"]
    verification = doc["verification"]
    issue = mission.get("issue")
    return Policy(
        version=doc["version"],
        mission=Mission(
            name=mission["name"],
            task_class=mission.get("task_class"),
            description=mission.get("description"),
            issue=None if issue is None else str(issue),
        ),
        budget=Budget(
            mission_hard_limit_usd=float(budget["mission_hard_limit_usd"]),
            max_llm_calls=_opt_int(budget.get("max_llm_calls")),
            max_runtime_minutes=_opt_float(budget.get("max_runtime_minutes")),
            warn_at_usd=_opt_float(budget.get("warn_at_usd")),
            warn_at_tokens=_opt_int(budget.get("warn_at_tokens")),
        ),
        verification=Verification(
            command=verification["command"],
            regression=verification.get("regression"),
            setup=verification.get("setup"),
            timeout_seconds=float(verification.get("timeout_seconds", 900)),
            guard=verification.get("guard", "strict"),
            allow=tuple(verification.get("allow", ())),
            protect=tuple(verification.get("protect", ())),
            allow_deletions=verification.get("allow_deletions", False),
            evidence=verification.get("evidence", "auto"),
        ),
        identity=dict(doc.get("identity", {})),
        spend_evidence=doc.get("spend_evidence", "optional"),
        source=source,
        hash=digest,
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
