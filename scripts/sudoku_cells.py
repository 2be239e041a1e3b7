"""Where the quickstart's greedy Sudoku answers are right and wrong, cell by cell (docs/quickstart.md, "How to read
it"): the blank cells whose answer is 1 or 3 (the ``confuse`` teacher writes them right), those whose answer is 2 or
4 (the teacher writes 1 for 2 and 3 for 4 in 60% of them), and how often the answer to one of those is the
teacher's habit.

    python scripts/sudoku_cells.py runs/q/rl/eval/step-0.jsonl runs/q/rl/eval/step-20.jsonl

Reads the JSONL files ``tracerl eval`` and the loop's evaluations write (one row per sample: ``prompt``,
``answer``, ``mode``, ``completion``); only the greedy rows count. Every blank cell is counted where it stands,
also in an answer the verifier scores 0 as a whole (a changed clue, a grid of the wrong length).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracerl.data import confused_with  # noqa: E402
from tracerl.metrics import read_jsonl  # noqa: E402

DIGITS = "1234"


@dataclass
class Cells:
    """Counts over the blank cells of greedy answers."""

    plain: int = 0  # blank cells whose answer the teacher never confuses (1, 3)
    plain_right: int = 0
    confused: int = 0  # blank cells whose answer the teacher confuses (2, 4)
    confused_right: int = 0
    habit: int = 0  # ... answered with the teacher's mistake (1 for 2, 3 for 4)

    def line(self) -> str:
        plain, confused = max(self.plain, 1), max(self.confused, 1)
        return (
            f"cells of 1 and 3 right {self.plain_right / plain:.0%} · cells of 2 and 4 right "
            f"{self.confused_right / confused:.0%} · the habit in {self.habit / confused:.0%} "
            f"({self.plain} and {self.confused} cells)"
        )


def count(rows: list[dict]) -> Cells:
    """Count the blank cells of the greedy rows (a prompt's ``.`` marks a blank cell; the prompt, answer and
    completion share positions).

    Example:
        >>> row = {"mode": "greedy", "prompt": "1.3. 3412 2143 4.21:", "answer": "1234 3412 2143 4321",
        ...        "completion": "1134 3412 2143 4321"}
        >>> c = count([row, {**row, "mode": "sample"}])
        >>> (c.plain, c.plain_right, c.confused, c.confused_right, c.habit)
        (1, 1, 2, 1, 1)
    """
    c = Cells()
    for row in rows:
        if row["mode"] != "greedy":
            continue
        prompt, answer, completion = row["prompt"].rstrip(":"), row["answer"], row["completion"]
        for i, cell in enumerate(prompt):
            if cell != ".":
                continue
            got = completion[i] if i < len(completion) else None
            if confused_with(answer[i], DIGITS) == answer[i]:
                c.plain += 1
                c.plain_right += got == answer[i]
            else:
                c.confused += 1
                c.confused_right += got == answer[i]
                c.habit += got == confused_with(answer[i], DIGITS)
    return c


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="eval JSONL files (runs/q/rl/eval/step-N.jsonl, ...)")
    args = parser.parse_args(argv)
    for path in args.files:
        if path.suffix == ".json" and path.with_suffix(".jsonl").is_file():
            sys.exit(f"{path} is an evaluation's summary; its samples are in {path.with_suffix('.jsonl')}: give that.")
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "does not exist"
            sys.exit(f"{path} {problem}: give the JSONL files of tracerl eval or of a run's eval/ directory")
        try:
            rows = read_jsonl(path)
        except ValueError as err:
            sys.exit(str(err))
        needed = ("mode", "prompt", "answer", "completion")
        if not rows or any(not isinstance(r, dict) or any(k not in r for k in needed) for r in rows):
            sys.exit(
                f"{path} holds no evaluation samples (rows with {', '.join(needed)}): give the JSONL files of "
                "tracerl eval or of a run's eval/ directory"
            )
        cells = count(rows)
        if not cells.plain + cells.confused:
            sys.exit(f"{path} holds no greedy answer to a 4×4 Sudoku with blank cells: is it the quickstart's task?")
        print(f"{path}: {cells.line()}")


if __name__ == "__main__":
    main()
