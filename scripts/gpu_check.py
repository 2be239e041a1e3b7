"""The prepared GPU check: one command, one JSON object on stdout (progress and tracebacks go to stderr).

It measures, on random models of real shapes (bf16, one GPU, no Ray):

- ``sampler``: the block sampler (``tracerl.sampling.generate`` → ``sample_block`` with the exact KV cache) on an
  SDAR-4B-shaped model (Qwen3-4B's config), batch 128, block 4, 4 steps per block, 256 new tokens, EOS stop
  off; tokens/s against JetEngine's published 5,000+ tok/s for SDAR-4B on an H200 (same batch and block).
  Then the same rollout with ``sampling.cuda_graph``: ``fixed_shape`` runs its full-width step eagerly
  (``capture=False``), ``cuda_graph`` captures it (CUDA only; skipped on CPU); each row has its tok/s (the
  graph row's includes its captures, also timed alone) and how its outputs agree with the static-cache run
  (and the graph row's with the eager fixed-shape run, which it should equal bitwise);
- ``replay``: the bf16 replay deviation |view log-prob − rollout_logp| (max, mean) of the trace views
  (``trace.make_views`` + ``trace.view_logprobs``) for the block layout and the full layout;
- ``learner``: one ``Learner.train_step`` (ZeRO-0, 1 rank, bf16) of the 4B model on the sampler's rollout:
  tokens/s and peak memory (``torch.cuda.max_memory_allocated``); LoRA adapters where full-parameter training
  (about 16 bytes per parameter) would not leave room for activations (an 80 GB GPU);
- ``packed``: packed block-layout views on a Qwen3-0.6B-shaped model: the log-prob deviation of each attention
  backend (flex, grouped, dense) from the rows on the same weights, and learner steps on the rows against steps
  on packed views (``auto``: grouped) and on packed views through FlexAttention (CUDA; grouped on CPU), each
  timed twice after a warm-up (the first full-batch step may still compile);
- ``rl_steps``: the stage breakdown of two RL steps of a Qwen3-0.6B-shaped model, in-process with the loop's own
  stage code: rollout (``generate`` on a separate rollout copy with the loop's per-sample seeds), reward
  (``RewardService`` with ``synthetic_exact`` on addition prompts), advantages and the group filter
  (``stages.advantages``), the kept samples (``stages.training_batch``), views and train (``Learner.train_step``
  builds the views of the kept samples, timed apart as ``time/views``, then trains), weight copy
  (``state_dict_for_rollout`` then ``load_state_dict`` into the rollout copy). What the loop adds
  around them (Ray actors, the object store, metrics) is not timed here;
- ``reward_model``: an 8B-shaped sequence classifier (Llama-3-8B's config, random weights, one label, bf16)
  scoring 128 completions of 1,024 tokens through ``SequenceClassifierReward.score_ids`` (the reward-model
  actors' code: packed by a token budget of 32,768, eval mode, inference mode): samples/s after a warm-up, peak
  memory, and the largest |batched − one-at-a-time| score over a few samples.
- ``diffusion_gemma``: the renoising canvas sampler on a DiffusionGemma-shaped random model (the released
  26B-A4B text config, bf16, canvas 256, 16 steps) at batch 1 and 64, against vLLM's published ≈1,756 tok/s at
  batch 1 (H100, FP8) and transformers' own generate at batch 1 in the same run
  (``scripts/gpu_check_diffusion_gemma.py``).

Each part is guarded: a failing part records ``error`` (and a traceback) in the JSON and the others still run.
Shapes, sizes and the model builders live in ``scripts/gpu_check_setup.py``.

On the GPU machine (torch and transformers there; no Ray, DeepSpeed or omegaconf, no package registry):

    bash scripts/gpu_wheels.sh        # here: builds wheels/ (DeepSpeed, omegaconf, pydantic, ..., tracerl)
    # there, in the repository root, with wheels/ carried along:
    python3 -m pip install -q --no-deps --no-index wheels/*.whl && \\
        PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out "$OUT/gpu_check.json"

``--out`` rewrites the file after every part, so a run stopped at its time limit keeps the parts it finished.
``--smoke`` runs every part on CPU with tiny shapes (fp32 models, bf16 learner) in well under a minute; the
tests run it. ``--parts sampler,learner`` runs a subset, ``--dtype`` overrides the models' dtype, and no part
starts after ``--budget-s`` seconds (default 420: the whole check fits in 8 minutes on one H200).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from gpu_check_diffusion_gemma import part_diffusion_gemma
from gpu_check_setup import (
    Plan,
    agreement,
    build_policy,
    clock,
    count_calls,
    count_captures,
    free,
    learner_config,
    log,
    make_plan,
    params,
    peak_memory_gib,
    random_prompts,
    reset_peak,
    sampling,
)

JETENGINE_TOK_S = 5000.0  # "5000+ tokens/second", SDAR-4B, block 4, batch 128, one H200 (FlashAttention-2 + Triton)
JETENGINE_SOURCE = "github.com/Labman42/JetEngine README: SDAR-4B, block size 4, batch size 128, NVIDIA H200"
PARTS = ("sampler", "learner", "replay", "packed", "rl_steps", "reward_model", "diffusion_gemma")
STAGES = ("rollout_s", "reward_s", "advantages_s", "views_s", "train_s", "weight_copy_s")  # of one RL step
WATCHED_IMPORTS = ("ray", "wandb", "datasets", "trl", "math_verify")  # absent on the GPU machine


# ---------------------------------------------------------------------------------------------- parts


def big_model(plan: Plan, ctx: dict[str, Any]) -> Any:
    if "big" not in ctx:
        log(f"building the {plan.big} block model on {plan.device}")
        ctx["big"] = build_policy(plan.big, plan, block=4)
        ctx["big"].eos_id = -1  # EOS stop off: no id is -1, so every sequence decodes all new tokens
    return ctx["big"]


def part_sampler(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from tracerl.sampling import generate

    policy = big_model(plan, ctx)
    prompts = random_prompts(policy, plan.batch, plan.prompt_tokens, seed=1)
    s = sampling(4, plan.new_tokens, plan.batch, "kv")
    generate(policy, prompts, replace(s, max_new_tokens=8), seed=0)  # warm-up at full batch: kernels, allocator
    reset_peak(plan.device)
    stats = count_calls(policy)
    start = clock()
    rollout = generate(policy, prompts, s, seed=0)
    seconds = clock() - start
    del policy.hidden_states  # back to the method
    ctx["rollout"] = rollout
    generated = int((rollout.step_map >= 0).sum())
    tok_s = generated / seconds
    return {
        "model": asdict(plan.big) | {"params": params(policy), "dtype": str(plan.dtype)},
        "batch": plan.batch,
        "block_size": s.block_size,
        "steps_per_block": s.steps_per_block,
        "prompt_tokens": plan.prompt_tokens,
        "new_tokens": plan.new_tokens,
        "cache": "kv",
        "generated_tokens": generated,
        "all_tokens_generated": generated == plan.batch * plan.new_tokens,
        "seconds": seconds,
        "tokens_per_s": tok_s,
        "model_calls": stats["calls"],
        "ms_per_model_call": 1000 * seconds / max(1, stats["calls"]),
        "peak_memory_gib": peak_memory_gib(plan.device),
        "reference_tokens_per_s": JETENGINE_TOK_S,
        "reference": JETENGINE_SOURCE,
        "ratio_to_reference": tok_s / JETENGINE_TOK_S,
        **graph_rows(plan, policy, prompts, s, rollout, tok_s),
    }


def graph_rows(
    plan: Plan, policy: Any, prompts: list[list[int]], s: Any, static: Any, static_tok_s: float
) -> dict[str, Any]:
    """The sampler part's ``fixed_shape`` (the cuda_graph step run eagerly) and ``cuda_graph`` (captured) rows,
    on the prompts, settings and seed of the ``static`` rollout; a failing row records its error, and the
    static row and the other parts keep theirs."""
    from tracerl.sampling import generate
    from tracerl.sampling.block import sample_block
    from tracerl.seeding import RowStreams, row_seeds

    graph_s = replace(s, cuda_graph=True)
    rows: dict[str, Any] = {}

    def fixed_shape() -> dict[str, Any]:
        streams = RowStreams(row_seeds(0, len(prompts)), policy.device)  # what generate(..., seed=0) draws with
        start = clock()
        rows["_eager"] = eager = sample_block(policy, prompts, graph_s, streams, capture=False)
        seconds = clock() - start
        tok_s = int((eager.step_map >= 0).sum()) / seconds
        return {"seconds": seconds, "tokens_per_s": tok_s, "ratio_to_static": tok_s / static_tok_s} | {
            "vs_static": agreement(eager, static)
        }

    def cuda_graph() -> dict[str, Any]:
        reset_peak(plan.device)
        stats, restore = count_captures()
        try:
            start = clock()
            graphed = generate(policy, prompts, graph_s, seed=0)
            seconds = clock() - start
        finally:
            restore()
        generated = int((graphed.step_map >= 0).sum())
        out = {
            "seconds": seconds,
            "tokens_per_s": generated / seconds,
            "tokens_per_s_without_capture": generated / (seconds - stats["capture_s"]),
            "ratio_to_static": generated / seconds / static_tok_s,
            "ratio_to_reference": generated / seconds / JETENGINE_TOK_S,
            "peak_memory_gib": peak_memory_gib(plan.device),
            **stats,
            "vs_static": agreement(graphed, static),
        }
        if "_eager" in rows:  # the same kernels on the same shapes: expected bitwise equal
            out["vs_fixed_shape"] = agreement(graphed, rows["_eager"])
        return out

    rows["fixed_shape"] = guarded(fixed_shape)
    if plan.device == "cuda":
        rows["cuda_graph"] = guarded(cuda_graph)
    else:
        rows["cuda_graph"] = {"skipped": "no CUDA device: CUDA-graph capture runs only on a GPU"}
    rows.pop("_eager", None)
    return rows


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or its error and traceback."""
    try:
        return fn()
    except Exception as err:  # recorded; the rest of the check still runs
        log(f"{fn.__name__} failed:\n{traceback.format_exc()}")
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}


def part_learner(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from tracerl.learner import Learner, free_port
    from tracerl.sampling import generate

    policy, rollout = big_model(plan, ctx), ctx.pop("rollout", None)
    del ctx["big"]  # trained in place below: no later part may sample from it
    if rollout is None:  # the sampler part did not run or failed: sample a rollout of the same shape here
        prompts = random_prompts(policy, plan.batch, plan.prompt_tokens, seed=1)
        rollout = generate(policy, prompts, sampling(4, plan.new_tokens, plan.batch, "kv"), seed=0)
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(0))
    n_params = params(policy)
    free()
    reset_peak(plan.device)
    model_gib = torch.cuda.memory_allocated() / 2**30 if plan.device == "cuda" else 0.0
    cfg = learner_config(plan, checkpointing=True)
    # full-parameter bf16 training holds about 16 bytes per parameter (weights, fp32 master, Adam, gradients):
    # where that leaves no room for activations (4B on an 80 GB GPU), LoRA adapters are trained instead
    total = torch.cuda.get_device_properties(0).total_memory if plan.device == "cuda" else None
    lora = total is not None and 16 * n_params > 0.85 * total
    cfg.learner.lora.enabled = lora
    start = clock()
    learner = Learner(cfg, policy, master_port=free_port())  # never an inherited MASTER_PORT
    init_s = clock() - start
    views = learner.views_of(rollout)  # what train_step builds, for the counts below
    try:
        per_sample = views.seq_tokens().sum().item() / len(rollout)
        warm_samples = max(1, min(len(rollout), int(plan.micro_batch_tokens // per_sample)))
        start = clock()
        learner.train_step(rollout.select(range(warm_samples)), advantages[:warm_samples])  # kernels, Adam state
        warm_s = clock() - start
        start = clock()
        metrics = learner.train_step(rollout, advantages)
        step_s = clock() - start
        peak = peak_memory_gib(plan.device)
    finally:
        learner.destroy()
    row_tokens = int(views.seq_tokens().sum()) * cfg.learner.updates_per_step
    return {
        "model": asdict(plan.big) | {"params": n_params},
        "zero_stage": 0,
        "ranks": 1,
        "lora": (
            f"rank {cfg.learner.lora.rank}: 16 bytes × {n_params / 1e9:.1f}B parameters of full-parameter training "
            f"exceed 85% of this GPU's {total / 2**30:.0f} GiB"
            if lora
            else False
        ),
        "precision": "bf16",
        "gradient_checkpointing": True,
        "micro_batch_tokens": plan.micro_batch_tokens,
        "rows": views.num_rows,
        "sequences": len(views),
        "row_tokens": float(views.seq_tokens().float().mean()),
        "target_tokens": len(views.targets()),
        "engine_init_s": init_s,
        "warmup_step_s": warm_s,
        "warmup_samples": warm_samples,
        "step_s": step_s,
        "tokens_per_s": row_tokens / step_s,
        "target_tokens_per_s": metrics["train/tokens"] * cfg.learner.updates_per_step / step_s,
        "model_memory_gib": model_gib,
        "peak_memory_gib": peak,
        "peak_memory_source": "torch.cuda.max_memory_allocated" if plan.device == "cuda" else "process max RSS",
        "metrics": metrics,
    }


def replay_deviation(policy: Any, rollout: Any, token_budget: int) -> dict[str, float]:
    """max / mean |view log-prob − rollout_logp| over every target of the rollout's trace views."""
    from tracerl.trace import make_views, view_logprobs

    views = make_views(rollout, "trace", policy.mask_id)
    per_chunk = max(1, token_budget // views.row_tokens)
    diffs = []
    with torch.no_grad():
        for lo in range(0, len(views), per_chunk):
            rows = torch.arange(lo, min(lo + per_chunk, len(views)))
            logp = view_logprobs(policy, views, rows).cpu()
            mask = views.target_mask[rows]
            sample = views.row_sample[rows].unsqueeze(1).expand_as(mask)[mask]
            recorded = rollout.rollout_logp[sample, views.target_pos[rows][mask]]
            diffs.append((logp[mask] - recorded).abs())
    d = torch.cat(diffs).double()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "targets": d.numel(), "rows": len(views)}


def part_replay(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from tracerl.sampling import generate

    out: dict[str, Any] = {"model": asdict(plan.small), "dtype": str(plan.dtype)}
    for layout, block, cache in (("block", 4, "kv"), ("full", None, "none")):
        policy = build_policy(plan.small, plan, block=block, seed=2)
        policy.eos_id = -1
        prompts = random_prompts(policy, plan.replay_batch, plan.prompt_tokens, seed=3)
        s = sampling(4, plan.replay_new_tokens, plan.replay_batch, cache)
        rollout = generate(policy, prompts, s, seed=1)
        out[layout] = replay_deviation(policy, rollout, plan.micro_batch_tokens) | {"cache": cache}
        del policy, rollout
        free()
    return out


def part_packed(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    """Packed views on the device: log-probs of every attention backend against the rows (same weights), and
    learner steps on the rows against steps on packed views (auto: grouped) and through FlexAttention (CUDA)."""
    from tracerl.learner import Learner, free_port
    from tracerl.learner.core import packed_backend
    from tracerl.sampling import generate
    from tracerl.trace import make_views, target_logprobs

    policy = build_policy(plan.small, plan, block=4, seed=5)
    policy.eos_id = -1
    prompts = random_prompts(policy, plan.replay_batch, plan.prompt_tokens, seed=6)
    rollout = generate(policy, prompts, sampling(4, plan.replay_new_tokens, plan.replay_batch, "kv"), seed=2)
    n, length = len(rollout), rollout.response_ids.shape[1]
    out: dict[str, Any] = {"model": asdict(plan.small), "dtype": str(plan.dtype), "samples": n, "new_tokens": length}

    def placed(views: Any) -> torch.Tensor:
        with torch.no_grad():
            return views.targets().place(target_logprobs(policy, views).cpu(), n, length)

    rows = make_views(rollout, "trace", policy.mask_id)
    want = placed(rows)
    mask = rollout.response_mask
    out["rows"] = {
        "tokens": len(rows) * rows.row_tokens,
        "replay_max_abs": float((want - rollout.rollout_logp)[mask].abs().max()),
    }
    for backend in ("flex", "grouped", "dense"):
        start = clock()
        packed = make_views(
            rollout, "trace", policy.mask_id, pack=True, max_tokens=plan.micro_batch_tokens, attention=backend
        )
        got = placed(packed)
        out[backend] = {
            "tokens": int(packed.seq_tokens().sum()),
            "max_abs_vs_rows": float((got - want)[mask].abs().max()),
            "mean_abs_vs_rows": float((got - want)[mask].abs().mean()),
            "seconds": clock() - start,
        }
    steps = {}
    # rows; packed views as configured by default (auto: grouped); packed through FlexAttention (no backward on CPU)
    flex = "flex" if plan.device == "cuda" else "grouped"
    variants = (("rows", False, "auto"), ("packed", True, "auto"), ("packed_flex", True, flex))
    for key, packed_views, backend in variants:
        cfg = learner_config(plan, checkpointing=False)
        cfg.learner.packed_views = packed_views
        cfg.learner.packed_attention = backend
        model = build_policy(plan.small, plan, block=4, seed=5)
        learner = Learner(cfg, model, master_port=free_port())
        try:
            learner.train_step(rollout.select(range(min(2, n))), torch.zeros(min(2, n)))  # warm-up: kernels, compile
            reset_peak(plan.device)
            times = []
            for _ in range(2):  # the first full-batch step may still compile (new shapes); the second is steady
                start = clock()
                metrics = learner.train_step(rollout, torch.linspace(-1, 1, n))
                times.append(clock() - start)
            steps[key] = {
                "first_step_s": times[0],
                "step_s": times[1],
                "attention": packed_backend(backend) if packed_views else "rows",
                "tokens_per_sample": metrics["trace/tokens_per_sample"],
                "policy_loss": metrics["train/policy_loss"],
                "peak_memory_gib": peak_memory_gib(plan.device),
            }
        finally:
            learner.destroy()
            del model
            free()
    rows = steps["rows"]["step_s"]
    out["learner"] = steps | {
        "speedup": rows / steps["packed"]["step_s"],
        "speedup_flex": rows / steps["packed_flex"]["step_s"],
    }
    return out


def addition_prompts(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Synthetic addition questions and their answers (the task of ``data.source=synthetic:addition``)."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, 100, (n, 2), generator=g).tolist()
    return [f"what is {a}+{b}? answer:" for a, b in ab], [str(a + b) for a, b in ab]


def part_rl_steps(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from tracerl import seeding, stages
    from tracerl.learner import Learner, free_port
    from tracerl.models import DecoderPolicy
    from tracerl.reward_service import RewardService
    from tracerl.sampling import generate

    policy = build_policy(plan.small, plan, block=4, seed=4)
    rollout_policy = DecoderPolicy(
        copy.deepcopy(policy.model), policy.tokenizer, family="sdar", mask_id=policy.mask_id, block_size=4
    )
    cfg = learner_config(plan, checkpointing=False)
    start = clock()
    learner = Learner(cfg, policy, master_port=free_port())  # never an inherited MASTER_PORT
    init_s = clock() - start
    service = RewardService(["synthetic_exact"])
    s = sampling(4, plan.rl_new_tokens, plan.rl_prompts * plan.rl_group, "kv")
    steps = []
    try:
        for step in range(2):
            texts, answers = addition_prompts(plan.rl_prompts, seed=10 + step)
            prompts = [policy.tokenizer(t)["input_ids"] for t in texts]
            rep = [i for i in range(plan.rl_prompts) for _ in range(plan.rl_group)]
            t: dict[str, float] = {}
            t0 = clock()
            seeds = seeding.batch_seeds(cfg.seed, step + 1, plan.rl_prompts, plan.rl_group)  # the loop's seeds
            rollout = generate(rollout_policy, [prompts[i] for i in rep], s, group=torch.tensor(rep), seeds=seeds)
            t["rollout_s"] = clock() - t0
            t0 = clock()
            columns = {"answer": [answers[i] for i in rep]}
            scored = service.score([texts[i] for i in rep], rollout.texts, columns=columns)
            t["reward_s"] = clock() - t0
            t0 = clock()  # from here on the loop's own stage code (tracerl.stages), as Session.step runs it
            adv, keep, adv_metrics = stages.advantages(scored.total, rollout, cfg.objective)
            t["advantages_s"] = clock() - t0
            t0 = clock()
            outcome = stages.learner_outcome(adv, scored.total, rollout, cfg.objective)
            kept, kept_outcome = stages.training_batch(rollout, outcome, keep)
            seed = seeding.stage_seed(cfg.seed, step + 1, "views")
            metrics = learner.train_step(kept, kept_outcome, seed=seed) if len(kept) else {}  # views, then training
            t["views_s"] = metrics.get("time/views", 0.0)
            t["train_s"] = clock() - t0 - t["views_s"]
            t0 = clock()
            version, weights = learner.state_dict_for_rollout()
            t["weight_gather_s"] = clock() - t0
            t0 = clock()
            rollout_policy.model.load_state_dict(weights)
            t["weight_load_s"] = clock() - t0
            t["weight_copy_s"] = t["weight_gather_s"] + t["weight_load_s"]
            t["step_s"] = sum(t[k] for k in STAGES)
            t["rollout_share"] = t["rollout_s"] / t["step_s"]
            t |= {"weights_version": version, "kept_samples": len(kept)}
            t |= {"flat_groups": adv_metrics["advantage/flat_groups"]}
            t |= {"rows_per_sample": metrics.get("trace/rows_per_sample", 0.0)}
            t |= {"row_tokens": metrics.get("trace/row_tokens", 0.0)}
            t |= {"reward_mean": scored.metrics["reward/mean"], "policy_loss": metrics.get("train/policy_loss", 0.0)}
            steps.append(t)
            log(f"rl step {step}: " + ", ".join(f"{k}={v:.3g}" for k, v in t.items()))
        loaded = rollout_policy.model.state_dict()
        same = all(torch.equal(w.to(loaded[k].dtype), loaded[k].cpu()) for k, w in weights.items())
    finally:
        learner.destroy()
    return {
        "model": asdict(plan.small) | {"params": sum(p.numel() for p in rollout_policy.model.parameters())},
        "samples_per_step": plan.rl_prompts * plan.rl_group,
        "new_tokens": plan.rl_new_tokens,
        "engine_init_s": init_s,
        "steps": steps,
        "stage_share_last_step": {k: steps[-1][k] / steps[-1]["step_s"] for k in STAGES},
        "rollout_copy_matches_learner": same,
    }


def part_reward_model(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    """A reward model of 8B shape scoring a rollout's completions, as a reward-model actor does."""
    del ctx
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tracerl.config import RewardModelConfig
    from tracerl.models.tiny import char_tokenizer
    from tracerl.reward_models.classifier import SequenceClassifierReward

    sh = plan.rm
    config = LlamaConfig(
        vocab_size=sh.vocab, hidden_size=sh.hidden, intermediate_size=sh.intermediate, num_hidden_layers=sh.layers,
        num_attention_heads=sh.heads, num_key_value_heads=sh.kv_heads, head_dim=sh.head_dim,
        max_position_embeddings=max(8192, plan.rm_tokens), num_labels=1, pad_token_id=0,
    )  # fmt: skip
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    torch.manual_seed(0)
    t0 = clock()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(plan.device):
            model = LlamaForSequenceClassification(config).eval()
    finally:
        torch.set_default_dtype(previous)
    build_s = clock() - t0
    tok = char_tokenizer("0123456789")  # only its pad id (0) is used: the inputs are token ids already
    rm = SequenceClassifierReward.from_model(model, tok, RewardModelConfig(batch_tokens=plan.rm_batch_tokens), "rm")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, sh.vocab, (plan.rm_samples, plan.rm_tokens), generator=gen).tolist()
    rm.score_ids(ids[: max(1, plan.rm_batch_tokens // plan.rm_tokens)])  # warm-up: one forward of the real shape
    reset_peak(plan.device)
    t0 = clock()
    scores = rm.score_ids(ids)
    seconds = clock() - t0
    few = ids[:4]
    single = [rm.score_ids([x])[0] for x in few]
    return {
        "model": asdict(sh),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype),
        "samples": plan.rm_samples,
        "tokens_per_sample": plan.rm_tokens,
        "batch_tokens": plan.rm_batch_tokens,
        "forwards": -(-plan.rm_samples // max(1, plan.rm_batch_tokens // plan.rm_tokens)),
        "build_s": build_s,
        "seconds": seconds,
        "samples_per_s": plan.rm_samples / seconds,
        "tokens_per_s": plan.rm_samples * plan.rm_tokens / seconds,
        "peak_memory_gib": peak_memory_gib(plan.device),
        "scores_finite": all(math.isfinite(x) for x in scores),
        "batched_vs_single_max_abs": max(abs(a - b) for a, b in zip(scores[:4], single, strict=True)),
    }


RUNNERS: dict[str, Callable[[Plan, dict[str, Any]], dict[str, Any]]] = {
    "sampler": part_sampler,
    "learner": part_learner,
    "replay": part_replay,
    "packed": part_packed,
    "rl_steps": part_rl_steps,
    "reward_model": part_reward_model,
    "diffusion_gemma": part_diffusion_gemma,
}


# ---------------------------------------------------------------------------------------------- main


def run_part(name: str, plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    log(f"part {name}: start")
    start = time.perf_counter()
    held = torch.cuda.memory_allocated() / 2**30 if plan.device == "cuda" else 0.0  # what earlier parts left
    try:
        out = RUNNERS[name](plan, ctx)
    except Exception as err:  # recorded, and the other parts still run
        log(f"part {name} failed:\n{traceback.format_exc()}")
        out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    out["wall_s"] = time.perf_counter() - start
    out["allocated_at_start_gib"] = held
    free()
    log(f"part {name}: done in {out['wall_s']:.1f} s")
    return out


def header(plan: Plan, smoke: bool) -> dict[str, Any]:
    import transformers

    device = torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu"
    return {
        "device": device,
        "smoke": smoke,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every part on CPU with tiny shapes")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", default=None, help="also write the JSON here, rewritten after every part")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="of the sampled models")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many seconds")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--parts: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: the full check needs one GPU; use --smoke for the CPU run")
    plan = make_plan(args.smoke)
    if args.dtype:
        plan = replace(plan, dtype=getattr(torch, args.dtype))

    # Libraries that log to stdout (DeepSpeed does) write to stderr instead: stdout carries only the JSON.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    start = time.perf_counter()
    head, results = header(plan, args.smoke), {}
    ctx: dict[str, Any] = {}
    for name in parts:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            results[name] = {"error": f"skipped: {elapsed:.0f} s had passed, over --budget-s={args.budget_s:.0f}"}
        else:
            results[name] = run_part(name, plan, ctx)
        report = (
            head
            | results
            | {
                "total_s": time.perf_counter() - start,
                "imports": {m: m in sys.modules for m in WATCHED_IMPORTS},
            }
        )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    json_out.write(json.dumps(report) + "\n")
    json_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
