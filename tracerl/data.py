"""Prompt datasets: the datasets library for real data, built-in synthetic tasks for CPU runs.

A source is ``synthetic:<task>``, a local json/jsonl/parquet file (or a ``save_to_disk`` directory), or a hub
dataset name. Columns are checked when loading: a missing column is a clear error that lists the columns the
dataset has, and two column settings that take one column are refused, naming both. A json, jsonl or csv file
must be UTF-8 text: a byte that is not is refused naming the setting, the line and the byte. A source that can
only be a local path (it starts with ``/``, ``.`` or ``~``, has more than one ``/``, or ends in a data-file
extension) and does not exist is refused at once, without asking the hub. Prompts longer than
``max_prompt_tokens`` are dropped (with a count), never truncated, and every column is filtered together.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import math
import os
import random
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from tracerl import hub
from tracerl.config import DATA_FILE_EXTENSIONS, ConfigError, DataConfig, ModelConfig, local_path_reason

SyntheticTask = Callable[..., dict[str, str]]  # fn(rng, **options), or fn(rng, split, **options) with splits
SYNTHETIC: dict[str, SyntheticTask] = {}
WITH_SPLITS: set[str] = set()  # tasks whose "test" split holds out whole instances (grids, operand pairs)
SPLITS = ("train", "test")


def register_task(name: str, *, splits: bool = False) -> Callable[[SyntheticTask], SyntheticTask]:
    """Register a generator of one example as ``synthetic:<name>``. With ``splits`` it takes ``split`` ("train"
    or "test") and must never produce an instance of one split in the other."""

    def wrap(fn: SyntheticTask) -> SyntheticTask:
        SYNTHETIC[name] = fn
        if splits:
            WITH_SPLITS.add(name)
        return fn

    return wrap


@register_task("addition")
def addition(rng: random.Random) -> dict[str, str]:
    """Add two numbers below 50: ``{"prompt": "12+7=", "answer": "19", "response": "19"}``."""
    a, b = rng.randrange(50), rng.randrange(50)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "response": str(a + b)}


@register_task("copy")
def copy_digits(rng: random.Random) -> dict[str, str]:
    """Repeat a short digit string: ``{"prompt": "copy 4071:", "answer": "4071", ...}``."""
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 5)))
    return {"prompt": f"copy {s}:", "answer": s, "response": s}


@register_task("parity")
def parity(rng: random.Random) -> dict[str, str]:
    """Say whether a number is even or odd: ``{"prompt": "parity 37:", "answer": "odd", ...}``."""
    n = rng.randrange(100)
    word = "even" if n % 2 == 0 else "odd"
    return {"prompt": f"parity {n}:", "answer": word, "response": word}


TEACHERS = ("random", "confuse")  # how a noisy teacher errs (the tasks' ``teacher`` option)


def confused_with(digit: str, digits: str = "0123456789") -> str:
    """The digit a ``confuse`` teacher writes by mistake for ``digit``: the digits pair up in order ((1, 2) and
    (3, 4) for Sudoku; (0, 1), (2, 3), ... for addition) and the second of a pair is mistaken for the first; the
    first of a pair is never mistaken (it is returned unchanged).

    Example:
        >>> [confused_with(d, "1234") for d in "1234"], confused_with("9"), confused_with("8")
        (['1', '1', '3', '3'], '8', '8')
    """
    i = digits.index(digit)
    return digits[i - i % 2]


def _teacher_digit(rng: random.Random, digit: str, noise: float, teacher: str, digits: str = "0123456789") -> str:
    """One digit of a noisy demonstration. ``random``: with probability ``noise`` a uniformly random wrong digit,
    so the right digit stays the most frequent one (while noise < 1 - 1/len(digits)) and imitation with greedy
    decoding is not held back by the noise. ``confuse``: with probability ``noise`` the second digit of a pair is
    written as the first (``confused_with``), a systematic mistake: above noise 0.5 the demonstrations' most
    frequent digit there is the wrong one, so imitation learns the mistake. Both teachers make the same draws."""
    wrong, pick = rng.random() < noise, rng.choice([d for d in digits if d != digit])
    if not wrong:
        return digit
    return pick if teacher == "random" else confused_with(digit, digits)


def _check_noise(task: str, noise: float, teacher: str) -> None:
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(
            f"synthetic:{task} noise={noise} is not a probability: set data.synthetic_options.noise in [0, 1]."
        )
    if teacher not in TEACHERS:
        raise ConfigError(
            f"synthetic:{task} teacher='{teacher}' is not a teacher; set data.synthetic_options.teacher to one of "
            f"{list(TEACHERS)} (random: a random wrong digit; confuse: 2 written as 1, 4 as 3, ...)."
        )


@register_task("long_addition", splits=True)
def long_addition(
    rng: random.Random, split: str, digits: int = 3, noise: float = 0.0, teacher: str = "random"
) -> dict[str, str]:
    """Add two ``digits``-digit numbers: ``{"prompt": "123+456=", "answer": "579", "response": ...}``. One operand
    pair in ten (a fixed hash of the pair) is held out as the test split. The ``response`` (an SFT demonstration)
    comes from a noisy teacher: with ``teacher="random"`` each digit is a random wrong one with probability
    ``noise``; with ``teacher="confuse"`` each odd digit (1, 3, 5, 7, 9) is written as the even digit below it with
    probability ``noise`` and even digits are always right (see ``confused_with``)."""
    _check_noise("long_addition", noise, teacher)
    lo, hi = 10 ** (digits - 1), 10**digits
    while True:
        a, b = rng.randrange(lo, hi), rng.randrange(lo, hi)
        if (random.Random(a * hi + b).random() < 0.1) == (split == "test"):
            break
    answer = str(a + b)
    draws = random.Random(rng.random())  # one draw whatever the noise: the same prompts at every noise level
    response = "".join(_teacher_digit(draws, d, noise, teacher) for d in answer)
    return {"prompt": f"{a}+{b}=", "answer": answer, "response": response}


@functools.cache
def sudoku_grids() -> tuple[str, ...]:
    """Every solved 4×4 Sudoku (rows, columns and 2×2 boxes hold 1-4 once), as 16-digit strings, sorted: 288.

    Example:
        >>> len(sudoku_grids()), sudoku_grids()[0]
        (288, '1234341221434321')
    """
    rows = ["".join(p) for p in itertools.permutations("1234")]
    grids = []
    for r in itertools.product(rows, repeat=4):
        cols_ok = all(len({row[c] for row in r}) == 4 for c in range(4))
        boxes_ok = all(
            len({r[i][j] for i in (bi, bi + 1) for j in (bj, bj + 1)}) == 4 for bi in (0, 2) for bj in (0, 2)
        )
        if cols_ok and boxes_ok:
            grids.append("".join(r))
    return tuple(grids)


@functools.cache
def sudoku_split(split: str) -> tuple[str, ...]:
    """The solution grids of a split: one in six (48, a fixed seeded choice, the same for every run seed) is
    held out as "test", so a held-out puzzle is never a training puzzle with other cells blanked."""
    grids = list(sudoku_grids())
    held = set(random.Random(0).sample(grids, len(grids) // 6))
    return tuple(g for g in grids if (g in held) == (split == "test"))


SUDOKU_MAX_BLANKS = 12  # no 4x4 Sudoku with fewer than 4 clues has a unique solution


@register_task("sudoku4", splits=True)
def sudoku4(
    rng: random.Random,
    split: str,
    min_blanks: int = 6,
    max_blanks: int = 10,
    noise: float = 0.0,
    teacher: str = "random",
) -> dict[str, str]:
    """A 4×4 Sudoku with a unique solution: ``{"prompt": "1.3. 34.2 2.4. 4.21:", "answer": "1234 3412 2143 4321",
    "response": ...}`` (rows separated by spaces, ``.`` for a blank; the answer is the solved grid).
    Between ``min_blanks`` and ``max_blanks`` cells are blank. The ``response`` (an SFT demonstration) comes from
    a noisy teacher that copies the clues right and fills the blank cells: with ``teacher="random"`` each blank
    cell gets a random wrong digit with probability ``noise``; with ``teacher="confuse"`` a blank cell whose answer
    is 2 gets 1, and one whose answer is 4 gets 3, with probability ``noise`` (cells of 1 and 3 are always right,
    see ``confused_with``)."""
    _check_noise("sudoku4", noise, teacher)
    if not 1 <= min_blanks <= max_blanks <= SUDOKU_MAX_BLANKS:
        raise ConfigError(
            f"synthetic:sudoku4 min_blanks={min_blanks} max_blanks={max_blanks}: a 4x4 Sudoku with a unique "
            f"solution has 1 to {SUDOKU_MAX_BLANKS} blank cells (at least 4 clues); set "
            f"data.synthetic_options.min_blanks and max_blanks so that 1 <= min_blanks <= max_blanks <= "
            f"{SUDOKU_MAX_BLANKS}."
        )
    grid = rng.choice(sudoku_split(split))
    while True:
        blanks = set(rng.sample(range(16), rng.randint(min_blanks, max_blanks)))
        clues = [(i, grid[i]) for i in range(16) if i not in blanks]
        if sum(all(g[i] == d for i, d in clues) for g in sudoku_grids()) == 1:
            break
    puzzle = "".join("." if i in blanks else grid[i] for i in range(16))
    draws = random.Random(rng.random())  # one draw whatever the noise: the same puzzles at every noise level
    response = "".join(
        _teacher_digit(draws, d, noise, teacher, "1234") if i in blanks else d for i, d in enumerate(grid)
    )
    return {"prompt": _rows(puzzle) + ":", "answer": _rows(grid), "response": _rows(response)}


def _rows(cells: str) -> str:
    # the same layout in prompt and answer, so a cell sits a fixed distance after its clue
    return " ".join(cells[r : r + 4] for r in range(0, 16, 4))


_OPTION_TYPES: dict[Any, Callable[[Any], bool]] = {  # a task option's annotation → what a value must be
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
}
_OPTION_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


def synthetic(task: str, n: int, seed: int, split: str = "train", **options: Any) -> datasets.Dataset:
    """``n`` examples of a built-in task (columns prompt, answer, response), deterministic given ``seed``;
    ``options`` are the task's keyword arguments (``data.synthetic_options``)."""
    if task not in SYNTHETIC:
        raise ConfigError(f"unknown synthetic task '{task}'; choose from {sorted(SYNTHETIC)}.")
    if split not in SPLITS or split != "train" and task not in WITH_SPLITS:
        raise ConfigError(
            f"synthetic:{task} has no split '{split}' (it has {list(SPLITS) if task in WITH_SPLITS else ['train']}). "
            "Tasks that hold out whole instances as 'test': "
            f"{sorted(WITH_SPLITS)}; otherwise leave eval.source unset (eval.num_prompts then holds out whole "
            "prompts of data.source)."
        )
    fn = SYNTHETIC[task]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("rng", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"data.synthetic_options {unknown} are not options of synthetic:{task}; it accepts {accepted}."
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - a registered task's annotations that do not resolve: its options unchecked
        hints = {}
    for key, value in options.items():
        want = hints.get(key)
        if want in _OPTION_TYPES and not _OPTION_TYPES[want](value):
            raise ConfigError(
                f"data.synthetic_options.{key}={value!r} is a {type(value).__name__}; synthetic:{task} takes "
                f"{_OPTION_NAMES[want]} there (default {inspect.signature(fn).parameters[key].default!r})."
            )
    rng = random.Random(seed)
    kwargs = {"split": split} if task in WITH_SPLITS else {}
    rows = [fn(rng, **kwargs, **options) for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def _load_source(cfg: DataConfig, seed: int, key: str = "data.source") -> datasets.Dataset:
    src = cfg.source
    if src.startswith("synthetic:"):
        return synthetic(src.split(":", 1)[1], cfg.num_synthetic, seed, cfg.split, **cfg.synthetic_options)
    path = Path(src).expanduser()
    reason = local_path_reason(src, DATA_FILE_EXTENSIONS)
    local = reason is not None or path.exists()
    if not path.exists() and reason is not None:  # a mistyped path: said at once, the hub is never asked
        raise ConfigError(
            f"{key} '{src}' does not exist ({reason}); give an existing json/jsonl/parquet/csv file or dataset "
            "directory, a hub dataset name 'org/name' or synthetic:<task>."
        )
    problem = None if local else hub.hub_problem(src, "dataset")
    if problem is not None:
        raise ConfigError(
            f"could not fetch dataset '{src}' ({key}) from the hub: {problem}; and it is not a local path "
            f"either{hub.local_folder_hint(src)}. Check the name and your network, or give a local "
            "json/jsonl/parquet/csv file."
        )
    if path.is_file() and path.stat().st_size < 4096 and not path.read_bytes().strip():
        raise ConfigError(
            f"{key} '{src}' is an empty file: it holds no examples. Write them into it (one JSON object a line for "
            f".jsonl), or point {key} at the file that holds them."
        )
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if local:
            kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
            if kind is None:
                raise ConfigError(
                    f"{key} '{src}': unsupported file type '{path.suffix}' (use .json, .jsonl, .parquet or .csv)."
                )
            text = _csv_as_text(path, cfg) if kind == "csv" else {}
            with datasets_quiet():  # a parse error is reported below, as one paragraph, not as its log lines
                loaded = datasets.load_dataset(kind, data_files=str(path), split="train", **text)
            check_utf8(loaded, path, f"{key} '{src}'", key)
            return loaded
        return datasets.load_dataset(src, split=cfg.split)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the message is what matters
        if local and path.suffix in TEXT_FILE_SUFFIXES and (problem := utf8_problem(path)):
            raise not_utf8(f"{key} '{src}'", problem, key) from None
        detail = (json_problem(path) if local and path.suffix in (".json", ".jsonl") else None) or root_cause(err)
        offline = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "")).strip().lower()
        if not local and offline in ("1", "true", "yes", "on"):
            raise ConfigError(
                f"{key} '{src}' is a hub dataset that is not in the local cache, and HF_DATASETS_OFFLINE / "
                "HF_HUB_OFFLINE forbid downloading it. Download it once with the network on (or save it with "
                f"save_to_disk and give that folder as {key}), or unset the offline variable."
            ) from None
        raise ConfigError(f"could not load {key} '{src}' (split {cfg.split}): {detail}") from None


def _text_columns(cfg: DataConfig) -> list[str]:
    """The file's names of the prompt, answer and response columns (read as text from a CSV file)."""
    return list(dict.fromkeys((cfg.prompt_column, cfg.answer_column, cfg.response_column)))


def _csv_as_text(path: Path, cfg: DataConfig) -> dict:
    """pandas options that read a CSV's prompt, answer and response columns as the text written there.

    pandas guesses a column's type and reads its NA words as missing: answers ``2``, ``4`` and a blank would come
    back as 2.0, 4.0 and NaN, and an answer ``None``, ``NA`` or ``null`` as missing. In these columns only a blank
    is missing; the file's other columns are read as pandas reads them (its own NA words).
    """
    import pandas as pd
    from pandas._libs.parsers import STR_NA_VALUES  # pandas' default NA words, kept for the other columns

    text = _text_columns(cfg)
    with contextlib.suppress(Exception):  # an unreadable header is reported by the load itself, as one paragraph
        header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
        words = sorted(STR_NA_VALUES)
        na_values = {c: ([""] if c in text else words) for c in header}
        return {"converters": dict.fromkeys(text, str), "keep_default_na": False, "na_values": na_values}
    return {"converters": dict.fromkeys(text, str)}


@contextlib.contextmanager
def datasets_quiet() -> Iterator[None]:
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def root_cause(err: BaseException) -> str:
    """The innermost exception's message (datasets wraps the real one in "An error occurred while generating")."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"


TEXT_FILE_SUFFIXES = (".json", ".jsonl", ".csv")  # data files read as text, which must be UTF-8


def utf8_problem(path: Path) -> str | None:
    """Where a text file stops being UTF-8, as "line N is not UTF-8 text (byte 0xff at column C)" (C counts the
    line's characters from 1); None if all of it decodes. One pass over the file, a line at a time: only called
    once a load has failed, or its text has not passed ``check_utf8``."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(line[: err.start].decode("utf-8")) + 1
                return f"line {number} is not UTF-8 text (byte 0x{line[err.start]:02x} at column {column})"
    return None


def not_utf8(named: str, problem: str, key: str) -> ConfigError:
    """The error for a data file that is not UTF-8: ``named`` is the setting and its value as the caller's other
    errors write them (``data.source '/d/x.jsonl'``), ``problem`` what ``utf8_problem`` found."""
    return ConfigError(
        f"{named} {problem}; re-save it as UTF-8 (json, jsonl and csv data files are read as UTF-8 text; a Latin-1 "
        f"file, say, converts with iconv -f latin1 -t utf-8 IN > OUT), or point {key} at a UTF-8 copy of it."
    )


def check_utf8(ds: datasets.Dataset, path: Path, named: str, key: str) -> None:
    """The text that ``datasets`` read from a json/jsonl/csv file at ``path`` is UTF-8. Its JSON reader keeps bytes
    that are not UTF-8 in the strings it loads, and they fail only when a value is read, as a bare decode error
    somewhere later; Arrow's full validation finds them at once, and then the file is scanned for the line.

    Raises:
        ConfigError: naming ``named`` (the setting and the file), the line, the byte and the fix.
    """
    if path.suffix not in TEXT_FILE_SUFFIXES:
        return
    try:
        ds.data.table.validate(full=True)
    except pa.ArrowInvalid:
        problem = utf8_problem(path)
        if problem is not None:
            raise not_utf8(named, problem, key) from None


def json_problem(path: Path) -> str | None:
    """Where a JSON Lines (or JSON) file stops parsing, as "line N: <error>", or that it is an empty document;
    None if it parses."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    rows = "it must hold rows: a JSON list of objects, or one object a line (.jsonl)"
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        pass
    else:
        if document in ([], {}):
            return "the file holds no rows (an empty JSON document)"
        if not isinstance(document, list | dict):
            return f"the file holds the single JSON value {document!r:.80}, not rows; {rows}"
        if isinstance(document, list) and not all(isinstance(r, dict) for r in document):
            first = next(r for r in document if not isinstance(r, dict))
            return f"the file is a JSON list whose elements are not all objects (one is {first!r:.80}); {rows}"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg} at column {err.colno}): {line[:80]!r}"
            if not isinstance(value, dict):
                return f"line {number} holds {value!r:.80}, not a JSON object; {rows}"
    return None


def load_examples(
    cfg: DataConfig, seed: int, require: tuple[str, ...] = ("prompt",), key: str = "data.source"
) -> datasets.Dataset:
    """Load the dataset and rename its configured columns to ``prompt`` / ``answer`` / ``response``.

    ``require`` names the logical columns the caller needs ("prompt", "answer", "response"); a missing one is
    an error listing the dataset's columns and the config key to set. ``key`` is the setting ``cfg.source`` came
    from (``eval.source`` for a separate evaluation set), named by every error.
    """
    ds = _load_source(cfg, seed, key)
    if len(ds) == 0:
        raise ConfigError(
            f"{key} '{cfg.source}' has no rows: there is nothing to train or evaluate on; "
            f"point {key} at a dataset that holds examples."
        )
    mapping = {"prompt": cfg.prompt_column, "answer": cfg.answer_column, "response": cfg.response_column}
    for logical in require:
        column = mapping[logical]
        if column not in ds.column_names:
            raise ConfigError(
                f"{key} '{cfg.source}' has no column '{column}' (needed as the {logical}); it has "
                f"{ds.column_names}. Set data.{logical}_column to the right one."
            )
    renames = {col: logical for logical, col in mapping.items() if col in ds.column_names and col != logical}
    # the chosen column wins: a column already named like its logical name (data.prompt_column=question in a
    # file that also has a "prompt" column) is dropped, unless it is itself renamed to another logical name
    replaced = [name for name in renames.values() if name in ds.column_names and name not in renames]
    final = {c: renames.get(c, c) for c in ds.column_names if c not in replaced}  # file column → its new name
    for logical, column in mapping.items():  # a setting that takes another one's column (data.answer_column=prompt)
        other = final.get(column, logical)
        if other != logical and (logical in require or logical in final.values()):  # lost, or silently replaced
            lost = (
                f"the {logical}s would come from its own '{logical}' column instead"
                if logical in final.values()
                else f"no {logical}s would be left"
            )
            raise ConfigError(
                f"data.{other}_column='{column}' names the column that data.{logical}_column='{column}' takes as the "
                f"{logical} of {key} '{cfg.source}': one column cannot be both, and renamed to '{other}', {lost}. "
                f"Set data.{other}_column to the column that holds the {other}s, or data.{logical}_column to the one "
                f"that holds the {logical}s (it has {ds.column_names})."
            )
    for logical in require:
        if logical in ("prompt", "response"):
            _check_text(ds[mapping[logical]], logical, mapping[logical], cfg.source, key)
    if replaced:
        ds = ds.remove_columns(replaced)
    return ds.rename_columns(renames) if renames else ds


def _check_text(values: list[Any], logical: str, column: str, source: str, key: str) -> None:
    """Every value of the prompt or response column is text (a prompt may be chat messages, each a dict with a
    string ``role`` and ``content``): a null, a number or a malformed message is named with its row, before a
    tokenizer meets it."""
    for row, value in enumerate(values):
        if isinstance(value, str):
            continue
        if logical == "prompt" and isinstance(value, list):
            _check_messages(value, row, column, source, key)
            continue
        what = "null" if value is None else f"{value!r} of type {type(value).__name__}, not text"
        raise ConfigError(
            f"row {row} (counting from 0) of {key} '{source}' has no {logical}: its column '{column}' is {what}. "
            f"Every example needs its {logical} as text: fill in or remove that row, or set data.{logical}_column "
            f"to the column that holds the {logical}s."
        )


def _check_messages(messages: list[Any], row: int, column: str, source: str, key: str) -> None:
    """A prompt that is a list is a conversation: every element a message ``{"role": str, "content": str}``."""
    shape = 'a list of messages like {"role": "user", "content": "..."}'
    if not messages or not all(isinstance(m, dict) for m in messages):
        raise ConfigError(
            f"row {row} (counting from 0) of {key} '{source}' has a prompt that is neither text nor a conversation: "
            f"its column '{column}' holds {_short(messages)}. A prompt must be a string or {shape}; fix that row, "
            "or set data.prompt_column to the column that holds the prompts."
        )
    for i, message in enumerate(messages):
        # content is text, or a list of parts ([{"type": "text", "text": ...}]) that chat templates also take
        bad = [k for k, ok in (("role", (str,)), ("content", (str, list))) if not isinstance(message.get(k), ok)]
        if bad:
            raise ConfigError(
                f"row {row} (counting from 0) of {key} '{source}' has a conversational prompt whose message {i} "
                f"has no text {' or '.join(repr(k) for k in bad)} (it is {_short(message)}); every message of a "
                f"conversation must be a dict with a string 'role' and a 'content' (text, or a list of parts), as in "
                f"{shape}. Fix the messages of column '{column}', or set data.prompt_column to the column that holds "
                "the prompts."
            )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def missing_answers(answers: Sequence[Any], prompts: Sequence[Any], column: str, source: str, key: str) -> str:
    """What is missing where prompts have no answer (None, as a key missing from a JSON Lines row is, NaN, or
    empty text), e.g. ``"2 of the 6 prompts of data.source 'd.jsonl' have no answer (the first: '1+1=')"``; ""
    if every prompt has one.

    Example:
        >>> missing_answers(["2", None, " "], ["1+1=", "2+2=", "3+3="], "answer", "d.jsonl", "data.source")
        "2 of the 3 prompts of data.source 'd.jsonl' have no answer in column 'answer' (the first: '2+2=')"
    """
    missing = [
        i for i, v in enumerate(answers)
        if v is None or isinstance(v, float) and math.isnan(v) or isinstance(v, str) and not v.strip()
    ]  # fmt: skip
    if not missing:
        return ""
    return (
        f"{len(missing)} of the {len(answers)} prompts of {key} '{source}' have no answer in column '{column}' (the "
        f"first: {_short(prompts[missing[0]])})"
    )


def encode_prompt(tokenizer: Any, prompt: str | list[dict], cfg: DataConfig) -> list[int]:
    """Token ids of a prompt, wrapped in the tokenizer's chat template when configured."""
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if cfg.system_prompt:
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, list):
        raise ConfigError("conversational prompts need a chat template: set data.chat_template=true.")
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


COVERAGE_ROWS = 256  # rows of each text column the tokenizer check reads


def column_texts(values: list[Any]) -> list[str]:
    """The text of column values: strings as they are, chat messages as their contents."""
    out = []
    for v in values:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out.extend(str(m.get("content", "")) for m in v if isinstance(m, dict))
    return out


def unknown_tokens(tokenizer: Any, texts: list[str]) -> tuple[float, list[str]]:
    """(fraction of the tokens of ``texts`` that are the tokenizer's unknown token, the characters it writes as
    unknown); (0.0, []) for a tokenizer without an unknown token (byte-level BPE writes anything).

    Example:
        >>> from tracerl.models.tiny import char_tokenizer
        >>> unknown_tokens(char_tokenizer("0123456789"), [r"\\boxed{12}"])
        (0.8, ['\\\\', 'b', 'd', 'e', 'o', 'x', '{', '}'])
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return 0.0, []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    total, bad = sum(len(x) for x in ids), sum(x.count(unk) for x in ids)
    if not bad:
        return 0.0, []
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    unknown = [c for c in chars if unk in tokenizer(c, add_special_tokens=False)["input_ids"]]
    return bad / max(1, total), unknown


def first_unreadable(
    tokenizer: Any, columns: dict[str, list[Any]], max_rate: float
) -> tuple[str, float, list[str]] | None:
    """The first column (name → values, strings or chat messages) of which more than ``max_rate`` of the tokens
    are the tokenizer's unknown token, as (name, rate, the characters it writes as unknown); None if all are
    readable.

    Example:
        >>> from tracerl.models.tiny import char_tokenizer
        >>> first_unreadable(char_tokenizer("0123456789"), {"prompt": ["12"], "answer": ["1a"]}, 0.1)
        ('answer', 0.5, ['a'])
    """
    for name, values in columns.items():
        rate, chars = unknown_tokens(tokenizer, column_texts(values))
        if rate > max_rate:
            return name, rate, chars
    return None


def check_coverage(
    tokenizer: Any,
    ds: datasets.Dataset,
    cfg: DataConfig,
    fix: str,
    formats: dict[str, str] | None = None,
    key: str = "data.source",
) -> None:
    """The tokenizer can write the data: on the first rows of the prompt, answer and response columns, at most
    ``data.max_unknown_rate`` of the tokens are its unknown token, and every example answer format of the rewards
    (``formats``: reward name → e.g. ``\\boxed{42}``) is written without one. ``fix`` says what to change (the
    tokenizer files, ``model.tiny.alphabet``).

    Raises:
        ConfigError: naming the column (or reward), the rate, the characters and the fix.
    """
    rows = ds.select(range(min(COVERAGE_ROWS, len(ds))))
    present = {c: rows[c] for c in ("prompt", "answer", "response") if c in rows.column_names}
    unreadable = first_unreadable(tokenizer, present, cfg.max_unknown_rate)
    if unreadable is not None:
        column, rate, chars = unreadable
        raise ConfigError(
            f"the tokenizer cannot write the data: {rate:.1%} of the tokens of the {column}s of {key} "
            f"'{cfg.source}' (first {len(rows)} rows) are its unknown token {tokenizer.unk_token!r}, from the "
            f"characters {chars[:24]}; the model could never read or write them (data.max_unknown_rate="
            f"{cfg.max_unknown_rate}). {fix}"
        )
    for name, example in (formats or {}).items():
        rate, chars = unknown_tokens(tokenizer, [example])
        if rate > 0:
            raise ConfigError(
                f"the reward '{name}' reads answers written like {example!r}, but the tokenizer writes the characters "
                f"{chars} as its unknown token {tokenizer.unk_token!r}: the model could never write an answer the "
                f"reward can score. {fix}"
            )


def tokenizer_fix(cfg: ModelConfig) -> str:
    """What to change when the model's tokenizer cannot write the data (the end of ``check_coverage``'s error)."""
    if cfg.family == "tiny" and cfg.path is None:
        return (
            f"Add the missing characters to model.tiny.alphabet (now {cfg.tiny.alphabet!r}); the tiny model's "
            "char tokenizer has exactly those characters."
        )
    return (
        f"Check the tokenizer files at model.path '{cfg.path}': without its tokenizer_config.json, "
        "transformers falls back to defaults (a lower-casing BERT tokenizer, say) that do not match the model's "
        "vocabulary. Save the model's own tokenizer there, or raise data.max_unknown_rate if the data really holds "
        "such characters."
    )


def sft_pairs(ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids ending with EOS) for every example whose prompt fits ``max_prompt_tokens``."""
    pairs = []
    for row in ds:
        prompt = encode_prompt(tokenizer, row["prompt"], cfg)
        if len(prompt) > cfg.max_prompt_tokens:
            continue
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((prompt, response))
    return pairs


@dataclass
class PromptBatch:
    """A batch of prompts with every dataset column, filtered together."""

    prompt_ids: list[list[int]]  # [P] token ids after the chat template
    prompts: list[Any]  # [P] prompts as the dataset has them (text or chat messages)
    columns: dict[str, list[Any]] = field(default_factory=dict)  # every other column, [P] each


class PromptStream:
    """An endless, seeded, resumable stream of prompt batches over a dataset (epoch after epoch).

    Prompts longer than ``max_prompt_tokens`` are dropped once, up front; ``dropped`` counts them.

    For a part of a dataset (the rows left for training, or those held out for evaluation) ``rows`` are its rows'
    numbers in ``key``'s dataset and ``part`` says which part it is ("the prompts held out ... of"), so that errors
    name the right rows and say which prompts they mean; ``fix`` ends the error when no prompt fits.
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        tokenizer: Any,
        cfg: DataConfig,
        seed: int,
        key: str = "data.source",
        *,
        rows: list[int] | None = None,
        part: str = "every prompt of",
        fix: str = "raise the limit",
    ) -> None:
        encoded = [encode_prompt(tokenizer, p, cfg) for p in ds["prompt"]]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            first = rows[empty[0]] if rows is not None else empty[0]
            raise ConfigError(
                f"{len(empty)} prompt(s) of {key} '{cfg.source}' are empty (no tokens; the first is row "
                f"{first}, column '{cfg.prompt_column}'): a model cannot be prompted with nothing. Remove them, "
                "or point data.prompt_column at the column that holds the prompts."
            )
        keep = [i for i, ids in enumerate(encoded) if len(ids) <= cfg.max_prompt_tokens]
        self.dropped = len(encoded) - len(keep)
        if not keep:
            raise ConfigError(
                f"{part} {key} '{cfg.source}' is longer than data.max_prompt_tokens={cfg.max_prompt_tokens}; {fix}."
            )
        self.ds = ds.select(keep)
        self.ids = [encoded[i] for i in keep]
        self.tokenizer = tokenizer
        self.cfg, self.seed = cfg, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.ids)))
        if self.cfg.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> PromptBatch:
        picked = []
        while len(picked) < n:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(self._order[self.cursor])
            self.cursor += 1
        rows = self.ds.select(picked)
        columns = {c: rows[c] for c in rows.column_names if c != "prompt"}
        return PromptBatch([self.ids[i] for i in picked], rows["prompt"], columns)

    def all(self) -> PromptBatch:
        """Every prompt once, in dataset order (an evaluation set)."""
        columns = {c: self.ds[c] for c in self.ds.column_names if c != "prompt"}
        return PromptBatch(list(self.ids), self.ds["prompt"], columns)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": len(self._order)}

    def load_state_dict(self, state: dict[str, int]) -> str | None:
        """Continue from ``state``; → a note when it was saved over a training set of another size (see
        ``resume_position``), None when it continues where it stopped."""
        self.epoch, self.cursor, note = resume_position(state, len(self.ids), RESUME_DATA_SETTINGS)
        self._order = self._permutation()
        return note


RESUME_DATA_SETTINGS = (
    "data.source, eval.num_prompts (the prompts held out of it) or data.max_prompt_tokens (those dropped)"
)


def resume_position(state: dict[str, int], size: int, settings: str) -> tuple[int, int, str | None]:
    """(epoch, cursor, note) to continue a seeded epoch-by-epoch pass over ``size`` examples from a saved ``state``
    (its ``epoch``, ``cursor`` and the ``size`` it was saved over; a state without a size is taken to fit while its
    cursor lies within ``size``).

    A resume may change the data (a curriculum), and then the saved position, a place in a permutation of other
    examples, means nothing for the new ones: a state saved over another size begins the next epoch, a fresh
    seeded permutation of the ``size`` examples, at its start, and the note says so, naming ``settings`` (what
    decides the training set). The same data resumes exactly where it stopped (note None).

    Example:
        >>> resume_position({"epoch": 0, "cursor": 4, "size": 60}, 3, "data.source")[:2]
        (1, 0)
        >>> resume_position({"epoch": 2, "cursor": 4, "size": 60}, 60, "data.source")
        (2, 4, None)
    """
    epoch, cursor = int(state["epoch"]), int(state["cursor"])
    saved = state.get("size")
    if (cursor <= size) if saved is None else int(saved) == size:
        return epoch, cursor, None
    where = f"after {cursor} of its {saved} examples" if saved is not None else f"after {cursor} examples"
    note = (
        f"the run's data position (epoch {epoch}, {where}) was saved over other training data than these {size} "
        f"examples: {settings} changed. That position means nothing here, so training goes on with epoch "
        f"{epoch + 1}, a fresh seeded shuffle of all {size}."
    )
    return epoch + 1, 0, note
