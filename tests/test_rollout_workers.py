"""Rollout actors and weight sync: both sync paths give bitwise identical rollout weights; versions are enforced."""

from __future__ import annotations

import pytest
import torch

from tracerl.checks import load_config
from tracerl.data import PromptBatch
from tracerl.metrics import Timers
from tracerl.records import Rollout

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

from tracerl.orchestrator import collect  # noqa: E402
from tracerl.workers import LearnerGroup, RewardPool, RolloutGroup, sync_collective, sync_object_store  # noqa: E402

CPU = {"num_cpus": 1, "num_gpus": 0}


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cfg_for(*overrides: str):  # noqa: ANN201
    base = ["model.tiny.attention=block", "sampling.max_new_tokens=8", "learner.lr=1e-2", "seed=1"]
    return load_config(None, base + list(overrides))


def update(learner: LearnerGroup, group: RolloutGroup, seed: int) -> None:
    """One learner step on a rollout of ``group`` (advantages with spread, so the weights move)."""
    prompts = [[5, 6, 7], [8, 9]]
    shards = group.generate_async(prompts, samples=2, seed=seed)
    rollout = Rollout.concat([ray.get(s.ref) for s in shards])
    learner.train_step(rollout, torch.tensor([1.0, -1.0, 0.5, -0.5]))


def test_object_store_and_collective_sync_give_identical_weights(local_ray):
    cfg = cfg_for("rollout.dtype=bfloat16", "rollout.sync_bucket_mb=1")  # casts, and several buckets
    learner = LearnerGroup(cfg, options=[CPU])
    a, b = RolloutGroup(cfg, [CPU, CPU]), RolloutGroup(cfg, [CPU])
    try:
        before = a.state_dicts()[0]
        for step in (1, 2):  # the collective group is formed once and reused
            update(learner, a, seed=step)
            assert sync_object_store(learner, a)[0] == step
            version, nbytes = sync_collective(learner, b)
            assert version == step and nbytes > 0
            states = a.state_dicts() + b.state_dicts()
            for other in states[1:]:
                assert all(torch.equal(states[0][k], other[k]) for k in states[0])
            assert states[0]["model.embed_tokens.weight"].dtype == torch.bfloat16
        assert any(not torch.equal(before[k], states[0][k]) for k in before)
        versions = [ray.get(w.generate.remote([[5, 6]], torch.zeros(1, dtype=torch.long), 0)).weights_version
                    for w in a.workers + b.workers]  # fmt: skip
        assert versions == [2, 2, 2]
    finally:
        learner.shutdown()
        a.shutdown()
        b.shutdown()


def test_a_shard_from_another_weights_version_is_refused(local_ray):
    cfg = cfg_for()
    group = RolloutGroup(cfg, [CPU])
    pool = RewardPool(["length"], num_workers=1)
    try:
        batch = PromptBatch([[5, 6, 7]], ["x"], {})
        shards = group.generate_async(batch.prompt_ids, samples=2, seed=0)
        # the learner is at version 3, the actor still at 0
        with pytest.raises(RuntimeError, match="sampled with weights version 0, but the learner is at version 3"):
            collect(group, pool, shards, batch, 2, Timers(), version=3)
        rollout, scored = collect(group, pool, group.generate_async(batch.prompt_ids, 2, 0), batch, 2, Timers(), 0)
        assert len(rollout) == 2 and len(scored.total) == 2 and rollout.group.tolist() == [0, 0]
    finally:
        group.shutdown()
        pool.shutdown()
