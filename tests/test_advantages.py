"""Advantages, group filters and step-level GAE (DESIGN §8): hand arithmetic and plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from tracerl.advantages import (
    ADVANTAGES,
    advantage_metrics,
    compute_advantages,
    get_advantage,
    get_group_filter,
    outcome_token_rewards,
    step_gae,
    step_ranks,
    truncated_is_wrong,
    value_metrics_from_sums,
    value_sums,
)

NAN = float("nan")

# Three groups with non-contiguous, interleaved prompt ids:
#   group 7: rewards [1, 0, 1, 0]   mean 0.5, population std 0.5
#   group 3: rewards [1, 1, 1]      constant (zero variance)
#   group 9: rewards [2, NaN, 0]    valid [2, 0], mean 1, population std 1
REWARDS = torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0, NAN, 1.0, 0.0, 0.0, 1.0])
GROUP = torch.tensor([7, 3, 7, 9, 7, 9, 3, 7, 9, 3])


def by_position(values: dict[int, float]) -> torch.Tensor:
    return torch.tensor([float(values[i]) for i in range(len(values))])


def test_group_zscore_by_hand() -> None:
    adv = get_advantage("group_zscore")(REWARDS, GROUP)
    # group 7: (1 − 0.5)/0.5 = 1, (0 − 0.5)/0.5 = −1; group 3: std 0 → 0; group 9: (2 − 1)/1 = 1, NaN → 0, −1
    expected = by_position({0: 1, 2: -1, 4: 1, 7: -1, 1: 0, 6: 0, 9: 0, 3: 1, 5: 0, 8: -1})
    torch.testing.assert_close(adv, expected)


def test_group_mean_by_hand() -> None:
    adv = get_advantage("group_mean")(REWARDS, GROUP)
    # r − mean: group 7 ±0.5; group 3 0; group 9 2 − 1 = 1, NaN → 0, 0 − 1 = −1
    expected = by_position({0: 0.5, 2: -0.5, 4: 0.5, 7: -0.5, 1: 0, 6: 0, 9: 0, 3: 1, 5: 0, 8: -1})
    torch.testing.assert_close(adv, expected)


def test_rloo_by_hand() -> None:
    rewards = torch.cat([REWARDS, torch.tensor([5.0])])
    group = torch.cat([GROUP, torch.tensor([4])])  # a group of one sample
    adv = get_advantage("rloo")(rewards, group)
    # group 7: 1 − (0 + 1 + 0)/3 = 2/3; 0 − (1 + 1 + 0)/3 = −2/3
    # group 3: 1 − 1 = 0; group 9 (NaN excluded): 2 − 0 = 2, 0 − 2 = −2; singleton group 4: 0
    t = 2 / 3
    expected = by_position({0: t, 2: -t, 4: t, 7: -t, 1: 0, 6: 0, 9: 0, 3: 2, 5: 0, 8: -2, 10: 0})
    torch.testing.assert_close(adv, expected)


def test_zscore_float_noise_group_is_constant() -> None:
    # 0.1 + 0.2 and 0.3 differ by one ulp in float64; z-scoring the rounding noise would give ±1.
    rewards = torch.tensor([0.1 + 0.2, 0.3, 0.3], dtype=torch.float64)
    adv = get_advantage("group_zscore")(rewards, torch.zeros(3, dtype=torch.long))
    assert torch.equal(adv, torch.zeros(3, dtype=torch.float64))


def loop_advantage(name: str, rewards: list[float], group: list[int]) -> list[float]:
    """Plain per-sample reference for the three advantages."""
    out = []
    for i, (r, g) in enumerate(zip(rewards, group, strict=True)):
        members = [x for x, h in zip(rewards, group, strict=True) if h == g and not math.isnan(x)]
        if math.isnan(r):
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        if name == "group_mean":
            out.append(r - mean)
        elif name == "group_zscore":
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / len(members))
            out.append(0.0 if std < 1e-6 else (r - mean) / std)
        else:
            others = [x for j, (x, h) in enumerate(zip(rewards, group, strict=True)) if h == g and j != i]
            others = [x for x in others if not math.isnan(x)]
            out.append(r - sum(others) / len(others) if others else 0.0)
    return out


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_advantages_match_plain_loop(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    group = torch.randint(0, 6, (40,), generator=gen)
    rewards = torch.randint(0, 3, (40,), generator=gen).double()
    rewards[torch.rand(40, generator=gen) < 0.2] = NAN
    expected = loop_advantage(name, rewards.tolist(), group.tolist())
    torch.testing.assert_close(get_advantage(name)(rewards, group), torch.tensor(expected, dtype=torch.float64))


def test_keep_acc_range_by_hand() -> None:
    scores = torch.tensor(
        [1, 1, 1, 1, 0]  # group 0: acc 4/5 = 0.8 → kept (bounds inclusive)
        + [1, 1, 1, 1, 1]  # group 1: acc 1.0 → dropped
        + [1, 0, 0, 0, 0]  # group 2: acc 0.2 → kept
        + [0, 0, 0, 0, 0]  # group 3: acc 0.0 → dropped
        + [1, 0, 0, 0, 0, 0],  # group 4: acc 1/6 ≈ 0.167 → dropped
        dtype=torch.float32,
    )
    group = torch.tensor([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 6)
    keep = get_group_filter("keep_acc_range")(scores, group)
    expected = torch.tensor([True] * 5 + [False] * 5 + [True] * 5 + [False] * 5 + [False] * 6)
    assert torch.equal(keep, expected)
    # with [0.0, 0.5] only groups 2, 3, 4 (acc 0.2, 0, 1/6) stay
    keep = get_group_filter("keep_acc_range")(scores, group, low=0.0, high=0.5)
    assert torch.equal(keep, torch.tensor([False] * 10 + [True] * 16))


def test_drop_all_equal_and_keep_all() -> None:
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 3.0, 3.0, NAN, 2.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    # group 0 all 1 → drop; group 1 mixed → keep; group 2 [3, 3] (NaN ignored) → drop; singleton 3 → drop
    keep = get_group_filter("drop_all_equal")(scores, group)
    assert keep.tolist() == [False] * 3 + [True] * 3 + [False] * 4
    assert get_group_filter("keep_all")(scores, group).all()


def test_truncated_is_wrong() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.5, NAN])
    truncated = torch.tensor([True, False, True, True])
    out = truncated_is_wrong(rewards, truncated)
    assert out.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert truncated_is_wrong(rewards, truncated, wrong_value=-1.0).tolist() == [-1.0, 1.0, -1.0, -1.0]


def test_advantage_metrics_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, NAN, 3.0])
    advantages = torch.tensor([1.0, -1.0, 0.0, 5.0])
    keep = torch.tensor([True, True, True, False])
    group = torch.tensor([0, 0, 1, 2])
    m = advantage_metrics(rewards, advantages, keep, group)
    # kept advantages [1, −1, 0]: mean 0, population std sqrt(2/3); kept 3 of 4
    # valid rewards [1, 0, 3]: mean 4/3, population std sqrt(((−1/3)² + (−4/3)² + (5/3)²)/3) = sqrt(14/9)
    # kept groups 0 (advantages 1, −1) and 1 (advantage 0): one of two is flat
    assert m["advantage/mean"] == pytest.approx(0.0)
    assert m["advantage/std"] == pytest.approx(math.sqrt(2 / 3))
    assert m["advantage/kept_fraction"] == pytest.approx(0.75)
    assert m["advantage/reward_mean"] == pytest.approx(4 / 3)
    assert m["advantage/reward_std"] == pytest.approx(math.sqrt(14 / 9))
    assert m["advantage/flat_groups"] == 0.5
    assert all(isinstance(v, float) for v in m.values())


def test_keep_all_counts_groups_whose_samples_all_scored_the_same() -> None:
    # group 0 all 1.0, group 1 all 0.0 (no signal under any group advantage), group 2 mixed
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    for name in ("group_zscore", "group_mean", "rloo"):
        adv, keep, m = compute_advantages(rewards, group, advantage=name, group_filter="keep_all")
        assert keep.all() and m["advantage/kept_fraction"] == 1.0
        assert m["advantage/flat_groups"] == pytest.approx(2 / 3), name
    _, _, m = compute_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1]))
    assert m["advantage/flat_groups"] == 1.0  # a near-deterministic model: nothing to learn from


def test_lookup_errors_name_the_choices() -> None:
    with pytest.raises(KeyError, match=r"unknown advantage 'x'; choose from \['group_mean', 'group_zscore', 'rloo'\]"):
        get_advantage("x")
    with pytest.raises(KeyError, match=r"unknown group filter 'y'; choose from \[.*'keep_acc_range'.*\]"):
        get_group_filter("y")


# ---------------------------------------------------------------- step-level GAE (value model)


def loop_step_gae(values, steps, rewards, mask, gamma: float, lam: float):  # noqa: ANN001, ANN201
    """Plain per-sample reference, written straight from the equations in the anchor study (§1.7)."""
    adv = torch.zeros(values.shape, dtype=torch.float64)
    ret = torch.zeros(values.shape, dtype=torch.float64)
    for i in range(values.shape[0]):
        idx = [j for j in range(values.shape[1]) if mask[i, j]]
        ids = sorted({int(steps[i, j]) for j in idx})
        r_star = [sum(float(rewards[i, j]) for j in idx if steps[i, j] == s) for s in ids]
        v_star = [sum(float(values[i, j]) for j in idx if steps[i, j] == s) for s in ids]
        counts = [sum(1 for j in idx if steps[i, j] == s) for s in ids]
        r_star = [x / c for x, c in zip(r_star, counts, strict=True)] + [0.0]
        v_star = [x / c for x, c in zip(v_star, counts, strict=True)] + [0.0]
        big_r, big_a = [0.0] * (len(ids) + 1), [0.0] * (len(ids) + 1)
        for t in reversed(range(len(ids))):
            big_r[t] = r_star[t] + gamma * big_r[t + 1]
            big_a[t] = r_star[t] - v_star[t] + gamma * v_star[t + 1] + gamma * lam * big_a[t + 1]
        for j in idx:
            t = ids.index(int(steps[i, j]))
            r_j, v_j = float(rewards[i, j]), float(values[i, j])
            ret[i, j] = r_j + gamma * big_r[t + 1]
            adv[i, j] = r_j - v_j + gamma * v_star[t + 1] + gamma * lam * big_a[t + 1]
    return adv, ret


def random_trace(seed: int, n: int = 5, length: int = 12):  # noqa: ANN201
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randint(0, 6, (n, length), generator=gen) * 3 + 2  # sparse, unsorted step ids
    mask = torch.rand(n, length, generator=gen) < 0.8
    mask[-1] = False  # one sample with no trainable token
    values = torch.randn(n, length, generator=gen, dtype=torch.float64)
    values[~mask] = NAN  # garbage where not masked
    steps[~mask] = -1
    return values, steps, mask


def test_step_ranks() -> None:
    steps = torch.tensor([[9, 3, 3, 7, -1], [5, 5, 5, 5, 5]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    rank, num = step_ranks(steps, mask)
    assert rank.tolist() == [[2, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert num.tolist() == [3, 1]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.5), (0.99, 0.95), (1.0, 0.0)])
def test_step_gae_matches_plain_loop(gamma: float, lam: float) -> None:
    values, steps, mask = random_trace(1)
    gen = torch.Generator().manual_seed(2)
    rewards = torch.where(mask, torch.randn(mask.shape, generator=gen, dtype=torch.float64), NAN)  # process
    adv, ret = step_gae(values, steps, rewards, mask, gamma, lam)
    ref_adv, ref_ret = loop_step_gae(values, steps, rewards, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_step_gae_gamma_lambda_one_is_reward_minus_value() -> None:
    values, steps, mask = random_trace(3)
    outcome = torch.tensor([1.0, -0.5, 2.0, 0.0, 3.0], dtype=torch.float64)
    rewards = outcome_token_rewards(outcome, steps, mask)
    adv, ret = step_gae(values, steps, rewards, mask, gamma=1.0, lam=1.0)
    # telescoping: A_j = R − V_j and R_j = R on every trainable token
    expected_ret = torch.where(mask, outcome.unsqueeze(1), 0.0)
    torch.testing.assert_close(ret, expected_ret)
    torch.testing.assert_close(adv, torch.where(mask, outcome.unsqueeze(1) - values, 0.0))


def test_step_gae_lambda_zero_is_one_step_td() -> None:
    values, steps, mask = random_trace(4)
    rewards = outcome_token_rewards(torch.ones(5, dtype=torch.float64), steps, mask)
    adv, _ = step_gae(values, steps, rewards, mask, gamma=1.0, lam=0.0)
    # γ = 1, λ = 0: A_j = r_j − V_j + V*_{t(j)+1}, with V* from the loop reference's step means
    for i in range(5):
        ids = sorted({int(s) for s in steps[i][mask[i]]})
        v_star = [values[i][mask[i] & (steps[i] == s)].mean().item() for s in ids] + [0.0]
        for j in torch.nonzero(mask[i]).flatten().tolist():
            t = ids.index(int(steps[i, j]))
            expected = rewards[i, j] - values[i, j] + v_star[t + 1]
            assert adv[i, j].item() == pytest.approx(expected.item())


def test_step_gae_three_steps_by_hand() -> None:
    # One sample, 6 tokens; step ids 3, 3, 7, 9, 9 and one untrainable token (garbage value NaN).
    # V = [0.2, 0.4, 0.5, 0.6, 1.0]; outcome reward 1 on the last step (id 9): r = [0, 0, 0, 1, 1].
    # Steps: t1 (id 3) r*=0, V*=0.3 · t2 (id 7) r*=0, V*=0.5 · t3 (id 9) r*=1, V*=0.8.   γ = 0.9, λ = 0.5.
    # R*: R*3 = 1, R*2 = 0.9·1 = 0.9, R*1 = 0.9·0.9 = 0.81
    # δ*: δ*3 = 1 − 0.8 = 0.2, δ*2 = 0 − 0.5 + 0.9·0.8 = 0.22, δ*1 = 0 − 0.3 + 0.9·0.5 = 0.15
    # A*: A*3 = 0.2, A*2 = 0.22 + 0.45·0.2 = 0.31, A*1 = 0.15 + 0.45·0.31 = 0.2895
    # tokens of t1: R = 0.9·R*2 = 0.81;  A = −V + 0.9·V*2 + 0.45·A*2 = −V + 0.45 + 0.1395 → 0.3895, 0.1895
    # token of t2:  R = 0.9·R*3 = 0.9;   A = −0.5 + 0.9·0.8 + 0.45·0.2 = 0.31
    # tokens of t3: R = 1;               A = 1 − V → 0.4, 0.0
    values = torch.tensor([[0.2, 0.4, 0.5, 0.6, 1.0, NAN]])
    steps = torch.tensor([[3, 3, 7, 9, 9, -1]])
    mask = torch.tensor([[True] * 5 + [False]])
    rewards = outcome_token_rewards(torch.tensor([1.0]), steps, mask)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]
    adv, ret = step_gae(values, steps, rewards, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.81, 0.81, 0.9, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.3895, 0.1895, 0.31, 0.4, 0.0, 0.0]]))


def test_outcome_token_rewards_last_step_only() -> None:
    steps = torch.tensor([[0, 4, 4, 2, 9], [1, 1, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, True, False], [False, False, False, False, False]])
    # sample 0: the largest trainable step is 4 (step 9 is not trainable); sample 1 has no trainable token
    out = outcome_token_rewards(torch.tensor([2.0, 5.0]), steps, mask)
    assert out.tolist() == [[0.0, 2.0, 2.0, 0.0, 0.0], [0.0] * 5]


def test_value_metrics_of_a_step_split_over_ranks_are_the_whole_steps() -> None:
    """Two ranks holding 3 and 5 samples: the sums added up give exactly the metrics of all 8 samples, by hand from
    their definitions; the token-weighted mean of each rank's explained variance (what was logged) does not."""
    gen = torch.Generator().manual_seed(0)
    values, returns = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen) + 3 * torch.arange(8)[:, None]
    adv, base = returns - values, torch.randn(8, generator=gen)
    mask = torch.rand(8, 6, generator=gen) > 0.3
    parts = [value_sums(values[i], returns[i], adv[i], base[i], mask[i]) for i in (slice(0, 3), slice(3, 8))]
    added = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    got = value_metrics_from_sums(added)
    r, v, a = returns[mask].double(), values[mask].double(), adv[mask].double()
    b = base.double()[:, None].expand(8, 6)[mask]
    want_ev = 1 - (r - v).var(unbiased=False) / r.var(unbiased=False)
    assert got["value/explained_var"] == pytest.approx(float(want_ev), rel=1e-9)
    assert got["value/mean"] == pytest.approx(float(v.mean()), rel=1e-9)
    assert got["value/advantage_var"] == pytest.approx(float(a.var(unbiased=False)), rel=1e-9)
    assert got["value/advantage_var_ratio"] == pytest.approx(float(a.var(unbiased=False) / b.var(unbiased=False)))
    assert got == pytest.approx(value_metrics_from_sums(value_sums(values, returns, adv, base, mask)), rel=1e-9)
    counts = [p["count"] for p in parts]
    per_rank = [value_metrics_from_sums(p)["value/explained_var"] for p in parts]
    averaged = sum(c * e for c, e in zip(counts, per_rank, strict=True)) / sum(counts)
    assert abs(averaged - got["value/explained_var"]) > 0.05  # the old per-rank average: another number
    assert value_metrics_from_sums({**added, "count": 0.0}) == {}
