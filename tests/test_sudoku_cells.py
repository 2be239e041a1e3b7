"""scripts/sudoku_cells.py: the per-cell breakdown of greedy Sudoku answers, by hand and from the command line."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sudoku_cells.py"
cells = load_script("sudoku_cells")


def test_docstring_examples():
    result = doctest.testmod(cells)
    assert result.attempted >= 1 and result.failed == 0


def test_a_file_of_greedy_and_sampled_rows(tmp_path):
    answer = "1234 3412 2143 4321"
    rows = [
        # blanks (answer: written): 2: 1 (the habit), 3: 3 (right), 4: 4 (right)
        {"mode": "greedy", "prompt": "1... 3412 2143 4321:", "answer": answer, "completion": "1134 3412 2143 4321"},
        # 1: 2 and 3: 4 (wrong, and no habit: 1 and 3 are never confused), 4: 3 (the habit), and a 2 past the end of
        # the short completion (wrong)
        {"mode": "greedy", "prompt": ".2.. 3412 2143 43.1:", "answer": answer, "completion": "2243"},
        {"mode": "sample", "prompt": "....:", "answer": answer, "completion": "0000"},  # not counted
    ]
    path = tmp_path / "step-0.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = cells.count(rows)
    assert (c.plain, c.plain_right, c.confused, c.confused_right, c.habit) == (3, 1, 4, 1, 2)
    out = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, check=True).stdout
    assert out == (
        f"{path}: cells of 1 and 3 right 33% · cells of 2 and 4 right 25% · the habit in 50% (3 and 4 cells)\n"
    )
    missing = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nope.jsonl")], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "nope.jsonl does not exist" in missing.stderr


def test_a_damaged_file_is_named_by_its_line(tmp_path) -> None:
    path = tmp_path / "step-0.jsonl"
    path.write_text('{"prompt": "x"\n{"prompt": "y"}\n')
    with pytest.raises(SystemExit, match=r"step-0.jsonl line 1 is not valid JSON .*the file is damaged"):
        cells.main([str(path)])


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("step-0.json", '{"step": 0, "metrics": {}}', "is an evaluation's summary; its samples are in"),
        ("metrics.jsonl", '{"step": 1, "reward/mean": 0.5}\n', "holds no evaluation samples (rows with mode"),
        ("empty.jsonl", "", "holds no evaluation samples"),
        ("copy.jsonl", json.dumps({"mode": "greedy", "prompt": "copy 12:", "answer": "12", "completion": "12"}) + "\n",
         "holds no greedy answer to a 4×4 Sudoku with blank cells"),
    ],
)  # fmt: skip
def test_files_that_are_not_sudoku_samples_are_named_as_such(tmp_path, name, text, expected) -> None:
    """The summary beside the samples was called damaged ("Repair or remove that line"), metrics.jsonl raised a
    KeyError, and another task's rows printed 0% with exit 0."""
    (tmp_path / name).write_text(text)
    (tmp_path / "step-0.jsonl").write_text("")
    with pytest.raises(SystemExit) as err:
        cells.main([str(tmp_path / name)])
    assert expected in str(err.value)
    with pytest.raises(SystemExit, match="is a directory"):
        cells.main([str(tmp_path)])
