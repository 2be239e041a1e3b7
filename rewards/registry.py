"""The reward registry: built-in and user reward functions, looked up by name.

Every reward follows TRL's contract (DESIGN §9):
``fn(prompts: list, completions: list, **dataset_columns) -> list[float | None]``, one value per completion,
``None`` for "cannot score this sample" (the reward service turns it into NaN, which advantages exclude).
Completions are strings or chat messages (``[{"role": "assistant", "content": ...}]``); functions must accept
``**kwargs`` because trainers also pass ``completion_ids`` and bookkeeping arguments.

Example:
    >>> @register_reward("always_one")
    ... def always_one(prompts, completions, **kwargs):
    ...     return [1.0] * len(completions)
    >>> get_reward("always_one")(["q"], ["a"])
    [1.0]
    >>> del REWARDS["always_one"]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., list[float | None]]
REWARDS: dict[str, RewardFn] = {}
ANSWER_FORMATS: dict[str, str] = {}  # name -> an example of the answer format the reward reads (e.g. \boxed{42})


class UnknownRewardError(LookupError):
    """A reward name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # LookupError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


def register_reward(name: str, answer_format: str | None = None) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` under ``name`` so configs can name it; returns ``fn`` unchanged. ``answer_format`` is an
    example of what the reward reads in a completion (``\\boxed{42}``): a run checks before it starts that the
    model's tokenizer can write it.

    Raises:
        ValueError: ``name`` is already taken by a different function.
    """

    def wrap(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward name '{name}' is already registered (by {_qualname(REWARDS[name])}).")
        REWARDS[name] = fn
        if answer_format is not None:
            ANSWER_FORMATS[name] = answer_format
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    """The function registered as ``name``.

    Raises:
        UnknownRewardError: ``unknown reward 'x'; choose from [...]``.
    """
    if name not in REWARDS:
        raise UnknownRewardError(f"unknown reward '{name}'; choose from {sorted(REWARDS)}")
    return REWARDS[name]


def answer_format(name: str) -> str | None:
    """The example answer format registered with reward ``name`` (None: any text, or not a registered name)."""
    return ANSWER_FORMATS.get(name)


def available_rewards() -> list[str]:
    """Sorted names of every registered reward."""
    return sorted(REWARDS)


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
