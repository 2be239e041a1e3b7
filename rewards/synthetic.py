"""Verifiers of tracerl's built-in synthetic tasks (``data.source=synthetic:<task>``)."""

from __future__ import annotations

from typing import Any

from rewards.registry import register_reward


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: the last message's content
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


@register_reward("synthetic_exact")
def synthetic_exact(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion, stripped of surrounding whitespace, equals the task's answer, else 0.0.

    Example:
        >>> synthetic_exact(["1+2="] * 3, ["3", " 3 ", "4"], answer=["3"] * 3)
        [1.0, 1.0, 0.0]
        >>> synthetic_exact(["x"], [[{"role": "assistant", "content": "odd"}]], answer=["odd"])
        [1.0]
    """
    return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def _cells(text: str) -> str:
    return "".join(text.split())


@register_reward("sudoku_cells")
def sudoku_cells(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """Partial credit for ``synthetic:sudoku4``: the fraction of the puzzle's blank cells filled correctly.

    The completion (whitespace ignored) must be a 16-digit grid that keeps every clue of the puzzle; a completion
    of another length, or one that changes a clue, scores 0.0. The puzzle is read from the prompt (``.`` = blank).

    Example:
        >>> puzzle, solution = "1.3. 34.2 2.4. 4.21:", "1234 3412 2143 4321"
        >>> grids = [solution, "1434 3412 2143 4321", "1234 3412 2143 4322", "123", "1234341221434321"]
        >>> sudoku_cells([puzzle] * 5, grids, answer=[solution] * 5)
        [1.0, 0.8333333333333334, 0.0, 0.0, 1.0]
    """
    out = []
    for prompt, completion, solution in zip(prompts, completions, answer, strict=True):
        puzzle = _cells(_text(prompt).split(":")[0])
        grid, solution = _cells(_text(completion)), _cells(str(solution))
        blanks = [i for i, c in enumerate(puzzle) if c == "."]
        if len(grid) != len(solution) or any(grid[i] != c for i, c in enumerate(puzzle) if c != "."):
            out.append(0.0)
            continue
        out.append(sum(grid[i] == solution[i] for i in blanks) / max(1, len(blanks)))
    return out


@register_reward("digit_accuracy")
def digit_accuracy(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """Partial credit for ``synthetic:long_addition``: the fraction of the answer's digits that are right, digits
    aligned from the right (units under units); an answer of the wrong length is divided by the longer length.

    Example:
        >>> digit_accuracy(["123+456="] * 5, ["579", "578", "1579", "79", "x"], answer=["579"] * 5)
        [1.0, 0.6666666666666666, 0.75, 0.6666666666666666, 0.0]
    """
    out = []
    for completion, expected in zip(completions, answer, strict=True):
        got, want = _cells(_text(completion)), str(expected)
        right = sum(a == b for a, b in zip(reversed(got), reversed(want), strict=False))
        out.append(right / max(len(got), len(want), 1))
    return out
