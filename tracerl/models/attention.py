"""Block-sparse attention of packed block-layout views (DESIGN §20).

A packed sequence is ``[clean context (C columns) | noisy segment 0 (B) | noisy segment 1 (B) | …]``: the clean
context is the prompt and the generated response, block-causal on the sampler's absolute block grid; each noisy
segment is one block of one training round (its tokens in the state before that round's step). A query sees:

- in the clean context: valid clean keys of its own or an earlier block;
- in a noisy segment of block b: valid clean keys of blocks before b, and the valid keys of its own segment;
- always itself (so padding columns attend to something).

That is exactly what a row ``[prompt | clean | noisy round r]`` of the block layout lets each column see, so every
denoising state of a sample is computed once (the clean context is shared by all rounds). Three ways to compute
it, one pattern (``PackedAttention.backend``):

- ``dense``: materialise the [T, T] mask and run SDPA once (the reference; O(T²) pairs);
- ``grouped``: fused SDPA calls over the structure: the clean queries against the clean keys, then groups of
  consecutive noisy segments (ordered by block) against the clean prefix their blocks need and their own columns.
  With groups of about ``GROUP_QUERIES`` columns this computes a fraction of the dense pairs (4.7x fewer at
  1,024 response tokens) with the fused kernel's speed: what a CPU runs (one call with the whole mask when a
  single group would hold every segment);
- ``flex``: PyTorch FlexAttention with a block mask built from the same rule (compiled; CUDA only for training:
  FlexAttention has no backward on CPU).

``grouped`` and ``flex`` run inside the transformers model through its attention interface (a function registered
as ``tracerl``); the pattern reaches it as a keyword argument, so it survives activation checkpointing.

dims: s sequences · T columns (C clean + K·B noisy) · C clean columns · K noisy segments · B block size ·
h heads · d head dim
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("dense", "grouped", "flex")
# Noisy columns per group of the grouped backend. CPU SDPA pays a fixed cost per call that larger groups amortise,
# while smaller groups compute fewer pairs. Measured (1,024 response tokens, block 4, 7M-parameter model, one RL
# step of one sample, CPU-seconds): groups of 256 14-17 s (444 GFLOP), 512 10-12 s (482), 1,024 12-13 s (558),
# rows 19-20 s (1,035); docs/performance.md.
GROUP_QUERIES = 512


@dataclass
class PackedAttention:
    """The attention pattern of a micro-batch of packed sequences (see the module docstring)."""

    clean: int  # C: columns [0, C) are the clean context
    block: int  # B: columns [C + k·B, C + (k + 1)·B) are noisy segment k
    col_block: torch.Tensor  # [s, T] long, absolute block of each column (a noisy column: the block it renoises)
    col_valid: torch.Tensor  # [s, T] bool, a real token (keys that are not real are seen only by themselves)
    backend: str = "grouped"  # dense | grouped | flex
    group_queries: int = GROUP_QUERIES  # grouped: about this many noisy columns per group
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # built once per forward

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown packed attention '{self.backend}'; choose from {sorted(BACKENDS)}")
        if (self.col_block.shape[1] - self.clean) % self.block:
            raise ValueError("the noisy part of a packed sequence must be whole segments of the block size")

    @property
    def shape(self) -> tuple[int, int, int]:
        s, t = self.col_valid.shape
        return s, t, t

    @property
    def segments(self) -> int:
        return (self.col_block.shape[1] - self.clean) // self.block

    def to(self, device: torch.device | str) -> PackedAttention:
        return replace(self, col_block=self.col_block.to(device), col_valid=self.col_valid.to(device), _cache={})

    def clean_visible(self) -> torch.Tensor:
        """[s, T, C] bool: which clean keys each query sees."""
        c = self.clean
        qb, kb = self.col_block.unsqueeze(2), self.col_block[:, :c].unsqueeze(1)
        noisy_q = (torch.arange(self.col_block.shape[1], device=qb.device) >= c).view(1, -1, 1)
        vis = self.col_valid[:, :c].unsqueeze(1) & torch.where(noisy_q, kb < qb, kb <= qb)
        eye = torch.eye(self.col_block.shape[1], c, dtype=torch.bool, device=qb.device)  # a clean query sees itself
        return vis | eye.unsqueeze(0)

    def dense(self) -> torch.Tensor:
        """[s, T, T] bool, the same pattern materialised (query × key)."""
        s, t, _ = self.shape
        c, b = self.clean, self.block
        col = torch.arange(t, device=self.col_valid.device)
        segment = torch.where(col >= c, (col - c) // b, -1)  # noisy segment of each column, -1 in the clean context
        same = (segment.unsqueeze(1) == segment.unsqueeze(0)) & (segment >= 0).unsqueeze(1)  # [T, T]
        out = torch.zeros((s, t, t), dtype=torch.bool, device=self.col_valid.device)
        out[:, :, :c] = self.clean_visible()
        out[:, :, c:] = (same[:, c:].unsqueeze(0) & self.col_valid[:, c:].unsqueeze(1)) | torch.eye(
            t, device=col.device
        )[:, c:].bool()
        return out

    def placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """A [s, 1, 1, 1] additive mask: the 4D argument transformers' mask preparation passes through untouched;
        the registered attention function reads this pattern instead."""
        return torch.zeros((self.col_valid.shape[0], 1, 1, 1), dtype=dtype, device=self.col_valid.device)

    # ------------------------------------------------------------------------------------------ kernels

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """softmax(q·kᵀ·scaling over the visible keys)·v for query/key/value [s, h, T, d] → [s, h, T, d]."""
        if self.backend == "flex":
            return self._flex(query, key, value, scaling)
        if self.backend == "dense":
            mask = torch.zeros(self.shape, dtype=query.dtype, device=query.device)
            mask.masked_fill_(~self.dense(), torch.finfo(query.dtype).min)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.unsqueeze(1), scale=scaling)
        return self._grouped(query, key, value, scaling)

    def _grouped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        plan = self._plan(q.dtype)
        if plan[0] is None:  # one group would cover every segment: a single call with the whole mask is faster
            return F.scaled_dot_product_attention(q, k, v, attn_mask=plan[1], scale=scaling)
        # One gather of every call's keys and values and one split of the queries, so backward adds each
        # gradient up once (per-group slices would each zero and add a full-size gradient).
        masks, sizes, keys_index = plan[1]
        queries = torch.split(q, sizes, dim=2)
        key_counts = [m.shape[-1] for m in masks]
        index = keys_index.to(k.device)
        keys = torch.split(k.index_select(2, index), key_counts, dim=2)
        values = torch.split(v.index_select(2, index), key_counts, dim=2)
        # 1. clean queries × clean keys (block-causal), 2. each group of noisy segments × the clean prefix its
        # blocks need and its own columns: fused SDPA calls.
        outs = [
            F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scaling)
            for qg, kg, vg, mask in zip(queries, keys, values, masks, strict=True)
        ]
        return torch.cat(outs, dim=2)

    def _plan(self, dtype: torch.dtype) -> tuple[Any, Any]:
        """The calls of the ``grouped`` backend, built once per forward: (True, (additive masks [s, 1, Q, K] in
        ``dtype``, query counts, the key columns of every call in order)). The first call is the clean queries
        against the clean keys; then consecutive segments of about ``group_queries`` noisy columns each against
        the clean columns before their last block (blocks are ordered, so that is little more than each segment
        needs) and their own columns. When one group would hold every segment: (None, the whole additive mask)."""
        if "plan" not in self._cache:
            c, b, n = self.clean, self.block, self.segments
            low = torch.finfo(dtype).min

            def additive(visible: torch.Tensor) -> torch.Tensor:
                return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, low)

            per = max(1, math.ceil(n / max(1, round(n * b / self.group_queries))))  # segments per group
            if per >= n:  # measured: at one group, one dense call beats two calls and the copies (quickstart 1.1x)
                self._cache["plan"] = (None, additive(self.dense()).unsqueeze(1))
                return self._cache["plan"]
            clean_vis = self.clean_visible()  # [s, T, C]
            seg_block = self.col_block[:, c::b]  # [s, K], the block each segment renoises
            device = self.col_valid.device
            masks, sizes = [additive(clean_vis[:, :c]).unsqueeze(1)], [c]
            keys_index = [torch.arange(c, device=device)]
            for first in range(0, n, per):
                last = min(n, first + per)
                width = min(c, int(seg_block[:, first:last].max()) * b)
                lo, hi = c + first * b, c + last * b
                noisy = torch.block_diag(*[torch.ones(b, b, dtype=torch.bool, device=device)] * (last - first))
                noisy = noisy & self.col_valid[:, lo:hi].unsqueeze(1)
                noisy = noisy | torch.eye(hi - lo, dtype=torch.bool, device=device)
                masks.append(additive(torch.cat([clean_vis[:, lo:hi, :width], noisy], dim=2)).unsqueeze(1))
                sizes.append(hi - lo)
                keys_index += [torch.arange(width, device=device), torch.arange(lo, hi, device=device)]
            self._cache["plan"] = (True, (masks, sizes, torch.cat(keys_index)))
        return self._cache["plan"]

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if "block_mask" not in self._cache:
            c, b = self.clean, self.block
            col_block, col_valid = self.col_block, self.col_valid

            def mask_mod(seq: Any, head: Any, qi: Any, ki: Any) -> Any:
                qb, kb = col_block[seq, qi], col_block[seq, ki]
                q_noisy, k_noisy = qi >= c, ki >= c
                clean_key = ~k_noisy & col_valid[seq, ki] & ((q_noisy & (kb < qb)) | (~q_noisy & (kb <= qb)))
                own_segment = q_noisy & k_noisy & ((qi - c) // b == (ki - c) // b) & col_valid[seq, ki]
                return clean_key | own_segment | (qi == ki)

            s, t = col_valid.shape
            self._cache["block_mask"] = create_block_mask(mask_mod, s, None, t, t, device=q.device)
            self._cache["kernel"] = _compiled_flex(flex_attention) if q.is_cuda else flex_attention
        kernel = self._cache["kernel"]
        return kernel(q, k, v, block_mask=self._cache["block_mask"], scale=scaling, enable_gqa=True)


_COMPILED: dict[str, Any] = {}


def _compiled_flex(fn: Any) -> Any:
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(fn, dynamic=False)
    return _COMPILED["flex"]


# ---------------------------------------------------------------------------------------------- transformers


ATTENTION_NAME = "tracerl"  # the attention implementation a model runs once it has seen a packed pattern


def tracerl_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    packed_attention: PackedAttention | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: a packed pattern runs ``PackedAttention.attend``; every other call is
    transformers' own SDPA attention, unchanged. query [s, h, T, d], key/value [s, h_kv, T, d] → [s, T, h, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_attention is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("dropout", 0.0) or kwargs.get("sliding_window") is not None:
        raise ValueError("packed attention has no attention dropout and no sliding window (learner passes run in eval)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and packed_attention.backend != "flex":
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    out = packed_attention.attend(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, tracerl_attention)


def routes_packed_attention(backbone: nn.Module) -> bool:
    """Switch ``backbone`` (a transformers model) to the ``tracerl`` attention function if it runs SDPA (calls without
    a packed pattern stay SDPA); True when packed patterns can reach it. Eager or other attention: False (the
    caller materialises the pattern instead)."""
    config = getattr(backbone, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION_NAME:
        return True
    if current != "sdpa" or not hasattr(backbone, "set_attn_implementation"):
        return False
    _register()
    backbone.set_attn_implementation(ATTENTION_NAME)
    return config._attn_implementation == ATTENTION_NAME


def backbone_hidden_states(
    backbone: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, pattern: PackedAttention
) -> torch.Tensor:
    """[s, T, H] last hidden states of a decoder backbone under a packed pattern (no cache)."""
    from tracerl.models.base import additive_mask

    dtype = next(backbone.parameters()).dtype
    if pattern.backend == "dense" or not routes_packed_attention(backbone):
        mask = additive_mask(pattern.dense(), dtype)
        out = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state
    out = backbone(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=pattern.placeholder(dtype),
        use_cache=False,
        packed_attention=pattern,
    )
    return out.last_hidden_state
