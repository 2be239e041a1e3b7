"""Format reward: the completion has the required tags, in order, and a ``\\boxed{}`` answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rewards.registry import register_reward
from rewards.text import completion_text, last_boxed


def has_format(text: str, tags: Sequence[str] = ("think",), require_boxed: bool = True) -> bool:
    """True when each ``<tag>...</tag>`` pair occurs exactly once, pairs in the given order, and (if
    ``require_boxed``) a complete ``\\boxed{}`` follows the last closing tag.

    Example:
        >>> has_format(r"<think>2+2</think> \\boxed{4}")
        True
        >>> has_format(r"\\boxed{4} <think>2+2</think>")
        False
    """
    cursor = 0
    for tag in tags:
        opening, closing = f"<{tag}>", f"</{tag}>"
        if text.count(opening) != 1 or text.count(closing) != 1:
            return False
        start, end = text.find(opening), text.find(closing)
        if start < cursor or end < start:
            return False
        cursor = end + len(closing)
    return not require_boxed or last_boxed(text[cursor:]) is not None


@register_reward("format", answer_format="<think>2+2</think> \\boxed{4}")
def format_reward(
    prompts: list,
    completions: list,
    tags: Sequence[str] = ("think",),
    require_boxed: bool = True,
    **kwargs: Any,
) -> list[float]:
    """1.0 when a completion has the required tags and a boxed answer (see ``has_format``), else 0.0.

    ``tags=()`` checks the boxed answer only; ``require_boxed=False`` checks the tags only.

    Example:
        >>> chat = [{"role": "assistant", "content": r"\\boxed{1}"}]
        >>> format_reward(["q"] * 3, [r"<think>x</think>\\boxed{1}", "<think>x</think> 1", chat])
        [1.0, 0.0, 0.0]
        >>> format_reward(["q"], [r"the answer is \\boxed{1}"], tags=())
        [1.0]
    """
    return [float(has_format(completion_text(c), tags, require_boxed)) for c in completions]
