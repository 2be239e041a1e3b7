"""The RL loop (DESIGN §2): one driver process, everything heavy in Ray actors.

Each RL step, top to bottom:

1. ``PromptStream``   → P prompts (token ids), resumable
2. ``RolloutGroup``   → K actors sample G responses per prompt; shards come back version-stamped
3. ``RewardPool``     → each shard is scored as soon as it returns (not after the slowest one)
4. advantages         → group-relative advantages and the group filter (registries)
5. ``LearnerGroup``   → M learner ranks, each sent its shard of the kept samples: it builds their training
                        views (registry ``views``; never on the driver), then old log-probs, TraceRL loss,
                        optimizer steps
6. weight sync        → every rollout actor gets the new weights, version + 1 (registry ``WEIGHT_SYNC``)
7. metrics            → W&B, ``metrics.jsonl``, one console line; eval and checkpoints when due

The same code runs on a 2-core laptop (a local Ray instance on loopback, gloo, the tiny model) and on a
multi-node GPU cluster (``--ray-address``, nccl).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from rich.console import Console

from tracerl import checkpoint, data, runs, scoring, seeding, stages, stats
from tracerl.config import Config, ConfigError, check_cluster, check_training, logp_temperature, to_dict
from tracerl.metrics import MetricsLogger, Timers, decoding_order_picture
from tracerl.orchestrator import guards
from tracerl.orchestrator.console import eval_line, step_line
from tracerl.orchestrator.evaluation import collect, eval_rows, eval_table, evaluate, greedy_per_prompt
from tracerl.orchestrator.guards import DivergenceGuard, ValueWatch, guard_line, value_line
from tracerl.orchestrator.setup import (
    check_device,
    check_model,
    check_resources,
    check_rewards,
    connect,
    load_prompts,
    local_gpus,
    missing_answers,
    reward_pool,
    teardown,
    try_rewards,
    write_layout,
)
from tracerl.records import CanvasRollout, Rollout
from tracerl.reward_service import RewardResult
from tracerl.workers import (
    WEIGHT_SYNC,
    LearnerFailure,
    LearnerGroup,
    Placement,
    RewardPool,
    RolloutGroup,
    RolloutShard,
    place,
)
from tracerl.workers.rollout import sampler_batches

# --------------------------------------------------------------------------------------------------- the loop


def run(cfg: Config, *, verbose: bool = False, console: Console | None = None) -> dict[str, float]:
    """Train ``cfg`` for ``train.steps`` RL steps (resuming per ``checkpoint.resume``); returns the last metrics.
    The trained policy ends up as a Hugging Face directory in ``<run_dir>/final``. The same as ``tracerl train``:
    ``run(checks.load_config("configs/quickstart.yaml", ["train.steps=5"]))``.

    ``run_dir`` is locked for the whole run (``runs.lock``): a second run there is refused while this one runs.
    Before any actor starts and before anything is written, ``Session.open`` checks the resume target, the data
    and the tokenizer's coverage of it, the rewards, every sampler setting against the model (block size, cache,
    CUDA graphs, prompt plus response length; from the model's config alone), the estimator against the model's
    layout (``trace.check_estimator``) and the cluster's GPUs and resources. Third-party console output (W&B's,
    Ray's) only with ``verbose``.
    """
    console = console or Console(soft_wrap=True)
    with (
        runs.lock(cfg.run_dir, "train"),  # one command at a time in run_dir, held until the run returns or fails
        Session.open(cfg, verbose, console) as s,
        runs.stop_signals(console.print, "RL step") as stop,
    ):
        last: dict[str, float] = {}
        if s.start_step == 0 and s.eval_set is not None:  # where training starts from
            last = s.evaluate(0)
            s.logger.log(last, step=0)
            s.console.print(eval_line(0, last, cfg.eval.k))
            s.divergence.check(0, last, s.per_prompt)  # the start the held-out reward is compared with
            s.initial.extra["guard"] = s.divergence.state_dict()  # a learner rebuilt before any checkpoint keeps it
        step = s.start_step + 1
        while step <= cfg.train.steps:
            try:
                last = s.step(step, stop)
            except LearnerFailure as failure:  # rebuild the learner from the latest checkpoint, redo from there
                s.recover(failure)
                step = s.start_step + 1
                continue
            if stop:
                raise Interrupted(
                    f"stopped by {stop[0]} after RL step {step}; its checkpoint is in "
                    f"{checkpoint.checkpoint_dir(cfg.run_dir)}: resume with --resume auto."
                )
            step += 1
        checkpoint.export_hf(s.learner, Path(cfg.run_dir) / "final")
        s.console.print(
            f"[dim]metrics: {Path(cfg.run_dir) / 'metrics.jsonl'} · model: {Path(cfg.run_dir) / 'final'}[/dim]"
        )
        return last


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
    placement: Placement
    initial: checkpoint.DriverState  # where a learner rebuilt before the first checkpoint starts again
    start_step: int = 0
    version: int = 0
    skipped_steps: int = 0  # RL steps with no kept sample (every group filtered out)
    no_signal_steps: int = 0  # RL steps whose kept samples all had advantage 0 (every kept group scored flat)
    step_start: tuple[dict, dict] = ({}, {})  # data cursor and RNG states as the current step found them
    saved_step: int = 0
    updating: bool = False  # inside the learner step or the sync (a failure there leaves no trustworthy state)
    learner_restarts: int = 0
    recovery_s: float = 0.0  # the last learner rebuild, logged with the next step
    cleanup: list[Any] = field(default_factory=list)
    claim: runs.Claim | None = None  # the run's id and settings, recorded in each checkpoint it writes
    scored_any: bool = False  # a reward function has scored a sample in this run (a resumed run has)
    divergence: DivergenceGuard | None = None  # set in open(): the divergence guard of this run
    per_prompt: dict[str, list[float]] | None = None  # the last evaluation's greedy rewards, prompt by prompt
    value_watch: ValueWatch | None = None  # set in open(): reports a value model that learns nothing

    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: Config, verbose: bool, console: Console) -> Iterator[Session]:
        """Check, start, resume; shut every actor down on the way out, whatever happens. Everything that can be
        checked is checked before any actor starts and before anything is written to ``run_dir``: the resume
        target, the prompts and the tokenizer's coverage of them, the rewards, the sampler settings and the
        estimator against the model (from its config alone) and, once Ray is up, the cluster's GPUs and resources;
        then the reward functions on stand-in completions, in a reward actor, before the model loads."""
        run_dir = Path(cfg.run_dir)
        check_training(cfg)
        claim = runs.claim(cfg, "train")  # whose directory, what to resume (verified), before anything is written
        resume = claim.resume
        stream, eval_set = load_prompts(cfg)
        service = check_rewards(cfg, stream.ds.column_names, cfg.data.source, eval_set=eval_set)
        check_model(cfg, max(len(p) for p in stream.ids + (eval_set.prompt_ids if eval_set else [])))
        if local_gpus(cfg) is not None:
            check_device(cfg, local_gpus(cfg))
        for warning in guards.start_warnings(cfg, os.cpu_count() or 1) + missing_answers(
            cfg, service, stream.ds, eval_set
        ):
            console.print(f"[yellow]warning: {warning}[/yellow]")
        with teardown() as cleanup:
            if connect(cfg, verbose):
                cleanup.append(ray.shutdown)
            check_cluster(cfg, ray.cluster_resources().get("GPU", 0.0), "the Ray cluster")
            check_resources(cfg, ray.cluster_resources())
            check_device(cfg, ray.cluster_resources().get("GPU", 0.0))
            t0 = time.perf_counter()
            placement = place(cfg, ray.cluster_resources().get("GPU", 0.0))
            cleanup.append(placement.remove)
            rewards = reward_pool(cfg, placement.reward_models)
            cleanup.append(rewards.shutdown)
            try_rewards(cfg, stream, rewards.trial)  # where they run in a step, before any model loads or file
            learner = LearnerGroup(cfg, options=placement.learner)
            cleanup.append(learner.shutdown)
            rollout = RolloutGroup(cfg, placement.rollout)
            cleanup.append(rollout.shutdown)
            initial = checkpoint.DriverState(data=stream.state_dict(), rng=checkpoint.capture_rng())
            state = checkpoint.load_checkpoint(resume, learner, verified=True) if resume is not None else None
            runs.record(run_dir, claim)
            (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            resume_id = state.wandb_run_id if state else None
            logger = MetricsLogger(run_dir, to_dict(cfg), cfg.wandb, resume_id=resume_id, verbose=verbose)
            cleanup.append(logger.close)
            s = cls(
                cfg, console, stream, eval_set, rollout, learner, rewards, logger, rollout.info[0], placement, initial,
                cleanup=cleanup, claim=claim,
            )  # fmt: skip
            s.divergence = DivergenceGuard(cfg.guard, s.monitors())
            s.value_watch = ValueWatch(cfg.guard) if cfg.objective.value_model else None
            s.version, _ = WEIGHT_SYNC.lookup(cfg.rollout.sync)(learner, rollout)  # same weights on both sides
            if state is not None:
                s.restore(state, resumed=True)
            write_layout(run_dir / "cluster.json", learner, rollout, rewards)
            for note in claim.notes:
                console.print(f"[yellow]{note}[/yellow]")
            console.print(s.banner(time.perf_counter() - t0, resume))
            yield s

    # -- one RL step, recovery -------------------------------------------------------------------------------

    def step(self, step: int, stop: list[str]) -> dict[str, float]:
        """RL step ``step``: rollout, rewards, advantages, views, update, sync, then metrics, eval and checkpoint
        when due; returns its metrics."""
        cfg, o = self.cfg, self.cfg.objective
        timers, metrics = Timers(), {}
        self.step_start = (self.stream.state_dict(), checkpoint.capture_rng())  # what a failed step leaves behind
        with self.guard(step), timers("step"):
            batch = self.stream.next_batch(cfg.rollout.prompts_per_step)
            samples = cfg.rollout.samples_per_prompt
            seeds = seeding.batch_seeds(cfg.seed, step, len(batch.prompt_ids), samples)
            tau = logp_temperature(cfg)  # the rollouts' log-probs are the ones the learner computes
            shards = self.rollout.generate_async(batch.prompt_ids, samples, seeds, logp_temperature=tau)
            rollout, scored = self.collect(shards, batch, samples, timers)
            if not self.scored_any and (problem := guards.nothing_scored(scored, step, cfg)):
                raise ConfigError(problem)
            self.scored_any = self.scored_any or any(v == v for v in scored.total)  # NaN != NaN
            with timers("advantages"):
                adv, keep, metrics = stages.advantages(scored.total, rollout, o)
            outcome = stages.learner_outcome(adv, scored.total, rollout, o)
            kept, kept_outcome = stages.training_batch(rollout, outcome, keep)
            if not len(kept):
                self.skipped_steps += 1  # every group filtered out: nothing to learn from, the run goes on
            else:
                no_signal = stages.no_signal(metrics["advantage/flat_groups"], o)
                metrics["advantage/no_signal"] = float(no_signal)  # trained on zero advantages: only KL terms act
                self.no_signal_steps += no_signal
                metrics |= self.update(kept, kept_outcome, step, timers)
        metrics |= scored.metrics | stats.rollout_metrics(rollout) | timers.pop()
        metrics |= stats.standard_errors(scored.total, scored.parts, rollout.group.tolist(), "reward/sem")
        metrics |= {
            "advantage/skipped_steps": float(self.skipped_steps),
            "advantage/no_signal_steps": float(self.no_signal_steps),
            "sync/weights_version": float(self.version),
        }
        metrics |= {
            "fault/rollout_restarts": float(self.rollout.restarts),
            "fault/reward_restarts": float(self.rewards.restarts),
            "fault/reward_model_restarts": float(self.rewards.model_restarts),
            "fault/learner_restarts": float(self.learner_restarts),
            "fault/rollout_restart_s": self.rollout.restart_s,  # run totals: time spent replacing actors
            "fault/reward_restart_s": self.rewards.restart_s,
        }
        if self.recovery_s:
            metrics["fault/learner_recovery_s"], self.recovery_s = self.recovery_s, 0.0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            with timers("eval"):
                metrics |= self.evaluate(step)
            metrics |= timers.pop()
        self.log(step, metrics, rollout, scored, adv)
        if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 or step == cfg.train.steps or stop:
            self.save(step)
        return metrics

    def recover(self, failure: LearnerFailure) -> None:
        """A learner rank died. A live DeepSpeed group cannot take a new rank, so the whole group is shut down, a
        new one loads the latest complete checkpoint (or the initial weights), the rollout actors get its
        weights, and the run goes back to that step: the steps after it are redone (each appears once in
        ``metrics.jsonl``). Past ``fault.max_learner_restarts`` it stops with a ``RunError`` saying how to resume."""
        cfg, t0 = self.cfg, time.perf_counter()
        latest = checkpoint.latest_checkpoint(cfg.run_dir, self.claim.run_id if self.claim else None)
        if self.learner_restarts >= cfg.fault.max_learner_restarts:
            where = f"The latest complete checkpoint is {latest}" if latest else "No checkpoint was written yet"
            raise RunError(
                f"{failure}. A DeepSpeed group cannot take a new rank, so the loop rebuilds the whole learner from "
                f"the latest checkpoint, at most fault.max_learner_restarts={cfg.fault.max_learner_restarts} times "
                f"per run, and {self.learner_restarts} rebuild(s) are spent. {where}: find why the rank died (out of "
                "memory, a lost node: the Ray logs say), then resume with --resume auto."
            ) from failure
        self.learner_restarts += 1
        self.learner.shutdown(force=True)  # the survivors may be stuck in a collective with the dead rank
        self.learner = LearnerGroup(cfg, options=self.placement.learner)
        self.cleanup.append(self.learner.shutdown)
        state = checkpoint.load_checkpoint(latest, self.learner) if latest is not None else self.initial
        self.rollout.forget_weight_group()
        self.version, _ = WEIGHT_SYNC.lookup(cfg.rollout.sync)(self.learner, self.rollout)
        self.restore(state)
        write_layout(Path(cfg.run_dir) / "cluster.json", self.learner, self.rollout, self.rewards)
        self.recovery_s = time.perf_counter() - t0
        source = f"checkpoint step {state.step}" if latest is not None else "the initial weights"
        self.console.print(
            f"[yellow]{failure}: learner rebuilt from {source} in {self.recovery_s:.1f}s (restart "
            f"{self.learner_restarts} of {cfg.fault.max_learner_restarts}); redoing from RL step {state.step + 1}"
            "[/yellow]"
        )

    def monitors(self) -> tuple[str, ...]:
        """The reward functions of weight 0: logged, not trained on; the divergence guard watches them."""
        return tuple(name for name, weight in self.rewards.weights.items() if weight == 0)

    def restore(self, state: checkpoint.DriverState, resumed: bool = False) -> None:
        """Put the driver back at ``state`` (the learner is already restored): data cursor, counters, metrics rows
        after its step dropped (they are redone), and after a resume the W&B run given the rows it lacks; RNGs
        last."""
        if note := self.stream.load_state_dict(state.data):
            self.console.print(f"[yellow]{note}[/yellow]")
        if resumed:
            self.logger.resume(state.step)
        else:
            self.logger.rewind(state.step)
        self.start_step = self.saved_step = state.step
        self.scored_any = self.scored_any or state.step > 0
        self.skipped_steps = int(state.extra.get("skipped_steps", 0))
        self.no_signal_steps = int(state.extra.get("no_signal_steps", 0))
        # the watches as they were after that step (fresh for a checkpoint written before they were kept)
        self.divergence = DivergenceGuard(self.cfg.guard, self.monitors())
        self.value_watch = ValueWatch(self.cfg.guard) if self.cfg.objective.value_model else None
        if state.extra.get("guard"):
            self.divergence.load_state_dict(state.extra["guard"])
        if self.value_watch and state.extra.get("value_watch"):
            self.value_watch.load_state_dict(state.extra["value_watch"])
        self.updating = False
        checkpoint.restore_rng(state.rng)

    # -- stages -------------------------------------------------------------------------------------------------

    def collect(
        self, shards: list[RolloutShard], batch: data.PromptBatch, samples: int, timers: Timers
    ) -> tuple[Rollout, RewardResult]:
        return collect(
            self.rollout, self.rewards, shards, batch, samples, timers, self.version, self.cfg.fault.max_restarts,
            self.learner.publish_weights,
        )  # fmt: skip

    def update(self, kept: Rollout | CanvasRollout, adv: torch.Tensor, step: int, timers: Timers) -> dict[str, float]:
        """The learner step (each rank builds the views of its shard of ``kept``, seeded per step), then the weight
        sync; colocated on GPU the rollout copies leave the device while the learner trains."""
        self.updating = True
        offload = self.cfg.rollout.placement == "colocated" and self.cfg.rollout.offload_during_train
        with timers("train"):
            if offload:
                self.rollout.offload()
            metrics = self.learner.train_step(kept, adv, seed=seeding.stage_seed(self.cfg.seed, step, "views"))
            if offload:
                self.rollout.onload()
        with timers("sync"):
            self.version, nbytes = WEIGHT_SYNC.lookup(self.cfg.rollout.sync)(self.learner, self.rollout)
        self.updating = False
        return metrics | {
            "sync/weight_s": timers.seconds["sync"],
            "sync/bytes": float(nbytes),
            "train/shard_bytes": float(max(self.learner.shard_bytes)),
            "perf/learner_flops": self.learner_flops(
                metrics["trace/tokens_per_sample"] * len(kept), chain_pass=isinstance(kept, CanvasRollout)
            ),
        }

    def learner_flops(self, tokens: float, chain_pass: bool) -> float:
        """Counted FLOPs of this step's learner passes over ``tokens`` view tokens (``scoring.learner_flops``):
        compute, not wall time. Renoising units always take the chain pass (old log-probs and self-conditioning
        states, ``rl.canvas_old``), whatever ``objective.old_logp_source`` says."""
        o, lc = self.cfg.objective, self.cfg.learner
        return scoring.learner_flops(
            tokens, int(self.policy["parameters"]), old_logp_pass=o.old_logp_source == "learner" or chain_pass,
            reference=o.kl_to_ref_coef > 0, value=o.value_model, updates_per_step=lc.updates_per_step,
            value_updates_per_step=lc.value_updates_per_step,
        )  # fmt: skip

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy and sampled generations on the held-out prompts: ``eval/*``, and a JSONL of every sample with
        its reward and the exact sampling settings, under ``<run_dir>/eval/``."""
        if self.eval_set is None:
            return {}
        metrics = evaluate(
            self.cfg, self.rollout, self.rewards, self.eval_set, self.version, step, self.eval_dir,
            weights=self.learner.publish_weights, unscored_is_error=not self.scored_any, failures_too=False,
        )  # fmt: skip
        rows = eval_rows(self.eval_dir / f"step-{step}.jsonl")
        self.logger.log_table("samples/eval", *eval_table(rows), step)
        self.per_prompt = greedy_per_prompt(rows)
        return metrics

    @property
    def eval_dir(self) -> Path:
        return Path(self.cfg.run_dir) / "eval"

    # -- monitoring, checkpoints --------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, float], rollout: Rollout, scored: RewardResult, adv: Any) -> None:
        t = metrics.get("time/step", 0.0)
        metrics["perf/tokens_per_s"] = metrics["rollout/generated_tokens"] / max(t, 1e-9)
        metrics["perf/rollout_share"] = metrics.get("time/rollout", 0.0) / max(t, 1e-9)
        per_prompt = self.per_prompt if "eval/greedy_reward" in metrics else None
        warnings = self.divergence.check(step, metrics, per_prompt) if self.divergence else []
        metrics["guard/warnings"] = float(len(warnings))
        value_idle = None
        if self.value_watch:
            value_idle = self.value_watch.check(metrics)
            metrics["guard/value_idle"] = float(self.value_watch.idle)
        self.logger.log(metrics, step=step)
        every = self.cfg.train.log_samples_every
        if every and (step % every == 0 or step == 1):
            self.log_samples(step, rollout, scored, adv)
        self.console.print(step_line(step, self.cfg.train.steps, metrics))
        if "eval/greedy_reward" in metrics:
            self.console.print(eval_line(step, metrics, self.cfg.eval.k))
        for message in warnings:
            self.console.print(guard_line(step, message))
            self.logger.alert("tracerl: divergence", f"RL step {step}: {message}", step)
        if value_idle:
            self.console.print(value_line(step, value_idle))

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
        self.logger.log_table("samples/rollout", columns, rows, step)
        pictures = Path(self.cfg.run_dir) / "pictures"
        pictures.mkdir(parents=True, exist_ok=True)
        path = decoding_order_picture(rollout.step_map[:n], pictures / f"decoding-order-{step}.png", f"RL step {step}")
        self.logger.log_image("rollout/decoding_order", path, step)

    def save(self, step: int, at_step_start: tuple[dict, dict] | None = None) -> None:
        """Checkpoint RL step ``step``. ``at_step_start``: the data cursor and RNG states as step ``step + 1`` found
        them, for a step that failed before it finished (its prompts must be drawn again on resume)."""
        data_state, rng = at_step_start or (self.stream.state_dict(), checkpoint.capture_rng())
        state = checkpoint.DriverState(
            step=step,
            weights_version=self.version,
            data=data_state,
            wandb_run_id=self.logger.run_id,
            rng=rng,
            extra={
                "skipped_steps": self.skipped_steps,
                "no_signal_steps": self.no_signal_steps,
                "guard": self.divergence.state_dict() if self.divergence else None,
                "value_watch": self.value_watch.state_dict() if self.value_watch else None,
            },  # fmt: skip
        )
        identity = self.claim.identity if self.claim else None
        checkpoint.save_checkpoint(self.cfg.run_dir, step, self.learner, state, self.cfg.checkpoint.keep_last, identity)
        self.saved_step = step

    @contextlib.contextmanager
    def guard(self, step: int) -> Iterator[None]:
        """A step that fails before the learner touched its weights (a reward that raises, rollout actors dying too
        often, a second Ctrl-C) leaves a checkpoint of the last finished step, so nothing is lost: with the data
        cursor and RNGs as the failed step found them, so a resumed run draws that step's prompts again."""
        try:
            yield
        except LearnerFailure:
            raise  # the learner is gone: nothing to save with; the loop rebuilds it from the latest checkpoint
        except BaseException as err:
            done = step - 1
            if done > self.saved_step and not self.updating:
                with contextlib.suppress(Exception):
                    self.save(done, self.step_start)
            where = checkpoint.checkpoint_dir(self.cfg.run_dir)
            note = (
                f" The last finished RL step is {done}; a checkpoint of step {self.saved_step} is in {where}: resume "
                "with --resume auto."
                if self.saved_step
                else f" No checkpoint was written before it (checkpoint.save_every={self.cfg.checkpoint.save_every}; "
                "0 saves only at the end)."
            )
            if isinstance(err, KeyboardInterrupt):
                self.console.print(f"[yellow]interrupted at RL step {step}.{note}[/yellow]")
                raise
            raise RunError(f"RL step {step} failed: {cause_message(err)}{note}") from err

    def banner(self, seconds: float, resume: Path | None) -> str:
        cfg, p = self.cfg, self.policy
        start = f"resumed from {resume} (step {self.start_step})" if resume else "fresh run"
        r = cfg.rollout
        batches = len(sampler_batches(r.prompts_per_step, r.samples_per_prompt, cfg.sampling.batch_size))
        idle = (
            f"\n[yellow]sampling.batch_size={cfg.sampling.batch_size} cuts an RL step into {batches} sampler "
            f"batch(es) for {len(self.rollout)} rollout actors: {len(self.rollout) - batches} stay idle. A step's "
            "batches do not depend on the actor count (so neither do its numbers); lower sampling.batch_size to "
            "use every actor.[/yellow]"
            if batches < len(self.rollout)
            else ""
        )
        return (
            f"[bold]tracerl train[/bold] {cfg.model.family} {p['parameters'] / 1e6:.1f}M params · "
            f"{len(self.learner)} learner rank(s) · {len(self.rollout)} rollout actor(s) · "
            f"{cfg.reward.num_workers} reward worker(s){self.reward_models_banner()} · "
            f"{len(self.stream.ids)} train prompts · "
            f"{len(self.eval_set.prompt_ids) if self.eval_set else 0} held-out · {start} · ready in {seconds:.1f}s"
            f"{idle}"
        )

    def reward_models_banner(self) -> str:
        models = self.rewards.model_workers
        return "".join(f" · reward model {name} on {len(actors)} actor(s)" for name, actors in models.items())


class RunError(RuntimeError):
    """An RL step failed; the message says what and where the last checkpoint is."""


class Interrupted(RunError, runs.Interrupted):
    """Ctrl-C or SIGTERM: the run stopped after a finished step, with a checkpoint of it."""


def cause_message(err: BaseException) -> str:
    """The underlying error of a Ray task failure (its own message, not Ray's traceback dump)."""
    cause = getattr(err, "cause", None)
    return str(cause) if cause is not None else str(err)
