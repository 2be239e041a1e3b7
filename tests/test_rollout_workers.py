"""Rollout actors and weight sync: both sync paths give bitwise identical rollout weights; versions are enforced."""

from __future__ import annotations

import pytest
import torch

from tracerl.checks import load_config
from tracerl.data import PromptBatch
from tracerl.metrics import Timers
from tracerl.records import Rollout
from tracerl.seeding import batch_seeds

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
    shards = group.generate_async(prompts, samples=2, seeds=batch_seeds(1, seed, len(prompts), 2))
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
        versions = [ray.get(w.generate.remote([[5, 6]], torch.zeros(1, dtype=torch.long), [0])).weights_version
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
        seeds = batch_seeds(1, 1, 1, 2)
        shards = group.generate_async(batch.prompt_ids, samples=2, seeds=seeds)
        # the learner is at version 3, the actor still at 0
        with pytest.raises(RuntimeError, match="sampled with weights version 0, but the learner is at version 3"):
            collect(group, pool, shards, batch, 2, Timers(), version=3)
        rollout, scored = collect(group, pool, group.generate_async(batch.prompt_ids, 2, seeds), batch, 2, Timers(), 0)
        assert len(rollout) == 2 and len(scored.total) == 2 and rollout.group.tolist() == [0, 0]
    finally:
        group.shutdown()
        pool.shutdown()


@pytest.mark.slow
def test_a_rollout_is_bitwise_the_same_whatever_the_number_of_actors(local_ray):
    # 5 prompts of different lengths x 3 samples; sampler batches of one group each (batch_size 3): 5 batches, handed
    # out to 1, 2 or 3 actors; every sample draws with its own seed, and a batch is decoded alone wherever it goes
    cfg = cfg_for("sampling.batch_size=3", "sampling.temperature=1.0", "sampling.max_new_tokens=12")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [6], [7, 8, 9, 10]]
    seeds = batch_seeds(cfg.seed, 4, len(prompts), 3)
    rollouts = []
    for k in (1, 2, 3):
        group = RolloutGroup(cfg, [CPU] * k)
        try:
            shards = group.generate_async(prompts, samples=3, seeds=seeds)
            assert len(shards) == 5 and len({s.worker for s in shards}) == k
            rollouts.append(Rollout.concat([ray.get(s.ref) for s in sorted(shards, key=lambda s: s.lo)]))
        finally:
            group.shutdown()
    for other in rollouts[1:]:
        for key in ("response_ids", "step_map", "rollout_logp", "response_mask"):
            assert torch.equal(getattr(rollouts[0], key), getattr(other, key)), key
    assert len({tuple(r) for r in rollouts[0].response_ids.tolist()}) > 5  # the samples of a group differ


def test_a_dead_actor_with_several_queued_batches_is_replaced_once(local_ray):
    cfg = cfg_for("sampling.batch_size=2")
    group = RolloutGroup(cfg, [CPU])
    pool = RewardPool(["length"], num_workers=1)
    try:
        batch = PromptBatch([[5, 6, 7], [8, 9], [10, 11]], ["a", "b", "c"], {})
        seeds = batch_seeds(cfg.seed, 1, 3, 2)
        want, _ = collect(group, pool, group.generate_async(batch.prompt_ids, 2, seeds), batch, 2, Timers(), 0)
        shards = group.generate_async(batch.prompt_ids, 2, seeds)  # three batches queued on the one actor
        ray.kill(group.workers[0])
        got, _ = collect(group, pool, shards, batch, 2, Timers(), 0, max_restarts=1)
        assert group.restarts == 1  # one replacement took all three batches
        assert torch.equal(got.response_ids, want.response_ids) and torch.equal(got.rollout_logp, want.rollout_logp)
    finally:
        group.shutdown()
        pool.shutdown()
