"""Reward scoring in Ray (DESIGN §9, §11): a pool of CPU actors, each running a ``RewardService``, so scoring
uses many cores and the driver stays free (``score_async`` returns futures). A worker that dies is replaced and
its shard redone; a worker that cannot start reports why at once; a worker whose call timed out and still runs
is replaced (with either error policy).

Reward actors never import torch (each process that does costs ~430 MB).

dims: N samples · W reward workers
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import ray
from ray.exceptions import RayActorError, RayTaskError

from tracerl.reward_service import (
    RewardError,
    RewardResult,
    RewardService,
    RewardSpec,
    merge_results,
    prepare_process,
    resolve_reward,
)
from tracerl.workers.common import split_even


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

    def stuck(self) -> int:
        """Reward calls this actor abandoned at their timeout that are still running (they hold a core)."""
        return sum(t.name.startswith("reward-") and t.is_alive() for t in threading.enumerate())


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
        self.restart_s = 0.0  # seconds spent starting the replacements
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
        for w, (lo, hi) in enumerate(split_even(n, len(self.workers))):
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

    def pids(self) -> list[int]:
        """The pid of each reward actor."""
        return ray.get([w.ready.remote() for w in self.workers])

    def shutdown(self) -> None:
        for actor in self.workers:
            ray.kill(actor)
        self.workers = []

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
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):  # it may be gone already
            ray.kill(shard.actor)
        self.workers[shard.worker] = self._start()
        self.restarts += 1
        _started([self.workers[shard.worker]])
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
    """Make a file spec's path absolute: actors may run in another working directory."""
    if isinstance(spec.fn, str) and ":" in spec.fn and not spec.fn.startswith(("http://", "https://")):
        location, attr = spec.fn.rsplit(":", 1)
        if location.endswith(".py") or "/" in location:
            return replace(spec, fn=f"{os.path.abspath(location)}:{attr}")
    return spec
