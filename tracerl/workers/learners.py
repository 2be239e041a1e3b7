"""The DeepSpeed learner as M Ray actors, one rank each (DESIGN §10-§11); torch and deepspeed are imported inside
the actor only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import ray

from tracerl.workers.common import where


class LearnerFailure(RuntimeError):
    """A learner rank died: a live DeepSpeed group cannot take a new rank, so the whole group must be rebuilt
    (from the latest checkpoint). ``rank``/``pid`` name the dead rank, ``call`` what the driver was waiting for."""

    def __init__(self, rank: int, pid: int | None, call: str, cause: BaseException) -> None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"learner rank {rank} (pid {pid}) died during '{call}' ({first.rstrip('.')})")
        self.rank, self.pid, self.call = rank, pid, call


# The DeepSpeed learner as M Ray actors, one rank each (DESIGN §10-§11): rank 0 picks the rendezvous (its node's
# address and a free port), every rank joins it (gloo on CPU, nccl on GPU), and the group fans every call out to
# all ranks (collectives need them all) and returns rank 0's answer. torch and deepspeed are imported inside the
# actor only.


@ray.remote
class LearnerWorker:
    """One DeepSpeed rank: the policy is loaded from ``cfg.model`` inside the actor and trained by a ``Learner``."""

    def __init__(self, cfg: Any, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.learner: Any = None
        self.weight_group: Any = None

    def where(self) -> dict[str, Any]:
        return where()

    def rendezvous(self) -> tuple[str, int]:
        """(address of this node, a free port on it): rank 0's answer is where every rank meets."""
        from tracerl.learner import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, addr: str, port: int, weights: dict | None, learner_kwargs: dict[str, Any]) -> int:
        """Load the policy (then ``weights`` if given) and join the process group; returns this actor's pid."""
        from tracerl.learner import Learner
        from tracerl.models import load_policy

        policy = load_policy(self.cfg.model)
        if weights is not None:
            policy.model.load_state_dict(weights)
        self.learner = Learner(
            self.cfg, policy, self.rank, self.world_size, master_addr=addr, master_port=port, **learner_kwargs
        )
        return os.getpid()

    def train_step(self, shard: Any) -> dict[str, float]:
        """One RL step on this rank's shard (``records.TrainShard``): the rank builds its own views."""
        return self.learner.train_step(
            shard.rollout, shard.advantages, seed=shard.seed, sample_ids=shard.sample_ids, num_samples=shard.num_samples
        )

    def sft_step(self, views: Any, weights: Any) -> dict[str, float]:
        return self.learner.sft_step(views, weights)

    def packed_weights(self, bucket_mb: int) -> tuple[int, list[Any], list[Any]] | None:
        """(version, bucket layout, flat numpy buckets) from rank 0 (every rank gathers under ZeRO-3)."""
        from tracerl.weight_sync import bucket_layout, pack

        version, weights = self.learner.state_dict_for_rollout()
        if self.rank != 0:
            return None
        layout = bucket_layout(weights, bucket_mb * 2**20)
        return version, layout, pack(weights, layout)

    def get_weights(self) -> tuple[int, dict | None]:
        """Every rank gathers (ZeRO-3); only rank 0 ships the weights back."""
        version, weights = self.learner.state_dict_for_rollout()
        return version, weights if self.rank == 0 else None

    def version(self) -> tuple[int, None]:
        return self.learner.version, None

    def sync_layout(self, bucket_mb: int) -> list[Any]:
        from tracerl.weight_sync import bucket_layout

        _, weights = self.learner.state_dict_for_rollout()
        return bucket_layout(weights, bucket_mb * 2**20)

    def join_weight_group(self, addr: str, port: int, size: int, backend: str) -> None:
        """Rank 0 only: host the weight-sync group (rank 0 of it) beside the DeepSpeed group."""
        from tracerl.weight_sync import new_group

        self.weight_group = new_group(backend, addr, port, 0, size)
        self.weight_device = "cuda" if backend == "nccl" else "cpu"

    def broadcast_weights(self) -> int:
        """Every rank gathers (ZeRO-3); rank 0 broadcasts to the rollout actors. Returns the bytes sent."""
        from tracerl.weight_sync import bucket_layout, send_state

        _, weights = self.learner.state_dict_for_rollout()
        if self.rank != 0:
            return 0
        layout = bucket_layout(weights, self.cfg.rollout.sync_bucket_mb * 2**20)
        return send_state(self.weight_group, weights, layout, self.weight_device)

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)

    def save_hf(self, directory: str) -> None:
        self.learner.save_hf(directory)

    def destroy(self) -> None:
        if self.learner is not None:
            self.learner.destroy()
            self.learner = None


class LearnerGroup:
    """``num_ranks`` learner actors behind one handle; every method runs on all ranks and returns rank 0's result.

    Args:
        cfg: the run config (``cfg.model`` is loaded in every actor; ``cfg.learner`` configures the engines).
        num_ranks: DeepSpeed ranks M (default ``cfg.learner.num_ranks``).
        weights: initial policy weights for every rank (default: what ``cfg.model`` loads).
        num_cpus_per_rank, num_gpus_per_rank: Ray resources of each actor (GPUs default to 1 when the cluster
            has any, else 0).
        learner_kwargs: extra ``Learner`` arguments (e.g. ``lr``, ``total_steps`` for SFT).
        options: Ray options per rank (``place(cfg, gpus).learner``); overrides the three resource arguments.

    Example:
        >>> group = LearnerGroup(cfg, num_ranks=2)                      # doctest: +SKIP
        >>> metrics = group.train_step(rollout, advantages, seed=7)    # doctest: +SKIP
        >>> version, weights = group.get_weights()                     # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: Any,
        num_ranks: int | None = None,
        *,
        weights: dict | None = None,
        num_cpus_per_rank: float = 1.0,
        num_gpus_per_rank: float | None = None,
        learner_kwargs: dict[str, Any] | None = None,
        options: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        n = len(options) if options is not None else num_ranks or cfg.learner.num_ranks
        if options is None:
            if num_gpus_per_rank is None:
                num_gpus_per_rank = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            options = [{"num_cpus": num_cpus_per_rank, "num_gpus": num_gpus_per_rank}] * n
        self.workers = [LearnerWorker.options(**options[rank]).remote(cfg, rank, n) for rank in range(n)]
        self.bucket_mb = cfg.rollout.sync_bucket_mb
        self.pids: list[int | None] = [None] * n
        self.shard_bytes: list[int] = []  # tensor bytes each rank received for the last RL step
        addr, port = self.gather([self.workers[0].rendezvous.remote()], "rendezvous")[0]
        shared = ray.put(weights)
        setups = [w.setup.remote(addr, port, shared, learner_kwargs or {}) for w in self.workers]
        self.pids = self.gather(setups, "setup")

    def __len__(self) -> int:
        return len(self.workers)

    def where(self) -> list[dict[str, Any]]:
        """Where each rank runs (pid, node, GPU ids)."""
        return self.gather([w.where.remote() for w in self.workers], "where")

    def _all(self, method: str, *args: Any) -> Any:
        refs = [ray.put(a) if a is not None and not isinstance(a, str) else a for a in args]  # one copy for all
        return self.gather([getattr(w, method).remote(*refs) for w in self.workers], method)[0]

    def gather(self, refs: list[ray.ObjectRef], call: str) -> list[Any]:
        """The results of one call on every rank (``refs[i]`` from rank i), failing as soon as any rank fails: a
        dead rank raises ``LearnerFailure`` at once, even while the others wait for it in a collective."""
        pending = list(refs)
        with self.watch(call):
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)  # raises this rank's error now, not after the slowest rank
            return ray.get(refs)

    @contextlib.contextmanager
    def watch(self, call: str) -> Any:
        """Turn a Ray error raised inside the block into ``LearnerFailure`` when a learner rank is dead (a rank's
        own death, or the error a surviving rank or a rollout actor sees because of it)."""
        try:
            yield
        except LearnerFailure:
            raise
        except ray.exceptions.RayError as err:
            dead = self.dead_rank()
            if dead is None:
                raise
            raise LearnerFailure(dead, self.pids[dead], call, err) from err

    def dead_rank(self, timeout_s: float = 10.0) -> int | None:
        """The first rank whose actor is dead, or None (a rank busy in a collective counts as alive)."""
        pings = [w.where.remote() for w in self.workers]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        for rank, ping in enumerate(pings):
            if ping in ready:
                try:
                    ray.get(ping)
                except ray.exceptions.RayActorError:
                    return rank
        return None

    def train_step(self, rollout: Any, advantages: Any, seed: int = 0) -> dict[str, float]:
        """One RL step: each rank gets its data-parallel shard of the kept ``rollout`` and ``advantages`` (one
        object-store copy per rank, never the views) and builds its own training views (view seed ``seed``);
        returns rank 0's metrics, which cover every rank."""
        from tracerl.records import shard_step

        shards = shard_step(rollout, advantages, len(self.workers), seed)
        self.shard_bytes = [shard.nbytes() for shard in shards]
        refs = [w.train_step.remote(ray.put(shard)) for w, shard in zip(self.workers, shards, strict=True)]
        return self.gather(refs, "train_step")[0]

    def sft_step(self, views: Any, weights: Any) -> dict[str, float]:
        return self._all("sft_step", views, weights)

    def get_weights(self) -> tuple[int, dict]:
        """(version, full policy weights on CPU), gathered across ranks under ZeRO-3."""
        return self._all("get_weights")

    def save(self, directory: str | os.PathLike) -> None:
        """Every rank writes its part of the engine state under ``directory`` (a filesystem all ranks share)."""
        self._all("save", os.fspath(directory))

    def load(self, directory: str | os.PathLike) -> None:
        self._all("load", os.fspath(directory))

    def save_hf(self, directory: str | os.PathLike) -> None:
        """The policy as a Hugging Face directory, written by rank 0 (see ``checkpoint.export_hf``)."""
        self._all("save_hf", os.fspath(directory))

    def shutdown(self, force: bool = False) -> None:
        """Release the engines and end the actors (``force``: end them at once, e.g. after a rank died and the
        others may be stuck in a collective)."""
        if not force:
            with contextlib.suppress(Exception):
                ray.get([w.destroy.remote() for w in self.workers], timeout=120)
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
        self.workers = []

    # -- weight sync ------------------------------------------------------------------------------------------

    def version(self) -> int:
        """Learner updates behind the current weights."""
        return int(self.gather([self.workers[0].version.remote()], "version")[0][0])

    def publish_weights(self) -> tuple[int, ray.ObjectRef]:
        """(version, a reference to rank 0's gathered weights in the object store): every rank gathers (ZeRO-3),
        the weights are stored once and never pass through the driver."""
        refs = [w.packed_weights.remote(self.bucket_mb) for w in self.workers]
        self.gather(refs[1:], "packed_weights")  # rank 0's failure surfaces in the loads (the sync watches them)
        return self.version(), refs[0]

    def sync_layout(self, bucket_mb: int) -> list[Any]:
        """The bucket layout of a collective sync (gathered once; every rank takes part under ZeRO-3)."""
        return self.gather([w.sync_layout.remote(bucket_mb) for w in self.workers], "sync_layout")[0]

    def join_weight_group(self, size: int, backend: str) -> tuple[list[ray.ObjectRef], str, int]:
        """Rank 0 hosts a weight-sync group of ``size`` members; returns (its pending join, address, port) so the
        rollout actors can join while it waits for them."""
        addr, port = self.gather([self.workers[0].rendezvous.remote()], "rendezvous")[0]
        return [self.workers[0].join_weight_group.remote(addr, port, size, backend)], addr, port

    def broadcast_weights(self) -> list[ray.ObjectRef]:
        """Start a collective sync: every rank gathers, rank 0 broadcasts; resolve together with the receivers."""
        return [w.broadcast_weights.remote() for w in self.workers]
