"""Trace → views: the replay invariant (DESIGN §7), shrink, and views against plain per-token references."""

from __future__ import annotations

import pytest
import torch

from tracerl.config import SamplingConfig
from tracerl.models.base import DecoderPolicy
from tracerl.sampling import generate
from tracerl.trace import VIEWS, get_views, make_views, scatter_to_response, shrink, view_logprobs

from .conftest import encode, tiny_policy
from .test_sampling import PROMPTS, eos_biased

REMASKINGS = ["low_confidence_static", "low_confidence_dynamic", "entropy_bounded", "random", "sequential"]


@pytest.fixture(scope="module")
def policies():  # noqa: ANN201
    full = tiny_policy("full")
    block = tiny_policy("block")
    # an AR-initialised (Dream-style) policy: logits for position i are read from position i-1
    shifted = DecoderPolicy(
        full.model, full.tokenizer, family="dream", mask_id=full.mask_id, block_size=None, shift=True
    )
    return {"full": eos_biased(full, 1.5), "block": eos_biased(block, 1.5), "shifted": eos_biased(shifted, 1.5)}


def replay(policy, rollout, s: int = 1):  # noqa: ANN001, ANN201
    views = make_views(rollout, "trace", policy.mask_id, shift=policy.shift, shrink_s=s)
    with torch.no_grad():
        logp = view_logprobs(policy, views)
    return views, scatter_to_response(views, logp, len(rollout), rollout.response_ids.shape[1])


def assert_targets_once(views, rollout) -> None:  # noqa: ANN001
    count = torch.zeros(rollout.response_ids.shape, dtype=torch.long)
    rows, cols = views.target_mask.nonzero(as_tuple=True)
    count.index_put_((views.row_sample[rows], views.target_pos[rows, cols]), torch.ones_like(rows), accumulate=True)
    assert torch.equal(count, rollout.response_mask.long())  # every trainable token is a target exactly once


# ---------------------------------------------------------------------------------------------- replay invariant


@pytest.mark.parametrize("remasking", REMASKINGS)
@pytest.mark.parametrize("kind", ["full", "block", "shifted"])
def test_replay_invariant(policies, kind, remasking):
    """With s = 1 and fp32, every target's log-prob from its view equals the sampler's rollout_logp (1e-4)."""
    policy = policies[kind]
    s = SamplingConfig(max_new_tokens=15, block_size=4, remasking=remasking, threshold=0.05, temperature=0.8)
    prompts = encode(policy, PROMPTS)  # lengths 4, 7, 1, 13, 4: multiples of B=4 and not, mixed in one batch
    rollout = generate(policy, prompts, s, seed=7)
    views, got = replay(policy, rollout)
    assert_targets_once(views, rollout)
    mask = rollout.response_mask
    assert mask.any(-1).all()
    torch.testing.assert_close(got[mask], rollout.rollout_logp[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["full", "block"])
@pytest.mark.parametrize("steps_per_block", [1, 2])
def test_replay_invariant_several_tokens_per_step(policies, kind, steps_per_block):
    policy = policies[kind]
    s = SamplingConfig(max_new_tokens=16, block_size=4, steps_per_block=steps_per_block)
    rollout = generate(policy, encode(policy, PROMPTS), s, seed=1)
    views, got = replay(policy, rollout)
    assert views.row_step.max() < 16
    mask = rollout.response_mask
    torch.testing.assert_close(got[mask], rollout.rollout_logp[mask], atol=1e-4, rtol=0)


def test_replay_invariant_eos_mid_block(policies):
    policy = eos_biased(policies["block"], 2.0)  # EOS very likely: many responses end mid-block
    s = SamplingConfig(max_new_tokens=20, block_size=4, remasking="sequential", trainable_pad_tokens=1)
    rollout = generate(policy, encode(policy, PROMPTS * 3), s, seed=5)
    eos_at = ((rollout.response_ids == policy.eos_id) & (rollout.step_map >= 0)).float().argmax(-1)
    tails = rollout.prompt_lengths % 4
    assert ((tails + eos_at) % 4 != 3).any(), "no EOS landed mid-block"
    views, got = replay(policy, rollout)
    mask = rollout.response_mask
    assert_targets_once(views, rollout)
    torch.testing.assert_close(got[mask], rollout.rollout_logp[mask], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- references


def _reference_logp_full(policy, rollout, i: int, j: int) -> float:  # noqa: ANN001
    """Plain reference: the state before token j was committed, built position by position."""
    lp = int(rollout.prompt_lengths[i])
    prompt = rollout.prompt_ids[i, -lp:].tolist()
    sm = rollout.step_map[i]
    response = [
        int(rollout.response_ids[i, k]) if 0 <= int(sm[k]) < int(sm[j]) else policy.mask_id for k in range(len(sm))
    ]
    x = torch.tensor([prompt + response])
    n = x.shape[1]
    with torch.no_grad():
        hidden = policy.model.model(input_ids=x, attention_mask=torch.zeros(1, 1, n, n)).last_hidden_state
        col = lp + j - int(policy.shift)
        return float(torch.log_softmax(policy.head(hidden[0, col]).float(), -1)[rollout.response_ids[i, j]])


def _reference_logp_block(policy, rollout, i: int, j: int) -> float:  # noqa: ANN001
    """Plain reference for block diffusion: the sequence up to token j's block, block-causal, that block's
    positions decoded before j clean and the rest masked."""
    b = rollout.block_size
    lp = int(rollout.prompt_lengths[i])
    prompt = rollout.prompt_ids[i, -lp:].tolist()
    sm = rollout.step_map[i]
    end = ((lp + j) // b + 1) * b - lp  # response positions up to the end of j's block
    response = [
        int(rollout.response_ids[i, k]) if int(sm[k]) < int(sm[j]) else policy.mask_id for k in range(min(end, len(sm)))
    ]
    x = torch.tensor([prompt + response])
    cols = torch.arange(x.shape[1]) // b
    bias = torch.zeros(1, 1, x.shape[1], x.shape[1]).masked_fill(
        cols.view(-1, 1) < cols.view(1, -1), torch.finfo(torch.float32).min
    )
    with torch.no_grad():
        hidden = policy.model.model(input_ids=x, attention_mask=bias).last_hidden_state
        return float(torch.log_softmax(policy.head(hidden[0, lp + j]).float(), -1)[rollout.response_ids[i, j]])


@pytest.mark.parametrize("kind", ["full", "block", "shifted"])
def test_views_match_plain_per_token_reference(policies, kind):
    policy = policies[kind]
    s = SamplingConfig(max_new_tokens=10, block_size=4, remasking="low_confidence_dynamic", threshold=0.05)
    rollout = generate(policy, encode(policy, PROMPTS[:3]), s, seed=7)  # a seed where no row stops at once
    _, got = replay(policy, rollout)
    ref = _reference_logp_block if kind == "block" else _reference_logp_full
    checked = 0
    for i in range(len(rollout)):
        for j in rollout.response_mask[i].nonzero().flatten().tolist():
            assert abs(float(got[i, j]) - ref(policy, rollout, i, j)) < 1e-4
            checked += 1
    assert checked >= 10


def test_block_rows_per_sample_is_max_steps_in_a_block(policies):
    policy = policies["block"]
    rollout = generate(policy, encode(policy, PROMPTS), SamplingConfig(max_new_tokens=12, block_size=4), seed=0)
    views, _ = replay(policy, rollout)
    tails = rollout.prompt_lengths % 4
    for i in range(len(rollout)):
        blocks = ((tails[i] + torch.arange(12)) // 4).tolist()
        steps = rollout.step_map[i].tolist()
        rounds = set()  # round of a token = rank of its step among the distinct steps of its block
        for j in rollout.response_mask[i].nonzero().flatten().tolist():
            in_block = sorted({st for st, bl in zip(steps, blocks, strict=True) if bl == blocks[j] and st >= 0})
            rounds.add(in_block.index(steps[j]))
        assert int((views.row_sample == i).sum()) == len(rounds)
        per_block = [
            len({st for st, bl in zip(steps, blocks, strict=True) if bl == b and st >= 0}) for b in set(blocks)
        ]
        assert len(rounds) <= max(per_block)
    # one forward of about Lp + 2L tokens per round
    assert views.row_tokens <= int(rollout.prompt_lengths.max()) + 2 * (12 + 4)


# ---------------------------------------------------------------------------------------------- shrink


def test_shrink_hand_table():
    # distinct steps 0..6; s=2 groups {0,1}→1, {2,3}→3, {4,5}→5, {6}→6 ; s=3: {0,1,2}→2, {3,4,5}→5, {6}→6
    steps = torch.tensor([[0, 1, 2, 3, 4, 5, 6, -1]])
    assert shrink(steps, 1).tolist() == steps.tolist()
    assert shrink(steps, 2).tolist() == [[1, 1, 3, 3, 5, 5, 6, -1]]
    assert shrink(steps, 3).tolist() == [[2, 2, 2, 5, 5, 5, 6, -1]]
    # gaps and repeats: distinct ids 2, 5, 9 → s=2: {2,5}→5, {9}→9
    assert shrink(torch.tensor([[5, 2, 2, 9, 5]]), 2).tolist() == [[5, 5, 5, 9, 5]]
    # per block: blocks [0,0,0,1,1,1] with steps [0,1,2 | 3,4,5] → s=2: {0,1}→1,{2}→2 | {3,4}→4,{5}→5
    blocks = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert shrink(torch.tensor([[0, 1, 2, 3, 4, 5]]), 2, blocks).tolist() == [[1, 1, 2, 4, 4, 5]]
    # two sequences are independent
    two = torch.tensor([[0, 1, 2, 3], [7, 7, 8, 9]])
    assert shrink(two, 2).tolist() == [[1, 1, 3, 3], [8, 8, 8, 9]]


def test_shrink_matches_plain_loop():
    gen = torch.Generator().manual_seed(0)
    steps = torch.randint(0, 30, (6, 40), generator=gen)
    steps[:, 35:] = -1
    blocks = torch.arange(40).expand(6, 40) // 4
    for s in (2, 3, 5):
        for groups in (None, blocks):
            got = shrink(steps, s, groups)
            for i in range(6):
                for g in range(10) if groups is not None else [None]:
                    sel = (steps[i] >= 0) & ((blocks[i] == g) if g is not None else True)
                    uniq = sorted(set(steps[i][sel].tolist()))
                    mapping = {u: uniq[min(s * (k // s + 1) - 1, len(uniq) - 1)] for k, u in enumerate(uniq)}
                    assert got[i][sel].tolist() == [mapping[v] for v in steps[i][sel].tolist()]
            assert (got[steps < 0] == -1).all()


@pytest.mark.parametrize("s", [2, 4])
def test_shrink_reduces_full_rows_and_keeps_every_target_once(policies, s):
    policy = policies["full"]
    rollout = generate(policy, encode(policy, PROMPTS), SamplingConfig(max_new_tokens=16, block_size=4), seed=0)
    exact, _ = replay(policy, rollout, 1)
    merged, _ = replay(policy, rollout, s)
    assert len(merged) < len(exact)
    assert_targets_once(merged, rollout)


# ---------------------------------------------------------------------------------------------- other estimators


def test_view_registry_lists_choices():
    assert {"trace", "d1", "random_masking", "coupled"} <= set(VIEWS)
    with pytest.raises(KeyError, match=r"unknown views 'x'; choose from \['coupled', 'd1'"):
        get_views("x")


@pytest.mark.parametrize("kind", ["full", "block"])
def test_estimator_views(policies, kind):
    policy = policies[kind]
    rollout = generate(policy, encode(policy, PROMPTS), SamplingConfig(max_new_tokens=12, block_size=4), seed=0)
    mask = rollout.response_mask
    coupled = make_views(rollout, "coupled", policy.mask_id, seed=3)
    assert_targets_once(coupled, rollout)  # a mask and its complement score every token exactly once
    d1 = make_views(rollout, "d1", policy.mask_id, seed=3, prompt_mask_prob=0.15 if kind == "full" else 0.0)
    assert len(d1) == len(rollout)
    assert int(d1.target_mask.sum()) == int(mask.sum())
    assert int((d1.input_ids == policy.mask_id).sum()) >= int(mask.sum())  # whole completion masked
    rnd = make_views(rollout, "random_masking", policy.mask_id, seed=3)
    again = make_views(rollout, "random_masking", policy.mask_id, seed=3)
    other = make_views(rollout, "random_masking", policy.mask_id, seed=4)
    assert torch.equal(rnd.input_ids, again.input_ids)  # one seeded mask per RL step, shared by old/ref/current
    assert not torch.equal(rnd.input_ids, other.input_ids)
    targets_are_masked = rnd.input_ids[rnd.target_mask] == policy.mask_id
    assert targets_are_masked.all()
    with torch.no_grad():
        logp = view_logprobs(policy, rnd)
    assert torch.isfinite(logp).all() and (logp[rnd.target_mask] < 0).all()


def test_d1_prompt_perturbation_is_refused_on_the_block_layout(policies):
    """The block sampler never masks its prompt (it sits clean in the cache): d1's perturbation is refused there,
    with the reason and the fix; on full attention it stays (d1's own setting), and on blocks p = 0 is accepted."""
    from tracerl.config import ConfigError
    from tracerl.trace import check_estimator

    policy = policies["block"]
    rollout = generate(policy, encode(policy, PROMPTS), SamplingConfig(max_new_tokens=12, block_size=4), seed=0)
    with pytest.raises(ConfigError, match=r"never does .* objective.d1_prompt_mask_prob=0"):
        make_views(rollout, "d1", policy.mask_id, seed=3, prompt_mask_prob=0.15)
    views = make_views(rollout, "d1", policy.mask_id, seed=3, prompt_mask_prob=0.0)
    # p = 0: the prompt is never masked, and each block's noisy copy is all masks behind the clean blocks before it
    assert not (views.input_ids[views.col_valid & ~views.col_noisy] == policy.mask_id).any()  # prompt, clean copy
    noisy_real = views.col_noisy & views.col_valid
    targets = views.target_mask
    assert (views.input_ids[targets] == policy.mask_id).all()
    assert torch.equal(targets.sum(1), rollout.response_mask.sum(1))  # every token scored from its block's start
    assert int((views.input_ids[noisy_real] == policy.mask_id).sum()) >= int(rollout.response_mask.sum())
    check_estimator("d1", "full", 0.15)  # d1's own setting on full attention
    check_estimator("trace", "block", 0.15)  # the knob only concerns d1


def test_sample_random_takes_the_loops_63_bit_view_seeds():
    """The loop's view seeds (``seeding.stage_seed``) use all 63 bits; every sample's draws stay its own."""
    from tracerl import seeding
    from tracerl.trace import SampleRandom

    seed = seeding.stage_seed(5, 3, "views")
    assert seed > 2**62 // 1_000_003  # large enough to have overflowed a product with a per-sample multiplier
    both = SampleRandom(seed, torch.tensor([0, 1])).rand(4)
    assert both.shape == (2, 4) and not torch.equal(both[0], both[1])
    assert torch.equal(SampleRandom(seed, torch.tensor([1])).rand(4)[0], both[1])
    assert not torch.equal(SampleRandom(seed + 1, torch.tensor([1])).rand(4)[0], both[1])
