"""Exact match compares the final answers, as the task's verifier reads them (DESIGN §17)."""

from __future__ import annotations

import math

from tracerl.stats import eval_metrics, final_answer, same_answer


def test_boxed_answers_match_their_reference():
    # the two greedy answers that scored reward 1.0 but exact 0.000 before
    assert same_answer(r"so 37 + 74 = \boxed{111}", "111") and same_answer(r"\boxed{111}", " 111 ")
    assert same_answer(r"\boxed{\frac{1}{2}}", r"The answer is $\boxed{\frac{1}{2}}$.")  # a MATH solution column
    assert same_answer("work\n#### 72", "72") and same_answer("1234 3412", "1234  3412")
    assert not same_answer(r"\boxed{112}", "111") and not same_answer("", "") and not same_answer(r"\boxed{}", "")
    assert final_answer(r"first \boxed{1}, then \boxed{2}") == "2"  # the last one counts


def test_eval_metrics_count_the_matches():
    exact = [same_answer(c, a) for c, a in zip([r"\boxed{111}", r"\boxed{7}", "9"], ["111", "8", "9"], strict=True)]
    m = eval_metrics([1.0, 0.0, 1.0], [[1.0], [0.0], [1.0]], k=1, threshold=1.0, exact=exact)
    assert m["eval/exact_match"] == 2 / 3


def test_a_mean_of_rewards_none_of_which_is_a_number_is_nan_not_zero():
    nan = float("nan")
    m = eval_metrics([nan, nan], [[nan, 0.5], [nan, nan]], k=1, threshold=1.0)
    assert math.isnan(m["eval/greedy_reward"]) and m["eval/mean@1"] == 0.5 and m["eval/pass@1"] == 0.0
    assert math.isnan(eval_metrics([nan], [[nan]], k=1, threshold=1.0)["eval/mean@1"])
