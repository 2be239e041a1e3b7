"""Packed block-layout views (DESIGN §20): the attention pattern by hand, its kernels against the dense mask, and
the replay invariant of packed views against the sampler and against the rows, in every replay condition."""

from __future__ import annotations

import pytest
import torch

from tracerl.config import ConfigError, SamplingConfig
from tracerl.models.attention import PackedAttention
from tracerl.packed import PackedViews
from tracerl.sampling import generate
from tracerl.trace import Views, make_views, target_logprobs

from .conftest import encode, tiny_policy
from .test_sampling import PROMPTS, eos_biased
from .test_trace import REMASKINGS, assert_targets_once


@pytest.fixture(scope="module")
def block():  # noqa: ANN201
    return eos_biased(tiny_policy("block"), 1.5)


def replayed(policy, views, rollout) -> torch.Tensor:  # noqa: ANN001
    """[N, L] log-prob of every target from its view."""
    with torch.no_grad():
        logp = target_logprobs(policy, views)
    return views.targets().place(logp, len(rollout), rollout.response_ids.shape[1])


def both(policy, rollout, **kw):  # noqa: ANN001, ANN003, ANN201
    rows = make_views(rollout, "trace", policy.mask_id, **kw)
    packed = make_views(rollout, "trace", policy.mask_id, pack=True, **kw)
    assert isinstance(rows, Views) and isinstance(packed, PackedViews)
    return rows, packed


# ---------------------------------------------------------------------------------------------- the pattern


def test_pattern_by_hand():
    # block 2; clean context = 4 columns in blocks 0, 0, 1, 1 (the last one padding); two noisy segments:
    # segment 0 renoises block 1, segment 1 renoises block 2 (its second column padding).
    pattern = PackedAttention(
        clean=4,
        block=2,
        col_block=torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2]]),
        col_valid=torch.tensor([[True, True, True, False, True, True, True, False]]),
    )
    want = torch.tensor(
        [  # keys: c0 c1 c2 c3 | s0 s0 | s1 s1
            [1, 1, 0, 0, 0, 0, 0, 0],  # c0 (block 0): clean blocks ≤ 0
            [1, 1, 0, 0, 0, 0, 0, 0],  # c1
            [1, 1, 1, 0, 0, 0, 0, 0],  # c2 (block 1): blocks ≤ 1, c3 is padding
            [1, 1, 1, 1, 0, 0, 0, 0],  # c3: padding sees the valid keys of its block and itself
            [1, 1, 0, 0, 1, 1, 0, 0],  # segment 0 (block 1): clean blocks < 1, its own segment
            [1, 1, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 0, 1, 0],  # segment 1 (block 2): clean blocks < 2, its own valid column
            [1, 1, 1, 0, 0, 0, 1, 1],  # its padding column sees itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(pattern.dense()[0], want)


def random_pattern(backend: str, s: int = 3, c: int = 9, b: int = 4, blocks: tuple = (0, 1, 2, 2, 3, 1), **kw):  # noqa: ANN003, ANN201
    """A pattern with padding here and there; noisy segments renoise ``blocks`` (any order, repeats allowed)."""
    col_block = torch.cat([torch.arange(c) // b, torch.tensor(blocks).repeat_interleave(b)]).expand(s, -1)
    valid = torch.rand(s, c + len(blocks) * b, generator=torch.Generator().manual_seed(3)) < 0.8
    return PackedAttention(c, b, col_block.clone(), valid, backend=backend, **kw)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize(
    ("backend", "group_queries"), [("grouped", 1024), ("grouped", 4), ("grouped", 9), ("dense", 0), ("flex", 0)]
)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kernels_equal_attention_under_the_dense_mask(backend, group_queries, kv_heads):
    """Every backend, one group or many (a group of one segment, or groups spanning blocks), with grouped heads."""
    torch.manual_seed(0)
    pattern = random_pattern(backend, group_queries=group_queries or 1024)
    s, t, _ = pattern.shape
    heads, d = 4, 8
    dtype = torch.float64 if backend != "flex" else torch.float32  # eager FlexAttention computes in fp32
    q = torch.randn(s, heads, t, d, dtype=dtype)
    kk, v = (torch.randn(s, kv_heads, t, d, dtype=dtype) for _ in range(2))
    rep = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q, kk.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=pattern.dense().unsqueeze(1), scale=0.4
    )
    if backend == "flex":
        got = pattern.attend(q, kk, v, 0.4)  # grouped heads inside FlexAttention
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    else:
        got = pattern.attend(q, kk.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), 0.4)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_grouped_plan_computes_a_fraction_of_the_dense_pairs():
    """Segments ordered by block, groups of one segment: each group's keys are the clean prefix before its block
    and itself (block 1 of width 4 → 4 clean keys + 4, block 3 → the whole clean context of 9 + 4)."""
    pattern = random_pattern("grouped", blocks=(1, 2, 3), group_queries=4)
    grouped, (masks, sizes, keys) = pattern._plan(torch.float32)
    assert grouped and sizes == [9, 4, 4, 4]  # the clean queries, then one segment per group
    assert [m.shape[-1] for m in masks] == [9, 4 + 4, 8 + 4, 9 + 4]
    want_keys = [*range(9), *range(4), *range(9, 13), *range(8), *range(13, 17), *range(9), *range(17, 21)]
    assert keys.tolist() == want_keys
    pairs = sum(m.shape[-2] * m.shape[-1] for m in masks)
    assert pairs == 81 + 4 * (8 + 12 + 13) < 21 * 21


@pytest.mark.parametrize("group_queries", [1024, 4])
def test_grouped_backward_equals_dense(group_queries):
    torch.manual_seed(1)
    pattern = random_pattern("grouped", s=2, c=6, b=2, blocks=(1, 2, 2, 3), group_queries=group_queries)
    s, t, _ = pattern.shape
    x = [torch.randn(s, 2, t, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = torch.randn(s, 2, t, 4, dtype=torch.float64)
    (pattern.attend(*x, 0.5) * w).sum().backward()
    got = [t.grad.clone() for t in x]
    for t in x:
        t.grad = None
    mask = pattern.dense().unsqueeze(1)
    (torch.nn.functional.scaled_dot_product_attention(*x, attn_mask=mask, scale=0.5) * w).sum().backward()
    for g, t in zip(got, x, strict=True):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- replay invariant


@pytest.mark.parametrize("backend", ["grouped", "dense"])
@pytest.mark.parametrize("remasking", REMASKINGS)
def test_packed_views_replay_the_sampler_and_equal_the_rows(block, remasking, backend):
    """s = 1, fp32: packed log-probs equal rollout_logp (1e-4, the replay invariant) and the rows' (1e-5), for
    prompt lengths that are and are not multiples of B, mixed in one batch."""
    s = SamplingConfig(max_new_tokens=15, block_size=4, remasking=remasking, threshold=0.05, temperature=0.8)
    rollout = generate(block, encode(block, PROMPTS), s, seed=7)
    rows, packed = both(block, rollout, attention=backend)
    assert_targets_once(rows, rollout)
    got, want = replayed(block, packed, rollout), replayed(block, rows, rollout)
    mask = rollout.response_mask
    count = torch.zeros(rollout.response_ids.shape, dtype=torch.long)
    table = packed.targets()
    count.index_put_((table.sample, table.pos), torch.ones_like(table.pos), accumulate=True)
    assert torch.equal(count, mask.long())  # every trainable token is a packed target exactly once
    torch.testing.assert_close(got[mask], rollout.rollout_logp[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    assert int(packed.seq_tokens().sum()) < len(rows) * rows.row_tokens  # each state once, not once per round


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_packed_views_with_flex_attention_equal_the_rows(block):
    """FlexAttention (eager on CPU: forward only) computes the same pattern."""
    s = SamplingConfig(max_new_tokens=12, block_size=4, remasking="low_confidence_dynamic", threshold=0.05)
    rollout = generate(block, encode(block, PROMPTS), s, seed=3)
    rows, packed = both(block, rollout, attention="flex")
    mask = rollout.response_mask
    torch.testing.assert_close(
        replayed(block, packed, rollout)[mask], replayed(block, rows, rollout)[mask], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("steps_per_block", [1, 2])
def test_packed_replay_several_tokens_per_step(block, steps_per_block):
    s = SamplingConfig(max_new_tokens=16, block_size=4, steps_per_block=steps_per_block)
    rollout = generate(block, encode(block, PROMPTS), s, seed=1)
    rows, packed = both(block, rollout)
    mask = rollout.response_mask
    got = replayed(block, packed, rollout)
    torch.testing.assert_close(got[mask], rollout.rollout_logp[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[mask], replayed(block, rows, rollout)[mask], atol=1e-5, rtol=0)


def test_packed_replay_eos_mid_block_and_trainable_pads(block):
    policy = eos_biased(block, 2.0)
    s = SamplingConfig(max_new_tokens=20, block_size=4, remasking="sequential", trainable_pad_tokens=1)
    rollout = generate(policy, encode(policy, PROMPTS * 3), s, seed=5)
    eos_at = ((rollout.response_ids == policy.eos_id) & (rollout.step_map >= 0)).float().argmax(-1)
    assert ((rollout.prompt_lengths % 4 + eos_at) % 4 != 3).any(), "no EOS landed mid-block"
    rows, packed = both(policy, rollout)
    mask = rollout.response_mask
    got = replayed(policy, packed, rollout)
    torch.testing.assert_close(got[mask], rollout.rollout_logp[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[mask], replayed(policy, rows, rollout)[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shrink_s", [2, 3])
def test_packed_merged_steps_equal_the_rows(block, shrink_s):
    s = SamplingConfig(max_new_tokens=16, block_size=4, steps_per_block=4)
    rollout = generate(block, encode(block, PROMPTS), s, seed=2)
    rows, packed = both(block, rollout, shrink_s=shrink_s)
    mask = rollout.response_mask
    assert packed.num_rows == len(rows) and torch.equal(packed.row_step, rows.row_step)
    torch.testing.assert_close(
        replayed(block, packed, rollout)[mask], replayed(block, rows, rollout)[mask], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("name", ["random_masking", "coupled"])
def test_packed_random_builders_equal_the_rows(block, name):
    rollout = generate(block, encode(block, PROMPTS), SamplingConfig(max_new_tokens=12, block_size=4), seed=0)
    rows = make_views(rollout, name, block.mask_id, seed=3)
    packed = make_views(rollout, name, block.mask_id, seed=3, pack=True)
    assert isinstance(packed, PackedViews)
    with torch.no_grad():
        a, b = target_logprobs(block, rows), target_logprobs(block, packed)
    ta, tb = rows.targets(), packed.targets()
    key = lambda t: t.row * 1000 + t.pos  # noqa: E731 - (row, position) names a target in both layouts
    torch.testing.assert_close(b[torch.argsort(key(tb))], a[torch.argsort(key(ta))], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=r"objective.d1_prompt_mask_prob=0\.15 masks prompt tokens"):
        make_views(rollout, "d1", block.mask_id, seed=3, pack=True)  # the block sampler never masks a prompt
    d1 = make_views(rollout, "d1", block.mask_id, seed=3, pack=True, prompt_mask_prob=0.0)
    assert isinstance(d1, Views)  # d1 carries a prompt mask (all clean at p = 0), which belongs to one row: rows


def test_chunks_of_a_long_sample_give_the_same_log_probs(block):
    s = SamplingConfig(max_new_tokens=16, block_size=4, steps_per_block=4)
    rollout = generate(block, encode(block, PROMPTS), s, seed=4)
    whole = make_views(rollout, "trace", block.mask_id, pack=True)
    budget = int(whole.seq_clean.max()) + 4 * 3  # the longest context and 3 segments
    chunked = make_views(rollout, "trace", block.mask_id, pack=True, max_tokens=budget)
    assert len(chunked) > len(whole) == len(rollout)
    assert (chunked.seq_tokens() <= budget).all()
    mask = rollout.response_mask
    torch.testing.assert_close(
        replayed(block, chunked, rollout)[mask], replayed(block, whole, rollout)[mask], atol=1e-5, rtol=0
    )


def test_full_attention_views_are_never_packed():
    """In a bidirectional model the prompt attends to its row's response state: nothing is shared."""
    policy = tiny_policy("full")
    rollout = generate(policy, encode(policy, PROMPTS[:2]), SamplingConfig(max_new_tokens=8, block_size=4), seed=0)
    assert isinstance(make_views(rollout, "trace", policy.mask_id, pack=True), Views)


def test_rows_without_a_target_pack_to_nothing(block):
    """A builder may give a sample rows with no target (random masks that hit no generated position): packing
    skips the sample, and the other samples' log-probs are the rows' own."""
    from tracerl.packed import pack_views
    from tracerl.trace import RowMasks, build_views

    rollout = generate(block, encode(block, PROMPTS), SamplingConfig(max_new_tokens=8, block_size=4), seed=0)
    n, length = rollout.response_ids.shape
    target = rollout.response_mask.clone()
    target[0] = False  # sample 0: a row, no target
    masks = RowMasks(torch.arange(n), torch.zeros(n, dtype=torch.long), target.clone(), target)
    packed = pack_views(rollout, masks, block.mask_id)
    rows = build_views(rollout, masks, block.mask_id)
    assert 0 not in packed.seq_sample.tolist() and len(packed) == n - 1
    with torch.no_grad():
        a, b = target_logprobs(block, rows), target_logprobs(block, packed)
    ta, tb = rows.targets(), packed.targets()
    key = lambda t: t.row * 1000 + t.pos  # noqa: E731
    torch.testing.assert_close(b[torch.argsort(key(tb))], a[torch.argsort(key(ta))], atol=1e-5, rtol=0)
