"""The DeepSpeed implementation of the engine seam (``learner.engine=deepspeed``); the only module that imports
deepspeed.

ZeRO stages 0-3, fp32 or bf16 (bf16 weights, fp32 master weights in the optimizer), torch's AdamW
(``torch_adam``: nothing JIT-compiles), gradient clipping by ``learner.max_grad_norm`` over all ranks. The
accumulation boundary is marked per micro-batch (``set_gradient_accumulation_boundary``), because packing makes
the number of micro-batches of a minibatch vary; DeepSpeed's own accumulation count stays 1. A gradient norm that is
NaN or infinite raises ``NonFiniteGradient`` with nothing applied: fp32 ZeRO-0 checks the norm before DeepSpeed
steps, every other setup has DeepSpeed's own check skip the update (it reports the norm as inf).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from torch import nn

from tracerl.config import LearnerConfig
from tracerl.learner.engine import NonFiniteGradient, all_reduce
from tracerl.scoring import LRSchedule

deepspeed.utils.logger.setLevel(logging.WARNING)  # DeepSpeed logs every engine's config at INFO


def ds_config(lc: LearnerConfig, lr: float, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine: torch's AdamW (nothing JIT-compiles), clipping and ZeRO stage.

    Micro-batch size and accumulation steps are 1 here on purpose: the boundary is marked per micro-batch (micro-batch
    counts vary with packing), so these numbers only feed DeepSpeed's sample counter.
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


def _undo_state_warmup(optimizer: Any) -> None:
    """Undo the zero-gradient AdamW step DeepSpeed's bf16 wrapper at ZeRO-0 (``FP16_UnfusedOptimizer``) takes to
    create the optimizer state.

    That step counts as AdamW's step 1, so the first real update moves each weight by 0.74 × lr instead of lr and every
    later bias correction is one step late (ZeRO-1/2 and fp32 create the state lazily, at the first real step). With
    weight decay it also shrinks the fp32 master weights once. Dropping the state and copying the masters back from the
    model's weights gives every stage the same AdamW steps.
    """
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return
    optimizer.optimizer.state.clear()  # torch's AdamW creates it again, lazily, at the first real step
    with torch.no_grad():
        for masters, weights in zip(optimizer.fp32_groups, optimizer.fp16_groups, strict=True):
            for master, weight in zip(masters, weights, strict=True):
                master.copy_(weight)


def init_deepspeed_distributed(backend: str, rank: int, world_size: int) -> None:
    """``deepspeed.init_distributed`` from the environment ``engine.rendezvous_env`` set, with the shared-memory
    comm op off (its JIT build takes ~30 s and gains nothing here)."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, verbose=False, rank=rank, world_size=world_size
    )


class DeepSpeedEngine:
    """A DeepSpeed engine behind the ``Engine`` protocol."""

    def __init__(
        self, module: nn.Module, lc: LearnerConfig, lr: float, total_steps: int, rank: int = 0, world_size: int = 1
    ) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        schedule = LRSchedule(lc.lr_schedule, lc.warmup_steps, total_steps)
        self.ds, *_ = deepspeed.initialize(
            model=module,
            model_parameters=params,
            config=ds_config(lc, lr, world_size),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        _undo_state_warmup(self.ds.optimizer)
        self.module: nn.Module = self.ds.module
        self.device = self.ds.device
        self.rank, self.world_size = rank, world_size
        self.lockstep = lc.zero_stage == 3 and world_size > 1
        self.frozen = len(params) < sum(1 for _ in module.parameters())  # LoRA: checkpoints keep what is trained
        # ZeRO-0 in fp32 reports no gradient norm; its full reduced gradients are on the parameters at the boundary
        self.norm_from_grads = lc.zero_stage == 0 and lc.precision == "fp32"

    def __call__(self, *inputs: Any) -> Any:
        return self.ds(*inputs)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)  # DeepSpeed averages over ranks: undo it
        if not last:
            self.ds.step()  # DeepSpeed counts micro-steps here; off the boundary it changes no weight

    def step(self) -> float:
        if self.norm_from_grads:  # DeepSpeed clips and steps plain fp32 ZeRO-0 whatever the norm: check it first
            norm = _grad_norm(self.module)
            if not math.isfinite(norm):
                self.ds.zero_grad()
                raise NonFiniteGradient(norm)
            self.ds.step()
            return norm
        self.ds.step()
        reported = self.ds.get_global_grad_norm()
        if reported is None:
            return float("nan")
        if not math.isfinite(float(reported)):  # its overflow check skipped the update (ZeRO 1-3, bf16 ZeRO-0)
            raise NonFiniteGradient(float(reported))
        return float(reported)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(tensor, op, self.world_size)

    def full_state_dict(
        self, module: nn.Module | None = None, names: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        source = self.module if module is None else module
        out = {}
        for name, tensor in source.state_dict(keep_vars=True).items():
            if names is not None and name not in names:
                continue
            gathered = deepspeed.zero.GatheredParameters([tensor]) if hasattr(tensor, "ds_id") else None
            with gathered or contextlib.nullcontext():
                out[name] = tensor.detach().to("cpu", copy=True)
        return out

    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag="state", exclude_frozen_parameters=self.frozen)

    def load(self, directory: Path) -> None:
        self.ds.load_checkpoint(str(directory), tag="state", load_module_strict=not self.frozen)

    def destroy(self) -> None:
        self.ds.destroy()


def gathered_parameters(params: Any) -> Any:
    """A context in which ZeRO-3-partitioned ``params`` are whole (read-only) on every rank."""
    return deepspeed.zero.GatheredParameters(params)


def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
