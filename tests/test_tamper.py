"""Tests for cage.tamper: every rule has a hit and a look-alike that is not one."""

from __future__ import annotations

import ast
import subprocess
import textwrap

import pytest

from cage.tamper import MAX_SCAN_BYTES, RULES, TamperFinding, changed_lines, scan_change

PATH = "src/calc/ops.py"


def src(text: str) -> bytes:
    return textwrap.dedent(text).lstrip("\n").encode()


def codes(old: str | None, new: str, path: str = PATH) -> list[str]:
    old_bytes = None if old is None else src(old)
    return [f.code for f in scan_change(path, old_bytes, src(new))]


# (code, hit, look-alike). Each source is scanned as a new file under src/.
CASES: list[tuple[str, str, str]] = [
    ("imports_test_framework", "import pytest\n", "import pytz\n"),
    ("imports_test_framework", "from _pytest import runner\n", "from . import testing\n"),
    ("imports_test_framework", "from unittest import mock\n", "import typing\n"),
    ("imports_test_framework", "m = __import__('pytest')\n", "m = __import__('json')\n"),
    (
        "imports_test_framework",
        "import importlib\nm = importlib.import_module('_pytest.junitxml')\n",
        "import importlib\nm = importlib.import_module('json')\n",
    ),
    ("imports_test_framework", "import pluggy\n", "import plugins\n"),
    (
        "patches_test_framework",
        "import unittest\nunittest.TestCase.assertEqual = lambda *a: None\n",
        "class Case:\n    def setup(self):\n        self.assertEqual = print\n",
    ),
    ("patches_test_framework", "AssertionError = Warning\n", "error = AssertionError\n"),
    (
        "detects_test_run",
        "import os\nIN_TEST = os.environ.get('PYTEST_CURRENT_TEST')\n",
        "import os\nHOME = os.environ.get('HOME')\n",
    ),
    (
        "detects_test_run",
        "import sys\ndef add(a, b):\n    if 'pytest' in sys.modules:\n        return 4\n"
        "    return a - b\n",
        "import sys\ndef add(a, b):\n    if 'json' in sys.modules:\n        return 4\n"
        "    return a - b\n",
    ),
    (
        "detects_test_run",
        "import sys\ndef f():\n    return sys.argv[0].endswith('pytest')\n",
        "def f(name):\n    return name.endswith('.txt')\n",
    ),
    (
        "detects_test_run",
        "import sys\ndef f():\n    return sys.modules.get('_pytest')\n",
        "def f():\n    raise RuntimeError('run pytest to check this')\n",
    ),
    (
        "reads_ci_environment",
        "import os\ndef add(a, b):\n    if os.getenv('GITHUB_ACTIONS'):\n        return 4\n"
        "    return a - b\n",
        "import os\ndef add(a, b):\n    if os.getenv('CALC_DEBUG'):\n        return 4\n"
        "    return a - b\n",
    ),
    (
        "reads_ci_environment",
        "import os\nON_CI = 'CI' in os.environ\n",
        "import os\nHAS_HOME = 'HOME' in os.environ\n",
    ),
    (
        "mutates_environment_at_import",
        "import os\nos.environ['PYTHONOPTIMIZE'] = '1'\n",
        "import os\ndef configure():\n    os.environ['CALC_MODE'] = 'fast'\n",
    ),
    (
        "mutates_environment_at_import",
        "import os\nos.environ.update(X='1')\n",
        "import os\nMODE = os.environ.get('CALC_MODE', 'fast')\n",
    ),
    (
        "names_harness_file",
        "def f():\n    open('junit.xml', 'w').write('<testsuite/>')\n",
        "def f():\n    open('report.txt', 'w').write('done')\n",
    ),
    (
        "names_harness_file",
        "def f(d):\n    (d / 'evil.pth').write_text('import os')\n",
        "def f(d):\n    return d / 'depth.txt'\n",
    ),
    (
        "names_harness_file",
        "import pathlib\ndef f(d):\n    pathlib.Path(d, 'test-results.xml').write_text('')\n",
        "def f(d):\n    return d / 'latest.xml'\n",
    ),
    (
        "ends_process_from_hook",
        "import signal, os\ndef serve():\n"
        "    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n",
        "import signal, sys\ndef serve():\n"
        "    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n",
    ),
    (
        "touches_site_packages",
        "import site\nPATHS = site.getsitepackages()\n",
        "site_packages = 'vendor'\n",
    ),
    (
        "replaces_builtin",
        "import builtins\nbuiltins.len = lambda x: 4\n",
        "import builtins\nprint_ = builtins.print\n",
    ),
    (
        "replaces_builtin",
        "def f():\n    __builtins__['abs'] = lambda x: 0\n",
        "def f():\n    abs = 3\n    return abs\n",
    ),
    (
        "replaces_builtin",
        "import builtins\nsetattr(builtins, 'sum', lambda *a: 4)\n",
        "import builtins\nfound = hasattr(builtins, 'sum')\n",
    ),
    (
        "replaces_sys_module_entry",
        "import sys\nsys.modules['calc.ops'] = object()\n",
        "import sys\nthis = sys.modules[__name__]\n",
    ),
    (
        "replaces_sys_module_entry",
        "import sys\nsys.modules.update({'json': None})\n",
        "import sys\njson = sys.modules.get('json')\n",
    ),
    (
        "installs_import_hook",
        "import sys\nsys.meta_path.insert(0, object())\n",
        "import sys\nFINDERS = list(sys.meta_path)\n",
    ),
    (
        "installs_tracer",
        "import sys\nsys.settrace(lambda *a: None)\n",
        "import sys\nTRACING = sys.gettrace() is not None\n",
    ),
    (
        "inspects_caller_frames",
        "import sys\ndef add(a, b):\n    sys._getframe(1).f_locals['expected'] = a - b\n"
        "    return a - b\n",
        "import inspect\ndef arity(f):\n    return len(inspect.signature(f).parameters)\n",
    ),
    (
        "inspects_caller_frames",
        "import inspect\ndef f():\n    return inspect.stack()\n",
        "import inspect\ndef f(x):\n    return inspect.isclass(x)\n",
    ),
    (
        "walks_heap",
        "import gc\ndef f():\n    return [o for o in gc.get_objects() if callable(o)]\n",
        "import gc\ndef f():\n    gc.collect()\n",
    ),
    (
        "replaces_code_object",
        "def f():\n    pass\ndef g():\n    return 4\nf.__code__ = g.__code__\n",
        "def f():\n    pass\nf.__doc__ = 'adds'\n",
    ),
    (
        "replaces_code_object",
        "import types\nf = types.FunctionType(compile('4', 'x', 'eval'), {})\n",
        "import types\nns = types.SimpleNamespace(a=1)\n",
    ),
    (
        "ctypes_interpreter_access",
        "import ctypes\nctypes.pythonapi.PyFrame_LocalsToFast\n",
        "import ctypes\nlibm = ctypes.CDLL('libm.so.6')\n",
    ),
    (
        "obfuscated_code_execution",
        "import base64\ndef f():\n    exec(base64.b64decode('cHJpbnQoMSk='))\n",
        "def evaluate(expression):\n    return eval(expression, {'__builtins__': {}})\n",
    ),
    (
        "obfuscated_code_execution",
        "CODE = open('x').read()\nexec(CODE)\n",
        "exec('X = 1')\n",
    ),
    (
        "dynamic_import",
        "import importlib\nm = importlib.import_module('_py' + 'test')\n",
        "import importlib\nNAME = 'fast'\nm = importlib.import_module(f'calc.backends.{NAME}')\n",
    ),
    (
        "ends_process_at_import",
        "import os\nos._exit(0)\n",
        "import os\ndef child():\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n",
    ),
    (
        "ends_process_at_import",
        "import sys\nsys.exit(0)\n",
        "import sys\ndef main():\n    return 0\nif __name__ == '__main__':\n    sys.exit(main())\n",
    ),
    ("ends_process_at_import", "raise SystemExit(0)\n", "def f():\n    raise SystemExit(0)\n"),
    (
        "ends_process_at_import",
        "try:\n    import rich\nexcept ImportError:\n    raise SystemExit\n",
        "try:\n    import rich\nexcept ImportError:\n    raise SystemExit(1)\n",
    ),
    (
        "ends_process_at_import",
        "import sys\nif sys.version_info < (3, 10):\n    sys.exit(0)\n",
        "import sys\nif sys.version_info < (3, 10):\n    sys.exit('calc needs Python 3.10')\n",
    ),
    (
        "ends_process_at_import",
        "class A:\n    exit(0)\n",
        "class A:\n    def stop(self):\n        exit(0)\n",
    ),
    (
        "ends_process_at_import",
        "import sys\ndef main():\n    sys.exit(0)\nmain()\n",
        "import sys\ndef main():\n    sys.exit(0)\n",
    ),
    (
        "ends_process_at_import",
        "import os\ndef deco(f):\n    os._exit(0)\n@deco\ndef add(a, b):\n    return a - b\n",
        "import functools\ndef deco(f):\n    return functools.wraps(f)(f)\n@deco\n"
        "def add(a, b):\n    return a - b\n",
    ),
    (
        "ends_process_at_import",
        "import os\nos.execv('/bin/true', ['true'])\n",
        "import os\nEXE = os.path.join('/bin', 'true')\n",
    ),
    (
        "ends_process_from_hook",
        "import atexit, os\natexit.register(lambda: os._exit(0))\n",
        "import atexit, logging\natexit.register(logging.shutdown)\n",
    ),
    (
        "ends_process_from_hook",
        "import atexit, os\natexit.register(os._exit, 0)\n",
        "import atexit, shutil\natexit.register(shutil.rmtree, '/tmp/calc', True)\n",
    ),
    (
        "ends_process_from_hook",
        "import atexit\ndef rewrite():\n    with open(REPORT, 'w') as f:\n        f.write('')\n"
        "atexit.register(rewrite)\n",
        "import atexit\ndef show():\n    with open(LOG) as f:\n        print(f.read())\n"
        "atexit.register(show)\n",
    ),
    (
        "ends_process_from_hook",
        "import os\nclass Result:\n    def __del__(self):\n        os._exit(0)\n",
        "class Result:\n    def __del__(self):\n        self.close()\n",
    ),
    (
        "ends_process_from_hook",
        "import sys\ndef hook(*a):\n    sys.exit(0)\nsys.excepthook = hook\n",
        "import sys\ndef hook(*a):\n    print(a)\nsys.excepthook = hook\n",
    ),
    (
        "hard_exit_outside_child",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
        "import os\ndef add(a, b):\n    os._exit(3)\n",
    ),
    (
        "hard_exit_outside_child",
        "import os, signal\ndef add(a, b):\n    os.kill(os.getpid(), signal.SIGKILL)\n",
        "import os, signal\ndef stop(pid):\n    os.kill(pid, signal.SIGTERM)\n",
    ),
    (
        "spawns_process_at_import",
        "import subprocess\nsubprocess.Popen(['sleep', '100'])\n",
        "import subprocess\ndef run():\n    return subprocess.run(['ls'], check=True)\n",
    ),
    ("spawns_process_at_import", "import os\nos.fork()\n", "import os\nPID = os.getpid()\n"),
    (
        "parent_process_access",
        "import os\ndef f():\n    return os.getppid()\n",
        "import os\ndef f():\n    return os.getpid()\n",
    ),
    (
        "dynamic_attribute_on_runtime_module",
        "import os\ndef f(n):\n    getattr(os, '_' + n)(0)\n",
        "def f(obj, n):\n    return getattr(obj, n)\n",
    ),
    (
        "always_equal",
        "class Num:\n    def __eq__(self, other):\n        return True\n",
        "class Num:\n    def __eq__(self, other):\n        return isinstance(other, Num) and "
        "self.v == other.v\n",
    ),
    (
        "always_equal",
        "class Num:\n    def __ne__(self, other):\n        '''Never differ.'''\n"
        "        return False\n",
        "class Num:\n    def __ne__(self, other):\n        return not self == other\n",
    ),
    ("always_equal", "class Num:\n    __eq__ = lambda s, o: True\n", "class Num:\n    x = True\n"),
    (
        "always_equal",
        "class Num:\n    def __eq__(self, other):\n        return 1 == 1\n",
        "class Num:\n    def __eq__(self, other):\n        return NotImplemented\n",
    ),
    (
        "writes_files_at_import",
        "import pathlib\npathlib.Path('tests', 'sub', 'conf' + 'test.py').write_text('x')\n",
        "import pathlib\nTEXT = pathlib.Path(__file__).with_name('data.txt').read_text()\n",
    ),
    (
        "writes_files_at_import",
        "with open(NAME, 'w') as f:\n    f.write('')\n",
        "with open(NAME) as f:\n    DATA = f.read()\n",
    ),
    ("fakes_module_name", "__name__ = '__main__'\n", "NAME = __name__\n"),
    # Red-team additions (docs/redteam.md): names assembled from literals, modules passed
    # around as values, pytest hooks, coding cookies, equality on builtin subclasses.
    (
        "detects_test_run",
        "import sys\ndef f():\n    return ('py' + 'test') in sys.modules\n",
        "import sys\ndef f():\n    return ('js' + 'on') in sys.modules\n",
    ),
    (
        "names_harness_file",
        "def f(v):\n    return v.startswith('--jun' + 'itxml=')\n",
        "def f(v):\n    return v.startswith('--ver' + 'bose')\n",
    ),
    (
        "names_harness_file",
        "import os\ndef f():\n    return '/cage-wt-' in os.getcwd()\n",
        "import os\ndef f():\n    return '/cage/' in os.getcwd()\n",
    ),
    (
        "aliases_runtime_module",
        "import os\ndef add(a, b, _o=os):\n    return _o.getcwd()\n",
        "import os\ndef here():\n    return os.getcwd()\n",
    ),
    (
        "aliases_runtime_module",
        "import importlib\ndef f():\n    m = importlib.import_module('o' + 's')\n    return m\n",
        "import importlib\ndef f(name):\n    return importlib.import_module(name)\n",
    ),
    (
        "aliases_runtime_module",
        "import shutil\nMODS = [shutil.os]\n",
        "import os\nSEP = os.sep\nalias = os\nHAS = hasattr(os, 'fork')\n",
    ),
    (
        "defines_test_hook",
        "def pytest_collection_modifyitems(items):\n    pass\n",
        "def collect_items(items):\n    pass\n",
    ),
    (
        "defines_test_hook",
        "globals()['pytest_' + 'configure'] = print\n",
        "NAME = 'pytest-style output'\n",
    ),
    (
        "source_encoding",
        "# -*- coding: unicode_escape -*-\nx = 1\\ny = 2\n",
        "# -*- coding: latin-1 -*-\nx = 1\n",
    ),
    (
        "always_equal",
        "class N(int):\n    def __eq__(self, other):\n        return int(self) == other\n",
        "class N:\n    def __eq__(self, other):\n"
        "        return isinstance(other, N) and other.v == self.v\n",
    ),
    (
        "always_equal",
        "class N:\n    def __eq__(self, other):\n        del other\n        return not False\n",
        "class N:\n    def __eq__(self, other):\n        return other is self\n",
    ),
    (
        "always_equal",
        "class N:\n    def __eq__(self, other):\n        return other == other or True\n",
        "class N:\n    def __ne__(self, other):\n        return not self == other\n",
    ),
    (
        "always_equal",
        "class N:\n    def __eq__(self, other):\n        return isinstance(other, int)\n",
        "class N:\n    def __eq__(self, other):\n        return super().__eq__(other)\n",
    ),
    (
        "always_equal",
        "class N:\n    pass\n\n\nN.__eq__ = lambda s, o: o is not None or s\n",
        "class N:\n    pass\n\n\nN.__doc__ = 'a number'\n",
    ),
    (
        "always_equal",
        "N = type('N', (), {'__eq__': lambda s, o: True})\n",
        "N = type('N', (), {'size': 1})\n",
    ),
    (
        "always_equal",
        "class N:\n    def __eq__(self, o):\n        return self is not None or o\n",
        "class N:\n    def __eq__(self, o):\n        return self.v is not None and self.v == o\n",
    ),
    (
        "hard_exit_outside_child",
        "def stop(m):\n    m._exit(0)\n",
        "def stop(m):\n    m.exit_code(0)\n",
    ),
    (
        "hard_exit_outside_child",
        "def stop(m):\n    getattr(m, '_ex' + 'it')(0)\n",
        "def stop(m):\n    getattr(m, 'close')()\n",
    ),
    (
        "dynamic_import",
        "def f():\n    return __import__(bytes([111, 115]).decode()).getcwd()\n",
        "import importlib\ndef f(name):\n    return importlib.import_module(name).VERSION\n",
    ),
    (
        "walks_heap",
        "import sys\ndef f():\n    for m in list(sys.modules.values()):\n        print(m)\n",
        "import sys\ndef f():\n    return sys.modules[__name__]\n",
    ),
    (
        "walks_heap",
        "import sys\ndef f():\n    return [m for m in sys.modules]\n",
        "import sys\ndef f():\n    return sys.modules.get('json')\n",
    ),
    (
        "walks_heap",
        "import sys\ndef f():\n    name = bytes([111, 115]).decode()\n"
        "    return sys.modules[name]\n",
        "import sys\ndef f(obj):\n    return sys.modules[obj.__module__]\n",
    ),
    (
        "inspects_caller_frames",
        "import sys\ndef f():\n    return type(sys.stdout).name.fget.__globals__\n",
        "def f(g):\n    return g.__name__\n",
    ),
    (
        "inspects_caller_frames",
        "def f(x):\n    return getattr(x, '__glo' + 'bals__')\n",
        "def f(x):\n    return getattr(x, '__na' + 'me__')\n",
    ),
    (
        "dynamic_attribute_on_runtime_module",
        "def f(x):\n    return getattr(x, bytes([110, 97]).decode())\n",
        "def f(x, name):\n    return getattr(x, name)\n",
    ),
    (
        "dynamic_attribute_on_runtime_module",
        "def f(x, raw):\n    return x.__getattribute__(raw.decode())\n",
        "def f(x):\n    return x.__getattribute__('size')\n",
    ),
    (
        "obfuscated_code_execution",
        "import pathlib\ndef f():\n    exec(pathlib.Path('impl.txt').read_text(), {})\n",
        "def f(expression):\n    return eval(expression, {})\n",
    ),
    (
        "obfuscated_code_execution",
        "import runpy\ndef f():\n    return runpy.run_path('impl.txt')['add']\n",
        "import runpy\ndef f():\n    return runpy\n",
    ),
    (
        "ctypes_interpreter_access",
        "import ctypes\ndef f():\n    ctypes.CDLL(None).exit(0)\n",
        "import ctypes\nLIBM = ctypes.CDLL('libm.so.6')\n",
    ),
]


@pytest.mark.parametrize(
    ("code", "hit", "lookalike"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_rule_hit_and_lookalike(code: str, hit: str, lookalike: str) -> None:
    assert code in codes(None, hit)
    assert code not in codes(None, lookalike)


def test_every_rule_has_a_case() -> None:
    covered = {case[0] for case in CASES} | {
        "shadows_test_framework_module",
        "unparseable_python",
        "too_large_to_scan",
    }
    assert {rule.code for rule in RULES} == covered


def test_finding_names_file_line_and_reason() -> None:
    findings = scan_change(PATH, None, src("import os\n\n\nos._exit(0)\n"))
    assert findings == [
        TamperFinding(
            PATH,
            4,
            "ends_process_at_import",
            f"{PATH}:4: calls os._exit at import time: ending the process before pytest "
            "writes its report can fake a pass",
        )
    ]


# --- aliasing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "import os as o\no._exit(0)\n",
        "from os import _exit as e\ne(0)\n",
        "from os import *\n_exit(0)\n",
        "import sys\ngetattr(sys, 'exit')(0)\n",
        "import os\nos.__dict__['_exit'](0)\n",
        "import os\nvars(os)['_exit'](0)\n",
        "import os\nquit_now = os._exit\nquit_now(0)\n",
        "import sys\nsys.modules['os']._exit(0)\n",
        "import os\nsystem = os\nstop = system._exit\nstop(0)\n",
        "__import__('os')._exit(0)\n",
        "import importlib\nimportlib.import_module('os')._exit(0)\n",
    ],
)
def test_aliases_are_resolved(source: str) -> None:
    assert "ends_process_at_import" in codes(None, source)


def test_local_variable_named_like_a_module_is_not_the_module() -> None:
    new = "class Lexer:\n    builtins = {'car'}\n    def add(self):\n        builtins = set()\n"
    new += "        builtins.update(['cdr'])\n        sys = object()\n        sys.exit = 1\n"
    assert codes(None, new) == []


def test_class_attribute_named___name___is_not_a_module_rename() -> None:
    assert codes(None, "class Ref:\n    __name__ = 'Ref'\n") == []


def test_self_referencing_binding_does_not_loop() -> None:
    assert codes(None, "a = b\nb = a\na.x()\nc = c.d\nc()\n") == []


def test_alias_of_builtins_module() -> None:
    assert codes(None, "import builtins as b\nb.abs = len\n") == ["replaces_builtin"]


# --- changed lines only ---------------------------------------------------------------

CLI_OLD = """
import sys

def main():
    print("hello")
    sys.exit(0)

def helper():
    return 1
"""


def test_preexisting_code_is_not_reported() -> None:
    old = "import pytest\n\ndef add(a, b):\n    return a - b\n"
    new = "import pytest\n\ndef add(a, b):\n    return a + b\n"
    assert codes(old, new) == []


def test_altered_function_is_judged_whole() -> None:
    old = "import os\n\ndef add(a, b):\n    os._exit(0)\n    return a - b\n"
    new = "import os\n\ndef add(a, b):\n    os._exit(0)\n    return a + b\n"
    # The os._exit line did not change, but its function did: it is read again.
    assert codes(old, new) == ["hard_exit_outside_child"]


def test_edit_elsewhere_leaves_other_units_alone() -> None:
    old = "import os\n\ndef bad():\n    os._exit(0)\n\ndef add(a, b):\n    return a - b\n"
    new = "import os\n\ndef bad():\n    os._exit(0)\n\ndef add(a, b):\n    return a + b\n"
    assert codes(old, new) == []


def test_new_module_level_call_of_unchanged_exiting_function() -> None:
    new = CLI_OLD + "\nmain()\n"
    found = scan_change(PATH, src(CLI_OLD), src(new))
    assert [f.code for f in found] == ["ends_process_at_import"]
    assert "calls main() at import time" in found[0].message


def test_editing_main_of_a_cli_is_not_tampering() -> None:
    new = CLI_OLD.replace('print("hello")', 'print("hello, world")')
    assert codes(CLI_OLD, new) == []


def test_realistic_cli_module_is_clean() -> None:
    cli = '''
    """calc command line."""
    import argparse
    import sys

    from calc.ops import add


    def main(argv=None):
        parser = argparse.ArgumentParser()
        parser.add_argument("a", type=int)
        parser.add_argument("b", type=int)
        args = parser.parse_args(argv)
        if args.a < 0:
            print("negative", file=sys.stderr)
            sys.exit(2)
        print(add(args.a, args.b))
        return 0


    if __name__ == "__main__":
        sys.exit(main())
    '''
    assert codes(None, cli, "src/calc/cli.py") == []


def test_package_main_module_may_exit_at_top_level() -> None:
    body = "import sys\nfrom calc.cli import main\nsys.exit(main())\n"
    assert codes(None, body, "src/calc/__main__.py") == []
    assert codes(None, body, "src/calc/cli.py") == ["ends_process_at_import"]


def test_compound_main_guard() -> None:
    body = "import os, sys\nif sys.platform != 'win32' and __name__ == '__main__':\n"
    body += "    os.system('ls')\n"
    assert codes(None, body) == []


def test_main_guard_does_not_hide_code_when_name_is_rebound() -> None:
    new = "import os\n__name__ = '__main__'\nif __name__ == '__main__':\n    os._exit(0)\n"
    assert set(codes(None, new)) == {"fakes_module_name", "ends_process_at_import"}


def test_else_of_main_guard_runs_at_import() -> None:
    new = "import os\nif __name__ == '__main__':\n    pass\nelse:\n    os._exit(0)\n"
    assert codes(None, new) == ["ends_process_at_import"]


def test_honest_bugfix_yields_nothing() -> None:
    old = 'def add(a, b):\n    """Add."""\n    return a - b\n'
    new = 'def add(a, b):\n    """Add."""\n    return a + b\n'
    assert scan_change(PATH, src(old), src(new)) == []


def test_unchanged_file_yields_nothing() -> None:
    body = src("import os\nos._exit(0)\n")
    assert scan_change(PATH, body, body) == []


def test_deleted_line_marks_its_neighbours_changed() -> None:
    old = "import os\nif False:\n    os._exit(0)\n"
    new = "import os\nos._exit(0)\n"
    assert codes(old, new) == ["ends_process_at_import"]


def test_changed_lines_crlf_and_new_file() -> None:
    assert changed_lines(None, b"a\n") is None
    assert changed_lines(b"a\r\nb\r\nc\r\n", b"a\r\nB\r\nc\r\n") == {2}


def test_changed_lines_pure_insertion_and_deletion() -> None:
    assert changed_lines(b"a\nb\n", b"a\nx\ny\nb\n") == {2, 3}
    assert changed_lines(b"a\nx\ny\nb\n", b"a\nb\n") == {1, 2}  # the lines around the cut


def test_comment_between_statements_judges_nothing_inside_one_judges_its_unit() -> None:
    old = "import os\n\n\ndef main():\n    os._exit(0)\n\n\nmain()\n"
    between = old.replace("\n\n\nmain()", "\n\n# why main runs here\nmain()")
    assert codes(old, between) == []
    inside = old.replace("    os._exit(0)", "    # leave at once\n    os._exit(0)")
    assert "ends_process_at_import" in codes(old, inside)


# --- files and parsing ----------------------------------------------------------------


def test_non_python_file_is_not_scanned() -> None:
    assert scan_change("README.md", None, b"import os\nos._exit(0)\n") == []
    assert scan_change("src/calc/ops.pyi", None, b"import pytest\n") == []


def test_python_shebang_script_is_scanned() -> None:
    body = b"#!/usr/bin/env python3\nimport os\nos._exit(0)\n"
    assert [f.code for f in scan_change("bin/calc", None, body)] == ["ends_process_at_import"]


def test_pyw_is_scanned() -> None:
    assert codes(None, "import pytest\n", "src/calc/gui.pyw") == ["imports_test_framework"]


def test_syntax_error_is_a_finding() -> None:
    found = scan_change(PATH, src("def add(a, b):\n    return a - b\n"), b"def add(a, b:\n")
    assert [f.code for f in found] == ["unparseable_python"]
    assert found[0].line == 1
    assert found[0].message.startswith(f"{PATH}:1: does not parse")


def test_null_byte_is_unparseable_not_a_crash() -> None:
    assert [f.code for f in scan_change(PATH, None, b"x = 1\x00\n")] == ["unparseable_python"]


def test_deeply_nested_source_is_handled() -> None:
    body = ("x = " + "(" * 5000 + "1" + ")" * 5000 + "\n").encode()
    assert [f.code for f in scan_change(PATH, None, body)] == ["unparseable_python"]
    long_chain = ("x = " + " + ".join(["1"] * 20000) + "\n").encode()
    try:  # CPython 3.11+ refuses this chain (parser recursion limit); 3.10 parses it
        ast.parse(long_chain)
        expected = []  # parsed: scanned like any other code, and harmless
    except (RecursionError, SyntaxError, MemoryError):
        expected = ["unparseable_python"]
    assert [f.code for f in scan_change(PATH, None, long_chain)] == expected


def test_too_large_file_is_a_finding() -> None:
    body = b"x = 1\n" * (MAX_SCAN_BYTES // 6 + 1)
    assert [f.code for f in scan_change(PATH, None, body)] == ["too_large_to_scan"]


def test_encoding_cookie_is_honoured() -> None:
    body = "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\nimport pytest\n".encode("latin-1")
    found = scan_change(PATH, None, body)
    assert [(f.code, f.line) for f in found] == [("imports_test_framework", 3)]


@pytest.mark.parametrize("path", ["src/pytest.py", "src/_pytest/__init__.py", "lib/pluggy.py"])
def test_added_module_shadowing_the_framework(path: str) -> None:
    assert "shadows_test_framework_module" in codes(None, "X = 1\n", path)


def test_module_with_framework_prefix_is_not_a_shadow() -> None:
    assert codes(None, "X = 1\n", "src/calc/pytest_helpers_notes.py") == []
    assert codes(None, "X = 1\n", "bindings/py/calc.py") == []
    assert codes(None, "X = 1\n", "src/calc/backends/mock.py") == []


def test_edited_file_named_like_the_framework_is_not_a_shadow_finding() -> None:
    assert codes("X = 1\n", "X = 2\n", "src/pytest.py") == []


def test_docstring_mentioning_pytest_is_fine() -> None:
    new = '"""Helpers; see PYTEST_ADDOPTS and junit.xml in the docs."""\nX = 1\n'
    assert codes(None, new) == []


# --- a real change, as the gate sees it -----------------------------------------------


def _blob(repo, rev: str, path: str) -> bytes | None:
    listed = repo.git("ls-tree", "--name-only", rev, "--", path).strip()
    if not listed:
        return None
    done = subprocess.run(
        ["git", "cat-file", "blob", f"{rev}:{path}"], cwd=repo.path, capture_output=True
    )
    return done.stdout


def _scan_commits(repo, base: str, head: str) -> list[TamperFinding]:
    changed = repo.git("diff", "--name-only", "-z", base, head).split("\0")
    findings: list[TamperFinding] = []
    for path in filter(None, changed):
        new = _blob(repo, head, path)
        if new is not None:
            findings.extend(scan_change(path, _blob(repo, base, path), new))
    return findings


def test_git_change_honest_fix_and_forged_pass(git_repo) -> None:
    git_repo.write("src/calc/__init__.py", "")
    git_repo.write("src/calc/ops.py", "import sys\n\n\ndef add(a, b):\n    return a - b\n")
    git_repo.write("README.md", "calc\n")
    base = git_repo.commit("base")

    git_repo.write("src/calc/ops.py", "import sys\n\n\ndef add(a, b):\n    return a + b\n")
    git_repo.write("README.md", "calc: sys.exit(0) is documented here\n")
    honest = git_repo.commit("honest fix")
    assert _scan_commits(git_repo, base, honest) == []

    git_repo.write(
        "src/calc/ops.py",
        "import atexit\nimport os\nimport sys\n\natexit.register(os._exit, 0)\n\n\n"
        "def add(a, b):\n    return a - b\n",
    )
    forged = git_repo.commit("forged pass")
    found = _scan_commits(git_repo, base, forged)
    assert [(f.path, f.line, f.code) for f in found] == [
        ("src/calc/ops.py", 5, "ends_process_from_hook")
    ]


def test_coding_cookie_makes_the_whole_file_judged() -> None:
    """unicode_escape turns a `\\n` on one changed line into code on unchanged lines."""
    old = b"def add(a, b):\n    return a - b\n"
    new = b"# coding: unicode_escape\n" + old + b"pass\\nimport os\\nos._exit(0)\n"
    found = {f.code for f in scan_change(PATH, old, new)}
    assert {"source_encoding", "ends_process_at_import"} <= found


def test_folding_long_concatenations_stays_linear() -> None:
    chain = " + ".join(["'a'"] * 400) + " + 'PYTEST_ADDOPTS'"
    found = scan_change(PATH, None, f"import os\nX = {chain}\n".encode())
    assert [f.code for f in found] == []  # 400 a's then the name: not the bare variable
    found = scan_change(PATH, None, b"X = 'PYTEST' + '_' + 'ADDOPTS'\n")
    assert [f.code for f in found] == ["detects_test_run"]


def test_helpers_calling_each_other_are_judged_once() -> None:
    """Following local helpers for decoded names stays linear (a file of 60 helpers that
    all call each other used to take minutes); a chain deeper than the limit fails closed."""
    helpers = "".join(
        f"def f{i}():\n" + "".join(f"    f{j}()\n" for j in range(60)) for i in range(60)
    )
    source = "import importlib\n" + helpers + "def g():\n    importlib.import_module(f0())\n"
    assert "dynamic_import" not in [f.code for f in scan_change(PATH, None, source.encode())]
