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


def value_phase(
    learner: Learner,
    rollout: Rollout,
    outcome: torch.Tensor,
    views: Any,
    table: TargetTable,
    seq_sample: torch.Tensor,
    num_samples: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-target policy advantages [M] from the value model, after training it on this RL step.

    Args:
        rollout, views, table: this rank's samples, their views and targets.
        outcome: [n] the outcome reward of each sample, placed on its last step (the loop passes the group
            advantage, TraceRL's z-scored reward), or [n, L] per-token process rewards.
        seq_sample: [S] the step-wide sample of each sequence; num_samples: N over all ranks (minibatches).

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
    if outcome.ndim == 2:  # per-token (process) rewards
        token_rewards = torch.where(token_mask, outcome.float(), 0.0)
    else:
        token_rewards = adv_lib.outcome_token_rewards(outcome.float(), token_steps, token_mask)
    token_adv, token_returns = adv_lib.step_gae(
        token_values, token_steps, token_rewards, token_mask, obj.gamma, obj.lam
    )
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
    for mb in minibatches(num_samples, lc.updates_per_step, lc.minibatches, learner.seed, learner.rl_steps, salt=1):
        seqs = everything[torch.isin(seq_sample, mb)]
        ids = table.of(seqs)
        totals = learner.minibatch_totals(table.row[ids], table.sample[ids])
        weights.zero_()
        weights[ids] = objectives.target_weights(table.row[ids], table.sample[ids], obj.aggregation, length, totals)
        s = micro.optimizer_step(engine, views, table, seqs, loss_fn)
        stats["loss"] += s.loss
        stats["grad_norm"] += s.grad_norm
        stats["optimizer_steps"] += 1
    steps = max(1.0, stats["optimizer_steps"])
    metrics = {
        "train/value_loss": stats["loss"] / steps,
        "train/value_grad_norm": stats["grad_norm"] / steps,
        "train/value_mean": learner.mean_over_ranks({"v": float(old_values.sum()), "count": float(len(table))})["v"],
    }
    return table.read(token_adv), metrics
