"""Masked-diffusion SFT (``tracerl sft``) on prompt/response pairs, through the same DeepSpeed learner as RL.

- Full attention (LLaDA, Dream, masked LMs, tiny-full): the MDLM objective (Sahoo et al. 2024; LLaDA, Nie et
  al. 2025). Per example a mask ratio t ~ U(ε, 1]; every response token is masked with probability t; the loss
  is Σ_{masked} −log p(x_j | x_t) / t / (response tokens), averaged over the batch. The 1/t weight makes it an
  upper bound on the negative log-likelihood.
- Block diffusion (SDAR, tiny-block): the same per block of the sampler's grid: per block a t, one row per
  example in the block layout [prompt blocks | clean response | noisy response] (``trace.build_views`` with
  custom ``RowMasks``), so each noisy block is predicted from the clean blocks before it, as at sampling time.

- Renoising canvas models (DiffusionGemma): per canvas of the EOS-padded response a corruption rate t; each
  position replaced by a uniform random token with probability t; cross-entropy to the clean canvas at every
  position, its context the prompt and the clean canvases before; self-conditioning from a detached first pass on
  a share of the canvases (``canvas_trace.renoise_sft_batch``).

Responses are padded with EOS up to ``sampling.max_new_tokens`` and the padding is trained (LLaDA's recipe), so
the model learns to fill the tail of a fixed-length canvas with EOS.

dims: N examples · Lp prompt length · L response length · R rows (= N) · T row length
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tracerl import canvas_trace, checkpoint, data, runs, stats
from tracerl.config import Config, ConfigError, to_dict
from tracerl.learner import Learner, NonFiniteUpdate
from tracerl.metrics import MetricsLogger
from tracerl.models import load_policy
from tracerl.quiet import quiet_within
from tracerl.records import Rollout
from tracerl.sampling import generate, position_limit, renoising
from tracerl.trace import RowMasks, Views, build_views, region_blocks

# ---------------------------------------------------------------------------------------------- maths


def clean_rollout(
    pairs: list[tuple[list[int], list[int]]],
    *,
    length: int,
    pad_id: int,
    eos_id: int,
    block_size: int,
    layout: str,
    eos_padding: bool,
) -> Rollout:
    """Clean (prompt, response) pairs as a Rollout record: prompts left-padded, responses right-padded to
    ``length`` with EOS (``eos_padding``: the padding is trainable) or with pad tokens (not trainable)."""
    n = len(pairs)
    lp = max(len(p) for p, _ in pairs)
    prompt_ids = torch.full((n, lp), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, lp), dtype=torch.bool)
    response_ids = torch.full((n, length), eos_id if eos_padding else pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, length), dtype=torch.bool)
    for i, (prompt, response) in enumerate(pairs):
        prompt_ids[i, lp - len(prompt) :] = torch.tensor(prompt)
        prompt_mask[i, lp - len(prompt) :] = True
        response_ids[i, : len(response)] = torch.tensor(response)
        response_mask[i, : length if eos_padding else len(response)] = True
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        step_map=torch.where(response_mask, 0, -1),  # "generated" = part of the canvas
        response_mask=response_mask,
        rollout_logp=torch.zeros((n, length)),
        group=torch.arange(n),
        block_size=block_size,
        layout=layout,
        sampler={"pad_id": pad_id},
    )


def mdlm_masks(rollout: Rollout, eps: float, generator: torch.Generator) -> tuple[RowMasks, torch.Tensor]:
    """Random masks of the MDLM objective and each response token's ratio t [N, L].

    Full layout: one t ~ U(ε, 1] per example. Block layout: one t per example and block of the sampler's grid.
    Each trainable response token is masked (and scored) with probability t; non-trainable ones are masked and
    not scored.
    """
    n, length = rollout.response_ids.shape
    valid = rollout.response_mask
    if rollout.layout == "block":
        blocks = region_blocks(rollout)  # [N, L] block of each response position on the absolute grid
        per_block = eps + (1 - eps) * torch.rand(n, int(blocks.max()) + 1, generator=generator)
        t = per_block.gather(1, blocks)
    else:
        t = (eps + (1 - eps) * torch.rand(n, 1, generator=generator)).expand(n, length)
    masked = (torch.rand(n, length, generator=generator) < t) & valid
    sample = torch.arange(n)
    return RowMasks(sample, torch.zeros_like(sample), masked | ~valid, masked), t


def sft_views(
    rollout: Rollout, mask_id: int, shift: bool, eps: float, generator: torch.Generator
) -> tuple[Views, torch.Tensor]:
    """Training rows of one SFT batch and their loss weights [R, T] = 1 / (t · response tokens · N), so that
    −Σ weights · log p(target) is the batch-mean MDLM loss."""
    masks, t = mdlm_masks(rollout, eps, generator)
    views = build_views(rollout, masks, mask_id, shift)
    per_token = 1.0 / (t * rollout.response_mask.sum(1, keepdim=True).clamp(min=1) * len(rollout))  # [N, L]
    pos = views.target_pos.clamp(min=0)
    weights = per_token[views.row_sample.unsqueeze(1).expand_as(pos), pos]
    return views, torch.where(views.target_mask, weights, 0.0)


def canvas_sft_views(
    policy: Any, pairs: list[tuple[list[int], list[int]]], cfg: Config, generator: torch.Generator
) -> tuple[canvas_trace.CanvasRows, torch.Tensor]:
    """Rows and loss weights [R, C] of one renoising-SFT batch (``canvas_trace.renoise_sft_batch``): corruption
    rate t ~ U(sft.mask_eps, 1] per canvas, self-conditioning on ``sft.self_conditioning_prob`` of them at the
    sampler's temperature for that noise level (sampling.canvas.t_min … t_max)."""
    c = cfg.sampling.canvas
    b = canvas_trace.renoise_sft_batch(
        pairs,
        canvas_length=policy.canvas_length,
        vocab_size=policy.vocab_size,
        pad_id=policy.pad_id,
        eos_id=policy.eos_id,
        generator=generator,
        rate_eps=cfg.sft.mask_eps,
        sc_prob=cfg.sft.self_conditioning_prob,
        t_min=c.t_min,
        t_max=c.t_max,
    )
    return canvas_trace.CanvasRows(b.units, sc_temperature=b.sc_temperature), b.weights.flatten(1)


# ---------------------------------------------------------------------------------------------- run


class _Sampler:
    """Seeded epoch-by-epoch shuffling of example indices with a resumable cursor."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": self.n}

    def load_state_dict(self, state: dict[str, int]) -> str | None:
        """Continue from ``state``; → a note when it was saved over a training set of another size
        (``data.resume_position``), None when it continues where it stopped."""
        self.epoch, self.cursor, note = data.resume_position(state, self.n, SFT_DATA_SETTINGS)
        self._order = self._permutation()
        return note


SFT_DATA_SETTINGS = (
    "data.source, sft.eval_prompts (the examples held out of it) or data.max_prompt_tokens (those dropped)"
)


def exact_match_accuracy(policy: Any, prompts: list[list[int]], answers: list[str], cfg: Config) -> float:
    """Fraction of held-out prompts whose greedy completion (cut at EOS) states the reference answer:
    ``stats.same_answer``, the final answers compared (last ``\\boxed{}``, else after ``####``, else the text)."""
    if not prompts:
        return 0.0
    with torch.no_grad():  # greedy: the accuracy of the model, not of one draw from it
        rollout = generate(policy, prompts, replace(cfg.sampling, temperature=0.0), seed=cfg.seed)
    return sum(stats.same_answer(t, a) for t, a in zip(rollout.texts, answers, strict=True)) / len(prompts)


def check_sft_data(ds: Any, cfg: Config) -> None:
    """The examples can teach something: responses that are not all empty, and a held-out set
    (``sft.eval_prompts``, with evaluation on) that leaves at least as many examples to train on.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    responses = ds["response"]
    if all(not str(r).strip() for r in responses):
        raise ConfigError(
            f"every response of data.source '{cfg.data.source}' (data.response_column='{cfg.data.response_column}') "
            "is empty: SFT would teach the model to stop at once. Point data.response_column at the column that "
            "holds the target completions."
        )
    held = cfg.sft.eval_prompts if cfg.sft.eval_every > 0 else 0
    if held > len(ds) - held:
        raise ConfigError(
            f"sft.eval_prompts={held} holds out more of data.source '{cfg.data.source}' ({len(ds)} examples) than "
            f"it leaves to train on ({max(0, len(ds) - held)}). Lower sft.eval_prompts (at most "
            f"{len(ds) // 2} here), or turn evaluation off with sft.eval_every=0."
        )


def check_sft_positions(policy: Any, pairs: list[tuple[list[int], list[int]]], cfg: Config) -> None:
    """The longest batch SFT can draw fits the model's positions: the longest prompt (batches left-pad to it), the
    longest response with its EOS or the EOS padding to ``sampling.max_new_tokens`` (``sft.eos_padding``), and a
    block of slack for a block model. A batch beyond them failed or crawled on without a word.

    Raises:
        ConfigError: naming the lengths, the limit and the settings that shorten them.
    """
    limit = position_limit(policy)
    slack = policy.block_size or 0
    prompt = max(len(p) for p, _ in pairs)
    response = max(len(r) for _, r in pairs)
    padded = max(response, cfg.sampling.max_new_tokens if cfg.sft.eos_padding else 0)
    if limit is not None and prompt + padded + slack > limit:
        part = f"{response} response tokens" if padded == response else (
            f"{padded} response tokens (sft.eos_padding pads to sampling.max_new_tokens={padded})"
        )  # fmt: skip
        block = f" + a block of {slack}" if slack else ""
        raise ConfigError(
            f"the longest SFT batch of data.source '{cfg.data.source}' ({prompt} prompt + {part}{block}) needs "
            f"{prompt + padded + slack} positions, but the model has max_position_embeddings={limit}. Shorten or "
            f"drop the longest examples (data.response_column='{cfg.data.response_column}', data.max_prompt_tokens), "
            "or lower sampling.max_new_tokens."
        )


def run_sft(cfg: Config, progress: bool = True, verbose: bool = False) -> dict[str, float]:
    """Masked-diffusion SFT of ``cfg.model`` on ``cfg.data`` for ``cfg.sft.steps`` optimizer steps.

    Writes ``<run_dir>/config.json``, metrics to W&B and ``metrics.jsonl`` (a line per step, ``eval/accuracy`` every
    ``sft.eval_every`` steps on the last ``sft.eval_prompts`` examples, held out), checkpoints every
    ``checkpoint.save_every`` steps and at the end, and the trained policy as a Hugging Face directory in
    ``<run_dir>/final``. Resumes per ``checkpoint.resume``. Returns the last metrics, with
    ``eval/accuracy_before`` (step 0) and ``eval/accuracy`` (end) when evaluation is on. Third-party console
    output (transformers', DeepSpeed's, W&B's) only with ``verbose``. ``run_dir`` is locked while it runs
    (``runs.lock``): a second run there is refused.
    """
    with quiet_within(verbose), runs.lock(cfg.run_dir, "sft"):  # one command at a time in run_dir
        return _run_sft(cfg, progress, verbose)


def _run_sft(cfg: Config, progress: bool, verbose: bool) -> dict[str, float]:
    if cfg.learner.num_ranks != 1:
        raise ConfigError(
            f"tracerl sft trains on one learner rank; got learner.num_ranks={cfg.learner.num_ranks}. Set "
            "learner.num_ranks=1 (several ranks: drive a LearnerGroup with Learner.sft_step batches)."
        )
    run_dir = Path(cfg.run_dir)
    # SFT trains the policy alone: no value model, no reference copy, whatever the (shared) RL settings say; its
    # checkpoints record (and a resume checks) the settings it trains with; its loss is the model's own
    # log-likelihood, at temperature 1 whatever objective.logp_temperature says
    policy_only = replace(
        cfg,
        objective=replace(cfg.objective, value_model=False, kl_to_ref_coef=0.0, logp_temperature="model"),
    )
    claim = runs.claim(policy_only, "sft")  # whose directory, what to resume (verified), before anything is written
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 1. Model, data (the last eval_prompts examples are held out), learner.
    policy = load_policy(cfg.model)
    tok = policy.tokenizer
    ds = data.load_examples(cfg.data, cfg.seed, require=("prompt", "answer", "response"))
    data.check_coverage(tok, ds, cfg.data, data.tokenizer_fix(cfg.model))  # as tracerl train checks its data
    check_sft_data(ds, cfg)
    n_eval = cfg.sft.eval_prompts if cfg.sft.eval_every > 0 else 0
    pairs = data.sft_pairs(ds.select(range(len(ds) - n_eval)), tok, cfg.data)
    if not pairs:
        raise ValueError(f"no SFT examples left from data.source '{cfg.data.source}' (all prompts too long?)")
    check_sft_positions(policy, pairs, cfg)
    held = [ds[i] for i in range(len(ds) - n_eval, len(ds))]
    eval_prompts = [data.encode_prompt(tok, row["prompt"], cfg.data) for row in held]
    answers = [row["answer"] for row in held]
    layout = "block" if policy.block_size is not None else "full"
    block_size = policy.block_size or cfg.sampling.block_size
    learner = Learner(policy_only, policy, lr=cfg.sft.lr, total_steps=cfg.sft.steps)
    eval_policy = policy
    if cfg.learner.zero_stage == 3:  # partitioned weights cannot sample: evaluate a gathered copy
        eval_policy = load_policy(cfg.model)

    def accuracy() -> float:
        if eval_policy is not policy:
            eval_policy.model.load_state_dict(learner.merged_state_dict())
        return exact_match_accuracy(eval_policy, eval_prompts, answers, cfg)

    # 2. Resume, metrics (nothing is written before the model, the data and the learner have passed their checks).
    runs.record(run_dir, claim)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    sampler, step, result, run_id = _Sampler(len(pairs), cfg.seed), 0, {}, None
    resume = claim.resume
    for note in claim.notes:
        print(note)
    if resume is not None:
        state = checkpoint.load_checkpoint(resume, learner, verified=True)
        step, result, run_id = state.step, dict(state.extra.get("result", {})), state.wandb_run_id
        if note := sampler.load_state_dict(state.data):
            print(note)
        checkpoint.restore_rng(state.rng)
    logger = MetricsLogger(run_dir, to_dict(cfg), cfg.wandb, resume_id=run_id, verbose=verbose)
    if resume is not None:
        logger.resume(step)  # rows logged after the checkpoint are redone; W&B gets the rows it lacks
    if resume is None and n_eval:
        result["eval/accuracy_before"] = accuracy()
        logger.log({"eval/accuracy": result["eval/accuracy_before"]}, step=0)

    def save(at: int) -> None:
        state = checkpoint.DriverState(
            step=at,
            weights_version=learner.version,
            data=sampler.state_dict(),
            wandb_run_id=logger.run_id,
            rng=checkpoint.capture_rng(),
            extra={"result": result},
        )
        checkpoint.save_checkpoint(run_dir, at, learner, state, cfg.checkpoint.keep_last, claim.identity)

    # 3. Train.
    columns = (
        TextColumn("sft"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
        TimeElapsedColumn(),
    )
    last_acc = ""  # the latest held-back exact match, kept on the line between evaluations
    bar = Progress(*columns, disable=not progress)
    with bar, runs.stop_signals(bar.console.print, "SFT step") as stop:
        task = bar.add_task("sft", total=cfg.sft.steps, completed=step, info="")
        while step < cfg.sft.steps:
            t0 = time.perf_counter()
            batch = [pairs[i] for i in sampler.next(cfg.sft.batch_size)]
            length = max(cfg.sampling.max_new_tokens if cfg.sft.eos_padding else 0, max(len(r) for _, r in batch))
            rollout = (
                None
                if renoising(policy)
                else clean_rollout(
                    batch,
                    length=length,
                    pad_id=policy.pad_id,
                    eos_id=policy.eos_id,
                    block_size=block_size,
                    layout=layout,
                    eos_padding=cfg.sft.eos_padding,
                )
            )
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # resume-exact masks
            if renoising(policy):  # DiffusionGemma: uniform-token corruption of whole canvases
                views, weights = canvas_sft_views(policy, batch, cfg, generator)
            else:
                views, weights = sft_views(rollout, policy.mask_id, policy.shift, cfg.sft.mask_eps, generator)
            try:
                metrics = learner.sft_step(views, weights)
            except NonFiniteUpdate as err:  # nothing of the step was applied; nothing after it is saved or exported
                latest = checkpoint.latest_checkpoint(run_dir, claim.run_id)
                where = (
                    f"The latest checkpoint is {latest}: resume with --resume auto."
                    if latest is not None
                    else f"No checkpoint was written before it (checkpoint.save_every={cfg.checkpoint.save_every})."
                )
                learner.destroy()
                logger.close()
                raise NonFiniteUpdate(f"SFT step {step + 1} failed: {err} {where}") from None
            step += 1
            metrics["time/step"] = time.perf_counter() - t0
            if n_eval and (step % cfg.sft.eval_every == 0 or step == cfg.sft.steps):
                metrics["eval/accuracy"] = accuracy()
            logger.log(metrics, step=step)
            result.update(metrics)
            if "eval/accuracy" in metrics:
                last_acc = f" · exact match {metrics['eval/accuracy']:.2f} on {n_eval} held-back prompts"
            info = f"loss {metrics['train/loss']:.3f}{last_acc}"
            bar.update(task, completed=step, info=info)
            periodic = bool(cfg.checkpoint.save_every) and step % cfg.checkpoint.save_every == 0
            stopping = bool(stop) and step < cfg.sft.steps  # Ctrl-C / SIGTERM: this step is kept, then the run stops
            if (periodic or stopping) and step < cfg.sft.steps:
                save(step)
            if stopping:
                learner.destroy()
                logger.close()
                raise runs.Interrupted(
                    f"stopped by {stop[0]} after SFT step {step} of {cfg.sft.steps}; its checkpoint is in "
                    f"{checkpoint.checkpoint_dir(run_dir)}: resume with --resume auto."
                )

    # 4. Final checkpoint and export.
    save(step)
    checkpoint.export_hf(learner, run_dir / "final")
    learner.destroy()
    logger.close()
    return result
