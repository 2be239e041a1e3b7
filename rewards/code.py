"""Code-execution reward: run the completion's program against unit tests inside the sandbox.

Two kinds of tests, from dataset columns:
- ``tests``: assert statements (``["assert add(1, 2) == 3", ...]``), run after the program in one process;
- ``test_inputs`` / ``test_outputs``: stdin/stdout pairs, one sandboxed run per pair; stdout must match
  (trailing whitespace ignored) and the program must exit with code 0.
The reward is the fraction of tests passed (``all_or_nothing=True``: 1.0 only when all pass). A sample with no
tests scores None (excluded). A program that times out, runs out of memory, floods its output or tries
something the sandbox forbids just fails its tests. If the sandbox itself cannot start programs,
``SandboxError`` is raised, so a broken machine never looks like a model that writes wrong code.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Sequence
from typing import Any

from rewards.registry import register_reward
from rewards.sandbox import Limits, RunResult, Sandbox, check_isolation
from rewards.text import completion_text, extract_code

# Runs the solution, then each test in the solution's namespace, and reports each result on a descriptor
# copied before the solution runs, tagged with a token read from stdin. The token is not in the program's
# source, arguments or environment, so a solution that prints fake results, or exits early with status 0,
# does not pass tests it did not run.
_HARNESS = """\
import io, os, sys, traceback

def _tracerl_main(solution, tests):
    token = sys.stdin.readline().strip()
    sys.stdin = io.StringIO("")
    report = os.dup(1)
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    except BaseException:
        traceback.print_exc()
        return
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{index}.py", "exec"), namespace)
            passed = 1
        except BaseException:
            traceback.print_exc()
            passed = 0
        os.write(report, f"\\n{token} {index} {passed}\\n".encode())

_tracerl_main(%r, %r)
"""

_SANDBOXES: dict[tuple, Sandbox] = {}
_SANDBOXES_LOCK = threading.Lock()


def shared_sandbox(limits: Limits, max_workers: int | None = None) -> Sandbox:
    """One sandbox (and thread pool) per limits/concurrency in this process, reused across calls."""
    with _SANDBOXES_LOCK:
        key = (limits, max_workers)
        if key not in _SANDBOXES:
            _SANDBOXES[key] = Sandbox(limits, max_workers)
        return _SANDBOXES[key]


def _as_list(value: Any) -> list:
    """A per-sample test list: a list as is, a JSON list string decoded, any other string as one test."""
    if value is None:
        return []
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                return [value]
            return list(decoded) if isinstance(decoded, list) else [value]
        return [value]
    return list(value)


def _same_output(actual: bytes, expected: Any) -> bool:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return lines(actual.decode("utf-8", errors="replace")) == lines(str(expected))


def _asserts_passed(result: RunResult, token: str, count: int) -> int:
    passed = {}
    for line in result.stdout.decode("utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == token and parts[1].isdigit():
            passed[int(parts[1])] = parts[2] == "1"
    return sum(passed.get(i, False) for i in range(count))


@register_reward("code")
def code_reward(
    prompts: list,
    completions: list,
    tests: Sequence[Any] | None = None,
    test_inputs: Sequence[Any] | None = None,
    test_outputs: Sequence[Any] | None = None,
    all_or_nothing: bool = False,
    cpu_s: float = 2.0,
    wall_s: float = 6.0,
    memory_mb: int = 512,
    max_workers: int | None = None,
    total_memory_mb: int = 1024,
    **kwargs: Any,
) -> list[float | None]:
    """Fraction of a completion's unit tests that its program passes, run in the sandbox.

    ``cpu_s``/``wall_s``/``memory_mb`` are per-process limits, ``total_memory_mb`` caps all processes of one
    program together (where a cgroup is available); ``max_workers`` bounds concurrent programs (default: CPU
    count). The program is the completion's last fenced code block (or the whole text). Below the sandbox's
    minimum isolation level (``rewards.sandbox.configure``) it raises ``SandboxError`` instead of running code.

    Example:
        >>> code_reward(
        ...     ["Write add(a, b)."] * 3,
        ...     ["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b):\\n    return a - b", "no code"],
        ...     tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"]] * 3,
        ... )
        [1.0, 0.5, 0.0]
        >>> code_reward(["Echo twice."], ["print(input() * 2)"], test_inputs=[["ab\\n"]], test_outputs=[["abab"]])
        [1.0]
    """
    n = len(completions)
    columns = {"tests": tests, "test_inputs": test_inputs, "test_outputs": test_outputs}
    if tests is None and test_inputs is None:
        raise ValueError(
            "code_reward needs unit tests in a dataset column: 'tests' (assert statements) or 'test_inputs' "
            "with 'test_outputs' (stdin/stdout pairs); neither was passed."
        )
    for name, values in columns.items():
        if values is not None and len(values) != n:
            raise ValueError(f"code_reward: column '{name}' has {len(values)} entries for {n} completions.")
    if (test_inputs is None) != (test_outputs is None):
        raise ValueError("code_reward: 'test_inputs' and 'test_outputs' must be given together.")

    jobs: list[tuple[str, str]] = []
    plans: list[tuple[str, int, int, Any]] = []  # (kind, first job, job count, check data) per sample
    for i, completion in enumerate(completions):
        program = extract_code(completion_text(completion))
        asserts = _as_list(tests[i]) if tests is not None else []
        inputs = _as_list(test_inputs[i]) if test_inputs is not None else []
        if asserts:
            token = secrets.token_hex(16)
            plans.append(("asserts", len(jobs), 1, (token, len(asserts))))
            jobs.append((_HARNESS % (program, [str(t) for t in asserts]), token + "\n"))
        elif inputs:
            outputs = _as_list(test_outputs[i])
            if len(outputs) != len(inputs):
                raise ValueError(f"code_reward: sample {i} has {len(inputs)} test inputs but {len(outputs)} outputs.")
            plans.append(("io", len(jobs), len(inputs), outputs))
            jobs.extend((program, str(stdin)) for stdin in inputs)
        else:
            plans.append(("none", len(jobs), 0, None))

    limits = Limits(cpu_s=cpu_s, wall_s=wall_s, memory_mb=memory_mb, total_memory_mb=total_memory_mb)
    sandbox = shared_sandbox(limits, max_workers)
    results = sandbox.run_many(jobs)
    rewards: list[float | None] = []
    for kind, first, count, check in plans:
        if kind == "none":
            rewards.append(None)
            continue
        if kind == "asserts":
            token, total = check
            fraction = _asserts_passed(results[first], token, total) / total
        else:
            runs = results[first : first + count]
            fraction = sum(r.ok and _same_output(r.stdout, out) for r, out in zip(runs, check, strict=True)) / count
        rewards.append(float(fraction == 1.0) if all_or_nothing else fraction)
    return rewards


# Checked when a reward service starts (driver, `tracerl validate` and every worker): refuse below the level.
code_reward.preflight = check_isolation
