"""Fast sampling paths: the static KV cache and fused block commits are exact; the dual cache is close."""

from __future__ import annotations

import pytest
import torch

from tracerl.config import ConfigError, SamplingConfig
from tracerl.models.base import DecoderPolicy
from tracerl.models.cache import StaticKVCache
from tracerl.sampling import generate
from tracerl.sampling.full import full_visible
from tracerl.trace import replay_mismatch

from .conftest import encode
from .test_sampling import PROMPTS, check_invariants, eos_biased


def counted(policy):  # noqa: ANN001, ANN201
    """``policy`` with a counter of model forwards (``calls``) and of the tokens they process (``tokens``)."""
    inner = policy.hidden_states
    stats = {"calls": 0, "tokens": 0}

    def hidden_states(input_ids, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        stats["calls"] += 1
        stats["tokens"] += input_ids.numel()
        return inner(input_ids, *args, **kwargs)

    policy = eos_biased(policy, 0.0)  # a shallow copy
    policy.hidden_states = hidden_states
    return policy, stats


# ------------------------------------------------------------------------------------------ the static cache


def test_static_cache_writes_in_place_and_crop_moves_no_data():
    cache = StaticKVCache(num_layers=2, width=8)
    k = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    keys, _ = cache.update(k, -k, 0)
    buffer = cache.layers[0].keys
    assert keys.shape == (2, 3, 5, 4) and keys.data_ptr() == buffer.data_ptr()  # a view of the buffer
    cache.crop(-2)
    assert cache.get_seq_length() == 3 and cache.layers[0].keys.data_ptr() == buffer.data_ptr()
    keys, values = cache.update(k[:, :, :4] + 100, -k[:, :, :4] - 100, 0)  # appended at column 3
    assert keys.shape[-2] == 7 and cache.layers[0].keys.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(keys[:, :, :3], k[:, :, :3], rtol=0, atol=0)
    torch.testing.assert_close(keys[:, :, 3:], k[:, :, :4] + 100, rtol=0, atol=0)
    torch.testing.assert_close(values[:, :, 3:], -k[:, :, :4] - 100, rtol=0, atol=0)
    cache.seek(1)  # overwrite columns 1-2 inside the valid region; the length stays 7
    keys, _ = cache.update(torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2, 4), 0)
    assert keys.shape[-2] == 7 and keys[:, :, 1:3].abs().sum() == 0 and keys[:, :, 0].equal(k[:, :, 0])
    assert cache.layers[1].get_seq_length() == 0  # layers are independent


def test_static_cache_refuses_to_write_past_its_width():
    cache = StaticKVCache(num_layers=1, width=4)
    cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    with pytest.raises(ValueError, match="up to column 5 but the static cache was allocated 4 wide"):
        cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0)


# ---------------------------------------------------------------------------- block sampler: exact variants


@pytest.mark.parametrize("remasking", ["low_confidence_static", "low_confidence_dynamic"])
@pytest.mark.parametrize("storage", ["static", "dynamic"])
@pytest.mark.parametrize("fused", [True, False])
def test_every_block_cache_variant_equals_the_uncached_reference(block_policy, remasking, storage, fused):
    policy = eos_biased(block_policy, 1.0)  # EOS mid-block in some rows: finished rows stay in the batch
    prompts = encode(policy, PROMPTS)  # lengths 4, 7, 1, 13, 4: complete prompt blocks and partial ones
    kw = dict(max_new_tokens=18, block_size=4, remasking=remasking, threshold=0.05, steps_per_block=3)
    plain = generate(policy, prompts, SamplingConfig(cache="none", **kw), seed=4)
    fast = generate(policy, prompts, SamplingConfig(cache="kv", kv_storage=storage, fused_commit=fused, **kw), seed=4)
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.step_map, plain.step_map)
    torch.testing.assert_close(fast.rollout_logp, plain.rollout_logp, atol=1e-5, rtol=0)
    check_invariants(fast, 3)


def test_fused_commit_takes_one_forward_per_denoising_step(block_policy):
    # prompt lengths 4 and 7, B = 4: C = 4 columns of complete prompt blocks to prefill; 10 new tokens fill
    # columns 4-13 (row 0) and 7-16 (row 1), so NB = 4 blocks. One token per step: a block takes as many steps
    # as its most-masked row has masks: 4 (row 0), 4, 4 (row 1), 1 (row 1, column 16) = 13 steps.
    prompts = encode(block_policy, ["1+2=", "12+34=?"])
    base = dict(max_new_tokens=10, block_size=4, cache="kv")
    fused, f_stats = counted(block_policy)
    unfused, u_stats = counted(block_policy)
    fused.eos_id = unfused.eos_id = -1  # decode every block
    a = generate(fused, prompts, SamplingConfig(fused_commit=True, **base), seed=2)
    b = generate(unfused, prompts, SamplingConfig(fused_commit=False, **base), seed=2)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.step_map, b.step_map)
    torch.testing.assert_close(a.rollout_logp, b.rollout_logp, atol=1e-5, rtol=0)
    assert f_stats["calls"] == 13  # the prefill and the clean writes ride along with denoising steps
    assert u_stats["calls"] == 13 + 1 + 3  # + the prefill + a clean write after each block but the last
    # the same columns go through the model either way: prefill 4 + 13 steps × 4 + 3 clean blocks × 4 = 68
    assert f_stats["tokens"] == u_stats["tokens"] == 2 * 68


def test_cuda_graph_needs_a_cuda_device(block_policy, full_policy):
    prompts = encode(block_policy, ["1+2="])
    with pytest.raises(ConfigError, match="sampling.cuda_graph=true .* needs a CUDA device; the sampler runs on cpu"):
        generate(block_policy, prompts, SamplingConfig(max_new_tokens=4, cuda_graph=True))
    with pytest.raises(ConfigError, match="sampling.cuda_graph=true is for block-diffusion models"):
        generate(full_policy, prompts, SamplingConfig(max_new_tokens=4, cuda_graph=True))


# -------------------------------------------------------------------------------- full attention: dual cache


def shifted(full_policy) -> DecoderPolicy:  # noqa: ANN001
    """A Dream-style (AR-initialised) view of the tiny full-attention model: logits of i come from i-1."""
    p = full_policy
    return DecoderPolicy(p.model, p.tokenizer, family="dream", mask_id=p.mask_id, block_size=None, shift=True)


@pytest.mark.parametrize("kind", ["full", "shifted"])
def test_dual_cache_refresh_of_an_unchanged_block_is_exact(full_policy, kind):
    """Nothing stale: recomputing a block in place against the cached prefix and suffix, with the same tokens,
    gives the logits of the full forward that filled the cache."""
    policy = full_policy if kind == "full" else shifted(full_policy)
    x = torch.tensor([encode(policy, ["12+34=?"])[0] + [policy.mask_id] * 9])  # [1, 16]
    width, lo, hi = x.shape[1], 7, 11
    cols, pos, valid = torch.arange(width), torch.arange(width).unsqueeze(0), torch.ones(1, width, dtype=torch.bool)
    block = torch.arange(lo, hi).unsqueeze(0)
    kv = policy.new_cache(width)
    with torch.no_grad():
        full = policy.logits_at(x, pos, full_visible(valid, cols, cols), block, kv)
        start = lo - int(policy.shift)
        kv.seek(start)
        vis = full_visible(valid, cols[start:hi], cols)
        again = policy.logits_at(x[:, start:hi], pos[:, start:hi], vis, block - start, kv)
    assert kv.get_seq_length() == width
    torch.testing.assert_close(again, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["full", "shifted"])
def test_dual_cache_with_one_step_per_block_is_exact(full_policy, kind):
    """With one denoising step per block every step is a block's first, which runs the whole sequence."""
    policy = eos_biased(full_policy if kind == "full" else shifted(full_policy), 1.0)
    prompts = encode(policy, PROMPTS)
    kw = dict(max_new_tokens=12, block_size=4, steps_per_block=1, remasking="low_confidence_static")
    exact = generate(policy, prompts, SamplingConfig(cache="none", **kw), seed=3)
    dual = generate(policy, prompts, SamplingConfig(cache="dual", **kw), seed=3)
    assert torch.equal(dual.response_ids, exact.response_ids) and torch.equal(dual.step_map, exact.step_map)
    torch.testing.assert_close(dual.rollout_logp, exact.rollout_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["full", "shifted"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_approximate_caches_keep_invariants_and_a_small_replay_mismatch(full_policy, kind, cache):
    policy = eos_biased(full_policy if kind == "full" else shifted(full_policy), 1.0)
    prompts = encode(policy, PROMPTS)
    kw = dict(max_new_tokens=16, block_size=8, remasking="low_confidence_dynamic", threshold=0.05)
    exact = generate(policy, prompts, SamplingConfig(cache="none", **kw), seed=5)
    approx = generate(policy, prompts, SamplingConfig(cache=cache, **kw), seed=5)
    check_invariants(approx, 8)
    assert replay_mismatch(policy, exact) < 1e-4  # the exact sampler replays to its own log-probs
    gap = replay_mismatch(policy, approx)
    assert 1e-6 < gap < 0.5  # approximate: visibly non-zero, yet far below the log-probs' own size
    assert float(approx.rollout_logp[approx.response_mask].abs().mean()) > 4 * gap


def test_dual_cache_forwards_only_the_block_after_a_blocks_first_step(full_policy):
    policy, stats = counted(full_policy)
    policy.eos_id = -1
    prompts = encode(policy, ["1+2=", "12+34=?"])  # left-padded to 7 columns, + 16 new = 23 columns
    generate(policy, prompts, SamplingConfig(max_new_tokens=16, block_size=8, cache="dual"), seed=0)
    # 2 blocks × 8 steps: each block's first step runs all 23 columns, the 7 others run the block's 8
    assert stats["calls"] == 16
    assert stats["tokens"] == 2 * 2 * (23 + 7 * 8)


def test_dual_cache_on_a_block_model_is_clear(block_policy):
    with pytest.raises(ConfigError, match="sampling.cache=dual is for full-attention models"):
        generate(block_policy, encode(block_policy, ["1+2="]), SamplingConfig(max_new_tokens=4, cache="dual"))
