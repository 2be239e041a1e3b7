"""Micro-batches on one learner rank: which sequences each forward takes, forwards without gradient over a view
set, and one optimizer step over a minibatch (DESIGN §10).

A minibatch is split into micro-batches by a token budget (sequences × their padded length ≤
``learner.micro_batch_tokens``, at least one sequence). Every rank runs the same number of micro-batches per
minibatch (a rank with fewer runs empty ones that contribute exactly 0), so collectives inside forward and
backward (ZeRO-3 gathers) stay matched. Scorers return one value per target; targets are addressed by their
ids in the view set's ``TargetTable``.

dims: S sequences · m targets of a micro-batch · M targets of a view set
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tracerl.config import LearnerConfig
from tracerl.learner.engine import Engine, NonFiniteGradient
from tracerl.trace import ModelInputs, TargetTable

LossFn = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]  # (target ids [m], outputs [m] each) → loss


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


def pack(seqs: torch.Tensor, tokens: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Split ``seqs`` into micro-batches, longest first, each as many sequences as fit ``budget`` tokens when
    padded to its longest (at least one). ``tokens`` [S] gives every sequence's length.

    Example:
        >>> [c.tolist() for c in pack(torch.tensor([0, 1, 2, 3]), torch.tensor([4, 8, 2, 4]), 8)]
        [[1], [0, 3], [2]]
    """
    order = seqs[torch.argsort(tokens[seqs], descending=True, stable=True)]
    chunks: list[torch.Tensor] = []
    start = 0
    while start < len(order):
        longest = int(tokens[order[start]])
        count = max(1, budget // max(1, longest))
        chunks.append(order[start : start + count])
        start += count
    return chunks


def minibatches(count: int, passes: int, splits: int, seed: int, rl_step: int, salt: int) -> list[torch.Tensor]:
    """Minibatches of all μ ``passes`` over ``count`` units: a shuffle per pass seeded by (run seed, RL step,
    pass, ``salt``: 0 policy, 1 value), identical on every rank, then ``splits`` parts; empty parts are dropped."""
    out = []
    for p in range(passes):
        g = torch.Generator().manual_seed((((seed * 1_000_003 + rl_step) * 101 + p) * 2 + salt) % 2**63)
        out.extend(mb for mb in torch.tensor_split(torch.randperm(count, generator=g), splits) if len(mb))
    return out


@dataclass
class StepStats:
    """What one optimizer step reports (summed over ranks where it is a sum)."""

    loss: float  # the minibatch loss (every rank's share added up)
    grad_norm: float  # before clipping
    lr: float  # the learning rate of this step
    micro_batches: int  # on this rank


class MicroBatches:
    """Runs scorers and engines over a view set's sequences on one rank, in micro-batches of a token budget.

    Args:
        lc: ``micro_batch_tokens``, ``logprob_chunk_tokens`` and ``gradient_checkpointing`` are read.
        engine: the policy engine; its ranks, reductions and ``lockstep`` flag apply to every pass.
        dummy_token: a token id for the one-token micro-batches of a rank with nothing to run.
    """

    def __init__(self, lc: LearnerConfig, engine: Engine, dummy_token: int = 0) -> None:
        self.lc, self.engine, self.dummy_token = lc, engine, dummy_token

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def chunks(self, seqs: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor | None]:
        """This rank's ``seqs`` in micro-batches, padded with ``None`` (an empty micro-batch) to as many as the
        rank with the most."""
        mine: list[torch.Tensor | None] = list(pack(seqs, tokens, self.lc.micro_batch_tokens))
        count = torch.tensor([len(mine)], device=self.device)
        most = int(self.engine.all_reduce(count, "max").item())
        return mine + [None] * (most - len(mine))

    def dummy(self, views: Any) -> Any:
        """What a rank without sequences runs: the view set's own placeholder when it has one (canvas units),
        else one token that sees itself and is no target."""
        if hasattr(views, "dummy_inputs"):
            return views.dummy_inputs()
        one = torch.full((1, 1), self.dummy_token, dtype=torch.long)
        return ModelInputs(one, torch.zeros_like(one), torch.ones(1, 1, 1, dtype=torch.bool), one == -1, one)

    def forward(self, scorer: Any, inputs: ModelInputs, grad: bool, lockstep: bool) -> list[torch.Tensor]:
        """Run ``scorer`` (an Engine or a plain module) on ``inputs``; returns its per-target outputs, [m] each."""
        inputs = inputs.to(self.device)
        module = scorer.module if isinstance(scorer, Engine) else scorer
        set_learner_mode(module, checkpointing=grad and self.lc.gradient_checkpointing)
        num_chunks = -1
        if lockstep:  # equal LM-head calls on every rank (see scoring.PolicyScorer)
            chunk = self.lc.logprob_chunk_tokens
            count = torch.tensor([math.ceil(int(inputs.target_mask.sum()) / chunk)], device=self.device)
            num_chunks = int(self.engine.all_reduce(count, "max").item())
        with torch.set_grad_enabled(grad):
            i = inputs
            if hasattr(i, "call"):  # inputs that know their scorer's signature (canvas units)
                packed = i.call(scorer, num_chunks)
            else:
                packed = scorer(i.input_ids, i.position_ids, i.attention, i.target_mask, i.target_ids, num_chunks)
        return list(packed)  # [K] outputs, [m] each

    @torch.no_grad()
    def infer(self, scorer: Any, views: Any, table: TargetTable, seqs: torch.Tensor) -> list[torch.Tensor]:
        """Per-target outputs of ``scorer`` (e.g. [logp, entropy]) for the targets of ``seqs``, each [M] on CPU
        (0 at the targets of other sequences)."""
        lockstep = isinstance(scorer, Engine) and scorer.lockstep
        results: list[torch.Tensor] | None = None
        for chunk in self.chunks(seqs, views.seq_tokens()):
            inputs = views.model_inputs(chunk) if chunk is not None else self.dummy(views)
            outs = self.forward(scorer, inputs, grad=False, lockstep=lockstep)
            if results is None:
                results = [torch.zeros(len(table), dtype=x.dtype) for x in outs]
            if chunk is not None:
                ids = table.of(chunk)
                for res, x in zip(results, outs, strict=True):
                    res[ids] = x.cpu()
        if results is None:  # nothing anywhere (no sequences on any rank)
            results = [torch.zeros(len(table))]
        return results

    def optimizer_step(
        self,
        engine: Engine,
        views: Any,
        table: TargetTable,
        seqs: torch.Tensor,
        loss_fn: LossFn,
        *,
        role: str = "policy",
        lr_setting: str = "learner.lr",
    ) -> StepStats:
        """One optimizer step of ``engine`` over this rank's ``seqs`` of a minibatch.

        ``loss_fn(ids, outputs)`` returns the loss share of the targets ``ids`` (outputs: the scorer's, [m]
        each): the shares of all micro-batches on all ranks must add up to the minibatch loss. A minibatch loss or
        gradient norm that is NaN or infinite raises ``NonFiniteUpdate`` on every rank before the optimizer applies
        anything; ``role`` (policy, value, SFT) and ``lr_setting`` name the model and its learning rate there.
        """
        chunks = self.chunks(seqs, views.seq_tokens())
        lr = engine.lr
        total = 0.0
        for i, chunk in enumerate(chunks):
            inputs = views.model_inputs(chunk) if chunk is not None else self.dummy(views)
            outs = self.forward(engine, inputs, grad=True, lockstep=engine.lockstep)
            ids = table.of(chunk) if chunk is not None else None
            loss = loss_fn(ids, outs) if ids is not None and len(ids) else outs[0].sum() * 0.0  # idle: still steps
            engine.backward(loss, last=i == len(chunks) - 1)
            total += float(loss.detach())
        # summed before the step, so that every rank sees the same value and stops at the same point
        loss_sum = float(engine.all_reduce(torch.tensor([total], dtype=torch.float64, device=self.device)).item())
        try:
            if not math.isfinite(loss_sum):
                raise non_finite(role, "loss", loss_sum, lr_setting, lr, self.lc.max_grad_norm)
            try:
                norm = engine.step()
            except NonFiniteGradient as err:
                raise non_finite(role, "gradient norm", err.norm, lr_setting, lr, self.lc.max_grad_norm) from None
        finally:
            engine.module.eval()  # the policy may sample in this process between steps
        return StepStats(loss_sum, norm, lr, len(chunks))


class NonFiniteUpdate(RuntimeError):
    """An optimizer step whose loss or gradient norm is NaN or infinite, stopped before it applied anything: the
    message names the model (``role``), the quantity and the settings that usually cause it (``non_finite``)."""

    role: str = ""
    quantity: str = ""
    value: float = math.nan


def non_finite(
    role: str, quantity: str, value: float, lr_setting: str, lr: float, max_grad_norm: float
) -> NonFiniteUpdate:
    """The ``NonFiniteUpdate`` of a ``role`` (policy, value, SFT) step whose ``quantity`` (loss, gradient norm) is
    ``value``, with the fixes: ``lr_setting`` (its learning rate ``lr``), the reward's scale, ``max_grad_norm``."""
    clip = (
        f"learner.max_grad_norm={max_grad_norm:g} clips the gradient norm: lower it"
        if max_grad_norm > 0
        else "learner.max_grad_norm=0 leaves the gradient unclipped: set it, e.g. to 1.0"
    )
    scale = "the training data" if role == "SFT" else "the reward's scale (what its functions return; near 1 is safe)"
    err = NonFiniteUpdate(
        f"the {role} {quantity} is {value} (not a finite number), so this optimizer step was stopped before it "
        f"changed anything: the {role} weights are as the last step with a finite loss and gradient left them. "
        f"Likely fixes: a lower {lr_setting} (this step's learning rate was {lr:g}; a resume keeps a checkpoint's "
        f"own, so start a new run from its weights to change it), check {scale}, and clip the gradient ({clip})."
    )
    err.role, err.quantity, err.value = role, quantity, value  # kept when pickled (a Ray actor's error)
    return err
