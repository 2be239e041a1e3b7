"""Full-attention semi-autoregressive sampler (LLaDA / Dream / masked_lm / tiny-full), DESIGN §6.

The response is a run of L masks after the left-padded prompt; it is decoded block by block (``block_size``
positions relative to the response start), ``steps_per_block`` denoising steps per block. Every step sees the
whole sequence with bidirectional attention. Two approximate caches from Fast-dLLM (arXiv 2505.22618):
``cache=prefix``: the first step of a block runs the whole sequence and keeps the keys/values of everything
before the block; the block's later steps recompute only the block and what follows it. ``cache=dual``
(DualCache): the first step keeps the keys/values of the prefix *and* of the suffix after the block; later
steps recompute only the block's own positions (one more to the left for a shifted model), written in place
into a preallocated cache, against all of them. Both sample from a slightly different function than the one
training replays; ``tracerl.trace.replay_mismatch`` measures by how much.

dims: N sequences · W = Lp + L columns · B block size · V vocab
"""

from __future__ import annotations

import torch

from tracerl.config import SamplingConfig, resolved_steps_per_block
from tracerl.models.base import truncate_cache
from tracerl.records import Rollout
from tracerl.sampling.core import StepNoise, Trace, build_rollout, commit_step, step_quota
from tracerl.seeding import RowStreams


def full_visible(valid: torch.Tensor, q_cols: torch.Tensor, k_cols: torch.Tensor) -> torch.Tensor:
    """[N, Q, K] bool: every valid key is visible; a query with none (padding) sees itself."""
    vis = valid[:, k_cols].unsqueeze(1).expand(-1, q_cols.numel(), -1)
    return vis | (q_cols.view(1, -1, 1) == k_cols.view(1, 1, -1))


@torch.no_grad()
def sample_full(
    policy,  # noqa: ANN001
    prompts: list[list[int]],
    s: SamplingConfig,
    streams: RowStreams,
    cache: str = "none",
    group: torch.Tensor | None = None,
    logp_temperature: float = 1.0,
) -> Rollout:
    """Generate with full attention; ``cache`` is ``none`` (exact), ``prefix`` or ``dual`` (approximate).
    Row i draws its random numbers from ``streams`` row i (keyed by block and step)."""
    device = policy.device
    block, length, steps = s.block_size, s.max_new_tokens, resolved_steps_per_block(s)
    n = len(prompts)
    lp = max(len(p) for p in prompts)
    width = lp + length
    cols = torch.arange(width, device=device)

    x = torch.full((n, width), policy.mask_id, dtype=torch.long, device=device)
    valid = torch.ones((n, width), dtype=torch.bool, device=device)
    pads = torch.tensor([lp - len(p) for p in prompts], device=device)
    for i, p in enumerate(prompts):
        x[i, : lp - len(p)] = policy.pad_id
        x[i, lp - len(p) : lp] = torch.tensor(p, device=device)
        valid[i, : lp - len(p)] = False
    position_ids = (cols.unsqueeze(0) - pads.unsqueeze(1)).clamp_min(0)
    resp_index = (cols - lp).expand(n, width)  # column → response position (negative inside the prompt)

    trace = Trace(n, length, device, logp_temperature)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    vis_all = full_visible(valid, cols, cols)
    shift = int(policy.shift)
    kv = None
    if cache != "none":  # one cache for the whole run; every block refills it
        kv = policy.new_cache(width if cache == "dual" or s.kv_storage == "static" else None)
    for lo in range(lp, width, block):
        hi = min(lo + block, width)
        start = lo - shift  # first query column whose hidden state predicts a block position
        active = ~finished
        if not bool(active.any()):
            break
        n_masked = torch.where(active, torch.tensor(hi - lo, device=device), 0)
        positions = torch.arange(lo, hi, device=device).expand(n, hi - lo)
        for t in range(steps):
            eligible = (x[:, lo:hi] == policy.mask_id) & active.unsqueeze(-1)
            if not bool(eligible.any()):
                break
            if cache == "none" or t == 0:  # the whole sequence; a cache keeps what later steps reuse
                if cache == "dual":
                    kv.seek(0)
                elif cache == "prefix":
                    truncate_cache(kv, 0)
                logits = policy.logits_at(x, position_ids, vis_all, positions, kv)
                if cache == "prefix":
                    truncate_cache(kv, start)
            elif cache == "prefix":  # recompute the block and its suffix against the stale prefix
                vis = full_visible(valid, cols[start:], cols)
                logits = policy.logits_at(x[:, start:], position_ids[:, start:], vis, positions - start, kv)
                truncate_cache(kv, start)
            else:  # dual: recompute the block in place against the stale prefix and suffix
                kv.seek(start)
                vis = full_visible(valid, cols[start:hi], cols)
                logits = policy.logits_at(x[:, start:hi], position_ids[:, start:hi], vis, positions - start, kv)
            quota = step_quota(n_masked, steps, t) if t < steps - 1 else eligible.sum(-1)
            quota = torch.where(eligible.any(-1), quota.clamp_min(1), quota)
            noise = StepNoise(streams, (lo - lp) // block, t, hi - lo)
            new, commit, logp = commit_step(
                logits, x[:, lo:hi], eligible, quota, s, policy.mask_id, noise, logp_temperature
            )
            x[:, lo:hi] = new
            trace.record(resp_index[:, lo:hi], commit, logp)
        finished |= ((x[:, lp:hi] == policy.eos_id) & (trace.step_map[:, : hi - lp] >= 0)).any(-1)

    return build_rollout(policy, prompts, x[:, lp:], trace, s, "full", group)
