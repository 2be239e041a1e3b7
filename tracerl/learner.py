"""The DeepSpeed learner (DESIGN §10); the only module that imports deepspeed.

One ``Learner`` is one DeepSpeed rank (``gloo`` on CPU, ``nccl`` on GPU; ZeRO 0-3; fp32 or bf16). An RL step
(``train_step``) runs, in order:

1. once, before any update: old log-probs of every target (or the rollout's own ``rollout_logp``), reference
   log-probs when ``objective.kl_to_ref_coef > 0``, and old token values when the value model is on;
2. value model (optional): step-level GAE advantages and returns from the pre-update values, then μ passes of
   clipped value-loss updates;
3. policy: μ = ``updates_per_step`` passes over the rows, each split into ``minibatches`` optimizer steps.

One optimizer step = one minibatch of rows, split over the ranks and packed into micro-batches by a token
budget (rows × row tokens ≤ ``micro_batch_tokens``, at least one row). **The engine owns accumulation and
clipping**: before every micro-batch the learner tells the engine whether it is the accumulation boundary
(``engine.set_gradient_accumulation_boundary``), then calls ``engine.backward`` and ``engine.step``; the engine
reduces gradients across ranks, clips them and steps the optimizer and LR schedule only at the boundary.
Because packing makes the number of micro-batches vary, the loss of a micro-batch is its exact share of the
minibatch loss: the loss is evaluated on minibatch-shaped tensors in which every row outside the micro-batch
is an inert placeholder (log-prob = old log-prob = advantage = 0, which contributes exactly 0 to the policy
loss, the KL terms and the value loss) while the normalisers (targets, rows, samples, L) are the whole
minibatch's. The micro-batch losses therefore sum to the minibatch loss, for every aggregation, and their
gradients to its gradient; multiplied by the world size, DeepSpeed's rank average gives the same gradient as
one rank holding every row.

dims: N samples · L response length · R rows · T row length · M target tokens · V vocab · H hidden
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import os
import socket
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from tracerl import advantages as adv_lib
from tracerl import objectives, trace
from tracerl.config import Config, LearnerConfig
from tracerl.models.value import ValueModel, enable_checkpointing
from tracerl.records import Rollout
from tracerl.scoring import LRSchedule, PolicyScorer, ValueScorer, response_token_steps, rows_from_response
from tracerl.trace import Views

deepspeed.utils.logger.setLevel(logging.WARNING)  # DeepSpeed logs every engine's config at INFO

TOKEN_METRICS = ("clipfrac", "kl_to_old", "kl_to_ref", "entropy")  # token means over every target of a step
PEAK_METRICS = ("log_ratio_abs_max",)  # maxima over every target of a step
VALUE_LR_RATIO = 5.0  # learner.value_lr = null: TraceRL's value / policy learning rates (5e-6 / 1e-6)

# ---------------------------------------------------------------------------------------------- setup


def ds_config(lc: LearnerConfig, lr: float, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine: torch's AdamW (nothing JIT-compiles), clipping and ZeRO stage.

    Micro-batch size and accumulation steps are 1 here on purpose: the learner marks the accumulation boundary
    itself (micro-batch counts vary with packing), so these numbers only feed DeepSpeed's sample counter.
    """
    zero: dict[str, Any] = {"stage": lc.zero_stage}
    if lc.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = lc.zero3_persistence_threshold
    return {
        "train_batch_size": world_size,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": lc.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": [lc.beta1, lc.beta2],
                "eps": lc.adam_eps,
                "weight_decay": lc.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": lc.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def free_port() -> int:
    """A TCP port that is free on this machine right now (for the rank-0 rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def resolve_backend(backend: str) -> str:
    """``auto`` → ``nccl`` when CUDA is available, else ``gloo``."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_distributed(
    rank: int, world_size: int, backend: str = "auto", addr: str = "127.0.0.1", port: int | None = None
) -> None:
    """Join (or reuse) the torch.distributed group without a launcher: set RANK, LOCAL_RANK (0: each rank sees
    one device), WORLD_SIZE, MASTER_ADDR and MASTER_PORT, then ``deepspeed.init_distributed``."""
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}; "
                f"cannot also be rank {rank} of {world_size} in this process"
            )
        return
    if port is None and (world_size == 1 or "MASTER_PORT" not in os.environ):
        port = free_port()  # one rank meets only itself: an inherited MASTER_PORT may belong to another process
    env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "MASTER_ADDR": addr}
    if port is not None:
        env["MASTER_PORT"] = str(port)
    os.environ.update(env)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # its JIT build takes ~30 s and gains nothing here
    deepspeed.init_distributed(
        dist_backend=resolve_backend(backend), auto_mpi_discovery=False, verbose=False, rank=rank, world_size=world_size
    )


# ---------------------------------------------------------------------------------------------- learner


class Learner:
    """One DeepSpeed rank training the policy (and optionally a value model) on TraceRL views.

    Args:
        cfg: the run config (``learner``, ``objective`` and ``seed`` are read).
        policy: a DiffusionPolicy; its ``model`` becomes the engine's module (trained in place).
        rank, world_size: this rank and the number of ranks; every rank must call every method together.
        lr, total_steps: override ``learner.lr`` / ``learner.total_steps`` (SFT uses its own).
        master_addr, master_port: rendezvous of rank 0 (default: this machine, a free port).
    """

    def __init__(
        self,
        cfg: Config,
        policy: Any,
        rank: int = 0,
        world_size: int = 1,
        *,
        lr: float | None = None,
        total_steps: int | None = None,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
    ) -> None:
        self.cfg, self.lc, self.obj = cfg, cfg.learner, cfg.objective
        self.policy, self.rank, self.world_size = policy, rank, world_size
        self.version = 0  # learner updates (train_step / sft_step calls) behind the current weights
        self.rl_steps = 0  # train_step calls; seeds the row order of each pass
        init_distributed(rank, world_size, self.lc.backend, master_addr, master_port)
        dtype = torch.bfloat16 if self.lc.precision == "bf16" else torch.float32
        total = total_steps if total_steps is not None else self.lc.total_steps

        # 1. Frozen copies first: ZeRO-3 partitions the policy's parameters in place when its engine starts.
        self.ref: PolicyScorer | None = None
        if self.obj.kl_to_ref_coef > 0:
            ref_policy = copy.copy(policy)
            ref_policy.model = copy.deepcopy(policy.model).to(dtype).eval().requires_grad_(False)
            self.ref = PolicyScorer(ref_policy, self.lc.logprob_chunk_tokens)
        value = ValueModel.from_policy(policy) if self.obj.value_model else None

        # 2. Engines.
        if self.lc.gradient_checkpointing:
            enable_checkpointing(policy.model)
            if value is not None:
                value.gradient_checkpointing_enable()
        self.engine = self._engine(
            PolicyScorer(policy, self.lc.logprob_chunk_tokens), lr if lr is not None else self.lc.lr, total
        )
        value_lr = self.lc.value_lr or VALUE_LR_RATIO * self.lc.lr
        self.value_engine = self._engine(ValueScorer(value), value_lr, total) if value is not None else None
        if self.ref is not None:
            self.ref.to(self.engine.device)

    def _engine(self, module: nn.Module, lr: float, total: int) -> Any:
        params = [p for p in module.parameters() if p.requires_grad]
        schedule = LRSchedule(self.lc.lr_schedule, self.lc.warmup_steps, total)
        engine, *_ = deepspeed.initialize(
            model=module,
            model_parameters=params,
            config=ds_config(self.lc, lr, self.world_size),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        return engine

    # ------------------------------------------------------------------------------------------ micro-batches

    def rows_per_micro_batch(self, views: Views) -> int:
        """Rows packed into one micro-batch: ⌊budget / row tokens⌋, at least one."""
        return max(1, self.lc.micro_batch_tokens // views.row_tokens)

    def _forward(self, scorer: Any, views: Views, rows: torch.Tensor, grad: bool) -> list[torch.Tensor]:
        """Run ``scorer`` on ``rows``; per-target outputs come back dense [r, T] (0 off the targets)."""
        device = self.engine.device
        mask = views.target_mask[rows].to(device)
        module = scorer.module if hasattr(scorer, "module") else scorer
        set_learner_mode(module, checkpointing=grad and self.lc.gradient_checkpointing)
        num_chunks = -1
        if self.lc.zero_stage == 3 and self.world_size > 1:  # equal LM-head calls on every rank (see PolicyScorer)
            count = torch.tensor([math.ceil(int(mask.sum()) / self.lc.logprob_chunk_tokens)], device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            num_chunks = int(count.item())
        with torch.set_grad_enabled(grad):
            packed = scorer(
                views.input_ids[rows].to(device),
                views.position_ids[rows].to(device),
                views.visible(rows).to(device),
                mask,
                views.target_ids[rows].to(device),
                num_chunks,
            )  # [K, M]
            return [torch.zeros(mask.shape, dtype=x.dtype, device=device).masked_scatter(mask, x) for x in packed]

    def _lockstep_chunks(self, count: int, rows_per_micro: int) -> list[torch.Tensor]:
        """This rank's share of ``count`` rows (positions 0..count-1) in micro-batch chunks; every rank gets the
        same number of chunks (possibly empty ones), so collectives inside forward/backward stay matched."""
        mine = torch.tensor_split(torch.arange(count), self.world_size)[self.rank]
        n_chunks = max(1, math.ceil(math.ceil(count / self.world_size) / rows_per_micro))
        return [mine[i * rows_per_micro : (i + 1) * rows_per_micro] for i in range(n_chunks)]

    @torch.no_grad()
    def infer(self, scorer: Any, views: Views) -> list[torch.Tensor]:
        """Per-target outputs of ``scorer`` (e.g. [logp, entropy]) for every row, [R, T] each on CPU, computed
        once with the rows split over the ranks."""
        n_rows = len(views)
        results: list[torch.Tensor] | None = None
        for chunk in self._lockstep_chunks(n_rows, self.rows_per_micro_batch(views)):
            rows = chunk if len(chunk) else torch.arange(1)
            outs = self._forward(scorer, views, rows, grad=False)
            if results is None:
                results = [torch.zeros(views.target_mask.shape, dtype=x.dtype, device=x.device) for x in outs]
            if len(chunk):
                for res, x in zip(results, outs, strict=True):
                    res[chunk] = x
        assert results is not None
        if self.world_size > 1:
            for res in results:
                dist.all_reduce(res)  # each rank filled its own rows; the others are 0
        return [res.cpu() for res in results]

    def logprobs(self, views: Views) -> torch.Tensor:
        """[R, T] log-prob of every target under the current policy (0 elsewhere)."""
        return self.infer(self.engine, views)[0]

    def _optimizer_step(
        self,
        engine: Any,
        views: Views,
        rows: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor],
        stats: dict[str, float],
    ) -> None:
        """One optimizer step over the minibatch ``rows`` (global row ids, the same on every rank).

        ``loss_fn(rows, positions, outputs)`` returns this micro-batch's exact share of the minibatch loss, where
        ``positions`` index ``rows`` and ``outputs`` are the scorer's dense [r, T] outputs for those rows.
        """
        chunks = self._lockstep_chunks(len(rows), self.rows_per_micro_batch(views))
        lr = float(engine.get_lr()[0])
        loss_total = 0.0
        norm: float | None = None
        for i, pos in enumerate(chunks):
            boundary = i == len(chunks) - 1
            engine.set_gradient_accumulation_boundary(boundary)
            outs = self._forward(engine, views, rows[pos] if len(pos) else rows[:1], grad=True)
            loss = loss_fn(rows, pos, outs) if len(pos) else outs[0].sum() * 0.0  # an idle rank still steps
            engine.backward(loss * self.world_size, scale_wrt_gas=False)  # ranks average: undo it, see module doc
            loss_total += float(loss.detach())
            if boundary and self.lc.zero_stage == 0 and self.lc.precision == "fp32":
                norm = _grad_norm(engine.module)  # this engine reports no norm; full reduced gradients are here
            engine.step()
            stats["micro_batches"] += 1
        engine.module.eval()  # the policy may sample in this process between steps
        if norm is None:
            reported = engine.get_global_grad_norm()
            norm = float(reported) if reported is not None else float("nan")
        stats["loss"] += self._sum(loss_total)
        stats["grad_norm"] += norm
        stats["lr"] = lr
        stats["optimizer_steps"] += 1

    def _sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t)
        return float(t.item())

    def _passes(self, n_rows: int, salt: int, passes: int | None = None) -> list[torch.Tensor]:
        """Minibatches of all μ passes (``passes``, default ``updates_per_step``): a seeded shuffle per pass
        (identical on every rank), then split."""
        out = []
        for p in range(passes or self.lc.updates_per_step):
            seed = ((self.cfg.seed * 1_000_003 + self.rl_steps) * 101 + p) * 2 + salt
            perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
            out.extend(mb for mb in torch.tensor_split(perm, self.lc.minibatches) if len(mb))
        return out

    # ------------------------------------------------------------------------------------------ RL step

    def train_step(self, rollout: Rollout, advantages: torch.Tensor, views: Views) -> dict[str, float]:
        """One RL step on ``views`` of ``rollout`` (every rank passes the same arguments).

        Args:
            rollout: the sampled batch (response length L, ``rollout_logp``, step map for the value model).
            advantages: [N] per sample (broadcast to each sample's rows), or [N, L] per token. With the value
                model on, [N] is the raw reward (``objective.value_target`` centered or reward) or the group
                advantage (``advantage``, TraceRL's z-scored reward), see ``advantages.value_outcome``; [N, L] are
                per-token process rewards.
            views: the training rows (``trace.make_views``).

        Returns:
            ``train/*`` metrics as floats: policy_loss, clipfrac, kl_to_old, kl_to_ref (with a reference),
            entropy, grad_norm, lr, tokens, micro_batches, optimizer_steps, and value_loss with a value model.
        """
        length = rollout.response_ids.shape[1]
        mask = views.target_mask
        metrics: dict[str, float] = {}

        # 1. Everything "old" is computed once, before any update.
        if self.obj.old_logp_source == "rollout":
            old_logp = rows_from_response(views, rollout.rollout_logp.float())
        else:
            old_logp = self.logprobs(views)
            if self.obj.views == "trace":  # the views replay the sampler's states: compare with what it recorded
                metrics.update(mismatch_metrics(old_logp, rows_from_response(views, rollout.rollout_logp), mask))
        ref_logp = self.infer(self.ref, views)[0] if self.ref is not None else None

        # 2. Value model: advantages from pre-update values (step GAE), then value updates.
        if self.value_engine is not None:
            adv_rows, value_metrics = self._value_phase(rollout, advantages, views)
            metrics.update(value_metrics)
        elif advantages.ndim == 2:
            adv_rows = rows_from_response(views, advantages.float())
        else:
            adv_rows = advantages.float()[views.row_sample]

        # 3. Policy updates.
        kw = dict(
            eps_low=self.obj.eps_low,
            eps_high=self.obj.eps_high,
            aggregation=self.obj.aggregation,
            norm_len=length,
            kl_aggregation=self.obj.kl_aggregation,
            kl_to_old_coef=self.obj.kl_to_old_coef,
            kl_to_old_kind=self.obj.kl_to_old_kind,
            kl_to_ref_coef=self.obj.kl_to_ref_coef,
            kl_to_ref_kind=self.obj.kl_to_ref_kind,
        )
        stats: dict[str, float] = defaultdict(float)
        sums: dict[str, float] = defaultdict(float)
        peaks: dict[str, float] = defaultdict(float)

        def loss_fn(mb_rows: torch.Tensor, pos: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
            logp, entropy = outs
            device, shape, glob = logp.device, (len(mb_rows), mask.shape[1]), mb_rows[pos]
            # minibatch-shaped tensors: this micro-batch's rows are real, every other row an inert placeholder
            loss, _ = objectives.policy_loss(
                torch.zeros(shape, device=device).index_put((pos.to(device),), logp),
                _placed(old_logp[glob], pos, shape, device),
                _placed(adv_rows[glob], pos, (len(mb_rows), *adv_rows.shape[1:]), device),
                mask[mb_rows].to(device),
                row_sample=views.row_sample[mb_rows].to(device),
                ref_logp=_placed(ref_logp[glob], pos, shape, device) if ref_logp is not None else None,
                **kw,
            )
            with torch.no_grad():  # metrics: token means over this micro-batch's own rows, summed over ranks
                own = mask[glob].to(device)
                _, m = objectives.policy_loss(
                    logp.detach(),
                    old_logp[glob].to(device),
                    adv_rows[glob].to(device),
                    own,
                    row_sample=views.row_sample[glob].to(device),
                    ref_logp=ref_logp[glob].to(device) if ref_logp is not None else None,
                    entropy=entropy.detach(),
                    **kw,
                )
                count = float(own.sum())
                for key in TOKEN_METRICS:
                    if f"train/{key}" in m:
                        sums[key] += m[f"train/{key}"] * count
                sums["count"] += count
                for key in PEAK_METRICS:
                    peaks[key] = max(peaks[key], m[f"train/{key}"])
            return loss

        for mb_rows in self._passes(len(views), salt=0):
            self._optimizer_step(self.engine, views, mb_rows, loss_fn, stats)
        totals = self._sum_all(sums)
        steps = max(1.0, stats["optimizer_steps"])
        metrics.update(
            {
                "train/policy_loss": stats["loss"] / steps,
                "train/grad_norm": stats["grad_norm"] / steps,
                "train/lr": stats["lr"],
                "train/tokens": float(mask.sum()),
                "train/micro_batches": stats["micro_batches"],
                "train/optimizer_steps": stats["optimizer_steps"],
            }
        )
        for key in TOKEN_METRICS:
            if key in totals:
                metrics[f"train/{key}"] = totals[key] / max(1.0, totals["count"])
        metrics.update({f"train/{k}": v for k, v in self._max_all(peaks).items()})
        self.rl_steps += 1
        self.version += 1
        return metrics

    def _sum_all(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        if self.world_size == 1 or not keys:
            return dict(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def _max_all(self, peaks: dict[str, float]) -> dict[str, float]:
        keys = sorted(peaks)
        if self.world_size == 1 or not keys:
            return dict(peaks)
        t = torch.tensor([peaks[k] for k in keys], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(keys, t.tolist(), strict=True))

    def _value_phase(
        self, rollout: Rollout, rewards: torch.Tensor, views: Views
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Step-GAE advantages [R, T] from the pre-update values, then the value updates (TraceRL §value)."""
        assert self.value_engine is not None
        n, length = rollout.response_ids.shape
        mask = views.target_mask
        old_values = self.infer(self.value_engine, views)[0]  # [R, T] value of each token in its own view
        token_values = trace.scatter_to_response(views, old_values, n, length)
        covered = trace.scatter_to_response(views, mask.float(), n, length) > 0
        token_mask = covered & rollout.response_mask
        token_steps = response_token_steps(rollout, self.obj.shrink)
        scale = torch.ones(n)
        if rewards.ndim == 2:  # per-token (process) rewards
            token_rewards = torch.where(token_mask, rewards.float(), 0.0)
            baseline = torch.zeros(n)
        else:
            outcome, baseline, scale = adv_lib.value_outcome(
                rewards.float(), rollout.group, self.obj.value_target, self.obj.advantage
            )
            token_rewards = adv_lib.outcome_token_rewards(outcome, token_steps, token_mask)
        token_adv, token_returns = adv_lib.step_gae(
            token_values, token_steps, token_rewards, token_mask, self.obj.gamma, self.obj.lam
        )
        token_adv = token_adv * scale.unsqueeze(1)
        returns = rows_from_response(views, token_returns)

        stats: dict[str, float] = defaultdict(float)

        def loss_fn(mb_rows: torch.Tensor, pos: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
            (values,) = outs
            device, shape, glob = values.device, (len(mb_rows), mask.shape[1]), mb_rows[pos]
            loss, _ = objectives.value_loss(
                torch.zeros(shape, device=device).index_put((pos.to(device),), values),
                _placed(old_values[glob], pos, shape, device),
                _placed(returns[glob], pos, shape, device),
                mask[mb_rows].to(device),
                row_sample=views.row_sample[mb_rows].to(device),
                eps=self.obj.value_eps,
                aggregation=self.obj.aggregation,
                norm_len=length,
            )
            return loss

        for mb_rows in self._passes(len(views), salt=1, passes=self.lc.value_updates_per_step):
            self._optimizer_step(self.value_engine, views, mb_rows, loss_fn, stats)
        steps = max(1.0, stats["optimizer_steps"])
        metrics = {
            "train/value_loss": stats["loss"] / steps,
            "train/value_grad_norm": stats["grad_norm"] / steps,
            "train/value_optimizer_steps": stats["optimizer_steps"],
            **adv_lib.value_metrics(token_values, token_returns, token_adv, baseline, token_mask),
        }
        return rows_from_response(views, token_adv), metrics

    # ------------------------------------------------------------------------------------------ SFT

    def sft_step(self, views: Views, weights: torch.Tensor) -> dict[str, float]:
        """One optimizer step on the weighted negative log-likelihood −Σ weights · log p(target | view).

        ``weights`` [R, T] (read at targets) carry the whole normalisation (e.g. 1 / (t · response tokens ·
        examples) for the MDLM loss), so micro-batches simply add up. Returns train/loss, grad_norm, lr, tokens,
        micro_batches.
        """
        rows = torch.arange(len(views))
        stats: dict[str, float] = defaultdict(float)

        def loss_fn(mb_rows: torch.Tensor, pos: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
            logp, glob = outs[0], mb_rows[pos]
            w = torch.where(views.target_mask[glob], weights[glob].float(), 0.0).to(logp.device)
            return -(w * logp).sum()

        self._optimizer_step(self.engine, views, rows, loss_fn, stats)
        self.version += 1
        return {
            "train/loss": stats["loss"],
            "train/grad_norm": stats["grad_norm"],
            "train/lr": stats["lr"],
            "train/tokens": float(views.target_mask.sum()),
            "train/micro_batches": stats["micro_batches"],
        }

    # ------------------------------------------------------------------------------------------ weights, state

    def state_dict_for_rollout(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, full policy weights on CPU under the native model's names); gathered under ZeRO-3, so
        every rank must call it."""
        out = {}
        for name, tensor in self.policy.model.state_dict(keep_vars=True).items():
            gathered = deepspeed.zero.GatheredParameters([tensor]) if hasattr(tensor, "ds_id") else None
            with gathered or contextlib.nullcontext():
                out[name] = tensor.detach().to("cpu", copy=True)
        return self.version, out

    def save_hf(self, out_dir: str | Path) -> None:
        """Write the policy as a Hugging Face directory (native ``save_pretrained`` + tokenizer) from rank 0;
        every rank calls it (ZeRO-3 weights are gathered)."""
        _, weights = self.state_dict_for_rollout()
        if self.rank == 0:
            self.policy.model.save_pretrained(out_dir, state_dict=weights)
            self.policy.tokenizer.save_pretrained(out_dir)

    def save(self, directory: str | Path) -> None:
        """Write engine state (weights, optimizer, LR schedule), value/reference state, the learner's counters
        and an HF copy of the policy (``hf/``) under ``directory``. Every rank calls it (shared filesystem)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(d / "policy"), tag="state")
        if self.value_engine is not None:
            self.value_engine.save_checkpoint(str(d / "value"), tag="state")
        self.save_hf(d / "hf")
        if self.rank == 0:
            if self.ref is not None:
                torch.save(self.ref.model.state_dict(), d / "ref.pt")
            state = {"version": self.version, "rl_steps": self.rl_steps, "world_size": self.world_size}
            (d / "learner.json").write_text(json.dumps(state))
        if self.world_size > 1:
            dist.barrier()

    def load(self, directory: str | Path) -> None:
        """Restore what ``save`` wrote (same ZeRO stage and number of ranks)."""
        d = Path(directory)
        state = json.loads((d / "learner.json").read_text())
        if state["world_size"] != self.world_size and self.lc.zero_stage > 0:
            raise ValueError(
                f"checkpoint {d} was written by {state['world_size']} ZeRO ranks; this learner has {self.world_size}"
            )
        self.engine.load_checkpoint(str(d / "policy"), tag="state")
        if self.value_engine is not None:
            self.value_engine.load_checkpoint(str(d / "value"), tag="state")
        if self.ref is not None:
            self.ref.model.load_state_dict(torch.load(d / "ref.pt", map_location="cpu"))
        self.version, self.rl_steps = int(state["version"]), int(state["rl_steps"])

    def destroy(self) -> None:
        """Release the engines (several learners may live one after another in a process)."""
        for engine in (self.engine, self.value_engine):
            if engine is not None:
                engine.destroy()
        self.engine = self.value_engine = self.ref = None  # type: ignore[assignment]
        gc.collect()


def set_learner_mode(module: nn.Module, checkpointing: bool) -> None:
    """Dropout off in every learner pass, so "old" and "new" log-probs come from the same function.

    transformers checkpoints activations only in modules whose ``training`` flag is set, so with gradient
    checkpointing only the modules that own the switch (``gradient_checkpointing`` attribute: decoder layers and
    the backbone) are put in training mode; every other module, dropout and attention included, stays in eval.
    """
    module.eval()
    if checkpointing:
        for m in module.modules():
            if getattr(m, "gradient_checkpointing", False) and not isinstance(m, nn.Dropout):
                m.training = True


def mismatch_metrics(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Train/rollout mismatch over the targets of trace views (DESIGN §12): mean |learner old log-prob −
    rollout log-prob| and the k3 estimate of KL(rollout ‖ learner) from the rollout's own samples. Both are ~0
    under the replay invariant (exact cache, fp32, shrink 1); bf16 and approximate caches show their cost here.
    """
    if not mask.any():
        return {"rollout/logp_mismatch": 0.0, "rollout/kl_mismatch": 0.0}
    old, roll = old_logp[mask].double(), rollout_logp[mask].double()
    return {
        "rollout/logp_mismatch": float((old - roll).abs().mean()),
        "rollout/kl_mismatch": float(objectives.kl_estimate(roll, old, "k3").mean()),
    }


def _placed(values: torch.Tensor, pos: torch.Tensor, shape: tuple[int, ...], device: Any) -> torch.Tensor:
    """A zero tensor of ``shape`` with ``values`` at rows ``pos`` (the inert-placeholder minibatch layout)."""
    out = torch.zeros(shape, dtype=values.dtype, device=device)
    out[pos.to(device)] = values.to(device)
    return out


def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
