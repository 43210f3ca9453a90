"""Scan changed Python source for code that reaches into the verifier at run time.

Product code is imported inside the test process, so a one-file change under ``src/`` can
forge what the test run reports: end the process with status 0 before pytest writes its
report, patch the test framework, detect the test run and behave differently, or make a
value that compares equal to anything. This module parses the new version of a changed file
with :mod:`ast` and reports such code, but only where the change adds or alters it: a
finding is kept when its enclosing unit (innermost function or class, else the module-level
statement) overlaps a changed line. Patterns are data (``RULES``); docs/tamper.md explains
each one, the attack it stops and what it does not catch.

Standard library only: the CI gate imports this module on its hot path.
"""

from __future__ import annotations

import ast
import bisect
import builtins
import difflib
import io
import re
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["MAX_SCAN_BYTES", "RULES", "Rule", "TamperFinding", "is_python_path", "scan_change"]

# A product source file larger than this is not parsed; it is reported instead, because a
# scanner that silently gives up would be the easiest way around it.
MAX_SCAN_BYTES = 2 * 1024 * 1024
# Above this many (old lines x new lines) in the differing middle, the diff is not aligned
# line by line; the whole middle counts as changed.
MAX_DIFF_CELLS = 4_000_000


@dataclass(frozen=True)
class TamperFinding:
    """One piece of changed code that reaches into the verifier."""

    path: str
    line: int
    code: str  # stable snake_case, one of RULES' codes
    message: str


# --------------------------------------------------------------------------------------
# Names the rules look for (data).

# Top-level modules of the test harness. Product code has no business importing them.
TEST_FRAMEWORK_MODULES = frozenset(
    {"pytest", "_pytest", "pluggy", "py", "xdist", "unittest", "mock", "nose", "nose2"}
)
# Calls that end (or replace) the process and bypass pytest's exception handling.
HARD_EXITS = frozenset(
    {
        "os._exit",
        "posix._exit",
        "os.abort",
        "signal.raise_signal",
        "signal.pthread_kill",
        *(f"os.exec{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
    }
)
# Calls that end the process by raising SystemExit (caught by pytest inside a test, but not
# at import time or in an exit hook).
SOFT_EXITS = frozenset(
    {"sys.exit", "exit", "quit", "builtins.exit", "builtins.quit", "_thread.interrupt_main"}
)
KILLS = frozenset({"os.kill", "os.killpg"})
# Exits whose first argument is the exit status (or, for SystemExit, a message).
EXIT_WITH_STATUS = frozenset(
    {"sys.exit", "exit", "quit", "builtins.exit", "builtins.quit", "os._exit", "posix._exit"}
)
# Attribute names that only process-ending calls have (os._exit, os.exec*): judged as such
# even on an object the resolver cannot name.
EXIT_ATTRIBUTES = frozenset(
    {"_exit", *(f"exec{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe"))}
)
FORKS = frozenset({"os.fork", "os.forkpty", "pty.fork", "os.register_at_fork"})
SPAWNS = frozenset(
    {
        *(f"subprocess.{n}" for n in ("run", "call", "check_call", "check_output", "Popen")),
        "subprocess.getoutput",
        "subprocess.getstatusoutput",
        "os.system",
        "os.popen",
        "os.posix_spawn",
        "os.posix_spawnp",
        *(f"os.spawn{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
        "pty.spawn",
        "multiprocessing.Process",
        "asyncio.create_subprocess_exec",
        "asyncio.create_subprocess_shell",
        *FORKS,
    }
)
# Registrars whose callable runs later, outside the test's control: at exit, on a signal,
# on garbage collection, in a timer thread, or for an uncaught exception.
HOOK_REGISTRARS = frozenset(
    {
        "atexit.register",
        "signal.signal",
        "weakref.finalize",
        "os.register_at_fork",
        "threading.Timer",
        "threading.Thread",
        "sys.addaudithook",
    }
)
HOOK_ATTRIBUTES = frozenset(
    {"sys.excepthook", "threading.excepthook", "sys.unraisablehook", "sys.displayhook"}
)
CI_ENV_EXACT = frozenset(
    {
        "CI",
        "CONTINUOUS_INTEGRATION",
        "BUILD_NUMBER",
        "GITLAB_CI",
        "CIRCLECI",
        "TRAVIS",
        "JENKINS_URL",
        "BUILDKITE",
        "TF_BUILD",
        "TEAMCITY_VERSION",
        "APPVEYOR",
    }
)
CI_ENV_PREFIXES = ("GITHUB_", "RUNNER_", "ACTIONS_")
PYTEST_ENV_RE = re.compile(r"^_?PYTEST(_[A-Z0-9_]*)?$")
HARNESS_FILE_RE = re.compile(
    r"junit|\.pytest_cache|conftest|sitecustomize|usercustomize|pytest\.ini|\.runcap"
    r"|cage-wt-|cage-logs-"
    r"|\.pth$|(?<![a-z])(report|results?|tests?)(?![a-z])[^/\\]*\.xml$",
    re.IGNORECASE,
)
FRAME_CALLS = frozenset(
    {
        "sys._getframe",
        "sys._current_frames",
        "inspect.currentframe",
        "inspect.stack",
        "inspect.trace",
        "inspect.getouterframes",
        "inspect.getinnerframes",
        "traceback.walk_stack",
    }
)
FRAME_ATTRIBUTES = frozenset(
    {"f_back", "f_locals", "f_globals", "f_builtins", "tb_frame", "gi_frame", "cr_frame"}
    # A function's globals are its module's namespace: from any object the harness hands
    # over (the capture stream in sys.stdout) they lead to the harness's modules.
    | {"__globals__", "__closure__", "ag_frame"}
)
TRACER_CALLS = frozenset(
    {
        "sys.settrace",
        "sys.setprofile",
        "sys.call_tracing",
        "sys.addaudithook",
        "threading.settrace",
        "threading.setprofile",
        "threading.settrace_all_threads",
        "threading.setprofile_all_threads",
        "sys.monitoring.use_tool_id",
        "sys.monitoring.register_callback",
        "sys.monitoring.set_events",
        "sys.monitoring.set_local_events",
    }
)
HEAP_CALLS = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"})
CODE_OBJECT_CALLS = frozenset(
    {"types.FunctionType", "types.LambdaType", "types.CodeType", "marshal.loads"}
)
CODE_OBJECT_ATTRIBUTES = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
CTYPES_INTERNALS = frozenset({"pythonapi", "py_object", "memmove", "memset", "from_address"})
SITE_NAMES = frozenset(
    {
        "site.getsitepackages",
        "site.getusersitepackages",
        "site.addsitedir",
        "site.USER_SITE",
        "site.USER_BASE",
        "site.ENABLE_USER_SITE",
    }
)
DECODERS = re.compile(
    r"^(base64\.\w*decode\w*|codecs\.decode|zlib\.decompress|bz2\.decompress|"
    r"lzma\.decompress|gzip\.decompress|binascii\.\w+|marshal\.loads|pickle\.loads|"
    r"bytes\.fromhex|bytes|bytearray|chr|reversed)$"
)
RUNTIME_MODULES = frozenset(
    {
        "os",
        "posix",
        "sys",
        "builtins",
        "signal",
        "atexit",
        "gc",
        "inspect",
        "importlib",
        "ctypes",
        "_thread",
        "threading",
        "subprocess",
        *TEST_FRAMEWORK_MODULES,
    }
)
ENV_MUTATORS = frozenset(
    {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}
)
MAPPING_MUTATORS = ENV_MUTATORS
LIST_MUTATORS = frozenset(
    {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__iadd__"}
)
IMPORT_CALLS = frozenset({"__import__", "importlib.import_module", "importlib.__import__"})
FILE_WRITERS = frozenset(
    {"os.replace", "os.rename", "shutil.copy", "shutil.copyfile", "shutil.move"}
)
EXEC_CALLS = frozenset({"exec", "eval", "compile", "builtins.exec", "builtins.eval"})
# Calls that run a file as Python whatever its name (impl.txt): the scanner only reads
# *.py files, so the file they run is code nobody scanned.
FILE_RUNNERS = frozenset(
    {
        "runpy.run_path",
        "importlib.machinery.SourceFileLoader",
        "importlib.machinery.SourcelessFileLoader",
        "importlib.util.spec_from_file_location",
        "importlib.util.spec_from_loader",
        "zipimport.zipimporter",
    }
)


# --------------------------------------------------------------------------------------
# What the rules see.


@dataclass
class Scope:
    """Where a node executes: which function, which reporting unit, and when."""

    func: ast.AST | None  # innermost FunctionDef / AsyncFunctionDef / Lambda
    unit: tuple[int, int]  # lines of the innermost def or class, else module statement
    import_time: bool  # runs while the module is imported
    top: str | None = None  # the top-level function this code belongs to
    in_class: bool = False  # directly in a class body


@dataclass
class Module:
    """Facts about the whole file that rules need (aliases, local call graph)."""

    aliases: dict[str, str] = field(default_factory=dict)
    star_modules: set[str] = field(default_factory=set)
    functions: dict[str, ast.AST] = field(default_factory=dict)  # top-level defs
    forks: bool = False
    renames_module: bool = False
    import_reachable: set[str] = field(default_factory=set)
    ending: dict[str, str] = field(default_factory=dict)  # function -> what ends the process
    hooked: set[str] = field(default_factory=set)  # functions registered as hooks
    writes_files: set[str] = field(default_factory=set)
    # Nodes live as long as the scan, so their ids are stable keys.
    _resolved: dict[int, str | None] = field(default_factory=dict)
    _folded: dict[int, str | None] = field(default_factory=dict)
    # Ids of expressions whose value is only looked into (`x.attr`, `x(...)`, `getattr(x,
    # ...)`) or bound to a plain name the resolver follows: not passed around as values.
    looked_into: set[int] = field(default_factory=set)
    # Sub-expression id -> the string expression it is part of (judged whole when it folds).
    string_parent: dict[int, ast.AST] = field(default_factory=dict)
    # name -> every expression assigned to it anywhere in the file (`name = ...`)
    assigned: dict[str, list[ast.AST]] = field(default_factory=dict)
    decodes_cache: dict[str, bool] = field(default_factory=dict)  # see _decodes
    decode_depth: int = 0
    callees: dict[str, list[str]] = field(default_factory=dict)  # local call graph
    bound: dict[str, ast.AST] = field(default_factory=dict)  # `name = other.name` bindings
    _resolving: set[str] = field(default_factory=set)
    is_main_script: bool = False  # a package's __main__.py: only ever run as a script
    body_scopes: dict[str, Scope] = field(default_factory=dict)
    script_scopes: list[Scope] = field(default_factory=list)
    calls: list[tuple[ast.Call, Scope]] = field(default_factory=list)
    assignments: list[ast.AST] = field(default_factory=list)
    decorated: list[ast.AST] = field(default_factory=list)

    def resolve(self, node: ast.AST) -> str | None:
        """Canonical dotted name of an expression (aliases, getattr and imports undone)."""
        key = id(node)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(node)
        return self._resolved[key]

    def _resolve(self, node: ast.AST) -> str | None:
        parts: list[str] = []
        while True:
            if isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            elif (
                isinstance(node, ast.Subscript)
                and self.fold(node.slice) is not None
                and (
                    (isinstance(node.value, ast.Attribute) and node.value.attr == "__dict__")
                    or (
                        isinstance(node.value, ast.Call)
                        and _call_name_raw(node.value) == "vars"
                        and len(node.value.args) == 1
                    )
                )
            ):
                # os.__dict__["_exit"] and vars(os)["_exit"] are os._exit.
                parts.append(self.fold(node.slice))  # type: ignore[arg-type]
                value = node.value
                node = value.value if isinstance(value, ast.Attribute) else value.args[0]  # type: ignore[attr-defined]
            elif (
                isinstance(node, ast.Subscript)
                and self.fold(node.slice) is not None
                and self.resolve(node.value) == "sys.modules"
            ):
                parts.append(self.fold(node.slice))  # type: ignore[arg-type]
                break  # sys.modules["os"] is os
            elif isinstance(node, ast.Call) and _call_name_raw(node) == "getattr":
                attr = self.fold(node.args[1]) if len(node.args) >= 2 else None
                if attr is None:
                    return None
                parts.append(attr)
                node = node.args[0]
            elif isinstance(node, ast.Call) and self.resolve(node.func) in IMPORT_CALLS:
                name = self.fold(node.args[0]) if node.args else None
                if name is None:
                    return None
                parts.append(name)
                break
            elif isinstance(node, ast.Name):
                base = node.id
                if base in self.aliases:
                    parts.append(self.aliases[base])
                elif base == "__builtins__":
                    parts.append("builtins")
                elif base in _BUILTIN_NAMES or base in self.functions:
                    parts.append(base)
                elif base in self.bound and base not in self._resolving:
                    # `f = os._exit` then `f(0)`: follow the binding (once, no cycles).
                    self._resolving.add(base)
                    try:
                        bound = self.resolve(self.bound[base])
                    finally:
                        self._resolving.discard(base)
                    if bound is None:
                        return None
                    parts.append(bound)
                else:
                    # A name bound by neither an import nor the builtins is a local
                    # variable (`builtins = [...]` in a lexer), not the module.
                    star = self._star(base)
                    if star is None:
                        return None
                    parts.append(star)
                break
            else:
                return None
        return _through_module_attribute(".".join(reversed(parts)))

    def fold(self, node: ast.AST) -> str | None:
        """The string a constant expression evaluates to (``"py" + "test"``), else None.

        A ``+`` chain is folded once along its spine, every link cached, so judging each
        link of a long chain stays linear.
        """
        key = id(node)
        if key in self._folded:
            return self._folded[key]
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)):
            self._folded[key] = fold_str(node)
            return self._folded[key]
        spine = []
        link: ast.AST = node
        while isinstance(link, ast.BinOp) and isinstance(link.op, ast.Add):
            if id(link) in self._folded:
                break
            spine.append(link)
            link = link.left
        acc = self._folded[id(link)] if id(link) in self._folded else fold_str(link)
        for item in reversed(spine):
            right = fold_str(item.right) if acc is not None else None  # type: ignore[attr-defined]
            if acc is None or right is None or len(acc) + len(right) > FOLD_LIMIT:
                acc = None
            else:
                acc += right
            self._folded[id(item)] = acc
        return acc

    @property
    def inner_strings(self) -> _InnerStrings:
        """Sub-expressions of a string expression that folds (judged as part of it)."""
        return _InnerStrings(self)

    def _star(self, name: str) -> str | None:
        for module in self.star_modules:
            candidate = f"{module}.{name}"
            if candidate in HARD_EXITS or candidate in SOFT_EXITS or candidate in KILLS:
                return candidate
        return None

    def exit_kind(self, call: ast.Call) -> str | None:
        """The dotted name when ``call`` ends the process, else None."""
        name = self.resolve(call.func)
        if name is None:
            # `m._exit(0)` on a module the resolver could not name (computed import, a
            # parameter): these attribute names belong to process-ending calls only.
            attr = self.attribute_name(call.func)
            if attr in EXIT_ATTRIBUTES:
                name = f"os.{attr}"
        if name in EXIT_WITH_STATUS and _fails_for_sure(call.args[:1]):
            return None  # `sys.exit(1)`, `sys.exit("usage: ...")`: a failure cannot fake a pass
        if name in HARD_EXITS or name in SOFT_EXITS:
            return name
        if name in KILLS and call.args and self._is_own_process(call.args[0]):
            return name
        return None

    def attribute_name(self, node: ast.AST) -> str | None:
        """The attribute ``node`` reads: ``x.name`` or ``getattr(x, "na" + "me")``."""
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Call) and _call_name_raw(node) == "getattr" and len(node.args) >= 2:
            return self.fold(node.args[1])
        return None

    def _is_own_process(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and node.value in (0, -1):
            return True
        if isinstance(node, ast.Call):
            return self.resolve(node.func) in {"os.getpid", "os.getppid", "os.getpgrp"}
        return False


Matcher = Callable[[ast.AST, Scope, Module], "str | None"]


@dataclass(frozen=True)
class Rule:
    """One pattern: a stable code, what it catches, why it matters, and its matcher."""

    code: str
    catches: str
    why: str
    matcher: Matcher | None  # None: reported by scan_change itself, not per node
    nodes: tuple[type[ast.AST], ...] = ()  # the node types the matcher can match


# --------------------------------------------------------------------------------------
# Small AST helpers.


_BUILTIN_NAMES = frozenset(dir(builtins)) | {"exit", "quit"}
_STORES = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


FOLD_LIMIT = 10_000  # longest string constant folding builds
_STR_METHODS = frozenset(
    {"lower", "upper", "strip", "lstrip", "rstrip", "casefold", "title", "capitalize", "swapcase"}
)


def _const_int(node: ast.AST) -> int | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _const_int(node.operand)
        return None if value is None else -value
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def fold_str(node: ast.AST, depth: int = 0) -> str | None:
    """The string a constant expression evaluates to, else None.

    Names the rules look for can be assembled so that no literal holds them:
    ``"py" + "test"``, ``f"{'PYTEST'}_ADDOPTS"``, ``"".join(["ju", "nit"])``,
    ``"tsetyp"[::-1]``, ``chr(112)``, ``"PyTest".lower()``. Only literals take part (no
    variables), so this never runs code; chains of ``+`` are walked without recursion.
    """
    if depth > 50:
        return None
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        operands = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            operands.append(node.right)
            node = node.left
        operands.append(node)
        pieces, size = [], 0
        for operand in reversed(operands):
            piece = fold_str(operand, depth + 1)
            if piece is None:
                return None
            size += len(piece)
            if size > FOLD_LIMIT:
                return None
            pieces.append(piece)
        return "".join(pieces)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        text, count = node.left, node.right
        if _const_int(text) is not None:
            text, count = count, text
        folded, times = fold_str(text, depth + 1), _const_int(count)
        if folded is None or times is None or len(folded) * max(times, 0) > FOLD_LIMIT:
            return None
        return folded * times
    if isinstance(node, ast.JoinedStr):
        pieces = []
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                if value.conversion != -1 or value.format_spec is not None:
                    return None
                value = value.value
            piece = fold_str(value, depth + 1)
            if piece is None:
                return None
            pieces.append(piece)
        return "".join(pieces)
    if isinstance(node, ast.Subscript):
        text = fold_str(node.value, depth + 1)
        if text is None:
            return None
        index = node.slice
        if isinstance(index, ast.Slice):
            bounds = []
            for bound in (index.lower, index.upper, index.step):
                value = None if bound is None else _const_int(bound)
                if bound is not None and value is None:
                    return None
                bounds.append(value)
            return None if bounds[2] == 0 else text[slice(*bounds)]
        at = _const_int(index)
        return text[at] if at is not None and -len(text) <= at < len(text) else None
    if isinstance(node, ast.Call) and not node.keywords:
        func, args = node.func, node.args
        if isinstance(func, ast.Name) and len(args) == 1:
            if func.id == "chr":
                code = _const_int(args[0])
                return chr(code) if code is not None and 0 <= code < 0x110000 else None
            if func.id == "str":
                return fold_str(args[0], depth + 1)
        if isinstance(func, ast.Attribute):
            if (
                func.attr == "join"
                and len(args) == 1
                and isinstance(args[0], (ast.List, ast.Tuple))
            ):
                sep = fold_str(func.value, depth + 1)
                items = [fold_str(item, depth + 1) for item in args[0].elts]
                if sep is None or any(item is None for item in items):
                    return None
                joined = sep.join(items)  # type: ignore[arg-type]
                return joined if len(joined) <= FOLD_LIMIT else None
            if func.attr in _STR_METHODS and not args:
                base = fold_str(func.value, depth + 1)
                return None if base is None else getattr(base, func.attr)()
            if func.attr == "replace" and len(args) == 2:
                base, old, new = (fold_str(n, depth + 1) for n in (func.value, *args))
                if base is None or old is None or new is None:
                    return None
                replaced = base.replace(old, new)
                return replaced if len(replaced) <= FOLD_LIMIT else None
    return None


# Modules that end, replace or inspect the process. Reached as an attribute of another
# module (``shutil.os``, ``tempfile._os``, ``os.sys``) they are still themselves.
_REACHABLE_MODULES = frozenset(
    {"os", "posix", "sys", "builtins", "signal", "subprocess", "ctypes", "gc", "inspect"}
    | {"importlib", "atexit", "_thread", "threading"}
)


def _through_module_attribute(name: str) -> str:
    """``shutil.os._exit`` -> ``os._exit``: a module reached through another module."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        bare = parts[i].lstrip("_") if parts[i] != "_thread" else parts[i]
        if bare in _REACHABLE_MODULES and not (i == 1 and bare == parts[0]):
            return ".".join([bare, *parts[i + 1 :]])
    return name


def _fails_for_sure(args: list[ast.expr]) -> bool:
    """True when an exit status is a literal that means failure (non-zero int or a message)."""
    if not args or not isinstance(args[0], ast.Constant):
        return False
    value = args[0].value
    if isinstance(value, str):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value != 0


def _call_name_raw(call: ast.Call) -> str | None:
    return call.func.id if isinstance(call.func, ast.Name) else None


def _span(node: ast.AST) -> tuple[int, int]:
    start = node.lineno  # type: ignore[attr-defined]
    for decorator in getattr(node, "decorator_list", ()):
        start = min(start, decorator.lineno)
    end = getattr(node, "end_lineno", None) or start
    return start, end


def _strings(node: ast.AST) -> Iterator[str]:
    for sub in ast.walk(node):
        if _is_str(sub):
            yield sub.value  # type: ignore[attr-defined]


def _is_main_guard(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    if isinstance(node.test, ast.BoolOp) and isinstance(node.test.op, ast.And):
        # `if sys.platform != "win32" and __name__ == "__main__":` guards as well.
        return any(_is_main_test(value) for value in node.test.values)
    return _is_main_test(node.test)


def _is_main_test(test: ast.AST) -> bool:
    if not isinstance(test, ast.Compare):
        return False
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    has_name = any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
    has_main = any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
    return has_name and has_main


def _stores(node: ast.AST) -> list[ast.AST]:
    """Targets an assignment-like statement writes or deletes."""
    if isinstance(node, ast.Assign):
        targets: list[ast.AST] = []
        for target in node.targets:
            targets.extend(_flatten(target))
        return targets
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return [node.target]
    if isinstance(node, ast.Delete):
        return list(node.targets)
    return []


def _flatten(target: ast.AST) -> list[ast.AST]:
    if isinstance(target, (ast.Tuple, ast.List)):
        out: list[ast.AST] = []
        for element in target.elts:
            out.extend(_flatten(element))
        return out
    if isinstance(target, ast.Starred):
        return _flatten(target.value)
    return [target]


def _store_base(target: ast.AST) -> ast.AST:
    """``a.b[c] = ...`` writes into ``a.b``; ``a.b = ...`` writes into ``a``."""
    if isinstance(target, (ast.Attribute, ast.Subscript)):
        return target.value
    return target


def _root(name: str | None) -> str:
    return name.split(".", 1)[0] if name else ""


def _mutates(node: ast.AST, module: Module, containers: set[str], methods: frozenset) -> str:
    """Which of ``containers`` the node writes to, by store, del, setattr or method call."""
    for target in _stores(node):
        base = module.resolve(_store_base(target))
        if base in containers:
            return base
        if isinstance(target, ast.Attribute):
            full = module.resolve(target)
            if full in containers:
                return full
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in methods:
            base = module.resolve(func.value)
            if base in containers:
                return base
        if module.resolve(func) in {"setattr", "delattr"} and len(node.args) >= 2:
            base = module.resolve(node.args[0])
            if _is_str(node.args[1]):
                full = f"{base}.{node.args[1].value}"  # type: ignore[attr-defined]
                if full in containers:
                    return full
            if base in containers:
                return base
    return ""


def _is_docstring_expr(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and _is_str(node.value)


# --------------------------------------------------------------------------------------
# Matchers. Each returns the "what was found" half of the message, or None.


def _m_imports_test_framework(node: ast.AST, scope: Scope, module: Module) -> str | None:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
        names = [node.module]
    elif (
        isinstance(node, ast.Call)
        and module.resolve(node.func) in IMPORT_CALLS
        and node.args
        and module.fold(node.args[0]) is not None
    ):
        names = [module.fold(node.args[0])]  # type: ignore[list-item]
    for name in names:
        root = _root(name)
        if root in TEST_FRAMEWORK_MODULES or root.startswith("pytest_"):
            return f"imports {name}"
    return None


def _m_patches_test_framework(node: ast.AST, scope: Scope, module: Module) -> str | None:
    for target in _stores(node):
        if isinstance(target, ast.Name) and target.id == "AssertionError":
            return "rebinds AssertionError"
        if isinstance(target, (ast.Attribute, ast.Subscript)):
            name = module.resolve(_store_base(target))
            if _root(name) in TEST_FRAMEWORK_MODULES:
                return f"writes into {name}"
    if (
        isinstance(node, ast.Call)
        and module.resolve(node.func) in {"setattr", "delattr"}
        and node.args
        and _root(module.resolve(node.args[0])) in TEST_FRAMEWORK_MODULES
    ):
        return f"sets an attribute of {module.resolve(node.args[0])}"
    return None


def _names_test_framework(text: str) -> bool:
    lowered = text.lower()
    return "pytest" in lowered or lowered in {"unittest", "py.test", "xdist", "nose"}


def _m_detects_test_run(node: ast.AST, scope: Scope, module: Module) -> str | None:
    text = _folded_text(node, module)
    if text is not None and PYTEST_ENV_RE.match(text):
        return f"names the pytest variable {text!r}"
    if isinstance(node, ast.Compare):
        for operand in [node.left, *node.comparators]:
            text = module.fold(operand)
            if text is not None and _names_test_framework(text):
                return f"compares against {text!r}"
    if isinstance(node, ast.Subscript) and module.resolve(node.value) == "sys.modules":
        text = module.fold(node.slice)
        if text is not None and _names_test_framework(text):
            return f"looks up sys.modules[{text!r}]"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        probe = node.func.attr in {"get", "endswith", "startswith", "find", "index", "count"}
        for arg in node.args[:1]:
            text = module.fold(arg) if probe else None
            if text is not None and _names_test_framework(text):
                return f"probes for {text!r}"
    return None


# Expressions that can evaluate to a constant string; a `+` chain is judged once, whole.
_FOLDABLE = (ast.Constant, ast.BinOp, ast.JoinedStr, ast.Subscript, ast.Call)


def _folded_text(node: ast.AST, module: Module) -> str | None:
    """The constant string ``node`` evaluates to, judged at the outermost expression."""
    if not isinstance(node, _FOLDABLE) or id(node) in module.inner_strings:
        return None
    return module.fold(node)


def _env_key(node: ast.AST, module: Module) -> ast.AST | None:
    """The key expression of an environment read or write, if ``node`` is one."""
    if isinstance(node, ast.Subscript) and module.resolve(node.value) == "os.environ":
        return node.slice
    if isinstance(node, ast.Call):
        name = module.resolve(node.func)
        env_methods = {f"os.environ.{m}" for m in ("get", "pop", "setdefault")}
        if name in {"os.getenv", "os.putenv", "os.unsetenv", "os.environ.get"} | env_methods:
            return node.args[0] if node.args else None
    if (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.ops[0], (ast.In, ast.NotIn))
        and module.resolve(node.comparators[0]) == "os.environ"
    ):
        return node.left
    return None


def _m_reads_ci_environment(node: ast.AST, scope: Scope, module: Module) -> str | None:
    key = _env_key(node, module)
    value = module.fold(key) if key is not None else None
    if value is not None and (value in CI_ENV_EXACT or value.startswith(CI_ENV_PREFIXES)):
        return f"reads the CI variable {value!r}"
    return None


def _m_mutates_environment_at_import(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if not scope.import_time:
        return None
    if _mutates(node, module, {"os.environ"}, ENV_MUTATORS):
        return "changes os.environ at import time"
    if isinstance(node, ast.Call) and module.resolve(node.func) in {"os.putenv", "os.unsetenv"}:
        return f"calls {module.resolve(node.func)} at import time"
    return None


def _m_names_harness_file(node: ast.AST, scope: Scope, module: Module) -> str | None:
    text = _folded_text(node, module)
    if text is not None and HARNESS_FILE_RE.search(text):
        return f"names the harness file {text[:60]!r}"
    return None


def _m_aliases_runtime_module(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if id(node) in module.looked_into:
        return None
    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
        return None
    if isinstance(node, ast.Call) and module.resolve(node.func) not in IMPORT_CALLS:
        return None
    name = module.resolve(node)
    if name in RUNTIME_MODULES:
        return f"passes the module {name} around as a value"
    return None


HOOK_NAME_RE = re.compile(r"^pytest_[a-z0-9_]+$")


def _m_defines_test_hook(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if HOOK_NAME_RE.match(node.name):
            return f"defines {node.name}"
        return None
    for target in _stores(node):
        name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
        if name and HOOK_NAME_RE.match(name):
            return f"binds {name}"
    text = _folded_text(node, module)
    if text is not None and HOOK_NAME_RE.match(text):
        return f"names the hook {text!r}"
    return None


def _m_touches_site_packages(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if isinstance(node, (ast.Attribute, ast.Name)) and module.resolve(node) in SITE_NAMES:
        return f"uses {module.resolve(node)}"
    return None


def _m_replaces_builtin(node: ast.AST, scope: Scope, module: Module) -> str | None:
    containers = {"builtins", "builtins.__dict__"}
    if isinstance(node, ast.Call) and module.resolve(node.func) == "vars":
        return None
    hit = _mutates(node, module, containers, MAPPING_MUTATORS)
    if hit:
        return f"writes into {hit}"
    for target in _stores(node):
        if isinstance(target, ast.Name) and target.id == "__builtins__":
            return "rebinds __builtins__"
    return None


def _m_replaces_sys_module_entry(node: ast.AST, scope: Scope, module: Module) -> str | None:
    hit = _mutates(node, module, {"sys.modules"}, MAPPING_MUTATORS)
    return f"writes into {hit}" if hit else None


def _m_installs_import_hook(node: ast.AST, scope: Scope, module: Module) -> str | None:
    hooks = {"sys.meta_path", "sys.path_hooks", "sys.path_importer_cache"}
    hit = _mutates(node, module, hooks, LIST_MUTATORS | MAPPING_MUTATORS)
    return f"changes {hit}" if hit else None


def _m_calls(names: frozenset, verb: str) -> Matcher:
    def matcher(node: ast.AST, scope: Scope, module: Module) -> str | None:
        if isinstance(node, ast.Call):
            name = module.resolve(node.func)
            if name in names:
                return f"{verb} {name}"
        return None

    return matcher


_WALKERS = frozenset({"list", "dict", "tuple", "set", "frozenset", "sorted", "iter", "enumerate"})


def _m_walks_heap(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
        if module.resolve(node.iter) == "sys.modules":
            return "iterates over sys.modules"
        return None
    if isinstance(node, ast.Subscript):
        if module.resolve(node.value) == "sys.modules" and _decodes(node.slice, module):
            return "looks a decoded name up in sys.modules"
        return None
    if not isinstance(node, ast.Call):
        return None
    name = module.resolve(node.func)
    if name in HEAP_CALLS:
        return f"calls {name}"
    func = node.func
    if isinstance(func, ast.Attribute) and module.resolve(func.value) == "sys.modules":
        if func.attr in {"values", "items", "keys", "copy", "__iter__"}:
            return f"walks sys.modules.{func.attr}()"
        if func.attr == "get" and node.args and _decodes(node.args[0], module):
            return "looks a decoded name up in sys.modules"
    if name in _WALKERS and node.args and module.resolve(node.args[0]) == "sys.modules":
        return f"walks sys.modules with {name}()"
    return None


def _m_inspects_caller_frames(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in FRAME_ATTRIBUTES:
        return f"reads the frame attribute {node.attr}"
    text = _folded_text(node, module)
    if text is not None and text in FRAME_ATTRIBUTES:
        return f"names the frame attribute {text}"
    return _m_calls(FRAME_CALLS, "calls")(node, scope, module)


def _m_replaces_code_object(node: ast.AST, scope: Scope, module: Module) -> str | None:
    for target in _stores(node):
        if isinstance(target, ast.Attribute) and target.attr in CODE_OBJECT_ATTRIBUTES:
            return f"assigns {target.attr}"
    if isinstance(node, ast.Call):
        if module.resolve(node.func) in {"setattr"} and len(node.args) >= 2:
            arg = node.args[1]
            if _is_str(arg) and arg.value in CODE_OBJECT_ATTRIBUTES:  # type: ignore[attr-defined]
                return f"sets {arg.value}"  # type: ignore[attr-defined]
        if any(k.arg and k.arg.startswith("co_") for k in node.keywords):
            return "rebuilds a code object (co_* keyword)"
    return _m_calls(CODE_OBJECT_CALLS, "calls")(node, scope, module)


def _m_ctypes_interpreter_access(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in CTYPES_INTERNALS:
        name = module.resolve(node)
        if _root(name) in {"ctypes", "_ctypes"}:
            return f"uses {name}"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        if any(_root(n) == "_ctypes" for n in names if n):
            return "imports _ctypes"
    if isinstance(node, ast.Call) and module.resolve(node.func) in CTYPES_LOADERS and node.args:
        # CDLL(None) is the process itself (libc and the interpreter): exit(), _exit(),
        # Py_* functions, all without a name the other rules know.
        arg = node.args[0]
        text = module.fold(arg)
        if (isinstance(arg, ast.Constant) and arg.value is None) or (
            text is not None and CTYPES_PROCESS_LIBS.search(text)
        ):
            return f"loads the process's own C library ({module.resolve(node.func)})"
    return None


CTYPES_LOADERS = frozenset(
    {
        "ctypes.CDLL",
        "ctypes.PyDLL",
        "ctypes.cdll.LoadLibrary",
        "ctypes.pydll.LoadLibrary",
        "ctypes.util.find_library",
    }
)
CTYPES_PROCESS_LIBS = re.compile(r"^(c|python[0-9.]*)$|(^|/)lib(c|python)[^/]*$")


def _m_obfuscated_code_execution(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if isinstance(node, ast.Call) and module.resolve(node.func) in FILE_RUNNERS:
        return f"runs a file as Python with {module.resolve(node.func)}"
    if not isinstance(node, ast.Call) or module.resolve(node.func) not in EXEC_CALLS:
        return None
    name = module.resolve(node.func)
    if not node.args:
        return None
    source = node.args[0]
    for sub in ast.walk(source):
        if isinstance(sub, ast.Call):
            inner = module.resolve(sub.func) or ""
            method = sub.func.attr if isinstance(sub.func, ast.Attribute) else ""
            if DECODERS.match(inner) or method in {"decode", "join", "translate", "replace"}:
                return f"calls {name} on decoded or assembled text"
    if _decodes(source, module):
        # text read from a file the scanner does not read (impl.txt), or decoded bytes
        return f"calls {name} on text read from a file or decoded"
    if scope.import_time and not _is_str(source):
        return f"calls {name} on computed text at import time"
    return None


# Methods that produce text a reader of the source cannot see: decoding, or reading a file.
DECODING_METHODS = frozenset(
    {"decode", "translate", "fromhex", "read", "read_text", "read_bytes", "readline"}
)


def _decodes(node: ast.AST, module: Module) -> bool:
    """True when ``node`` builds text by decoding (bytes(...).decode(), chr, base64...) or
    reading a file, directly, through a local variable or through a function of this file.

    Each function and variable is judged once (cached), so the cost stays linear however
    the file's functions call each other.
    """
    for sub in ast.walk(node):
        # `name = bytes(...).decode()` then `sys.modules[name]`: follow the binding.
        if (
            isinstance(sub, ast.Name)
            and isinstance(sub.ctx, ast.Load)
            and sub.id in module.assigned
            and _cached_decodes(module, "=" + sub.id, module.assigned[sub.id])
        ):
            return True
        if not isinstance(sub, ast.Call):
            continue
        inner = module.resolve(sub.func) or ""
        method = sub.func.attr if isinstance(sub.func, ast.Attribute) else ""
        if DECODERS.match(inner) or method in DECODING_METHODS:
            return True
        local = sub.func.id if isinstance(sub.func, ast.Name) else None
        if local in module.functions and _cached_decodes(
            module, "def " + local, [module.functions[local]]
        ):
            return True
    return False


MAX_DECODE_DEPTH = 64  # deeper chains of local helpers are judged as decoding (fail closed)


def _cached_decodes(module: Module, key: str, nodes: list[ast.AST]) -> bool:
    cache = module.decodes_cache
    if key in cache:
        return cache[key]  # a cycle in progress reads False until it is settled
    if module.decode_depth >= MAX_DECODE_DEPTH:
        return True
    cache[key] = False
    module.decode_depth += 1
    try:
        cache[key] = any(_decodes(n, module) for n in nodes)
    finally:
        module.decode_depth -= 1
    return cache[key]


def _m_dynamic_import(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    if module.resolve(node.func) not in IMPORT_CALLS or not node.args:
        return None
    arg = node.args[0]
    if _is_str(arg):
        return None
    if not scope.import_time:
        # Inside a function a computed name is a plugin loader, unless it is decoded
        # from bytes or character codes: that is a disguise.
        if module.fold(arg) is None and _decodes(arg, module):
            return "imports a module whose name is decoded at run time"
        return None
    # f"pkg.plugins.{name}" stays inside a named package: a plugin loader, not a disguise.
    prefix = ""
    if isinstance(arg, ast.JoinedStr) and arg.values and _is_str(arg.values[0]):
        prefix = arg.values[0].value  # type: ignore[attr-defined]
    elif isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Add) and _is_str(arg.left):
        prefix = arg.left.value  # type: ignore[attr-defined]
    if "." in prefix and not _names_test_framework(prefix.split(".")[0]):
        return None
    return "imports a module by a computed name at import time"


def _m_ends_process_at_import(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if not scope.import_time or module.is_main_script:
        return None
    if isinstance(node, ast.Raise) and node.exc is not None:
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        args = node.exc.args[:1] if isinstance(node.exc, ast.Call) else []
        if module.resolve(exc) in {"SystemExit", "builtins.SystemExit"} and not _fails_for_sure(
            args
        ):
            return f"raises {module.resolve(exc)} at import time"
    if isinstance(node, ast.Call):
        kind = module.exit_kind(node)
        if kind:
            return f"calls {kind} at import time"
        callee = module.resolve(node.func)
        if callee in module.ending:
            return f"calls {callee}() at import time, which {module.ending[callee]}"
    return None


def _handler_verdict(handler: ast.AST, module: Module) -> str | None:
    """Why a callable registered as a hook is dangerous, or None."""
    name = module.resolve(handler)
    if name in HARD_EXITS or name in SOFT_EXITS or name in KILLS:
        return f"ends the process ({name})"
    if name in module.ending:
        return module.ending[name]
    if name in module.writes_files:
        return "writes files"
    if isinstance(handler, ast.Lambda):
        for sub in ast.walk(handler.body):
            if isinstance(sub, ast.Call) and module.exit_kind(sub):
                return f"ends the process ({module.exit_kind(sub)})"
    return None


def _soft_only(handler: ast.AST, module: Module) -> bool:
    """True when the handler ends the process only by raising SystemExit."""
    if module.resolve(handler) in SOFT_EXITS:
        return True
    body = handler.body if isinstance(handler, ast.Lambda) else None
    if body is None:
        name = module.resolve(handler)
        body = module.functions.get(name or "")
    if body is None:
        return False
    kinds = {module.exit_kind(sub) for sub in ast.walk(body) if isinstance(sub, ast.Call)}
    kinds.discard(None)
    return bool(kinds) and kinds <= SOFT_EXITS


def _hook_handlers(node: ast.AST, module: Module) -> Iterator[tuple[str, ast.AST]]:
    if isinstance(node, ast.Call):
        registrar = module.resolve(node.func)
        if registrar in HOOK_REGISTRARS:
            candidates = list(node.args)
            candidates += [k.value for k in node.keywords if k.arg in {"target", "function"}]
            for candidate in candidates:
                yield registrar, candidate
    elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        for target in _stores(node):
            name = module.resolve(target)
            if name in HOOK_ATTRIBUTES:
                yield name, node.value


def _m_ends_process_from_hook(node: ast.AST, scope: Scope, module: Module) -> str | None:
    for registrar, handler in _hook_handlers(node, module):
        why = _handler_verdict(handler, module)
        graceful = registrar == "signal.signal" and why and _soft_only(handler, module)
        if graceful and not scope.import_time:
            continue  # a server's main() that exits on SIGTERM: SystemExit, not a forgery
        if why:
            return f"registers a handler with {registrar} that {why}"
    in_hook = isinstance(scope.func, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
        scope.func.name == "__del__" or scope.func.name in module.hooked
    )
    if in_hook and isinstance(node, ast.Call) and module.exit_kind(node):
        where = scope.func.name  # type: ignore[union-attr]
        return f"calls {module.exit_kind(node)} in {where}(), which runs as a hook"
    return None


def _m_hard_exit_outside_child(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if scope.import_time or module.forks or not isinstance(node, ast.Call):
        return None
    kind = module.exit_kind(node)
    if kind is None or kind in SOFT_EXITS:
        return None
    return f"calls {kind} in a module that never forks"


def _m_spawns_process_at_import(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if scope.import_time and isinstance(node, ast.Call):
        name = module.resolve(node.func)
        if name in SPAWNS:
            return f"calls {name} at import time"
    return None


def _m_parent_process_access(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if isinstance(node, ast.Call) and module.resolve(node.func) in {"os.getppid", "os.killpg"}:
        return f"calls {module.resolve(node.func)}"
    return None


def _m_dynamic_attribute_on_runtime_module(
    node: ast.AST, scope: Scope, module: Module
) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in {"__getattribute__", "__getattr__"}:
        # x.__getattribute__(name) is getattr(x, name) in disguise
        if node.args and _decodes(node.args[-1], module):
            return f"calls {func.attr} with a decoded name"
        return None
    if len(node.args) < 2:
        return None
    verb = module.resolve(func)
    if verb not in {"getattr", "setattr", "delattr", "hasattr"} or _is_str(node.args[1]):
        return None
    if module.fold(node.args[1]) is None and _decodes(node.args[1], module):
        # a name decoded from bytes or character codes hides what is reached, on any object
        return f"calls {verb} with a decoded name"
    target = module.resolve(node.args[0])
    if verb != "hasattr" and _root(target) in RUNTIME_MODULES:
        return f"calls {verb} on {target} with a computed name"
    return None


def _ignores_operands(value: ast.AST | None, args: ast.arguments) -> bool:
    """True when a returned expression mentions no parameter: the same for every input."""
    if value is None or (isinstance(value, ast.Name) and value.id == "NotImplemented"):
        return False
    params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
    return not any(isinstance(n, ast.Name) and n.id in params for n in ast.walk(value))


# Value types whose equality tests compare against: a subclass redefining it fools them.
BUILTIN_VALUE_TYPES = frozenset(
    {"int", "float", "complex", "str", "bytes", "bool", "list", "tuple", "dict", "set"}
    | {"frozenset", "bytearray", "decimal.Decimal", "fractions.Fraction", "Decimal", "Fraction"}
)


def _truth(node: ast.AST | None, me: str | None = None) -> bool | None:
    """The truth value an expression has whatever its operands are, if it is that trivial.

    ``me`` is the method's own first parameter: ``self is None`` is never true.
    """
    if node is None:
        return None
    if isinstance(node, ast.Constant):
        return bool(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _truth(node.operand, me)
        return None if inner is None else not inner
    if (
        me is not None
        and isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.left, ast.Name)
        and node.left.id == me
        and isinstance(node.comparators[0], ast.Constant)
        and node.comparators[0].value is None
        and isinstance(node.ops[0], (ast.Is, ast.IsNot))
    ):
        return isinstance(node.ops[0], ast.IsNot)
    if isinstance(node, ast.BoolOp):
        values = [_truth(v, me) for v in node.values]
        if isinstance(node.op, ast.Or):
            return True if True in values else (False if all(v is False for v in values) else None)
        return False if False in values else (True if all(v is True for v in values) else None)
    same = isinstance(node, ast.Compare) and len(node.ops) == 1
    if same and ast.dump(node.left) == ast.dump(node.comparators[0]):  # type: ignore[attr-defined]
        op = node.ops[0]  # type: ignore[attr-defined]
        if isinstance(op, (ast.Is, ast.Eq, ast.LtE, ast.GtE)):
            return True
        if isinstance(op, (ast.IsNot, ast.NotEq, ast.Lt, ast.Gt)):
            return False
    if isinstance(node, ast.Call) and _call_name_raw(node) == "bool" and len(node.args) == 1:
        return _truth(node.args[0], me)
    if isinstance(node, ast.IfExp):
        body, orelse = _truth(node.body, me), _truth(node.orelse, me)
        return body if body == orelse else None
    return None


def _ignores_self(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """True when a method never reads its first parameter (nor calls super()): an __eq__
    like ``return isinstance(other, int)`` equals every int whatever it holds."""
    params = [*func.args.posonlyargs, *func.args.args]
    if not params or any(
        isinstance(d, ast.Name) and d.id == "staticmethod" for d in func.decorator_list
    ):
        return False
    me = params[0].arg
    returns = [n.value for n in ast.walk(func) if isinstance(n, ast.Return)]
    if all(isinstance(v, ast.Name) and v.id == "NotImplemented" for v in returns):
        return False
    for sub in ast.walk(func):
        if isinstance(sub, ast.Name) and sub.id in (me, "super"):
            return False
    return True


def _always_answers(func: ast.AST, name: str) -> bool:
    """True when every return of ``__eq__`` is trivially true (``__ne__``: false)."""
    returns = [n for n in ast.walk(func) if isinstance(n, ast.Return)]
    if isinstance(func, ast.Lambda):
        returns = [ast.Return(value=func.body)]
    params = [*func.args.posonlyargs, *func.args.args]  # type: ignore[attr-defined]
    me = params[0].arg if params else None
    want = name == "__eq__"
    return bool(returns) and all(_truth(r.value, me) is want for r in returns)


def _m_always_equal(node: ast.AST, scope: Scope, module: Module) -> str | None:
    # Equality put onto a class from outside its body: `N.__eq__ = ...`, setattr(N, "__eq__",
    # ...), type("N", (), {"__eq__": ...}). Honest classes define it in their body.
    for target in _stores(node):
        if isinstance(target, ast.Attribute) and target.attr in _EQ_NAMES:
            return f"sets {target.attr} on a class from outside it"
    if isinstance(node, ast.Call):
        verb = module.resolve(node.func)
        if verb == "setattr" and len(node.args) >= 2 and module.fold(node.args[1]) in _EQ_NAMES:
            return f"sets {module.fold(node.args[1])} with setattr"
        if verb == "type" and len(node.args) == 3 and isinstance(node.args[2], ast.Dict):
            keys = [module.fold(k) for k in node.args[2].keys if k is not None]
            if any(k in _EQ_NAMES for k in keys):
                return "builds a class with type() whose __eq__ or __ne__ is given inline"
        return None
    if isinstance(node, ast.ClassDef):
        bases = [module.resolve(b) or "" for b in node.bases]
        builtin = next((b for b in bases if b in BUILTIN_VALUE_TYPES), None)
        defined = [
            s
            for s in node.body
            if (isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name in _EQ_NAMES)
            or any(isinstance(t, ast.Name) and t.id in _EQ_NAMES for t in _stores(s))
        ]
        if builtin and defined:
            return f"redefines equality of a subclass of {builtin}"
        return None
    if (
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name in _EQ_NAMES
        and _always_answers(node, node.name)
    ):
        return f"{node.name} gives the same answer whatever it compares"
    if (
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name in _EQ_NAMES
        and _ignores_self(node)
    ):
        return f"{node.name} answers without looking at its own value"
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
        for target in node.targets:
            if (
                isinstance(target, ast.Name)
                and target.id in _EQ_NAMES
                and _always_answers(node.value, target.id)
            ):
                return f"{target.id} gives the same answer whatever it compares"
    return _m_always_equal_by_operands(node, scope, module)


_EQ_NAMES = frozenset({"__eq__", "__ne__"})


def _m_always_equal_by_operands(node: ast.AST, scope: Scope, module: Module) -> str | None:
    # __eq__ that answers the same whatever it compares, e.g. `return True`, `return 1 == 1`.
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in _EQ_NAMES:
        body = [s for s in node.body if not _is_docstring_expr(s)]
        if (
            len(body) == 1
            and isinstance(body[0], ast.Return)
            and _ignores_operands(body[0].value, node.args)
        ):
            return f"{node.name} returns {ast.unparse(body[0].value)[:40]} whatever it compares"  # type: ignore[arg-type]
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
        lam = node.value
        for target in node.targets:
            if (
                isinstance(target, ast.Name)
                and target.id in _EQ_NAMES
                and _ignores_operands(lam.body, lam.args)
            ):
                return f"{target.id} returns {ast.unparse(lam.body)[:40]} whatever it compares"
    return None


def _m_writes_files_at_import(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if (
        scope.import_time
        and not module.is_main_script
        and isinstance(node, ast.Call)
        and _writes_file(node, module)
    ):
        return "writes a file at import time"
    return None


def _m_fakes_module_name(node: ast.AST, scope: Scope, module: Module) -> str | None:
    if scope.func is not None or scope.in_class:
        return None  # a class's or function's own __name__ is not the module's
    for target in _stores(node):
        if isinstance(target, ast.Name) and target.id == "__name__":
            return "assigns __name__"
    return None


# --------------------------------------------------------------------------------------
# The rule table.

_PASS = "can make a failing test look passed"

RULES: tuple[Rule, ...] = (
    Rule(
        "imports_test_framework",
        "product code imports pytest, _pytest, pluggy, xdist, unittest, mock, py or nose",
        f"the test framework's internals decide what counts as a pass; reaching them {_PASS}",
        _m_imports_test_framework,
        (ast.Import, ast.ImportFrom, ast.Call),
    ),
    Rule(
        "patches_test_framework",
        "assigns into the test framework (unittest.TestCase.assertEqual = ...) or "
        "rebinds AssertionError",
        f"a patched assertion never fails, which {_PASS}",
        _m_patches_test_framework,
        (*_STORES, ast.Call),
    ),
    Rule(
        "detects_test_run",
        "looks for pytest: PYTEST_* variables, 'pytest' in sys.modules or sys.argv (also "
        "assembled from literals: 'py' + 'test')",
        "code that behaves differently under test passes the test without fixing anything",
        _m_detects_test_run,
        (*_FOLDABLE, ast.Compare),
    ),
    Rule(
        "reads_ci_environment",
        "reads CI variables (CI, GITHUB_*, RUNNER_*, ACTIONS_*, ...)",
        "code that behaves differently in CI passes the gate without fixing anything",
        _m_reads_ci_environment,
        (ast.Subscript, ast.Call, ast.Compare),
    ),
    Rule(
        "mutates_environment_at_import",
        "changes os.environ (or calls putenv/unsetenv) while the module is imported",
        "the environment steers the harness (PYTEST_ADDOPTS, report paths) and its children",
        _m_mutates_environment_at_import,
        (*_STORES, ast.Call),
    ),
    Rule(
        "names_harness_file",
        "names a test report or harness file (junit, *.xml reports, .pytest_cache, "
        "conftest, sitecustomize, *.pth, .runcap, cage's worktree and log folders), "
        "also when the name is assembled from literals ('--jun' + 'itxml')",
        "writing the report or a start-up hook from product code forges the evidence",
        _m_names_harness_file,
        _FOLDABLE,
    ),
    Rule(
        "touches_site_packages",
        "uses site-packages locations (site.getsitepackages, site.addsitedir, ...)",
        "a file planted there runs at every interpreter start, including the verifier's",
        _m_touches_site_packages,
        (ast.Attribute, ast.Name),
    ),
    Rule(
        "replaces_builtin",
        "writes into builtins / __builtins__",
        f"a replaced builtin changes how every test runs, which {_PASS}",
        _m_replaces_builtin,
        (*_STORES, ast.Call),
    ),
    Rule(
        "replaces_sys_module_entry",
        "writes into sys.modules",
        f"swapping a module the tests import (or pytest itself) {_PASS}",
        _m_replaces_sys_module_entry,
        (*_STORES, ast.Call),
    ),
    Rule(
        "installs_import_hook",
        "changes sys.meta_path, sys.path_hooks or sys.path_importer_cache",
        "an import hook can rewrite the test modules as they are imported",
        _m_installs_import_hook,
        (*_STORES, ast.Call),
    ),
    Rule(
        "installs_tracer",
        "sys.settrace, sys.setprofile, threading.settrace, sys.monitoring, audit hooks",
        "a tracer sees and can alter every frame of the test run",
        _m_calls(TRACER_CALLS, "calls"),
        (ast.Call,),
    ),
    Rule(
        "inspects_caller_frames",
        "sys._getframe, inspect.stack/currentframe, f_back, f_locals, f_globals, a "
        "function's __globals__ or __closure__ (also named by a string)",
        "the caller's frame is the test: its locals and expected values can be read or "
        "changed; function globals lead from any harness object to the harness's modules",
        _m_inspects_caller_frames,
        (ast.Attribute, *_FOLDABLE),
    ),
    Rule(
        "walks_heap",
        "gc.get_objects, gc.get_referrers, gc.get_referents; walking sys.modules (values(), "
        "items(), iteration, list(sys.modules)) or looking a decoded name up in it",
        "walking the heap or the module table finds the harness's objects to patch without "
        "naming them (a TestReport whose outcome is rewritten before pytest counts it)",
        _m_walks_heap,
        (ast.Call, ast.For, ast.AsyncFor, ast.comprehension, ast.Subscript),
    ),
    Rule(
        "replaces_code_object",
        "assigns __code__/__defaults__, builds functions or code objects, marshal.loads",
        "swapping a function's code replaces the tested or the testing function unseen",
        _m_replaces_code_object,
        (*_STORES, ast.Call),
    ),
    Rule(
        "ctypes_interpreter_access",
        "ctypes.pythonapi, py_object, memmove, memset, from_address, _ctypes; CDLL(None) "
        "or libc/libpython loaded through ctypes",
        "raw memory access can rewrite any object, including the harness's; libc's exit() "
        "ends the process under a name no other rule knows",
        _m_ctypes_interpreter_access,
        (ast.Attribute, ast.Import, ast.ImportFrom, ast.Call),
    ),
    Rule(
        "obfuscated_code_execution",
        "exec/eval/compile of decoded or assembled text, of text read from a file, or of "
        "computed text at import time; runpy.run_path, SourceFileLoader, "
        "spec_from_file_location (a file run as Python whatever its name)",
        "hidden code escapes every other rule",
        _m_obfuscated_code_execution,
        (ast.Call,),
    ),
    Rule(
        "dynamic_import",
        "__import__/importlib.import_module with a computed name at import time, or with "
        "a name decoded from bytes or character codes anywhere",
        "a name built at run time hides an import of the test framework",
        _m_dynamic_import,
        (ast.Call,),
    ),
    Rule(
        "ends_process_at_import",
        "sys.exit, os._exit, exit, os.exec*, a self-kill or raise SystemExit at import time "
        "(module level, class body, decorators, or a local function called from there)",
        "ending the process before pytest writes its report can fake a pass",
        _m_ends_process_at_import,
        (ast.Raise, ast.Call),
    ),
    Rule(
        "ends_process_from_hook",
        "atexit/signal/weakref.finalize/Timer/Thread/excepthook handlers (and __del__) that "
        "end the process or write files",
        "an exit hook runs after the tests and can replace the exit status or the report",
        _m_ends_process_from_hook,
        (ast.Call, ast.Assign, ast.AnnAssign),
    ),
    Rule(
        "hard_exit_outside_child",
        "os._exit(0), os.exec*, a self-kill in a function of a module that never forks",
        "called from a test, it ends or replaces pytest before the report is written, so the "
        "exit status is no longer pytest's",
        _m_hard_exit_outside_child,
        (ast.Call,),
    ),
    Rule(
        "spawns_process_at_import",
        "subprocess, os.system, os.fork, os.spawn*, multiprocessing at import time",
        "a process started at import outlives checks and can act on the harness",
        _m_spawns_process_at_import,
        (ast.Call,),
    ),
    Rule(
        "parent_process_access",
        "os.getppid, os.killpg",
        "the parent is the harness; product code has no reason to reach it",
        _m_parent_process_access,
        (ast.Call,),
    ),
    Rule(
        "dynamic_attribute_on_runtime_module",
        "getattr/setattr/delattr on os, sys, builtins, ... with a computed name; "
        "getattr/__getattribute__ on anything with a name decoded from bytes, character "
        "codes or a file",
        "a computed attribute name hides a call such as os._exit from every other rule",
        _m_dynamic_attribute_on_runtime_module,
        (ast.Call,),
    ),
    Rule(
        "always_equal",
        "__eq__ that is trivially true (return True, x is x, ... or True) or ignores its "
        "operands, __ne__ trivially false; a subclass of int/str/... redefining equality; "
        "__eq__/__ne__ set on a class from outside its body (N.__eq__ = ..., setattr, type())",
        "a value equal to anything passes `assert f(x) == expected` without a fix",
        _m_always_equal,
        (ast.FunctionDef, ast.AsyncFunctionDef, ast.Assign, ast.ClassDef, ast.Call),
    ),
    Rule(
        "aliases_runtime_module",
        "os, sys, builtins, signal, subprocess, ... passed around as a value (a parameter "
        "default, a container, a walrus, importlib.import_module('o' + 's'))",
        "a module reached through a name the scanner cannot follow hides os._exit, "
        "os.environ and the like from every other rule",
        _m_aliases_runtime_module,
        (ast.Name, ast.Attribute, ast.Call),
    ),
    Rule(
        "defines_test_hook",
        "defines or names a pytest hook (pytest_collection_modifyitems, pytest_runtest_call, ...)",
        "a module loaded as a plugin (an entry point, a shadowed plugin module) rewrites what "
        f"the tests do or report, which {_PASS}",
        _m_defines_test_hook,
        (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, *_STORES, *_FOLDABLE),
    ),
    Rule(
        "writes_files_at_import",
        "open(..., 'w'), write_text, write_bytes, os.replace, shutil.copy at import time",
        "a file written while the tests run can be a conftest.py or .pth that pytest or the "
        "next run loads, or the report itself",
        _m_writes_files_at_import,
        (ast.Call,),
    ),
    Rule(
        "fakes_module_name",
        "assigns __name__",
        "rebinding __name__ turns on code hidden behind `if __name__ == '__main__'`",
        _m_fakes_module_name,
        _STORES,
    ),
    Rule(
        "shadows_test_framework_module",
        "adds a Python module or package named like the test framework (pytest.py, _pytest/)",
        "a module earlier on sys.path replaces the framework the tests import",
        None,
    ),
    Rule(
        "source_encoding",
        "a coding cookie (# -*- coding: unicode_escape -*-, utf-7, ...) under which Python "
        "reads other text than the UTF-8 bytes show",
        "escapes such as \\n or +AAo- put code on lines the diff calls unchanged and that "
        "reviewers read as a comment or a string",
        None,
    ),
    Rule(
        "unparseable_python",
        "a Python file that does not parse",
        "code the scanner cannot read cannot be cleared; a human must look",
        None,
    ),
    Rule(
        "too_large_to_scan",
        f"a Python file over {MAX_SCAN_BYTES} bytes",
        "code the scanner does not read cannot be cleared; a human must look",
        None,
    ),
)
_RULES_BY_CODE = {rule.code: rule for rule in RULES}
# Dispatch by node type: most nodes (names, operators, literals) concern no rule.
_RULES_BY_NODE: dict[type[ast.AST], tuple[Rule, ...]] = {}
for _rule in RULES:
    for _node_type in _rule.nodes:
        _RULES_BY_NODE[_node_type] = (*_RULES_BY_NODE.get(_node_type, ()), _rule)


# --------------------------------------------------------------------------------------
# Scanning.

_PY_SUFFIXES = (".py", ".pyw")
_SHEBANG_RE = re.compile(rb"^#![^\n]*\bpython[0-9.]*\b")


def is_python_path(path: str, content: bytes = b"") -> bool:
    """True for ``*.py``/``*.pyw`` files and files with a python shebang.

    ``*.pyi`` stubs are skipped: the interpreter never executes them.
    """
    if path.lower().endswith(_PY_SUFFIXES):
        return True
    return bool(_SHEBANG_RE.match(content[:200]))


_LINE_RE = re.compile(rb"\r\n|\r|\n")


def _lines(data: bytes) -> list[bytes]:
    # The same line breaks as Python's tokenizer, so numbers match ast's lineno.
    return _LINE_RE.split(data)


def changed_lines(old: bytes | None, new: bytes) -> set[int] | None:
    """1-based lines of ``new`` the change adds or alters; None means every line."""
    if old is None:
        return None
    old_lines, new_lines = _lines(old), _lines(new)
    # Trim the common head and tail first: most changes are small, and difflib is
    # quadratic on files of many repeated lines.
    head = 0
    limit = min(len(old_lines), len(new_lines))
    while head < limit and old_lines[head] == new_lines[head]:
        head += 1
    tail = 0
    while (
        tail < limit - head
        and old_lines[len(old_lines) - 1 - tail] == new_lines[len(new_lines) - 1 - tail]
    ):
        tail += 1
    old_mid = old_lines[head : len(old_lines) - tail]
    new_mid = new_lines[head : len(new_lines) - tail]
    if not old_mid and not new_mid:
        return set()
    # One side empty: a pure insertion or deletion, exactly what difflib would report.
    if not old_mid:
        return set(range(head + 1, head + len(new_mid) + 1))
    if not new_mid:
        return {head, head + 1}
    changed: set[int] = set()
    if len(old_mid) * len(new_mid) > MAX_DIFF_CELLS:
        # Too costly to align: judge the whole middle, which only over-reports.
        changed.update(range(head, head + len(new_mid) + 2))
        return changed
    matcher = difflib.SequenceMatcher(None, old_mid, new_mid, autojunk=False)
    for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if j1 == j2:
            # A pure deletion alters the code around it (a removed `return` or guard).
            changed.update({head + j1, head + j1 + 1})
        else:
            changed.update(range(head + j1 + 1, head + j2 + 1))
    return changed


def _odd_source_encoding(data: bytes) -> str | None:
    """The codec of a PEP 263 coding cookie when Python's decoding differs from UTF-8's.

    ``# coding: unicode_escape`` turns ``\\n`` into a line break and ``utf-7`` turns
    ``+AAo-`` into one: the file is valid UTF-8 for git and people, but the interpreter
    runs other lines. A cookie that changes nothing (``latin-1`` on ASCII text) is fine.
    """
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError:
        return None  # unknown codec: ast.parse reports the file as unparseable
    if encoding in ("utf-8", "utf-8-sig"):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None  # not UTF-8 at all: the gate blocks it as a structural finding
    try:
        if data.decode(encoding) == text:
            return None
    except (UnicodeError, LookupError):
        pass
    return encoding


def _finding(path: str, line: int, code: str, found: str) -> TamperFinding:
    why = _RULES_BY_CODE[code].why
    return TamperFinding(path, line, code, f"{path}:{line}: {found}: {why}")


def _shadow_finding(path: str) -> TamperFinding | None:
    parts = re.split(r"[/\\]", path)
    stem = parts[-1].rsplit(".", 1)[0]
    # A directory named "py" (bindings/py/) or a module named "mock" (backends/mock.py) is
    # common in product code; neither is worth a human on its own.
    dirs = [p for p in parts[:-1] if p not in {"py", "mock"}]
    for part in [*dirs, stem if stem != "mock" else ""]:
        if part in TEST_FRAMEWORK_MODULES or part == "conftest":
            found = f"adds the module {part!r}"
            return _finding(path, 1, "shadows_test_framework_module", found)
    return None


# Leaf nodes no rule looks at: contexts and operators.
_SKIPPED = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def _walk(tree: ast.Module, module: Module) -> Iterator[tuple[ast.AST, Scope]]:
    """Every node with the scope it executes in (iterative: deep files cannot recurse).

    The body of each top-level function gets one shared Scope (``module.body_scopes``) and
    each ``if __name__ == "__main__"`` body one too (``module.script_scopes``), so that
    both can be re-marked once the whole file is known.
    """
    stack: list[tuple[ast.AST, Scope]] = []
    for statement in reversed(tree.body):
        stack.append((statement, Scope(None, _span(statement), True)))
    while stack:
        node, scope = stack.pop()
        yield node, scope
        children: list[tuple[ast.AST, Scope]] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            top_level = scope.func is None and module.functions.get(node.name) is node
            inner = Scope(node, _span(node), False, node.name if top_level else scope.top)
            if top_level:
                module.body_scopes[node.name] = inner
            for name, value in ast.iter_fields(node):
                target = inner if name == "body" else scope
                children.extend((child, target) for child in _as_nodes(value))
        elif isinstance(node, ast.Lambda):
            inner = Scope(node, scope.unit, False, scope.top)
            children.append((node.args, scope))
            children.append((node.body, inner))
        elif isinstance(node, ast.ClassDef):
            inner = Scope(scope.func, _span(node), scope.import_time, scope.top, True)
            for name, value in ast.iter_fields(node):
                target = inner if name == "body" else scope
                children.extend((child, target) for child in _as_nodes(value))
        elif scope.func is None and scope.import_time and _is_main_guard(node):
            assert isinstance(node, ast.If)
            script = Scope(None, scope.unit, False)
            module.script_scopes.append(script)
            children.append((node.test, scope))
            children.extend((child, script) for child in node.body)
            children.extend((child, scope) for child in node.orelse)
        else:
            children.extend(
                (child, scope)
                for child in ast.iter_child_nodes(node)
                if not isinstance(child, _SKIPPED)
            )
        stack.extend(reversed(children))


def _as_nodes(value: object) -> Iterable[ast.AST]:
    if isinstance(value, ast.AST):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, ast.AST)]
    return []


def _writes_file(call: ast.Call, module: Module) -> bool:
    name = module.resolve(call.func) or ""
    method = call.func.attr if isinstance(call.func, ast.Attribute) else ""
    if method in {"write_text", "write_bytes"} or name in FILE_WRITERS:
        return True
    if name in {"open", "io.open"}:
        mode = call.args[1] if len(call.args) > 1 else None
        for keyword in call.keywords:
            if keyword.arg == "mode":
                mode = keyword.value
        if mode is not None:
            return not _is_str(mode) or bool(set(mode.value) & set("wax+"))  # type: ignore[attr-defined]
    return False


class _InnerStrings:
    """``id(node) in module.inner_strings``: part of a string expression that folds."""

    def __init__(self, module: Module) -> None:
        self.module = module

    def __contains__(self, key: int) -> bool:
        parent = self.module.string_parent.get(key)
        return parent is not None and self.module.fold(parent) is not None


_LOOKING_CALLS = frozenset(
    {"getattr", "hasattr", "setattr", "delattr", "vars", "dir", "isinstance", "id", "type"}
)


def _learn_positions(module: Module, node: ast.AST) -> None:
    """Where an expression only serves its parent: looked into, or part of a string."""
    looked, parent = module.looked_into, module.string_parent
    if isinstance(node, (ast.Attribute, ast.Subscript)):
        looked.add(id(node.value))
        if isinstance(node, ast.Subscript):
            parent[id(node.value)] = node
    elif isinstance(node, ast.Call):
        looked.add(id(node.func))
        if isinstance(node.func, ast.Name) and node.func.id in _LOOKING_CALLS and node.args:
            looked.add(id(node.args[0]))
        if isinstance(node.func, ast.Attribute):
            parent[id(node.func.value)] = node
        for arg in node.args:
            parent[id(arg)] = node
            if isinstance(arg, (ast.List, ast.Tuple)):
                for item in arg.elts:
                    parent[id(item)] = node
    elif isinstance(node, ast.BinOp):
        parent[id(node.left)] = node
        parent[id(node.right)] = node
    elif isinstance(node, ast.JoinedStr):
        for value in node.values:
            parent[id(value)] = node
            if isinstance(value, ast.FormattedValue):
                parent[id(value.value)] = node
    elif isinstance(node, ast.Assign):
        for target in node.targets:
            if isinstance(target, ast.Name):
                module.assigned.setdefault(target.id, []).append(node.value)
        if isinstance(node.value, (ast.Name, ast.Attribute)) and all(
            isinstance(t, ast.Name) for t in node.targets
        ):
            looked.add(id(node.value))  # `o = os`: the resolver follows plain bindings


def _learn(module: Module, node: ast.AST, scope: Scope, docstrings: set[int]) -> None:
    """Record what one node tells about the whole file (names, calls, decorators)."""
    _learn_positions(module, node)
    if isinstance(node, ast.Call):
        module.calls.append((node, scope))
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.asname:
                module.aliases[alias.asname] = alias.name
            else:
                root = alias.name.split(".", 1)[0]
                module.aliases[root] = root
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        for alias in node.names:
            if alias.name == "*":
                module.star_modules.add(node.module)
            else:
                module.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    elif _is_docstring_expr(node):
        docstrings.add(id(node.value))  # type: ignore[attr-defined]
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        module.assignments.append(node)
        value = getattr(node, "value", None)
        if isinstance(node, ast.Assign) and isinstance(value, (ast.Name, ast.Attribute)):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    module.bound[target.id] = value
        if (
            scope.func is None
            and not scope.in_class
            and any(isinstance(t, ast.Name) and t.id == "__name__" for t in _stores(node))
        ):
            module.renames_module = True
    if (
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and scope.func is None
        and scope.import_time
    ):
        module.decorated.append(node)


def _conclude(module: Module) -> None:
    """After the walk: what each local function does and what runs at import time."""
    if module.renames_module:
        # `__name__ = "__main__"` makes the guarded block run on import.
        for script in module.script_scopes:
            script.import_time = True
    seeds: list[str] = []
    for call, scope in module.calls:
        name = module.resolve(call.func)
        if name in FORKS:
            module.forks = True
        local = call.func.id if isinstance(call.func, ast.Name) else None
        if local not in module.functions:
            local = None
        if scope.func is None and scope.import_time and local:
            seeds.append(local)
        if scope.top:
            kind = module.exit_kind(call)
            if kind and scope.top not in module.ending:
                module.ending[scope.top] = f"ends the process ({kind})"
            if _writes_file(call, module):
                module.writes_files.add(scope.top)
            if local:
                module.callees.setdefault(scope.top, []).append(local)
        _note_hooks(module, call)
    for assignment in module.assignments:
        _note_hooks(module, assignment)
    for node in module.decorated:
        for decorator in node.decorator_list:  # type: ignore[attr-defined]
            base = decorator.func if isinstance(decorator, ast.Call) else decorator
            if isinstance(base, ast.Name):
                seeds.append(base.id)
    changed = True
    while changed:
        changed = False
        for name in module.functions:
            if name in module.ending:
                continue
            for callee in module.callees.get(name, ()):
                if callee in module.ending:
                    module.ending[name] = f"calls {callee}(), which {module.ending[callee]}"
                    changed = True
                    break
    pending = seeds
    while pending:
        name = pending.pop()
        if name in module.functions and name not in module.import_reachable:
            module.import_reachable.add(name)
            pending.extend(module.callees.get(name, ()))
    for name in module.import_reachable:
        if name in module.body_scopes:
            module.body_scopes[name].import_time = True


def _note_hooks(module: Module, node: ast.AST) -> None:
    for _registrar, handler in _hook_handlers(node, module):
        if isinstance(handler, ast.Name) and handler.id in module.functions:
            module.hooked.add(handler.id)


def _touches_statement(tree: ast.Module, ordered: list[int]) -> bool:
    """True when one of the (sorted) lines falls inside a top-level statement's span."""
    for statement in tree.body:
        start, end = _span(statement)
        first = bisect.bisect_left(ordered, start)
        if first < len(ordered) and ordered[first] <= end:
            return True
    return False


def scan_change(path: str, old: bytes | None, new: bytes) -> list[TamperFinding]:
    """Findings for the code that the change from ``old`` to ``new`` adds or alters.

    ``old`` is None for an added file. Files that are not Python give ``[]``. A Python file
    that cannot be parsed, or is too large to scan, is itself a finding, so code cannot
    hide by being unreadable.
    """
    if not is_python_path(path, new):
        return []
    findings: list[TamperFinding] = []
    if old is None:
        shadow = _shadow_finding(path)
        if shadow:
            findings.append(shadow)
    if len(new) > MAX_SCAN_BYTES:
        found = f"is {len(new)} bytes, over the scanner's limit of {MAX_SCAN_BYTES}"
        return [*findings, _finding(path, 1, "too_large_to_scan", found)]
    encoding = _odd_source_encoding(new)
    if encoding is not None:
        # Python reads the file through the declared codec, so the diff's byte lines are
        # not the lines the interpreter runs: judge the whole file, and ask a human.
        found = (
            f"declares the source encoding {encoding!r}: Python runs text that differs from "
            "the UTF-8 that the diff and reviewers see"
        )
        findings.append(_finding(path, 1, "source_encoding", found))
        changed = None
    else:
        changed = changed_lines(old, new)
    if changed is not None and not changed:
        return findings
    try:
        tree = ast.parse(new, filename=path)
    except SyntaxError as error:
        line = error.lineno or 1
        found = f"does not parse ({error.msg})"
        return [*findings, _finding(path, line, "unparseable_python", found)]
    except (ValueError, RecursionError, MemoryError) as error:
        found = f"does not parse ({type(error).__name__})"
        return [*findings, _finding(path, 1, "unparseable_python", found)]
    if changed is not None and not _touches_statement(tree, sorted(changed)):
        # Only lines between top-level statements changed (comments, blank lines): every
        # unit judged below lies inside a top-level statement, so none would be.
        findings.sort(key=lambda f: (f.line, f.code))
        return findings
    module = Module()
    module.is_main_script = re.split(r"[/\\]", path)[-1] == "__main__.py"
    module.functions = {
        node.name: node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    docstrings: set[int] = set()
    ordered = sorted(changed) if changed is not None else []
    judged: dict[tuple[int, int], bool] = {}
    candidates: list[tuple[ast.AST, Scope]] = []
    for node, scope in _walk(tree, module):
        _learn(module, node, scope, docstrings)
        if type(node) not in _RULES_BY_NODE:
            continue
        # Only code in a unit the change touches is judged.
        if changed is not None:
            if scope.unit not in judged:
                first = bisect.bisect_left(ordered, scope.unit[0])
                judged[scope.unit] = first < len(ordered) and ordered[first] <= scope.unit[1]
            if not judged[scope.unit]:
                continue
        candidates.append((node, scope))
    _conclude(module)
    seen: set[tuple[int, str]] = set()
    for node, scope in candidates:
        if id(node) in docstrings:
            continue
        for rule in _RULES_BY_NODE[type(node)]:
            found = rule.matcher(node, scope, module)  # type: ignore[misc]
            if found is None:
                continue
            line = getattr(node, "lineno", scope.unit[0])
            if (line, rule.code) in seen:
                continue
            seen.add((line, rule.code))
            findings.append(_finding(path, line, rule.code, found))
    findings.sort(key=lambda f: (f.line, f.code))
    return findings
