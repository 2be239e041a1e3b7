"""Sampler invariants of DESIGN §6, on tiny models of both layouts."""

from __future__ import annotations

import copy

import pytest
import torch

from tracerl.config import ConfigError, SamplingConfig
from tracerl.sampling import REMASKING, block_grid, generate
from tracerl.sampling.core import StepNoise
from tracerl.sampling.remasking import get_remasking
from tracerl.seeding import RowStreams

from .conftest import encode

PROMPTS = ["1+2=", "12+34=?", "a", "hello world: ", "7*8="]  # lengths 4, 7, 1, 13, 4 (block 4)


def eos_biased(policy, bias: float):  # noqa: ANN001, ANN201
    """A copy of ``policy`` whose EOS logit is raised, so EOS lands early and often mid-block."""
    out = copy.copy(policy)
    head = policy.head

    def biased(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        logits[..., policy.eos_id] += bias
        return logits

    out.head = biased
    return out


def blocks_of(rollout, i: int) -> list[list[int]]:  # noqa: ANN001
    """Response positions of sample i grouped by the sampler's blocks."""
    lp = int(rollout.prompt_lengths[i])
    b = rollout.block_size
    if rollout.layout == "block":
        first = b - lp % b  # response positions in the first decoding block (shares it with the prompt tail)
        edges = [0, *range(first if first < b else b, rollout.response_ids.shape[1] + b, b)]
    else:
        edges = list(range(0, rollout.response_ids.shape[1] + b, b))
    length = rollout.response_ids.shape[1]
    return [list(range(lo, min(hi, length))) for lo, hi in zip(edges, edges[1:], strict=False) if lo < length]


def check_invariants(rollout, steps_per_block: int) -> None:  # noqa: ANN001
    sm = rollout.step_map
    generated = sm >= 0
    # every generated position committed exactly once, nothing else committed
    assert torch.equal(rollout.commit_counts, generated.long())
    for i in range(len(rollout)):
        prev_max = -1
        stopped = False
        for pos in blocks_of(rollout, i):
            steps = sm[i, pos]
            if stopped:
                assert (steps == -1).all(), "a block after the EOS block was generated"
                continue
            assert (steps >= 0).all(), "a block was only partly generated"
            assert int(steps.min()) > prev_max, "step_map decreases across blocks"
            assert len(set(steps.tolist())) <= steps_per_block
            prev_max = int(steps.max())
            stopped = bool((rollout.response_ids[i, pos] == rollout.sampler["eos_id"]).any())


@pytest.mark.parametrize("remasking", sorted(REMASKING))
@pytest.mark.parametrize("layout", ["full", "block"])
def test_invariants_every_remasking(full_policy, block_policy, layout, remasking):
    policy = eos_biased(full_policy if layout == "full" else block_policy, 2.0)
    s = SamplingConfig(max_new_tokens=14, block_size=4, remasking=remasking, threshold=0.05)
    rollout = generate(policy, encode(policy, PROMPTS), s, seed=3)
    assert rollout.response_ids.shape == (5, 14) and rollout.layout == layout
    check_invariants(rollout, steps_per_block=4)


@pytest.mark.parametrize("steps_per_block", [1, 2, 4])
def test_steps_per_block_bounds_distinct_steps(block_policy, steps_per_block):
    s = SamplingConfig(max_new_tokens=12, block_size=4, steps_per_block=steps_per_block)
    rollout = generate(block_policy, encode(block_policy, PROMPTS), s, seed=0)
    check_invariants(rollout, steps_per_block)


def test_eos_mid_block_stops_after_its_block(block_policy):
    policy = eos_biased(block_policy, 3.0)
    s = SamplingConfig(max_new_tokens=24, block_size=4, remasking="sequential")
    rollout = generate(policy, encode(policy, PROMPTS * 4), s, seed=1)
    eos = policy.eos_id
    mid_block = 0
    for i in range(len(rollout)):
        ids, sm, mask = rollout.response_ids[i], rollout.step_map[i], rollout.response_mask[i]
        hits = ((ids == eos) & (sm >= 0)).nonzero().flatten()
        if len(hits) == 0:
            assert bool(rollout.truncated[i]) and mask.equal(sm >= 0)
            continue
        first = int(hits[0])
        assert not bool(rollout.truncated[i])
        assert mask[: first + 1].all() and not mask[first + 1 :].any()  # content through the first EOS only
        block = next(pos for pos in blocks_of(rollout, i) if first in pos)
        assert (sm[block] >= 0).all()  # the EOS block is completed
        assert (sm[block[-1] + 1 :] == -1).all()  # and nothing after it
        mid_block += first != block[-1]
        assert policy.eos_id not in policy.tokenizer(rollout.texts[i])["input_ids"]
    assert mid_block > 0, "the test needs at least one EOS in the middle of a block"


def test_trainable_pad_tokens_extend_mask(full_policy):
    policy = eos_biased(full_policy, 3.0)
    base = SamplingConfig(max_new_tokens=16, block_size=4, remasking="sequential")
    a = generate(policy, encode(policy, PROMPTS), base, seed=2)
    b = generate(policy, encode(policy, PROMPTS), SamplingConfig(**{**base.__dict__, "trainable_pad_tokens": 2}), 2)
    assert torch.equal(a.response_ids, b.response_ids)
    extra = b.response_mask.sum(-1) - a.response_mask.sum(-1)
    for i in range(len(a)):
        n_generated_after = int((a.step_map[i] >= 0).sum() - a.response_mask[i].sum())
        assert int(extra[i]) == min(2, n_generated_after)


def test_seed_makes_runs_repeatable(block_policy):
    s = SamplingConfig(max_new_tokens=8, block_size=4)
    prompts = encode(block_policy, PROMPTS)
    a, b, c = (generate(block_policy, prompts, s, seed=k) for k in (5, 5, 6))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.step_map, b.step_map)
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.parametrize("remasking", ["low_confidence_static", "low_confidence_dynamic", "random"])
def test_cached_and_uncached_block_sampling_identical(block_policy, remasking):
    prompts = encode(block_policy, PROMPTS)  # lengths that are and are not multiples of the block size
    policy = eos_biased(block_policy, 1.0)
    kw = dict(max_new_tokens=18, block_size=4, remasking=remasking, threshold=0.05)
    cached = generate(policy, prompts, SamplingConfig(cache="kv", **kw), seed=11)
    plain = generate(policy, prompts, SamplingConfig(cache="none", **kw), seed=11)
    assert torch.equal(cached.response_ids, plain.response_ids)
    assert torch.equal(cached.step_map, plain.step_map)
    torch.testing.assert_close(cached.rollout_logp, plain.rollout_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["full", "block"])
def test_sequential_one_token_per_step_is_greedy_left_to_right(full_policy, block_policy, layout):
    policy = eos_biased(full_policy if layout == "full" else block_policy, 0.5)
    prompts = encode(policy, PROMPTS)
    s = SamplingConfig(max_new_tokens=12, block_size=4, remasking="sequential", temperature=0.0)
    rollout = generate(policy, prompts, s, seed=0)
    for i, p in enumerate(prompts):
        generated = rollout.response_ids[i][rollout.step_map[i] >= 0].tolist()
        assert generated == _greedy_reference(policy, p, 12, 4, layout)
        # one token per step, in order
        steps = rollout.step_map[i][rollout.step_map[i] >= 0]
        assert torch.equal(steps, torch.arange(len(steps)))


def _greedy_reference(policy, prompt: list[int], length: int, block: int, layout: str) -> list[int]:  # noqa: ANN001
    """Plain left-to-right greedy decoding of one unpadded sequence, one model call per token.

    Block layout: blocks on the absolute grid from the prompt's first token, block-causal attention.
    Full layout: blocks relative to the response start, bidirectional attention. Either way decoding stops
    after the block that holds the first EOS.
    """
    lp = len(prompt)
    x = torch.tensor(prompt + [policy.mask_id] * length).unsqueeze(0)
    cols = torch.arange(x.shape[1])
    if layout == "block":
        block_of = cols // block
        allowed = block_of.view(-1, 1) >= block_of.view(1, -1)
    else:
        block_of = torch.where(cols >= lp, (cols - lp) // block, -1)
        allowed = torch.ones(len(cols), len(cols), dtype=torch.bool)
    bias = torch.zeros(1, 1, len(cols), len(cols)).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out: list[int] = []
    eos_block = None
    for j in range(length):
        col = lp + j
        if eos_block is not None and int(block_of[col]) > eos_block:
            break
        with torch.no_grad():
            hidden = policy.model.model(input_ids=x, position_ids=cols.unsqueeze(0), attention_mask=bias)
            logits = policy.head(hidden.last_hidden_state[0, col])
        logits[policy.mask_id] = float("-inf")
        x[0, col] = int(logits.argmax())
        out.append(int(x[0, col]))
        if out[-1] == policy.eos_id and eos_block is None:
            eos_block = int(block_of[col])
    return out


def test_block_grid_is_absolute():
    # prompt lengths 4, 7, 1 with B=4: complete prompt blocks 4, 4, 0 → first decoding column C=4
    g = block_grid([4, 7, 1], block=4, length=6)
    assert g["C"] == 4
    assert g["pad"].tolist() == [0, 0, 4]
    assert g["tail"].tolist() == [0, 3, 1]
    assert g["start"].tolist() == [4, 7, 5]
    assert g["NB"] == 3  # tail 3 + 6 tokens = 9 → 3 blocks


def test_prefix_cache_runs_and_stays_close(full_policy):
    prompts = encode(full_policy, PROMPTS)
    kw = dict(max_new_tokens=12, block_size=4, temperature=0.0)
    exact = generate(full_policy, prompts, SamplingConfig(cache="none", **kw))
    approx = generate(full_policy, prompts, SamplingConfig(cache="prefix", **kw))
    check_invariants(approx, 4)
    # approximate, but on a tiny model the decoded tokens mostly agree
    agree = (exact.response_ids == approx.response_ids).float().mean()
    assert agree > 0.5


def test_batches_are_split_and_joined(full_policy):
    prompts = encode(full_policy, PROMPTS)
    s = SamplingConfig(max_new_tokens=6, block_size=2, batch_size=2)
    r = generate(full_policy, prompts, s, seed=0, group=torch.tensor([0, 0, 1, 1, 2]))
    assert r.response_ids.shape == (5, 6) and r.group.tolist() == [0, 0, 1, 1, 2]
    assert r.prompt_ids.shape == (5, max(len(p) for p in prompts))
    assert r.prompt_lengths.tolist() == [len(p) for p in prompts]


def test_remasking_rules_by_hand():
    conf = torch.tensor([[0.10, 0.95, 0.50, 0.97]])
    ent = torch.tensor([[2.0, 0.1, 0.3, 0.05]])
    elig = torch.tensor([[True, True, True, False]])
    one = torch.tensor([1])
    kw = dict(threshold=0.9, eb_threshold=0.35, noise=StepNoise(RowStreams([0]), block=0, step=0, width=4))
    assert get_remasking("low_confidence_static")(conf, ent, elig, torch.tensor([2]), **kw).tolist() == [
        [False, True, True, False]
    ]
    # only position 1 is above 0.9 among eligible ones (position 3 is not eligible)
    dynamic = get_remasking("low_confidence_dynamic")(conf, ent, elig, one, **kw)
    assert dynamic.tolist() == [[False, True, False, False]]
    # entropies sorted 0.1, 0.3, 2.0 → cumulative 0.1, 0.4: only the first fits in 0.35
    assert get_remasking("entropy_bounded")(conf, ent, elig, one, **kw).tolist() == [[False, True, False, False]]
    seq = get_remasking("sequential")(conf, ent, elig, torch.tensor([2]), **kw)
    assert seq.tolist() == [[True, True, False, False]]
    rnd = get_remasking("random")(conf, ent, elig, torch.tensor([2]), **kw)
    assert int(rnd.sum()) == 2 and not bool((rnd & ~elig).any())
    with pytest.raises(KeyError, match=r"unknown remasking 'x'; choose from \["):
        get_remasking("x")


def test_block_size_mismatch_is_clear(block_policy):
    with pytest.raises(ConfigError, match="sampling.block_size=8 differs from the model's block size 4"):
        generate(block_policy, [[5, 6]], SamplingConfig(block_size=8))


def test_cache_mode_mismatch_is_clear(full_policy, block_policy):
    with pytest.raises(ConfigError, match="cache=kv needs a block-diffusion model"):
        generate(full_policy, [[5, 6]], SamplingConfig(cache="kv"))
    with pytest.raises(ConfigError, match="cache=prefix is for full-attention"):
        generate(block_policy, [[5, 6]], SamplingConfig(cache="prefix"))


def test_max_new_tokens_must_be_positive(full_policy):
    with pytest.raises(ConfigError, match="sampling.max_new_tokens"):
        generate(full_policy, [[5, 6]], SamplingConfig(max_new_tokens=0))


def test_too_long_for_the_model_is_clear(full_policy):
    limit = full_policy.model.config.max_position_embeddings
    with pytest.raises(ConfigError, match=f"max_position_embeddings={limit}"):
        generate(full_policy, [[5] * 10], SamplingConfig(max_new_tokens=limit))


def test_top_k_and_top_p_filtering_by_hand():
    from tracerl.sampling.core import filter_logits

    # probabilities 0.5, 0.25, 0.125, 0.125 (logits are their logs)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    keep_k = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))
    assert keep_k.tolist() == [[True, True, False, False]]
    # nucleus 0.6: 0.5 alone is not enough, 0.5 + 0.25 is → keep two
    keep_p = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.6))
    assert keep_p.tolist() == [[True, True, False, False]]
    # nucleus 0.5 is reached by the first token alone
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.5)).tolist() == [[True, False, False, False]]


def test_greedy_and_filtered_sampling_pick_allowed_tokens():
    from tracerl.sampling.core import sample_candidates

    logits = torch.tensor([[[0.0, 3.0, 2.0, 1.0, -1.0]]]).expand(1, 64, 5).contiguous()
    noise = StepNoise(RowStreams([0]), block=0, step=0, width=64)
    greedy = sample_candidates(logits, SamplingConfig(temperature=0.0), mask_id=1, noise=None)
    assert (greedy.tokens == 2).all()  # the mask token (id 1) is never a candidate
    top2 = sample_candidates(logits, SamplingConfig(top_k=2), mask_id=1, noise=noise)
    assert set(top2.tokens.flatten().tolist()) == {2, 3}  # top-2 after removing the mask token
    ref = torch.log_softmax(logits[0, 0], -1)
    torch.testing.assert_close(top2.logp[0], ref[top2.tokens[0]])  # rollout_logp is the temperature-1 log-prob
