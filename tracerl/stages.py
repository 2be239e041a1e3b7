"""The stages of an RL step between the rewards and the learner, free of Ray (DESIGN §2 steps 4-5): the loop runs
them, and so does ``scripts/gpu_check.py``, so its stage timings describe the loop's own update.

    advantages → (advantages [N], keep [N], advantage/* and reward/* metrics)
    training_batch → the kept samples and their advantages (the learner ranks build the training views)

dims: N samples
"""

from __future__ import annotations

import torch

from tracerl.advantages import compute_advantages
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


def training_batch(
    rollout: Rollout | CanvasRollout, adv: torch.Tensor, keep: torch.Tensor
) -> tuple[Rollout | CanvasRollout, torch.Tensor]:
    """(kept samples, their advantages [N_kept]): what the learner ranks receive, each its shard
    (``records.shard_step``); every rank builds the training views of its own samples (``Learner.views_of``)."""
    kept = rollout.select(keep.nonzero().squeeze(1))
    return kept, adv[keep]
