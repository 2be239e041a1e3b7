"""Block-diffusion sampler (SDAR / TraDo / tiny-block) with an exact KV cache (DESIGN §6).

The block grid is absolute, counted from each prompt's first token: the prompt's last partial block is the
first decoding block. Prompts are left-padded by whole blocks so that every sequence's first decoding block
starts at the same column C; then all sequences share block columns and the prompt prefill is one batched
call. Each denoising step runs only the current block's B tokens against the cache of committed blocks; a
finished block is written to the cache once, clean.

The cache is preallocated at the final width and written in place (``kv_storage=static``; ``dynamic`` is
transformers' ``DynamicCache``, which copies the cache on every append). With ``fused_commit`` the clean write
of a finished block rides along with the first denoising step of the next block: one forward whose queries
are the clean block (it sees its prefix and itself) and the next noisy block (it sees the prefix, the clean
block and itself), so there is one forward per denoising step. The prompt prefill fuses the same way.

With ``cuda_graph`` the cached forwards run in fixed shapes over a full-width cache (``sampling.graphs``: keys
over all W columns, the columns past the block hidden by the mask, writes at device columns), captured as
CUDA graphs on a GPU; the tokens, step maps and log-probs are those of the default path.

dims: N sequences · W columns (C + NB·B) · B block size · L max new tokens · V vocab
"""

from __future__ import annotations

import torch

from tracerl.config import SamplingConfig, resolved_steps_per_block
from tracerl.models.base import truncate_cache
from tracerl.records import Rollout
from tracerl.sampling.core import StepNoise, Trace, build_rollout, commit_step, step_quota
from tracerl.sampling.graphs import BlockForwards
from tracerl.seeding import RowStreams


def block_grid(prompt_lengths: list[int], block: int, length: int) -> dict[str, torch.Tensor | int]:
    """Column layout of a batch on the shared block grid.

    Returns pad [N] (left pad, a multiple of B), tail [N] (prompt tokens in the first decoding block),
    start [N] (column of the first response token), C (first decoding column), NB (blocks to decode).
    """
    lp = torch.tensor(prompt_lengths, dtype=torch.long)
    full = (lp // block) * block
    c = int(full.max())
    tail = lp - full
    nb = int(((tail + length + block - 1) // block).max())
    return {"pad": c - full, "tail": tail, "start": c + tail, "C": c, "NB": nb}


def block_visible(valid: torch.Tensor, q_cols: torch.Tensor, k_cols: torch.Tensor, block: int) -> torch.Tensor:
    """[N, Q, K] bool: key k is visible from query q iff valid and in the same or an earlier block.

    A query with no visible key (left padding) sees itself, so attention stays finite.
    """
    qb = (q_cols // block).view(1, -1, 1)
    kb = (k_cols // block).view(1, 1, -1)
    vis = valid[:, k_cols].unsqueeze(1) & (kb <= qb)
    return vis | (q_cols.view(1, -1, 1) == k_cols.view(1, 1, -1))


@torch.no_grad()
def sample_block(
    policy,  # noqa: ANN001
    prompts: list[list[int]],
    s: SamplingConfig,
    streams: RowStreams,
    cache: bool = True,
    group: torch.Tensor | None = None,
    capture: bool | None = None,
    logp_temperature: float = 1.0,
) -> Rollout:
    """Generate with block diffusion; ``cache=False`` recomputes the whole prefix every step (reference). Row i
    draws its random numbers from ``streams`` row i, keyed by its decoding block (counted from its first one) and
    the step within it.

    With ``s.cuda_graph`` (and the cache) the forwards take the fixed-shape path of ``sampling.graphs``,
    captured as CUDA graphs when ``capture`` (None: when the policy is on CUDA), else run eagerly.
    """
    device = policy.device
    block, length, steps = s.block_size, s.max_new_tokens, resolved_steps_per_block(s)
    n = len(prompts)
    g = block_grid([len(p) for p in prompts], block, length)
    c, nb = g["C"], g["NB"]
    width = c + nb * block
    cols = torch.arange(width, device=device)

    x = torch.full((n, width), policy.pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((n, width), dtype=torch.bool, device=device)
    resp_index = torch.full((n, width), -1, dtype=torch.long, device=device)  # column → response position
    for i, p in enumerate(prompts):
        pad, start = int(g["pad"][i]), int(g["start"][i])
        x[i, pad:start] = torch.tensor(p, device=device)
        x[i, start : start + length] = policy.mask_id
        valid[i, pad : start + length] = True
        resp_index[i, start : start + length] = torch.arange(length, device=device)
    position_ids = (cols.unsqueeze(0) - g["pad"].to(device).unsqueeze(1)).clamp_min(0)

    trace = Trace(n, length, device, logp_temperature)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    graphed = cache and s.cuda_graph
    if graphed:  # fixed shapes: keys over every column, writes at device columns
        kv = policy.new_cache(width, full_width=True)
        capture = device.type == "cuda" if capture is None else capture
        forwards = BlockForwards(policy, kv, block, capture)
    else:
        kv = policy.new_cache(width if s.kv_storage == "static" else None) if cache else None
    pending = 0  # clean columns [pending, lo) not yet in the cache; a fused forward writes them first
    vis_for = None  # the (first query, end) columns the cached attention pattern ``vis`` was built for
    if cache and c > 0 and not s.fused_commit:  # prefill the prompt's complete blocks once
        pre = cols[:c]
        if graphed:
            forwards.write(x[:, :c], position_ids[:, :c], block_visible(valid, pre, cols, block), pre)
        else:
            policy.hidden_states(x[:, :c], position_ids[:, :c], block_visible(valid, pre, pre, block), kv)
        pending = c

    for b in range(nb):
        lo, hi = c + b * block, c + (b + 1) * block
        q_cols = cols[lo:hi]
        in_block = resp_index[:, lo:hi] >= 0
        active = in_block.any(-1) & ~finished
        if not bool(active.any()):
            break
        n_masked = (in_block & active.unsqueeze(-1)).sum(-1)
        for t in range(steps):
            eligible = (x[:, lo:hi] == policy.mask_id) & in_block & active.unsqueeze(-1)
            if not bool(eligible.any()):
                break
            if cache:  # queries [pending, hi): the clean columns not yet cached, then the block
                if vis_for != (pending, hi):  # the pattern changes once per block (and after a fused step)
                    k_cols = cols if graphed else cols[:hi]
                    vis, vis_for = block_visible(valid, cols[pending:hi], k_cols, block), (pending, hi)
                    positions = torch.arange(lo - pending, hi - pending, device=device).expand(n, block)
                if graphed:  # the noisy block's keys/values stay in [lo, hi): the next step overwrites them
                    logits = forwards.logits(x[:, pending:hi], position_ids[:, pending:hi], vis, cols[pending:hi])
                else:
                    logits = policy.logits_at(x[:, pending:hi], position_ids[:, pending:hi], vis, positions, kv)
                    truncate_cache(kv, lo)  # keep the clean prefix, drop the noisy block
                pending = lo
            else:
                k_cols = cols[:hi]
                vis = block_visible(valid, k_cols, k_cols, block)
                positions = q_cols.expand(n, block)
                logits = policy.logits_at(x[:, :hi], position_ids[:, :hi], vis, positions)
            quota = step_quota(n_masked, steps, t) if t < steps - 1 else eligible.sum(-1)
            quota = torch.where(eligible.any(-1), quota.clamp_min(1), quota)
            noise = StepNoise(streams, b, t, block)
            new, commit, logp = commit_step(
                logits, x[:, lo:hi], eligible, quota, s, policy.mask_id, noise, logp_temperature
            )
            x[:, lo:hi] = new
            trace.record(resp_index[:, lo:hi], commit, logp)
        eos_here = ((x[:, lo:hi] == policy.eos_id) & in_block).any(-1)
        finished |= eos_here & active
        if cache and b + 1 < nb and not bool(finished.all()) and not s.fused_commit:  # cache the block, clean
            vis = block_visible(valid, q_cols, cols if graphed else cols[:hi], block)
            if graphed:
                forwards.write(x[:, lo:hi], position_ids[:, lo:hi], vis, q_cols)
            else:
                policy.hidden_states(x[:, lo:hi], position_ids[:, lo:hi], vis, kv)
            pending = hi

    rows = torch.arange(n, device=device).unsqueeze(1)
    resp_cols = g["start"].to(device).unsqueeze(1) + torch.arange(length, device=device)
    response_ids = x[rows, resp_cols]
    return build_rollout(policy, prompts, response_ids, trace, s, "block", group)
