"""A lean forward of a Llama / Qwen2 / Qwen3 decoder over tracerl's static key/value cache (DESIGN §6, §15).

A denoising step of the block sampler runs a handful of tokens (one block, two with a fused commit) through
the model, so on a CPU its cost is dominated not by the matrix products but by the ~100 small operator calls
and Python module calls per layer of the transformers forward (measured: an 8-layer, 8.4M-parameter model
spends ~9 ms on a one-token forward, of which the 57 linear layers take ~2.3 ms). ``lean_hidden_states``
computes the same function with the same weights in fewer operator calls: RMSNorm as one fused call (fp32;
other dtypes keep transformers' own formula), the rotary embedding from the model's own ``rotary_emb``,
attention with ``scaled_dot_product_attention`` over the cache's valid columns, and no per-module dispatch.
It is what a CUDA graph would capture on a GPU, for the CPU.

The outputs agree with the transformers forward to float rounding (tests compare them, and compare whole
rollouts with the uncached sampler). Only the plain architectures are taken this way (``lean_supported``);
anything else (sliding windows, other activations, training mode, remote code) runs the transformers forward.

dims: N sequences · Q query tokens · K valid cache columns · H heads · Hkv key/value heads · D head dim
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tracerl.models.cache import StaticKVCache

LEAN_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def lean_supported(model: nn.Module) -> bool:
    """True when ``model`` is a plain Llama / Qwen2 / Qwen3 decoder in eval mode that the lean forward computes
    exactly: SiLU MLP, full attention in every layer, eager or SDPA attention."""
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return (
        cfg.model_type in LEAN_MODEL_TYPES
        and not model.training
        and getattr(cfg, "hidden_act", None) == "silu"
        and not getattr(cfg, "use_sliding_window", False)
        and all(t == "full_attention" for t in layer_types)
        and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager", "tracerl")  # tracerl: SDPA but packed
        and getattr(cfg, "pretraining_tp", 1) == 1
        and _has_parts(model)
    )


def _has_parts(model: nn.Module) -> bool:
    """The modules and attributes the lean forward reads (a later transformers may rename them: then fall back)."""
    backbone = getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if not all(hasattr(backbone, a) for a in ("embed_tokens", "rotary_emb", "norm")) or not layers:
        return False
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (
        all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
        and hasattr(attn, "num_key_value_groups")
        and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj"))
        and hasattr(layer.input_layernorm, "variance_epsilon")
    )


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm, ``weight * (x * rsqrt(mean(x²) + eps))``, in one call for fp32."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as transformers applies it, ``x·cos + rotate_half(x)·sin``, with ``sin`` given
    with its first half negated: ``rotate_half(x)·sin = roll(x, D/2)·sin_signed``, exactly, in three calls."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, Hkv, K, D] → [N, Hkv·groups, K, D], each key/value head repeated for its query heads."""
    if groups == 1:
        return x
    n, h, k, d = x.shape
    return x[:, :, None].expand(n, h, groups, k, d).reshape(n, h * groups, k, d)


def lean_hidden_states(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor,
    cache: StaticKVCache,
) -> torch.Tensor:
    """[N, Q, hidden] final hidden states; ``mask`` is the additive [N, 1, Q, K] mask over the valid cache
    columns after this forward's write (``cache.at`` or the valid length, plus Q; a full-width cache: all W)."""
    n, q = input_ids.shape
    h = backbone.embed_tokens(input_ids)
    cos, sin = backbone.rotary_emb(h, position_ids)
    half = sin.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
    for i, layer in enumerate(backbone.layers):
        attn, mlp = layer.self_attn, layer.mlp
        x = _rms(layer.input_layernorm, h)
        shape = (n, q, -1, attn.head_dim)
        qs = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(shape)
        ks = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(shape)
        vs = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over the head dim, before the rotary embedding
            qs, ks = _rms(attn.q_norm, qs), _rms(attn.k_norm, ks)
        qs = _rotate(qs.transpose(1, 2), cos, sin)
        ks = _rotate(ks.transpose(1, 2), cos, sin)
        keys, values = cache.update(ks, vs.transpose(1, 2), i)
        groups = attn.num_key_value_groups
        o = F.scaled_dot_product_attention(
            qs, _repeat_kv(keys, groups), _repeat_kv(values, groups), attn_mask=mask, scale=attn.scaling
        )
        h = h + F.linear(o.transpose(1, 2).reshape(n, q, -1), attn.o_proj.weight, attn.o_proj.bias)
        x = _rms(layer.post_attention_layernorm, h)
        gate = F.silu(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
        up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
        h = h + F.linear(gate * up, mlp.down_proj.weight, mlp.down_proj.bias)
    return _rms(backbone.norm, h)
