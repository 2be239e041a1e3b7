"""Remasking strategies: which masked positions of the current block to commit at a denoising step.

Every strategy is a pure function with one signature, registered by name:
``fn(confidence, entropy, eligible, quota, *, threshold, eb_threshold, noise) -> commit``; ``noise`` gives
the step's seeded uniforms of each row (``noise.uniform(REMASK)`` → [N, B], see ``sampling.core.StepNoise``).

dims: N sequences · B positions of the current block
- confidence [N, B] float: probability of the sampled candidate (any value where not eligible)
- entropy    [N, B] float: entropy of the sampling distribution at the position
- eligible   [N, B] bool:  still masked and allowed to be committed now
- quota      [N]    long:  tokens the step schedule asks for (≥ 1 when anything is eligible)
- commit     [N, B] bool:  positions to commit, a subset of ``eligible``
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tracerl.registry import Registry

RemaskFn = Callable[..., torch.Tensor]
REMASK = 1  # the key of a step's remasking uniforms (sampling.core.CANDIDATES is 0)
REMASKING: Registry[RemaskFn] = Registry("remasking")
register_remasking = REMASKING.register
get_remasking = REMASKING.lookup


def top_k_mask(score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the ``k[row]`` eligible positions with the highest score (ties: leftmost first)."""
    score = score.masked_fill(~eligible, float("-inf"))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    k = torch.minimum(k, eligible.sum(-1))
    return (rank < k.unsqueeze(-1)) & eligible


@register_remasking("low_confidence_static")
def low_confidence_static(confidence, entropy, eligible, quota, **_) -> torch.Tensor:  # noqa: ANN001
    """Commit the ``quota`` most confident positions (LLaDA's low-confidence remasking)."""
    return top_k_mask(confidence, eligible, quota)


@register_remasking("low_confidence_dynamic")
def low_confidence_dynamic(confidence, entropy, eligible, quota, *, threshold: float, **_) -> torch.Tensor:  # noqa: ANN001
    """Commit every position with confidence > ``threshold``, and never fewer than the schedule's quota."""
    above = ((confidence > threshold) & eligible).sum(-1)
    return top_k_mask(confidence, eligible, torch.maximum(above, quota))


@register_remasking("entropy_bounded")
def entropy_bounded(confidence, entropy, eligible, quota, *, eb_threshold: float, **_) -> torch.Tensor:  # noqa: ANN001
    """Commit the lowest-entropy positions while their summed entropy stays ≤ ``eb_threshold`` (EB-sampler,
    arXiv 2505.24857), and never fewer than the schedule's quota."""
    ent = entropy.masked_fill(~eligible, float("inf"))
    sorted_ent, _ = torch.sort(ent, dim=-1)
    within = (torch.cumsum(sorted_ent, dim=-1) <= eb_threshold).sum(-1)
    return top_k_mask(-entropy, eligible, torch.maximum(within, quota))


@register_remasking("random")
def random_order(confidence, entropy, eligible, quota, *, noise, **_) -> torch.Tensor:  # noqa: ANN001
    """Commit ``quota`` eligible positions chosen uniformly at random (each row from its own seeded stream)."""
    score = noise.uniform(REMASK).to(eligible.device)
    return top_k_mask(score, eligible, quota)


@register_remasking("sequential")
def sequential(confidence, entropy, eligible, quota, **_) -> torch.Tensor:  # noqa: ANN001
    """Commit the ``quota`` leftmost eligible positions (left-to-right decoding inside the block)."""
    position = torch.arange(eligible.shape[-1], device=eligible.device, dtype=torch.float32)
    return top_k_mask(-position.expand(eligible.shape), eligible, quota)
