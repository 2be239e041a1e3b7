"""The lean forward over the static cache computes what the transformers forward computes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from tracerl.models.base import additive_mask, cache_argument
from tracerl.models.cache import StaticKVCache
from tracerl.models.lean import lean_hidden_states, lean_supported

SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=40, rms_norm_eps=1e-5
)


def decoder(kind: str) -> torch.nn.Module:
    """A random decoder of each architecture the lean forward takes, with grouped key/value heads (2 per 4)."""
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, rope_theta=500.0, **SHAPE))
    elif kind == "qwen2":  # biases on q/k/v
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **SHAPE))
    else:  # q/k norms over a head dim that is not hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=24, **SHAPE))
    for p in model.parameters():  # norm weights and biases away from their initial 1 / 0, so that they count
        if p.dim() == 1:
            p.data.add_(0.3 * torch.randn_like(p))
    return model.eval()


def run(model: torch.nn.Module, lean: bool, full_width: bool = False) -> list[torch.Tensor]:
    """A prefill of 6 columns, then two steps on a 3-column block (the second overwrites the first in place,
    with one token changed), left padding in row 1; each forward attends to the valid columns so far. With
    ``full_width`` the cache is attended over all 9 columns, the ones not yet valid hidden by the mask, and
    written at device columns (the CUDA-graph mode)."""
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    pos = (torch.arange(9).unsqueeze(0) - torch.tensor([[0], [2]])).clamp_min(0)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :2] = False
    cache = StaticKVCache(model.config.num_hidden_layers, 9, full_width=full_width)
    backbone = model.model
    outs = []
    for lo, hi, at in ((0, 6, None), (6, 9, None), (6, 9, 6)):
        if full_width:
            cache.write_at(torch.arange(lo, hi))
        else:
            cache.seek(at)
        vis = valid[:, None, :hi].expand(2, hi - lo, hi) | torch.eye(hi, dtype=torch.bool)[lo:hi]
        if full_width:
            vis = torch.cat((vis, torch.zeros(2, hi - lo, 9 - hi, dtype=torch.bool)), dim=-1)
        mask = additive_mask(vis, torch.float32)
        if lean:
            outs.append(lean_hidden_states(backbone, x[:, lo:hi], pos[:, lo:hi], mask, cache))
        else:
            kw = {cache_argument(backbone): cache}
            out = backbone(input_ids=x[:, lo:hi], position_ids=pos[:, lo:hi], attention_mask=mask, use_cache=True, **kw)
            outs.append(out.last_hidden_state)
        x = x.clone()
        x[:, 7] = (x[:, 7] + 1) % 40
    return outs


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_lean_forward_equals_the_transformers_forward(kind):
    model = decoder(kind)
    assert lean_supported(model)
    with torch.no_grad():
        ref = run(model, lean=False)
        got = run(model, lean=True)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    assert float((ref[2] - ref[1]).abs().max()) > 1e-3  # the changed token reached the block's states


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "transformers"])
def test_a_full_width_cache_computes_the_valid_prefix_forward(kind, lean):
    """Keys over the whole width, the invalid columns masked, writes at device columns: the same function as
    attending over the valid prefix. Not bitwise: softmax and attention·V reduce over 9 columns instead of 6
    or 9, and the extra terms (exact zeros) shift where the vectorised reductions split, so rounding moves."""
    model = decoder(kind)
    with torch.no_grad():
        ref = run(model, lean=False)
        got = run(model, lean=lean, full_width=True)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    assert float((got[2] - got[1]).abs().max()) > 1e-3  # the overwrite at device columns reached the block


def test_a_full_width_cache_writes_at_device_columns_and_is_not_cropped():
    cache = StaticKVCache(num_layers=1, width=6, full_width=True)
    with pytest.raises(ValueError, match="needs write_at\\(cols\\) before its first forward"):
        cache.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), 0)
    cache.write_at(torch.tensor([4, 1]))
    keys, values = cache.update(torch.ones(1, 1, 2, 2), -torch.ones(1, 1, 2, 2), 0)
    assert keys.shape == (1, 1, 6, 2) and cache.get_seq_length() == 6  # every column, every forward
    assert keys[0, 0, :, 0].tolist() == [0, 1, 0, 0, 1, 0] and values[0, 0, :, 1].tolist() == [0, -1, 0, 0, -1, 0]
    with pytest.raises(ValueError, match="not cropped"):
        cache.crop(-2)
    with pytest.raises(ValueError, match="use write_at\\(cols\\), not seek"):
        cache.seek(2)
    with pytest.raises(ValueError, match="write_at\\(cols\\) is for a full-width static cache"):
        StaticKVCache(num_layers=1, width=6).write_at(torch.tensor([0]))


def test_lean_forward_is_only_taken_for_plain_decoders():
    model = decoder("qwen3")
    model.train()
    assert not lean_supported(model)  # dropout and training hooks: the transformers forward
    model.eval()
    model.config.hidden_act = "gelu"
    assert not lean_supported(model)
    sliding = decoder("qwen2")
    sliding.config.use_sliding_window = True
    assert not lean_supported(sliding)
    renamed = decoder("llama")
    assert lean_supported(renamed)
    renamed.model.layers[0].self_attn.qkv = renamed.model.layers[0].self_attn.q_proj
    del renamed.model.layers[0].self_attn.q_proj  # a layout the lean forward does not know
    assert not lean_supported(renamed)


def test_policy_takes_the_lean_forward_only_with_the_static_cache(block_policy, monkeypatch):
    calls = []
    import tracerl.models.base as base

    monkeypatch.setattr(base, "lean_hidden_states", lambda *a: calls.append(1) or lean_hidden_states(*a))
    ids = torch.tensor([[5, 6, 7, 8]])
    pos, vis = torch.arange(4).unsqueeze(0), torch.ones(1, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        dyn = block_policy.hidden_states(ids, pos, vis, block_policy.new_cache())
        assert calls == []
        static = block_policy.hidden_states(ids, pos, vis, block_policy.new_cache(8))
        assert calls == [1]
    torch.testing.assert_close(static, dyn, atol=2e-6, rtol=0)
