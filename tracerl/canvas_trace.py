"""Renoising trajectories → training units, the self-conditioning chain and replayed log-probs (DESIGN §18).

The policy's action at denoising step t of a canvas is the set of accepted tokens A_t; its state is the context
(prompt and earlier canvases), the input canvas x_t and the self-conditioning input (the soft embeddings of step
t−1's processed logits). So

    log π(A_t | s_t) = Σ_{i ∈ A_t} log softmax(logits(x_t, sc_t, context) / τ_t)[x̃_i]

and renoising (fresh uniform tokens on the other positions) is the environment's noise. The canvas's output is
the argmax of its last step's logits, which the last step's accepted tokens never reach: they are recorded and
replayed, but not trained (their gradient only adds variance).

A **unit** is one (sample, canvas): one encoder pass over its context, then the decoder on all its steps at
once (the steps are the rows of one decoder batch). The self-conditioning input is not recorded by the sampler:
``chain_pass`` recomputes it exactly with the behaviour weights, one step after another (the step chain), and
gives the old log-probs of the same pass; the training forward then treats it as part of the state.

Memory of that choice at the released shape (C = 256, S = 48, H = 2816, V = 262,144, bf16), per (sample,
canvas): the soft embeddings S·C·H·2 B = 69 MB; the full processed logits they come from S·C·V·4 B = 12.9 GB.
A batch of 128 samples would ship 8.9 GB of embeddings through the object store per RL step; recomputed, each
of 8 learner ranks keeps its 16 samples' embeddings (1.1 GB) in memory, and the chain pass costs no extra
forward: it is the old-log-prob pass, in step order (see docs/architecture.md).

dims: N samples · R units · K canvases · S steps · C canvas length · T context width · H hidden · M targets
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tracerl import objectives
from tracerl.records import CanvasRollout
from tracerl.trace import TargetTable


@dataclass
class CanvasUnits:
    """The training units of a CanvasRollout: one per (sample, canvas) with at least one trained action."""

    row_sample: torch.Tensor  # [R] long, the rollout sample of the unit
    row_canvas: torch.Tensor  # [R] long, which of its canvases
    context_ids: torch.Tensor  # [R, T] long, left-padded [prompt | the canvases before this one]
    context_mask: torch.Tensor  # [R, T] bool, real context tokens
    context_pos: torch.Tensor  # [R, T] long, the sampler's position ids of the context (0 on padding)
    canvas_pos: torch.Tensor  # [R, C] long, position ids of the canvas
    canvases: torch.Tensor  # [R, S, C] long, the input canvas of each step
    step_valid: torch.Tensor  # [R, S] bool, the step ran
    target_mask: torch.Tensor  # [R, S, C] bool, trained actions: accepted tokens of every live step but the last
    accepted: torch.Tensor  # [R, S, C] bool, every accepted token (the last live step included; replay checks)
    target_ids: torch.Tensor  # [R, S, C] long, the accepted token at each accepted position
    rollout_logp: torch.Tensor  # [R, S, C] float32, the sampler's log-probs of the accepted tokens
    temperature: torch.Tensor  # [S] float32, τ of each step

    def __len__(self) -> int:
        return self.row_sample.shape[0]

    @property
    def steps(self) -> int:
        return self.canvases.shape[1]

    @property
    def canvas_length(self) -> int:
        return self.canvases.shape[2]

    @property
    def row_tokens(self) -> int:
        """Tokens one unit runs through the model: its context once, then S canvases (for packing budgets)."""
        return self.context_ids.shape[1] + self.steps * self.canvas_length

    def select(self, rows: torch.Tensor) -> CanvasUnits:
        """The units at ``rows`` (context columns that only padding uses are dropped)."""
        ctx = self.context_mask[rows]
        keep = int(ctx.sum(-1).max()) if len(rows) else 0
        width = self.context_ids.shape[1]
        cols = slice(width - max(keep, 1), width)
        return CanvasUnits(
            self.row_sample[rows],
            self.row_canvas[rows],
            self.context_ids[rows][:, cols],
            ctx[:, cols],
            self.context_pos[rows][:, cols],
            self.canvas_pos[rows],
            self.canvases[rows],
            self.step_valid[rows],
            self.target_mask[rows],
            self.accepted[rows],
            self.target_ids[rows],
            self.rollout_logp[rows],
            self.temperature,
        )


def last_live_step(step_valid: torch.Tensor) -> torch.Tensor:
    """[..., S] bool → [...] long index of the last True step (−1 when none).

    Example:
        >>> last_live_step(torch.tensor([[True, True, False], [False, False, False]])).tolist()
        [1, -1]
    """
    s = step_valid.shape[-1]
    idx = torch.arange(s, device=step_valid.device).expand_as(step_valid)
    return torch.where(step_valid, idx, -1).max(-1).values


def make_units(rollout: CanvasRollout, pad_id: int, train_final_step: bool = False) -> CanvasUnits:
    """Build the units of ``rollout``: every valid (sample, canvas) with a trained action.

    The context of canvas k is the sample's real prompt tokens and its first k output canvases (the tokens the
    sampler's encoder cached), at the positions the sampler gave them (``position_offset`` + index).
    ``train_final_step`` also trains the last live step's accepted tokens (which the output never reads).
    """
    n, k_all, s, c = rollout.canvases.shape
    last = last_live_step(rollout.step_valid)  # [N, K]
    steps = torch.arange(s)
    trained_step = rollout.step_valid & ((steps <= last[..., None]) if train_final_step else (steps < last[..., None]))
    target = rollout.accepted & trained_step[..., None]
    keep = rollout.canvas_valid & target.flatten(2).any(-1)
    sample, canvas = keep.nonzero(as_tuple=True)
    lengths = rollout.prompt_lengths[sample] + canvas * c
    width = int(lengths.max()) if len(sample) else 1
    r = len(sample)
    context_ids = torch.full((r, width), pad_id, dtype=torch.long)
    context_mask = torch.zeros((r, width), dtype=torch.bool)
    context_pos = torch.zeros((r, width), dtype=torch.long)
    lp_all = rollout.prompt_ids.shape[1]
    for row, (i, k) in enumerate(zip(sample.tolist(), canvas.tolist(), strict=True)):
        lp = int(rollout.prompt_lengths[i])
        tokens = torch.cat([rollout.prompt_ids[i, lp_all - lp :], rollout.response_ids[i, : k * c]])
        context_ids[row, width - len(tokens) :] = tokens
        context_mask[row, width - len(tokens) :] = True
        context_pos[row, width - len(tokens) :] = rollout.position_offset[i] + torch.arange(len(tokens))
    start = rollout.position_offset[sample] + lengths
    return CanvasUnits(
        row_sample=sample,
        row_canvas=canvas,
        context_ids=context_ids,
        context_mask=context_mask,
        context_pos=context_pos,
        canvas_pos=start[:, None] + torch.arange(c),
        canvases=rollout.canvases[sample, canvas],
        step_valid=rollout.step_valid[sample, canvas],
        target_mask=target[sample, canvas],
        accepted=rollout.accepted[sample, canvas],
        target_ids=rollout.accepted_ids[sample, canvas],
        rollout_logp=rollout.rollout_logp[sample, canvas],
        temperature=rollout.temperature.float(),
    )


def _encode(policy, units: CanvasUnits, device: torch.device):  # noqa: ANN001, ANN202
    """One encoder pass over each unit's context → the cache, and the decoder's 2D attention mask."""
    cache = policy.new_cache()
    mask = units.context_mask.to(device)
    policy.encode(units.context_ids.to(device), mask, units.context_pos.to(device), cache)
    return cache, torch.nn.functional.pad(mask, (0, units.canvas_length), value=True)


@torch.no_grad()
def chain_pass(policy, units: CanvasUnits, full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The step chain with the current (behaviour) weights: step by step, the logits of each input canvas given
    the self-conditioning the previous step produced (``full``: every step runs, even after the last live one,
    so that ranks sharded with ZeRO-3 make the same calls).

    Returns:
        logp [R, S, C] float32: log-prob of every accepted token under its step's processed logits (0 elsewhere);
        sc [R, S, C, H]: the self-conditioning input (soft embeddings) each step read (zeros at step 0), in the
        policy's dtype, on the policy's device.
    """
    device = policy.device
    cache, attention = _encode(policy, units, device)
    r, s, c = units.canvases.shape
    canvases = units.canvases.to(device)
    masks = policy.decoder_masks(canvases[:, 0], cache, attention)
    pos = units.canvas_pos.to(device)
    hidden = policy.model.config.get_text_config().hidden_size
    sc = torch.zeros((r, s, c, hidden), dtype=policy.dtype, device=device)
    logp = torch.zeros((r, s, c), dtype=torch.float32, device=device)
    ids = units.target_ids.to(device)
    for t in range(s):
        if not full and not bool(units.step_valid[:, t].any()):
            break
        logits = policy.denoise(canvases[:, t], cache, masks, pos, self_conditioning_embeds=sc[:, t])
        processed = logits / units.temperature[t].to(device)
        logp[:, t] = torch.log_softmax(processed, dim=-1).gather(-1, ids[:, t].unsqueeze(-1)).squeeze(-1)
        if t + 1 < s:
            sc[:, t + 1] = policy.soft_embeddings(processed.to(policy.dtype))
    return torch.where(units.accepted.to(device), logp, 0.0), sc


class CanvasScorer(nn.Module):
    """log π of the targets of a micro-batch of units, all steps of a unit in one decoder batch over one encoder
    pass; the LM head runs only at the targets (chunked).

    ``forward(units, sc [r, S, C, H], targets [r, S, C] bool, num_chunks)`` → [2, M]: log-probs (with gradient)
    and entropies (detached), targets in (unit, step, position) order. A zero ``anchor`` term keeps every
    parameter in the graph (see ``scoring.PolicyScorer``).
    """

    def __init__(self, policy, chunk_tokens: int) -> None:  # noqa: ANN001
        super().__init__()
        self.model = policy.model  # registered, so the engine owns exactly the policy's parameters
        self.policy = policy
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        units: CanvasUnits,
        sc: torch.Tensor | None,
        targets: torch.Tensor,
        num_chunks: int = -1,
        sc_temperature: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sc`` None (SFT): the self-conditioning input comes from a first pass without gradient and without
        self-conditioning, at temperature ``sc_temperature`` [r] (0 on a row: that row gets none)."""
        policy, device = self.policy, self.policy.device
        cache, attention = _encode(policy, units, device)
        r, s, c = units.canvases.shape
        cache.batch_repeat_interleave(s)  # every step of a unit reads the unit's one encoder pass
        rows = units.canvases.to(device).reshape(r * s, c)
        masks = policy.decoder_masks(rows, cache, attention.repeat_interleave(s, dim=0))
        pos = units.canvas_pos.to(device).repeat_interleave(s, dim=0)
        if sc is None:
            sc = self_conditioning(policy, rows, cache, masks, pos, sc_temperature.to(device).repeat_interleave(s))
        hidden = policy.decoder_hidden(rows, cache, masks, pos, self_conditioning_embeds=sc.reshape(r * s, c, -1))
        targets = targets.to(device)
        picked = hidden.view(r, s, c, -1)[targets]  # [M, H]
        ids = units.target_ids.to(device)[targets]
        tau = units.temperature.to(device)[None, :, None].expand(r, s, c)[targets]
        anchor = policy.head(hidden[:1, :1]).sum() * 0.0
        m = len(ids)
        pad = max(0, (num_chunks - 1) * self.chunk_tokens + 1 - m) if num_chunks > 0 else 0
        if pad:
            picked = torch.cat([picked, picked.new_zeros(pad, picked.shape[-1])])
            ids = torch.cat([ids, ids.new_zeros(pad)])
            tau = torch.cat([tau, tau.new_ones(pad)])
        logp, entropy = objectives.target_logprobs(
            policy.head, picked, ids, self.chunk_tokens, with_entropy=True, temperature=tau
        )
        anchor = anchor + logp[m:].sum() * 0.0
        return torch.stack([logp[:m] + anchor, entropy[:m].detach()])


def replay_logprobs(policy, units: CanvasUnits, chunk_tokens: int = 1024) -> torch.Tensor:  # noqa: ANN001
    """[R, S, C] float32 log-prob of every accepted token (the last live step's included) replayed from the
    trace: the chain pass gives the self-conditioning, then one training forward per unit batch."""
    _, sc = chain_pass(policy, units)
    with torch.no_grad():
        out = CanvasScorer(policy, chunk_tokens)(units, sc, units.accepted)
    logp = torch.zeros(units.accepted.shape, dtype=torch.float32)
    logp[units.accepted] = out[0].cpu()
    return logp


@torch.no_grad()
def self_conditioning(policy, rows, cache, masks, pos, tau: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """[n, C, H] the self-conditioning input of a detached first pass (no self-conditioning, no gradient) over
    canvases ``rows`` [n, C]: the soft embeddings of its logits at temperature ``tau`` [n]; rows with τ = 0 get
    the zero signal (trained without self-conditioning)."""
    zeros = torch.zeros((*rows.shape, policy.model.config.get_text_config().hidden_size), dtype=policy.dtype,
                        device=rows.device)  # fmt: skip
    logits = policy.denoise(rows, cache, masks, pos, self_conditioning_embeds=zeros)
    on = tau > 0
    processed = logits / torch.where(on, tau, 1.0)[:, None, None]
    return torch.where(on[:, None, None], policy.soft_embeddings(processed.to(policy.dtype)), zeros)


@dataclass
class CanvasInputs:
    """What ``CanvasScorer`` runs on: some units, the self-conditioning of their steps (or, for SFT, the τ of
    their detached first pass) and their targets; ``call`` runs a scorer on them (the learner's micro-batches
    treat it like ``trace.ModelInputs``)."""

    units: CanvasUnits
    sc: torch.Tensor | None  # [r, S, C, H]
    sc_temperature: torch.Tensor | None  # [r]

    @property
    def target_mask(self) -> torch.Tensor:
        return self.units.target_mask

    def to(self, device: torch.device | str) -> CanvasInputs:
        sc = self.sc.to(device) if self.sc is not None else None
        return CanvasInputs(self.units, sc, self.sc_temperature)  # the scorer moves the units' tensors itself

    def call(self, scorer: Callable[..., torch.Tensor], num_chunks: int) -> torch.Tensor:
        return scorer(self.units, self.sc, self.units.target_mask, num_chunks, self.sc_temperature)


@dataclass
class CanvasRows:
    """Units as the learner's view set (the protocol of ``trace.Views``): one sequence per unit (its context
    once, then its S step canvases in one decoder batch), targets its trained actions in (step, position) order,
    the self-conditioning state beside them (from the chain pass), or, for SFT, the temperature of its first pass.
    A target's response position is canvas · C + position, so per-token tensors [N, L] read at it."""

    units: CanvasUnits
    sc: torch.Tensor | None = None  # [R, S, C, H] self-conditioning input of each step (None: SFT first pass)
    sc_temperature: torch.Tensor | None = None  # [R] SFT: τ of the detached first pass (0: none)
    pad_id: int = 0  # the context token of a placeholder unit (a rank without units)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def num_rows(self) -> int:
        return len(self.units)

    @property
    def row_tokens(self) -> int:
        return self.units.row_tokens

    @property
    def row_sample(self) -> torch.Tensor:
        return self.units.row_sample

    @property
    def seq_sample(self) -> torch.Tensor:
        return self.units.row_sample

    @property
    def target_mask(self) -> torch.Tensor:
        """[R, S·C] bool, the trained actions of each unit."""
        return self.units.target_mask.flatten(1)

    def seq_tokens(self) -> torch.Tensor:
        """[R] tokens each unit runs through the model (its real context, then S canvases)."""
        return self.units.context_mask.sum(-1) + self.units.steps * self.units.canvas_length

    def targets(self) -> TargetTable:
        """Every trained action, unit by unit, in the order ``CanvasScorer`` returns them."""
        u = self.units
        r, s, c = u.target_mask.nonzero(as_tuple=True)
        counts = u.target_mask.flatten(1).sum(-1)
        start = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        return TargetTable(row=r, sample=u.row_sample[r], pos=u.row_canvas[r] * u.canvas_length + c, seq_start=start)

    def model_inputs(self, seqs: torch.Tensor) -> CanvasInputs:
        sc = self.sc[seqs.to(self.sc.device)] if self.sc is not None else None
        tau = self.sc_temperature[seqs] if self.sc_temperature is not None else None
        return CanvasInputs(self.units.select(seqs), sc, tau)

    def dummy_inputs(self) -> CanvasInputs:
        """A unit with no target (one context token, the canvases of the first unit or zeros): what a rank
        without units runs so that every rank makes the same calls."""
        u = self.units
        if len(u):
            one = u.select(torch.arange(1))
            one.target_mask = torch.zeros_like(one.target_mask)
        else:
            s, c = u.steps, u.canvas_length
            zeros = torch.zeros((1, s, c), dtype=torch.long)
            one = CanvasUnits(
                torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                torch.full((1, 1), self.pad_id, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                torch.zeros(1, 1, dtype=torch.long), torch.arange(1, c + 1)[None], zeros,
                torch.ones(1, s, dtype=torch.bool), zeros.bool(), zeros.bool(), zeros,
                torch.zeros(1, s, c), u.temperature,
            )  # fmt: skip
        hidden = None if self.sc is None else torch.zeros((1, *self.sc.shape[1:]), dtype=self.sc.dtype)
        tau = None if self.sc is not None else torch.zeros(1)  # no state: a first pass at τ = 0 gives the zero signal
        return CanvasInputs(one, hidden, tau)


def canvas_rows(
    policy,  # noqa: ANN001
    rows: CanvasRows,
    chunks: list[torch.Tensor | None],
    lockstep: bool = False,
) -> tuple[torch.Tensor, CanvasRows]:
    """The chain pass over this rank's units in micro-batches ``chunks`` (``None``: an empty micro-batch that
    still runs a placeholder unit): old log-probs [R, S, C] on CPU and the rows with their self-conditioning.
    ``lockstep`` (ZeRO-3): every rank runs every step, as many chunks each (``len(chunks)`` agrees)."""
    units = rows.units
    r, s, c = units.canvases.shape
    hidden = policy.model.config.get_text_config().hidden_size
    old = torch.zeros((r, s, c), dtype=torch.float32, device=policy.device)
    sc = torch.zeros((r, s, c, hidden), dtype=policy.dtype, device=policy.device)
    for chunk in chunks:
        part = units.select(chunk) if chunk is not None else rows.dummy_inputs().units
        logp, state = chain_pass(policy, part, full=lockstep)
        if chunk is not None:
            old[chunk.to(old.device)], sc[chunk.to(sc.device)] = logp, state
    return old.cpu(), CanvasRows(units, sc, pad_id=rows.pad_id)


# ---------------------------------------------------------------------------------------------- SFT


@dataclass
class CanvasSFTBatch:
    """One renoising-SFT batch: units of one step each (a corrupted canvas), their loss weights and
    self-conditioning temperatures."""

    units: CanvasUnits  # S = 1: the corrupted canvas; targets = every position, target ids = the clean canvas
    weights: torch.Tensor  # [R, 1, C] float32, per-target weight of −log p (sums to 1 over the batch)
    sc_temperature: torch.Tensor  # [R] float32, τ of the detached first pass; 0 = no self-conditioning
    rate: torch.Tensor  # [R] float32, the corruption rate of each canvas


def renoise_sft_batch(
    pairs: list[tuple[list[int], list[int]]],
    *,
    canvas_length: int,
    vocab_size: int,
    pad_id: int,
    eos_id: int,
    generator: torch.Generator,
    rate_eps: float = 1e-3,
    sc_prob: float = 0.5,
    t_min: float = 0.4,
    t_max: float = 0.8,
) -> CanvasSFTBatch:
    """The renoising denoiser objective on (prompt, response) pairs (DESIGN §18).

    Each response, ending with EOS (appended if missing) and EOS-padded to whole canvases, gives one unit per
    canvas: context = prompt and the clean canvases before it. Per canvas a corruption rate t ~ U(ε, 1]; each
    position is replaced by a uniform random token with probability t (the sampler's renoising); the loss is the
    cross-entropy −log p(clean token | corrupted canvas, context) at every position, averaged over positions and
    canvases. With probability ``sc_prob`` a canvas is self-conditioned the usual way: a detached first pass gives
    the soft embeddings of its logits at τ = t_min + (t_max − t_min)·t (the sampler's temperature at that noise
    level).
    """
    units: list[tuple[list[int], list[int]]] = []  # (context, clean canvas)
    for prompt, response in pairs:
        full = list(response) if response and response[-1] == eos_id else [*response, eos_id]
        full += [eos_id] * (-len(full) % canvas_length)
        for k in range(len(full) // canvas_length):
            canvas = full[k * canvas_length : (k + 1) * canvas_length]
            units.append((prompt + full[: k * canvas_length], canvas))
    r = len(units)
    width = max(len(u[0]) for u in units)
    context_ids = torch.full((r, width), pad_id, dtype=torch.long)
    context_mask = torch.zeros((r, width), dtype=torch.bool)
    context_pos = torch.zeros((r, width), dtype=torch.long)
    clean = torch.tensor([u[1] for u in units], dtype=torch.long)
    for row, (ctx, _) in enumerate(units):
        context_ids[row, width - len(ctx) :] = torch.tensor(ctx)
        context_mask[row, width - len(ctx) :] = True
        context_pos[row, width - len(ctx) :] = torch.arange(len(ctx))
    lengths = context_mask.sum(-1)
    rate = rate_eps + (1 - rate_eps) * torch.rand(r, generator=generator)
    noisy = torch.rand(r, canvas_length, generator=generator) < rate[:, None]
    noise = torch.randint(0, vocab_size, (r, canvas_length), generator=generator)
    corrupted = torch.where(noisy, noise, clean)
    sc_on = torch.rand(r, generator=generator) < sc_prob
    sc_tau = torch.where(sc_on, t_min + (t_max - t_min) * rate, 0.0)
    every = torch.ones((r, 1, canvas_length), dtype=torch.bool)
    batch = CanvasUnits(
        row_sample=torch.arange(r),
        row_canvas=torch.zeros(r, dtype=torch.long),
        context_ids=context_ids,
        context_mask=context_mask,
        context_pos=context_pos,
        canvas_pos=lengths[:, None] + torch.arange(canvas_length),
        canvases=corrupted[:, None],
        step_valid=torch.ones((r, 1), dtype=torch.bool),
        target_mask=every,
        accepted=every,
        target_ids=clean[:, None],
        rollout_logp=torch.zeros((r, 1, canvas_length)),
        temperature=torch.ones(1),
    )
    weights = torch.full((r, 1, canvas_length), 1.0 / (r * canvas_length))
    return CanvasSFTBatch(batch, weights, sc_tau.float(), rate)
