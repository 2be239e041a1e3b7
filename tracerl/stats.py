"""Statistics of rollouts and evaluations, as pure functions (DESIGN §12, §17): what the loop logs under
``rollout/`` and ``eval/``, the unbiased pass@k, and the held-out split of a prompt set.

dims: N samples · L response length · P prompts · n samples per prompt
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from typing import Any

import torch  # noqa: F401 - the examples build tensors

from rewards.text import last_boxed
from tracerl.config import Config, SamplingConfig
from tracerl.records import CanvasRollout, Rollout


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """``rollout/*`` of a batch: response length (mean, max), truncation rate (no EOS within the budget), denoising
    steps per generated token (NFE per token) and its inverse, and the mean commit probability (temperature 1).

    Example:
        >>> r = Rollout(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.bool),
        ...     response_ids=torch.zeros(2, 4, dtype=torch.long), step_map=torch.tensor([[0, 0, 1, 1], [0, 1, 2, -1]]),
        ...     response_mask=torch.tensor([[True] * 4, [True, True, True, False]]), rollout_logp=torch.zeros(2, 4),
        ...     group=torch.arange(2), block_size=4, layout="full", truncated=torch.tensor([True, False]))
        >>> m = rollout_metrics(r)
        >>> m["rollout/response_length"], m["rollout/nfe_per_token"], m["rollout/truncation_rate"]
        (3.5, 0.7142857142857143, 0.5)
    """
    if isinstance(rollout, CanvasRollout):
        return canvas_metrics(rollout)
    lengths = rollout.response_lengths.double()
    generated = rollout.step_map >= 0
    steps = (rollout.step_map.max(-1).values + 1).clamp(min=0).double()  # denoising steps per sequence
    tokens = generated.sum().item()
    mask = rollout.response_mask
    out = {
        "rollout/response_length": lengths.mean().item(),
        "rollout/response_length_max": lengths.max().item(),
        "rollout/nfe_per_token": steps.sum().item() / max(1, tokens),
        "rollout/tokens_per_step": tokens / max(1.0, steps.sum().item()),
        "rollout/mean_confidence": rollout.rollout_logp[mask].exp().mean().item() if mask.any() else 0.0,
        "rollout/samples": float(len(rollout)),
        "rollout/generated_tokens": float(tokens),
        "rollout/weights_version": float(rollout.weights_version),
    }
    if rollout.truncated is not None:
        out["rollout/truncation_rate"] = rollout.truncated.double().mean().item()
    return out


def canvas_metrics(rollout: CanvasRollout) -> dict[str, float]:
    """``rollout/*`` of a renoising rollout: the keys of ``rollout_metrics`` (NFE per token = decoder steps per
    generated token; tokens per step and mean confidence over accepted tokens, at the step's temperature) and the
    canvas sampler's own: accepted tokens per step, steps per canvas, canvases per sample."""
    lengths = rollout.response_lengths.double()
    live = rollout.step_valid & rollout.canvas_valid[..., None]  # [N, K, S]
    steps = live.sum().item()
    tokens = float(rollout.canvas_valid.sum().item() * rollout.canvas_length)
    accepted = rollout.accepted & live[..., None]
    out = {
        "rollout/response_length": lengths.mean().item(),
        "rollout/response_length_max": lengths.max().item(),
        "rollout/nfe_per_token": steps / max(1.0, tokens),
        "rollout/tokens_per_step": tokens / max(1, steps),
        "rollout/mean_confidence": rollout.rollout_logp[accepted].exp().mean().item() if accepted.any() else 0.0,
        "rollout/samples": float(len(rollout)),
        "rollout/generated_tokens": tokens,
        "rollout/weights_version": float(rollout.weights_version),
        "rollout/accepted_per_step": accepted.sum().item() / max(1, steps),
        "rollout/steps_per_canvas": steps / max(1, int(rollout.canvas_valid.sum())),
        "rollout/canvases": rollout.canvas_valid.sum(-1).double().mean().item(),
    }
    if rollout.truncated is not None:
        out["rollout/truncation_rate"] = rollout.truncated.double().mean().item()
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 − C(n−c, k) / C(n, k).

    Example:
        >>> pass_at_k(4, 0, 2), pass_at_k(4, 1, 1), round(pass_at_k(4, 1, 2), 4), pass_at_k(4, 3, 2)
        (0.0, 0.25, 0.5, 1.0)
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_sampling(cfg: Config, greedy: bool) -> SamplingConfig:
    """The sampler settings of an evaluation: ``sampling`` with the ``eval.*`` overrides; greedy → temperature 0."""
    e = cfg.eval
    s = replace(cfg.sampling, temperature=0.0 if greedy else e.temperature)
    for key in ("max_new_tokens", "remasking", "steps_per_block"):
        value = getattr(e, key)
        if value is not None:
            s = replace(s, **{key: value})
            if key == "steps_per_block":
                s = replace(s, steps=None)
    return s


def part_means(parts: dict[str, list[float]], prefix: str) -> dict[str, float]:
    """``<prefix>/<name>``: the mean of each reward part over the samples where it is a number (NaN if none).

    Example:
        >>> part_means({"rm": [0.5, 1.5], "verifier": [1.0, float("nan")]}, "eval/greedy_reward")
        {'eval/greedy_reward/rm': 1.0, 'eval/greedy_reward/verifier': 1.0}
    """
    out = {}
    for name, values in parts.items():
        kept = [v for v in values if not math.isnan(v)]
        out[f"{prefix}/{name}"] = sum(kept) / len(kept) if kept else math.nan
    return out


def standard_error(values: list[float], groups: list[int] | None = None) -> float:
    """The standard error of the mean of ``values`` (NaN left out), samples of one prompt sharing a ``groups`` id
    (None: every sample its own): from the spread of the group means, since samples of one prompt move together
    and treating them as independent would understate it. NaN with fewer than two groups that have a number.

    Example:
        >>> round(standard_error([0.0, 1.0, 0.0, 1.0]), 3)  # four independent samples: std 0.577 / √4
        0.289
        >>> standard_error([0.0, 0.0, 1.0, 1.0], groups=[0, 0, 1, 1])  # two prompts, one always 0, one always 1
        0.5
    """
    by_group: dict[int, list[float]] = {}
    for i, v in enumerate(values):
        if not math.isnan(v):
            by_group.setdefault(i if groups is None else groups[i], []).append(v)
    return mean_error([sum(kept) / len(kept) for kept in by_group.values()])


def mean_error(values: list[float]) -> float:
    """The standard error of the mean of independent ``values`` (sample std / √n); NaN for fewer than two.

    Example:
        >>> round(mean_error([0.0, 1.0, 0.0, 1.0]), 3)
        0.289
    """
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def standard_errors(
    total: list[float], parts: dict[str, list[float]], groups: list[int] | None, key: str
) -> dict[str, float]:
    """``<key>``: the standard error of the total's mean, and ``<key>/<name>`` of each part's when there are
    several (``standard_error``); what the divergence guard takes for noise.

    Example:
        >>> standard_errors([0.0, 1.0], {"rm": [0.0, 1.0], "verifier": [1.0, 1.0]}, None, "eval/greedy_reward_sem")
        {'eval/greedy_reward_sem': 0.5, 'eval/greedy_reward_sem/rm': 0.5, 'eval/greedy_reward_sem/verifier': 0.0}
    """
    out = {key: standard_error(total, groups)}
    if len(parts) > 1:
        out |= {f"{key}/{name}": standard_error(values, groups) for name, values in parts.items()}
    return out


def eval_metrics(
    greedy: list[float],
    sampled: list[list[float]],
    k: int,
    threshold: float,
    exact: list[bool] | None = None,
    tokens_per_forward: float | None = None,
) -> dict[str, float]:
    """``eval/*`` from the rewards of the greedy sample of each prompt [P] and of n sampled ones [P][n]: greedy
    reward, mean@k (mean reward of a sample), pass@k (a sample passes when its reward ≥ ``threshold``), greedy
    exact match (``exact`` [P], see ``same_answer``) and tokens per forward. NaN rewards count as failures and are
    left out of means (a mean of no number is NaN, not 0).

    Example:
        >>> m = eval_metrics([1.0, 0.0], [[1.0, 0.0], [0.0, 0.0]], k=1, threshold=1.0)
        >>> m["eval/greedy_reward"], m["eval/mean@1"], m["eval/pass@1"]
        (0.5, 0.25, 0.25)
    """

    def mean(xs: list[float]) -> float:
        kept = [x for x in xs if not math.isnan(x)]
        return sum(kept) / len(kept) if kept else math.nan

    passes = [pass_at_k(len(r), sum(x >= threshold for x in r if not math.isnan(x)), k) for r in sampled]
    out = {
        "eval/greedy_reward": mean(greedy),
        f"eval/mean@{k}": mean([x for r in sampled for x in r]),
        f"eval/pass@{k}": sum(passes) / max(1, len(passes)),
        "eval/prompts": float(len(greedy)),
    }
    if exact is not None:
        out["eval/exact_match"] = sum(exact) / max(1, len(exact))
    if tokens_per_forward is not None:
        out["eval/tokens_per_forward"] = tokens_per_forward
    return out


def final_answer(text: Any) -> str:
    """The final answer a completion (or a reference answer) states, as exact match compares it: the content of
    its last ``\\boxed{...}``, else what follows its last ``####`` (GSM8K), else the whole text; whitespace
    runs become one space and the ends are trimmed.

    Example:
        >>> final_answer(r"so the sum is \\boxed{111}."), final_answer("work...\\n#### 72"), final_answer(" 12  34 ")
        ('111', '72', '12 34')
    """
    text = str(text)
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    elif "####" in text:
        text = text.rsplit("####", 1)[1]
    return " ".join(text.split())


def same_answer(completion: Any, answer: Any) -> bool:
    """Exact match: the completion's ``final_answer`` equals the reference answer's (so ``\\boxed{111}`` matches the
    answer ``111``, and a MATH solution's ``\\boxed{}`` matches a completion's). An empty final answer never
    matches."""
    got = final_answer(completion)
    return bool(got) and got == final_answer(answer)


def _key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def heldout_split(prompts: list[Any], num_prompts: int, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of a prompt list: ``num_prompts`` distinct prompts, chosen by a seeded
    shuffle, are held out whole, so no held-out prompt (e.g. a Sudoku grid) ever appears in training; each held-out
    prompt is evaluated once.

    Example:
        >>> prompts = ["a", "b", "a", "c", "b"]
        >>> train, held = heldout_split(prompts, 1, seed=0)
        >>> len(held), {prompts[i] for i in held} & {prompts[i] for i in train}
        (1, set())
    """
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(_key(p), i)
    distinct = list(first)
    random.Random(seed * 7_919 + 17).shuffle(distinct)
    held_keys = set(distinct[:num_prompts])
    held = sorted(first[k] for k in held_keys)
    train = [i for i, p in enumerate(prompts) if _key(p) not in held_keys]
    return train, held
