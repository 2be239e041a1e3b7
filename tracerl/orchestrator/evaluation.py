"""Collecting scored rollouts (shards scored as they return) and the held-out evaluation, in the loop and as
``tracerl eval`` (DESIGN §17)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from rich.console import Console

from tracerl import data, runs, seeding, stats
from tracerl.checkpoint import check_writable
from tracerl.config import Config, ConfigError, check_reward_total
from tracerl.metrics import Timers, read_jsonl
from tracerl.models import ignored_tiny_settings
from tracerl.orchestrator.console import eval_line
from tracerl.orchestrator.guards import nothing_scored
from tracerl.orchestrator.setup import (
    check_device,
    check_model,
    check_resources,
    check_rewards,
    connect,
    load_prompts,
    local_gpus,
    missing_answers,
    reward_inputs,
    reward_pool,
    teardown,
)
from tracerl.records import Rollout
from tracerl.reward_service import RewardResult, merge_results
from tracerl.workers import PLACEMENTS, RewardPool, RolloutGroup, RolloutShard


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
    unscored_is_error: bool = True,
    failures_too: bool = True,
) -> dict[str, float]:
    """``eval/*`` of the rollout actors' current weights on ``prompts`` (greedy + ``eval.samples`` sampled per
    prompt), written with every sample and the exact settings to ``out_dir/<tag>.jsonl`` and ``<tag>.json``.
    Sample g of prompt p draws with ``seeding.eval_seed`` (the same at every step: evaluations of two checkpoints
    are paired). ``weights`` reloads a replacement for an actor that died (see ``collect``).

    Raises:
        ConfigError: with ``unscored_is_error`` (``tracerl eval``, and a run before its first scored sample),
            no sample could be scored: every reward gave None or NaN (``failures_too``: or failed under
            ``reward.on_error=nan``, which a run excuses as it does in its RL steps). Later in a run such an
            evaluation is logged as NaN, for the divergence guard to read.
    """
    settings = {"greedy": stats.eval_sampling(cfg, greedy=True), "sampled": stats.eval_sampling(cfg, greedy=False)}

    def sample(samples: int, mode: str) -> tuple[Rollout, RewardResult]:
        seeds = seeding.eval_seeds(cfg.seed, len(prompts.prompt_ids), samples, mode)
        shards = rollout.generate_async(prompts.prompt_ids, samples, seeds, settings[mode])
        return collect(rollout, rewards, shards, prompts, samples, Timers(), version, cfg.fault.max_restarts, weights)

    greedy, g_scored = sample(1, "greedy")
    sampled, s_scored = sample(cfg.eval.samples, "sampled")
    problem = nothing_scored(merge_results([g_scored, s_scored]), step, cfg, evaluation=True, failures_too=failures_too)
    if unscored_is_error and problem:
        raise ConfigError(problem)  # not a score of 0: nothing could be scored
    n = cfg.eval.samples
    per_prompt = [s_scored.total[i * n : (i + 1) * n] for i in range(len(prompts.prompt_ids))]
    answers = prompts.columns.get("answer")
    exact = [stats.same_answer(t, a) for t, a in zip(greedy.texts, answers, strict=True)] if answers else None
    steps = float((greedy.step_map.max(-1).values + 1).clamp(min=0).sum())
    tokens_per_forward = float((greedy.step_map >= 0).sum()) / max(1.0, steps)
    metrics = stats.eval_metrics(g_scored.total, per_prompt, cfg.eval.k, cfg.eval.pass_threshold, exact,
                                 tokens_per_forward)  # fmt: skip
    metrics |= stats.standard_errors(g_scored.total, g_scored.parts, None, "eval/greedy_reward_sem")
    if len(g_scored.parts) > 1:  # each part on its own: a weight-0 verifier shows what a reward model is worth
        metrics |= stats.part_means(g_scored.parts, "eval/greedy_reward")
        metrics |= stats.part_means(s_scored.parts, f"eval/mean@{cfg.eval.k}")
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
                    "exact_match": stats.same_answer(r.texts[i], answers[p]) if answers else None,
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


EVAL_COLUMNS = ["prompt", "answer", "mode", "sample", "completion", "exact_match", "reward"]


def eval_rows(path: Path) -> list[dict[str, Any]]:
    """Every held-out sample of an evaluation's ``<tag>.jsonl``, as written."""
    return read_jsonl(path)


def eval_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of an evaluation's samples (``eval_rows``) as a W&B table."""
    return EVAL_COLUMNS, [[str(r["prompt"]), *(r[c] for c in EVAL_COLUMNS[1:])] for r in rows]


def greedy_per_prompt(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The greedy reward of each held-out prompt in an evaluation's samples (``eval_rows``; ``""``: the total, each
    part by name), in prompt order: what the divergence guard compares with the best evaluation, prompt by prompt."""
    greedy = sorted((r for r in rows if r["mode"] == "greedy"), key=lambda r: r["prompt_index"])
    out = {"": [float(r["reward"]) for r in greedy]}
    for name in greedy[0]["parts"] if greedy else ():
        out[name] = [float(r["parts"][name]) for r in greedy]
    return out


def run_eval(cfg: Config, out_dir: str | None = None, verbose: bool = False, console: Console | None = None) -> dict:
    """``tracerl eval``: the loop's evaluation, on the rollout side only, for ``model.path`` as it is on disk
    (checked like a run before any actor starts; the same seeds as the loop's evaluations, so it reproduces them)."""
    console = console or Console(soft_wrap=True)
    out = Path(out_dir) if out_dir else Path(cfg.run_dir) / "eval"
    check_reward_total(cfg)
    setting = "--out" if out_dir else "run_dir"
    check_writable(out, setting)  # before anything starts
    held_by = setting if out_dir else "run_dir's eval folder"  # two evaluations into one folder: both passed the check
    with runs.lock(out, "eval", held_by):
        return _run_eval(cfg, out, setting, verbose, console)


def _run_eval(cfg: Config, out: Path, setting: str, verbose: bool, console: Console) -> dict:
    held = [name for name in ("eval.json", "eval.jsonl") if (out / name).exists()]
    if held:
        raise ConfigError(
            f"{out} already holds an evaluation ({', '.join(held)}); tracerl eval does not overwrite one. Give "
            f"another {setting}, or move that one away first."
        )
    if not cfg.model.path:
        raise ConfigError(
            "tracerl eval scores the model at model.path, which is unset, so a randomly initialised "
            f"{cfg.model.family} model would be scored. Give model.path: a trained model directory (e.g. "
            "RUN_DIR/final, or a checkpoint exported with tracerl export) or a hub id."
        )
    _, eval_set = load_prompts(cfg)
    if eval_set is None:
        raise ConfigError("eval.num_prompts is 0: there is nothing to evaluate; set eval.num_prompts ≥ 1.")
    key = "eval.source" if cfg.eval.source else "data.source"
    service = check_rewards(cfg, list(eval_set.columns) + ["prompt"], cfg.eval.source or cfg.data.source, key=key)
    check_model(cfg, max(len(p) for p in eval_set.prompt_ids))
    if local_gpus(cfg) is not None:
        check_device(cfg, local_gpus(cfg))
    for warning in [ignored_tiny_settings(cfg.model), *missing_answers(cfg, service, None, eval_set)]:
        if warning:
            console.print(f"[yellow]warning: {warning}[/yellow]")
    with teardown() as cleanup:
        if connect(cfg, verbose):
            cleanup.append(ray.shutdown)
        check_resources(cfg, ray.cluster_resources(), learner=False)
        check_device(cfg, ray.cluster_resources().get("GPU", 0.0))
        placement = PLACEMENTS.lookup("separate")(cfg, ray.cluster_resources().get("GPU", 0.0))
        rewards = reward_pool(cfg, placement.reward_models)
        cleanup.append(rewards.shutdown)
        rollout = RolloutGroup(cfg, placement.rollout)
        cleanup.append(rollout.shutdown)
        metrics = evaluate(cfg, rollout, rewards, eval_set, 0, 0, out, tag="eval")
        console.print(eval_line(0, metrics, cfg.eval.k))
        console.print(f"[dim]samples: {out / 'eval.jsonl'} · summary and sampling settings: {out / 'eval.json'}[/dim]")
        return metrics


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
    start, restarts = time.perf_counter(), group.restarts
    by_ref = {s.ref: s for s in shards}
    pending, parts, futures = list(by_ref), {}, {}
    while pending:
        [ready], pending = ray.wait(pending, num_returns=1)
        shard = by_ref.pop(ready)
        try:
            part = ray.get(ready)
        except RayActorError as err:  # the actor died (killed, out of memory, node lost): replace it, redo
            died = group.restarts - restarts + (shard.incarnation == group.incarnation[shard.worker])
            if died > max_restarts:
                raise RuntimeError(
                    f"rollout actors died {died} times in one step (fault.max_restarts={max_restarts}); last: {err}"
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
    rollout = type(parts[order[0]]).concat([parts[lo] for lo in order])  # a Rollout or a CanvasRollout
    rollout.group = torch.cat([parts[lo].group for lo in order])  # prompt index within the batch
    return rollout, scored
