"""Weight sync learner → rollout actors on CPU: the object-store path and the collective (gloo broadcast) path,
against the anchors' way (the learner writes a Hugging Face checkpoint, every rollout actor reloads it from
disk), measured in the same run for an ~8M and a ~100M-parameter random model; then full weights against LoRA.

    python scripts/bench_sync.py            # a table
    python scripts/bench_sync.py --json     # one JSON object
    python scripts/bench_sync.py --models 100M --lora 16   # also LoRA r=16 against full weights

With ``--lora R`` each model is measured twice, full weights and ``learner.lora`` of rank R (default targets), and
the LoRA rows add, in the same run: the learner's bytes of parameters + gradients + AdamW state (counted on a
plain-PyTorch learner after one optimizer step), the bytes each actor receives per sync (counted), the sync
times, and the rollout side's choice between applying adapters unmerged and merging them into a plain copy:
the time of one greedy generation either way and the time of one merge (``merged_state_dict`` + load).

One local Ray instance; one learner rank, ``--actors`` rollout actors. Each path is timed ``--repeats`` times
after a warm-up (the collective group is formed during the warm-up), median reported. The reload baseline is
generous to the anchors: the checkpoint stays in this machine's page cache and the weights are loaded into
live models, where the anchors start a new process and build the model again every step, on shared storage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODELS = {  # name: model.tiny overrides
    "8M": ["model.tiny.hidden_size=256", "model.tiny.num_layers=8", "model.tiny.num_heads=4",
           "model.tiny.intermediate_size=768"],
    "100M": ["model.tiny.hidden_size=768", "model.tiny.num_layers=14", "model.tiny.num_heads=12",
             "model.tiny.intermediate_size=2304"],
}  # fmt: skip


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, overrides: list[str], actors: int, repeats: int) -> dict:
    import ray

    from tracerl.checks import load_config
    from tracerl.workers import LearnerGroup, RolloutGroup, sync_collective, sync_object_store

    cfg = load_config(None, [*overrides, "model.tiny.attention=block"])
    cpu = {"num_cpus": 1, "num_gpus": 0}
    learner = LearnerGroup(cfg, options=[cpu])
    rollout = RolloutGroup(cfg, [cpu] * actors)
    try:
        params = rollout.info[0]["parameters"]
        out: dict = {"model": name, "parameters": params, "actors": actors}
        out["object_store_s"] = timed(lambda: sync_object_store(learner, rollout), repeats)
        out["collective_s"] = timed(lambda: sync_collective(learner, rollout), repeats)
        _, nbytes = sync_object_store(learner, rollout)
        out["bytes_per_actor"] = nbytes
        if cfg.learner.lora.enabled:  # the reload baseline is measured on full weights
            return out
        with tempfile.TemporaryDirectory() as tmp:

            def from_disk() -> None:  # the anchors' way: write a checkpoint, every actor reloads it
                learner.save_hf(tmp)
                ray.get([w.load_weights_from.remote(tmp, 0) for w in rollout.workers])

            out["checkpoint_reload_s"] = timed(from_disk, repeats)
        out["object_store_speedup"] = out["checkpoint_reload_s"] / out["object_store_s"]
        out["collective_speedup"] = out["checkpoint_reload_s"] / out["collective_s"]
        return out
    finally:
        learner.shutdown()
        rollout.shutdown()


def learner_memory(overrides: list[str]) -> dict:
    """Bytes of parameters, gradients and AdamW state of one plain-PyTorch learner after one optimizer step
    (counted from the tensors, so a loaded machine does not disturb it)."""
    import torch

    from tracerl.checks import load_config
    from tracerl.learner import Learner
    from tracerl.models import load_policy

    cfg = load_config(None, [*overrides, "model.tiny.attention=block", "learner.engine=torch"])
    learner = Learner(cfg, load_policy(cfg.model))
    try:
        engine = learner.engine
        trained = [p for p in engine.module.parameters() if p.requires_grad]
        engine.backward(sum((p.float() ** 2).sum() for p in trained), last=True)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in trained)
        engine.step()
        state = [t for s in engine.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return {
            "param_bytes": sum(p.numel() * p.element_size() for p in engine.module.parameters()),
            "trained_params": sum(p.numel() for p in trained),
            "grad_bytes": grads,
            "optimizer_bytes": sum(t.numel() * t.element_size() for t in state),
        }
    finally:
        learner.destroy()


def merged_or_not(overrides: list[str], repeats: int) -> dict:
    """A rollout copy with LoRA adapters: one greedy generation with the adapters unmerged (PEFT layers, the
    learner's own function) against the same copy merged into plain weights, and the time of one merge."""
    import torch

    from tracerl.checks import load_config
    from tracerl.config import SamplingConfig
    from tracerl.models import load_policy
    from tracerl.models.lora import apply_lora, merged_state_dict
    from tracerl.sampling import generate

    cfg = load_config(None, [*overrides, "model.tiny.attention=block"])
    adapted = load_policy(cfg.model)
    apply_lora(adapted, cfg.learner.lora, cfg.seed)
    for name, p in adapted.model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(std=1e-3)  # a trained-looking update
    plain = load_policy(cfg.model)
    sampling = SamplingConfig(max_new_tokens=16, block_size=4, temperature=0.0)
    prompts = [[5, 6, 7, 8]] * 4

    def run(policy) -> None:  # noqa: ANN001
        with torch.inference_mode():
            generate(policy, prompts, sampling, seed=0)

    def merge() -> None:
        plain.model.load_state_dict(merged_state_dict(adapted.model))

    merge_s = timed(merge, repeats)
    return {
        "generate_unmerged_s": timed(lambda: run(adapted), repeats),
        "generate_merged_s": timed(lambda: run(plain), repeats),
        "merge_s": merge_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--actors", type=int, default=2, help="rollout actors")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per path")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lora", type=int, default=0, help="also measure learner.lora of this rank (0: off)")
    args = parser.parse_args()
    import ray

    lora = ["learner.lora.enabled=true", f"learner.lora.rank={args.lora}", f"learner.lora.alpha={2 * args.lora}"]
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        results = [measure(m, MODELS[m], args.actors, args.repeats) for m in args.models]
        lora_results = [measure(m, MODELS[m] + lora, args.actors, args.repeats) for m in args.models if args.lora]
    finally:
        ray.shutdown()
    comparisons = []
    for full, adapted in zip(results, lora_results, strict=False):
        overrides = MODELS[full["model"]]
        mem_full, mem_lora = learner_memory(overrides), learner_memory(overrides + lora)
        comparisons.append({
            "model": full["model"], "rank": args.lora, "full": full | mem_full, "lora": adapted | mem_lora,
            "rollout_side": merged_or_not(overrides + lora, args.repeats),
        })  # fmt: skip
    if args.json:
        print(json.dumps({"sync": results, "lora": comparisons}, indent=2))
        return
    print(f"{'model':>6} {'params':>10} {'MB/actor':>9} {'object store':>13} {'collective':>11} {'ckpt reload':>12}")
    for r in results:
        print(
            f"{r['model']:>6} {r['parameters'] / 1e6:>9.1f}M {r['bytes_per_actor'] / 2**20:>9.1f} "
            f"{r['object_store_s']:>12.3f}s {r['collective_s']:>10.3f}s {r['checkpoint_reload_s']:>11.3f}s   "
            f"(object store {r['object_store_speedup']:.1f}x, collective {r['collective_speedup']:.1f}x faster)"
        )
    for c in comparisons:
        f, a, r = c["full"], c["lora"], c["rollout_side"]
        mem = f["param_bytes"] + f["grad_bytes"] + f["optimizer_bytes"]
        mem_lora = a["param_bytes"] + a["grad_bytes"] + a["optimizer_bytes"]
        print(f"\n{c['model']}: full weights against LoRA r={c['rank']} (same run)")
        print(f"  trained parameters       {f['trained_params'] / 1e6:10.2f}M {a['trained_params'] / 1e6:10.3f}M")
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            print(f"  {key:<24} {f[key] / 2**20:9.1f}MB {a[key] / 2**20:9.1f}MB")
        mb, mb_lora = mem / 2**20, mem_lora / 2**20
        print(f"  params+grads+optimizer   {mb:9.1f}MB {mb_lora:9.1f}MB   ({mem / mem_lora:.2f}x less)")
        print(
            f"  sync bytes per actor     {f['bytes_per_actor'] / 2**20:9.1f}MB {a['bytes_per_actor'] / 2**20:9.2f}MB"
            f"   ({f['bytes_per_actor'] / a['bytes_per_actor']:.0f}x less)"
        )
        for key in ("object_store_s", "collective_s"):
            print(f"  {key:<24} {f[key]:10.3f}s {a[key]:10.3f}s   ({f[key] / a[key]:.1f}x faster)")
        print(
            f"  rollout copy: generate unmerged {r['generate_unmerged_s']:.3f}s, merged {r['generate_merged_s']:.3f}s"
            f" ({r['generate_unmerged_s'] / r['generate_merged_s']:.2f}x), one merge {r['merge_s']:.3f}s"
        )


if __name__ == "__main__":
    main()
