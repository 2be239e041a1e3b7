"""Where the learner ranks, rollout actors and reward-model actors go (DESIGN §11, §19), as Ray options per actor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from tracerl.config import RewardModelConfig, reward_model_workers
from tracerl.registry import Registry
from tracerl.reward_resolve import default_name, reward_kind, specs_from_config

# Where actors go (DESIGN §11). ``separate``: each learner rank and each rollout actor asks for a whole GPU (when
# the cluster has any). ``colocated``: one placement-group bundle per learner rank holds one GPU, shared by that
# rank and one rollout actor (fractional GPUs), so the pair lands on the same device. CPU requests are explicit
# on every actor (a GPU actor otherwise holds a CPU for life and can starve a small machine).
# A reward model (``model.placement``) goes on GPUs of its own (``separate``), on CPU, or ``colocated``: one actor
# beside each rollout actor, taking ``gpu_fraction`` of its GPU (the rollout actor asks for that much less).


@dataclass
class Placement:
    """Ray options for every actor of a run."""

    learner: list[dict[str, Any]]  # options of learner rank i
    rollout: list[dict[str, Any]]  # options of rollout actor k
    group: Any = None  # the placement group (colocated), kept alive for the run
    reward_models: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # model name → options of actor j

    def remove(self) -> None:
        if self.group is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.group)
            self.group = None


PLACEMENTS: Registry[Callable[[Any, float], Placement]] = Registry("placement")


def place(cfg: Any, gpus: float) -> Placement:
    """Ray options of the run's learner ranks and rollout actors (``rollout.placement``) on a cluster with ``gpus``
    GPUs in all."""
    return PLACEMENTS.lookup(cfg.rollout.placement)(cfg, gpus)


def reward_models(cfg: Any) -> list[tuple[str, RewardModelConfig]]:
    """(name, settings) of the run's reward-model entries, in ``reward.functions`` order."""
    return [
        (default_name(spec), spec.model or RewardModelConfig())
        for spec in specs_from_config(cfg.reward)
        if reward_kind(spec) == "model"
    ]


def colocated_share(cfg: Any, gpus: float) -> float:
    """The share of each rollout actor's GPU that the colocated reward models take (0 without GPUs)."""
    return sum(m.gpu_fraction for _, m in reward_models(cfg) if m.placement == "colocated") if gpus > 0 else 0.0


def reward_model_options(cfg: Any, gpus: float, group: Any = None) -> dict[str, list[dict[str, Any]]]:
    """Ray options of every reward-model actor: ``cpu``; ``separate`` (a whole GPU each, when the cluster has any);
    ``colocated`` (``gpu_fraction`` of a GPU, in rollout actor j's placement-group bundle when ``group`` is given).
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    out = {}
    for name, m in reward_models(cfg):
        n = reward_model_workers(m, cfg.rollout.num_workers)
        gpu = {"cpu": 0.0, "separate": 1.0, "colocated": m.gpu_fraction}[m.placement] if gpus > 0 else 0.0
        options = [{"num_cpus": m.num_cpus, "num_gpus": gpu} for _ in range(n)]
        if m.placement == "colocated" and group is not None:
            for j, o in enumerate(options):
                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=j)
        out[name] = options
    return out


def _resources(custom: dict[str, float]) -> dict[str, Any]:
    """Ray's ``resources`` option for ``cluster.*_resources`` (pins an actor to the nodes that offer them)."""
    return {"resources": {k: float(v) for k, v in custom.items()}} if custom else {}


@PLACEMENTS.register("separate")
def _separate(cfg: Any, gpus: float) -> Placement:
    gpu = 1.0 if gpus > 0 else 0.0
    learner = {"num_cpus": cfg.learner.num_cpus_per_rank, "num_gpus": gpu} | _resources(cfg.cluster.learner_resources)
    rollout = {"num_cpus": cfg.rollout.num_cpus_per_worker, "num_gpus": gpu - colocated_share(cfg, gpus)}
    rollout |= _resources(cfg.cluster.rollout_resources)
    return Placement(
        [learner] * cfg.learner.num_ranks, [rollout] * cfg.rollout.num_workers, None, reward_model_options(cfg, gpus)
    )


@PLACEMENTS.register("colocated")
def _colocated(cfg: Any, gpus: float) -> Placement:
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpu_l, cpu_r = cfg.learner.num_cpus_per_rank, cfg.rollout.num_cpus_per_worker
    gpu = 1.0 if gpus > 0 else 0.0
    res_l, res_r = cfg.cluster.learner_resources, cfg.cluster.rollout_resources
    custom = {k: float(res_l.get(k, 0) + res_r.get(k, 0)) for k in {*res_l, *res_r}}
    cpu_m = sum(m.num_cpus for _, m in reward_models(cfg) if m.placement == "colocated")  # beside rollout actor i
    bundle = {"CPU": cpu_l + cpu_r + cpu_m} | ({"GPU": gpu} if gpu else {}) | custom
    pg = placement_group([bundle] * cfg.learner.num_ranks, strategy="PACK")
    ray.get(pg.ready(), timeout=120)

    def opts(i: int, cpus: float, share: float, res: dict[str, float]) -> dict[str, Any]:
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        return {"num_cpus": cpus, "num_gpus": share, "scheduling_strategy": strategy} | _resources(res)

    rollout_share = gpu / 2 - colocated_share(cfg, gpus)
    return Placement(
        [opts(i, cpu_l, gpu / 2, res_l) for i in range(cfg.learner.num_ranks)],
        [opts(i, cpu_r, rollout_share, res_r) for i in range(cfg.rollout.num_workers)],
        pg,
        reward_model_options(cfg, gpus, pg),
    )
