"""Math answer rewards: ``\\boxed{}`` equivalence with math-verify, and GSM8K ``#### answer`` matching.

Both read the ground truth from the first of the dataset columns ``answer``, ``solution``, ``ground_truth``
that is present, and score 1.0 (correct) or 0.0 (wrong or no answer found); ``None`` when the ground truth
itself cannot be read, so the sample is excluded instead of punished.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from rewards.registry import register_reward
from rewards.text import completion_text, last_boxed

GROUND_TRUTH_COLUMNS = ("answer", "solution", "ground_truth")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_HASHES = re.compile(r"####\s*([^\n]*)")


def ground_truth_values(fn_name: str, n: int, answer: Any, solution: Any, truth: Any) -> list[Any]:
    """The first ground-truth column given (``answer``, ``solution``, ``ground_truth``), one entry per completion.

    Raises:
        ValueError: no ground-truth column, or one of the wrong length.
    """
    for column, values in zip(GROUND_TRUTH_COLUMNS, (answer, solution, truth), strict=True):
        if values is not None:
            if len(values) != n:
                raise ValueError(f"{fn_name}: column '{column}' has {len(values)} entries for {n} completions.")
            return list(values)
    raise ValueError(
        f"{fn_name} needs the ground truth in a dataset column named one of {list(GROUND_TRUTH_COLUMNS)}; "
        "none was passed (rename your column or map it in the dataset)."
    )


# ---------------------------------------------------------------------------------------------- math_verify


@register_reward("math_verify", answer_format="\\boxed{42}")
def math_verify_reward(
    prompts: list,
    completions: list,
    answer: Sequence[Any] | None = None,
    solution: Sequence[Any] | None = None,
    ground_truth: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when the last ``\\boxed{}`` of a completion is mathematically equal to the ground truth.

    Equality is math-verify's (``math_verify.parse`` + ``verify``): ``\\frac{1}{2}`` = ``0.5``, ``1,000`` =
    ``1000``, ``x^2+1`` = ``1+x^2``. No ``\\boxed{}`` → 0.0; an unparseable ground truth → None.

    Example:
        >>> math_verify_reward(
        ...     ["1/4 + 1/4 = ?"] * 3,
        ...     [r"It is \\boxed{\\frac{1}{2}}", r"\\boxed{0.25}", "one half"],
        ...     answer=["0.5"] * 3,
        ... )
        [1.0, 0.0, 0.0]
    """
    from math_verify import LatexExtractionConfig, parse, verify

    gold_values = ground_truth_values("math_verify", len(completions), answer, solution, ground_truth)
    parse_s, verify_s = _signal_timeouts()
    boxed_only = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    rewards: list[float | None] = []
    for completion, gold in zip(completions, gold_values, strict=True):
        gold_parsed = _parse_gold(str(gold), parse, parse_s)
        if not gold_parsed:
            rewards.append(None)
            continue
        boxed = last_boxed(completion_text(completion))
        if boxed is None:
            rewards.append(0.0)
            continue
        predicted = parse("\\boxed{" + boxed + "}", extraction_config=boxed_only, parsing_timeout=parse_s)
        rewards.append(float(bool(predicted) and verify(gold_parsed, predicted, timeout_seconds=verify_s)))
    return rewards


def _parse_gold(gold: str, parse: Any, timeout_s: int | None) -> list:
    """math-verify's parse of a ground truth; bare LaTeX such as ``x^2+1`` is retried inside ``$...$``."""
    parsed = parse(gold, parsing_timeout=timeout_s)
    if not parsed and "$" not in gold:
        parsed = parse(f"${gold}$", parsing_timeout=timeout_s)
    return parsed


def _signal_timeouts() -> tuple[int | None, int | None]:
    """math-verify's own (parse, verify) timeouts use SIGALRM, which only works on the main thread.

    Off the main thread (the reward service calls functions from worker threads) they are disabled and the
    service's per-call timeout bounds the work instead.
    """
    if threading.current_thread() is threading.main_thread():
        return 5, 5
    for name in ("math_verify.parser", "math_verify.grader"):  # its "timeout is disabled" notice, once per run
        logging.getLogger(name).setLevel(logging.ERROR)
    return None, None


# ---------------------------------------------------------------------------------------------- GSM8K


def extract_gsm8k_answer(text: str, fallback_last_number: bool = False) -> str | None:
    """The final answer of a GSM8K-style solution, normalised (no ``,``/``$``/trailing ``.``); None if absent.

    Looks for the last ``#### answer`` line, then the last ``\\boxed{}``, then (if ``fallback_last_number``)
    the last number in the text.

    Example:
        >>> extract_gsm8k_answer("She has 3 + 4 = 7 apples.\\n#### 7")
        '7'
        >>> extract_gsm8k_answer(r"Total: \\boxed{\\$1,200}")
        '1200'
        >>> extract_gsm8k_answer("so 12 in total", fallback_last_number=True)
        '12'
    """
    hashes = _HASHES.findall(text)
    candidate = hashes[-1] if hashes else last_boxed(text)
    if candidate is None and fallback_last_number:
        numbers = _NUMBER.findall(text)
        candidate = numbers[-1] if numbers else None
    if candidate is None:
        return None
    cleaned = candidate.replace("\\$", "").replace("$", "").replace(",", "").replace("\\%", "").replace("%", "")
    cleaned = cleaned.strip().rstrip(".").strip()
    number = _NUMBER.search(cleaned)
    if number and number.group(0) == cleaned.replace(" ", ""):
        return number.group(0)
    return cleaned or None


def gsm8k_answers_match(predicted: str | None, gold: str | None) -> bool:
    """Numeric equality when both are numbers (``7`` = ``7.0``), exact string equality otherwise."""
    if predicted is None or gold is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold)
    except InvalidOperation:
        return predicted.strip().lower() == gold.strip().lower()


@register_reward("gsm8k", answer_format="#### 42")
def gsm8k_reward(
    prompts: list,
    completions: list,
    answer: Sequence[Any] | None = None,
    solution: Sequence[Any] | None = None,
    ground_truth: Sequence[Any] | None = None,
    fallback_last_number: bool = False,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when the completion's final answer equals the GSM8K ground truth.

    The ground truth may be a full GSM8K solution (its ``#### 72`` line is used) or the bare answer. The
    completion's answer is its last ``#### x`` line, else its last ``\\boxed{x}`` (else, with
    ``fallback_last_number=True``, its last number); none found → 0.0. Unreadable ground truth → None.

    Example:
        >>> gsm8k_reward(
        ...     ["q"] * 3,
        ...     ["6 * 12 = 72\\n#### 72", "\\\\boxed{72.0}", "I think 72"],
        ...     answer=["Natalia sold 48/2 = 24 clips ... #### 72"] * 3,
        ... )
        [1.0, 1.0, 0.0]
    """
    gold_values = ground_truth_values("gsm8k", len(completions), answer, solution, ground_truth)
    rewards: list[float | None] = []
    for completion, gold in zip(completions, gold_values, strict=True):
        gold_answer = extract_gsm8k_answer(str(gold), fallback_last_number=True)
        if gold_answer is None:
            rewards.append(None)
            continue
        predicted = extract_gsm8k_answer(completion_text(completion), fallback_last_number)
        rewards.append(float(gsm8k_answers_match(predicted, gold_answer)))
    return rewards
