"""What the learner runs inside its engines, free of DeepSpeed: the scoring modules (log-probs and values at
the targets of training rows, LM head only there), the LR schedule, and the maps between response coordinates
and rows.

dims: N samples · L response length · R rows · T row length · M target tokens · H hidden
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tracerl import objectives, trace
from tracerl.models.base import gather_positions
from tracerl.models.value import ValueModel
from tracerl.records import Rollout
from tracerl.trace import Views

# ---------------------------------------------------------------------------------------------- LR schedule


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warmup
    (step + 1) / warmup for the first ``warmup`` steps, then constant 1, or a linear / cosine decay that
    reaches 0 at ``total``.

    Example:
        >>> [lr_factor(s, "linear", 2, 6) for s in range(7)]
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule '{schedule}'; choose from ['constant', 'cosine', 'linear']")


class LRSchedule:
    """``lr_factor`` as a picklable callable for ``torch.optim.lr_scheduler.LambdaLR`` (its fields are saved
    in the scheduler's state dict, so a checkpoint restores the schedule with the step count)."""

    def __init__(self, schedule: str, warmup: int, total: int) -> None:
        self.schedule, self.warmup, self.total = schedule, warmup, total

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.schedule, self.warmup, self.total)


# ---------------------------------------------------------------------------------------------- scorers


class PolicyScorer(nn.Module):
    """log π(target | view) and the entropy at every target of a micro-batch of rows, LM head only there.

    ``forward(input_ids [r, T], position_ids [r, T], visible [r, T, T], target_mask [r, T], target_ids [r, T])``
    → [2, M]: log-probs (with gradient) and entropies (detached, a metric), targets in row-major order.

    One output tensor on purpose: ZeRO-3 traces the modules each rank runs, and the root module appears in the
    backward trace once per output that receives a gradient; a single output keeps that trace identical on every
    rank. A zero ``anchor`` that depends on every parameter is added to the log-probs, so a micro-batch without
    targets still runs a full backward (ZeRO ranks stay in step). For the same reason ``num_chunks`` (≥ 0) makes
    the chunked LM head run exactly that many chunks (padding with dummy targets whose log-probs only enter
    the anchor), so ranks with different target counts call the head equally often; -1 = as many as needed.

    ``temperature`` τ: the log-probs (and entropies) are of softmax(logits / τ) (``config.logp_temperature``).
    """

    def __init__(self, policy: Any, chunk_tokens: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = policy.model  # registered, so the engine owns exactly the policy's parameters
        self.policy = policy
        self.chunk_tokens = chunk_tokens
        self.temperature = temperature
        self.has_hidden = policy.family != "masked_lm"  # masked LMs expose logits only

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visible: torch.Tensor,
        target_mask: torch.Tensor,
        target_ids: torch.Tensor,
        num_chunks: int = -1,
    ) -> torch.Tensor:
        if self.has_hidden:
            hidden = self.policy.hidden_states(input_ids, position_ids, visible)
            picked = gather_positions(hidden, target_mask, self.policy.shift)  # hidden c-1 predicts c if shifted
            head = self.policy.head
            anchor = head(hidden[:1, :1]).float().sum() * 0.0
        else:
            picked = self.policy.logits_at(input_ids, position_ids, visible, target_mask)
            head = nn.Identity()
            anchor = picked.float().sum() * 0.0
        targets = target_ids[target_mask]
        m = len(targets)
        pad = max(0, (num_chunks - 1) * self.chunk_tokens + 1 - m) if num_chunks > 0 else 0
        if pad:
            picked = torch.cat([picked, picked.new_zeros(pad, picked.shape[-1])])
            targets = torch.cat([targets, targets.new_zeros(pad)])
        logp, entropy = objectives.target_logprobs(
            head, picked, targets, self.chunk_tokens, with_entropy=True, temperature=self.temperature
        )
        anchor = anchor + logp[m:].sum() * 0.0  # padded chunks get a (zero) gradient, so backward recomputes them
        return torch.stack([logp[:m] + anchor, entropy[:m].detach()])


class ValueScorer(nn.Module):
    """Token values at the targets of a micro-batch → [1, M] (one output, see PolicyScorer), read where the
    policy reads the target's logits."""

    def __init__(self, value: ValueModel) -> None:
        super().__init__()
        self.value = value

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visible: torch.Tensor,
        target_mask: torch.Tensor,
        target_ids: torch.Tensor,
        num_chunks: int = -1,
    ) -> torch.Tensor:
        del target_ids, num_chunks
        values = self.value(input_ids, position_ids, visible)  # [r, T]
        picked = gather_positions(values.unsqueeze(-1), target_mask, self.value.shift).squeeze(-1)
        return (picked + values.sum() * 0.0).unsqueeze(0)  # the zero term keeps every parameter in the graph


def rows_from_response(views: Views, per_token: torch.Tensor) -> torch.Tensor:
    """Read a per-response-token tensor [N, L] at every row's targets → [R, T] (0 where not a target)."""
    pos = views.target_pos.clamp(min=0)
    picked = per_token[views.row_sample.unsqueeze(1).expand_as(pos), pos]
    return torch.where(views.target_mask, picked, torch.zeros((), dtype=picked.dtype))


def response_token_steps(rollout: Rollout, shrink_s: int) -> torch.Tensor:
    """[N, L] the rollout's step map shrunk exactly as the trace views shrink it (per block for the block layout)."""
    groups = trace.region_blocks(rollout) if rollout.layout == "block" else None
    return trace.shrink(rollout.step_map, shrink_s, groups)


# ---------------------------------------------------------------------------------------------- counted compute


def learner_flops(
    tokens: float,
    params: int,
    *,
    old_logp_pass: bool,
    reference: bool,
    value: bool,
    updates_per_step: int,
    value_updates_per_step: int,
) -> float:
    """FLOPs the learner spends on one RL step whose views put ``tokens`` through the model (``seq_tokens()`` summed:
    every row or packed sequence at its full width, which is what the micro-batches compute), counted, not timed
    (Kaplan et al. 2020: a forward costs 2 · params per token, forward + backward 6 · params), over these passes: old
    log-probs (unless taken from the rollout), reference log-probs, and with a value model (a copy of the backbone:
    ``params`` as well) one forward for the old values and ``value_updates_per_step`` training passes, then
    ``updates_per_step`` policy training passes.

    Example:
        >>> learner_flops(30, 100, old_logp_pass=True, reference=False, value=False, updates_per_step=1,
        ...               value_updates_per_step=1)                    # (1 forward + 1 training pass) · 30 tokens
        24000.0
    """
    forwards = int(old_logp_pass) + int(reference) + int(value)
    trainings = updates_per_step + (value_updates_per_step if value else 0)
    return float(tokens * params * (2 * forwards + 6 * trainings))
