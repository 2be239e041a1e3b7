"""Prompt datasets: the datasets library for real data, built-in synthetic tasks for CPU runs.

A source is ``synthetic:<task>``, a local json/jsonl/parquet file (or a ``save_to_disk`` directory), or a hub
dataset name. Columns are checked when loading: a missing column is a clear error that lists the columns the
dataset has. Prompts longer than ``max_prompt_tokens`` are dropped (with a count), never truncated, and every
column is filtered together.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from tracerl.config import ConfigError, DataConfig

SyntheticTask = Callable[[random.Random], dict[str, str]]
SYNTHETIC: dict[str, SyntheticTask] = {}


def register_task(name: str) -> Callable[[SyntheticTask], SyntheticTask]:
    def wrap(fn: SyntheticTask) -> SyntheticTask:
        SYNTHETIC[name] = fn
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


def synthetic(task: str, n: int, seed: int) -> datasets.Dataset:
    """``n`` examples of a built-in task (columns prompt, answer, response)."""
    if task not in SYNTHETIC:
        raise ConfigError(f"unknown synthetic task '{task}'; choose from {sorted(SYNTHETIC)}.")
    rng = random.Random(seed)
    rows = [SYNTHETIC[task](rng) for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def _load_source(cfg: DataConfig, seed: int) -> datasets.Dataset:
    src = cfg.source
    if src.startswith("synthetic:"):
        return synthetic(src.split(":", 1)[1], cfg.num_synthetic, seed)
    path = Path(src).expanduser()
    local = src.startswith((".", "/", "~")) or path.exists()
    if local and not path.exists():
        raise ConfigError(
            f"data.source '{src}' does not exist; give a json/jsonl/parquet file, a dataset directory, "
            "a hub dataset name or synthetic:<task>."
        )
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if local:
            kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
            if kind is None:
                raise ConfigError(
                    f"data.source '{src}': unsupported file type '{path.suffix}' (use .json, .jsonl, .parquet or .csv)."
                )
            with _datasets_quiet():  # a parse error is reported below, as one paragraph, not as its log lines
                return datasets.load_dataset(kind, data_files=str(path), split="train")
        return datasets.load_dataset(src, split=cfg.split)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the message is what matters
        detail = (_json_problem(path) if local and path.suffix in (".json", ".jsonl") else None) or _root_cause(err)
        raise ConfigError(f"could not load data.source '{src}' (split {cfg.split}): {detail}") from None


@contextlib.contextmanager
def _datasets_quiet() -> Iterator[None]:
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _root_cause(err: BaseException) -> str:
    """The innermost exception's message (datasets wraps the real one in "An error occurred while generating")."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"


def _json_problem(path: Path) -> str | None:
    """Where a JSON Lines (or JSON) file stops parsing, as "line N: <error>"; None if it parses."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return None  # one JSON document
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg} at column {err.colno}): {line[:80]!r}"
    return None


def load_examples(cfg: DataConfig, seed: int, require: tuple[str, ...] = ("prompt",)) -> datasets.Dataset:
    """Load the dataset and rename its configured columns to ``prompt`` / ``answer`` / ``response``.

    ``require`` names the logical columns the caller needs ("prompt", "answer", "response"); a missing one is
    an error listing the dataset's columns and the config key to set.
    """
    ds = _load_source(cfg, seed)
    mapping = {"prompt": cfg.prompt_column, "answer": cfg.answer_column, "response": cfg.response_column}
    for logical in require:
        column = mapping[logical]
        if column not in ds.column_names:
            raise ConfigError(
                f"data.source '{cfg.source}' has no column '{column}' (needed as the {logical}); it has "
                f"{ds.column_names}. Set data.{logical}_column to the right one."
            )
    renames = {col: logical for logical, col in mapping.items() if col in ds.column_names and col != logical}
    return ds.rename_columns(renames) if renames else ds


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
    """

    def __init__(self, ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig, seed: int) -> None:
        encoded = [encode_prompt(tokenizer, p, cfg) for p in ds["prompt"]]
        keep = [i for i, ids in enumerate(encoded) if len(ids) <= cfg.max_prompt_tokens]
        self.dropped = len(encoded) - len(keep)
        if not keep:
            raise ConfigError(
                f"every prompt of data.source '{cfg.source}' is longer than data.max_prompt_tokens="
                f"{cfg.max_prompt_tokens}; raise the limit."
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
            if self.cursor == len(self._order):
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
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()
