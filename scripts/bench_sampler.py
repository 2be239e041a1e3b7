"""Sampler speed table: every sampler x cache x remasking, measured in one run on the same random tiny models.

    python scripts/bench_sampler.py                 # a table (lengths 256, 1024, 2048)
    python scripts/bench_sampler.py --json          # one JSON object
    python scripts/bench_sampler.py --lengths 256   # the short run

Rows per length and remasking (static top-k, dynamic threshold):
- block diffusion: no cache (the naive way; only up to ``--no-cache-max-len``), ``DynamicCache`` unfused (the
  sampler as it was), dynamic fused, static unfused, static fused (the default), and static fused with the
  transformers forward instead of the lean one (``kv_static_fused_hf``: what the lean forward adds);
- full attention (only at ``--full-lengths``): no cache (naive), prefix cache, dual cache, and the dual cache
  with the transformers forward (``dual_hf``).
Columns: tok/s (wall clock and per CPU-second of this process: the CPU figure is steadier on a shared
machine, and ratios use it), forward calls and forward tokens per generated token (per sequence), generated
tokens per forward, and the replay mismatch: mean |exact trace-view log-prob - rollout_logp| over the
trainable tokens (up to ``--mismatch-max-len``; 0 up to float noise for the exact samplers).

EOS is disabled so every run decodes all its tokens. The random model's LM head is scaled by
``--head-scale`` so that its confidences reach the dynamic threshold as a trained model's do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import tracerl.models.base as models_base
from tracerl.config import ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.models import load_policy
from tracerl.models.lean import lean_supported
from tracerl.sampling import generate
from tracerl.trace import replay_mismatch

BLOCK_VARIANTS = {  # name → sampling settings; the first is the naive way, the second the sampler as it was
    "none": dict(cache="none"),
    "kv_dynamic": dict(cache="kv", kv_storage="dynamic", fused_commit=False),
    "kv_dynamic_fused": dict(cache="kv", kv_storage="dynamic", fused_commit=True),
    "kv_static": dict(cache="kv", kv_storage="static", fused_commit=False),
    "kv_static_fused": dict(cache="kv", kv_storage="static", fused_commit=True),
    "kv_static_fused_hf": dict(cache="kv", kv_storage="static", fused_commit=True, lean=False),
}
FULL_VARIANTS = {
    "none": dict(cache="none"),
    "prefix": dict(cache="prefix"),
    "dual": dict(cache="dual"),
    "dual_hf": dict(cache="dual", lean=False),
}
REMASKING = {
    "static": dict(remasking="low_confidence_static"),
    "dynamic": dict(remasking="low_confidence_dynamic", threshold=0.9),
}


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


def build(attention: str, args: argparse.Namespace):  # noqa: ANN201
    shape = TinyModelConfig(
        attention=attention,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        block_size=args.block,
        max_position_embeddings=max(args.lengths + args.full_lengths) + 64,
    )
    policy = load_policy(ModelConfig(tiny=shape, dtype=args.dtype))
    with torch.no_grad():
        policy.model.get_output_embeddings().weight.mul_(args.head_scale)
    policy.model.to(args.device)
    policy.eos_id = -1  # never stop early: every configuration decodes the same number of tokens
    return policy, counted(policy)


def measure(policy, stats: dict, s: SamplingConfig, batch: int, args: argparse.Namespace) -> tuple[dict, object]:  # noqa: ANN001
    prompts = [policy.tokenizer(f"{i * 7}+{i * 3}=")["input_ids"] for i in range(batch)]
    warm = SamplingConfig(**{**s.__dict__, "max_new_tokens": 2 * s.block_size})
    generate(policy, prompts[:2], warm)
    stats.update(calls=0, tokens=0)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    rollout = generate(policy, prompts, s, seed=0)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    generated = int((rollout.step_map >= 0).sum())
    row = {
        "tokens_per_s": round(generated / wall, 1),
        "tokens_per_cpu_s": round(generated / cpu, 1),
        "forward_calls_per_token": round(stats["calls"] * batch / generated, 3),
        "forward_tokens_per_token": round(stats["tokens"] / generated, 2),
        "tokens_per_forward": round(generated / (stats["calls"] * batch), 3),
        "seconds": round(wall, 2),
    }
    if s.max_new_tokens <= args.mismatch_max_len:
        row["replay_mismatch"] = float(f"{replay_mismatch(policy, rollout):.2e}")
    return row, rollout


def run_sampler(name: str, variants: dict, lengths: list[int], args: argparse.Namespace) -> tuple[list, list]:
    policy, stats = build("block" if name == "block" else "full", args)
    block = args.block if name == "block" else args.full_block
    rows, checks = [], []
    for length in lengths:
        batch = args.batch if length <= 256 else args.long_batch
        for rname, rkw in REMASKING.items():
            outs = {}
            for vname, vkw in variants.items():
                if vname == "none" and name == "block" and length > args.no_cache_max_len:
                    continue
                if name == "block" and args.block_variants and vname not in args.block_variants.split(","):
                    continue
                vkw = dict(vkw)
                models_base.lean_supported = lean_supported if vkw.pop("lean", True) else (lambda model: False)
                s = SamplingConfig(max_new_tokens=length, block_size=block, batch_size=batch, **vkw, **rkw)
                row, outs[vname] = measure(policy, stats, s, batch, args)
                models_base.lean_supported = lean_supported
                rows.append({"sampler": name, "cache": vname, "remasking": rname, "new_tokens": length,
                             "batch": batch, **row})  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
            group = [r for r in rows if (r["sampler"], r["new_tokens"], r["remasking"]) == (name, length, rname)]
            for ref in ("none", "kv_dynamic"):
                base = next((r for r in group if r["cache"] == ref), None)
                for r in group if base else []:
                    r[f"speedup_vs_{ref}"] = round(r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2)
            if name == "block":  # every cached variant against the sampler as it was (and the reference)
                ref = outs.get("none", outs.get("kv_dynamic", next(iter(outs.values()))))
                same = all(
                    torch.equal(o.response_ids, ref.response_ids) and torch.equal(o.step_map, ref.step_map)
                    for o in outs.values()
                )
                checks.append({"new_tokens": length, "remasking": rname, "identical_tokens_and_step_maps": same})
    return rows, checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--lengths", default="256,1024,2048", help="new tokens per sequence, comma-separated")
    p.add_argument("--full-lengths", default="256", help="lengths at which the full-attention sampler runs")
    p.add_argument("--samplers", default="block,full", help="which samplers to run, comma-separated")
    p.add_argument(
        "--block-variants", default="", help=f"block cache variants to run (default all: {','.join(BLOCK_VARIANTS)})"
    )
    p.add_argument("--no-cache-max-len", type=int, default=256, help="longest block run without a cache")
    p.add_argument("--mismatch-max-len", type=int, default=256, help="longest run whose replay is scored")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--block", type=int, default=4, help="block size of the block-diffusion model")
    p.add_argument("--full-block", type=int, default=32, help="semi-autoregressive block of the full sampler")
    p.add_argument("--batch", type=int, default=8, help="sequences per run at 256 new tokens or fewer")
    p.add_argument("--long-batch", type=int, default=4, help="sequences per run above 256 new tokens")
    p.add_argument("--head-scale", type=float, default=32.0, help="LM head scale of the random model")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.full_lengths = [int(v) for v in args.full_lengths.split(",") if v]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samplers = args.samplers.split(",")
    block_rows, checks = run_sampler("block", BLOCK_VARIANTS, args.lengths, args) if "block" in samplers else ([], [])
    full_rows, _ = run_sampler("full", FULL_VARIANTS, args.full_lengths, args) if "full" in samplers else ([], [])
    params = sum(p.numel() for p in build("block", args)[0].model.parameters())
    setup = {k: v for k, v in vars(args).items() if k != "json"} | {
        "params": params,
        "threads": torch.get_num_threads(),
    }
    out = {"setup": setup, "rows": block_rows + full_rows, "block_exactness": checks}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{params / 1e6:.1f}M-parameter model, {torch.get_num_threads()} thread(s), {args.device}, {args.dtype}")
    head = f"{'sampler':7s} {'cache':18s} {'remask':8s} {'new':>5s} {'N':>2s} {'tok/s':>7s} {'tok/cpu-s':>9s} "
    print(head + "calls/tok fwd-tok/tok tok/fwd mismatch  vs-naive vs-dynamic")
    for r in out["rows"]:
        print(
            f"{r['sampler']:7s} {r['cache']:18s} {r['remasking']:8s} {r['new_tokens']:5d} {r['batch']:2d} "
            f"{r['tokens_per_s']:7.1f} {r['tokens_per_cpu_s']:9.1f} {r['forward_calls_per_token']:9.3f} "
            f"{r['forward_tokens_per_token']:11.2f} {r['tokens_per_forward']:7.3f} "
            f"{r.get('replay_mismatch', float('nan')):8.1e} {r.get('speedup_vs_none', float('nan')):9.2f} "
            f"{r.get('speedup_vs_kv_dynamic', float('nan')):10.2f}"
        )
    for c in checks:
        same = c["identical_tokens_and_step_maps"]
        print(f"block {c['new_tokens']} {c['remasking']}: all cache variants, identical tokens and step maps: {same}")


if __name__ == "__main__":
    main()
