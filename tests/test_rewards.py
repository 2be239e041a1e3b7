"""Built-in reward functions: docstring examples, hand-checked values, the registry and import hygiene."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys

import pytest

import rewards
from rewards.code import code_reward
from rewards.format import format_reward
from rewards.length import length_reward, soft_overlong_reward
from rewards.math import extract_gsm8k_answer, gsm8k_reward, math_verify_reward
from rewards.registry import UnknownRewardError, get_reward, register_reward
from rewards.text import completion_text, extract_code, last_boxed

MODULES = ["registry", "text", "math", "format", "length", "code", "sandbox", "harness", "seccomp"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"rewards.{module}"))
    assert result.failed == 0
    assert result.attempted > 0  # every module shows at least one runnable example


def test_import_needs_neither_torch_nor_ray() -> None:
    code = (
        "import sys, json, rewards, rewards.sandbox, tracerl.reward_service, tracerl.reward_server;"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'ray', 'math_verify')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # math_verify (sympy) is imported lazily, on the first math reward call
    assert json.loads(out) == {"torch": False, "ray": False, "math_verify": False}


def test_registry_lists_builtins_and_explains_unknown_names() -> None:
    names = rewards.available_rewards()
    assert {"code", "format", "gsm8k", "length", "math_verify", "soft_overlong"} <= set(names)
    assert names == sorted(names) and get_reward("gsm8k") is gsm8k_reward
    with pytest.raises(UnknownRewardError) as err:
        get_reward("gsm8")
    assert str(err.value) == f"unknown reward 'gsm8'; choose from {names}"
    assert str(err.value).startswith("unknown reward 'gsm8'; choose from ['code', 'digit_accuracy', 'format', ")
    with pytest.raises(ValueError, match="'gsm8k' is already registered"):
        register_reward("gsm8k")(lambda prompts, completions, **kw: [0.0] * len(completions))


def test_text_helpers() -> None:
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    assert last_boxed(r"\boxed{\frac{a}{b}} then \boxed{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{1} and a broken \boxed{2") == "1"
    assert extract_code("a\n```py\nx = 1\n```\nb\n```python\ny = 2\n```") == "y = 2\n"
    assert extract_code("Sure:\n```python\nprint(3)") == "print(3)"  # truncated: no closing fence
    assert extract_code("x = 1") == "x = 1"


def test_math_verify_equivalences() -> None:
    completions = [
        r"\boxed{\frac{1}{2}}",  # = 0.5
        r"so \boxed{0.4} no wait \boxed{0.50}",  # the last box counts
        "0.5",  # no box
        [{"role": "assistant", "content": r"\boxed{\dfrac{2}{4}}"}],  # chat format
    ]
    assert math_verify_reward(["q"] * 4, completions, answer=["0.5"] * 4) == [1.0, 1.0, 0.0, 1.0]
    assert math_verify_reward(["q"], [r"\boxed{1+x^2}"], solution=["x^2+1"]) == [1.0]  # bare LaTeX ground truth
    assert math_verify_reward(["q"], [r"\boxed{1000}"], ground_truth=["1,000"]) == [1.0]
    assert math_verify_reward(["q"], [r"\boxed{3}"], answer=["\\"]) == [None]  # unreadable ground truth: skip
    with pytest.raises(ValueError, match=r"named one of \['answer', 'solution', 'ground_truth'\]"):
        math_verify_reward(["q"], [r"\boxed{3}"])


def test_gsm8k_extraction_and_matching() -> None:
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    completions = ["48 + 24 = 72\n#### 72", "#### 72.00", "The answer is $72.", r"\boxed{72}", "#### 73"]
    assert gsm8k_reward(["q"] * 5, completions, answer=[gold] * 5) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert gsm8k_reward(["q"], ["The answer is $72."], answer=["72"], fallback_last_number=True) == [1.0]
    assert extract_gsm8k_answer("#### 1,234,567") == "1234567"
    assert extract_gsm8k_answer("#### -3.5") == "-3.5"
    assert extract_gsm8k_answer("nothing here") is None


def test_format_reward_checks_tags_order_and_box() -> None:
    completions = [
        r"<think>a</think> \boxed{1}",
        r"<think>a</think><answer>\boxed{1}</answer>",
        r"<think>a</think> <think>b</think> \boxed{1}",  # duplicated tag
        r"\boxed{1} <think>a</think>",  # box before the reasoning ends
    ]
    assert format_reward(["q"] * 4, completions) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(["q"] * 2, completions[1:3], tags=("think", "answer"), require_boxed=False) == [1.0, 0.0]


def test_length_rewards_by_hand() -> None:
    # tokens: 0/100 → 1.0, 25/100 → 0.75; characters when no ids: "abcde" = 5 of 10 → 0.5
    assert length_reward(["q"] * 2, ["x", "y"], completion_ids=[[], [7] * 25], max_length=100) == [1.0, 0.75]
    assert length_reward(["q"], ["abcde"], max_length=10) == [0.5]
    # Lmax = 100, Lcache = 20: L = 80 → 0; L = 90 → (80 - 90) / 20 = -0.5; L = 100 → -1.0; L = 101 → -1
    ids = [[0] * n for n in (80, 90, 100, 101)]
    assert soft_overlong_reward(["q"] * 4, ["c"] * 4, completion_ids=ids, max_length=100, cache_length=20) == [
        0.0,
        -0.5,
        -1.0,
        -1.0,
    ]
    with pytest.raises(ValueError, match="0 < cache_length <= max_length"):
        soft_overlong_reward(["q"], ["c"], cache_length=0)


def test_code_reward_asserts_and_io() -> None:
    good = "def sq(x):\n    return x * x\n"
    half = "def sq(x):\n    return 4\n"  # right for x = 2 only
    tests = [["assert sq(2) == 4", "assert sq(3) == 9"]] * 3
    assert code_reward(["p"] * 3, [good, half, "def sq(x): raise ValueError"], tests=tests) == [1.0, 0.5, 0.0]
    assert code_reward(["p"], [half], tests=tests[:1], all_or_nothing=True) == [0.0]
    # tests stored as a JSON string (common in datasets) work too
    assert code_reward(["p"], [good], tests=[json.dumps(tests[0])]) == [1.0]
    # stdin/stdout, compared as bytes: "exact" (default) takes only the expected bytes, with or without the final
    # newline print adds; "lines" ignores trailing whitespace per line; a non-zero exit fails the test either way
    io_program = "n = int(input())\nprint(n * 2, end=' \\n' if n > 4 else '\\n')\nexit(1 if n < 0 else 0)"
    inputs, outputs = [["2\n", "5\n", "-1\n"]], [["4", "10\n", "-2"]]
    assert code_reward(["p"], [io_program], test_inputs=inputs, test_outputs=outputs) == [pytest.approx(1 / 3)]
    loose = code_reward(["p"], [io_program], test_inputs=inputs, test_outputs=outputs, output_match="lines")
    assert loose == [pytest.approx(2 / 3)]
    # bytes, not text: an invalid UTF-8 byte is not the replacement character it would decode to
    raw = "import sys\nsys.stdout.buffer.write(b'\\xff')"
    assert code_reward(["p"], [raw], test_inputs=[[""]], test_outputs=[["\ufffd"]]) == [0.0]
    assert code_reward(["p"], [good], tests=[[]]) == [None]  # nothing to check: skipped, not punished


def test_code_reward_cannot_be_gamed_by_exiting_or_printing_results() -> None:
    tests = [["assert f() == 1", "assert f() == 2"]] * 4
    cheats = [
        "import os\nos._exit(0)",  # leave before the tests run
        "import sys\nprint('0 0 1\\n0 1 1')\nsys.stdout.flush()",  # print something that looks like a report
        "import sys\nprint(sys.stdin.read())",  # look for the report token on stdin (already consumed)
        "def f():\n    return 1\nexit(0)",  # exit(0) stops the solution, the tests still run: 1 of 2 passes
    ]
    assert code_reward(["p"] * 4, cheats, tests=tests) == [0.0, 0.0, 0.0, 0.5]


def test_code_reward_explains_missing_columns() -> None:
    with pytest.raises(ValueError, match="needs unit tests in a dataset column: 'tests'"):
        code_reward(["p"], ["print(1)"])
    with pytest.raises(ValueError, match="'test_inputs' and 'test_outputs' must be given together"):
        code_reward(["p"], ["print(1)"], test_inputs=[["1"]])
    with pytest.raises(ValueError, match="column 'tests' has 2 entries for 1 completions"):
        code_reward(["p"], ["print(1)"], tests=[["assert True"]] * 2)
