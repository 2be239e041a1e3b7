"""Pieces both samplers share: candidate sampling, the step schedule, one commit step, the Rollout.

dims: N sequences · B positions of the current block · V vocab · L response length
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tracerl.config import SamplingConfig, resolved_steps_per_block
from tracerl.records import Rollout
from tracerl.sampling.remasking import get_remasking
from tracerl.seeding import RowStreams, categorical

CANDIDATES = 0  # the key of a step's candidate uniforms (REMASK: the remasking rule's)


@dataclass
class Candidates:
    """What the model proposes for every position of the current block at one step."""

    tokens: torch.Tensor  # [N, B] long, sampled candidate token
    confidence: torch.Tensor  # [N, B] float, its probability under the sampling distribution
    entropy: torch.Tensor  # [N, B] float, entropy of the sampling distribution
    logp: torch.Tensor  # [N, B] float32, its log-prob at the trace's log-prob temperature (what training replays)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering; removed entries become -inf. At least one token survives."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # mass before this token already ≥ p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class StepNoise:
    """The random numbers of one denoising step, per row from its own stream (``tracerl.seeding``): keyed by the
    block (counted from the row's first decoding block), the step within it and what they are for, so a row draws
    the same numbers whatever else is in its batch."""

    def __init__(self, streams: RowStreams, block: int, step: int, width: int) -> None:
        self.streams, self.block, self.step, self.width = streams, block, step, width

    def uniform(self, what: int) -> torch.Tensor:
        """[N, B] float64 uniforms in (0, 1) for ``what`` (CANDIDATES, REMASK) at this step."""
        return self.streams.uniform((self.block, self.step, what), self.width)


def sample_candidates(
    logits: torch.Tensor, s: SamplingConfig, mask_id: int, noise: StepNoise | None, logp_temperature: float = 1.0
) -> Candidates:
    """Sample one candidate per position with temperature / top-k / top-p (inverse CDF, one seeded uniform per
    position from ``noise``; greedy when the temperature is 0, which needs no noise).

    The mask token is never a candidate. ``logp`` is the unfiltered log-prob in fp32 at ``logp_temperature``
    (log softmax(logits / τ); 1: the model's own distribution), the quantity a training view recomputes.
    """
    logits = logits.float()
    logp_all = torch.log_softmax(logits if logp_temperature == 1.0 else logits / logp_temperature, dim=-1)
    scores = logits.clone()
    scores[..., mask_id] = float("-inf")
    if s.temperature == 0:
        probs = torch.softmax(scores, dim=-1)
        tokens = probs.argmax(-1)
    else:
        if noise is None:
            raise ValueError("sampling at a temperature above 0 needs the step's noise")
        scores = filter_logits(scores / s.temperature, s.top_k, s.top_p)
        probs = torch.softmax(scores, dim=-1)
        tokens = categorical(probs, noise.uniform(CANDIDATES).to(probs.device))
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    return Candidates(
        tokens=tokens,
        confidence=probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        entropy=entropy,
        logp=logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
    )


def step_quota(n_masked: torch.Tensor, steps: int, step: int) -> torch.Tensor:
    """Tokens to commit at ``step`` (0-based) of a block that started with ``n_masked`` masks [N].

    LLaDA's schedule: ``n // steps`` per step, the remainder spread over the first steps; the last step takes
    whatever is left.
    """
    base, rem = n_masked // steps, n_masked % steps
    return base + (step < rem).long()


class Trace:
    """Accumulates the trace while a sampler runs: step ids and log-probs in response coordinates [N, L], the
    log-probs at ``logp_temperature`` (``objective.logp_temperature``: 1, or the sampling temperature)."""

    def __init__(self, n: int, length: int, device: torch.device, logp_temperature: float = 1.0) -> None:
        self.logp_temperature = logp_temperature
        self.step_map = torch.full((n, length), -1, dtype=torch.long, device=device)
        self.logp = torch.zeros((n, length), dtype=torch.float32, device=device)
        self.counter = torch.zeros(n, dtype=torch.long, device=device)  # denoising steps taken per sequence
        self.commits = torch.zeros((n, length), dtype=torch.long, device=device)  # times each position was committed

    def record(self, resp_index: torch.Tensor, commit: torch.Tensor, logp: torch.Tensor) -> None:
        """Record commits of one step. resp_index [N, B] response positions of the block (-1 = none)."""
        rows, cols = commit.nonzero(as_tuple=True)
        at = resp_index[rows, cols]
        self.step_map[rows, at] = self.counter[rows]
        self.logp[rows, at] = logp[rows, cols]
        self.commits[rows, at] += 1
        self.counter += commit.any(-1).long()


def commit_step(
    logits: torch.Tensor,
    block_tokens: torch.Tensor,
    eligible: torch.Tensor,
    quota: torch.Tensor,
    s: SamplingConfig,
    mask_id: int,
    noise: StepNoise,
    logp_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoising step on a block: sample candidates, choose positions, write them.

    Returns (new block tokens [N, B], commit mask [N, B], logp of the candidates at ``logp_temperature`` [N, B]).
    """
    cand = sample_candidates(logits, s, mask_id, noise, logp_temperature)
    remask = get_remasking(s.remasking)
    commit = remask(
        cand.confidence,
        cand.entropy,
        eligible,
        quota,
        threshold=s.threshold,
        eb_threshold=s.eb_threshold,
        noise=noise,
    )
    return torch.where(commit, cand.tokens, block_tokens), commit, cand.logp


def response_mask(response_ids: torch.Tensor, step_map: torch.Tensor, eos_id: int, extra: int) -> torch.Tensor:
    """Positions that count: generated content through the first EOS, plus ``extra`` positions after it."""
    n, length = response_ids.shape
    generated = step_map >= 0
    is_eos = (response_ids == eos_id) & generated
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full((n,), length, device=is_eos.device))
    idx = torch.arange(length, device=response_ids.device).expand(n, length)
    return (idx <= (first_eos + extra).unsqueeze(-1)) & generated


def build_rollout(
    policy,  # noqa: ANN001
    prompts: list[list[int]],
    response_ids: torch.Tensor,
    trace: Trace,
    s: SamplingConfig,
    layout: str,
    group: torch.Tensor | None,
) -> Rollout:
    """Assemble the Rollout record (on CPU) from a finished sampler run."""
    n, length = response_ids.shape
    lp = max(len(p) for p in prompts)
    prompt_ids = torch.full((n, lp), policy.pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, lp), dtype=torch.bool)
    for i, p in enumerate(prompts):
        prompt_ids[i, lp - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, lp - len(p) :] = True
    step_map = trace.step_map.cpu()
    response_ids = response_ids.cpu().masked_fill(step_map < 0, policy.pad_id)
    mask = response_mask(response_ids, step_map, policy.eos_id, s.trainable_pad_tokens)
    has_eos = ((response_ids == policy.eos_id) & (step_map >= 0)).any(-1)
    texts = []
    for i in range(n):
        ids = response_ids[i][(step_map[i] >= 0)].tolist()
        if policy.eos_id in ids:
            ids = ids[: ids.index(policy.eos_id)]
        texts.append(policy.tokenizer.decode(ids, skip_special_tokens=True))
    sampler = asdict(s) | {
        "steps_per_block": resolved_steps_per_block(s),
        "mask_id": policy.mask_id,
        "pad_id": policy.pad_id,
        "eos_id": policy.eos_id,
        "logp_temperature": trace.logp_temperature,
    }
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        step_map=step_map,
        response_mask=mask,
        rollout_logp=trace.logp.cpu().masked_fill(~mask, 0.0),
        group=group if group is not None else torch.arange(n),
        block_size=s.block_size,
        layout=layout,
        sampler=sampler,
        texts=texts,
        truncated=~has_eos,
        commit_counts=trace.commits.cpu(),
    )
