"""Moving the learner's weights to the rollout copies (DESIGN §11), free of Ray and DeepSpeed.

Two paths behind one result (the rollout copy ends up with the learner's weights, cast to its own dtype by the
same ``Tensor.copy_``, so both paths give bitwise identical rollout weights):

- object store: learner rank 0 returns its gathered weights once, packed into flat numpy buckets (``pack``), so
  the object store keeps one copy and every rollout actor maps it without a copy before ``load_state_dict``.
  The Ray side lives in ``tracerl/workers``.
- collective: a torch.distributed group of learner rank 0 (rank 0 here) and the K rollout actors (ranks 1..K),
  built from its own ``TCPStore`` so it lives beside the learner's DeepSpeed group. Parameters travel in flat
  buckets of one dtype (``bucket_layout``), one broadcast per bucket: gloo on CPU, nccl on GPU.

dims: W parameters (state-dict entries) · K rollout actors
"""

from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Entry:
    """One state-dict tensor inside a bucket."""

    name: str
    shape: tuple[int, ...]
    numel: int


@dataclass(frozen=True)
class Bucket:
    """Tensors of one dtype broadcast together as one flat tensor."""

    dtype: torch.dtype
    entries: tuple[Entry, ...]

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)


def bucket_layout(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Split a state dict into buckets of at most ``bucket_bytes`` (a larger tensor gets a bucket of its own),
    in state-dict order, a new bucket whenever the dtype changes.

    Example:
        >>> s = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(4, dtype=torch.int64)}
        >>> [[e.name for e in b.entries] for b in bucket_layout(s, bucket_bytes=20)]
        [['a', 'b'], ['c']]
    """
    buckets: list[Bucket] = []
    current: list[Entry] = []
    dtype, size = None, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and (t.dtype != dtype or size + nbytes > bucket_bytes):
            buckets.append(Bucket(dtype, tuple(current)))
            current, size = [], 0
        current.append(Entry(name, tuple(t.shape), t.numel()))
        dtype, size = t.dtype, size + nbytes
    if current:
        buckets.append(Bucket(dtype, tuple(current)))
    return buckets


def layout_bytes(layout: list[Bucket]) -> int:
    """Bytes one sync moves to each rollout actor."""
    return sum(b.numel * torch.empty((), dtype=b.dtype).element_size() for b in layout)


def new_group(backend: str, addr: str, port: int, rank: int, size: int, timeout_s: float = 300.0) -> dist.ProcessGroup:
    """A process group of ``size`` members meeting at ``addr:port`` (rank 0 hosts the store), independent of the
    default group (the learner's DeepSpeed ranks keep theirs)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(addr, port, size, is_master=rank == 0, timeout=timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, size, timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    raise ValueError(f"unknown weight-sync backend '{backend}'; choose from ['gloo', 'nccl']")


def _broadcast(group: dist.ProcessGroup, flat: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([flat], opts).wait()


def send_state(group: dist.ProcessGroup, state: dict[str, torch.Tensor], layout: list[Bucket], device: str) -> int:
    """Rank 0: broadcast ``state`` bucket by bucket; returns the bytes sent."""
    sent = 0
    for bucket in layout:
        flat = torch.cat([state[e.name].reshape(-1).to(bucket.dtype) for e in bucket.entries]).to(device)
        _broadcast(group, flat)
        sent += flat.numel() * flat.element_size()
    return sent


def receive_state(group: dist.ProcessGroup, layout: list[Bucket], device: str) -> dict[str, torch.Tensor]:
    """Ranks 1..K: receive the buckets and cut them back into named tensors (on ``device``)."""
    out = {}
    for bucket in layout:
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
        _broadcast(group, flat)
        for entry, piece in zip(bucket.entries, flat.split([e.numel for e in bucket.entries]), strict=True):
            out[entry.name] = piece.view(entry.shape)
    return out


def pack(state: dict[str, torch.Tensor], layout: list[Bucket]) -> list[np.ndarray]:
    """The buckets as flat numpy arrays (bf16 bits viewed as int16): Ray stores numpy buffers once and every
    reader maps them without a copy, where pickled tensors would be copied on every load."""
    flats = []
    for bucket in layout:
        flat = torch.cat([state[e.name].reshape(-1).to(bucket.dtype) for e in bucket.entries])
        flats.append((flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy())
    return flats


def unpack(layout: list[Bucket], flats: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Named tensors over the packed buckets (views, no copy; ``load_state_dict`` copies them in)."""
    out = {}
    for bucket, array in zip(layout, flats, strict=True):
        with warnings.catch_warnings():  # the object store's buffers are read-only; they are only read
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(array)
        flat = flat.view(torch.bfloat16) if bucket.dtype == torch.bfloat16 else flat
        for entry, piece in zip(bucket.entries, flat.split([e.numel for e in bucket.entries]), strict=True):
            out[entry.name] = piece.view(entry.shape)
    return out
