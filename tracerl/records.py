"""The records that flow between stages (DESIGN §4).

dims: N samples (P prompts · G samples each) · Lp prompt length · L response length (max new tokens)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class Rollout:
    """One batch of sampled responses with the denoising trace that produced them (tensors on CPU)."""

    prompt_ids: torch.Tensor  # [N, Lp] long, left-padded prompt tokens
    prompt_mask: torch.Tensor  # [N, Lp] bool, True on real prompt tokens
    response_ids: torch.Tensor  # [N, L] long, final tokens (ids, never re-tokenised text); pad where not generated
    step_map: torch.Tensor  # [N, L] long, 0-based denoising step that committed each position; -1 = never generated
    response_mask: torch.Tensor  # [N, L] bool, positions that count for reward and loss (through first EOS + pads)
    rollout_logp: torch.Tensor  # [N, L] float32, log p(token) at temperature 1 when it was committed; 0 elsewhere
    group: torch.Tensor  # [N] long, prompt index within the batch (samples of one prompt share it)
    block_size: int  # block size of the sampler's grid (training views must use the same)
    layout: str  # "full" (bidirectional over the whole sequence) or "block" (block-causal on the absolute grid)
    weights_version: int = 0  # which learner update produced the policy that sampled this
    sampler: dict[str, Any] = field(default_factory=dict)  # resolved sampler settings
    texts: list[str] = field(default_factory=list)  # decoded completions (for reward functions only)
    truncated: torch.Tensor | None = None  # [N] bool, no EOS within max_new_tokens
    commit_counts: torch.Tensor | None = None  # [N, L] long, times the sampler committed each position (audit)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """[N] number of real prompt tokens."""
        return self.prompt_mask.sum(-1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """[N] number of positions in ``response_mask``."""
        return self.response_mask.sum(-1)

    def select(self, index: torch.Tensor | list[int]) -> Rollout:
        """The samples at ``index`` (every per-sample field filtered together)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == len(self):
                changes[f.name] = value[idx]
        if self.texts:
            changes["texts"] = [self.texts[i] for i in idx.tolist()]
        return replace(self, **changes)

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """Join shards that share a block size and layout; prompts are re-left-padded to one width."""
        if not parts:
            raise ValueError("Rollout.concat needs at least one shard")
        first = parts[0]
        for p in parts[1:]:
            if (p.block_size, p.layout) != (first.block_size, first.layout):
                raise ValueError("cannot concat rollouts sampled on different block grids or layouts")
        lp = max(p.prompt_ids.shape[1] for p in parts)
        lr = max(p.response_ids.shape[1] for p in parts)

        def left(t: torch.Tensor, width: int, fill: int | bool) -> torch.Tensor:
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill)

        def right(t: torch.Tensor, width: int, fill: float | int | bool) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

        pad_id = int(first.sampler.get("pad_id", 0))
        offset = 0
        groups = []
        for p in parts:
            groups.append(p.group + offset)
            offset += int(p.group.max()) + 1 if len(p) else 0
        truncated = [p.truncated for p in parts]
        return Rollout(
            prompt_ids=torch.cat([left(p.prompt_ids, lp, pad_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, lp, False) for p in parts]),
            response_ids=torch.cat([right(p.response_ids, lr, pad_id) for p in parts]),
            step_map=torch.cat([right(p.step_map, lr, -1) for p in parts]),
            response_mask=torch.cat([right(p.response_mask, lr, False) for p in parts]),
            rollout_logp=torch.cat([right(p.rollout_logp, lr, 0.0) for p in parts]),
            group=torch.cat(groups),
            block_size=first.block_size,
            layout=first.layout,
            weights_version=first.weights_version,
            sampler=first.sampler,
            texts=[t for p in parts for t in p.texts],
            truncated=torch.cat(truncated) if all(t is not None for t in truncated) else None,
            commit_counts=(
                torch.cat([right(p.commit_counts, lr, 0) for p in parts])
                if all(p.commit_counts is not None for p in parts)
                else None
            ),
        )


@dataclass
class TrainShard:
    """One learner rank's part of an RL step (DESIGN §20): its samples of the kept rollout and their advantages.
    The rank builds its training views from it; nothing proportional to the views crosses the object store.

    dims: n samples of this rank · N samples of the step · L response length
    """

    rollout: Rollout  # this rank's samples, at the step's padded widths (Lp, L)
    advantages: torch.Tensor  # [n] per sample, or [n, L] per token
    sample_ids: torch.Tensor  # [n] long, each sample's index in the step (seeds its random masks, its minibatch)
    num_samples: int  # N, over every rank
    seed: int  # the RL step's view seed

    def nbytes(self) -> int:
        """Bytes of the tensors this shard carries (what a rank receives, up to pickling overhead and texts)."""
        tensors = [getattr(self.rollout, f.name) for f in fields(self.rollout)] + [self.advantages, self.sample_ids]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def shard_step(rollout: Rollout, advantages: torch.Tensor, num_ranks: int, seed: int) -> list[TrainShard]:
    """Split an RL step's kept samples into ``num_ranks`` contiguous shards (sizes differ by at most one; a rank
    may get none when there are fewer samples than ranks)."""
    n = len(rollout)
    return [
        TrainShard(rollout.select(ids), advantages[ids], ids, n, seed)
        for ids in torch.tensor_split(torch.arange(n), num_ranks)
    ]
