"""Where the learner ranks and rollout actors go (DESIGN §11), as Ray options per actor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from tracerl.registry import Registry

# Where actors go (DESIGN §11). ``separate``: each learner rank and each rollout actor asks for a whole GPU (when
# the cluster has any). ``colocated``: one placement-group bundle per learner rank holds one GPU, shared by that
# rank and one rollout actor (fractional GPUs), so the pair lands on the same device. CPU requests are explicit
# on every actor (a GPU actor otherwise holds a CPU for life and can starve a small machine).


@dataclass
class Placement:
    """Ray options for every actor of a run."""

    learner: list[dict[str, Any]]  # options of learner rank i
    rollout: list[dict[str, Any]]  # options of rollout actor k
    group: Any = None  # the placement group (colocated), kept alive for the run

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


def _resources(custom: dict[str, float]) -> dict[str, Any]:
    """Ray's ``resources`` option for ``cluster.*_resources`` (pins an actor to the nodes that offer them)."""
    return {"resources": {k: float(v) for k, v in custom.items()}} if custom else {}


@PLACEMENTS.register("separate")
def _separate(cfg: Any, gpus: float) -> Placement:
    gpu = 1.0 if gpus > 0 else 0.0
    learner = {"num_cpus": cfg.learner.num_cpus_per_rank, "num_gpus": gpu} | _resources(cfg.cluster.learner_resources)
    rollout = {"num_cpus": cfg.rollout.num_cpus_per_worker, "num_gpus": gpu} | _resources(cfg.cluster.rollout_resources)
    return Placement([learner] * cfg.learner.num_ranks, [rollout] * cfg.rollout.num_workers)


@PLACEMENTS.register("colocated")
def _colocated(cfg: Any, gpus: float) -> Placement:
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpu_l, cpu_r = cfg.learner.num_cpus_per_rank, cfg.rollout.num_cpus_per_worker
    gpu = 1.0 if gpus > 0 else 0.0
    res_l, res_r = cfg.cluster.learner_resources, cfg.cluster.rollout_resources
    custom = {k: float(res_l.get(k, 0) + res_r.get(k, 0)) for k in {*res_l, *res_r}}
    bundle = {"CPU": cpu_l + cpu_r} | ({"GPU": gpu} if gpu else {}) | custom
    pg = placement_group([bundle] * cfg.learner.num_ranks, strategy="PACK")
    ray.get(pg.ready(), timeout=120)

    def opts(i: int, cpus: float, res: dict[str, float]) -> dict[str, Any]:
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        return {"num_cpus": cpus, "num_gpus": gpu / 2, "scheduling_strategy": strategy} | _resources(res)

    return Placement(
        [opts(i, cpu_l, res_l) for i in range(cfg.learner.num_ranks)],
        [opts(i, cpu_r, res_r) for i in range(cfg.rollout.num_workers)],
        pg,
    )
