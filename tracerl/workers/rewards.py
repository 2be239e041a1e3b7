"""Reward scoring in Ray (DESIGN §9, §11, §19): a pool of actors, each running a ``RewardService``, so scoring
uses many cores and the driver stays free (``score_async`` returns futures). Functions (and judges, which are
HTTP clients) run in W CPU actors that never import torch (each process that does costs ~430 MB); each reward
model runs in a group of its own: N actors that hold its weights, placed on GPUs of their own, beside the
rollout actors on fractional GPUs, or on CPU (``workers.placement.reward_model_options``). Every group scores
every shard; the parts are joined and weighted in the driver. A worker that dies is replaced and its shard
redone (``fault/reward_restarts``, ``fault/reward_model_restarts``); a worker that cannot start reports why at
once; a worker whose call timed out and still runs is replaced (with either error policy).

dims: N samples · W function workers · G actor groups (functions + one per reward model)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import ray
from ray.exceptions import RayActorError, RayTaskError

from tracerl.config import RewardModelConfig
from tracerl.reward_resolve import default_name, reward_kind
from tracerl.reward_service import (
    RewardError,
    RewardResult,
    RewardService,
    RewardSpec,
    merge_results,
    prepare_process,
    weigh,
)
from tracerl.workers.common import split_even, where


@ray.remote
class RewardWorker:
    """One ``RewardService`` in an actor: reward functions (no torch), or one reward model, whose weights it loads
    at start (``RewardService.load``).

    A service that cannot start (a bad spec, a module of ``imports`` that fails, the sandbox below its minimum
    isolation, weights that do not load) is not a crash to restart: the error is kept and raised by ``ready`` and
    every ``score``.
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
            self.service.load()
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

    def trial(
        self, prompts: list, completions: list, completion_ids: list | None, columns: dict[str, list], names: list[str]
    ) -> dict[str, Any]:
        """``RewardService.trial``: each named function's rewards on stand-ins, or its error."""
        self.ready()
        return self.service.trial(prompts, completions, completion_ids, columns, names=names)

    def info(self) -> dict[str, Any]:
        """Where it runs (pid, node, GPU ids) and whether torch got imported (only a reward model's actor should)."""
        return where() | {"torch_imported": "torch" in sys.modules}

    def stuck(self) -> int:
        """Reward calls this actor abandoned at their timeout that are still running (they hold a core)."""
        return sum(t.name.startswith("reward-") and t.is_alive() for t in threading.enumerate())


@dataclass
class _Group:
    """Actors that run the same specs: the functions, or one reward model."""

    name: str  # "functions", or the reward model's name
    specs: list[RewardSpec]
    options: list[dict[str, Any]]  # Ray options of actor i
    actors: list[Any] = field(default_factory=list)
    model: bool = False  # a reward model's group (its restarts count in fault/reward_model_restarts)


@dataclass
class _Shard:
    group: _Group  # the group it was sent to
    worker: int  # index into the group's actors
    actor: Any  # the actor handle it was sent to (to tell a dead worker from its replacement)
    offset: int  # index of the shard's first sample in the batch
    args: tuple  # (prompts, completions, completion_ids, columns) of the shard


class RewardPool:
    """Reward actors in groups: ``num_workers`` actors for the functions and judges, and a group per reward model.
    A batch is split into contiguous shards, one per actor of each group; the parts come back in order and are
    weighted into the total here.

    Args:
        specs: reward functions, models and judges, as for ``RewardService``.
        num_workers: function actors W; each reserves ``num_cpus_per_worker`` Ray CPUs (none when every spec is a
            reward model).
        on_error, timeout_s: the ``RewardService`` error policy and per-call timeout.
        max_restarts: how often one shard may be redone after its worker died before giving up.
        imports: modules imported in the driver and every worker before reward names are resolved.
        sandbox: the code sandbox policy of every worker (``rewards.sandbox.configure`` arguments).
        model_options: reward-model name → the Ray options of each of its actors (``reward_model_options``);
            a model not listed gets ``model.num_workers`` (at least one) CPU actors.

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
        model_options: dict[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}.")
        prepare_process(imports, sandbox)
        self.specs = [_portable(s if isinstance(s, RewardSpec) else RewardSpec(s)) for s in specs]
        self.names = [default_name(spec) for spec in self.specs]
        for name in self.names:
            if self.names.count(name) > 1:
                raise RewardError(f"two reward functions are named '{name}'; give one a different name=.")
        self.weights = {name: spec.weight for name, spec in zip(self.names, self.specs, strict=True)}
        self.on_error, self.timeout_s, self.max_restarts = on_error, timeout_s, max_restarts
        self._setup = (list(imports), sandbox, _search_paths(imports))
        functions = [s for s in self.specs if reward_kind(s) != "model"]
        self.groups = [_Group("functions", functions, [{"num_cpus": num_cpus_per_worker}] * num_workers)]
        if not functions:
            self.groups = []
        for name, spec in zip(self.names, self.specs, strict=True):
            if reward_kind(spec) == "model":
                m = spec.model or RewardModelConfig()
                options = (model_options or {}).get(name) or [{"num_cpus": m.num_cpus}] * max(1, m.num_workers)
                self.groups.append(_Group(name, [replace(spec, name=name)], list(options), model=True))
        self.restarts = 0  # function workers replaced so far
        self.model_restarts = 0  # reward-model workers replaced so far
        self.restart_s = 0.0  # seconds spent starting the replacements
        self._pending: dict[Any, _Shard] = {}
        try:
            for group in self.groups:
                group.actors = [self._start(group, i) for i in range(len(group.options))]
            _started([a for g in self.groups for a in g.actors])
        except BaseException:
            self.shutdown()
            raise

    @property
    def workers(self) -> list[Any]:
        """The function actors (replaced in place when one dies)."""
        return self.groups[0].actors if self.groups and not self.groups[0].model else []

    @property
    def model_workers(self) -> dict[str, list[Any]]:
        """Reward-model name → its actors."""
        return {g.name: g.actors for g in self.groups if g.model}

    def _start(self, group: _Group, i: int) -> Any:
        return RewardWorker.options(**group.options[i]).remote(group.specs, self.on_error, self.timeout_s, *self._setup)

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
        for group in self.groups:
            for w, (lo, hi) in enumerate(split_even(n, len(group.actors))):
                args = (
                    list(prompts[lo:hi]),
                    list(completions[lo:hi]),
                    None if completion_ids is None else list(completion_ids[lo:hi]),
                    {k: list(v[lo:hi]) for k, v in columns.items()},
                )
                actor = group.actors[w]
                ref = actor.score.remote(*args)
                self._pending[ref] = _Shard(group, w, actor, lo, args)
                refs.append(ref)
        return refs

    def gather(self, refs: Sequence[ray.ObjectRef]) -> RewardResult:
        """The merged result of ``score_async``'s futures, in sample order.

        Raises:
            RewardError: a reward function failed (on_error="raise"); the index counts from the batch start.
        """
        by_group: dict[str, list[tuple[int, RewardResult]]] = {}
        for ref in refs:
            shard = self._pending.pop(ref)
            by_group.setdefault(shard.group.name, []).append((shard.offset, self._get(ref, shard)))
        if not by_group:
            return merge_results([RewardResult([], {name: [] for name in self.names}, {})])
        parts, errors, counts = {}, {}, {}
        for shards in by_group.values():  # each group's shards in order, then its parts side by side
            merged = merge_results([r for _, r in sorted(shards, key=lambda x: x[0])])
            parts |= merged.parts
            errors |= {name: int(merged.metrics[f"reward/errors/{name}"]) for name in merged.parts}
            counts |= merged.counts
        return weigh({name: parts[name] for name in self.names}, self.weights, errors, counts)

    def trial(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None,
        columns: dict[str, Sequence[Any]],
        names: Sequence[str],
    ) -> dict[str, Any]:
        """``RewardService.trial`` on the first function actor, where the functions run in a step (its imports,
        sandbox and environment): each named function's rewards, or its error; ``{}`` without function actors."""
        if not self.workers:
            return {}
        ref = self.workers[0].trial.remote(list(prompts), list(completions), completion_ids, dict(columns), list(names))
        return ray.get(ref, timeout=self.timeout_s + 60)

    def score(self, *args: Any, **kwargs: Any) -> RewardResult:
        """``gather(score_async(...))``."""
        return self.gather(self.score_async(*args, **kwargs))

    def pids(self) -> list[int]:
        """The pid of each function actor."""
        return ray.get([w.ready.remote() for w in self.workers])

    def model_layout(self) -> list[dict[str, Any]]:
        """Where each reward-model actor runs: its model's name, pid, node and GPU ids."""
        return [
            {"name": g.name} | info
            for g in self.groups
            if g.model
            for info in ray.get([a.info.remote() for a in g.actors])
        ]

    def shutdown(self) -> None:
        for group in self.groups:
            for actor in group.actors:
                ray.kill(actor)
            group.actors = []

    def _get(self, ref: Any, shard: _Shard) -> RewardResult:
        last = ""
        for _ in range(self.max_restarts + 1):
            try:
                result = ray.get(ref)
                errors = any(v for k, v in result.metrics.items() if k.startswith("reward/errors/"))
                if errors and ray.get(shard.actor.stuck.remote()):  # on_error="nan": a timed-out call still runs
                    self._replace(shard)
                return result
            except RayActorError as err:  # the worker died (killed, crashed, out of memory): replace it, redo
                last = _first_lines(str(err))
                self._replace(shard)
                shard = replace(shard, actor=shard.group.actors[shard.worker])
                ref = shard.actor.score.remote(*shard.args)
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, RewardError):
                    if cause.timed_out:  # its abandoned thread may still burn a core: start a fresh worker
                        self._replace(shard)
                    raise cause.shifted(shard.offset) from None
                raise
        hi = shard.offset + len(shard.args[1])
        what = f"reward model '{shard.group.name}' worker" if shard.group.model else "reward worker"
        raise RuntimeError(
            f"{what} {shard.worker} died {self.max_restarts + 1} times while scoring samples "
            f"{shard.offset}..{hi - 1}; giving up. Last error: {last}"
        )

    def _replace(self, shard: _Shard) -> None:
        group = shard.group
        if group.actors[shard.worker] is not shard.actor:
            return  # already replaced for another shard of the same dead worker
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):  # it may be gone already
            ray.kill(shard.actor)
        group.actors[shard.worker] = self._start(group, shard.worker)
        if group.model:
            self.model_restarts += 1
        else:
            self.restarts += 1
        _started([group.actors[shard.worker]])
        self.restart_s += time.perf_counter() - t0


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


def _portable(spec: RewardSpec) -> RewardSpec:
    """Make a file spec's or a model directory's path absolute: actors may run in another working directory."""
    if isinstance(spec.fn, str) and reward_kind(spec) == "model" and os.path.isdir(os.path.expanduser(spec.fn)):
        return replace(spec, fn=os.path.abspath(os.path.expanduser(spec.fn)), name=spec.name or default_name(spec))
    if isinstance(spec.fn, str) and ":" in spec.fn and not spec.fn.startswith(("http://", "https://")):
        location, attr = spec.fn.rsplit(":", 1)
        if location.endswith(".py") or "/" in location:
            return replace(spec, fn=f"{os.path.abspath(location)}:{attr}")
    return spec
