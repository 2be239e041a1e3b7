"""One learner rank (DESIGN §10, §20): the policy engine, the optional value engine and frozen reference, and the
steps that use them. The package splits the learner by concept:

- ``engine.py``          the ``Engine`` protocol and the plain-PyTorch engine; ``deepspeed_engine.py`` the
                         DeepSpeed one (the only importer of deepspeed);
- ``micro.py``           micro-batches by token budget, forwards without gradient, one optimizer step;
- ``rl.py``              the RL update as numbered steps (old log-probs → value phase → μ passes);
- ``value_phase.py``     step-level GAE from the value model, then its updates;
- ``core.py``            this file: building the engines, SFT steps, weights for the rollout side, state.

dims: N samples · L response length · R rows · T row length · M targets
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from tracerl import canvas_trace, objectives
from tracerl.config import Config, LearnerConfig, logp_temperature, value_lr
from tracerl.learner import rl
from tracerl.learner.engine import Engine, init_distributed, make_engine
from tracerl.learner.micro import MicroBatches
from tracerl.models.lora import adapters_disabled, apply_lora, merged_state_dict, trained_names
from tracerl.models.value import ValueModel, enable_checkpointing
from tracerl.records import CanvasRollout, Rollout
from tracerl.scoring import PolicyScorer, ValueScorer
from tracerl.trace import make_views


def packed_backend(setting: str) -> str:
    """The attention backend of packed views for ``learner.packed_attention``: ``auto`` is ``grouped`` on every
    device. On an H100 (``scripts/gpu_check.py``, Qwen3-0.6B shape, bf16) one learner step on packed views with
    the compiled FlexAttention took 20.0 s against 1.84 s on the rows, and the log-prob pass alone 8.9 s against
    0.36 s grouped (likely ``torch.compile(dynamic=False)`` compiling again for every new packed shape; not
    profiled). FlexAttention stays available as ``flex``, by name.

    Example:
        >>> packed_backend("auto"), packed_backend("flex")
        ('grouped', 'flex')
    """
    return "grouped" if setting == "auto" else setting


def value_schedule(lc: LearnerConfig, total: int) -> tuple[LearnerConfig, int]:
    """The value engine's learner settings and schedule length: it takes ``value_updates_per_step`` passes per RL
    step where the policy takes ``updates_per_step`` (each in ``minibatches`` optimizer steps), so its warmup and
    schedule are stretched by that ratio and both span the same RL steps.

    Example:
        >>> lc = LearnerConfig(updates_per_step=1, value_updates_per_step=4, warmup_steps=10)
        >>> value_lc, total = value_schedule(lc, 1000)
        >>> value_lc.warmup_steps, total
        (40, 4000)
    """
    ratio = lc.value_updates_per_step / lc.updates_per_step
    return dataclasses.replace(lc, warmup_steps=math.ceil(lc.warmup_steps * ratio)), math.ceil(total * ratio)


class Learner:
    """One learner rank training the policy (and optionally a value model) on training views.

    Args:
        cfg: the run config (``learner``, ``objective`` and ``seed`` are read; ``learner.engine`` picks the engine).
        policy: a DiffusionPolicy; its ``model`` becomes the engine's module (trained in place; with
            ``learner.lora`` PEFT adapters are injected into it first and only they are trained).
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
        self.cfg, self.lc, self.obj, self.seed = cfg, cfg.learner, cfg.objective, cfg.seed
        self.policy, self.rank, self.world_size = policy, rank, world_size
        if self.lc.packed_attention == "flex" and not torch.cuda.is_available():
            raise ValueError(
                "learner.packed_attention=flex trains through FlexAttention, which has no backward on cpu; set "
                "learner.packed_attention=auto (grouped here) or grouped."
            )
        self.version = 0  # learner updates (train_step / sft_step calls) behind the current weights
        self.rl_steps = 0  # train_step calls; seeds the minibatch order of each pass
        init_distributed(self.lc.engine, rank, world_size, self.lc.backend, master_addr, master_port)
        dtype = torch.bfloat16 if self.lc.precision == "bf16" and self.lc.engine == "deepspeed" else torch.float32
        total = total_steps if total_steps is not None else self.lc.total_steps
        if dtype == torch.float32:
            # The weights AdamW updates are float32 whatever model.dtype loaded: in bfloat16 most small updates
            # round away, in float16 the first step overflows. DeepSpeed's bf16 keeps float32 masters itself.
            policy.model.float()

        # 1. Frozen copies first: ZeRO-3 partitions the policy's parameters in place when its engine starts. With
        #    LoRA the reference is the policy's own base (adapters disabled), and the value model a full copy.
        # A renoising canvas policy (DiffusionGemma) is scored per (sample, canvas) unit, all its steps over one
        # encoder pass (canvas_trace.CanvasScorer); every other family per training sequence (PolicyScorer).
        self.lora = self.lc.lora.enabled
        self.canvas = getattr(policy, "trajectory", None) == "renoising"
        # The policy's log-probs are of softmax(logits / τ) (objective.logp_temperature), old, new and reference
        # alike; a canvas policy's are at its schedule's temperatures
        self.logp_temperature = logp_temperature(cfg)
        scorer_type: Any = (
            canvas_trace.CanvasScorer
            if self.canvas
            else functools.partial(PolicyScorer, temperature=self.logp_temperature)
        )
        if self.canvas and self.lc.zero_stage == 3:
            from tracerl.learner.deepspeed_engine import gathered_parameters

            policy.gather = gathered_parameters  # it reads the embedding matrix outside its forward
        self.ref: Any = None
        if self.obj.kl_to_ref_coef > 0 and not self.lora:
            ref_policy = copy.copy(policy)
            ref_policy.model = copy.deepcopy(policy.model).to(dtype).eval().requires_grad_(False)
            if hasattr(ref_policy, "gather"):  # the frozen copy is never partitioned
                ref_policy.gather = lambda params: contextlib.nullcontext()
            self.ref = scorer_type(ref_policy, self.lc.logprob_chunk_tokens)
        value = ValueModel.from_policy(policy, self.obj.value_readout) if self.obj.value_model else None
        self.peft: Any = apply_lora(policy, self.lc.lora, self.seed) if self.lora else None

        # 2. Engines.
        if self.lc.gradient_checkpointing:
            enable_checkpointing(policy.model)
            if value is not None:
                value.gradient_checkpointing_enable()
        scorer = scorer_type(policy, self.lc.logprob_chunk_tokens)
        policy_lr = lr if lr is not None else self.lc.lr
        self.engine: Engine = make_engine(scorer, self.lc, policy_lr, total, rank, world_size)
        self.value_engine: Engine | None = None
        if value is not None:
            value_lc, value_total = value_schedule(self.lc, total)
            self.value_engine = make_engine(
                ValueScorer(value), value_lc, value_lr(self.lc), value_total, rank, world_size
            )
        if self.lora and self.obj.kl_to_ref_coef > 0:
            self.ref = BaseScorer(policy, self.lc.logprob_chunk_tokens, self.logp_temperature)  # the engine's weights
        elif self.ref is not None:
            self.ref.to(self.engine.device)
        self.micro = MicroBatches(self.lc, self.engine, dummy_token=int(getattr(policy, "pad_id", 0)))

    # ------------------------------------------------------------------------------------------ ranks

    def my_share(self, seqs: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``seqs`` when every rank holds the same views (SFT batches, ``logprobs``): a
        contiguous share each. RL steps instead give each rank views of its own samples."""
        return torch.tensor_split(seqs, self.world_size)[self.rank]

    def gather(self, per_target: torch.Tensor) -> torch.Tensor:
        """Per-target values [M] that each rank filled for its own share (0 elsewhere), completed on every rank."""
        if self.world_size == 1:
            return per_target
        return self.engine.all_reduce(per_target.to(self.engine.device)).cpu()

    def sum_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """Add up per-rank sums (same keys on every rank)."""
        keys = sorted(sums)
        if self.world_size == 1 or not keys:
            return dict(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.engine.device)
        return dict(zip(keys, self.engine.all_reduce(t).tolist(), strict=True))

    def max_over_ranks(self, peaks: dict[str, float]) -> dict[str, float]:
        """The largest of each per-rank value (same keys on every rank)."""
        keys = sorted(peaks)
        if self.world_size == 1 or not keys:
            return dict(peaks)
        t = torch.tensor([peaks[k] for k in keys], dtype=torch.float64, device=self.engine.device)
        return dict(zip(keys, self.engine.all_reduce(t, op="max").tolist(), strict=True))

    def mean_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-rank sums with a ``count`` → their means over every rank (0 without any count)."""
        total = self.sum_over_ranks(sums)
        count = total.pop("count")
        return {k: v / count if count else 0.0 for k, v in total.items()}

    def minibatch_totals(self, rows: torch.Tensor, samples: torch.Tensor) -> objectives.Totals:
        """The aggregation counts of a minibatch whose targets on this rank have these rows and samples: rows
        and samples live on one rank each, so the counts add up over the ranks."""
        t = objectives.count_totals(rows, samples)
        total = self.sum_over_ranks({"rows": t.rows, "tokens": t.tokens, "samples": t.samples})
        return objectives.Totals(total["rows"], total["tokens"], total["samples"])

    # ------------------------------------------------------------------------------------------ steps

    def views_of(self, rollout: Rollout | CanvasRollout, seed: int = 0, sample_ids: torch.Tensor | None = None) -> Any:
        """The training views of ``rollout`` as ``objective.*`` asks (builder, shrink, masking knobs), packed one
        sequence per sample for the block layout unless ``learner.packed_views=false``; ``seed`` is the RL step's
        view seed and ``sample_ids`` the samples' ids in the step when ``rollout`` is a shard. A renoising
        rollout's views are its units, one per (sample, canvas) (``canvas_trace.CanvasRows``)."""
        o, lc = self.obj, self.lc
        if isinstance(rollout, CanvasRollout):
            pad_id = int(rollout.sampler["pad_id"])
            return canvas_trace.CanvasRows(canvas_trace.make_units(rollout, pad_id), pad_id=pad_id)
        attention = packed_backend(lc.packed_attention)
        return make_views(
            rollout,
            o.views,
            self.policy.mask_id,
            shift=bool(self.policy.shift),
            seed=seed,
            sample_ids=sample_ids,
            pack=lc.packed_views,
            max_tokens=lc.micro_batch_tokens,
            attention=attention,
            shrink_s=o.shrink,
            prompt_mask_prob=o.d1_prompt_mask_prob,
            low=o.mask_ratio_low,
            high=o.mask_ratio_high,
        )

    def logprobs(self, views: Any) -> torch.Tensor:
        """[M] log-prob of every target under the current policy, in the views' ``targets()`` order (every rank
        passes the same views)."""
        table = views.targets()
        return self.gather(self.micro.infer(self.engine, views, table, self.my_share(torch.arange(len(views))))[0])

    def train_step(
        self,
        rollout: Rollout | CanvasRollout,
        advantages: torch.Tensor,
        *,
        seed: int = 0,
        sample_ids: torch.Tensor | None = None,
        num_samples: int | None = None,
    ) -> dict[str, float]:
        """One RL step on this rank's samples of it: build their views here, then ``rl.train_step``.

        Args:
            rollout: this rank's samples (one rank: the whole kept rollout).
            advantages: [n] per sample (broadcast to each sample's targets), or [n, L] per token. With the value
                model on they are the outcome reward of its step-level GAE (TraceRL passes the z-scored reward).
            seed: the RL step's view seed (random view builders).
            sample_ids, num_samples: the samples' indices in the whole step and its size, when ``rollout`` is one
                rank's shard (``records.shard_step``); default: the whole step.

        Returns:
            ``train/*`` metrics as floats: policy_loss, clipfrac, kl_to_old, kl_to_ref (with a reference),
            entropy, grad_norm, lr, tokens, micro_batches, optimizer_steps, value_loss with a value model;
            ``trace/*`` (rows and tokens per sample) and ``time/views`` (this rank's view building).
        """
        ids = torch.arange(len(rollout)) if sample_ids is None else sample_ids
        start = time.perf_counter()
        views = self.views_of(rollout, seed, ids)
        views_s = time.perf_counter() - start
        metrics = rl.train_step(self, rollout, advantages, views, ids, num_samples or len(rollout))
        self.rl_steps += 1
        self.version += 1
        return metrics | {"time/views": views_s}

    def sft_step(self, views: Any, weights: torch.Tensor) -> dict[str, float]:
        """One optimizer step on the weighted negative log-likelihood −Σ weights · log p(target | view).

        ``weights`` [R, T] (read at targets) carry the whole normalisation (e.g. 1 / (t · response tokens ·
        examples) for the MDLM loss), so micro-batches simply add up. Returns train/loss, grad_norm, lr, tokens,
        micro_batches.
        """
        table = views.targets()
        flat = weights[views.target_mask].float()  # row-major: the table's order

        def loss_fn(ids: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
            return -(flat[ids].to(outs[0].device) * outs[0]).sum()

        seqs = self.my_share(torch.arange(len(views)))
        s = self.micro.optimizer_step(self.engine, views, table, seqs, loss_fn, role="SFT", lr_setting="sft.lr")
        self.version += 1
        return {
            "train/loss": s.loss,
            "train/grad_norm": s.grad_norm,
            "train/lr": s.lr,
            "train/tokens": float(len(table)),
            "train/micro_batches": float(s.micro_batches),
        }

    # ------------------------------------------------------------------------------------------ weights, state

    def state_dict_for_rollout(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, the weights the learner trains, on CPU under the native model's names): every weight, or
        with ``learner.lora`` the adapter weights only (the rollout copies hold the base already). Gathered under
        ZeRO-3, so every rank must call it."""
        names = trained_names(self.policy.model) if self.lora else None
        return self.version, self.engine.full_state_dict(self.policy.model, names)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights on CPU under the native model's names, adapters merged in (``learner.lora``)."""
        if self.lora:
            return merged_state_dict(self.policy.model)
        return self.engine.full_state_dict(self.policy.model)

    def save_hf(self, out_dir: str | Path) -> None:
        """Write the policy as a Hugging Face directory (native ``save_pretrained`` + tokenizer, adapters merged)
        from rank 0; every rank calls it (ZeRO-3 weights are gathered)."""
        weights = self.merged_state_dict()
        if self.rank == 0:
            self.policy.model.save_pretrained(out_dir, state_dict=weights)
            self.policy.tokenizer.save_pretrained(out_dir)

    def save_adapter(self, out_dir: str | Path) -> None:
        """Write the adapters as the directory PEFT loads (``PeftModel.from_pretrained(base, out_dir)``)."""
        if self.peft is None:
            raise ValueError("this learner trains full weights (learner.lora.enabled=false): it has no adapters")
        if self.rank == 0:
            self.peft.save_pretrained(out_dir)

    def save(self, directory: str | Path) -> None:
        """Write engine state (weights, optimizer, LR schedule), value/reference state, the learner's counters
        and an HF copy of the policy (``hf/``) under ``directory``. Every rank calls it (shared filesystem)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.engine.save(d / "policy")
        if self.value_engine is not None:
            self.value_engine.save(d / "value")
        self.save_hf(d / "hf")
        if self.lora:
            self.save_adapter(d / "adapter")
        if self.rank == 0:
            if self.ref is not None and not self.lora:
                torch.save(self.ref.model.state_dict(), d / "ref.pt")
            state = {
                "version": self.version,
                "rl_steps": self.rl_steps,
                "world_size": self.world_size,
                "engine": self.lc.engine,
                "lora": self.lora,
            }
            (d / "learner.json").write_text(json.dumps(state))
        self.barrier()

    def load(self, directory: str | Path) -> None:
        """Restore what ``save`` wrote (same engine, ZeRO stage and number of ranks)."""
        d = Path(directory)
        state = json.loads((d / "learner.json").read_text())
        engine = state.get("engine", "deepspeed")
        if engine != self.lc.engine:
            raise ValueError(
                f"checkpoint {d} was written by learner.engine={engine}; this learner has learner.engine="
                f"{self.lc.engine}. Set learner.engine={engine} to resume from it."
            )
        if bool(state.get("lora", False)) != self.lora:
            written = "LoRA adapters" if state.get("lora") else "full weights"
            raise ValueError(
                f"checkpoint {d} holds {written}; this learner has learner.lora.enabled={self.lora}. Set "
                f"learner.lora.enabled={str(bool(state.get('lora'))).lower()} to resume from it."
            )
        if state["world_size"] != self.world_size and self.lc.zero_stage > 0:
            raise ValueError(
                f"checkpoint {d} was written by {state['world_size']} ZeRO ranks; this learner has {self.world_size}"
            )
        self.engine.load(d / "policy")
        if self.value_engine is not None:
            self.value_engine.load(d / "value")
        if self.ref is not None and not self.lora:
            self.ref.model.load_state_dict(torch.load(d / "ref.pt", map_location="cpu"))
        self.version, self.rl_steps = int(state["version"]), int(state["rl_steps"])

    def barrier(self) -> None:
        """Wait for every rank (a summed zero: the engines' reduction is the only collective the learner uses)."""
        if self.world_size > 1:
            self.engine.all_reduce(torch.zeros(1, device=self.engine.device))

    def destroy(self) -> None:
        """Release the engines (several learners may live one after another in a process)."""
        for engine in (self.engine, self.value_engine):
            if engine is not None:
                engine.destroy()
        self.engine = self.value_engine = self.ref = None  # type: ignore[assignment]
        gc.collect()


class BaseScorer(PolicyScorer):
    """The reference policy under ``learner.lora``: the policy's own module with its adapters disabled, so the
    reference is the initial (base) model without a second copy of the weights."""

    def forward(self, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        with adapters_disabled(self.model):
            return super().forward(*inputs, **kwargs)
