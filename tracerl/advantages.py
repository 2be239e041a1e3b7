"""Group-relative advantages, group filters and the value model's step-level GAE (DESIGN §8).

dims: N samples · G samples per prompt · L response length · S distinct (merged) denoising steps of a sample
(R rows · T row length belong to the callers that broadcast these per-sample advantages to training rows)
- rewards [N] float, NaN = the reward failed or was None: excluded from statistics, advantage 0
- group   [N] long, prompt index; any ids, not necessarily 0..P-1 or contiguous
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tracerl.registry import Registry

AdvantageFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GroupFilterFn = Callable[..., torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage")
GROUP_FILTERS: Registry[GroupFilterFn] = Registry("group filter")

# A group whose reward spread is below this is treated as constant: a float reward such as 0.1 + 0.2 vs 0.3
# differs by one ulp, and z-scoring that would turn rounding noise into ±1 advantages.
ZERO_STD = 1e-6


register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.lookup
register_group_filter = GROUP_FILTERS.register
get_group_filter = GROUP_FILTERS.lookup


def _group_stats(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample view of its group's statistics over non-NaN rewards, in float64.

    Returns (valid [N] bool, r [N] with NaN → 0, count [N], total [N], mean [N], std [N] population).
    """
    _, gid = torch.unique(group, return_inverse=True)
    num_groups = int(gid.max()) + 1 if gid.numel() else 0
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards.double(), 0.0)

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, gid, x)[gid]

    count = per_group(valid.double())
    total = per_group(r)
    mean = total / count.clamp(min=1)
    var = per_group(torch.where(valid, (r - mean) ** 2, 0.0)) / count.clamp(min=1)
    return valid, r, count, total, mean, var.sqrt()


def _out(adv: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


@register_advantage("group_zscore")
def group_zscore(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i − mean_g) / std_g with the population std over the group's
    non-NaN rewards; a constant group (std < ZERO_STD) gets 0, as TraceRL does, instead of an eps blow-up.
    """
    valid, r, _, _, mean, std = _group_stats(rewards, group)
    keep = valid & (std >= ZERO_STD)
    return _out(torch.where(keep, (r - mean) / std.clamp(min=ZERO_STD), 0.0), rewards)


@register_advantage("group_mean")
def group_mean(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i − mean_g, no division by the std."""
    valid, r, _, _, mean, _ = _group_stats(rewards, group)
    return _out(torch.where(valid, r - mean, 0.0), rewards)


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i − mean of the other non-NaN rewards of the group,
    i.e. r_i − (Σ_g − r_i)/(n_g − 1); a group with one valid reward gets 0.
    """
    valid, r, count, total, _, _ = _group_stats(rewards, group)
    keep = valid & (count > 1)
    return _out(torch.where(keep, r - (total - r) / (count - 1).clamp(min=1), 0.0), rewards)


@register_group_filter("keep_all")
def keep_all(scores: torch.Tensor, group: torch.Tensor, **_: float) -> torch.Tensor:
    """Keep every group: keep [N] all True."""
    return torch.ones_like(group, dtype=torch.bool)


@register_group_filter("keep_acc_range")
def keep_acc_range(
    scores: torch.Tensor, group: torch.Tensor, low: float = 0.2, high: float = 0.8, **_: float
) -> torch.Tensor:
    """Keep groups whose mean non-NaN score lies in [low, high] (TraceRL drops accuracy < 0.2 or > 0.8:
    such groups carry almost no signal); a group without a valid score is dropped.
    """
    _, _, count, _, mean, _ = _group_stats(scores, group)
    return (count > 0) & (mean >= low) & (mean <= high)


@register_group_filter("drop_all_equal")
def drop_all_equal(scores: torch.Tensor, group: torch.Tensor, **_: float) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025): drop groups whose non-NaN scores are all equal
    (std < ZERO_STD), since their group-relative advantage is 0 everywhere.
    """
    _, _, count, _, _, std = _group_stats(scores, group)
    return (count > 1) & (std >= ZERO_STD)


def truncated_is_wrong(rewards: torch.Tensor, truncated: torch.Tensor, wrong_value: float = 0.0) -> torch.Tensor:
    """Rewards with every truncated response (no EOS within the budget) set to ``wrong_value``
    (TraceRL scores truncated answers as incorrect). rewards [N], truncated [N] bool → [N].
    """
    return torch.where(truncated, torch.full_like(rewards, wrong_value), rewards)


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return 0.0, 0.0
    x = x.double()
    return x.mean().item(), x.std(unbiased=False).item()


def advantage_metrics(
    rewards: torch.Tensor, advantages: torch.Tensor, keep: torch.Tensor, group: torch.Tensor | None = None
) -> dict[str, float]:
    """Batch statistics: advantage mean/std (population) over kept samples, the kept fraction, the mean/std of the
    non-NaN rewards the advantages were computed from (``advantage/reward_*``: after ``truncated_is_wrong``; the
    rewards as scored are ``reward/*``), and with ``group`` the fraction of kept groups whose advantages are all 0
    (``advantage/flat_groups``: every sample scored the same, so the group teaches nothing). Empty sets give 0.0.
    """
    adv_mean, adv_std = _mean_std(advantages[keep])
    rew_mean, rew_std = _mean_std(rewards[~torch.isnan(rewards)])
    out = {
        "advantage/mean": adv_mean,
        "advantage/std": adv_std,
        "advantage/kept_fraction": keep.double().mean().item() if keep.numel() else 0.0,
        "advantage/reward_mean": rew_mean,
        "advantage/reward_std": rew_std,
    }
    if group is not None:
        out["advantage/flat_groups"] = flat_group_fraction(advantages, keep, group)
    return out


def flat_group_fraction(advantages: torch.Tensor, keep: torch.Tensor, group: torch.Tensor) -> float:
    """Fraction of the kept groups in which every kept sample has advantage 0 (0.0 when nothing is kept).

    Example:
        >>> flat_group_fraction(torch.tensor([0.0, 0.0, 1.0, -1.0]), torch.ones(4, dtype=torch.bool),
        ...                     torch.tensor([0, 0, 1, 1]))
        0.5
    """
    kept_groups = torch.unique(group[keep])
    if not kept_groups.numel():
        return 0.0
    moving = torch.unique(group[keep & (advantages != 0)])
    return 1.0 - moving.numel() / kept_groups.numel()


def step_ranks(token_steps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each token's step among its sample's sorted distinct steps over masked tokens.

    token_steps [N, L] long, mask [N, L] bool → (rank [N, L] long in 0..S_i−1, 0 where not masked;
    num_steps [N] long = S_i). Example: steps [3, 3, 7, 9] → rank [0, 0, 1, 2], S = 3.
    """
    big = torch.iinfo(torch.long).max
    ordered, order = torch.sort(token_steps.long().masked_fill(~mask, big), dim=1, stable=True)
    ordered_mask = mask.gather(1, order)
    is_new = torch.ones_like(ordered_mask)
    is_new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    is_new &= ordered_mask
    rank = torch.empty_like(order).scatter_(1, order, is_new.long().cumsum(1) - 1)
    return rank.clamp(min=0).masked_fill(~mask, 0), is_new.sum(1)


@torch.no_grad()
def step_gae(
    token_values: torch.Tensor,
    token_steps: torch.Tensor,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-level GAE of TraceRL's diffusion value model (Wang et al. 2026, §value), over each sample's
    sorted distinct steps t: r*_t, V*_t = step means of token rewards/values; R*_t = r*_t + γR*_{t+1};
    A*_t = r*_t − V*_t + γV*_{t+1} + γλA*_{t+1} (0 after the last step); per token j of step t:
    R_j = r_j + γR*_{t+1}, A_j = r_j − V_j + γV*_{t+1} + γλA*_{t+1}. All inputs [N, L] → (advantages, returns)
    [N, L], 0 where not masked. γ = λ = 1 with an outcome reward R gives A_j = R − V_j, R_j = R.
    """
    n = mask.shape[0]
    dtype = torch.promote_types(torch.promote_types(token_values.dtype, token_rewards.dtype), torch.float32)
    values = torch.where(mask, token_values.to(dtype), 0.0)
    rewards = torch.where(mask, token_rewards.to(dtype), 0.0)
    rank, num_steps = step_ranks(token_steps, mask)
    s = int(num_steps.max()) if n else 0

    # 1. Step means r*, V* as [N, S + 1]; the extra column (and every column past a sample's own last
    #    step) stays 0, which is exactly the terminal condition R*, V*, A* = 0.
    flat = (torch.arange(n, device=mask.device).unsqueeze(1) * (s + 1) + rank)[mask]
    count = torch.zeros(n * (s + 1), dtype=dtype, device=mask.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=dtype)
    )

    def step_mean(x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(count).index_add_(0, flat, x[mask])
        return (total / count.clamp(min=1)).view(n, s + 1)

    r_star, v_star = step_mean(rewards), step_mean(values)

    # 2. Backward recursion over the step axis (vectorised over samples).
    ret_star = torch.zeros_like(r_star)
    adv_star = torch.zeros_like(r_star)
    for t in reversed(range(s)):
        ret_star[:, t] = r_star[:, t] + gamma * ret_star[:, t + 1]
        delta = r_star[:, t] - v_star[:, t] + gamma * v_star[:, t + 1]
        adv_star[:, t] = delta + gamma * lam * adv_star[:, t + 1]

    # 3. Token level: a token's own reward and value, bootstrapped from the step after its own.
    nxt = (rank + 1).clamp(max=s)  # the clamp only touches unmasked tokens of an all-unmasked batch
    returns = rewards + gamma * ret_star.gather(1, nxt)
    advantages = rewards - values + gamma * v_star.gather(1, nxt) + gamma * lam * adv_star.gather(1, nxt)
    return advantages.masked_fill(~mask, 0.0), returns.masked_fill(~mask, 0.0)


def outcome_token_rewards(reward: torch.Tensor, token_steps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token rewards for outcome-reward GAE: each sample's ``reward`` [N] on the masked tokens of its last
    (largest) step, 0 elsewhere → [N, L]. TraceRL passes the group z-scored reward here.
    """
    smallest = torch.iinfo(torch.long).min
    last = token_steps.long().masked_fill(~mask, smallest).amax(dim=1, keepdim=True)
    on_last = mask & (token_steps == last)
    dtype = reward.dtype if reward.is_floating_point() else torch.float32
    return torch.where(on_last, reward.to(dtype).unsqueeze(1), torch.zeros((), dtype=dtype))


def group_scale(rewards: torch.Tensor, advantages: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """How much an advantage function stretches each group's rewards: std_g(advantages) / std_g(rewards) → [N]
    (group_zscore: 1/std_g; group_mean: 1; rloo: n/(n − 1)); 0 for a constant group. With a value model the GAE
    advantage R − V is multiplied by this, so it keeps the scale of the group baseline it replaces.

    Example:
        >>> r, g = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1])
        >>> group_scale(r, group_zscore(r, g), g).tolist()
        [2.0, 2.0, 0.0, 0.0]
    """
    *_, reward_std = _group_stats(rewards, group)
    *_, adv_std = _group_stats(torch.where(torch.isnan(rewards), torch.nan, advantages.double()), group)
    scale = torch.where(reward_std >= ZERO_STD, adv_std / reward_std.clamp(min=ZERO_STD), 0.0)
    return scale.to(advantages.dtype if advantages.is_floating_point() else torch.float32)


def value_outcome(
    rewards: torch.Tensor, group: torch.Tensor, target: str, advantage: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What step-level GAE gets for the value model ``target`` → (outcome [N] placed on the last step, the group
    baseline's advantages [N] the value replaces, the scale [N] of the GAE advantages).

    ``rewards`` [N] are raw rewards for ``centered`` (outcome r − mean_g) and ``reward`` (outcome r), scaled per group
    as ``advantage`` scales r − mean_g (``group_scale``), so a value of 0 under ``centered`` gives back the group
    advantage exactly; for ``advantage`` they are the group advantages already (TraceRL), outcome and baseline alike.

    Example:
        >>> r, g = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1])
        >>> [x.tolist() for x in value_outcome(r, g, "centered", "group_zscore")]
        [[0.5, -0.5, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]]
    """
    if target == "advantage":
        return rewards, rewards, torch.ones_like(rewards)
    if target not in ("centered", "reward"):
        raise ValueError(f"unknown value target '{target}'; choose from ['advantage', 'centered', 'reward']")
    baseline = get_advantage(advantage)(rewards, group)
    outcome = group_mean(rewards, group) if target == "centered" else rewards
    return outcome, baseline, group_scale(rewards, baseline, group)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over the masked tokens (PPO's value diagnostic): 1 = perfect, 0 = no better than
    predicting the mean return, negative = worse; 0.0 when the returns are constant.

    Example:
        >>> explained_variance(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0]), torch.tensor([True, True]))
        0.75
    """
    ret, val = returns[mask].double(), values[mask].double()
    var = ret.var(unbiased=False) if ret.numel() else ret.new_zeros(())
    if not var > ZERO_STD**2:
        return 0.0
    return float(1 - (ret - val).var(unbiased=False) / var)


def value_sums(
    values: torch.Tensor,
    returns: torch.Tensor,
    advantages: torch.Tensor,
    baseline_advantages: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, float]:
    """The sums behind ``value_metrics_from_sums`` over one rank's trainable tokens ``mask`` [N, L]: count, and the
    sum and sum of squares of the returns, the values, the return errors R − V, the GAE ``advantages`` [N, L] and the
    group baseline's ``baseline_advantages`` [N] on the same tokens. Sums add up over ranks, so the metrics of a step
    split over ranks are those of the whole step (explained variance and variance ratios cannot be averaged)."""
    base = baseline_advantages.double().unsqueeze(1).expand_as(mask)
    parts = {"return": returns, "value": values, "error": returns.double() - values.double(), "adv": advantages,
             "base": base}  # fmt: skip
    sums = {"count": float(mask.sum())}
    for name, x in parts.items():
        x = x.double()[mask]
        sums[f"{name}_sum"], sums[f"{name}_sq"] = float(x.sum()), float((x * x).sum())
    return sums


def value_metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """What a user needs to trust a value model, from ``value_sums`` (added up over ranks); {} without a token: the
    explained variance of the (pre-update) values against the GAE returns, their means, and the variance of the GAE
    advantages against that of the group baseline's on the same tokens (TraceRL reports 45.5% less training
    variance with its value model: a ratio of 0.545).

    Example:
        >>> sums = value_sums(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]]),
        ...                   torch.tensor([1.0]), torch.tensor([[True, True]]))
        >>> m = value_metrics_from_sums(sums)
        >>> round(m["value/explained_var"], 6), m["value/advantage_var"], m["value/advantage_var_ratio"]
        (0.75, 0.25, 0.0)
    """
    n = sums["count"]
    if not n:
        return {}

    def mean(name: str) -> float:
        return sums[f"{name}_sum"] / n

    def var(name: str) -> float:
        return max(0.0, sums[f"{name}_sq"] / n - mean(name) ** 2)

    ret_var, adv_var, base_var = var("return"), var("adv"), var("base")
    return {
        "value/explained_var": 1 - var("error") / ret_var if ret_var > ZERO_STD**2 else 0.0,
        "value/mean": mean("value"),
        "value/return_mean": mean("return"),
        "value/advantage_var": adv_var,
        "value/baseline_advantage_var": base_var,
        "value/advantage_var_ratio": adv_var / base_var if base_var > ZERO_STD**2 else 0.0,
    }


def compute_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    truncated: torch.Tensor | None = None,
    *,
    advantage: str = "group_zscore",
    group_filter: str = "keep_all",
    low: float = 0.2,
    high: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One RL step's advantage stage: (advantages [N], keep [N] bool, ``advantage/*`` metrics).

    ``truncated`` [N] (given when truncated responses count as wrong) sets those rewards to 0 first; samples whose
    reward is NaN are never kept. The filter reads the rewards as scores (accuracy for 0/1 rewards).

    Example:
        >>> adv, keep, _ = compute_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]),
        ...                                   group_filter="drop_all_equal")
        >>> adv.tolist(), keep.tolist()
        ([1.0, -1.0, 0.0, 0.0], [True, True, False, False])
    """
    if truncated is not None:
        rewards = truncated_is_wrong(rewards, truncated)
    adv = get_advantage(advantage)(rewards, group)
    keep = get_group_filter(group_filter)(rewards, group, low=low, high=high) & ~torch.isnan(rewards)
    return adv, keep, advantage_metrics(rewards, adv, keep, group)
