"""Built-in tasks where RL has something to add: 4×4 Sudoku and long addition, their splits, their noisy teachers
and their verifiers."""

from __future__ import annotations

import pytest

from rewards.synthetic import digit_accuracy, sudoku_cells
from tracerl.config import ConfigError, DataConfig
from tracerl.data import SUDOKU_MAX_BLANKS, load_examples, sudoku_grids, sudoku_split, synthetic


def is_solved(grid: str) -> bool:
    cells = grid.replace(" ", "")
    rows = [cells[r * 4 : r * 4 + 4] for r in range(4)]
    cols = ["".join(row[c] for row in rows) for c in range(4)]
    boxes = ["".join(rows[r][c] for r in (br, br + 1) for c in (bc, bc + 1)) for br in (0, 2) for bc in (0, 2)]
    return all(sorted(group) == list("1234") for group in rows + cols + boxes)


def test_there_are_288_solved_grids_and_the_splits_partition_them():
    grids = sudoku_grids()
    assert len(grids) == len(set(grids)) == 288 and all(is_solved(g) for g in grids)
    train, test = set(sudoku_split("train")), set(sudoku_split("test"))
    assert len(test) == 48 and not train & test and train | test == set(grids)


def test_sudoku_puzzles_are_unique_consistent_and_seeded():
    ds = synthetic("sudoku4", 200, seed=3)
    assert synthetic("sudoku4", 200, seed=3)["prompt"] == ds["prompt"]
    assert synthetic("sudoku4", 200, seed=4)["prompt"] != ds["prompt"]
    for row in ds:
        puzzle, answer = row["prompt"].rstrip(":"), row["answer"]
        assert len(puzzle) == len(answer) == 19 and is_solved(answer) and row["response"] == answer  # clean teacher
        clues = [(i, c) for i, c in enumerate(puzzle) if c in "1234"]
        assert all(answer[i] == c for i, c in clues)
        assert 6 <= puzzle.count(".") <= 10
        # a unique solution: exactly one solved grid agrees with the clues
        assert sum(all(g[i] == c for i, c in clues) for g in (" ".join([x[:4], x[4:8], x[8:12], x[12:]])
                   for x in sudoku_grids())) == 1  # fmt: skip


def test_sudoku_blank_count_is_an_option_and_bounded():
    ds = synthetic("sudoku4", 300, seed=1, min_blanks=4, max_blanks=6)
    counts = [row["prompt"].count(".") for row in ds]
    assert set(counts) == {4, 5, 6}
    hard = synthetic("sudoku4", 20, seed=1, min_blanks=SUDOKU_MAX_BLANKS, max_blanks=SUDOKU_MAX_BLANKS)
    assert all(row["prompt"].count(".") == SUDOKU_MAX_BLANKS for row in hard)
    # 13 blanks can never have a unique solution: refused, instead of searching forever
    for lo, hi in ((4, 13), (7, 5), (0, 3)):
        with pytest.raises(ConfigError, match=rf"min_blanks={lo} max_blanks={hi}.*1 <= min_blanks <= max_blanks"):
            synthetic("sudoku4", 5, seed=0, min_blanks=lo, max_blanks=hi)


def test_sudoku_test_split_holds_out_whole_solution_grids():
    train = synthetic("sudoku4", 1000, seed=0, split="train")
    test = synthetic("sudoku4", 300, seed=0, split="test")
    held = {g.replace(" ", "") for g in test["answer"]}
    assert held <= set(sudoku_split("test")) and len(held) > 40
    assert not held & {g.replace(" ", "") for g in train["answer"]}


def test_sudoku_noisy_teacher_gets_the_asked_fraction_of_blank_cells_wrong():
    ds = synthetic("sudoku4", 2000, seed=0, noise=0.3)
    blanks = wrong = clue_changed = 0
    for row in ds:
        for p, a, r in zip(row["prompt"], row["answer"], row["response"], strict=False):
            if p == ".":
                blanks += 1
                wrong += a != r
                assert r in "1234"  # a plausible mistake, never an out-of-range digit
            else:
                clue_changed += a != r
    assert clue_changed == 0 and abs(wrong / blanks - 0.3) < 0.015
    # the noise changes the demonstrations only: the same puzzles and answers at every noise level
    clean = synthetic("sudoku4", 2000, seed=0)
    assert ds["prompt"] == clean["prompt"] and ds["answer"] == clean["answer"]


def test_long_addition_answers_split_and_noise():
    train = synthetic("long_addition", 2000, seed=0, noise=0.2)
    test = synthetic("long_addition", 300, seed=0, split="test", digits=3)
    for row in test:
        a, b = row["prompt"].rstrip("=").split("+")
        assert len(a) == len(b) == 3 and int(a) + int(b) == int(row["answer"]) == int(row["response"])
    assert not set(train["prompt"]) & set(test["prompt"])
    digits = sum(len(a) for a in train["answer"])
    pairs = zip(train["answer"], train["response"], strict=True)
    wrong = sum(x != y for a, r in pairs for x, y in zip(a, r, strict=True))
    assert abs(wrong / digits - 0.2) < 0.02


def test_split_and_option_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"synthetic:parity has no split 'test'.*\['long_addition', 'sudoku4'\]"):
        synthetic("parity", 5, seed=0, split="test")
    with pytest.raises(ConfigError, match=r"\['noize'\] are not options of synthetic:sudoku4.*'noise'"):
        load_examples(DataConfig(source="synthetic:sudoku4", synthetic_options={"noize": 0.1}), 0)
    for option, value, kind in (("noise", "abc", "a number"), ("min_blanks", 4.5, "a whole number"),
                                ("max_blanks", [1], "a whole number"), ("teacher", 3, "text")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"data.synthetic_options.{option}=.* synthetic:sudoku4 takes {kind}"):
            synthetic("sudoku4", 5, seed=0, **{option: value})  # a bare TypeError from inside the task before
    assert len(synthetic("sudoku4", 5, seed=0, noise=1)) == 5  # an int where a float belongs is a number
    cfg = DataConfig(source="synthetic:sudoku4", split="test", num_synthetic=5)
    assert all(is_solved(a) for a in load_examples(cfg, 0)["answer"])


def test_sudoku_cells_by_hand():
    puzzle, solution = "1.3. 34.2 2.4. 4.21:", "1234 3412 2143 4321"  # 6 blanks
    cases = {
        solution: 1.0,
        "1234341221434321": 1.0,  # whitespace is ignored
        "1434 3412 2143 4321": 5 / 6,  # one blank wrong
        "1434 3432 2143 4321": 4 / 6,
        "1234 3412 2143 4322": 0.0,  # a clue changed: the grid contradicts the puzzle
        "1234 3412 2143": 0.0,  # not a whole grid
    }
    got = sudoku_cells([puzzle] * len(cases), list(cases), answer=[solution] * len(cases))
    assert got == pytest.approx(list(cases.values()))


def test_digit_accuracy_by_hand():
    got = digit_accuracy(["512+989="] * 4, ["1501", "1401", "501", "15010"], answer=["1501"] * 4)
    # "1401": 3 of 4 digits; "501": 3 right over 4; "15010" against "1501" from the right: 0-1 1-0 0-5 1-5, none
    assert got == pytest.approx([1.0, 0.75, 0.75, 0.0])


def test_confusing_teacher_writes_1_for_2_and_3_for_4_at_the_asked_rate():
    ds = synthetic("sudoku4", 2000, seed=0, noise=0.6, teacher="confuse")
    assert synthetic("sudoku4", 2000, seed=0, noise=0.6, teacher="confuse")["response"] == ds["response"]
    assert synthetic("sudoku4", 2000, seed=1, noise=0.6, teacher="confuse")["response"] != ds["response"]
    confusable = wrong = 0
    for row in ds:
        for p, a, r in zip(row["prompt"], row["answer"], row["response"], strict=False):
            if p == "." and a in "24":
                confusable += 1
                wrong += a != r
                assert r in (a, {"2": "1", "4": "3"}[a])  # the one mistake the teacher makes
            else:
                assert r == a  # clues, and blank cells of 1 and 3, are always right
    assert confusable > 5000 and abs(wrong / confusable - 0.6) < 0.015
    # above noise 0.5 the demonstrations' most frequent digit in a blank cell of 2 or 4 is the wrong one
    assert wrong / confusable > 0.5
    # the teacher changes the demonstrations only: the same puzzles and answers as the clean and random teachers
    clean, noisy = synthetic("sudoku4", 2000, seed=0), synthetic("sudoku4", 2000, seed=0, noise=0.6)
    assert ds["prompt"] == clean["prompt"] == noisy["prompt"] and ds["answer"] == clean["answer"]
    # the verifier scores the grid, not the teacher: the answer earns 1.0, a demonstration its fraction right
    test = synthetic("sudoku4", 300, seed=0, split="test", noise=0.6, teacher="confuse")
    assert not set(test["answer"]) & set(ds["answer"])
    assert sudoku_cells(test["prompt"], test["answer"], answer=test["answer"]) == [1.0] * 300
    row = ds[0]
    blank = [i for i, c in enumerate(row["prompt"]) if c == "."]
    right = sum(row["answer"][i] == row["response"][i] for i in blank) / len(blank)
    assert right < 1.0 and sudoku_cells([row["prompt"]], [row["response"]], answer=[row["answer"]]) == [right]


def test_confusing_teacher_on_long_addition():
    train = synthetic("long_addition", 2000, seed=0, noise=0.6, teacher="confuse")
    test = synthetic("long_addition", 300, seed=0, split="test", noise=0.6, teacher="confuse")
    assert not set(train["prompt"]) & set(test["prompt"])
    assert train["prompt"] == synthetic("long_addition", 2000, seed=0)["prompt"]
    pairs = [(x, y) for a, r in zip(train["answer"], train["response"], strict=True) for x, y in zip(a, r, strict=True)]
    odd = [(x, y) for x, y in pairs if int(x) % 2]
    assert all(y == x for x, y in pairs if int(x) % 2 == 0)
    assert all(y in (x, str(int(x) - 1)) for x, y in odd)
    assert abs(sum(x != y for x, y in odd) / len(odd) - 0.6) < 0.02
    assert digit_accuracy(test["prompt"], test["answer"], answer=test["answer"]) == [1.0] * 300


def test_teacher_and_noise_errors_name_the_setting():
    with pytest.raises(ConfigError, match=r"teacher='confused' is not a teacher.*\['random', 'confuse'\]"):
        synthetic("sudoku4", 5, seed=0, noise=0.6, teacher="confused")
    with pytest.raises(ConfigError, match=r"noise=1.5 is not a probability.*data.synthetic_options.noise"):
        synthetic("long_addition", 5, seed=0, noise=1.5)
