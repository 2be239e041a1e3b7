"""The stages of an RL step between the rewards and the learner, free of Ray (DESIGN §2 steps 4-5): the loop runs
them, and so does ``scripts/gpu_check.py``, so its stage timings describe the loop's own update.

    advantages → (advantages [N], keep [N], advantage/* and reward/* metrics)
    training_batch → the kept samples, their advantages and their training views (None when nothing is kept;
                     a renoising policy's canvas units)

dims: N samples · R training rows
"""

from __future__ import annotations

import torch

from tracerl import canvas_trace, trace
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
    rollout: Rollout | CanvasRollout,
    adv: torch.Tensor,
    keep: torch.Tensor,
    o: ObjectiveConfig,
    mask_id: int,
    shift: bool,
    seed: int,
) -> tuple[Rollout | CanvasRollout, torch.Tensor, trace.Views | canvas_trace.CanvasUnits | None]:
    """(kept samples, their advantages [N_kept], their training views or None when nothing is kept): the views of
    ``objective.views`` (registry ``views``), ``seed`` for the estimators that draw masks (``seeding.stage_seed``);
    for a ``CanvasRollout``, one unit per (sample, canvas), whose step chain the learner replays."""
    kept = rollout.select(keep.nonzero().squeeze(1))
    if not len(kept):
        return kept, adv[keep], None
    if isinstance(kept, CanvasRollout):
        return kept, adv[keep], canvas_trace.make_units(kept, int(kept.sampler["pad_id"]))
    views = trace.make_views(
        kept,
        o.views,
        mask_id,
        shift=shift,
        seed=seed,
        shrink_s=o.shrink,
        prompt_mask_prob=o.d1_prompt_mask_prob,
        low=o.mask_ratio_low,
        high=o.mask_ratio_high,
    )
    return kept, adv[keep], views
