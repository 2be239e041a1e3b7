"""Run inputs that are valid one by one but wrong for the run: many actors on few cores (a warning before anything
starts), a reward that scores nothing (an error at the first step it shows)."""

from __future__ import annotations

import math

from tracerl.config import Config
from tracerl.reward_service import RewardResult

ACTOR_MB = 430  # what an actor process that imports torch holds before its model (docs: ENV / cluster)


def oversubscription(cfg: Config, cores: int) -> str | None:
    """A warning when a local instance would start more rollout or reward actors than the machine has cores
    (they take turns on the cores: each one costs start-up time and memory and adds no speed); None otherwise.

    Example:
        >>> cfg = Config()
        >>> cfg.reward.num_workers = 16
        >>> oversubscription(cfg, 2).split(":")[0]
        'reward.num_workers=16 on a machine with 2 CPU cores'
    """
    if cfg.cluster.address:
        return None
    counts = (("rollout.num_workers", cfg.rollout.num_workers), ("reward.num_workers", cfg.reward.num_workers))
    crowded = [(name, count) for name, count in counts if count > cores]
    if not crowded:
        return None
    names = " and ".join(f"{name}={count}" for name, count in crowded)
    processes = sum(count for _, count in crowded)
    return (
        f"{names} on a machine with {cores} CPU cores: the actors take turns on the cores, so beyond {cores} each one "
        f"adds start-up time and memory (about {ACTOR_MB} MB per rollout actor before its model, {processes} "
        f"processes in all) and no speed. Use at most {cores} here, or run on a cluster (--ray-address)."
    )


def nothing_scored(scored: RewardResult, step: int, cfg: Config) -> str | None:
    """The error when every sample of an RL step got None from its reward functions (no function failed), so
    nothing can be trained on; None otherwise."""
    if not scored.total or not all(math.isnan(v) for v in scored.total):
        return None
    if any(v for k, v in scored.metrics.items() if k.startswith("reward/errors/")):
        return None  # failures under on_error="nan": counted and logged, not this
    silent = [name for name, values in scored.parts.items() if all(math.isnan(v) for v in values)]
    return (
        f"every sample of RL step {step} was scored None by reward function(s) {silent} ({len(scored.total)} "
        'samples), so there is nothing to train on: None means "cannot score this sample". Check that the '
        f"dataset columns they read hold what they expect (data.answer_column='{cfg.data.answer_column}' of "
        f"data.source '{cfg.data.source}'), or the reward's kwargs."
    )
