"""Text helpers shared by the built-in rewards: completion text, ``\\boxed{}`` and code-block extraction."""

from __future__ import annotations

import re
from typing import Any

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[ \t]*\n(.*?)```", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is, or the assistant content of a chat-message list.

    Chat content may be a string or a list of parts (``{"type": "text", "text": ...}``); the text of every
    assistant message is joined, so multi-turn completions keep all of their output.

    Example:
        >>> completion_text("plain")
        'plain'
        >>> completion_text([{"role": "assistant", "content": "chat"}])
        'chat'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list | tuple):
        texts = []
        for message in completion:
            if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
                continue
            content = message.get("content", "")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            texts.append(str(content))
        return "\n".join(texts)
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}: "
        f"{str(completion)[:80]!r}"
    )


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if absent.

    Example:
        >>> last_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
        '\\\\frac{1}{2}'
        >>> last_boxed("no answer") is None
        True
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start >= 0:
        open_at = text.find("{", start)
        between = text[start + 1 : open_at] if open_at >= 0 else ""
        if open_at >= 0 and between.strip() in ("boxed", "fbox"):
            depth = 0
            for i in range(open_at, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[open_at + 1 : i]
        # an unbalanced or brace-less \boxed: look for an earlier, complete one
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def extract_code(text: str) -> str:
    """The program in a completion: the last fenced code block, else the whole text.

    An opening fence without a closing one (a truncated completion) yields everything after it; a lone
    closing fence (the opening one was in the prompt) yields everything before it.

    Example:
        >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nDone.")
        'print(1)\\n'
        >>> extract_code("def f():\\n    return 2\\n```")
        'def f():\\n    return 2\\n'
    """
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1][1]
    if text.count("```") == 1:
        before, after = text.split("```", 1)
        first_line, newline, rest = after.partition("\n")
        opening = newline and rest.strip() and re.fullmatch(r"[ \t]*[A-Za-z0-9_+#.-]*[ \t]*", first_line)
        return rest if opening else before
    return text
