"""The learner's RL step on packed views against the rows (the naive way), measured in the same process.

    python scripts/bench_learner.py                          # the three shapes below, a table
    python scripts/bench_learner.py --shapes quickstart --repeats 5 --json

Shapes (block diffusion, block 4, one rank, DeepSpeed ZeRO-0, fp32, CPU):

- ``quickstart``: the quickstart's RL step: the 0.67M-parameter tiny model (hidden 128, 4 layers), 16 × 8 samples,
  20-token prompts, 20 new tokens, 4 steps per block, two minibatches, old log-probs from the rollout;
- ``block256`` / ``block1024``: a ~7M-parameter model (hidden 256, 7 layers), 256 / 1,024 new tokens, 4 steps per
  block, old log-probs recomputed by the learner.

Rollouts are synthetic with the sampler's structure (every block committed in 4 steps in a random order, the
absolute block grid, no EOS): the learner's work depends on the step map's shape, not on the tokens. Their
``rollout_logp`` is the rows' own replay, so a quickstart step starts at ratio 1 as after exact sampling.

Each shape runs in its own process: learners from the same weights, one on the rows (``learner.packed_views
=false``, today's layout) and one on packed views per ``--attention`` backend (default ``grouped`` and
``dense``); a warm-up step each, then ``--repeats`` timed RL steps each, interleaved. Reported per layout:
seconds and CPU-seconds per step (median, min-max), model tokens/s, trained targets/s, FLOPs per trained target
counted by ``torch.utils.flop_counter`` on one extra step (CPU SDPA counted as two matrix products, as torch
counts it on GPU), the achieved GFLOP/s, and that as a fraction of one matrix multiply of the model's widest
linear layer ([micro-batch tokens × hidden] @ [hidden × intermediate]) timed in the same process. The ratios
(rows over packed) use CPU-seconds, which a loaded machine disturbs least; the largest |log-prob difference|
between the two layouts is measured on the same weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "quickstart": dict(hidden=128, layers=4, heads=4, inter=256, samples=128, prompt=20, new=20, minibatches=2,
                       old_logp="rollout", lr=7e-4),
    "block256": dict(hidden=256, layers=7, heads=4, inter=1024, samples=8, prompt=16, new=256, minibatches=1,
                     old_logp="learner", lr=1e-5),
    "block1024": dict(hidden=256, layers=7, heads=4, inter=1024, samples=2, prompt=16, new=1024, minibatches=1,
                      old_logp="learner", lr=1e-5),
}  # fmt: skip
BLOCK, STEPS_PER_BLOCK = 4, 4


def synthetic_rollout(policy: Any, samples: int, prompt: int, new: int, seed: int) -> Any:
    """A block-layout Rollout with the sampler's structure: each block of the absolute grid committed over
    ``STEPS_PER_BLOCK`` steps in a random order, steps counted per sequence; ``rollout_logp`` left 0."""
    import torch

    from tracerl.records import Rollout

    g = torch.Generator().manual_seed(seed)
    vocab = policy.vocab_size
    low = 4  # clear of the special tokens at the start of the tiny vocabulary
    prompt_ids = torch.randint(low, vocab - 1, (samples, prompt), generator=g)
    response_ids = torch.randint(low, vocab - 1, (samples, new), generator=g)
    response_ids[response_ids == policy.mask_id] = low
    tail = prompt % BLOCK
    step_map = torch.empty((samples, new), dtype=torch.long)
    for i in range(samples):
        block_of = (tail + torch.arange(new)) // BLOCK
        offset = 0
        for b in block_of.unique().tolist():
            cols = (block_of == b).nonzero().squeeze(1)
            order = cols[torch.randperm(len(cols), generator=g)]
            steps = min(STEPS_PER_BLOCK, len(cols))
            for k, chunk in enumerate(torch.tensor_split(order, steps)):
                step_map[i, chunk] = offset + k
            offset += steps
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids, dtype=torch.bool),
        response_ids=response_ids,
        step_map=step_map,
        response_mask=torch.ones_like(response_ids, dtype=torch.bool),
        rollout_logp=torch.zeros(samples, new),
        group=torch.arange(samples) // 8,
        block_size=BLOCK,
        layout="block",
        sampler={"pad_id": policy.pad_id},
    )


def flop_counter() -> Any:
    """torch's FLOP counter, plus CPU SDPA (which torch leaves uncounted) as the two matrix products it is."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def matmul_gflops(tokens: int, hidden: int, inter: int, repeats: int = 5) -> float:
    """GFLOP/s of [tokens × hidden] @ [hidden × inter] in this process (best of ``repeats``)."""
    import torch

    x, w = torch.randn(tokens, hidden), torch.randn(hidden, inter)
    torch.matmul(x, w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            torch.matmul(x, w)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * tokens * hidden * inter / best / 1e9


def measure(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """One shape, in this process (see the module docstring)."""
    import copy

    import torch

    from tracerl.config import Config, ModelConfig, TinyModelConfig
    from tracerl.learner import Learner
    from tracerl.models import load_policy
    from tracerl.trace import make_views, target_logprobs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sh = SHAPES[name]
    tiny = TinyModelConfig(
        attention="block", block_size=BLOCK, hidden_size=sh["hidden"], num_layers=sh["layers"],
        num_heads=sh["heads"], intermediate_size=sh["inter"],
    )  # fmt: skip
    policy = load_policy(ModelConfig(tiny=tiny))
    params = sum(p.numel() for p in policy.model.parameters())
    rollout = synthetic_rollout(policy, sh["samples"], sh["prompt"], sh["new"], seed=1)
    rows = make_views(rollout, "trace", policy.mask_id)
    packed = make_views(rollout, "trace", policy.mask_id, pack=True, max_tokens=args.budget, attention="dense")
    with torch.no_grad():
        want = rows.targets().place(target_logprobs(policy, rows), len(rollout), sh["new"])
        got = packed.targets().place(target_logprobs(policy, packed), len(rollout), sh["new"])
    rollout.rollout_logp = want  # the rows' replay: what an exact sampler records
    max_diff = float((want - got).abs().max())
    advantages = torch.linspace(-1, 1, len(rollout))

    def learner(packed_views: bool, attention: str = "auto") -> Learner:
        cfg = Config()
        cfg.learner.packed_views = packed_views
        cfg.learner.packed_attention = attention
        cfg.learner.micro_batch_tokens = args.budget
        cfg.learner.minibatches = sh["minibatches"]
        cfg.learner.lr = sh["lr"]
        cfg.objective.old_logp_source = sh["old_logp"]
        return Learner(cfg, copy.deepcopy(policy))

    layouts = {"rows": learner(False)} | {f"packed_{a}": learner(True, a) for a in args.attention.split(",")}
    walls: dict[str, list[float]] = {k: [] for k in layouts}
    cpus: dict[str, list[float]] = {k: [] for k in layouts}
    metrics: dict[str, dict[str, float]] = {}
    for lrn in layouts.values():
        lrn.train_step(rollout, advantages)  # warm-up
    for _ in range(args.repeats):
        for key, lrn in layouts.items():
            wall, cpu = time.perf_counter(), time.process_time()
            metrics[key] = lrn.train_step(rollout, advantages)
            walls[key].append(time.perf_counter() - wall)
            cpus[key].append(time.process_time() - cpu)
    flops = {}
    for key, lrn in layouts.items():
        with flop_counter() as counter:
            lrn.train_step(rollout, advantages)
        flops[key] = counter.get_total_flops()
    for lrn in layouts.values():
        lrn.destroy()
    mm = matmul_gflops(min(args.budget, 4096), sh["hidden"], sh["inter"])
    passes = 1  # learner.updates_per_step
    out: dict[str, Any] = {
        "shape": name,
        "params": params,
        "samples": sh["samples"],
        "new_tokens": sh["new"],
        "max_abs_logp_diff": max_diff,
        "matmul_gflops": mm,
        "threads": args.threads,
    }
    for key in layouts:
        m = metrics[key]
        targets = m["train/tokens"] * passes
        tokens = m["trace/tokens_per_sample"] * sh["samples"] * passes
        step = statistics.median(walls[key])
        cpu = statistics.median(cpus[key])
        out[key] = {
            "step_s": step,
            "step_s_range": [min(walls[key]), max(walls[key])],
            "cpu_s": cpu,
            "cpu_s_range": [min(cpus[key]), max(cpus[key])],
            "tokens_per_sample": m["trace/tokens_per_sample"],
            "tokens_per_s": tokens / step,
            "targets_per_s": targets / step,
            "flops_per_target": flops[key] / targets,
            "gflops_achieved": flops[key] / step / 1e9,
            "fraction_of_matmul": flops[key] / step / 1e9 / mm,
            "micro_batches": m["train/micro_batches"],
        }
    for key in layouts:
        if key != "rows":
            out[key]["speedup_cpu"] = out["rows"]["cpu_s"] / out[key]["cpu_s"]
            out[key]["speedup_wall"] = out["rows"]["step_s"] / out[key]["step_s"]
            out[key]["flops_ratio"] = out["rows"]["flops_per_target"] / out[key]["flops_per_target"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed RL steps per layout")
    parser.add_argument("--budget", type=int, default=8192, help="learner.micro_batch_tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="grouped,dense", help="packed_attention backends to run beside rows")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one shape, print JSON
    args = parser.parse_args()

    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return
    names = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    passthrough = [a for a in sys.argv[1:] if a != "--json"]
    results = []
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, *passthrough], capture_output=True, text=True, check=False
        )
        if proc.returncode:
            sys.exit(f"shape {name} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)  # progress, and a partial record
    if args.json:
        print(json.dumps({"device": "cpu", "results": results}))
        return
    head = (
        f"{'shape':11} {'layout':15} {'params':>7} {'tok/sample':>10} {'step s':>17} {'cpu s':>17} {'targets/s':>9} "
        f"{'MFLOP/target':>12} {'GFLOP/s':>8} {'of mm':>6} {'vs rows':>8} {'FLOPs':>6}"
    )
    print(head)
    for r in results:
        for key, x in r.items():
            if not isinstance(x, dict):
                continue
            lo, hi = x["step_s_range"]
            clo, chi = x["cpu_s_range"]
            ratio = f"{x['speedup_cpu']:7.2f}x {x['flops_ratio']:5.2f}x" if "speedup_cpu" in x else ""
            print(
                f"{r['shape']:11} {key:15} {r['params'] / 1e6:6.2f}M {x['tokens_per_sample']:10.0f} "
                f"{x['step_s']:6.2f} ({lo:.2f}-{hi:.2f}) {x['cpu_s']:6.2f} ({clo:.2f}-{chi:.2f}) "
                f"{x['targets_per_s']:9.0f} {x['flops_per_target'] / 1e6:12.1f} {x['gflops_achieved']:8.1f} "
                f"{x['fraction_of_matmul']:6.2f} {ratio}"
            )
        print(
            f"{r['shape']:11} max |log-prob difference| packed vs rows {r['max_abs_logp_diff']:.1e}; "
            f"matmul {r['matmul_gflops']:.1f} GFLOP/s; ratios: CPU-seconds and FLOPs per target of rows / packed"
        )


if __name__ == "__main__":
    main()
