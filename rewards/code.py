"""Code-execution reward: run the completion's program against unit tests inside the sandbox.

Two kinds of tests, from dataset columns:
- ``tests``: assert statements (``["assert add(1, 2) == 3", ...]``), run after the program in one process by
  the assert harness (``rewards/assert_harness.py``): it binds what it uses, compiles the tests and takes a
  snapshot of the interpreter before the solution runs, and reports each result on a copy of stdout tagged
  with a token the program never sees in its source, arguments, environment or stdin. A program that rewrites
  ``exec``, ``compile``, ``os.write``, ``sys.stdout``, a helper module the tests use, or exits early, does not pass
  tests it did not pass. ``strict=True`` goes further: each test must be ``assert <expression> == <literal>``
  (or ``assert <expression>`` / ``assert not <expression>``); the expression's value comes back as plain data
  and is compared here, type included, so an object whose ``==`` always answers True (which passes plain assert
  tests, an inherent limit of them) fails, and nothing the program does in its own interpreter makes a wrong
  value pass;
- ``test_inputs`` / ``test_outputs``: stdin/stdout pairs, one sandboxed run per pair; the program must exit with
  code 0 and its stdout must equal the expected output byte for byte (UTF-8; an expected output without a final
  newline also matches one that ends with it, as ``print`` writes). ``output_match="lines"`` ignores trailing
  whitespace on each line and trailing blank lines (the convention of many judges).
The reward is the fraction of tests passed (``all_or_nothing=True``: 1.0 only when all pass). A sample with no
tests scores None (excluded). A program that times out, runs out of memory, floods its output or tries
something the sandbox forbids just fails its tests. If the sandbox itself cannot start programs,
``SandboxError`` is raised, so a broken machine never looks like a model that writes wrong code.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any, Literal

from rewards.harness import AssertPlan, assert_job, passed
from rewards.registry import register_reward
from rewards.sandbox import Limits, RunResult, Sandbox, check_isolation
from rewards.text import completion_text, extract_code

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


def _same_output(actual: bytes, expected: Any, match: str) -> bool:
    """Whether a program's stdout is the expected output (compared as bytes, never decoded)."""
    want = str(expected).encode("utf-8")
    if match == "lines":

        def lines(data: bytes) -> list[bytes]:
            return [line.rstrip() for line in data.rstrip().split(b"\n")]

        return lines(actual) == lines(want)
    return actual == want or (not want.endswith(b"\n") and actual == want + b"\n")


@register_reward("code")
def code_reward(
    prompts: list,
    completions: list,
    tests: Sequence[Any] | None = None,
    test_inputs: Sequence[Any] | None = None,
    test_outputs: Sequence[Any] | None = None,
    all_or_nothing: bool = False,
    strict: bool = False,
    output_match: Literal["exact", "lines"] = "exact",
    cpu_s: float = 2.0,
    wall_s: float = 6.0,
    memory_mb: int = 512,
    max_workers: int | None = None,
    total_memory_mb: int = 1024,
    **kwargs: Any,
) -> list[float | None]:
    """Fraction of a completion's unit tests that its program passes, run in the sandbox.

    ``strict`` checks assert tests by value and type in this process (see the module docstring);
    ``output_match`` is ``"exact"`` or ``"lines"`` for stdin/stdout tests. ``cpu_s``/``wall_s``/``memory_mb`` are
    per-process limits, ``total_memory_mb`` caps all processes of one program together (where a cgroup is
    available); ``max_workers`` bounds concurrent programs (default: CPU count). The program is the
    completion's last fenced code block (or the whole text). Below the sandbox's minimum isolation level
    (``rewards.sandbox.configure``) it raises ``SandboxError`` instead of running code. Called by a reward
    service, every program of the call is stopped when the call's time runs out (``rewards.sandbox.deadline``).

    Example:
        >>> code_reward(
        ...     ["Write add(a, b)."] * 3,
        ...     ["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b):\\n    return a - b", "no code"],
        ...     tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"]] * 3,
        ... )
        [1.0, 0.5, 0.0]
        >>> code_reward(["Echo twice."], ["print(input() * 2)"], test_inputs=[["ab\\n"]], test_outputs=[["abab"]])
        [1.0]
        >>> yes = "class Yes:\\n    def __eq__(self, other):\\n        return True\\ndef add(a, b):\\n    return Yes()"
        >>> [code_reward(["p"], [yes], tests=[["assert add(1, 2) == 3"]], strict=s) for s in (False, True)]
        [[1.0], [0.0]]
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
    if output_match not in ("exact", "lines"):
        raise ValueError(f"code_reward: output_match must be 'exact' or 'lines', got {output_match!r}.")

    jobs: list[tuple[str, bytes | str]] = []
    plans: list[tuple[str, int, int, Any]] = []  # (kind, first job, job count, check data) per sample
    for i, completion in enumerate(completions):
        program = extract_code(completion_text(completion))
        asserts = _as_list(tests[i]) if tests is not None else []
        inputs = _as_list(test_inputs[i]) if test_inputs is not None else []
        if asserts:
            source, stdin, plan = assert_job(program, [str(t) for t in asserts], strict)
            plans.append(("asserts", len(jobs), 1, plan))
            jobs.append((source, stdin))
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
            plan: AssertPlan = check
            fraction = passed(results[first].stdout, plan) / plan.count
        else:
            runs: list[RunResult] = results[first : first + count]
            right = [r.ok and _same_output(r.stdout, out, output_match) for r, out in zip(runs, check, strict=True)]
            fraction = sum(right) / count
        rewards.append(float(fraction == 1.0) if all_or_nothing else fraction)
    return rewards


# Checked when a reward service starts (driver, `tracerl validate` and every worker): refuse below the level.
code_reward.preflight = check_isolation
