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

- ``dense``: materialise the [T, T] mask and run the model's own attention (the reference);
- ``split``: two dense products, queries × clean keys (masked) and each noisy segment × itself, under one softmax:
  O(T·C + K·B²) pairs instead of O(T²); plain tensor ops, backward included: what a CPU runs;
- ``flex``: PyTorch FlexAttention with a block mask built from the same rule (compiled; CUDA: FlexAttention has no
  backward on CPU).

``split`` and ``flex`` run inside the transformers model through its attention interface (a function registered
as ``tracerl``); the pattern reaches it as a keyword argument, so it survives activation checkpointing.

dims: s sequences · T columns (C clean + K·B noisy) · C clean columns · K noisy segments · B block size ·
h heads · d head dim
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

BACKENDS = ("dense", "split", "flex")


@dataclass
class PackedAttention:
    """The attention pattern of a micro-batch of packed sequences (see the module docstring)."""

    clean: int  # C: columns [0, C) are the clean context
    block: int  # B: columns [C + k·B, C + (k + 1)·B) are noisy segment k
    col_block: torch.Tensor  # [s, T] long, absolute block of each column (a noisy column: the block it renoises)
    col_valid: torch.Tensor  # [s, T] bool, a real token (keys that are not real are seen only by themselves)
    backend: str = "split"  # dense | split | flex
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

    def segment_visible(self) -> torch.Tensor:
        """[s, K, B, B] bool: which keys of its own segment each noisy query sees."""
        s, k, b = self.col_valid.shape[0], self.segments, self.block
        valid = self.col_valid[:, self.clean :].reshape(s, k, 1, b)
        eye = torch.eye(b, dtype=torch.bool, device=valid.device)
        return valid | eye

    def dense(self) -> torch.Tensor:
        """[s, T, T] bool, the same pattern materialised (query × key)."""
        s, t, _ = self.shape
        c, k, b = self.clean, self.segments, self.block
        out = torch.zeros((s, t, t), dtype=torch.bool, device=self.col_valid.device)
        out[:, :, :c] = self.clean_visible()
        seg = self.segment_visible()  # [s, K, B, B]
        for i in range(k):
            lo = c + i * b
            out[:, lo : lo + b, lo : lo + b] = seg[:, i]
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
        return self._split(query, key, value, scaling)

    def _split(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        s, h, t, d = q.shape
        c, n, b = self.clean, self.segments, self.block
        kc, vc = k[:, :, :c], v[:, :, :c]
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 at least (bf16 models)
        low = torch.finfo(acc).min
        # 1. Every query against the clean keys (block-causal for clean queries, earlier blocks for noisy ones).
        scores_a = torch.matmul(q, kc.transpose(-1, -2)).to(acc) * scaling  # [s, h, T, C]
        scores_a = scores_a.masked_fill(~self.clean_visible().unsqueeze(1), low)
        out_clean = torch.matmul(torch.softmax(scores_a[:, :, :c], dim=-1).to(v.dtype), vc)  # [s, h, C, d]
        if not n:
            return out_clean
        # 2. Each noisy segment against itself, under one softmax with its clean keys.
        qn, kn, vn = (x[:, :, c:].reshape(s, h, n, b, d) for x in (q, k, v))
        scores_b = torch.matmul(qn, kn.transpose(-1, -2)).to(acc) * scaling  # [s, h, K, B, B]
        scores_b = scores_b.masked_fill(~self.segment_visible().unsqueeze(1), low)
        joint = torch.cat([scores_a[:, :, c:].reshape(s, h, n, b, c), scores_b], dim=-1)  # [s, h, K, B, C + B]
        probs = torch.softmax(joint, dim=-1).to(v.dtype)
        out_noisy = torch.matmul(probs[..., :c], vc.unsqueeze(2)) + torch.matmul(probs[..., c:], vn)  # [s, h, K, B, d]
        return torch.cat([out_clean, out_noisy.reshape(s, h, n * b, d)], dim=2)

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
