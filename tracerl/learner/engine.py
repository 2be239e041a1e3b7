"""The engine seam (DESIGN §20): one object per trainable module owns its forward, backward, gradient
accumulation, clipping, optimizer and LR step, and its state. Algorithm code talks to an ``Engine`` and never to
DeepSpeed or torch.distributed.

Two implementations behind one protocol, chosen by ``learner.engine``:

- ``deepspeed`` (``deepspeed_engine.py``, the only importer of deepspeed): ZeRO 0-3, fp32 or bf16 weights with
  fp32 master weights, gloo or nccl;
- ``torch``: plain PyTorch (AdamW, LambdaLR, ``clip_grad_norm_``), gradients summed over ranks with
  ``all_reduce`` at the boundary; ZeRO stage 0 only; bf16 through autocast over fp32 weights. It needs no
  process group on one rank, so CPU tests can use it anywhere.

The contract that makes data-parallel training exact: ``backward(loss)`` takes this rank's *share* of the
minibatch loss (the shares over micro-batches and ranks add up to the minibatch loss), and after ``step()`` the
weights are those of one process that back-propagated the whole minibatch loss. How an engine gets there
(DeepSpeed averages over ranks, so it scales by the world size) is its own business.

dims: none (modules and scalars)
"""

from __future__ import annotations

import gc
import math
import os
import socket
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from tracerl.config import LearnerConfig
from tracerl.registry import Registry
from tracerl.scoring import LRSchedule


@runtime_checkable
class Engine(Protocol):
    """One trainable module on one data-parallel rank.

    Per optimizer step the caller runs, on every rank, the same number of micro-batches:
    ``out = engine(*inputs)``; ``engine.backward(share_of_loss, last=i == n - 1)``; then ``engine.step()`` once.
    """

    module: nn.Module  # the module as built; its trainable parameters are what the optimizer steps
    device: torch.device  # where inputs go
    rank: int
    world_size: int
    lockstep: bool  # every rank must run the same forwards and backwards (ZeRO-3 gathers parameters in them)

    def __call__(self, *inputs: Any) -> Any:
        """The module's forward (through the engine's hooks)."""
        ...

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Accumulate d(loss)/dθ. ``loss`` is this rank's share of the minibatch loss; ``last`` marks the
        minibatch's last micro-batch (the accumulation boundary, where gradients are reduced over ranks)."""
        ...

    def step(self) -> float:
        """At the boundary: clip the accumulated gradient to ``learner.max_grad_norm``, step the optimizer and
        the LR schedule, clear the gradients. Returns the gradient norm before clipping (NaN if unknown). A norm
        that is NaN or infinite raises ``NonFiniteGradient`` and the update is not applied: weights, optimizer
        and LR schedule stay as the previous step left them."""
        ...

    @property
    def lr(self) -> float:
        """The learning rate the next ``step`` uses."""
        ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over the ranks in place (``sum`` or ``max``) and return it; identity on one rank."""
        ...

    def full_state_dict(
        self, module: nn.Module | None = None, names: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Full weights of ``module`` (a submodule; default the engine's) on CPU, gathered across ranks when
        partitioned, only the entries in ``names`` if given: every rank must call it."""
        ...

    def save(self, directory: Path) -> None:
        """Write the trained weights (every weight, or only those with ``requires_grad`` when some are frozen,
        as under LoRA), optimizer and LR-schedule state under ``directory`` (every rank calls it)."""
        ...

    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote."""
        ...

    def destroy(self) -> None:
        """Release the engine (several may live one after another in a process)."""
        ...


class NonFiniteGradient(FloatingPointError):
    """The gradient norm of an optimizer step is NaN or infinite; the engine applied nothing of that step."""

    def __init__(self, norm: float) -> None:
        super().__init__(f"gradient norm {norm}")
        self.norm = norm

    def __reduce__(self) -> tuple[type, tuple[float]]:
        return type(self), (self.norm,)


EngineFactory = Callable[..., Engine]
ENGINES: Registry[EngineFactory] = Registry("learner engine")
register_engine = ENGINES.register


def make_engine(
    module: nn.Module, lc: LearnerConfig, lr: float, total_steps: int, rank: int, world_size: int
) -> Engine:
    """The ``learner.engine`` engine of ``module`` (its parameters with ``requires_grad`` are trained)."""
    return ENGINES.lookup(lc.engine)(module, lc, lr, total_steps, rank, world_size)


# ---------------------------------------------------------------------------------------------- process group


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


def rendezvous_env(rank: int, world_size: int, addr: str, port: int | None) -> None:
    """Set RANK, LOCAL_RANK (0: each rank sees one device), WORLD_SIZE, MASTER_ADDR and MASTER_PORT (a free port
    when none is given and one rank meets only itself: an inherited MASTER_PORT may belong to another process)."""
    if port is None and (world_size == 1 or "MASTER_PORT" not in os.environ):
        port = free_port()
    env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "MASTER_ADDR": addr}
    if port is not None:
        env["MASTER_PORT"] = str(port)
    os.environ.update(env)


def init_distributed(
    kind: str, rank: int, world_size: int, backend: str = "auto", addr: str = "127.0.0.1", port: int | None = None
) -> None:
    """Join (or reuse) the torch.distributed group of ``world_size`` ranks without a launcher, the way engine
    ``kind`` needs it (DeepSpeed's own initialisation for ``deepspeed``; none on one rank for ``torch``)."""
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}; "
                f"cannot also be rank {rank} of {world_size} in this process"
            )
        return
    if kind == "deepspeed":
        from tracerl.learner.deepspeed_engine import init_deepspeed_distributed

        rendezvous_env(rank, world_size, addr, port)
        init_deepspeed_distributed(resolve_backend(backend), rank, world_size)
    elif world_size > 1:
        rendezvous_env(rank, world_size, addr, port)
        dist.init_process_group(resolve_backend(backend), rank=rank, world_size=world_size)


def all_reduce(tensor: torch.Tensor, op: str, world_size: int) -> torch.Tensor:
    """In-place ``sum`` / ``max`` over the ranks of the default group; identity on one rank."""
    if world_size > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"unknown reduction '{op}'; choose from {sorted(ops)}")
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def frozen_names(module: nn.Module) -> set[str]:
    """Names of the parameters without ``requires_grad`` (LoRA's base weights): checkpoints leave them out."""
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def saved_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``module``: its state dict without frozen parameters."""
    frozen = frozen_names(module)
    return {k: v for k, v in module.state_dict().items() if k not in frozen}


def load_saved_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``saved_state``'s output: everything but the frozen parameters must be there."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - frozen_names(module))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {sorted(unexpected)[:3]} "
            "(was it written with other learner.lora settings?)"
        )


# ---------------------------------------------------------------------------------------------- plain PyTorch


def adamw(params: list[nn.Parameter], lc: LearnerConfig, lr: float) -> torch.optim.AdamW:
    """torch's AdamW with the learner's settings (the optimizer of both engines)."""
    return torch.optim.AdamW(params, lr=lr, betas=(lc.beta1, lc.beta2), eps=lc.adam_eps, weight_decay=lc.weight_decay)


@register_engine("torch")
class TorchEngine:
    """Plain PyTorch: AdamW, a LambdaLR schedule, ``clip_grad_norm_``, and on several ranks a sum of the gradients
    with ``all_reduce`` at the accumulation boundary (the shares of the loss add up, so gradients add up too).
    Every rank holds the whole module and optimizer (ZeRO stage 0); ``precision=bf16`` runs the forward under
    autocast with fp32 weights."""

    lockstep = False

    def __init__(
        self, module: nn.Module, lc: LearnerConfig, lr: float, total_steps: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if lc.zero_stage != 0:
            raise ValueError(
                f"learner.engine=torch keeps the whole model on every rank and has no ZeRO; got "
                f"learner.zero_stage={lc.zero_stage}. Set learner.zero_stage=0 or learner.engine=deepspeed."
            )
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.module = module.to(self.device)
        self.rank, self.world_size, self.max_grad_norm = rank, world_size, lc.max_grad_norm
        self.autocast = lc.precision == "bf16"
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, lc, lr)
        schedule = LRSchedule(lc.lr_schedule, lc.warmup_steps, total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def __call__(self, *inputs: Any) -> Any:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(*inputs)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()
        if last and self.world_size > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)

    def step(self) -> float:
        grads = [p for p in self.params if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm))
        else:
            norm = float(torch.stack([p.grad.detach().float().norm() for p in grads]).norm()) if grads else 0.0
        if not math.isfinite(norm):  # the same on every rank: the gradients were summed over them
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradient(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(tensor, op, self.world_size)

    def full_state_dict(
        self, module: nn.Module | None = None, names: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        source = self.module if module is None else module
        items = source.state_dict().items()
        return {k: v.detach().to("cpu", copy=True) for k, v in items if names is None or k in names}

    def save(self, directory: Path) -> None:
        if self.rank == 0:  # every rank holds the same state
            directory.mkdir(parents=True, exist_ok=True)
            state = {
                "module": saved_state(self.module),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            torch.save(state, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location=self.device, weights_only=False)
        load_saved_state(self.module, state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def destroy(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = self.scheduler = None  # type: ignore[assignment]
        gc.collect()


@register_engine("deepspeed")
def _deepspeed_engine(
    module: nn.Module, lc: LearnerConfig, lr: float, total_steps: int, rank: int = 0, world_size: int = 1
) -> Engine:
    from tracerl.learner.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(module, lc, lr, total_steps, rank, world_size)
