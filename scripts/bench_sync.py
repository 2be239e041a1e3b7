"""Weight sync learner → rollout actors on CPU: the object-store path and the collective (gloo broadcast) path,
against the anchors' way (the learner writes a Hugging Face checkpoint, every rollout actor reloads it from
disk), measured in the same run for an ~8M and a ~100M-parameter random model.

    python scripts/bench_sync.py            # a table
    python scripts/bench_sync.py --json     # one JSON object

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
        with tempfile.TemporaryDirectory() as tmp:

            def from_disk() -> None:  # the anchors' way: write a checkpoint, every actor reloads it
                learner.save_hf(tmp)
                ray.get([w.load_weights_from.remote(tmp, 0) for w in rollout.workers])

            out["checkpoint_reload_s"] = timed(from_disk, repeats)
        _, nbytes = sync_object_store(learner, rollout)
        out["bytes_per_actor"] = nbytes
        out["object_store_speedup"] = out["checkpoint_reload_s"] / out["object_store_s"]
        out["collective_speedup"] = out["checkpoint_reload_s"] / out["collective_s"]
        return out
    finally:
        learner.shutdown()
        rollout.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--actors", type=int, default=2, help="rollout actors")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per path")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        results = [measure(m, MODELS[m], args.actors, args.repeats) for m in args.models]
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps({"sync": results}, indent=2))
        return
    print(f"{'model':>6} {'params':>10} {'MB/actor':>9} {'object store':>13} {'collective':>11} {'ckpt reload':>12}")
    for r in results:
        print(
            f"{r['model']:>6} {r['parameters'] / 1e6:>9.1f}M {r['bytes_per_actor'] / 2**20:>9.1f} "
            f"{r['object_store_s']:>12.3f}s {r['collective_s']:>10.3f}s {r['checkpoint_reload_s']:>11.3f}s   "
            f"(object store {r['object_store_speedup']:.1f}x, collective {r['collective_speedup']:.1f}x faster)"
        )


if __name__ == "__main__":
    main()
