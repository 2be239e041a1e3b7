"""Placement of learner ranks and rollout actors on GPUs, scheduled on Ray's fake GPUs (no CUDA needed)."""

from __future__ import annotations

import pytest

from tracerl.checks import load_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

from tracerl.workers import LearnerWorker, RolloutWorker, place  # noqa: E402


@pytest.fixture(scope="module")
def fake_gpus():  # noqa: ANN201
    ray.init(address="local", num_cpus=8, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def start(options: list[dict], actor_cls: type, cfg) -> list:  # noqa: ANN001
    extra = [len(options)] if actor_cls is LearnerWorker else []
    return [actor_cls.options(**o).remote(cfg, i, *extra) for i, o in enumerate(options)]


def gpu_ids(actors: list) -> list[list[str]]:
    return [ray.get(a.where.remote())["gpu_ids"] for a in actors]


@pytest.fixture
def actors():  # noqa: ANN201
    """Actors started by a test, all alive until its end (so none frees a GPU for the next to take)."""
    started: list = []
    yield started
    for a in started:
        ray.kill(a)


def test_separate_placement_gives_every_actor_its_own_gpu(fake_gpus, actors):
    cfg = load_config(None, ["cluster.gpus_per_node=4", "learner.num_ranks=2", "rollout.num_workers=2"])
    p = place(cfg, gpus=4)
    actors += start(p.learner, LearnerWorker, cfg) + start(p.rollout, RolloutWorker, cfg)
    learner, rollout = gpu_ids(actors[:2]), gpu_ids(actors[2:])
    ids = [g for gpus in learner + rollout for g in gpus]
    assert all(len(g) == 1 for g in learner + rollout) and len(set(ids)) == 4


def test_colocated_placement_pairs_each_rollout_actor_with_a_learner_rank(fake_gpus, actors):
    cfg = load_config(None, ["cluster.gpus_per_node=2", "rollout.placement=colocated", "learner.num_ranks=2",
                             "rollout.num_workers=0"])  # fmt: skip
    assert cfg.rollout.num_workers == 2  # auto: one rollout actor beside each learner rank
    p = place(cfg, gpus=4)
    try:
        actors += start(p.learner, LearnerWorker, cfg) + start(p.rollout, RolloutWorker, cfg)
        learner, rollout = gpu_ids(actors[:2]), gpu_ids(actors[2:])
        assert learner == rollout  # rank i and rollout actor i share one GPU
        assert len({g[0] for g in learner}) == 2
    finally:
        p.remove()


def test_auto_counts_split_the_declared_cluster():
    cfg = load_config(None, ["cluster.gpus_per_node=8", "learner.num_ranks=0", "rollout.num_workers=0"])
    assert (cfg.learner.num_ranks, cfg.rollout.num_workers) == (4, 4)
    cfg = load_config(None, ["cluster.gpus_per_node=8", "cluster.num_nodes=2", "rollout.placement=colocated",
                             "learner.num_ranks=0", "rollout.num_workers=0"])  # fmt: skip
    assert (cfg.learner.num_ranks, cfg.rollout.num_workers) == (16, 16)


def reward_model_gpus(cfg, p, path) -> list[list[str]]:  # noqa: ANN001
    """Start the run's reward pool with the placement's options; the GPU ids of each reward-model actor."""
    from tracerl.orchestrator.setup import reward_pool

    pool = reward_pool(cfg, p.reward_models)
    try:
        return [ray.get(a.info.remote())["gpu_ids"] for a in pool.model_workers["rm"]]
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_a_reward_model_gets_its_own_gpus_or_shares_each_rollout_actors(fake_gpus, actors, tmp_path):
    from .conftest import save_tiny_classifier

    rm = save_tiny_classifier(tmp_path / "rm")
    entry = f"reward.functions=[{{fn: {rm}, name: rm, model: {{placement: %s}}}}]"
    own = load_config(None, ["cluster.gpus_per_node=4", "learner.num_ranks=1", "rollout.num_workers=2",
                             entry % "separate"])  # fmt: skip
    p = place(own, gpus=4)
    assert p.rollout[0]["num_gpus"] == 1.0 and p.reward_models["rm"] == [{"num_cpus": 1.0, "num_gpus": 1.0}]
    actors += start(p.learner, LearnerWorker, own) + start(p.rollout, RolloutWorker, own)
    taken = {g for gpus in gpu_ids(actors) for g in gpus}
    [mine] = reward_model_gpus(own, p, tmp_path)
    assert len(taken) == 3 and len(mine) == 1 and mine[0] not in taken  # the fourth GPU, its own

    for a in actors:
        ray.kill(a)
    actors.clear()
    shared = load_config(None, ["cluster.gpus_per_node=4", "learner.num_ranks=2", "rollout.num_workers=2",
                                entry % "colocated"])  # fmt: skip
    p = place(shared, gpus=4)
    assert [o["num_gpus"] for o in p.rollout] == [0.75, 0.75]  # each leaves the reward model's share
    assert [o["num_gpus"] for o in p.reward_models["rm"]] == [0.25, 0.25]  # one beside each rollout actor
    actors += start(p.learner, LearnerWorker, shared) + start(p.rollout, RolloutWorker, shared)
    rollout = gpu_ids(actors[2:])
    assert sorted(reward_model_gpus(shared, p, tmp_path)) == sorted(rollout)  # on the rollout actors' GPUs
    with pytest.raises(Exception, match="model.num_workers \\(1\\) must equal rollout.num_workers \\(2\\)"):
        load_config(None, ["rollout.num_workers=2", entry.replace("placement: %s", "num_workers: 1")])
