"""Ray actors and the groups that drive them (DESIGN §11); with orchestrator.py the only importer of ray.

Reward scoring: a pool of CPU actors, each running a ``RewardService``, so scoring uses many cores and the driver
stays free (``score_async`` returns futures). A worker that dies is replaced and its shard redone.

Keep torch imports inside the actors that need it (rollout, learner), never at the top of this module: each
process that imports torch costs ~430 MB, and reward actors must stay light.

dims: N samples · W reward workers
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import ray
from ray.exceptions import RayActorError, RayTaskError

from tracerl.registry import Registry
from tracerl.reward_service import (
    RewardError,
    RewardResult,
    RewardService,
    RewardSpec,
    merge_results,
    prepare_process,
    resolve_reward,
)


@ray.remote
class RewardWorker:
    """One ``RewardService`` in a CPU actor (no torch).

    A service that cannot start (a bad spec, a module of ``imports`` that fails, the sandbox below its minimum
    isolation) is not a crash to restart: the error is kept and raised by ``ready`` and every ``score``.
    """

    def __init__(
        self,
        specs: list[RewardSpec],
        on_error: str,
        timeout_s: float,
        imports: Sequence[str] = (),
        sandbox: dict[str, Any] | None = None,
        search_paths: Sequence[str] = (),
    ) -> None:
        self.service: RewardService | None = None
        self.start_error: Exception | None = None
        try:
            sys.path[:0] = [p for p in search_paths if p not in sys.path]  # where the driver found `imports`
            self.service = RewardService(
                specs, on_error=on_error, timeout_s=timeout_s, imports=imports, sandbox=sandbox
            )
        except Exception as err:  # noqa: BLE001 - reported by ready(), with its own message
            self.start_error = err

    def ready(self) -> int:
        """This actor's pid once its service is up; raises the error that stopped it from starting."""
        if self.start_error is not None:
            raise self.start_error
        return os.getpid()

    def score(
        self, prompts: list, completions: list, completion_ids: list | None, columns: dict[str, list]
    ) -> RewardResult:
        self.ready()
        return self.service.score(prompts, completions, completion_ids, columns)

    def info(self) -> dict[str, Any]:
        """pid and whether torch got imported (it should not)."""
        return {"pid": os.getpid(), "torch_imported": "torch" in sys.modules}


@dataclass
class _Shard:
    worker: int  # index into the pool's workers
    actor: Any  # the actor handle it was sent to (to tell a dead worker from its replacement)
    offset: int  # index of the shard's first sample in the batch
    args: tuple  # (prompts, completions, completion_ids, columns) of the shard


class RewardPool:
    """``num_workers`` reward actors; a batch is split into contiguous shards, one per worker, merged in order.

    Args:
        specs: reward functions, as for ``RewardService`` (resolved here first, so bad specs fail at once).
        num_workers: actors W; each reserves ``num_cpus_per_worker`` Ray CPUs.
        on_error, timeout_s: the ``RewardService`` error policy and per-call timeout.
        max_restarts: how often one shard may be redone after its worker died before giving up.
        imports: modules imported in the driver and every worker before reward names are resolved.
        sandbox: the code sandbox policy of every worker (``rewards.sandbox.configure`` arguments).

    Raises:
        RewardError: a worker could not start its service (raised at once, with the worker's own error).
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec | str | Callable[..., Any]],
        num_workers: int = 2,
        on_error: Literal["raise", "nan"] = "raise",
        timeout_s: float = 30.0,
        num_cpus_per_worker: float = 1.0,
        max_restarts: int = 3,
        imports: Sequence[str] = (),
        sandbox: dict[str, Any] | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}.")
        prepare_process(imports, sandbox)
        self.specs = [_portable(s if isinstance(s, RewardSpec) else RewardSpec(s)) for s in specs]
        self.names = [spec.name or resolve_reward(spec.fn, timeout_s)[0] for spec in self.specs]
        self.on_error, self.timeout_s, self.max_restarts = on_error, timeout_s, max_restarts
        self._options = {"num_cpus": num_cpus_per_worker}
        self._setup = (list(imports), sandbox, _search_paths(imports))
        self.workers = [self._start() for _ in range(num_workers)]
        self.restarts = 0  # workers replaced so far
        self._pending: dict[Any, _Shard] = {}
        try:
            _started(self.workers)
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> Any:
        return RewardWorker.options(**self._options).remote(self.specs, self.on_error, self.timeout_s, *self._setup)

    def score_async(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        columns: dict[str, Sequence[Any]] | None = None,
    ) -> list[ray.ObjectRef]:
        """Send the shards; returns one future per shard. Collect them with ``gather`` (which redoes shards of
        workers that died)."""
        n = len(completions)
        columns = columns or {}
        refs = []
        for w, (lo, hi) in enumerate(_split(n, len(self.workers))):
            args = (
                list(prompts[lo:hi]),
                list(completions[lo:hi]),
                None if completion_ids is None else list(completion_ids[lo:hi]),
                {k: list(v[lo:hi]) for k, v in columns.items()},
            )
            actor = self.workers[w]
            ref = actor.score.remote(*args)
            self._pending[ref] = _Shard(w, actor, lo, args)
            refs.append(ref)
        return refs

    def gather(self, refs: Sequence[ray.ObjectRef]) -> RewardResult:
        """The merged result of ``score_async``'s futures, in sample order.

        Raises:
            RewardError: a reward function failed (on_error="raise"); the index counts from the batch start.
        """
        results = [self._get(ref, self._pending.pop(ref)) for ref in refs]
        if not results:
            return merge_results([RewardResult([], {name: [] for name in self.names}, {})])
        return merge_results(results)

    def score(self, *args: Any, **kwargs: Any) -> RewardResult:
        """``gather(score_async(...))``."""
        return self.gather(self.score_async(*args, **kwargs))

    def shutdown(self) -> None:
        for actor in self.workers:
            ray.kill(actor)
        self.workers = []

    def _get(self, ref: Any, shard: _Shard) -> RewardResult:
        last = ""
        for _ in range(self.max_restarts + 1):
            try:
                return ray.get(ref)
            except RayActorError as err:  # the worker died (killed, crashed, out of memory): replace it, redo
                last = _first_lines(str(err))
                self._replace(shard)
                shard = replace(shard, actor=self.workers[shard.worker])
                ref = shard.actor.score.remote(*shard.args)
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, RewardError):
                    if cause.timed_out:  # its abandoned thread may still burn a core: start a fresh worker
                        self._replace(shard)
                    raise cause.shifted(shard.offset) from None
                raise
        hi = shard.offset + len(shard.args[1])
        raise RuntimeError(
            f"reward worker {shard.worker} died {self.max_restarts + 1} times while scoring samples "
            f"{shard.offset}..{hi - 1}; giving up. Last error: {last}"
        )

    def _replace(self, shard: _Shard) -> None:
        if self.workers[shard.worker] is not shard.actor:
            return  # already replaced for another shard of the same dead worker
        with contextlib.suppress(Exception):  # it may be gone already
            ray.kill(shard.actor)
        self.workers[shard.worker] = self._start()
        self.restarts += 1
        _started([self.workers[shard.worker]])


def _started(actors: Sequence[Any]) -> None:
    """Wait until every actor's service is up; a start failure is raised at once, not retried as a crash."""
    try:
        ray.get([actor.ready.remote() for actor in actors])
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, RewardError):
            raise RewardError(f"a reward worker could not start: {cause}") from None
        raise RewardError(f"a reward worker could not start: {_first_lines(str(cause or err))}") from None
    except RayActorError as err:
        raise RuntimeError(f"a reward worker died while starting: {_first_lines(str(err))}") from None


def _first_lines(text: str, limit: int = 600) -> str:
    return " ".join(text.strip().split())[:limit]


def _search_paths(imports: Sequence[str]) -> list[str]:
    """The sys.path folders the driver imported ``imports`` from (workers may start elsewhere)."""
    paths = []
    for name in imports:
        module = sys.modules.get(name.split(".")[0])
        origin = getattr(module, "__file__", None)
        if origin is None:
            continue
        depth = 2 if os.path.basename(origin) == "__init__.py" else 1
        folder = os.path.abspath(origin)
        for _ in range(depth):
            folder = os.path.dirname(folder)
        if folder not in paths:
            paths.append(folder)
    return paths


def _where() -> dict[str, Any]:
    """Where the calling actor runs: pid, Ray node id, the GPU ids Ray gave it."""
    return {
        "pid": os.getpid(),
        "node": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges covering 0..n, sizes differing by at most one; empty ranges dropped."""
    base, extra = divmod(n, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        if hi > lo:
            bounds.append((lo, hi))
        lo = hi
    return bounds


def _portable(spec: RewardSpec) -> RewardSpec:
    """Make a file spec's path absolute: actors may run in another working directory."""
    if isinstance(spec.fn, str) and ":" in spec.fn and not spec.fn.startswith(("http://", "https://")):
        location, attr = spec.fn.rsplit(":", 1)
        if location.endswith(".py") or "/" in location:
            return replace(spec, fn=f"{os.path.abspath(location)}:{attr}")
    return spec


# =================================================================================================== learner ranks
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
        return _where()

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

    def train_step(self, rollout: Any, advantages: Any, views: Any) -> dict[str, float]:
        return self.learner.train_step(rollout, advantages, views)

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
        >>> metrics = group.train_step(rollout, advantages, views)     # doctest: +SKIP
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
        addr, port = ray.get(self.workers[0].rendezvous.remote())
        shared = ray.put(weights)
        self.pids = ray.get([w.setup.remote(addr, port, shared, learner_kwargs or {}) for w in self.workers])

    def __len__(self) -> int:
        return len(self.workers)

    def _all(self, method: str, *args: Any) -> Any:
        refs = [ray.put(a) if a is not None and not isinstance(a, str) else a for a in args]  # one copy for all
        return ray.get([getattr(w, method).remote(*refs) for w in self.workers])[0]

    def train_step(self, rollout: Any, advantages: Any, views: Any) -> dict[str, float]:
        """One RL step on every rank (each trains its share of every minibatch); rank 0's metrics."""
        return self._all("train_step", rollout, advantages, views)

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

    def shutdown(self) -> None:
        """Release the engines and end the actors."""
        with contextlib.suppress(Exception):
            ray.get([w.destroy.remote() for w in self.workers])
        for w in self.workers:
            ray.kill(w)
        self.workers = []

    # -- weight sync ------------------------------------------------------------------------------------------

    def version(self) -> int:
        """Learner updates behind the current weights."""
        return int(ray.get(self.workers[0].version.remote())[0])

    def publish_weights(self) -> tuple[int, ray.ObjectRef]:
        """(version, a reference to rank 0's gathered weights in the object store): every rank gathers (ZeRO-3),
        the weights are stored once and never pass through the driver."""
        refs = [w.packed_weights.remote(self.bucket_mb) for w in self.workers]
        ray.get(refs[1:])
        return self.version(), refs[0]

    def sync_layout(self, bucket_mb: int) -> list[Any]:
        """The bucket layout of a collective sync (gathered once; every rank takes part under ZeRO-3)."""
        return ray.get([w.sync_layout.remote(bucket_mb) for w in self.workers])[0]

    def join_weight_group(self, size: int, backend: str) -> tuple[list[ray.ObjectRef], str, int]:
        """Rank 0 hosts a weight-sync group of ``size`` members; returns (its pending join, address, port) so the
        rollout actors can join while it waits for them."""
        addr, port = ray.get(self.workers[0].rendezvous.remote())
        return [self.workers[0].join_weight_group.remote(addr, port, size, backend)], addr, port

    def broadcast_weights(self) -> list[ray.ObjectRef]:
        """Start a collective sync: every rank gathers, rank 0 broadcasts; resolve together with the receivers."""
        return [w.broadcast_weights.remote() for w in self.workers]


# =================================================================================================== placement
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


@PLACEMENTS.register("separate")
def _separate(cfg: Any, gpus: float) -> Placement:
    gpu = 1.0 if gpus > 0 else 0.0
    return Placement(
        [{"num_cpus": cfg.learner.num_cpus_per_rank, "num_gpus": gpu}] * cfg.learner.num_ranks,
        [{"num_cpus": cfg.rollout.num_cpus_per_worker, "num_gpus": gpu}] * cfg.rollout.num_workers,
    )


@PLACEMENTS.register("colocated")
def _colocated(cfg: Any, gpus: float) -> Placement:
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpu_l, cpu_r = cfg.learner.num_cpus_per_rank, cfg.rollout.num_cpus_per_worker
    gpu = 1.0 if gpus > 0 else 0.0
    bundle = {"CPU": cpu_l + cpu_r} | ({"GPU": gpu} if gpu else {})
    pg = placement_group([bundle] * cfg.learner.num_ranks, strategy="PACK")
    ray.get(pg.ready(), timeout=120)

    def opts(i: int, cpus: float) -> dict[str, Any]:
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        return {"num_cpus": cpus, "num_gpus": gpu / 2, "scheduling_strategy": strategy}

    return Placement(
        [opts(i, cpu_l) for i in range(cfg.learner.num_ranks)],
        [opts(i, cpu_r) for i in range(cfg.rollout.num_workers)],
        pg,
    )


# =================================================================================================== rollout
# K rollout actors, each a policy copy in inference mode (dtype rollout.dtype) with the sampler (DESIGN §11). A
# batch of prompts is split into whole groups across the actors; each returns its Rollout shard through the
# object store, stamped with the weights version it was sampled with.


@ray.remote
class RolloutWorker:
    """One policy copy and the sampler; weights arrive from the learner, versioned."""

    def __init__(self, cfg: Any, index: int) -> None:
        self.cfg, self.index = cfg, index
        self.policy: Any = None
        self.version = 0  # learner updates behind the weights this copy holds
        self.weight_group: Any = None
        self.device = "cpu"

    def setup(self, weights: tuple[int, dict] | None = None) -> dict[str, Any]:
        """Load the policy copy (then ``weights`` = (version, state dict) if given); returns what the driver needs
        to know about the policy and where this actor runs."""
        import torch

        from tracerl.models import load_policy

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        policy = load_policy(replace(self.cfg.model, dtype=self.cfg.rollout.dtype))
        policy.model.to(self.device).eval().requires_grad_(False)
        self.policy = policy
        if weights is not None:
            self.load_weights(weights)
        return {
            "mask_id": policy.mask_id,
            "shift": policy.shift,
            "block_size": policy.block_size,
            "family": policy.family,
            "eos_id": policy.eos_id,
            **_where(),
            "parameters": sum(p.numel() for p in policy.model.parameters()),
        }

    def where(self) -> dict[str, Any]:
        return _where()

    def generate(self, prompt_ids: list[list[int]], group: Any, seed: int, sampling: Any = None) -> Any:
        """Sample one response per prompt (repeated for groups); the Rollout carries this copy's version."""
        import torch

        from tracerl.sampling import generate

        with torch.inference_mode():
            rollout = generate(self.policy, prompt_ids, sampling or self.cfg.sampling, seed=seed, group=group)
        rollout.weights_version = self.version
        return rollout

    def load_weights(self, published: tuple[int, list[Any], list[Any]]) -> int:
        """Object-store path: (version, layout, packed buckets) from ``LearnerWorker.packed_weights``; the
        weights are copied (and cast) in. Returns the bytes received."""
        from tracerl.weight_sync import layout_bytes, unpack

        version, layout, flats = published
        self.policy.model.load_state_dict(unpack(layout, flats))
        self.version = int(version)
        return layout_bytes(layout)

    def load_weights_from(self, directory: str, version: int) -> int:
        """Reload the weights from a Hugging Face directory (the anchors' per-step path; benchmarks compare)."""
        from safetensors.torch import load_file

        files = sorted(Path(directory).glob("*.safetensors"))
        weights = {k: v for f in files for k, v in load_file(f).items()}
        self.policy.model.load_state_dict(weights)
        self.version = version
        return sum(t.numel() * t.element_size() for t in weights.values())

    def join_weight_group(self, addr: str, port: int, rank: int, size: int, backend: str) -> None:
        from tracerl.weight_sync import new_group

        self.weight_group = new_group(backend, addr, port, rank, size)

    def receive_weights(self, version: int, layout: list[Any]) -> int:
        """Collective path: receive the broadcast buckets and copy (cast) them in; returns the bytes received."""
        from tracerl.weight_sync import layout_bytes, receive_state

        state = receive_state(self.weight_group, layout, self.device)
        self.policy.model.load_state_dict(state)
        self.version = int(version)
        return layout_bytes(layout)

    def state_dict(self) -> dict:
        """The copy's weights on CPU (tests compare sync paths with it)."""
        return {k: v.detach().cpu().clone() for k, v in self.policy.model.state_dict().items()}

    def offload(self) -> None:
        """Colocated on GPU: free the device for the learner while it trains."""
        if self.device == "cuda":
            import torch

            self.policy.model.to("cpu")
            torch.cuda.empty_cache()

    def onload(self) -> None:
        if self.device == "cuda":
            self.policy.model.to(self.device)


@dataclass
class RolloutShard:
    """A pending shard: the future of its Rollout and which prompts of the batch it covers."""

    ref: ray.ObjectRef
    lo: int  # first prompt of the batch in this shard
    hi: int  # one past its last prompt
    worker: int = 0  # index of the actor it was sent to
    args: tuple = ()  # the generate() arguments, to redo the shard on a replacement actor


class RolloutGroup:
    """K rollout actors behind one handle.

    Args:
        cfg: the run config (``model``, ``sampling``, ``rollout``).
        options: Ray options of each actor (``place(cfg, gpus).rollout``).
        weights: (version, state dict) to start from (default: what ``cfg.model`` loads, version 0).

    Example:
        >>> group = RolloutGroup(cfg, [{"num_cpus": 1}] * 2)                     # doctest: +SKIP
        >>> shards = group.generate_async(prompt_ids, samples=4, seed=0)        # doctest: +SKIP
        >>> rollout = Rollout.concat([ray.get(s.ref) for s in shards])          # doctest: +SKIP
    """

    def __init__(self, cfg: Any, options: Sequence[dict[str, Any]], weights: Any = None) -> None:
        self.cfg, self.options = cfg, list(options)
        self.workers = [RolloutWorker.options(**o).remote(cfg, k) for k, o in enumerate(options)]
        self.info = ray.get([w.setup.remote(weights) for w in self.workers])
        self.version = int(weights[0]) if isinstance(weights, tuple) else 0
        self.restarts = 0  # actors replaced after they died
        self._layout: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.workers)

    def generate_async(
        self, prompt_ids: list[list[int]], samples: int, seed: int, sampling: Any = None
    ) -> list[RolloutShard]:
        """Split P prompts (whole groups of ``samples``) across the actors; one future per non-empty shard.

        Shard k samples with seed ``seed * 1009 + k``, so a run is reproducible for a given number of actors.
        """
        import torch

        shards = []
        for k, (lo, hi) in enumerate(_split(len(prompt_ids), len(self.workers))):
            prompts = [p for p in prompt_ids[lo:hi] for _ in range(samples)]
            group = torch.arange(lo, hi).repeat_interleave(samples)
            args = (prompts, group, seed * 1009 + k, sampling)
            shards.append(RolloutShard(self.workers[k].generate.remote(*args), lo, hi, k, args))
        return shards

    def redo(self, shard: RolloutShard, weights: tuple[int, ray.ObjectRef] | None) -> RolloutShard:
        """Replace the (dead) actor of ``shard`` with a fresh one holding ``weights`` = (version, stored weights),
        or ``cfg.model`` as on disk for None, and send it the same work: same prompts and seed, same samples."""
        k = shard.worker
        with contextlib.suppress(Exception):
            ray.kill(self.workers[k])
        self.workers[k] = RolloutWorker.options(**self.options[k]).remote(self.cfg, k)
        ray.get(self.workers[k].setup.remote(weights[1] if weights is not None else None))
        self._layout = None  # a collective sync re-forms its group with the new member
        self.restarts += 1
        return replace(shard, ref=self.workers[k].generate.remote(*shard.args))

    def load_weights(self, version: int, published: ray.ObjectRef) -> int:
        """Object-store sync: every actor loads the one stored copy; returns the bytes each received."""
        received = ray.get([w.load_weights.remote(published) for w in self.workers])
        self.version = version
        return int(received[0])

    def sync_collective(self, learner: Any, version: int) -> int:
        """Collective sync from learner rank 0 (the group is formed on first use); returns bytes per actor."""
        if self._layout is None:
            self._layout = learner.sync_layout(self.cfg.rollout.sync_bucket_mb)
            backend = "nccl" if any(i["gpu_ids"] for i in self.info) else "gloo"
            size = len(self.workers) + 1
            host, addr, port = learner.join_weight_group(size, backend)
            joins = [w.join_weight_group.remote(addr, port, k + 1, size, backend) for k, w in enumerate(self.workers)]
            ray.get(host + joins)
        sends = learner.broadcast_weights()
        received = ray.get([w.receive_weights.remote(version, self._layout) for w in self.workers] + sends)
        self.version = version
        return int(received[0])

    def state_dicts(self) -> list[dict]:
        return ray.get([w.state_dict.remote() for w in self.workers])

    def offload(self) -> None:
        ray.get([w.offload.remote() for w in self.workers])

    def onload(self) -> None:
        ray.get([w.onload.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
        self.workers = []


# =================================================================================================== weight sync
# After every learner update (DESIGN §11): ``sync(learner, rollout)`` → (version now on every actor, bytes each
# actor received). Never a checkpoint reload from disk.

WEIGHT_SYNC: Registry[Callable[[LearnerGroup, RolloutGroup], tuple[int, int]]] = Registry("weight sync")


@WEIGHT_SYNC.register("object_store")
def sync_object_store(learner: LearnerGroup, rollout: RolloutGroup) -> tuple[int, int]:
    """One copy of the gathered weights in the object store (rank 0's return value), K loads."""
    version, published = learner.publish_weights()
    return version, rollout.load_weights(version, published)


@WEIGHT_SYNC.register("collective")
def sync_collective(learner: LearnerGroup, rollout: RolloutGroup) -> tuple[int, int]:
    """A bucketed broadcast from learner rank 0 to the rollout actors (gloo on CPU, nccl on GPU)."""
    version = learner.version()
    return version, rollout.sync_collective(learner, version)
