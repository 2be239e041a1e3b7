"""Sampler throughput: block diffusion with vs without the exact KV cache, full attention with vs without the
prefix cache, measured in the same run on the same random tiny model.

    python scripts/bench_sampler.py            # a table
    python scripts/bench_sampler.py --json     # one JSON object

EOS is disabled so every run decodes all ``--new-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tracerl.config import ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.models import load_policy
from tracerl.sampling import generate


def counted(policy):  # noqa: ANN001, ANN201
    """Wrap the policy so that model calls and the tokens they process are counted."""
    stats = {"calls": 0, "tokens": 0}
    inner = policy.hidden_states

    def hidden_states(input_ids, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        stats["calls"] += 1
        stats["tokens"] += input_ids.numel()
        return inner(input_ids, *args, **kwargs)

    policy.hidden_states = hidden_states
    return stats


def run(attention: str, cache: str, args: argparse.Namespace, device: str) -> dict:
    shape = TinyModelConfig(
        attention=attention,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        block_size=args.block,
    )
    policy = load_policy(ModelConfig(tiny=shape, dtype=args.dtype))
    policy.model.to(device)
    policy.eos_id = -1  # never stop early: every configuration decodes the same number of tokens
    stats = counted(policy)
    prompts = [policy.tokenizer(f"{i * 7}+{i * 3}=")["input_ids"] for i in range(args.batch)]
    s = SamplingConfig(max_new_tokens=args.new_tokens, block_size=args.block, cache=cache, batch_size=args.batch)
    generate(policy, prompts[:2], SamplingConfig(max_new_tokens=8, block_size=args.block, cache=cache))  # warm-up
    stats.update(calls=0, tokens=0)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    rollout = generate(policy, prompts, s, seed=0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = int((rollout.step_map >= 0).sum())
    params = sum(p.numel() for p in policy.model.parameters())
    return {
        "params": params,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(generated / seconds, 1),
        "forward_calls_per_token": round(stats["calls"] / generated * args.batch, 3),
        "forward_tokens_per_token": round(stats["tokens"] / generated, 1),
        "generated": generated,
        "_rollout": rollout,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    results = {
        "block_kv_cache": run("block", "kv", args, args.device),
        "block_no_cache": run("block", "none", args, args.device),
        "full_prefix_cache": run("full", "prefix", args, args.device),
        "full_no_cache": run("full", "none", args, args.device),
    }
    a, b = results["block_kv_cache"].pop("_rollout"), results["block_no_cache"].pop("_rollout")
    same = torch.equal(a.response_ids, b.response_ids) and torch.equal(a.step_map, b.step_map)
    for r in results.values():
        r.pop("_rollout", None)
    out = {
        "setup": {
            "device": args.device,
            "dtype": args.dtype,
            "params": results["block_kv_cache"]["params"],
            "new_tokens": args.new_tokens,
            "block": args.block,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
        },
        **results,
        "block_kv_speedup": round(
            results["block_kv_cache"]["tokens_per_s"] / results["block_no_cache"]["tokens_per_s"], 2
        ),
        "full_prefix_speedup": round(
            results["full_prefix_cache"]["tokens_per_s"] / results["full_no_cache"]["tokens_per_s"], 2
        ),
        "block_cached_equals_uncached": same,
    }
    if args.json:
        print(json.dumps(out))
        return
    for name, r in results.items():
        print(
            f"{name:18s} {r['tokens_per_s']:9.1f} tok/s  {r['forward_calls_per_token']:.3f} calls/token/seq  "
            f"{r['forward_tokens_per_token']:8.1f} forward tokens/token"
        )
    print(
        f"block KV cache speed-up {out['block_kv_speedup']}x (identical output: {same}); "
        f"full prefix cache speed-up {out['full_prefix_speedup']}x"
    )


if __name__ == "__main__":
    main()
