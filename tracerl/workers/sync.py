"""Weight sync learner → rollout actors after every update (DESIGN §11), chosen by ``rollout.sync``."""

from __future__ import annotations

from collections.abc import Callable

from tracerl.registry import Registry
from tracerl.workers.learners import LearnerGroup
from tracerl.workers.rollout import RolloutGroup

# After every learner update (DESIGN §11): ``sync(learner, rollout)`` → (version now on every actor, bytes each
# actor received). Never a checkpoint reload from disk.

WEIGHT_SYNC: Registry[Callable[[LearnerGroup, RolloutGroup], tuple[int, int]]] = Registry("weight sync")


@WEIGHT_SYNC.register("object_store")
def sync_object_store(learner: LearnerGroup, rollout: RolloutGroup) -> tuple[int, int]:
    """One copy of the gathered weights in the object store (rank 0's return value), K loads."""
    version, published = learner.publish_weights()
    with learner.watch("weight sync"):  # a rank that died while packing fails the actors' loads
        return version, rollout.load_weights(version, published)


@WEIGHT_SYNC.register("collective")
def sync_collective(learner: LearnerGroup, rollout: RolloutGroup) -> tuple[int, int]:
    """A bucketed broadcast from learner rank 0 to the rollout actors (gloo on CPU, nccl on GPU)."""
    version = learner.version()
    with learner.watch("weight sync"):
        return version, rollout.sync_collective(learner, version)
