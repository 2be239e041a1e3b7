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
