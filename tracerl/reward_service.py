"""The reward service: call reward functions with TRL's contract, check and combine them (DESIGN §9, §19); specs
resolve to functions in ``tracerl.reward_resolve``.

A reward function is named by a registered name (``math_verify``), an import path (``my_pkg.rewards:score``),
a file (``./my_reward.py:score``), an HTTP endpoint (``http://host:port/score``), a reward model (a directory or
hub id) or an OpenAI-compatible judge. Every function is called as
``fn(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and returns one ``float | None`` per
sample; ``None`` means "cannot score this sample" and becomes NaN (excluded from advantages), not an error.
The functions of one batch run concurrently, each in its own thread, under a per-call timeout. A function that
names a ``log_metric`` parameter (TRL's name) gets a callable ``log_metric(key, count)``; its counts are summed
over the batch into ``reward/<key>/<name>`` (a reward model counts ``truncated`` inputs so).

Error policy: ``on_error="raise"`` (default) turns an exception, a timeout, a wrong-length or non-numeric return
into a ``RewardError`` naming the function (and the sample, where one is to blame); ``on_error="nan"`` scores
the failed call's samples NaN instead, counts them in ``reward/errors/<name>`` and logs the error. A function
that fails on some samples only raises ``SampleErrors``: ``raise`` names the first, ``nan`` scores just those NaN.

Parts are weighted into the total; a part with weight 0 is computed and logged but not optimised, and
``reward/corr/<a>/<b>`` (the correlation of two parts over the batch) shows a verifier watching a reward model.

dims: N samples
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rewards.sandbox import deadline as sandbox_deadline
from tracerl.reward_resolve import (
    EndpointDown,
    HttpReward,
    RewardError,
    RewardSpec,
    SampleErrors,
    build_reward,
    prepare_process,
    resolve_reward,
    resolve_spec,
    run_preflight,
)

log = logging.getLogger(__name__)
RESERVED = ("prompts", "completions", "completion_ids")
LOCATE_BUDGET_S = 10.0  # at most this long re-running a failed function sample by sample to find the culprit
__all__ = [
    "HttpReward",
    "RewardError",
    "RewardResult",
    "RewardService",
    "RewardSpec",
    "SampleErrors",
    "correlation",
    "is_trial",
    "merge_results",
    "prepare_process",
    "resolve_reward",
    "summarize",
]


_TRIAL = threading.Event()  # set while RewardService.trial runs (stand-in completions, before a run starts)


def is_trial() -> bool:
    """True inside the stand-in call a run makes before it starts (``RewardService.trial``). A reward function
    that keeps state outside its process (a call counter in a file, a log of what it scored, a curriculum) can
    return early on it: ``if is_trial(): return [0.0] * len(completions)``, after checking its arguments."""
    return _TRIAL.is_set()


@dataclass
class RewardResult:
    """The scores of one batch."""

    total: list[float]  # [N] weighted sum of the parts; NaN when any part with a non-zero weight is NaN
    parts: dict[str, list[float]]  # name -> [N] raw reward of each function (NaN: None or a failed call)
    metrics: dict[str, float]  # reward/<name>/mean, reward/errors/<name>, reward/corr/<a>/<b>, reward/mean, ...
    counts: dict[str, float] = field(default_factory=dict)  # reward/<key>/<name> counted by functions (summed)


# ---------------------------------------------------------------------------------------------- calling


@dataclass
class _Reward:
    name: str
    fn: Callable
    weight: float
    kwargs: dict[str, Any]
    completion_format: str
    accepts: frozenset[str] | None  # parameter names when the function takes no **kwargs; None: anything
    counts: bool  # it names a log_metric parameter: it gets a counter, summed into reward/<key>/<name>


def _named(fn: Callable, parameter: str) -> bool:
    """Whether ``fn`` names ``parameter`` explicitly (not only through ``**kwargs``)."""
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _parameters(fn: Callable) -> frozenset[str] | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def check_kwargs(fn: Callable, spec: RewardSpec, name: str, accepts: frozenset[str] | None) -> None:
    """A reward entry's ``kwargs`` that the function would never see: not a parameter of a function without
    ``**kwargs`` (they are dropped before the call), or of a built-in reward (``rewards``: its ``**kwargs`` only
    takes the dataset's columns, which it does not read by name). A misspelt ``max_lenght`` would otherwise leave
    ``max_length`` at its default, silently.

    Raises:
        RewardError: naming the unknown kwargs and the parameters the function has.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    named = {p.name for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    builtin = (getattr(fn, "__module__", None) or "").split(".")[0] == "rewards"
    unknown = sorted(k for k in spec.kwargs if k not in named)
    if unknown and (accepts is not None or builtin):
        raise RewardError(
            f"reward '{name}' has no parameter {', '.join(map(repr, unknown))} (from its kwargs in reward.functions), "
            f"so the value would never reach it; its parameters are {sorted(named - set(RESERVED))}. Fix the "
            "spelling, or drop the kwarg."
        )


def _invoke(fn: Callable, kwargs: dict[str, Any]) -> Any:
    out = fn(**kwargs)
    if inspect.isawaitable(out):

        async def wait() -> Any:
            return await out

        out = asyncio.run(wait())
    return out


class _Call:
    """One function call on its own daemon thread (an abandoned, timed-out call cannot block exit)."""

    def __init__(
        self, fn: Callable, kwargs: dict[str, Any], name: str, deadline: float | None = None, counts: bool = False
    ) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.counts: dict[str, float] = {}  # what the function counted with log_metric
        if counts:
            kwargs = {**kwargs, "log_metric": self.log_metric}
        self.thread = threading.Thread(
            target=self._run, args=(fn, kwargs, deadline), name=f"reward-{name}", daemon=True
        )
        self.thread.start()

    def log_metric(self, key: str, value: float) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + float(value)

    def _run(self, fn: Callable, kwargs: dict[str, Any], deadline: float | None) -> None:
        try:
            with sandbox_deadline(deadline):  # sandboxed programs of an abandoned call are stopped with it
                self.value = _invoke(fn, kwargs)
        except BaseException as err:  # reported to the caller, never swallowed
            self.error = err

    def wait(self, deadline: float) -> bool:
        """True when finished before ``deadline`` (monotonic seconds)."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        return not self.thread.is_alive()


def _to_rewards(value: Any, n: int) -> list[float]:
    """Check a function's return value: one number (or None) per sample, not text; None and NaN become NaN.

    Raises:
        RewardError: (without a name) wrong type or length, a non-numeric or infinite value.
    """
    if isinstance(value, str | bytes | dict) or not hasattr(value, "__len__"):
        raise RewardError(f"it returned a {type(value).__name__}; a reward function returns a list of {n} floats.")
    values = list(value)
    if len(values) != n:
        raise RewardError(f"it returned {len(values)} values for a batch of {n} samples (one per completion).")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, str | bytes):  # float("1.0") would take it, and "high" fails: text is never a reward
            raise RewardError(
                f"it returned {v!r} ({type(v).__name__}), text where a number belongs; return floats (None to skip "
                "a sample).",
                index=i,
            )
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"it returned {v!r} ({type(v).__name__}), which is not a number.", index=i) from None
        if math.isinf(number):
            raise RewardError(f"it returned {number}; rewards must be finite (None to skip a sample).", index=i)
        out.append(number)
    return out


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _std(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    mean = _mean(kept)
    return math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept)) if kept else math.nan


def correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of two parts over the samples where both are numbers; NaN when fewer than two such
    samples, or when one part is constant over them.

    Example:
        >>> correlation([1.0, 2.0, 3.0, float("nan")], [2.0, 4.0, 7.0, 1.0]), correlation([1.0, 1.0], [0.0, 1.0])
        (0.9933992677987828, nan)
    """
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 2:
        return math.nan
    mx, my = sum(x for x, _ in pairs) / len(pairs), sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx, syy = sum((x - mx) ** 2 for x, _ in pairs), sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def summarize(
    parts: dict[str, list[float]],
    total: list[float],
    errors: dict[str, int],
    counts: dict[str, float] | None = None,
) -> dict[str, float]:
    """The reward metrics of a batch (NaN entries are excluded from means): each part's mean and error count, the
    correlation of every two parts (``reward/corr/<a>/<b>``, in list order), the counts functions reported
    (``reward/<key>/<name>``), the total's mean, population std and NaN count, the rewards as scored."""
    metrics: dict[str, float] = {}
    for name, values in parts.items():
        metrics[f"reward/{name}/mean"] = _mean(values)
        metrics[f"reward/errors/{name}"] = float(errors.get(name, 0))
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            metrics[f"reward/corr/{a}/{b}"] = correlation(parts[a], parts[b])
    metrics |= dict(counts or {})
    metrics["reward/mean"] = _mean(total)
    metrics["reward/std"] = _std(total)
    metrics["reward/nan_count"] = float(sum(math.isnan(v) for v in total))
    return metrics


def weigh(
    parts: dict[str, list[float]],
    weights: dict[str, float],
    errors: dict[str, int],
    counts: dict[str, float] | None = None,
) -> RewardResult:
    """The total of a batch from its parts: ``total[i] = Σ weight · part[i]`` over the parts with a non-zero weight
    (a weight-0 part is logged, never optimised, and never makes the total NaN).

    Example:
        >>> r = weigh({"rm": [0.5, 1.0], "verifier": [1.0, 0.0]}, {"rm": 2.0, "verifier": 0.0}, {})
        >>> r.total, r.metrics["reward/corr/rm/verifier"]
        ([1.0, 2.0], -1.0)
    """
    n = len(next(iter(parts.values()))) if parts else 0
    weighted = [name for name in parts if weights[name] != 0]
    total = [sum(weights[name] * parts[name][i] for name in weighted) for i in range(n)]
    return RewardResult(total, parts, summarize(parts, total, errors, counts), dict(counts or {}))


def merge_results(results: Sequence[RewardResult]) -> RewardResult:
    """Concatenate shard results in order and recompute the metrics over the whole batch (counts are summed)."""
    names = list(results[0].parts) if results else []
    parts = {name: [v for r in results for v in r.parts[name]] for name in names}
    total = [v for r in results for v in r.total]
    errors = {name: int(sum(r.metrics.get(f"reward/errors/{name}", 0.0) for r in results)) for name in names}
    counts: dict[str, float] = {}
    for r in results:
        for key, value in r.counts.items():
            counts[key] = counts.get(key, 0.0) + value
    return RewardResult(total, parts, summarize(parts, total, errors, counts), counts)


class RewardService:
    """Scores batches with weighted reward functions under a per-call timeout and an explicit error policy.

    Args:
        specs: the reward functions (a bare string or callable ``x`` is ``RewardSpec(fn=x)``).
        on_error: "raise" → ``RewardError``; "nan" → NaN for the failed call's samples + ``reward/errors/<name>``.
        timeout_s: seconds each function call may take (functions of a batch run concurrently).
        http_retries: retries of an HTTP endpoint after connection errors, timeouts or 5xx answers.
        source: the config list the specs come from (``reward.functions``): an entry that cannot be resolved is
            named by its index there.
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec | str | Callable[..., Any]],
        on_error: Literal["raise", "nan"] = "raise",
        timeout_s: float = 30.0,
        http_retries: int = 2,
        imports: Sequence[str] = (),
        sandbox: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> None:
        prepare_process(imports, sandbox)
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan', got '{on_error}'.")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}.")
        if not specs:
            raise ValueError("give at least one reward function.")
        self.on_error, self.timeout_s = on_error, timeout_s
        self.rewards: list[_Reward] = []
        for i, spec in enumerate(specs):
            spec = spec if isinstance(spec, RewardSpec) else RewardSpec(spec)
            if spec.completion_format not in ("as_given", "chat", "text"):
                raise ValueError(f"completion_format must be as_given, chat or text, got '{spec.completion_format}'.")
            try:
                default_name, fn = resolve_spec(spec, timeout_s, http_retries)
            except RewardError as err:
                if source is None or err.name is not None:
                    raise
                raise RewardError(f"{source}[{i}]: {err.detail}", fix=err.fix) from None
            name = spec.name or default_name
            if any(r.name == name for r in self.rewards):
                raise RewardError(f"two reward functions are named '{name}'; give one a different name=.")
            fn = build_reward(fn, spec)
            accepts = _parameters(fn)
            if accepts is not None and not accepts & set(RESERVED):
                raise RewardError(
                    f"reward '{spec.fn}' takes none of {list(RESERVED)} (its parameters: {sorted(accepts)}), so it "
                    "cannot score completions. If it is a factory that returns a reward function (like "
                    "trl.rewards:get_soft_overlong_punishment), give its arguments as factory_kwargs in the reward "
                    "entry, e.g. {fn: ..., factory_kwargs: {max_completion_len: 512, soft_punish_cache: 64}}."
                )
            check_kwargs(fn, spec, name, accepts)
            run_preflight(fn, name)
            counts = _named(fn, "log_metric")
            self.rewards.append(
                _Reward(name, fn, spec.weight, dict(spec.kwargs), spec.completion_format, accepts, counts)
            )

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def load(self) -> None:
        """Load what the functions hold back until they run where they score (a reward model's weights): reward
        workers call it once at start, ``tracerl validate`` without ``--offline`` to check the weights."""
        for r in self.rewards:
            load = getattr(r.fn, "load", None)
            if callable(load):
                try:
                    load()
                except RewardError:
                    raise
                except Exception as err:  # noqa: BLE001 - whatever stops the load, named
                    raise RewardError(f"reward '{r.name}' could not load: {type(err).__name__}: {err}") from err

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        columns: dict[str, Sequence[Any]] | None = None,
    ) -> RewardResult:
        """Rewards of a batch: every function on every sample, weighted into ``total``.

        Args:
            prompts: [N] prompt strings or chat-message lists.
            completions: [N] completion strings or chat-message lists.
            completion_ids: [N] token ids of each completion (passed through as ``completion_ids``).
            columns: dataset columns, each a list of N values (passed as keyword arguments).
        Raises:
            RewardError: bad inputs, or (with on_error="raise") a function that failed.
        """
        n = len(completions)
        columns = dict(columns or {})
        self._check_inputs(prompts, completion_ids, columns, n)
        if n == 0:
            return RewardResult([], {r.name: [] for r in self.rewards}, summarize({}, [], {}))
        parts: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        counts: dict[str, float] = {}
        for reward, call, outcome in self._run(self.rewards, prompts, completions, completion_ids, columns):
            if isinstance(outcome, RewardError):
                if self.on_error == "raise":
                    raise outcome
                log.warning(
                    "reward function '%s' failed: %s Its %d samples are scored NaN (reward/errors/%s).",
                    reward.name,
                    outcome.detail,
                    n,
                    reward.name,
                )
                parts[reward.name], errors[reward.name] = [math.nan] * n, n
            else:
                parts[reward.name], failed = outcome
                if failed:
                    errors[reward.name] = failed
            counts |= {f"reward/{key}/{reward.name}": value for key, value in call.counts.items()}
        return weigh(parts, {r.name: r.weight for r in self.rewards}, errors, counts)

    def trial(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        columns: dict[str, Sequence[Any]] | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, list[float] | RewardError]:
        """Each function's rewards on a trial batch, or its error, by name (``names``: only those): every function
        runs and is judged on its own, whatever ``on_error`` says. ``RewardError.returned`` marks a function that
        returned something of the wrong type or length, which no batch would change. The functions see
        ``is_trial()`` True while it runs."""
        columns = dict(columns or {})
        self._check_inputs(prompts, completion_ids, columns, len(completions))
        tried = [r for r in self.rewards if names is None or r.name in names]
        _TRIAL.set()
        try:
            return {
                r.name: outcome if isinstance(outcome, RewardError) else outcome[0]
                for r, _, outcome in self._run(tried, prompts, completions, completion_ids, columns)
            }
        finally:
            _TRIAL.clear()

    # -- helpers ----------------------------------------------------------------------------------------------

    def _run(
        self, rewards: list[_Reward], prompts: Sequence, completions: Sequence, ids: Sequence | None, columns: dict
    ) -> Iterator[tuple[_Reward, _Call, tuple[list[float], int] | RewardError]]:
        """Start every function of ``rewards`` on the batch at once (all bounded by one deadline, ``timeout_s``
        from now) and yield, in order, each one's call and outcome: its checked rewards and how many of its
        samples failed (``_finish``), or its ``RewardError``."""
        batch = (list(prompts), list(completions), ids, columns)
        deadline = time.monotonic() + self.timeout_s
        calls = [_Call(r.fn, self._arguments(r, *batch), r.name, deadline, r.counts) for r in rewards]
        for r, call in zip(rewards, calls, strict=True):
            try:
                outcome: tuple[list[float], int] | RewardError = self._finish(r, call, deadline, batch)
            except RewardError as err:
                outcome = err
            yield r, call, outcome

    @staticmethod
    def _check_inputs(prompts: Sequence, completion_ids: Sequence | None, columns: dict, n: int) -> None:
        if len(prompts) != n:
            raise RewardError(f"got {len(prompts)} prompts for {n} completions; pass one prompt per completion.")
        if completion_ids is not None and len(completion_ids) != n:
            raise RewardError(f"got {len(completion_ids)} completion_ids for {n} completions.")
        for key, values in columns.items():
            if key in RESERVED:
                raise RewardError(f"dataset column '{key}' clashes with an argument of the same name; rename it.")
            if isinstance(values, str | bytes) or not hasattr(values, "__len__") or len(values) != n:
                size = len(values) if hasattr(values, "__len__") else type(values).__name__
                raise RewardError(f"dataset column '{key}' has {size} values for {n} completions (need one each).")

    @staticmethod
    def _arguments(r: _Reward, prompts: list, completions: list, ids: Any, columns: dict) -> dict[str, Any]:
        if r.completion_format == "chat":
            completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
        elif r.completion_format == "text":
            from rewards.text import completion_text

            completions = [completion_text(c) for c in completions]
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": ids, **columns, **r.kwargs}
        if r.accepts is not None:  # a function without **kwargs gets only the arguments it names
            kwargs = {k: v for k, v in kwargs.items() if k in r.accepts}
        return kwargs

    def _finish(self, r: _Reward, call: _Call, deadline: float, batch: tuple) -> tuple[list[float], int]:
        """The checked rewards of one call and how many of its samples failed (``SampleErrors`` under
        ``on_error="nan"``), or a named ``RewardError``."""
        completions, columns = batch[1], batch[3]
        n = len(completions)
        if not call.wait(deadline):
            raise RewardError(
                f"it did not return within timeout_s={self.timeout_s:g} s on a batch of {n} samples (the call "
                "was abandoned; its thread ends when the function does). Make it faster or raise reward.timeout_s.",
                r.name,
                timed_out=True,
            )
        if isinstance(call.error, SampleErrors):
            return self._partial(r, call.error, completions)
        if call.error is not None:
            err = call.error
            detail = f"{type(err).__name__}: {str(err).rstrip('.')}."
            if isinstance(err, TypeError) and "string indices must be integers" in str(err):
                detail += " It seems to expect chat messages: set completion_format='chat' in its RewardSpec."
            elif isinstance(err, TypeError) and re.search(
                r"unexpected keyword argument|missing \d+ required", str(err)
            ):
                offered = [*RESERVED, *columns, *r.kwargs]
                detail += f" It was offered the arguments {offered} (reward functions must accept **kwargs)."
            index = None if self.on_error == "nan" else self._locate(r, batch)
            quote = "" if index is None else repr(str(completions[index])[:120])
            fix = err.fix if isinstance(err, EndpointDown) else ""  # a server that stopped: not the function's fault
            raise RewardError(detail, r.name, index, quote=quote, fix=fix) from err
        try:
            return _to_rewards(call.value, n), 0
        except RewardError as err:
            # a wrong type or length is wrong on any batch; a value at one index (text, ±inf) depends on the sample
            raise RewardError(err.detail, r.name, err.index, returned=err.index is None) from None

    def _partial(self, r: _Reward, err: SampleErrors, completions: list) -> tuple[list[float], int]:
        """A call that failed on some samples: ``raise`` names the first one, ``nan`` scores only those NaN."""
        n = len(completions)
        if len(err.values) != n:
            raise RewardError(f"it reported {len(err.values)} values for a batch of {n} samples.", r.name)
        first = min(err.errors)
        if self.on_error == "raise":
            detail = f"{len(err.errors)} of {n} samples failed; sample {first}: {str(err.errors[first]).rstrip('.')}."
            raise RewardError(detail, r.name, first, quote=repr(str(completions[first])[:120]), fix=err.fix)
        log.warning(
            "reward function '%s' failed on %d of %d samples (scored NaN, counted in reward/errors/%s); sample %d: %s",
            r.name, len(err.errors), n, r.name, first, err.errors[first],
        )  # fmt: skip
        values = [None if i in err.errors else v for i, v in enumerate(err.values)]
        return _to_rewards(values, n), len(err.errors)

    def _locate(self, r: _Reward, batch: tuple) -> int | None:
        """The first sample on which the function fails alone (re-run one by one, within a time budget).

        Not done for HTTP endpoints and judges (one request per sample would hammer a failing server).
        """
        prompts, completions, ids, columns = batch
        n = len(completions)
        if n < 2 or isinstance(r.fn, HttpReward) or getattr(r.fn, "remote", False):
            return 0 if n == 1 else None
        deadline = time.monotonic() + min(self.timeout_s, LOCATE_BUDGET_S)
        for i in range(n):
            one_ids = None if ids is None else list(ids)[i : i + 1]
            one_columns = {k: list(v)[i : i + 1] for k, v in columns.items()}
            arguments = self._arguments(r, prompts[i : i + 1], completions[i : i + 1], one_ids, one_columns)
            call = _Call(r.fn, arguments, r.name, deadline, r.counts)
            if not call.wait(deadline):
                return None
            if call.error is not None:
                return i
        return None


def _columns_read(r: _Reward, optional: bool) -> set[str]:
    """Dataset columns reward ``r`` is given: a judge's template names them; a function's are its parameters that
    are neither the TRL call's own arguments nor fixed ``kwargs``, those with a default too where ``optional``."""
    declared = getattr(r.fn, "required_columns", None)  # a judge: the columns its template names
    if declared is not None:
        return set(declared) - set(r.kwargs)
    try:
        params = inspect.signature(r.fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in kinds and (optional or p.default is inspect.Parameter.empty)}
    return names - {*RESERVED, *r.kwargs, "trainer_state", "log_extra", "log_metric"}


def required_columns(service: RewardService) -> dict[str, set[str]]:
    """Dataset columns each reward function needs: its parameters without a default that are neither the TRL
    call's own arguments nor fixed ``kwargs`` (e.g. ``answer`` for ``synthetic_exact``)."""
    return {r.name: need for r in service.rewards if (need := _columns_read(r, optional=False))}


def column_readers(service: RewardService, column: str) -> list[str]:
    """The reward functions given dataset column ``column``: a parameter of that name, with a default or not (as
    ``math_verify``'s ``answer``), or a judge whose template names it, unless the entry's kwargs fix it."""
    return [r.name for r in service.rewards if column in _columns_read(r, optional=True)]


def check_columns(service: RewardService, columns: Sequence[str], source: str, key: str = "data.source") -> None:
    """Every column a reward function needs is in the dataset (``source``, set as ``key``), or a clear error
    naming both."""
    for name, need in required_columns(service).items():
        missing = sorted(need - set(columns))
        if missing:
            judge = hasattr(next(r.fn for r in service.rewards if r.name == name), "required_columns")
            fix = "change the judge's template (judge.template), " if judge else ""
            raise RewardError(
                f"reward function '{name}' needs the dataset column(s) {missing}, which {key} '{source}' lacks "
                f"(its columns: {sorted(columns)}). Map the right column with data.answer_column / "
                f"data.prompt_column, {fix}or give the value in the reward entry's kwargs."
            )
