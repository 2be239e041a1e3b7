"""Everything a run checks and starts before its first step: prompts and the tokenizer's coverage of them, the
rewards, the sampler settings against the model (from its config alone), Ray."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import ray

from rewards.registry import answer_format
from tracerl import data, stats, trace
from tracerl.config import Config, ConfigError, reward_model_workers
from tracerl.models import load_policy, load_tokenizer
from tracerl.records import Rollout
from tracerl.reward_resolve import RewardError, default_name, reward_kind, specs_from_config
from tracerl.reward_service import RewardService, RewardSpec, check_columns, column_readers
from tracerl.workers import RewardPool, RolloutShard
from tracerl.workers.placement import reward_models

if TYPE_CHECKING:
    import datasets


@contextlib.contextmanager
def teardown() -> Iterator[list[Callable[[], Any]]]:
    """A list to append shutdown callbacks to; on the way out they all run, newest first, whatever happens (one
    that fails does not keep the others from running)."""
    callbacks: list[Callable[[], Any]] = []
    try:
        yield callbacks
    finally:
        for fn in reversed(callbacks):
            with contextlib.suppress(Exception):
                fn()


def connect(cfg: Config, verbose: bool) -> bool:
    """Join ``cluster.address`` or start a local Ray instance on loopback (dashboard off unless asked); returns
    whether this call started it (and so must stop it)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    with keep_sigterm_handler(on_exit=ray.shutdown):
        if cfg.cluster.address:
            check_reachable(cfg.cluster.address)
            ray.init(address=cfg.cluster.address, **quiet)
        else:  # logical CPUs: enough for every actor of the run even on a 2-core laptop (they mostly take turns)
            cpus = max(os.cpu_count() or 1, math.ceil(sum(cpus_needed(cfg).values())))
            ray.init(address="local", num_cpus=cpus, include_dashboard=cfg.cluster.dashboard, **quiet)
    return True


@contextlib.contextmanager
def keep_sigterm_handler(on_exit: Callable[[], Any]) -> Iterator[None]:
    """``ray.init`` replaces the SIGTERM handler with Ray's (``sys.exit(15)`` while it connects, then a stack dump
    and exit 1). A Python handler that was there before (``tracerl``'s: stop as Ctrl-C does) is put back after
    it, and a SIGTERM that Ray's caught meanwhile becomes that Ctrl-C, after ``on_exit`` (``ray.shutdown``)."""
    previous = signal.getsignal(signal.SIGTERM)
    ours = callable(previous)
    try:
        yield
    except SystemExit as stop:
        if ours and stop.code == signal.SIGTERM:
            with contextlib.suppress(Exception):
                on_exit()
            raise KeyboardInterrupt from None
        raise
    finally:
        if ours:
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                signal.signal(signal.SIGTERM, previous)


def cpus_needed(cfg: Config, learner: bool = True) -> dict[str, float]:
    """The Ray CPUs the run's actors reserve, per kind of actor (the learner's left out for ``tracerl eval``):
    reward-function actors only when some reward is not a reward model."""
    functions = any(reward_kind(spec) != "model" for spec in specs_from_config(cfg.reward))
    models = sum(reward_model_workers(m, cfg.rollout.num_workers) * m.num_cpus for _, m in reward_models(cfg))
    need = {
        "learner": cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank if learner else 0.0,
        "rollout": cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker,
        "reward": cfg.reward.num_workers * cfg.reward.num_cpus_per_worker if functions else 0.0,
        "reward model": models,
    }
    return {k: v for k, v in need.items() if v}


def check_resources(cfg: Config, available: dict[str, float], learner: bool = True) -> None:
    """The cluster has the CPUs the run's actors reserve, and the custom Ray resources that
    ``cluster.learner_resources`` / ``cluster.rollout_resources`` pin actors with, in the amounts the run needs
    (otherwise its actors would wait for them forever, printing nothing)."""
    need_cpus = cpus_needed(cfg, learner)
    if sum(need_cpus.values()) > available.get("CPU", 0.0) + 1e-9:
        parts = ", ".join(f"{kind} {n:g}" for kind, n in need_cpus.items())
        raise ConfigError(
            f"the run's actors reserve {sum(need_cpus.values()):g} Ray CPUs in all ({parts}), but the Ray cluster "
            f"at {cfg.cluster.address or 'this machine'} offers {available.get('CPU', 0.0):g}, so some would wait "
            "for a CPU forever. Give the nodes more logical CPUs (ray start ... --num-cpus N; Ray's CPUs are "
            "reservations, N may exceed the cores), add a node, or reserve less: learner.num_cpus_per_rank, "
            "rollout.num_cpus_per_worker and reward.num_cpus_per_worker take fractions such as 0.5."
        )
    c = cfg.cluster
    need: dict[str, float] = {}
    for custom, count in ((c.learner_resources, cfg.learner.num_ranks), (c.rollout_resources, cfg.rollout.num_workers)):
        for name, amount in custom.items():
            need[name] = need.get(name, 0.0) + float(amount) * count
    for name, amount in need.items():
        if available.get(name, 0.0) < amount:
            raise ConfigError(
                f"cluster.learner_resources / cluster.rollout_resources ask for {amount:g} of the Ray resource "
                f"'{name}' in all, but the cluster offers {available.get(name, 0.0):g}. Start the nodes meant for "
                f"those actors with ray start ... --resources '{{\"{name}\": N}}' (see docs/cluster.md and "
                "scripts/ray_cluster.sh), or drop the setting to let Ray place them anywhere."
            )


def write_layout(path: Any, learner: Any, rollout: Any, rewards: RewardPool) -> None:
    """``cluster.json``: where a run landed: node, pid and GPUs of every learner rank, rollout actor and reward-model
    actor, the pid of every reward-function actor."""
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}

    def entry(w: dict[str, Any]) -> dict[str, Any]:
        return {"pid": w["pid"], "node": w["node"], "node_address": address.get(w["node"]), "gpu_ids": w["gpu_ids"]}

    layout = {
        "learner": [entry(w) for w in learner.where()],
        "rollout": [entry(w) for w in rollout.info],
        "reward": [{"pid": pid} for pid in rewards.pids()],
        "reward_model": [{"name": w["name"]} | entry(w) for w in rewards.model_layout()],
    }
    path.write_text(json.dumps(layout, indent=2))


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, naming the setting, when no Ray cluster answers at ``address``: nothing accepts a connection
    there, or what does is not a Ray cluster (its GCS does not answer the request Ray's own client sends first).
    ``ray.init`` would retry instead, filling the console with its C++ client's log lines."""
    host, _, port = address.rpartition(":")
    fix = (
        "Is the cluster started? Start it with scripts/ray_cluster.sh head (or 'ray start --head --port=PORT', see "
        "docs/cluster.md) and check --ray-address / cluster.address: the head's HOST:PORT (its GCS port, 6379 by "
        "default); or leave it out to run on a local instance."
    )
    try:
        with socket.create_connection((host or address, int(port or 6379)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"--ray-address / cluster.address '{address}': no Ray cluster answers there ({err}). {fix}"
        ) from None
    failure = _gcs_failure(f"{host or address}:{port or 6379}", timeout_s)
    if failure:
        raise ConfigError(
            f"--ray-address / cluster.address '{address}': something accepts connections there, but no Ray cluster "
            f"answers as one (the request Ray's client sends first got: {failure}). {fix}"
        )


def _gcs_failure(target: str, timeout_s: float) -> str | None:
    """Why ``target`` is not a Ray GCS (the gRPC status of ``GetClusterId``, the first call Ray's client makes),
    or None: it answered, or a gRPC server answered that may be a Ray whose API differs (``ray.init`` decides), or
    the check cannot be made here (no grpcio, or TLS, which an insecure channel cannot speak)."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    try:
        import grpc
    except ImportError:
        return None
    proxy = int(os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() in ("1", "true"))  # noqa: SIM112 - Ray's name
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", proxy)])  # as Ray's own channels
    try:
        channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=timeout_s)
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        answered = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)  # a Ray with token auth
        if code in answered or (code == grpc.StatusCode.UNIMPLEMENTED and "http2" not in details.lower()):
            return None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer within {timeout_s:g} s; a Ray head that is still starting or overloaded: retry"
        return f"gRPC {code.name}: {details}" if details else f"gRPC {code.name}"
    finally:
        channel.close()
    return None


def reward_formats(cfg: Config) -> dict[str, str]:
    """Example answer formats of the run's registered rewards that declare one (``\\boxed{42}``)."""
    formats = {f.name or f.fn: answer_format(f.fn) for f in cfg.reward.functions if f.weight != 0}
    return {name: example for name, example in formats.items() if example is not None}


def load_prompts(cfg: Config) -> tuple[data.PromptStream, data.PromptBatch | None]:
    """The training stream and the held-out prompts: ``eval.source``, or ``eval.num_prompts`` whole prompts of
    ``data.source`` that never appear in training. The tokenizer must cover both (``data.check_coverage``)."""
    tokenizer = load_tokenizer(cfg.model)
    ds = data.load_examples(cfg.data, cfg.seed, require=("prompt",))
    data.check_coverage(tokenizer, ds, cfg.data, data.tokenizer_fix(cfg.model), reward_formats(cfg))
    n = cfg.eval.num_prompts
    if n and cfg.eval.source is None:
        train_rows, held_rows = stats.heldout_split(ds["prompt"], n, cfg.seed)
        if not train_rows:
            raise ConfigError(
                f"eval.num_prompts={n} holds out every distinct prompt of data.source "
                f"'{cfg.data.source}'; lower it or set eval.source to a separate dataset."
            )
        part = f"every prompt left for training (after eval.num_prompts={n} held out for evaluation) of"
        stream = data.PromptStream(ds.select(train_rows), tokenizer, cfg.data, cfg.seed, rows=train_rows, part=part)
        held_fix = (
            f"{len(stream.ids)} of the prompts left for training fit, so raise the limit, hold out more prompts "
            "(eval.num_prompts) so that some that fit are held out too, or set eval.source to a separate "
            "evaluation set whose prompts fit"
        )
        part = f"every one of the {len(held_rows)} prompts held out for evaluation (eval.num_prompts={n}) of"
        held = data.PromptStream(
            ds.select(held_rows), tokenizer, cfg.data, cfg.seed, rows=held_rows, part=part, fix=held_fix
        )
        return stream, held.all()
    if not n:
        return data.PromptStream(ds, tokenizer, cfg.data, cfg.seed), None
    held_cfg = type(cfg.data)(**{**asdict(cfg.data), "source": cfg.eval.source, "split": cfg.eval.split})
    held_ds = data.load_examples(held_cfg, cfg.seed, require=("prompt",), key="eval.source")
    held_ds = held_ds.select(range(min(n, len(held_ds))))
    data.check_coverage(tokenizer, held_ds, held_cfg, data.tokenizer_fix(cfg.model), key="eval.source")
    stream = data.PromptStream(ds, tokenizer, cfg.data, cfg.seed)
    return stream, data.PromptStream(held_ds, tokenizer, held_cfg, cfg.seed, "eval.source").all()


def samplings(cfg: Config) -> list[Any]:
    """Every sampler setting a run uses: ``sampling``, and the greedy and sampled evaluation settings."""
    return [cfg.sampling, stats.eval_sampling(cfg, greedy=True), stats.eval_sampling(cfg, greedy=False)]


def check_model(cfg: Config, longest_prompt: int) -> Any:
    """Before any actor starts: every sampler setting of the run fits the model (``sampling.block_size`` against
    a block model's own, the cache mode, whether ``cuda_graph`` can capture its forward), the longest prompt plus
    the response fits its positions, and the estimator is sound on its layout (``trace.check_estimator``). The
    model is built from its config.json and tokenizer alone, on the meta device (no weights read). Returns it, for
    ``check_device`` once the cluster is known."""
    from tracerl.sampling import check_compatible, check_positions, resolve_cache

    policy = load_policy(replace(cfg.model, dtype=cfg.rollout.dtype), weights=False)
    for s in samplings(cfg):
        check_compatible(policy, s)
        resolve_cache(policy, s)
        check_positions(policy, longest_prompt, s)
    o = cfg.objective
    trace.check_estimator(o.views, "block" if policy.block_size else "full", o.d1_prompt_mask_prob)
    return policy


def local_gpus(cfg: Config) -> float | None:
    """GPUs a local Ray instance of this run will offer (what torch sees here); None when joining a cluster (known
    once connected)."""
    if cfg.cluster.address:
        return None
    import torch

    return float(torch.cuda.device_count())


def check_device(cfg: Config, gpus: float) -> None:
    """The sampler settings fit the rollout actors' device: CUDA when the cluster has GPUs, else the CPU."""
    from tracerl.sampling import check_device as fits

    for s in samplings(cfg):
        fits(s, "cuda" if gpus > 0 else "cpu")


def check_rewards(
    cfg: Config,
    columns: list[str] | None,
    source: str,
    load: bool = False,
    *,
    key: str = "data.source",
    eval_set: data.PromptBatch | None = None,
) -> RewardService:
    """The reward functions resolve (names, import paths, files; reward models' configs and tokenizers, judges'
    endpoints) and find the dataset columns they need in ``columns`` (of the dataset ``source``, set as ``key``)
    and, when ``eval.source`` is set, in ``eval_set`` too; with ``load``, reward models' weights load too."""
    r = cfg.reward
    service = RewardService(
        reward_specs(cfg),
        on_error=r.on_error,
        timeout_s=r.timeout_s,
        imports=r.imports,
        sandbox=asdict(r.sandbox),
        source="reward.functions",
    )
    if columns is not None:
        check_columns(service, columns, source, key)
    if eval_set is not None and cfg.eval.source is not None:  # held-out prompts of data.source: its columns
        check_columns(service, ["prompt", *eval_set.columns], cfg.eval.source, "eval.source")
    if load:
        service.load()
    return service


def missing_answers(
    cfg: Config, service: RewardService, train: datasets.Dataset | None, held: data.PromptBatch | None
) -> list[str]:
    """A warning for each dataset where a reward function reads the answer and some prompts have none
    (``data.missing_answers``): ``data.source`` (its training prompts ``train`` and, without ``eval.source``, the
    held-out ones) and ``eval.source`` (``held``). Not an error: a function that returns None there (TRL's "does
    not apply") skips them, as a multi-task dataset wants. Only the answer and prompt columns are read."""
    readers = column_readers(service, "answer")
    if not readers:
        return []
    parts: list[tuple[list[tuple[list, list]], str, str]] = [([], cfg.data.source, "data.source")]
    if cfg.eval.source is not None:
        parts.append(([], cfg.eval.source, "eval.source"))
    if train is not None and "answer" in train.column_names:
        parts[0][0].append((train["answer"], train["prompt"]))
    if held is not None and "answer" in held.columns:
        parts[-1][0].append((held.columns["answer"], held.prompts))  # data.source's own without eval.source
    found = []
    for pieces, source, key in parts:
        answers, prompts = [a for p in pieces for a in p[0]], [q for p in pieces for q in p[1]]
        where = data.missing_answers(answers, prompts, cfg.data.answer_column, source, key)
        if where:
            found.append(
                f"{where}; the reward functions that read the answer ({', '.join(readers)}) score those prompts' "
                "completions without one: one that returns None there skips them, one that compares with the "
                "answer scores every completion 0. Fill in the answers or remove those rows if they should have one."
            )
    return found


def try_rewards(cfg: Config, stream: data.PromptStream, trial: Callable[..., dict[str, Any]]) -> str:
    """Score two stand-in completions of the first training row before a run starts: its answer (or response)
    and an empty completion, which a model can write too. ``trial`` is ``RewardService.trial`` (``tracerl
    validate``, in this process) or ``RewardPool.trial`` (``tracerl train``: in a reward actor, where the functions
    run in a step). Reward models, judges and HTTP endpoints are left out: they cost a load or a request. Returns
    what the functions gave, e.g. ``"sudoku_cells 1.00/0.00 on its answer and an empty completion"``.

    Raises:
        RewardError: a function returned something of the wrong type or length, or (``reward.on_error=raise``)
            raised or timed out on a stand-in; the message says what it was given.
    """
    plain = [default_name(spec) for spec in reward_specs(cfg) if reward_kind(spec) == "function"]
    if not plain or len(stream.ds) == 0:
        return ""
    row = stream.ds[0]
    columns = {c: [row[c]] * 2 for c in stream.ds.column_names if c != "prompt"}
    column = next((c for c in ("answer", "response") if row.get(c) not in (None, "")), None)
    stand_in = "" if column is None else str(row[column])
    texts = [stand_in, ""]
    ids = [stream.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    tried = trial([row["prompt"]] * 2, texts, ids, columns, plain)
    first = f"its {column} {stand_in[:80]!r}" if column else "'' (it has no answer)"
    for name, got in tried.items():
        if not isinstance(got, RewardError) or not (got.returned or cfg.reward.on_error == "raise"):
            continue
        where = f" on sample {got.index}" if got.index is not None else ""
        fix = (
            "Fix the function"
            if got.returned
            else "Fix the function, or set reward.on_error=nan to score such calls NaN"
        )
        raise RewardError(
            f"reward function '{name}' failed{where} before the run started: {got.detail} It was given two stand-in "
            f"completions of the first row of data.source '{cfg.data.source}': {first} (sample 0) and '' (sample 1, "
            f"an empty completion, which a model can write). {fix}."
        )
    if len(plain) == len(reward_specs(cfg)) and not _scored(tried):
        _check_some_row_scored(cfg, stream, trial, plain, column, tried)
    gave = ", ".join(
        f"{name} "
        + ("failed, NaN under on_error=nan" if isinstance(got, RewardError) else "/".join(f"{v:.2f}" for v in got))
        for name, got in tried.items()
    )
    return f"{gave} on {'its ' + column if column else 'an empty stand-in'} and an empty completion"


TRIAL_ROWS = 8  # rows whose answers are tried when no function scores the first row


def _scored(tried: dict[str, Any]) -> bool:
    """Some function gave some stand-in a number (None and NaN are no score; an error under on_error=nan is NaN)."""
    return any(
        not isinstance(got, RewardError) and any(v is not None and math.isfinite(v) for v in got)
        for got in tried.values()
    )


def _check_some_row_scored(
    cfg: Config,
    stream: data.PromptStream,
    trial: Callable[..., dict[str, Any]],
    plain: list[str],
    column: str | None,
    tried: dict[str, Any],
) -> None:
    """No reward function scored the first row (None or NaN on both stand-ins), and the rewards are functions
    only: try the answers (or responses) of the next rows, up to ``TRIAL_ROWS`` in all. A run none of whose samples
    is scored stops at its first step or evaluation, after its run_dir is written; functions that return nothing
    but None or NaN on the reference answers of all these rows are refused here instead. Nothing is concluded
    where no row has a reference answer to try (an empty completion need not be scored: TRL's None), or where a
    function raised on one (``reward.on_error`` decides about those).

    Raises:
        RewardError: naming the functions, what they gave and the rows tried.
    """
    rows = stream.ds.select(range(1, min(TRIAL_ROWS, len(stream.ds))))
    column = column or next((c for c in ("answer", "response") if c in rows.column_names), None)
    if column is None:
        return
    keep = [i for i, t in enumerate(rows[column]) if t is not None and str(t).strip()]
    if not keep:
        return  # no other row has a reference answer to try: nothing to conclude
    rows = rows.select(keep)
    texts = [str(t) for t in rows[column]]
    ids = [stream.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    columns = {c: list(rows[c]) for c in rows.column_names if c != "prompt"}
    more = trial(list(rows["prompt"]), texts, ids, columns, plain)
    if _scored(more) or any(isinstance(got, RewardError) for got in more.values()):
        return
    gave = ", ".join(
        f"{name} " + ("failed (NaN under on_error=nan)" if isinstance(got, RewardError) else str(list(got)))
        for name, got in tried.items()
    )
    answered = stream.ds[0].get(column) not in (None, "")
    first = f"its {column}" if answered else "an empty stand-in (it has no answer)"
    rest = f", and nothing but None or NaN on the {column}s of {len(keep)} more rows either"
    raise RewardError(
        f"no reward function gave a score before the run started: {gave} on the first row of data.source "
        f"'{cfg.data.source}' ({first} and an empty completion){rest}. A sample that no function scores is not "
        "trained on, and a run none of whose samples is scored stops at its first step or evaluation, after its "
        "run_dir is written. Check that the functions read the dataset's columns under the names they are given "
        "(data.answer_column, reward.functions[i].kwargs) and return a number where they apply."
    )


def reward_pool(cfg: Config, model_options: dict[str, list[dict[str, Any]]] | None = None) -> RewardPool:
    """The run's reward actors (``reward.*``, ``fault.max_restarts``); reward models' actors with ``model_options``
    (from the placement)."""
    r = cfg.reward
    return RewardPool(
        reward_specs(cfg),
        num_workers=r.num_workers,
        on_error=r.on_error,
        timeout_s=r.timeout_s,
        num_cpus_per_worker=r.num_cpus_per_worker,
        max_restarts=cfg.fault.max_restarts,
        imports=r.imports,
        sandbox=asdict(r.sandbox),
        model_options=model_options,
    )


def reward_specs(cfg: Config) -> list[RewardSpec]:
    return specs_from_config(cfg.reward)


def reward_inputs(batch: data.PromptBatch, shard: RolloutShard, part: Rollout, samples: int) -> tuple:
    """(prompts, completions, completion_ids, columns) of a shard, every per-prompt list repeated per sample."""
    rows = [i for i in range(shard.lo, shard.hi) for _ in range(samples)]
    eos = int(part.sampler.get("eos_id", -1))
    ids = []
    for i in range(len(part)):
        toks = part.response_ids[i][part.step_map[i] >= 0].tolist()
        ids.append(toks[: toks.index(eos)] if eos in toks else toks)
    columns = {k: [v[r] for r in rows] for k, v in batch.columns.items()}
    return [batch.prompts[r] for r in rows], part.texts, ids, columns
