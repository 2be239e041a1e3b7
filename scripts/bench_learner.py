"""Learner throughput and memory on CPU: ZeRO stages 0 / 2 / 3 on a tiny model, the cost of gathering the full
weights for the rollout side, and token-budget packing against one row per micro-batch (the naive way),
measured in the same run.

    python scripts/bench_learner.py            # a table
    python scripts/bench_learner.py --json     # one JSON object

Each configuration runs in its own process, so its peak RSS (``ru_maxrss``) is its own. Tokens/s counts every
row token that goes through a forward with gradients (μ passes × rows × row length); target tokens/s counts
the tokens whose log-probs enter the loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = [  # (name, ZeRO stage, pack rows into micro-batches by the token budget)
    ("zero0", 0, True),
    ("zero2", 2, True),
    ("zero3", 3, True),
    ("zero0_one_row_per_micro_batch", 0, False),
]


def measure(args: argparse.Namespace, stage: int, packed: bool) -> dict:
    """One configuration, in this process: warm-up step, then ``--steps`` timed RL steps and a timed gather."""
    import torch

    from tracerl.config import Config, ModelConfig, SamplingConfig, TinyModelConfig
    from tracerl.learner import Learner
    from tracerl.models import load_policy
    from tracerl.sampling import generate
    from tracerl.trace import make_views

    torch.set_num_threads(args.threads)
    shape = TinyModelConfig(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=4, intermediate_size=4 * args.hidden
    )
    policy = load_policy(ModelConfig(tiny=shape))
    prompts = [policy.tokenizer(f"{i * 7}+{i * 3}=")["input_ids"] for i in range(args.prompts)]
    policy.eos_id = -1  # every response is --new-tokens long: the same rows in every configuration
    rollout = generate(policy, prompts, SamplingConfig(max_new_tokens=args.new_tokens, block_size=4), seed=0)
    views = make_views(rollout, "trace", policy.mask_id)
    policy.eos_id = policy.tokenizer.eos_token_id
    advantages = torch.linspace(-1, 1, len(rollout))

    params = sum(p.numel() for p in policy.model.parameters())  # before ZeRO-3 partitions them
    cfg = Config()
    cfg.learner.zero_stage = stage
    cfg.learner.zero3_persistence_threshold = 0  # ZeRO-3 really partitions the tiny model
    cfg.learner.micro_batch_tokens = args.budget if packed else views.row_tokens
    cfg.learner.minibatches = args.minibatches
    learner = Learner(cfg, policy)
    learner.train_step(rollout, advantages)  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = learner.train_step(rollout, advantages)
    seconds = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    learner.state_dict_for_rollout()
    gather_s = time.perf_counter() - start
    learner.destroy()
    row_tokens = len(views) * views.row_tokens * cfg.learner.updates_per_step
    return {
        "zero_stage": stage,
        "packed": packed,
        "step_s": seconds,
        "tokens_per_s": row_tokens / seconds,
        "target_tokens_per_s": metrics["train/tokens"] * cfg.learner.updates_per_step / seconds,
        "micro_batches_per_step": metrics["train/micro_batches"],
        "weight_gather_s": gather_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": len(views),
        "row_tokens": views.row_tokens,
        "params": params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="samples in the rollout")
    parser.add_argument("--new-tokens", type=int, default=16, help="response length (one token per step)")
    parser.add_argument("--budget", type=int, default=1024, help="learner.micro_batch_tokens when packing")
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed RL steps per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()

    if args.one is not None:
        _, stage, packed = next(c for c in CONFIGS if c[0] == args.one)
        print(json.dumps(measure(args, stage, packed)))
        return

    results = {}
    passthrough = [a for a in sys.argv[1:] if a != "--json"]
    for name, _, _ in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, *passthrough], capture_output=True, text=True, check=True
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    packed, naive = results["zero0"], results["zero0_one_row_per_micro_batch"]
    report = {
        "device": "cpu",
        "model": {"hidden": args.hidden, "layers": args.layers, "params": packed["params"]},
        "rows": packed["rows"],
        "row_tokens": packed["row_tokens"],
        "configs": results,
        "packing_speedup": packed["tokens_per_s"] / naive["tokens_per_s"],
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['model']['params']:,} parameters, {report['rows']} rows × {report['row_tokens']} tokens")
    print(f"{'config':34} {'tokens/s':>10} {'targets/s':>10} {'step s':>8} {'micro':>6} {'gather s':>9} {'RSS MB':>8}")
    for name, r in results.items():
        print(
            f"{name:34} {r['tokens_per_s']:10.0f} {r['target_tokens_per_s']:10.0f} {r['step_s']:8.3f} "
            f"{r['micro_batches_per_step']:6.0f} {r['weight_gather_s']:9.4f} {r['peak_rss_mb']:8.0f}"
        )
    print(f"packing speed-up over one row per micro-batch: {report['packing_speedup']:.2f}×")


if __name__ == "__main__":
    main()
