"""Length-shaped rewards: a brevity reward and DAPO's soft overlong penalty.

Lengths are counted in tokens when ``completion_ids`` is passed (the trainer always passes it; give it only
the response tokens that count, without padding), otherwise in characters of the completion text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rewards.registry import register_reward
from rewards.text import completion_text


def completion_lengths(completions: list, completion_ids: Sequence[Sequence[int]] | None) -> list[int]:
    """Token counts from ``completion_ids`` when given, else character counts of the completion text."""
    if completion_ids is not None:
        if len(completion_ids) != len(completions):
            raise ValueError(f"completion_ids has {len(completion_ids)} entries for {len(completions)} completions.")
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


@register_reward("length")
def length_reward(
    prompts: list,
    completions: list,
    completion_ids: Sequence[Sequence[int]] | None = None,
    max_length: int = 1024,
    **kwargs: Any,
) -> list[float]:
    """Brevity: ``1 - min(length, max_length) / max_length``, from 1.0 (empty) down to 0.0 (``max_length``).

    Example:
        >>> length_reward(["q"] * 3, ["a", "b", "c"], completion_ids=[[1] * 0, [1] * 256, [1] * 2000], max_length=512)
        [1.0, 0.5, 0.0]
    """
    if max_length <= 0:
        raise ValueError(f"length_reward: max_length must be positive, got {max_length}.")
    return [1.0 - min(n, max_length) / max_length for n in completion_lengths(completions, completion_ids)]


@register_reward("soft_overlong")
def soft_overlong_reward(
    prompts: list,
    completions: list,
    completion_ids: Sequence[Sequence[int]] | None = None,
    max_length: int = 1024,
    cache_length: int = 256,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L = length, Lmax, Lcache:

    ``0`` if L ≤ Lmax − Lcache; ``(Lmax − Lcache − L) / Lcache`` if Lmax − Lcache < L ≤ Lmax; ``−1`` if L > Lmax.
    Add it to a correctness reward (weight 1) so responses that run into the length limit lose reward smoothly.

    Example:
        >>> soft_overlong_reward(
        ...     ["q"] * 4, ["a"] * 4, completion_ids=[[0] * n for n in (700, 800, 896, 1100)],
        ...     max_length=1024, cache_length=256,
        ... )
        [0.0, -0.125, -0.5, -1.0]
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"soft_overlong_reward: need 0 < cache_length <= max_length, got cache_length={cache_length}, "
            f"max_length={max_length}."
        )
    safe = max_length - cache_length
    rewards = []
    for n in completion_lengths(completions, completion_ids):
        if n <= safe:
            rewards.append(0.0)
        elif n <= max_length:
            rewards.append((safe - n) / cache_length)
        else:
            rewards.append(-1.0)
    return rewards
