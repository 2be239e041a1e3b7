"""Trace → training views (TraceRL, DESIGN §7), and the other log-likelihood estimators as view builders.

A view builder decides, for each training row, which response tokens are masked (the state the model sees) and
which are targets (whose log-probs the loss uses). ``build_views`` turns those masks into model inputs for either
layout:

- full  : row = [prompt | response], bidirectional attention. The trace builder makes one row per (merged)
          step v: positions committed at step ≥ v (or never) are masked, targets are those committed at v.
- block : row = [prompt blocks | clean region | noisy region] on the sampler's absolute block grid, where the
          region is the prompt's tail (the part of the first decoding block it fills) plus the response. The
          clean copy is block-causal; a noisy block sees the clean blocks before it and itself; both copies
          share position ids. Round r takes every block's r-th (merged) step at once.

dims: N samples · Lp prompt length · L response length · B block size · R rows · T row length · U region length
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tracerl import seeding
from tracerl.config import ConfigError
from tracerl.records import Rollout
from tracerl.registry import Registry


@dataclass
class TargetTable:
    """Every target of a view set, flat, in the order a scorer returns them: sequence by sequence, and within a
    sequence by column (dims: M targets · S sequences)."""

    row: torch.Tensor  # [M] long, the training row (view) a target belongs to
    sample: torch.Tensor  # [M] long, its rollout sample
    pos: torch.Tensor  # [M] long, its response position
    seq_start: torch.Tensor  # [S + 1] long, the targets of sequence s are [seq_start[s], seq_start[s + 1])

    def __len__(self) -> int:
        return self.row.shape[0]

    def of(self, seqs: torch.Tensor) -> torch.Tensor:
        """[m] ids of the targets of sequences ``seqs``, in the order a scorer run on those sequences returns them."""
        start, count = self.seq_start[seqs], self.seq_start[seqs + 1] - self.seq_start[seqs]
        first = torch.cumsum(count, 0) - count  # where each sequence's targets begin in the output
        return torch.repeat_interleave(start - first, count) + torch.arange(int(count.sum()))

    def read(self, per_token: torch.Tensor) -> torch.Tensor:
        """A per-response-token tensor [N, L] read at every target → [M]."""
        return per_token[self.sample, self.pos]

    def place(self, values: torch.Tensor, n: int, length: int) -> torch.Tensor:
        """Per-target ``values`` [M] put back at their samples' response positions → [N, L] (0 elsewhere)."""
        out = torch.zeros((n, length), dtype=values.dtype, device=values.device)
        out[self.sample.to(values.device), self.pos.to(values.device)] = values
        return out


@dataclass
class ModelInputs:
    """What a scorer runs on: some sequences of a view set (dims: s sequences · T tokens)."""

    input_ids: torch.Tensor  # [s, T] long
    position_ids: torch.Tensor  # [s, T] long
    attention: Any  # [s, T, T] bool query × key visibility, or a models.attention.PackedAttention pattern
    target_mask: torch.Tensor  # [s, T] bool
    target_ids: torch.Tensor  # [s, T] long

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(*(getattr(self, f).to(device) for f in ModelInputs.__dataclass_fields__))


@dataclass
class Views:
    """Training rows built from a Rollout; attention is described compactly and materialised per micro-batch.
    Here every row is one sequence of the model (``len`` counts both)."""

    input_ids: torch.Tensor  # [R, T] long, tokens with the row's masked positions set to the mask id
    position_ids: torch.Tensor  # [R, T] long, the sampler's position ids (both copies share them)
    col_valid: torch.Tensor  # [R, T] bool, column holds a real token (not padding, not never-generated)
    col_block: torch.Tensor  # [R, T] long, block of the sampler's grid (block layout); 0 for full
    col_noisy: torch.Tensor  # [R, T] bool, column is in the noisy copy (block layout)
    target_mask: torch.Tensor  # [R, T] bool, columns whose token log-prob the loss uses
    target_ids: torch.Tensor  # [R, T] long, the token to score at each target column
    target_pos: torch.Tensor  # [R, T] long, response position of each target column; -1 elsewhere
    row_sample: torch.Tensor  # [R] long, which rollout sample the row belongs to
    row_step: torch.Tensor  # [R] long, the (merged) step the row replays; the round index for block rows
    layout: str  # "full" or "block"
    shift: bool = False  # logits for column i come from column i-1 (AR-initialised models)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_sample(self) -> torch.Tensor:
        """[S] the sample of each sequence (a row is a sequence)."""
        return self.row_sample

    @property
    def num_rows(self) -> int:
        return len(self.row_sample)

    @property
    def row_tokens(self) -> int:
        return self.input_ids.shape[1]

    def visible(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """[r, T, T] bool attention pattern of the given rows (query × key)."""
        valid, block, noisy = self.col_valid[rows], self.col_block[rows], self.col_noisy[rows]
        keys = valid.unsqueeze(1)
        if self.layout == "full":
            vis = keys.expand(-1, valid.shape[1], -1)
        else:
            qb, kb = block.unsqueeze(2), block.unsqueeze(1)
            qn, kn = noisy.unsqueeze(2), noisy.unsqueeze(1)
            clean_q = ~qn & ~kn & (kb <= qb)  # block-causal clean copy (and prompt)
            noisy_q = qn & ((~kn & (kb < qb)) | (kn & (kb == qb)))  # earlier clean blocks + its own noisy block
            vis = keys & (clean_q | noisy_q)
        eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device).unsqueeze(0)
        return vis | eye

    def seq_tokens(self) -> torch.Tensor:
        """[S] tokens each sequence puts through the model (every row is ``row_tokens`` wide)."""
        return torch.full((len(self),), self.row_tokens, dtype=torch.long)

    def model_inputs(self, seqs: torch.Tensor) -> ModelInputs:
        """The scorer's inputs for rows ``seqs``."""
        return ModelInputs(
            self.input_ids[seqs],
            self.position_ids[seqs],
            self.visible(seqs),
            self.target_mask[seqs],
            self.target_ids[seqs],
        )

    def targets(self) -> TargetTable:
        """Every target, row-major (a row's targets by column)."""
        rows, cols = self.target_mask.nonzero(as_tuple=True)
        counts = self.target_mask.sum(1)
        start = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        return TargetTable(rows, self.row_sample[rows], self.target_pos[rows, cols], start)


# ------------------------------------------------------------------------------------------------ shrink


def shrink(step_map: torch.Tensor, s: int, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Merge every ``s`` neighbouring distinct steps, mapping each to the last step of its group (TraceRL).

    Distinct step ids u_1 < … < u_m of a sequence (within one group id, e.g. a block) map to
    u_{min(s·⌈i/s⌉, m)}. ``s = 1`` is the identity. Steps < 0 (never generated) are kept as they are.

    Args:
        step_map: [N, L] long step ids.
        s: how many neighbouring steps to merge (≥ 1).
        group_ids: [N, L] long, merge only within equal ids (blocks); None merges over the whole sequence.

    Example:
        >>> shrink(torch.tensor([[0, 1, 2, 3, 4, -1]]), 2).tolist()
        [[1, 1, 3, 3, 4, -1]]
    """
    if s < 1:
        raise ValueError(f"shrink s must be ≥ 1, got {s}")
    if s == 1:
        return step_map.clone()
    n, length = step_map.shape
    valid = step_map >= 0
    groups = torch.zeros_like(step_map) if group_ids is None else group_ids.clamp_min(0)
    span = int(step_map.max().clamp_min(0)) + 1
    n_groups = int(groups.max()) + 1
    seq = torch.arange(n, device=step_map.device).unsqueeze(1).expand(n, length)
    key = ((seq * n_groups + groups) * span + step_map.clamp_min(0))[valid]
    uniq, inverse = torch.unique(key, return_inverse=True)  # sorted: by sequence, then group, then step
    group_of = uniq // span
    first = torch.searchsorted(group_of, group_of, side="left")  # first unique index of the same group
    last = torch.searchsorted(group_of, group_of, side="right") - 1
    rank = torch.arange(len(uniq), device=key.device) - first
    target = torch.minimum(first + s * (rank // s + 1) - 1, last)
    out = step_map.clone()
    out[valid] = (uniq[target] % span)[inverse]
    return out


# ------------------------------------------------------------------------------------------------ masks


@dataclass
class RowMasks:
    """What a view builder decides, in response coordinates."""

    sample: torch.Tensor  # [R] long
    step: torch.Tensor  # [R] long
    masked: torch.Tensor  # [R, L] bool, response positions shown as the mask token
    target: torch.Tensor  # [R, L] bool, response positions scored
    prompt_masked: torch.Tensor | None = None  # [R, Lp] bool, prompt positions masked (d1's perturbation)


ViewBuilder = Callable[..., RowMasks]
VIEWS: Registry[ViewBuilder] = Registry("views")
register_views = VIEWS.register
get_views = VIEWS.lookup


class SampleRandom:
    """Uniform draws per rollout sample, each sample from a generator seeded by (RL-step seed, its sample id), so a
    sample's random mask does not depend on the other samples it is built with (each learner rank builds the views
    of its own shard) and is the same for old, reference and current log-probs within an RL step.

    Example:
        >>> a = SampleRandom(7, torch.tensor([0, 1, 2])).rand(2)
        >>> b = SampleRandom(7, torch.tensor([2])).rand(2)
        >>> torch.equal(a[2], b[0])
        True
    """

    def __init__(self, seed: int, sample_ids: torch.Tensor) -> None:
        self.seed, self.sample_ids = seed, sample_ids

    def rand(self, *shape: int) -> torch.Tensor:
        """[n, *shape] draws from U[0, 1), row i from sample ``sample_ids[i]``'s generator (one call per RL step
        per builder: a second call draws the same numbers again)."""
        rows = [
            torch.rand(shape, generator=torch.Generator().manual_seed(seeding.mix(self.seed, int(i))))
            for i in self.sample_ids
        ]
        return torch.stack(rows) if rows else torch.zeros((0, *shape))


def region_blocks(rollout: Rollout) -> torch.Tensor:
    """[N, L] block of the sampler's absolute grid that each response position lies in (0 = first decoding)."""
    tail = rollout.prompt_lengths % rollout.block_size
    pos = torch.arange(rollout.response_ids.shape[1])
    return (tail.unsqueeze(1) + pos) // rollout.block_size


@register_views("trace")
def trace_masks(rollout: Rollout, *, shrink_s: int = 1, **_: object) -> RowMasks:
    """Replay the sampler's own order (TraceRL): mask what was committed at or after the row's step.

    Full layout: one row per merged step over the whole response. Block layout: one row per round, round r
    taking the r-th merged step of every block at once.
    """
    sm = rollout.step_map
    if rollout.layout == "full":
        merged = shrink(sm, shrink_s)
        rows = []
        for i in range(len(rollout)):
            for v in torch.unique(merged[i][merged[i] >= 0]).tolist():
                target = (merged[i] == v) & rollout.response_mask[i]
                if target.any():
                    rows.append((i, v, (merged[i] >= v) | (merged[i] < 0), target))
    else:
        blocks = region_blocks(rollout)
        merged = shrink(sm, shrink_s, blocks)
        rows = []
        for i in range(len(rollout)):
            gen = merged[i] >= 0
            # rank of each position's step among the distinct steps of its block = the round that targets it
            span = int(merged[i].max()) + 1
            uniq, inv = torch.unique(blocks[i][gen] * span + merged[i][gen], return_inverse=True)
            block_of = uniq // span  # sorted by block, then step
            round_of = torch.full_like(merged[i], -1)
            round_of[gen] = (torch.arange(len(uniq)) - torch.searchsorted(block_of, block_of))[inv]
            for r in range(int(round_of.max()) + 1):
                target = (round_of == r) & rollout.response_mask[i]
                if target.any():
                    rows.append((i, r, (round_of >= r) | (merged[i] < 0), target))
    if not rows:  # no trainable token (e.g. an empty shard): no rows
        length = rollout.response_ids.shape[1]
        none = torch.zeros(0, dtype=torch.long)
        return RowMasks(none, none, torch.zeros(0, length, dtype=torch.bool), torch.zeros(0, length, dtype=torch.bool))
    sample, step, masked, target = zip(*rows, strict=True)
    return RowMasks(torch.tensor(sample), torch.tensor(step), torch.stack(masked), torch.stack(target))


def _response_targets(rollout: Rollout, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    sample = torch.arange(len(rollout)).repeat_interleave(copies)
    return sample, rollout.response_mask[sample]


def check_estimator(views: str, layout: str, d1_prompt_mask_prob: float) -> None:
    """Refuse an estimator that is unsound on the model's layout (``full`` or ``block``), saying why.

    d1's prompt perturbation masks prompt tokens, a state the block sampler never produces: its prompt sits clean in
    the key/value cache, and a block view's clean copy would read the masked prompt too. On the quickstart it took
    the training reward from 0.35 to 0.12 in 11 steps (the model learnt to rewrite the clues it could not see);
    without it, d1 scores every block from the block's first denoising state, which the sampler does produce.

    Raises:
        ConfigError: d1 with ``d1_prompt_mask_prob`` > 0 on the block layout.
    """
    if views == "d1" and layout == "block" and d1_prompt_mask_prob > 0:
        raise ConfigError(
            f"objective.views=d1 with objective.d1_prompt_mask_prob={d1_prompt_mask_prob} masks prompt tokens, which "
            "the block-diffusion sampler never does (the prompt sits clean in its key/value cache), so the policy is "
            "trained on states it never samples from; on the quickstart this collapsed the training reward. Set "
            "objective.d1_prompt_mask_prob=0 (d1 then scores each block from its first denoising state, a state the "
            "sampler does produce), or use objective.views=trace."
        )


@register_views("d1")
def d1_masks(rollout: Rollout, *, rng: SampleRandom, prompt_mask_prob: float = 0.15, **_: object) -> RowMasks:
    """d1 / diffu-GRPO: the completion fully masked, the prompt masked with probability p; one row per sample.
    On the block layout each block is fully masked behind the clean blocks before it (and p must be 0)."""
    check_estimator("d1", rollout.layout, prompt_mask_prob)
    sample, target = _response_targets(rollout, 1)
    prompt_masked = rng.rand(rollout.prompt_ids.shape[1]) < prompt_mask_prob
    return RowMasks(
        sample, torch.zeros_like(sample), torch.ones_like(target), target, prompt_masked & rollout.prompt_mask
    )


@register_views("random_masking")
def random_masking_masks(
    rollout: Rollout, *, rng: SampleRandom, low: float = 0.1, high: float = 0.9, copies: int = 1, **_: object
) -> RowMasks:
    """UniGRPO-style: per row a mask ratio t ~ U[low, high]; each response token masked with probability t."""
    sample, valid = _response_targets(rollout, copies)
    draws = rng.rand(copies, 1 + valid.shape[1]).flatten(0, 1)  # [N · copies, 1 + L]: the ratio, then the tokens
    ratio = low + (high - low) * draws[:, :1]
    masked = (draws[:, 1:] < ratio) & valid
    return RowMasks(sample, torch.zeros_like(sample), masked | ~valid, masked)


@register_views("coupled")
def coupled_masks(rollout: Rollout, *, rng: SampleRandom, low: float = 0.1, high: float = 0.9, **_: object) -> RowMasks:
    """DiffuCoder coupled sampling: a random mask and its complement, so every token is scored exactly once."""
    one = random_masking_masks(rollout, rng=rng, low=low, high=high)
    valid = rollout.response_mask
    complement = valid & ~one.target
    step = torch.cat([torch.zeros_like(one.sample), torch.ones_like(one.sample)])
    return RowMasks(
        torch.cat([one.sample, one.sample]),
        step,
        torch.cat([one.masked, complement | ~valid]),
        torch.cat([one.target, complement]),
    )


# ------------------------------------------------------------------------------------------------ rows


def build_views(rollout: Rollout, masks: RowMasks, mask_id: int, shift: bool = False) -> Views:
    """Turn row masks into model inputs on the rollout's layout (see the module docstring)."""
    if rollout.layout == "block":
        if shift:
            raise ValueError("the block layout needs same-position logits; shifted (AR-initialised) models are full")
        return _block_rows(rollout, masks, mask_id)
    return _full_rows(rollout, masks, mask_id, shift)


def _full_rows(rollout: Rollout, m: RowMasks, mask_id: int, shift: bool) -> Views:
    lp, length = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    r = len(m.sample)
    prompt = rollout.prompt_ids[m.sample].clone()
    pmask = rollout.prompt_mask[m.sample]
    if m.prompt_masked is not None:
        prompt = prompt.masked_fill(m.prompt_masked, mask_id)
    response = rollout.response_ids[m.sample].masked_fill(m.masked, mask_id)
    input_ids = torch.cat([prompt, response], dim=1)
    pad = (~pmask).sum(-1, keepdim=True)
    position_ids = (torch.arange(lp + length).unsqueeze(0) - pad).clamp_min(0)
    col_valid = torch.cat([pmask, torch.ones(r, length, dtype=torch.bool)], dim=1)
    target_mask = torch.cat([torch.zeros(r, lp, dtype=torch.bool), m.target], dim=1)
    target_ids = torch.cat([torch.zeros_like(prompt), rollout.response_ids[m.sample]], dim=1)
    pos = torch.arange(length).expand(r, length)
    target_pos = torch.cat([torch.full((r, lp), -1), torch.where(m.target, pos, -1)], dim=1)
    zeros = torch.zeros(r, lp + length, dtype=torch.long)
    return Views(
        input_ids,
        position_ids,
        col_valid,
        zeros,
        zeros.bool(),
        target_mask,
        target_ids,
        target_pos,
        m.sample,
        m.step,
        "full",
        shift,
    )


def _block_rows(rollout: Rollout, m: RowMasks, mask_id: int) -> Views:
    b = rollout.block_size
    lp_all = rollout.prompt_lengths
    length = rollout.response_ids.shape[1]
    full_all = (lp_all // b) * b
    c = int(full_all.max()) if len(rollout) else 0  # columns of complete prompt blocks
    u = int(((lp_all - full_all + length + b - 1) // b).max()) * b if len(rollout) else 0  # region width, whole blocks
    r = len(m.sample)
    t = c + 2 * u
    input_ids = torch.full((r, t), int(rollout.sampler.get("pad_id", 0)), dtype=torch.long)
    position_ids = torch.zeros((r, t), dtype=torch.long)
    col_valid = torch.zeros((r, t), dtype=torch.bool)
    col_block = torch.zeros((r, t), dtype=torch.long)
    col_noisy = torch.zeros((r, t), dtype=torch.bool)
    target_mask = torch.zeros((r, t), dtype=torch.bool)
    target_ids = torch.zeros((r, t), dtype=torch.long)
    target_pos = torch.full((r, t), -1, dtype=torch.long)
    col_noisy[:, c + u :] = True
    lp_max = rollout.prompt_ids.shape[1]
    for row in range(r):  # per-row placement only; the masks themselves are tensors
        i = int(m.sample[row])
        lp, full = int(lp_all[i]), int(full_all[i])
        tail = lp - full
        prompt = rollout.prompt_ids[i, lp_max - lp :].clone()
        if m.prompt_masked is not None:
            prompt = prompt.masked_fill(m.prompt_masked[row, lp_max - lp :], mask_id)
        gen = rollout.step_map[i] >= 0
        n_gen = int(gen.sum())  # generated positions form a prefix of the response
        clean = torch.cat([prompt[full:], rollout.response_ids[i, :n_gen]])
        noisy = torch.cat([prompt[full:], rollout.response_ids[i, :n_gen].masked_fill(m.masked[row, :n_gen], mask_id)])
        width = tail + n_gen
        pad = c - full
        # prompt's complete blocks
        input_ids[row, pad:c] = prompt[:full]
        position_ids[row, pad:c] = torch.arange(full)
        col_valid[row, pad:c] = True
        col_block[row, pad:c] = torch.arange(full) // b
        for start, tokens in ((c, clean), (c + u, noisy)):
            input_ids[row, start : start + width] = tokens
            position_ids[row, start : start + width] = full + torch.arange(width)
            col_valid[row, start : start + width] = True
            col_block[row, start : start + u] = (full + torch.arange(u)) // b
        tgt = m.target[row, :n_gen]
        cols = c + u + tail + torch.arange(n_gen)
        target_mask[row, cols] = tgt
        target_ids[row, cols] = rollout.response_ids[i, :n_gen]
        target_pos[row, cols] = torch.where(tgt, torch.arange(n_gen), -1)
    return Views(
        input_ids,
        position_ids,
        col_valid,
        col_block,
        col_noisy,
        target_mask,
        target_ids,
        target_pos,
        m.sample,
        m.step,
        "block",
        False,
    )


def make_views(
    rollout: Rollout,
    name: str,
    mask_id: int,
    *,
    shift: bool = False,
    seed: int = 0,
    sample_ids: torch.Tensor | None = None,
    pack: bool = False,
    max_tokens: int | None = None,
    attention: str = "grouped",
    **kwargs: object,
) -> Any:
    """Build the training views of a rollout with the named builder (one seeded mask per RL step and sample).

    ``sample_ids`` [N]: each sample's id in the whole RL step (default 0..N-1) when ``rollout`` is a shard of
    it, so random masks do not depend on how the step was sharded. ``pack``: block-layout rows packed one
    sequence per sample (``packed.pack_views``, chunks of at most ``max_tokens``, ``attention`` its backend) when
    the builder leaves prompts unmasked; otherwise (and for the full layout) the rows of ``build_views``.
    """
    ids = torch.arange(len(rollout)) if sample_ids is None else sample_ids
    masks = get_views(name)(rollout, rng=SampleRandom(seed, ids), **kwargs)
    if pack and rollout.layout == "block" and masks.prompt_masked is None and not shift:
        from tracerl.packed import pack_views  # packed.py builds on this module

        return pack_views(rollout, masks, mask_id, max_tokens=max_tokens, attention=attention)
    return build_views(rollout, masks, mask_id, shift)


# ------------------------------------------------------------------------------------------------ log-probs


def view_logprobs(
    policy,  # noqa: ANN001
    views: Views,
    rows: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[r, T] fp32 log-prob of each target token from its training view (0 where not a target), of
    softmax(logits / ``temperature``).

    The LM head runs only on target positions.
    """
    rows = torch.arange(len(views)) if rows is None else rows
    device = next(policy.model.parameters()).device
    ids = views.input_ids[rows].to(device)
    target = views.target_mask[rows].to(device)
    logits = policy.logits_at(ids, views.position_ids[rows].to(device), views.visible(rows).to(device), target)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, views.target_ids[rows].to(device)[target].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(target.shape, dtype=torch.float32, device=device)
    out[target] = picked
    return out


def target_logprobs(policy, views: Any) -> torch.Tensor:  # noqa: ANN001
    """[M] fp32 log-prob of every target from its training view, rows or packed, in ``views.targets()`` order
    (one forward of every sequence; the LM head only at the targets)."""
    device = next(policy.model.parameters()).device
    inputs = views.model_inputs(torch.arange(len(views))).to(device)
    logits = policy.logits_at(inputs.input_ids, inputs.position_ids, inputs.attention, inputs.target_mask)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, inputs.target_ids[inputs.target_mask].unsqueeze(-1)).squeeze(-1)


def scatter_to_response(views: Views, values: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """Place per-target values [R, T] back at their samples' response positions → [N, L]."""
    out = torch.zeros((n, length), dtype=values.dtype, device=values.device)
    rows, cols = views.target_mask.nonzero(as_tuple=True)
    out[views.row_sample[rows], views.target_pos[rows, cols]] = values[rows, cols]
    return out


def replay_mismatch(policy, rollout: Rollout) -> float:  # noqa: ANN001
    """Mean |log-prob replayed by the exact trace views − rollout_logp| over the trainable tokens, at the
    temperature the rollout recorded (``sampler["logp_temperature"]``).

    0 (up to float noise) for the exact samplers; the size of the approximation for the prefix and dual
    caches, whose rollouts are sampled from a slightly different function than the one training replays.
    """
    views = make_views(rollout, "trace", policy.mask_id, shift=policy.shift, shrink_s=1)
    with torch.no_grad():
        logp = view_logprobs(policy, views, temperature=float(rollout.sampler.get("logp_temperature", 1.0)))
    replayed = scatter_to_response(views, logp, len(rollout), rollout.response_ids.shape[1]).cpu()
    mask = rollout.response_mask
    return float((replayed[mask] - rollout.rollout_logp[mask]).abs().mean())
