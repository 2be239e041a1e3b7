"""The value phase of an RL step (TraceRL §value, DESIGN §8): step-level GAE advantages from the pre-update token
values, then μ passes of clipped value-loss updates of the value engine.

The value of a response token is read in its own training view (the state before it was committed). The
outcome reward goes on each sample's last (merged) step; with γ = λ = 1 the advantage of a token is R − V.

dims: N samples · L response length · M targets (flat, ``TargetTable`` order)
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from tracerl import advantages as adv_lib
from tracerl import objectives
from tracerl.learner.micro import minibatches
from tracerl.records import Rollout
from tracerl.scoring import response_token_steps
from tracerl.trace import TargetTable

if TYPE_CHECKING:
    from tracerl.learner.core import Learner


VALUE_METRICS = (
    "value/explained_var",
    "value/mean",
    "value/return_mean",
    "value/advantage_var",
    "value/baseline_advantage_var",
    "value/advantage_var_ratio",
)  # advantages.value_metrics_from_sums' keys


def step_outcome(
    learner: Learner, rollout: Rollout, rewards: torch.Tensor, sample_ids: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``advantages.value_outcome`` of this rank's samples → (outcome, baseline, scale) [n], with every group's
    statistics over the whole step: a rank's shard may hold part of a group, so the step's rewards and groups are
    put together first (one all-reduce of 2 · N numbers)."""
    obj = learner.obj
    full = torch.zeros(2, num_samples, dtype=torch.float64)
    full[0, sample_ids] = rewards.double()
    full[1, sample_ids] = rollout.group.double()
    if learner.world_size > 1:
        full = learner.engine.all_reduce(full.to(learner.engine.device)).cpu()
    parts = adv_lib.value_outcome(full[0].float(), full[1].long(), obj.value_target, obj.advantage)
    outcome, baseline, scale = (x[sample_ids] for x in parts)
    return outcome, baseline, scale


def value_phase(
    learner: Learner,
    rollout: Rollout,
    outcome: torch.Tensor,
    views: Any,
    table: TargetTable,
    seq_sample: torch.Tensor,
    num_samples: int,
    sample_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-target policy advantages [M] from the value model, after training it on this RL step.

    Args:
        rollout, views, table: this rank's samples, their views and targets.
        outcome: [n] each sample's raw reward (``objective.value_target`` centered or reward) or group advantage
            (``advantage``, TraceRL's z-scored reward), see ``advantages.value_outcome``; or [n, L] per-token
            process rewards.
        seq_sample: [S] the step-wide sample of each sequence; num_samples: N over all ranks (minibatches);
            sample_ids: [n] each sample's index in the step (default: this rank holds the whole step).

    Returns:
        (advantages [M], ``train/value_*`` metrics).
    """
    engine, micro, obj, lc = learner.value_engine, learner.micro, learner.obj, learner.lc
    assert engine is not None
    n, length = rollout.response_ids.shape

    # 1. Token values before any update, each read in its own view, then step GAE over merged steps.
    everything = torch.arange(len(views))
    old_values = micro.infer(engine, views, table, everything)[0]
    token_values = table.place(old_values, n, length)
    covered = table.place(torch.ones(len(table)), n, length) > 0
    token_mask = covered & rollout.response_mask
    token_steps = response_token_steps(rollout, obj.shrink)
    scale = torch.ones(n)
    if outcome.ndim == 2:  # per-token (process) rewards
        token_rewards = torch.where(token_mask, outcome.float(), 0.0)
        baseline = torch.zeros(n)
    else:
        ids = sample_ids if sample_ids is not None else torch.arange(n)
        step_out, baseline, scale = step_outcome(learner, rollout, outcome.float(), ids, num_samples)
        token_rewards = adv_lib.outcome_token_rewards(step_out, token_steps, token_mask)
    token_adv, token_returns = adv_lib.step_gae(
        token_values, token_steps, token_rewards, token_mask, obj.gamma, obj.lam
    )
    token_adv = token_adv * scale.unsqueeze(1)  # the scale of the group baseline it replaces (value_outcome)
    returns = table.read(token_returns)

    # 2. μ passes of clipped value-loss updates, each micro-batch's loss computed once.
    weights = torch.zeros(len(table), dtype=torch.float64)

    def loss_fn(ids: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        (values,) = outs
        device = values.device
        loss, _ = objectives.value_loss(
            values.unsqueeze(0),
            old_values[ids].to(device).unsqueeze(0),
            returns[ids].to(device).unsqueeze(0),
            torch.ones(1, len(ids), dtype=torch.bool, device=device),
            row_sample=torch.zeros(1, dtype=torch.long, device=device),
            eps=obj.value_eps,
            weights=weights[ids].to(device).unsqueeze(0),
        )
        return loss

    stats: dict[str, float] = defaultdict(float)
    passes = lc.value_updates_per_step
    for mb in minibatches(num_samples, passes, lc.minibatches, learner.seed, learner.rl_steps, salt=1):
        seqs = everything[torch.isin(seq_sample, mb)]
        ids = table.of(seqs)
        totals = learner.minibatch_totals(table.row[ids], table.sample[ids])
        weights.zero_()
        weights[ids] = objectives.target_weights(table.row[ids], table.sample[ids], obj.aggregation, length, totals)
        s = micro.optimizer_step(engine, views, table, seqs, loss_fn, role="value", lr_setting="learner.value_lr")
        stats["loss"] += s.loss
        stats["grad_norm"] += s.grad_norm
        stats["optimizer_steps"] += 1
        stats["lr"] = s.lr
    steps = max(1.0, stats["optimizer_steps"])
    # What a user needs to trust it (advantages.value_metrics_from_sums), from sums over every rank's tokens: the
    # metrics of the whole step, whatever the number of ranks (explained variance and variance ratios cannot be
    # averaged).
    local = adv_lib.value_sums(token_values, token_returns, token_adv, baseline, token_mask)
    whole = adv_lib.value_metrics_from_sums(learner.sum_over_ranks(local)) or dict.fromkeys(VALUE_METRICS, 0.0)
    metrics = {
        "train/value_loss": stats["loss"] / steps,
        "train/value_grad_norm": stats["grad_norm"] / steps,
        "train/value_optimizer_steps": stats["optimizer_steps"],
        "train/value_lr": stats["lr"],
        **whole,
    }
    return table.read(token_adv), metrics
