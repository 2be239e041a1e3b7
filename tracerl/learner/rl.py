"""The RL update of one learner rank (DESIGN §8, §10), as numbered steps:

1. everything "old", once, before any update: old log-probs of every target (or the rollout's own
   ``rollout_logp``), reference log-probs when ``objective.kl_to_ref_coef > 0``;
2. value phase (optional): step-level GAE advantages from the pre-update values, then the value updates
   (``value_phase.py``);
3. policy: μ = ``learner.updates_per_step`` passes, each split into ``learner.minibatches`` optimizer steps;
4. with ``learner.kl_after_step``, the log-probs of every target once more after the last update:
   ``train/kl_to_old_after_step`` and ``train/log_ratio_abs_max_after_step``, how far the whole step moved the
   policy. ``train/kl_to_old`` is PPO's in-loss reading: each minibatch's targets before its own optimizer step,
   averaged over the step's passes, so the step's first minibatch reads 0 and its last update is never seen.

The loss of a micro-batch is computed once: the policy loss of its targets with the aggregation weights of the
whole minibatch (``objectives.target_weights``), which is exactly its share of the minibatch loss, so the
shares over micro-batches and ranks add up to the minibatch loss for every aggregation. The same call gives
the ``train/*`` token metrics of those targets.

dims: N samples · L response length · M targets (flat, ``TargetTable`` order) · m targets of a micro-batch
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from tracerl import canvas_trace, objectives
from tracerl.learner.micro import minibatches, set_learner_mode
from tracerl.learner.value_phase import value_phase
from tracerl.records import CanvasRollout, Rollout

if TYPE_CHECKING:
    from tracerl.learner.core import Learner

# token means over every target of a step
TOKEN_METRICS = ("clipfrac", "kl_to_old", "kl_to_old_k3", "kl_to_ref", "entropy")
PEAK_METRICS = ("log_ratio_abs_max",)  # maxima over every target of a step


def train_step(
    learner: Learner,
    rollout: Rollout | CanvasRollout,
    advantages: torch.Tensor,
    views: Any,
    sample_ids: torch.Tensor,
    num_samples: int,
) -> dict[str, float]:
    """One RL step of ``learner`` on the views of its shard of the step (see the module docstring for the steps).

    Args:
        rollout: this rank's samples (response length L, ``rollout_logp``, the step map for the value model).
        advantages: [n] per sample, or [n, L] per token: what the policy loss weighs each target with. With the
            value model on they are the outcome reward its step-level GAE starts from (``value_phase``).
        views: the training views of ``rollout`` (built on this rank).
        sample_ids: [n] each sample's index in the whole step; num_samples: N over all ranks. Minibatches are
            drawn over the N samples, so every rank agrees on them and a sample's views are never split.

    Returns:
        ``train/*`` metrics as floats (see ``Learner.train_step``), the same on every rank.
    """
    obj, lc, micro = learner.obj, learner.lc, learner.micro
    length = rollout.response_ids.shape[1]
    table = views.targets()
    everything = torch.arange(len(views))
    seq_sample = sample_ids[views.seq_sample]  # [S] the step-wide sample of each sequence
    metrics: dict[str, float] = {}

    # 1. Everything "old", once, before any update. Renoising units: the step chain gives each step's
    #    self-conditioning state and the old log-probs in one pass, and a unit's normaliser is its canvas length
    #    (token_sum_over_max_len: a canvas trajectory's actions / C).
    if isinstance(rollout, CanvasRollout):
        length = rollout.canvas_length
        views, old_logp, recorded = canvas_old(learner, views, everything)
        metrics |= learner.mean_over_ranks(mismatch_sums(old_logp, recorded))
        if obj.old_logp_source == "rollout":
            old_logp = recorded
    elif obj.old_logp_source == "rollout":
        recorded_at = float(rollout.sampler.get("logp_temperature", 1.0))
        if recorded_at != learner.logp_temperature:
            raise ValueError(
                f"the rollout's log-probs are at temperature {recorded_at:g} and the learner's at "
                f"{learner.logp_temperature:g} (objective.logp_temperature), so rollout_logp cannot stand for the "
                "old log-probs: sample with generate(..., logp_temperature=config.logp_temperature(cfg)), or set "
                "objective.old_logp_source=learner."
            )
        old_logp = table.read(rollout.rollout_logp.float())
    else:
        old_logp = micro.infer(learner.engine, views, table, everything)[0]
        same_tau = float(rollout.sampler.get("logp_temperature", 1.0)) == learner.logp_temperature
        if obj.views == "trace" and same_tau:  # the views replay the sampler's states: compare with its record
            metrics |= learner.mean_over_ranks(mismatch_sums(old_logp, table.read(rollout.rollout_logp)))
    ref_logp = micro.infer(learner.ref, views, table, everything)[0] if learner.ref is not None else None

    # 2. Value phase: advantages from the pre-update values (step GAE), then the value updates.
    if learner.value_engine is not None:
        adv, value_metrics = value_phase(
            learner, rollout, advantages, views, table, seq_sample, num_samples, sample_ids
        )
        metrics |= value_metrics
    else:
        adv = table.read(advantages.float()) if advantages.ndim == 2 else advantages.float()[table.sample]

    # 3. Policy: μ passes of minibatch optimizer steps, each micro-batch's loss computed once.
    kl_agg = objectives.resolve_kl_aggregation(obj.aggregation, obj.kl_aggregation)
    kw = dict(
        eps_low=obj.eps_low,
        eps_high=obj.eps_high,
        kl_to_old_coef=obj.kl_to_old_coef,
        kl_to_old_kind=obj.kl_to_old_kind,
        kl_to_ref_coef=obj.kl_to_ref_coef,
        kl_to_ref_kind=obj.kl_to_ref_kind,
    )
    weights = torch.zeros(len(table), dtype=torch.float64)
    kl_weights = torch.zeros(len(table), dtype=torch.float64)
    # every rank sends the same keys to the sums over ranks, also a rank that holds no target of this step
    emitted = [k for k in TOKEN_METRICS if k != "kl_to_ref" or ref_logp is not None]
    sums: dict[str, float] = dict.fromkeys([*emitted, "count"], 0.0)
    peaks: dict[str, float] = dict.fromkeys(PEAK_METRICS, 0.0)

    def loss_fn(ids: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        logp, entropy = outs
        device = logp.device

        def at(x: torch.Tensor) -> torch.Tensor:
            return x[ids].to(device).unsqueeze(0)  # [1, m]: the micro-batch's targets as one row

        loss, m = objectives.policy_loss(
            logp.unsqueeze(0),
            at(old_logp),
            at(adv),
            torch.ones(1, len(ids), dtype=torch.bool, device=device),
            row_sample=torch.zeros(1, dtype=torch.long, device=device),
            ref_logp=at(ref_logp) if ref_logp is not None else None,
            entropy=entropy.detach().unsqueeze(0),
            weights=at(weights),
            kl_weights=at(kl_weights),
            **kw,
        )
        for key in TOKEN_METRICS:
            if f"train/{key}" in m:
                sums[key] += m[f"train/{key}"] * len(ids)
        sums["count"] += len(ids)
        for key in PEAK_METRICS:
            if f"train/{key}" in m:
                peaks[key] = nan_max(peaks[key], m[f"train/{key}"])
        return loss

    steps: dict[str, float] = defaultdict(float)
    for mb in minibatches(num_samples, lc.updates_per_step, lc.minibatches, learner.seed, learner.rl_steps, salt=0):
        seqs = everything[torch.isin(seq_sample, mb)]  # this rank's sequences of the minibatch's samples
        ids = table.of(seqs)
        totals = learner.minibatch_totals(table.row[ids], table.sample[ids])
        weights.zero_()
        kl_weights.zero_()
        weights[ids] = objectives.target_weights(table.row[ids], table.sample[ids], obj.aggregation, length, totals)
        kl_weights[ids] = objectives.target_weights(table.row[ids], table.sample[ids], kl_agg, length, totals)
        s = micro.optimizer_step(learner.engine, views, table, seqs, loss_fn)
        steps["loss"] += s.loss
        steps["grad_norm"] += s.grad_norm
        steps["micro_batches"] += s.micro_batches
        steps["optimizer_steps"] += 1
        steps["lr"] = s.lr
    if lc.kl_after_step:  # 4. how far the whole step moved the policy: every target again, after the last update
        new_logp = micro.infer(learner.engine, views, table, everything)[0]
        sums["kl_after_step"] = float(objectives.kl_to_old_bound(new_logp, old_logp).sum())  # mean: / targets
        peaks["log_ratio_abs_max_after_step"] = (
            float((new_logp.double() - old_logp.double()).abs().max()) if len(table) else 0.0
        )
    totals = learner.sum_over_ranks(
        {**sums, "targets": float(len(table)), "rows": float(views.num_rows), "samples": float(len(rollout)),
         "tokens": float(views.seq_tokens().sum()), "sequences": float(len(views))}
    )  # fmt: skip
    n_steps = max(1.0, steps["optimizer_steps"])
    metrics |= {
        "train/policy_loss": steps["loss"] / n_steps,
        "train/grad_norm": steps["grad_norm"] / n_steps,
        "train/lr": steps["lr"],
        "train/tokens": totals["targets"],
        "train/micro_batches": steps["micro_batches"],
        "train/optimizer_steps": steps["optimizer_steps"],
        "trace/rows_per_sample": totals["rows"] / max(1.0, totals["samples"]),
        "trace/row_tokens": totals["tokens"] / max(1.0, totals["sequences"]),
        "trace/tokens_per_sample": totals["tokens"] / max(1.0, totals["samples"]),
    }
    peaks = learner.max_over_ranks(peaks)
    if totals["count"]:  # a step without a target (every rank empty) has no token metrics
        metrics |= {f"train/{k}": totals[k] / totals["count"] for k in emitted}
        if lc.kl_after_step:
            metrics["train/kl_to_old_after_step"] = totals["kl_after_step"] / totals["targets"]
        metrics |= {f"train/{k}": v for k, v in peaks.items()}
    return metrics


def nan_max(a: float, b: float) -> float:
    """The larger of two floats, NaN if either is (Python's ``max`` drops a NaN in its second argument)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def canvas_old(learner: Learner, rows: Any, seqs: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Renoising units: the chain pass over this rank's ``seqs`` with the current (behaviour) weights →
    (the rows with each step's self-conditioning state, old log-probs [M] and the sampler's own [M], in the
    targets' order)."""
    set_learner_mode(learner.engine.module, checkpointing=False)
    chunks = learner.micro.chunks(seqs, rows.seq_tokens())
    old, rows = canvas_trace.canvas_rows(learner.policy, rows, chunks, lockstep=learner.engine.lockstep)
    mask = rows.units.target_mask
    return rows, old[mask], rows.units.rollout_logp[mask].float()


def mismatch_sums(old_logp: torch.Tensor, rollout_logp: torch.Tensor) -> dict[str, float]:
    """The sums behind ``mismatch_metrics`` over one rank's targets (both [M]), for a mean over every rank."""
    old, roll = old_logp.double(), rollout_logp.double()
    return {
        "rollout/logp_mismatch": float((old - roll).abs().sum()),
        "rollout/kl_mismatch": float(objectives.kl_estimate(roll, old, "k3").sum()),
        "count": float(old.numel()),
    }


def mismatch_metrics(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Train/rollout mismatch over the targets of trace views (DESIGN §12): mean |learner old log-prob −
    rollout log-prob| and the k3 estimate of KL(rollout ‖ learner) from the rollout's own samples, over the
    entries of ``mask`` (default: all). Both are ~0 under the replay invariant (exact cache, fp32, shrink 1);
    bf16 and approximate caches show their cost here.
    """
    if mask is not None:
        old_logp, rollout_logp = old_logp[mask], rollout_logp[mask]
    if not old_logp.numel():
        return {"rollout/logp_mismatch": 0.0, "rollout/kl_mismatch": 0.0}
    old, roll = old_logp.double(), rollout_logp.double()
    return {
        "rollout/logp_mismatch": float((old - roll).abs().mean()),
        "rollout/kl_mismatch": float(objectives.kl_estimate(roll, old, "k3").mean()),
    }
