"""Reward throughput: sandboxed code execution with one worker versus N concurrent workers (the same 200
programs, rewards asserted equal), and math-verify scoring.

    python scripts/bench_rewards.py            # a table
    python scripts/bench_rewards.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from rewards.code import code_reward
from rewards.math import math_verify_reward
from rewards.sandbox import isolation


def code_batch(n: int) -> tuple[list[str], list[list[str]], list[float]]:
    """n small, distinct programs with three asserts each; every third one is wrong on one test."""
    completions, tests, expected = [], [], []
    for i in range(n):
        k = i % 7 + 2
        body = f"    return x * {k}" if i % 3 else f"    return x * {k} if x < 10 else 0"
        completions.append(f"```python\ndef scale(x):\n{body}\n```")
        tests.append([f"assert scale(1) == {k}", f"assert scale(3) == {3 * k}", f"assert scale(10) == {10 * k}"])
        expected.append(1.0 if i % 3 else 2 / 3)
    return completions, tests, expected


def math_batch(n: int) -> tuple[list[str], list[str]]:
    answers = [rf"\frac{{{i % 9 + 1}}}{{{i % 5 + 2}}}" for i in range(n)]
    completions = [rf"... so the answer is \boxed{{\frac{{{2 * (i % 9 + 1)}}}{{{2 * (i % 5 + 2)}}}}}" for i in range(n)]
    return completions, answers


def rate(fn, n: int) -> tuple[float, list]:  # noqa: ANN001
    start = time.perf_counter()
    out = fn()
    return n / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=200, help="code samples (one sandboxed program each)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="concurrent programs for the N case")
    parser.add_argument("--math", type=int, default=200, help="math-verify samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    completions, tests, expected = code_batch(args.programs)
    prompts = ["Write scale(x)."] * args.programs
    code_reward(prompts[:2], completions[:2], tests=tests[:2])  # probe the isolation once, outside the timing
    serial, serial_out = rate(lambda: code_reward(prompts, completions, tests=tests, max_workers=1), args.programs)
    parallel, parallel_out = rate(
        lambda: code_reward(prompts, completions, tests=tests, max_workers=args.workers), args.programs
    )
    assert serial_out == parallel_out == expected, "concurrent scoring changed the rewards"

    math_completions, answers = math_batch(args.math)
    math_verify_reward(["q"], math_completions[:1], answer=answers[:1])  # import sympy outside the timing
    math_rate, math_out = rate(
        lambda: math_verify_reward(["q"] * args.math, math_completions, answer=answers), args.math
    )
    assert math_out == [1.0] * args.math, "math-verify rejected an equivalent fraction"

    report = {
        "code_programs": args.programs,
        "code_rewards_per_s_1_worker": round(serial, 1),
        "code_rewards_per_s_n_workers": round(parallel, 1),
        "n_workers": args.workers,
        "speedup": round(parallel / serial, 2),
        "math_verify_samples": args.math,
        "math_verify_rewards_per_s": round(math_rate, 1),
        "cpu_count": os.cpu_count(),
        "isolation": dataclasses.asdict(isolation()),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"code execution, {args.programs} programs: {serial:8.1f} rewards/s with 1 worker")
    print(f"{'':35s}{parallel:8.1f} rewards/s with {args.workers} workers ({parallel / serial:.2f}x)")
    print(f"math-verify, {args.math} samples:{math_rate:13.1f} rewards/s")
    print(f"isolation: {report['isolation']}")


if __name__ == "__main__":
    main()
