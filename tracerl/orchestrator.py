"""The RL loop (DESIGN §2): one driver process, everything heavy in Ray actors.

Each RL step, top to bottom:

1. ``PromptStream``   → P prompts (token ids), resumable
2. ``RolloutGroup``   → K actors sample G responses per prompt; shards come back version-stamped
3. ``RewardPool``     → each shard is scored as soon as it returns (not after the slowest one)
4. advantages         → group-relative advantages and the group filter (registries)
5. views              → the training rows of the kept samples (``trace.make_views``, registry ``views``)
6. ``LearnerGroup``   → M DeepSpeed ranks: old log-probs, TraceRL loss, optimizer steps
7. weight sync        → every rollout actor gets the new weights, version + 1 (registry ``WEIGHT_SYNC``)
8. metrics            → W&B, ``metrics.jsonl``, one console line; eval and checkpoints when due

The same code runs on a 2-core laptop (a local Ray instance on loopback, gloo, the tiny model) and on a
multi-node GPU cluster (``--ray-address``, nccl).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from rich.console import Console

from tracerl import checkpoint, data, stats, trace
from tracerl.advantages import compute_advantages
from tracerl.config import Config, ConfigError, check_cluster, to_dict
from tracerl.metrics import MetricsLogger, Timers, decoding_order_picture, truncate_jsonl
from tracerl.models import load_tokenizer
from tracerl.records import Rollout
from tracerl.reward_service import RewardResult, RewardService, RewardSpec, check_columns, merge_results
from tracerl.workers import WEIGHT_SYNC, LearnerGroup, RewardPool, RolloutGroup, RolloutShard, place

# --------------------------------------------------------------------------------------------------- the loop


def run(cfg: Config, *, verbose: bool = False, console: Console | None = None) -> dict[str, float]:
    """Train ``cfg`` for ``train.steps`` RL steps (resuming per ``checkpoint.resume``); returns the last metrics.
    The trained policy ends up as a Hugging Face directory in ``<run_dir>/final``.

    Everything is checked (config, data, rewards, cluster resources) before anything is written or started.
    """
    console = console or Console(soft_wrap=True)
    with Session.open(cfg, verbose, console) as s, stop_signals(console) as stop:
        last: dict[str, float] = {}
        if s.start_step == 0 and s.eval_set is not None:  # where training starts from
            last = s.evaluate(0)
            s.logger.log(last, step=0)
            s.console.print(eval_line(0, last, cfg.eval.k))
        for step in range(s.start_step + 1, cfg.train.steps + 1):
            timers, metrics = Timers(), {}
            with s.guard(step), timers("step"):
                batch = s.stream.next_batch(cfg.rollout.prompts_per_step)
                shards = s.rollout.generate_async(batch.prompt_ids, cfg.rollout.samples_per_prompt, seed(cfg, step))
                rollout, scored = s.collect(shards, batch, cfg.rollout.samples_per_prompt, timers)
                with timers("views"):
                    adv, keep, metrics = s.advantages(scored, rollout)
                    kept = rollout.select(keep.nonzero().squeeze(1))
                    views = s.views(kept, step) if len(kept) else None
                if views is None:
                    s.skipped_steps += 1  # every group filtered out: nothing to learn from, the run goes on
                else:
                    metrics |= s.update(kept, adv[keep], views, timers)
            metrics |= scored.metrics | stats.rollout_metrics(rollout) | timers.pop()
            metrics |= {"advantage/skipped_steps": float(s.skipped_steps), "sync/weights_version": float(s.version)}
            metrics |= {
                "fault/rollout_restarts": float(s.rollout.restarts),
                "fault/reward_restarts": float(s.rewards.restarts),
            }
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                with timers("eval"):
                    metrics |= s.evaluate(step)
                metrics |= timers.pop()
            s.log(step, metrics, rollout, scored, adv)
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 or step == cfg.train.steps or stop:
                s.save(step)
            last = metrics
            if stop:
                raise Interrupted(
                    f"stopped by {stop[0]} after RL step {step}; its checkpoint is in "
                    f"{checkpoint.checkpoint_dir(cfg.run_dir)}: resume with --resume auto."
                )
        checkpoint.export_hf(s.learner, Path(cfg.run_dir) / "final")
        s.console.print(
            f"[dim]metrics: {Path(cfg.run_dir) / 'metrics.jsonl'} · model: {Path(cfg.run_dir) / 'final'}[/dim]"
        )
        return last


def seed(cfg: Config, step: int, salt: int = 0) -> int:
    """The seed of one stage of one RL step: a run is reproducible, and a resumed run samples what the
    uninterrupted one would have."""
    return (cfg.seed * 1_000_003 + step) * 31 + salt


# --------------------------------------------------------------------------------------------------- the session


@dataclass
class Session:
    """Everything a run holds: data, actors, the logger, and the counters a checkpoint keeps."""

    cfg: Config
    console: Console
    stream: data.PromptStream
    eval_set: data.PromptBatch | None
    rollout: RolloutGroup
    learner: LearnerGroup
    rewards: RewardPool
    logger: MetricsLogger
    policy: dict[str, Any]  # what the rollout actors report about the policy (mask id, shift, ...)
    start_step: int = 0
    version: int = 0
    skipped_steps: int = 0
    saved_step: int = 0
    updating: bool = False  # inside the learner step or the sync (a failure there leaves no trustworthy state)
    cleanup: list[Any] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: Config, verbose: bool, console: Console) -> Iterator[Session]:
        """Check, start, resume; shut every actor down on the way out, whatever happens."""
        run_dir = Path(cfg.run_dir)
        resume = checkpoint.resolve_resume(run_dir, cfg.checkpoint.resume)
        stream, eval_set = load_prompts(cfg)
        check_rewards(cfg, stream.ds.column_names, cfg.data.source)
        cleanup: list[Any] = []
        try:
            if connect(cfg, verbose):
                cleanup.append(ray.shutdown)
            check_cluster(cfg, ray.cluster_resources().get("GPU", 0.0), "the Ray cluster")
            t0 = time.perf_counter()
            placement = place(cfg, ray.cluster_resources().get("GPU", 0.0))
            cleanup.append(placement.remove)
            rewards = reward_pool(cfg)
            cleanup.append(rewards.shutdown)
            learner = LearnerGroup(cfg, options=placement.learner)
            cleanup.append(learner.shutdown)
            rollout = RolloutGroup(cfg, placement.rollout)
            cleanup.append(rollout.shutdown)
            state = checkpoint.load_checkpoint(resume, learner) if resume is not None else None
            if state is not None:
                stream.load_state_dict(state.data)
                truncate_jsonl(run_dir / "metrics.jsonl", state.step)  # steps after the checkpoint are redone
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            logger = MetricsLogger(run_dir, to_dict(cfg), cfg.wandb, resume_id=state.wandb_run_id if state else None)
            cleanup.append(logger.close)
            s = cls(cfg, console, stream, eval_set, rollout, learner, rewards, logger, rollout.info[0], cleanup=cleanup)
            s.version, _ = WEIGHT_SYNC.lookup(cfg.rollout.sync)(learner, rollout)  # same weights on both sides
            if state is not None:
                s.start_step = s.saved_step = state.step
                s.skipped_steps = int(state.extra.get("skipped_steps", 0))
                checkpoint.restore_rng(state.rng)
            console.print(s.banner(time.perf_counter() - t0, resume))
            yield s
        finally:
            for fn in reversed(cleanup):
                with contextlib.suppress(Exception):
                    fn()

    # -- stages -------------------------------------------------------------------------------------------------

    def collect(
        self, shards: list[RolloutShard], batch: data.PromptBatch, samples: int, timers: Timers
    ) -> tuple[Rollout, RewardResult]:
        return collect(
            self.rollout, self.rewards, shards, batch, samples, timers, self.version, self.cfg.fault.max_restarts,
            self.learner.publish_weights,
        )  # fmt: skip

    def views(self, kept: Rollout, step: int) -> trace.Views:
        o = self.cfg.objective
        return trace.make_views(
            kept,
            o.views,
            self.policy["mask_id"],
            shift=self.policy["shift"],
            seed=seed(self.cfg, step, salt=1),
            shrink_s=o.shrink,
            prompt_mask_prob=o.d1_prompt_mask_prob,
            low=o.mask_ratio_low,
            high=o.mask_ratio_high,
        )

    def advantages(self, scored: RewardResult, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, dict]:
        o = self.cfg.objective
        return compute_advantages(
            torch.tensor(scored.total, dtype=torch.float32),
            rollout.group,
            rollout.truncated if o.truncated_is_wrong else None,
            advantage=o.advantage,
            group_filter=o.group_filter,
            low=o.filter_low,
            high=o.filter_high,
        )

    def update(self, kept: Rollout, adv: torch.Tensor, views: trace.Views, timers: Timers) -> dict[str, float]:
        """The learner step, then the weight sync; colocated on GPU the rollout copies leave the device while the
        learner trains."""
        self.updating = True
        offload = self.cfg.rollout.placement == "colocated" and self.cfg.rollout.offload_during_train
        with timers("train"):
            if offload:
                self.rollout.offload()
            metrics = self.learner.train_step(kept, adv, views)
            if offload:
                self.rollout.onload()
        with timers("sync"):
            self.version, nbytes = WEIGHT_SYNC.lookup(self.cfg.rollout.sync)(self.learner, self.rollout)
        self.updating = False
        return metrics | {
            "sync/weight_s": timers.seconds["sync"],
            "sync/bytes": float(nbytes),
            "trace/rows_per_sample": len(views) / len(kept),
            "trace/row_tokens": float(views.row_tokens),
        }

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy and sampled generations on the held-out prompts: ``eval/*``, and a JSONL of every sample with
        its reward and the exact sampling settings, under ``<run_dir>/eval/``."""
        if self.eval_set is None:
            return {}
        return evaluate(
            self.cfg, self.rollout, self.rewards, self.eval_set, self.version, step, self.eval_dir,
            weights=self.learner.publish_weights,
        )  # fmt: skip

    @property
    def eval_dir(self) -> Path:
        return Path(self.cfg.run_dir) / "eval"

    # -- monitoring, checkpoints --------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, float], rollout: Rollout, scored: RewardResult, adv: Any) -> None:
        t = metrics.get("time/step", 0.0)
        metrics["perf/tokens_per_s"] = metrics["rollout/generated_tokens"] / max(t, 1e-9)
        metrics["perf/rollout_share"] = metrics.get("time/rollout", 0.0) / max(t, 1e-9)
        self.logger.log(metrics, step=step)
        every = self.cfg.train.log_samples_every
        if every and (step % every == 0 or step == 1):
            self.log_samples(step, rollout, scored, adv)
        self.console.print(step_line(step, self.cfg.train.steps, metrics))
        if "eval/greedy_reward" in metrics:
            self.console.print(eval_line(step, metrics, self.cfg.eval.k))

    def log_samples(self, step: int, rollout: Rollout, scored: RewardResult, adv: Any) -> None:
        n = min(self.cfg.train.log_samples, len(rollout))
        names = list(scored.parts)
        columns = ["prompt", "completion", "reward", *names, "advantage", "weights_version"]
        decode = self.stream.tokenizer.decode
        prompts = [decode(rollout.prompt_ids[i][rollout.prompt_mask[i]].tolist()) for i in range(n)]
        rows = [
            [prompts[i], rollout.texts[i], scored.total[i], *[scored.parts[k][i] for k in names], float(adv[i]),
             rollout.weights_version]
            for i in range(n)
        ]  # fmt: skip
        self.logger.log_table("rollout/samples", columns, rows, step)
        pictures = Path(self.cfg.run_dir) / "pictures"
        pictures.mkdir(parents=True, exist_ok=True)
        path = decoding_order_picture(rollout.step_map[:n], pictures / f"decoding-order-{step}.png", f"RL step {step}")
        self.logger.log_image("rollout/decoding_order", path, step)

    def save(self, step: int) -> None:
        state = checkpoint.DriverState(
            step=step,
            weights_version=self.version,
            data=self.stream.state_dict(),
            wandb_run_id=self.logger.run_id,
            rng=checkpoint.capture_rng(),
            extra={"skipped_steps": self.skipped_steps},
        )
        checkpoint.save_checkpoint(self.cfg.run_dir, step, self.learner, state, self.cfg.checkpoint.keep_last)
        self.saved_step = step

    @contextlib.contextmanager
    def guard(self, step: int) -> Iterator[None]:
        """A step that fails before the learner touched its weights (a reward that raises, a dead rollout actor,
        Ctrl-C) leaves a checkpoint of the last finished step, so nothing is lost."""
        try:
            yield
        except BaseException as err:
            done = step - 1
            if done > self.saved_step and not self.updating:
                with contextlib.suppress(Exception):
                    self.save(done)
            where = checkpoint.checkpoint_dir(self.cfg.run_dir)
            note = (
                f" The last finished RL step is {done}; a checkpoint of step {self.saved_step} is in {where}: resume "
                "with --resume auto."
                if self.saved_step
                else ""
            )
            if isinstance(err, KeyboardInterrupt):
                self.console.print(f"[yellow]interrupted at RL step {step}.{note}[/yellow]")
                raise
            raise RunError(f"RL step {step} failed: {cause_message(err)}{note}") from err

    def banner(self, seconds: float, resume: Path | None) -> str:
        cfg, p = self.cfg, self.policy
        start = f"resumed from {resume} (step {self.start_step})" if resume else "fresh run"
        return (
            f"[bold]tracerl train[/bold] {cfg.model.family} {p['parameters'] / 1e6:.1f}M params · "
            f"{len(self.learner)} learner rank(s) · {len(self.rollout)} rollout actor(s) · "
            f"{cfg.reward.num_workers} reward worker(s) · {len(self.stream.ids)} train prompts · "
            f"{len(self.eval_set.prompt_ids) if self.eval_set else 0} held-out · {start} · ready in {seconds:.1f}s"
        )


class RunError(RuntimeError):
    """An RL step failed; the message says what and where the last checkpoint is."""


class Interrupted(RunError):
    """Ctrl-C or SIGTERM: the run stopped after a finished step, with a checkpoint of it."""


@contextlib.contextmanager
def stop_signals(console: Console) -> Iterator[list[str]]:
    """The first Ctrl-C / SIGTERM asks the loop to finish the current RL step, checkpoint it and stop (the list it
    yields becomes non-empty); a second one stops at once (KeyboardInterrupt)."""
    requested: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        del frame
        if requested:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)
        console.print("[yellow]stopping after this RL step (a checkpoint follows); again to stop at once[/yellow]")

    previous = {}
    with contextlib.suppress(ValueError):  # signals can only be caught in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cause_message(err: BaseException) -> str:
    """The underlying error of a Ray task failure (its own message, not Ray's traceback dump)."""
    cause = getattr(err, "cause", None)
    return str(cause) if cause is not None else str(err)


# --------------------------------------------------------------------------------------------------- setup


def connect(cfg: Config, verbose: bool) -> bool:
    """Join ``cluster.address`` or start a local Ray instance on loopback (dashboard off unless asked); returns
    whether this call started it (and so must stop it)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    if cfg.cluster.address:
        check_reachable(cfg.cluster.address)
        ray.init(address=cfg.cluster.address, **quiet)
        return True
    cpus = (
        cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank
        + cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker
        + cfg.reward.num_workers * cfg.reward.num_cpus_per_worker
    )
    # logical CPUs: enough for every actor of the run even on a 2-core laptop (they mostly take turns)
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)),
        include_dashboard=cfg.cluster.dashboard,
        **quiet,
    )
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, naming the setting, when nothing listens at a Ray cluster address."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or address, int(port or 6379)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"--ray-address / cluster.address '{address}': no Ray cluster answers there ({err}). Start one with "
            "'ray start --head --port=PORT' (see docs/cluster.md) and pass HOST:PORT, or leave it out to run on a "
            "local instance."
        ) from None


def load_prompts(cfg: Config) -> tuple[data.PromptStream, data.PromptBatch | None]:
    """The training stream and the held-out prompts: ``eval.source``, or ``eval.num_prompts`` whole prompts of
    ``data.source`` that never appear in training."""
    tokenizer = load_tokenizer(cfg.model)
    ds = data.load_examples(cfg.data, cfg.seed, require=("prompt",))
    held = None
    if cfg.eval.num_prompts and cfg.eval.source is None:
        train_rows, held_rows = stats.heldout_split(ds["prompt"], cfg.eval.num_prompts, cfg.seed)
        if not train_rows:
            raise ConfigError(
                f"eval.num_prompts={cfg.eval.num_prompts} holds out every distinct prompt of data.source "
                f"'{cfg.data.source}'; lower it or set eval.source to a separate dataset."
            )
        ds, held = ds.select(train_rows), ds.select(held_rows)
    elif cfg.eval.num_prompts:
        eval_cfg = type(cfg.data)(**{**asdict(cfg.data), "source": cfg.eval.source, "split": cfg.eval.split})
        held = data.load_examples(eval_cfg, cfg.seed, require=("prompt",))
        held = held.select(range(min(cfg.eval.num_prompts, len(held))))
    stream = data.PromptStream(ds, tokenizer, cfg.data, cfg.seed)
    eval_set = data.PromptStream(held, tokenizer, cfg.data, cfg.seed).all() if held is not None else None
    longest = max(len(p) for p in stream.ids) + cfg.sampling.max_new_tokens
    limit = cfg.model.tiny.max_position_embeddings if cfg.model.family == "tiny" and not cfg.model.path else None
    if limit is not None and longest > limit:
        raise ConfigError(
            f"the longest prompt ({longest - cfg.sampling.max_new_tokens} tokens) plus sampling.max_new_tokens "
            f"needs {longest} positions but the model has {limit}; lower data.max_prompt_tokens or "
            "sampling.max_new_tokens."
        )
    return stream, eval_set


def check_rewards(cfg: Config, columns: list[str] | None, source: str) -> None:
    """The reward functions resolve (names, import paths, files) and find the dataset columns they need."""
    r = cfg.reward
    service = RewardService(
        reward_specs(cfg), on_error=r.on_error, timeout_s=r.timeout_s, imports=r.imports, sandbox=asdict(r.sandbox)
    )
    if columns is not None:
        check_columns(service, columns, source)


def reward_pool(cfg: Config) -> RewardPool:
    """The run's reward actors (``reward.*``, ``fault.max_restarts``)."""
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
    )


def reward_specs(cfg: Config) -> list[RewardSpec]:
    return [
        RewardSpec(f.fn, f.weight, f.name, dict(f.kwargs), f.completion_format, f.factory_kwargs)
        for f in cfg.reward.functions
    ]


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


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate(
    cfg: Config,
    rollout: RolloutGroup,
    rewards: RewardPool,
    prompts: data.PromptBatch,
    version: int,
    step: int,
    out_dir: Path,
    tag: str | None = None,
    weights: Callable[[], tuple[int, Any]] | None = None,
) -> dict[str, float]:
    """``eval/*`` of the rollout actors' current weights on ``prompts`` (greedy + ``eval.samples`` sampled per
    prompt), written with every sample and the exact settings to ``out_dir/<tag>.jsonl`` and ``<tag>.json``.
    ``weights`` reloads a replacement for an actor that died (see ``collect``)."""
    settings = {"greedy": stats.eval_sampling(cfg, greedy=True), "sampled": stats.eval_sampling(cfg, greedy=False)}

    def sample(samples: int, salt: int, sampling: Any) -> tuple[Rollout, RewardResult]:
        shards = rollout.generate_async(prompts.prompt_ids, samples, seed(cfg, step, salt), sampling)
        return collect(rollout, rewards, shards, prompts, samples, Timers(), version, cfg.fault.max_restarts, weights)

    greedy, g_scored = sample(1, 7, settings["greedy"])
    sampled, s_scored = sample(cfg.eval.samples, 8, settings["sampled"])
    n = cfg.eval.samples
    per_prompt = [s_scored.total[i * n : (i + 1) * n] for i in range(len(prompts.prompt_ids))]
    answers = prompts.columns.get("answer")
    exact = [t.strip() == str(a).strip() for t, a in zip(greedy.texts, answers, strict=True)] if answers else None
    steps = float((greedy.step_map.max(-1).values + 1).clamp(min=0).sum())
    tokens_per_forward = float((greedy.step_map >= 0).sum()) / max(1.0, steps)
    metrics = stats.eval_metrics(g_scored.total, per_prompt, cfg.eval.k, cfg.eval.pass_threshold, exact,
                                 tokens_per_forward)  # fmt: skip
    tag = tag or f"step-{step}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"{tag}.jsonl").open("w") as f:
        for mode, r, scored, reps in (("greedy", greedy, g_scored, 1), ("sampled", sampled, s_scored, n)):
            for i in range(len(r)):
                p = i // reps
                row = {
                    "prompt_index": p,
                    "prompt": prompts.prompts[p],
                    "answer": answers[p] if answers else None,
                    "mode": mode,
                    "sample": i % reps,
                    "completion": r.texts[i],
                    "reward": scored.total[i],
                    "parts": {k: v[i] for k, v in scored.parts.items()},
                }
                f.write(json.dumps(row, default=str) + "\n")
    summary = {
        "step": step,
        "weights_version": version,
        "model": {"family": cfg.model.family, "path": cfg.model.path},
        "seed": cfg.seed,
        "k": cfg.eval.k,
        "samples": n,
        "pass_threshold": cfg.eval.pass_threshold,
        "sampling": {k: asdict(v) for k, v in settings.items()},
        "metrics": metrics,
    }
    (out_dir / f"{tag}.json").write_text(json.dumps(summary, indent=2))
    return metrics


def run_eval(cfg: Config, out_dir: str | None = None, verbose: bool = False, console: Console | None = None) -> dict:
    """``tracerl eval``: the loop's evaluation, on the rollout side only, for ``model.path`` as it is on disk."""
    console = console or Console(soft_wrap=True)
    _, eval_set = load_prompts(cfg)
    if eval_set is None:
        raise ConfigError("eval.num_prompts is 0: there is nothing to evaluate; set eval.num_prompts ≥ 1.")
    check_rewards(cfg, list(eval_set.columns) + ["prompt"], cfg.eval.source or cfg.data.source)
    cleanup: list[Any] = []
    try:
        if connect(cfg, verbose):
            cleanup.append(ray.shutdown)
        rewards = reward_pool(cfg)
        cleanup.append(rewards.shutdown)
        gpu = 1.0 if ray.cluster_resources().get("GPU", 0.0) > 0 else 0.0
        options = {"num_cpus": cfg.rollout.num_cpus_per_worker, "num_gpus": gpu}
        rollout = RolloutGroup(cfg, [options] * cfg.rollout.num_workers)
        cleanup.append(rollout.shutdown)
        out = Path(out_dir) if out_dir else Path(cfg.run_dir) / "eval"
        metrics = evaluate(cfg, rollout, rewards, eval_set, 0, 0, out, tag="eval")
        console.print(eval_line(0, metrics, cfg.eval.k))
        console.print(f"[dim]samples: {out / 'eval.jsonl'} · summary and sampling settings: {out / 'eval.json'}[/dim]")
        return metrics
    finally:
        for fn in reversed(cleanup):
            with contextlib.suppress(Exception):
                fn()


def collect(
    group: RolloutGroup,
    rewards: RewardPool,
    shards: list[RolloutShard],
    batch: data.PromptBatch,
    samples: int,
    timers: Timers,
    version: int,
    max_restarts: int = 0,
    weights: Callable[[], tuple[int, Any]] | None = None,
) -> tuple[Rollout, RewardResult]:
    """Wait for the rollout shards; send each to the reward pool the moment it returns; join both in prompt order.

    ``time/rollout`` runs until the last shard is back, ``time/reward`` is the scoring left after it. A shard
    sampled with another weights version than ``version`` is refused. A shard whose actor died is redone on a
    replacement actor loaded with ``weights()`` (the learner's current weights; None: ``cfg.model`` as on disk),
    at most ``max_restarts`` times.
    """
    start = time.perf_counter()
    by_ref = {s.ref: s for s in shards}
    pending, parts, futures, redone = list(by_ref), {}, {}, 0
    while pending:
        [ready], pending = ray.wait(pending, num_returns=1)
        shard = by_ref.pop(ready)
        try:
            part = ray.get(ready)
        except RayActorError as err:  # the actor died (killed, out of memory, node lost): replace it, redo
            redone += 1
            if redone > max_restarts:
                raise RuntimeError(
                    f"rollout actors died {redone} times in one step (fault.max_restarts={max_restarts}); last: {err}"
                ) from None
            new = group.redo(shard, weights() if weights else None)
            by_ref[new.ref] = new
            pending.append(new.ref)
            continue
        if part.weights_version != version:
            raise RuntimeError(
                f"a rollout shard (prompts {shard.lo}..{shard.hi - 1}) was sampled with weights version "
                f"{part.weights_version}, but the learner is at version {version}: a rollout actor missed a "
                "weight sync. Restart the run with --resume auto."
            )
        parts[shard.lo] = part
        futures[shard.lo] = rewards.score_async(*reward_inputs(batch, shard, part, samples))
    timers.add("rollout", time.perf_counter() - start)
    with timers("reward"):
        order = sorted(parts)
        scored = merge_results([rewards.gather(futures[lo]) for lo in order])
    rollout = Rollout.concat([parts[lo] for lo in order])
    rollout.group = torch.cat([parts[lo].group for lo in order])  # prompt index within the batch
    return rollout, scored


# --------------------------------------------------------------------------------------------------- console


def step_line(step: int, total: int, m: dict[str, float]) -> str:
    """One console line per RL step with the numbers that matter."""
    train = (
        f"loss {m['train/policy_loss']:+.4f} kl {m.get('train/kl_to_old', 0.0):.4f} "
        f"clip {m.get('train/clipfrac', 0.0):.2f}"
        if "train/policy_loss" in m
        else "[yellow]skipped: every group filtered out[/yellow]"
    )
    return (
        f"step {step:>4}/{total}  reward {m.get('reward/mean', float('nan')):.3f}±{m.get('reward/std', 0.0):.2f}  "
        f"kept {m.get('advantage/kept_fraction', 0.0):.0%}  {train}  len {m['rollout/response_length']:.1f}  "
        f"[dim]│ rollout {m.get('time/rollout', 0.0):.1f}s ({m['perf/rollout_share']:.0%}) "
        f"reward {m.get('time/reward', 0.0):.1f}s train {m.get('time/train', 0.0):.1f}s "
        f"sync {m.get('time/sync', 0.0):.2f}s · {m['perf/tokens_per_s']:.0f} tok/s[/dim]"
    )


def eval_line(step: int, m: dict[str, float], k: int) -> str:
    exact = f"  exact {m['eval/exact_match']:.3f}" if "eval/exact_match" in m else ""
    return (
        f"[bold cyan]eval[/bold cyan] step {step:>4}  greedy reward {m['eval/greedy_reward']:.3f}{exact}  "
        f"mean@{k} {m[f'eval/mean@{k}']:.3f}  pass@{k} {m[f'eval/pass@{k}']:.3f}  "
        f"({int(m['eval/prompts'])} held-out prompts)"
    )
