"""Ray actors and the groups that drive them (DESIGN §11); with the orchestrator the only importer of ray.

- ``rewards``   RewardWorker / RewardPool: reward scoring on CPU actors
- ``learners``  LearnerWorker / LearnerGroup: the DeepSpeed ranks
- ``rollout``   RolloutWorker / RolloutGroup: policy copies with the sampler, version-stamped shards
- ``placement`` PLACEMENTS: separate or colocated GPUs, explicit CPU requests
- ``sync``      WEIGHT_SYNC: object store or collective broadcast

Keep torch imports inside the actors that need it (rollout, learner), never at module level: each process that
imports torch costs ~430 MB, and reward actors must stay light.
"""

from tracerl.workers.learners import LearnerFailure, LearnerGroup, LearnerWorker
from tracerl.workers.placement import PLACEMENTS, Placement, place
from tracerl.workers.rewards import RewardPool, RewardWorker
from tracerl.workers.rollout import RolloutGroup, RolloutShard, RolloutWorker
from tracerl.workers.sync import WEIGHT_SYNC, sync_collective, sync_object_store

__all__ = [
    "PLACEMENTS",
    "WEIGHT_SYNC",
    "LearnerFailure",
    "LearnerGroup",
    "LearnerWorker",
    "Placement",
    "RewardPool",
    "RewardWorker",
    "RolloutGroup",
    "RolloutShard",
    "RolloutWorker",
    "place",
    "sync_collective",
    "sync_object_store",
]
