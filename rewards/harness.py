"""The reward side of assert tests: build the sandboxed harness's input, read its report, judge strict results.

The harness program (``rewards/assert_harness.py``) runs the solution and its tests in one interpreter. What it
may trust is decided here, in the reward process, from the tests alone:

- per test, the standard-library modules it reads attributes of (``math`` in ``math.isclose(...)``) and the
  modules it imports: the harness imports them before the solution runs and gives the test those very modules;
- per test, the builtins it names (``len``, ``sorted``): a solution that rebinds one of them fails that test;
- in strict mode, per test, the expression under test and the expected value: ``assert <expression> ==
  <literal>``, ``assert <expression>`` (expects ``True``) or ``assert not <expression>`` (expects ``False``).
  The harness sends back the expression's value as plain data and it is compared here, type included.

Example:
    >>> check_strict("assert add(1, 2) == 3")
    ('add(1, 2)', ('int', 3))
    >>> typed(json.loads('["list", [["int", "3"], ["str", "a"]]]')) == typed_value([3, "a"])
    True
    >>> typed(json.loads('["float", "3.0"]')) == typed_value(3)   # 3.0 is not 3 in strict mode
    False
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROGRAM = (Path(__file__).parent / "assert_harness.py").read_text()
_BUILTIN_NAMES = frozenset(name for name in dir(builtins) if not name.startswith("__"))
_STDLIB = frozenset(sys.stdlib_module_names) - {"antigravity", "this"}  # these two act when imported


@dataclass(frozen=True)
class AssertPlan:
    """How to read one sample's harness report."""

    token: str  # tags the harness's report lines; the program's own output cannot carry it
    count: int  # tests
    expected: tuple[Any, ...] | None  # strict mode: the typed expected value of each test; None otherwise


def assert_job(program: str, tests: list[str], strict: bool) -> tuple[str, bytes, AssertPlan]:
    """(harness source, its stdin, the plan to read its report) for one sample.

    Raises:
        ValueError: strict mode and a test that is not ``assert <expression> == <literal>``,
            ``assert <expression>`` or ``assert not <expression>``.
    """
    token = secrets.token_hex(16)
    entries, expected = [], []
    for index, source in enumerate(tests):
        entry: dict[str, Any] = _names(source)
        if strict:  # the expression only: the expected value never enters the sandbox
            try:
                entry["expression"], value = check_strict(source)
            except ValueError as err:
                raise ValueError(f"code_reward(strict=True): test {index} {source!r}: {err}") from None
            expected.append(value)
        else:
            entry["source"] = source
        entries.append(entry)
    payload = {"token": token, "strict": strict, "solution": program, "tests": entries}
    plan = AssertPlan(token, len(tests), tuple(expected) if strict else None)
    return PROGRAM, json.dumps(payload).encode(), plan


def passed(stdout: bytes, plan: AssertPlan) -> int:
    """How many tests passed: a test passes when exactly one report line carries its index and the verdict is a
    pass (strict: a value equal, type included, to the expected one). Lines without the token are ignored."""
    verdicts: dict[int, list[str]] = {}
    for line in stdout.decode("utf-8", errors="replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == plan.token and parts[1].isdigit():
            verdicts.setdefault(int(parts[1]), []).append(parts[2])
    count = 0
    for index in range(plan.count):
        seen = verdicts.get(index, [])
        if len(seen) != 1:
            continue  # missing, or reported twice (something else wrote with the token): not a pass
        if plan.expected is None:
            count += seen[0] == "1"
        elif seen[0] != "!":
            with contextlib.suppress(ValueError, TypeError, KeyError, IndexError, RecursionError):
                count += typed(json.loads(seen[0])) == plan.expected[index]
    return count


def check_strict(source: str) -> tuple[str, Any]:
    """(expression source, typed expected value) of a strict-mode test.

    Raises:
        ValueError: the test has another form.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ValueError(f"it does not parse ({err.msg})") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise ValueError("strict mode takes one assert statement per test")
    test = tree.body[0].test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        left, right = test.left, test.comparators[0]
        for expression, literal in ((left, right), (right, left)):
            try:
                return ast.unparse(expression), typed_value(ast.literal_eval(literal))
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
        raise ValueError("strict mode needs a literal on one side of == (a number, string, list, dict, ...)")
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return ast.unparse(test.operand), typed_value(False)
    if isinstance(test, ast.Compare):
        raise ValueError("strict mode takes `assert <expression> == <literal>`, not other comparisons")
    return ast.unparse(test), typed_value(True)


def typed_value(value: Any) -> Any:
    """A plain Python value as a hashable form that keeps types apart (``1``, ``1.0`` and ``True`` differ)."""
    kind = type(value)
    if value is None:
        return ("NoneType",)
    if kind in (bool, int, float, complex, str, bytes):
        return (kind.__name__, value)
    if kind in (list, tuple):
        return (kind.__name__, tuple(typed_value(v) for v in value))
    if kind in (set, frozenset):
        return (kind.__name__, frozenset(typed_value(v) for v in value))
    if kind is dict:
        return ("dict", frozenset((typed_value(k), typed_value(v)) for k, v in value.items()))
    raise TypeError(f"{kind.__name__} is not a plain value")


def typed(tagged: list) -> Any:
    """The harness's tagged JSON (``["int", "3"]``) as ``typed_value`` of the value it stands for.

    Raises:
        ValueError, TypeError, KeyError, IndexError: malformed input.
    """
    tag = tagged[0]
    if tag == "NoneType" and tagged[1] is None:
        return ("NoneType",)
    if tag == "bool" and type(tagged[1]) is bool:
        return ("bool", tagged[1])
    if tag == "str" and type(tagged[1]) is str:
        return ("str", tagged[1])
    if tag == "int":
        return ("int", int(tagged[1]))
    if tag == "float":
        return ("float", float(tagged[1]))
    if tag == "complex":
        return ("complex", complex(float(tagged[1]), float(tagged[2])))
    if tag == "bytes":
        return ("bytes", bytes.fromhex(tagged[1]))
    if tag in ("list", "tuple"):
        return (tag, tuple(typed(item) for item in tagged[1]))
    if tag in ("set", "frozenset"):
        return (tag, frozenset(typed(item) for item in tagged[1]))
    if tag == "dict":
        return ("dict", frozenset((typed(k), typed(v)) for k, v in tagged[1]))
    raise ValueError(f"unknown tag {tag!r}")


def _names(source: str) -> dict[str, list[str]]:
    """What a test relies on, from names it does not bind itself: ``pins``, the stdlib modules it reads attributes
    of; ``imports``, the modules it imports (the harness imports them before the solution runs, so a module the
    solution plants or swaps is never the one the test gets); ``builtins``, the builtins it names."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {"pins": [], "imports": [], "builtins": []}
    bound, imports = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        if isinstance(node, ast.Import):
            imports |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imports.add(node.module.split(".")[0])
    loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound
    bases = {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    return {
        "pins": sorted(bases & loads & _STDLIB),
        "imports": sorted(imports - {"antigravity", "this"}),
        "builtins": sorted(loads & _BUILTIN_NAMES),
    }
