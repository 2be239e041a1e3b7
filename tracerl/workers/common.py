"""Small helpers shared by the actor modules."""

from __future__ import annotations

import os
from typing import Any

import ray


def where() -> dict[str, Any]:
    """Where the calling actor runs: pid, Ray node id, the GPU ids Ray gave it."""
    return {
        "pid": os.getpid(),
        "node": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges covering 0..n, sizes differing by at most one; empty ranges dropped."""
    base, extra = divmod(n, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        if hi > lo:
            bounds.append((lo, hi))
        lo = hi
    return bounds
