"""Training-view cost: the block layout's one forward per round versus one full forward per denoising step
(the same log-probs, asserted equal), and how shrink s = 1, 2, 4, 8 cuts the full layout's forwards.

    python scripts/bench_views.py            # a table
    python scripts/bench_views.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tracerl.config import ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.models import load_policy
from tracerl.sampling import generate
from tracerl.trace import make_views, region_blocks, scatter_to_response, view_logprobs


def tiny(attention: str, args: argparse.Namespace):  # noqa: ANN201
    shape = TinyModelConfig(
        attention=attention,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 32,
        intermediate_size=4 * args.hidden,
        block_size=args.block,
    )
    policy = load_policy(ModelConfig(tiny=shape))
    policy.eos_id = -1  # decode the whole response
    return policy


@torch.no_grad()
def naive_block_logprobs(policy, rollout) -> tuple[torch.Tensor, int]:  # noqa: ANN001
    """One forward per denoising step: the sequence up to the step's block, block-causal, step ≥ v masked."""
    b = rollout.block_size
    out = torch.zeros_like(rollout.rollout_logp)
    tokens = 0
    blocks = region_blocks(rollout)
    for i in range(len(rollout)):
        lp = int(rollout.prompt_lengths[i])
        prompt = rollout.prompt_ids[i, -lp:]
        sm = rollout.step_map[i]
        for v in torch.unique(sm[sm >= 0]).tolist():
            target = sm == v
            blk = int(blocks[i][target][0])
            in_seq = (blocks[i] <= blk) & (sm >= 0)
            response = rollout.response_ids[i][in_seq].masked_fill(sm[in_seq] >= v, policy.mask_id)
            x = torch.cat([prompt, response]).unsqueeze(0)
            n = x.shape[1]
            cols = torch.arange(n) // b
            vis = (cols.view(-1, 1) >= cols.view(1, -1)).unsqueeze(0)
            positions = (lp + target[in_seq].nonzero().flatten()).unsqueeze(0)
            logits = policy.logits_at(x, torch.arange(n).unsqueeze(0), vis, positions)[0]
            logp = torch.log_softmax(logits.float(), -1)
            out[i, target] = logp.gather(-1, rollout.response_ids[i][target].unsqueeze(-1)).squeeze(-1)
            tokens += n
    return out, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)

    # Block layout: one forward of ~Lp + 2L per round vs one forward per step.
    policy = tiny("block", args)
    prompts = [policy.tokenizer(f"{i * 13}+{i}=")["input_ids"] for i in range(args.samples)]
    s = SamplingConfig(max_new_tokens=args.new_tokens, block_size=args.block)
    rollout = generate(policy, prompts, s, seed=0)
    mask = rollout.response_mask
    start = time.perf_counter()
    views = make_views(rollout, "trace", policy.mask_id)
    with torch.no_grad():
        logp = torch.cat([view_logprobs(policy, views, torch.tensor([r])) for r in range(len(views))])
    fast = scatter_to_response(views, logp, len(rollout), args.new_tokens)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    naive, naive_tokens = naive_block_logprobs(policy, rollout)
    naive_s = time.perf_counter() - start
    max_diff = float((fast - naive)[mask].abs().max())
    assert max_diff < 1e-4, f"views and the per-step computation disagree by {max_diff}"
    replay_diff = float((fast - rollout.rollout_logp)[mask].abs().max())
    view_tokens = views.input_ids.numel()
    trained = int(mask.sum())
    block = {
        "rows": len(views),
        "row_tokens": views.row_tokens,
        "forward_tokens": view_tokens,
        "naive_forwards": int(sum(len(torch.unique(r[r >= 0])) for r in rollout.step_map)),
        "naive_forward_tokens": naive_tokens,
        "forward_token_ratio": round(naive_tokens / view_tokens, 2),
        "seconds": round(fast_s, 3),
        "naive_seconds": round(naive_s, 3),
        "trained_tokens_per_s": round(trained / fast_s, 1),
        "naive_trained_tokens_per_s": round(trained / naive_s, 1),
        "speedup": round(naive_s / fast_s, 2),
        "max_abs_diff_vs_naive": max_diff,
        "max_abs_diff_vs_rollout_logp": replay_diff,
    }

    # Full layout: forwards (rows) and time for shrink s.
    policy = tiny("full", args)
    rollout = generate(policy, prompts, s, seed=0)
    full = {}
    for shrink_s in (1, 2, 4, 8):
        start = time.perf_counter()
        views = make_views(rollout, "trace", policy.mask_id, shrink_s=shrink_s)
        with torch.no_grad():
            for lo in range(0, len(views), 16):
                view_logprobs(policy, views, torch.arange(lo, min(lo + 16, len(views))))
        full[f"s{shrink_s}"] = {"rows": len(views), "seconds": round(time.perf_counter() - start, 3)}
    for v in full.values():
        v["forward_reduction"] = round(full["s1"]["rows"] / v["rows"], 2)
    out = {
        "setup": {
            "hidden": args.hidden,
            "layers": args.layers,
            "block": args.block,
            "samples": args.samples,
            "new_tokens": args.new_tokens,
            "threads": torch.get_num_threads(),
        },
        "block_layout": block,
        "full_layout_shrink": full,
    }
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"block layout: {block['rows']} rows × {block['row_tokens']} tokens vs {block['naive_forwards']} per-step "
        f"forwards: {block['forward_token_ratio']}x fewer forward tokens, {block['speedup']}x faster "
        f"(max |diff| {max_diff:.2e})"
    )
    for k, v in full.items():
        print(f"full layout shrink {k}: {v['rows']} rows ({v['forward_reduction']}x fewer), {v['seconds']} s")


if __name__ == "__main__":
    main()
