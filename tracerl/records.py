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
    rollout_logp: torch.Tensor  # [N, L] float32, log p(token) when committed (τ: sampler["logp_temperature"]); else 0
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
class CanvasRollout:
    """One batch sampled by the renoising canvas sampler (DiffusionGemma, DESIGN §18), with the trajectory that
    replays it: per canvas and denoising step the state (input canvas; the self-conditioning input is recomputed
    by the learner from the step chain), the accepted positions (the policy's actions) and their log-probs.

    dims: N samples · Lp prompt width · K canvases · S denoising steps · C canvas length · L = K·C response length
    """

    prompt_ids: torch.Tensor  # [N, Lp] long, left-padded prompt tokens
    prompt_mask: torch.Tensor  # [N, Lp] bool, True on real prompt tokens
    position_offset: torch.Tensor  # [N] long, position id of the first real prompt token in the sampler's batch
    response_ids: torch.Tensor  # [N, L] long, the argmax canvases appended; pad after the first EOS
    response_mask: torch.Tensor  # [N, L] bool, generated positions through the first EOS (reward, lengths)
    step_map: torch.Tensor  # [N, L] long, step (counted per sequence over its canvases) a position last settled; -1
    canvases: torch.Tensor  # [N, K, S, C] long, the canvas x_t each step read
    accepted: torch.Tensor  # [N, K, S, C] bool, positions accepted at the step (the actions); False on dead steps
    accepted_ids: torch.Tensor  # [N, K, S, C] long, the sampled token at accepted positions (0 elsewhere)
    rollout_logp: torch.Tensor  # [N, K, S, C] float32, log softmax(logits/τ_t) of each accepted token; 0 elsewhere
    step_valid: torch.Tensor  # [N, K, S] bool, the step ran for the sample (before it stopped or finished)
    canvas_valid: torch.Tensor  # [N, K] bool, the canvas belongs to the sample's output (before its EOS canvas ended)
    temperature: torch.Tensor  # [S] float32, τ_t of step t (the same schedule for every canvas)
    group: torch.Tensor  # [N] long, prompt index within the batch
    weights_version: int = 0  # which learner update produced the policy that sampled this
    sampler: dict[str, Any] = field(default_factory=dict)  # resolved sampler settings
    texts: list[str] = field(default_factory=list)  # decoded completions (for reward functions only)
    truncated: torch.Tensor | None = None  # [N] bool, no EOS within the canvases
    layout: str = "canvas"  # the training layout (trace views are built per canvas, not as rows of tokens)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def canvas_length(self) -> int:
        return self.canvases.shape[-1]

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """[N] number of real prompt tokens."""
        return self.prompt_mask.sum(-1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """[N] number of positions in ``response_mask``."""
        return self.response_mask.sum(-1)

    def select(self, index: torch.Tensor | list[int]) -> CanvasRollout:
        """The samples at ``index`` (every per-sample field filtered together)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "temperature" and isinstance(value, torch.Tensor) and value.ndim and len(value) == len(self):
                changes[f.name] = value[idx]
        if self.texts:
            changes["texts"] = [self.texts[i] for i in idx.tolist()]
        return replace(self, **changes)

    @staticmethod
    def concat(parts: list[CanvasRollout]) -> CanvasRollout:
        """Join shards of one canvas sampler; prompts are re-left-padded (``position_offset`` keeps each sample's
        positions), canvases and steps padded to the largest counts as steps that never ran."""
        if not parts:
            raise ValueError("CanvasRollout.concat needs at least one shard")
        first = parts[0]
        if len({p.canvas_length for p in parts}) > 1:
            raise ValueError("cannot concat canvas rollouts of different canvas lengths")
        lp = max(p.prompt_ids.shape[1] for p in parts)
        k = max(p.canvases.shape[1] for p in parts)
        s = max(p.canvases.shape[2] for p in parts)
        c = first.canvas_length
        pad_id = int(first.sampler.get("pad_id", 0))

        def left(t: torch.Tensor, fill: int | bool) -> torch.Tensor:
            return torch.nn.functional.pad(t, (lp - t.shape[1], 0), value=fill)

        def grow(t: torch.Tensor, fill: float | int | bool, trajectory: bool) -> torch.Tensor:
            # [N, K, S, (C)] → [N, k, s, (C)] (trajectory), or [N, K·C] → [N, k·C]
            if trajectory:
                pads = (0, 0) if t.ndim == 4 else ()
                return torch.nn.functional.pad(t, (*pads, 0, s - t.shape[2], 0, k - t.shape[1]), value=fill)
            return torch.nn.functional.pad(t, (0, k * c - t.shape[1]), value=fill)

        def pad_canvases(t: torch.Tensor) -> torch.Tensor:  # [N, K] → [N, k]
            return torch.nn.functional.pad(t, (0, k - t.shape[1]), value=False)

        offset, groups = 0, []
        for p in parts:
            groups.append(p.group + offset)
            offset += int(p.group.max()) + 1 if len(p) else 0
        truncated = [p.truncated for p in parts]
        longest = max(parts, key=lambda p: p.temperature.numel())
        return CanvasRollout(
            prompt_ids=torch.cat([left(p.prompt_ids, pad_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, False) for p in parts]),
            position_offset=torch.cat([p.position_offset for p in parts]),
            response_ids=torch.cat([grow(p.response_ids, pad_id, False) for p in parts]),
            response_mask=torch.cat([grow(p.response_mask, False, False) for p in parts]),
            step_map=torch.cat([grow(p.step_map, -1, False) for p in parts]),
            canvases=torch.cat([grow(p.canvases, 0, True) for p in parts]),
            accepted=torch.cat([grow(p.accepted, False, True) for p in parts]),
            accepted_ids=torch.cat([grow(p.accepted_ids, 0, True) for p in parts]),
            rollout_logp=torch.cat([grow(p.rollout_logp, 0.0, True) for p in parts]),
            step_valid=torch.cat([grow(p.step_valid, False, True) for p in parts]),
            canvas_valid=torch.cat([pad_canvases(p.canvas_valid) for p in parts]),
            temperature=longest.temperature,
            group=torch.cat(groups),
            weights_version=first.weights_version,
            sampler=first.sampler,
            texts=[t for p in parts for t in p.texts],
            truncated=torch.cat(truncated) if all(t is not None for t in truncated) else None,
        )


@dataclass
class TrainShard:
    """One learner rank's part of an RL step (DESIGN §20): its samples of the kept rollout and their advantages.
    The rank builds its training views from it; nothing proportional to the views crosses the object store.

    dims: n samples of this rank · N samples of the step · L response length
    """

    rollout: Rollout | CanvasRollout  # this rank's samples, at the step's padded widths (Lp, L; K, S, C)
    advantages: torch.Tensor  # [n] per sample, or [n, L] per token
    sample_ids: torch.Tensor  # [n] long, each sample's index in the step (seeds its random masks, its minibatch)
    num_samples: int  # N, over every rank
    seed: int  # the RL step's view seed

    def nbytes(self) -> int:
        """Bytes of the tensors this shard carries (what a rank receives, up to pickling overhead and texts)."""
        tensors = [getattr(self.rollout, f.name) for f in fields(self.rollout)] + [self.advantages, self.sample_ids]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def shard_step(
    rollout: Rollout | CanvasRollout, advantages: torch.Tensor, num_ranks: int, seed: int
) -> list[TrainShard]:
    """Split an RL step's kept samples into ``num_ranks`` contiguous shards (sizes differ by at most one; a rank
    may get none when there are fewer samples than ranks)."""
    n = len(rollout)
    return [
        TrainShard(rollout.select(ids), advantages[ids], ids, n, seed)
        for ids in torch.tensor_split(torch.arange(n), num_ranks)
    ]
