"""The stages of an RL step between the rewards and the learner, free of Ray (DESIGN §2 steps 4-5): the loop runs
them, and so does ``scripts/gpu_check.py``, so its stage timings describe the loop's own update.

    advantages → (advantages [N], keep [N], advantage/* and reward/* metrics)
    learner_outcome → [N] what the learner trains on: the advantages, or the rewards a value model's target uses
    training_batch → the kept samples and their advantages (the learner ranks build the training views)
    no_signal → whether every kept advantage is 0 (only the KL terms act)

dims: N samples
"""

from __future__ import annotations

import torch

from tracerl.advantages import compute_advantages, truncated_is_wrong
from tracerl.config import ObjectiveConfig
from tracerl.records import CanvasRollout, Rollout


def advantages(
    rewards: list[float], rollout: Rollout, o: ObjectiveConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Group advantages and the group filter of ``objective`` (registries ``advantage`` / ``group_filter``),
    with truncated responses scored 0 first under ``objective.truncated_is_wrong``; NaN rewards are never kept."""
    return compute_advantages(
        torch.tensor(rewards, dtype=torch.float32),
        rollout.group,
        rollout.truncated if o.truncated_is_wrong else None,
        advantage=o.advantage,
        group_filter=o.group_filter,
        low=o.filter_low,
        high=o.filter_high,
    )


def learner_outcome(
    adv: torch.Tensor, rewards: list[float], rollout: Rollout | CanvasRollout, o: ObjectiveConfig
) -> torch.Tensor:
    """[N] what the learner trains on: the advantages, or the raw rewards (truncated responses scored 0 under
    ``objective.truncated_is_wrong``) when a value model's target is made from them (``objective.value_target``
    centered or reward; the learner forms its GAE advantages)."""
    if not o.value_model or o.value_target == "advantage":
        return adv
    total = torch.tensor(rewards, dtype=torch.float32)
    return truncated_is_wrong(total, rollout.truncated) if o.truncated_is_wrong else total


def training_batch(
    rollout: Rollout | CanvasRollout, adv: torch.Tensor, keep: torch.Tensor
) -> tuple[Rollout | CanvasRollout, torch.Tensor]:
    """(kept samples, their advantages [N_kept]): what the learner ranks receive, each its shard
    (``records.shard_step``); every rank builds the training views of its own samples (``Learner.views_of``)."""
    kept = rollout.select(keep.nonzero().squeeze(1))
    return kept, adv[keep]


def no_signal(flat_groups: float, o: ObjectiveConfig) -> bool:
    """Whether the step trains on zero advantages only: every kept group scored flat (``flat_groups``, the share of
    such groups, is 1). A flat group's advantages are 0, also a value model's GAE ones (scaled by the group's reward
    spread, ``advantages.group_scale``: 0), except under TraceRL's target (``value_target=advantage``), whose GAE
    advantage 0 − V is the value's own error and not a signal from the rewards either, but is trained on."""
    return flat_groups == 1.0 and not (o.value_model and o.value_target == "advantage")
