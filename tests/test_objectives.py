"""Policy/value losses, KL estimators, aggregations and chunked log-probs (DESIGN §8, §10), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tracerl.objectives import (
    AGGREGATIONS,
    aggregate,
    entropy_from_logits,
    kl_estimate,
    kl_to_old,
    kl_to_old_bound,
    policy_loss,
    target_logprobs,
    value_loss,
)

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand() -> None:
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # Δ = ln 0.5 − ln 0.25 = ln 2 ≈ 0.693147
    d = math.log(2)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(d)  # 0.693147
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)  # 0.240227
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + d)  # e^{−ln 2} − 1 + ln 2 = 0.193147
    # k3 clamps the exponent only: Δ = −20 → e^{10} − 1 − 20
    k3 = kl_estimate(torch.tensor([-20.0]), torch.tensor([0.0]), "k3").item()
    assert k3 == pytest.approx(math.exp(10) - 21)
    # all vanish at Δ = 0
    zero = torch.zeros(3)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(zero, zero, kind), zero)


def test_kl_to_old_estimates_from_the_old_policys_tokens() -> None:
    # Two tokens over {a, b}: π_old = (0.9, 0.1), π_new = (0.5, 0.5). KL(old‖new) = 0.9 ln 1.8 + 0.1 ln 0.2
    # = 0.368064. The rollout's tokens come from π_old, so the per-token estimate weighted by π_old is exact;
    # GRPO's orientation gives χ²(old‖new) − KL(old‖new) = (0.81/0.5 + 0.01/0.5 − 1) − 0.368064 = 0.271936.
    old, new = torch.log(torch.tensor([0.9, 0.1])), torch.log(torch.tensor([0.5, 0.5]))
    p_old = old.exp()
    truth = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    assert (p_old * kl_to_old(new, old)).sum().item() == pytest.approx(truth, rel=1e-6)
    assert (p_old * kl_estimate(new, old, "k3")).sum().item() == pytest.approx(1.64 - 1 - truth, rel=1e-6)


def test_one_token_falling_far_is_a_small_kl_but_a_strong_penalty() -> None:
    # 2,000 tokens, one of which fell 5 nats. KL(old‖new) from the old policy's tokens: k3 = e^{−5} − 1 + 5 on that
    # token, 0 elsewhere → 4.0067/2000 = 0.002 (GRPO's form would log e^5 − 1 − 5 = 142.4 → 0.071, and e^10 for a
    # 10-nat fall). The penalty keeps TraceRL's form: its gradient on that token is (1 − e^5)/2000 = −0.0737.
    old = torch.zeros(1, 2000)
    logp = old.clone()
    logp[0, 0] = -5.0
    logp.requires_grad_(True)
    mask = torch.ones(1, 2000, dtype=torch.bool)
    loss, m = policy_loss(
        logp, old, torch.zeros(1), mask, row_sample=torch.tensor([0]), aggregation="token_mean", kl_to_old_coef=1.0
    )
    assert m["train/kl_to_old_k3"] == pytest.approx((math.exp(-5) + 4) / 2000, rel=1e-6)
    # the bound: p = 1 (kept at 1 − 1e-9), q = e^{−5} → p · 5 + (1 − p)(ln 1e-9 − ln(1 − e^{−5})) ≈ 5 per token
    assert m["train/kl_to_old"] == pytest.approx(5.0 / 2000, rel=1e-5)
    assert m["train/log_ratio_abs_max"] == pytest.approx(5.0)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx((1 - math.exp(5)) / 2000, rel=1e-5)


def test_kl_to_old_bound_is_the_exact_kl_on_two_tokens_and_below_it_on_more() -> None:
    # Two tokens: merging "this token" with "any other" loses nothing, so the bound is the exact KL on each token.
    old, new = torch.log(torch.tensor([0.9, 0.1])), torch.log(torch.tensor([0.5, 0.5]))
    truth = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    torch.testing.assert_close(kl_to_old_bound(new, old), torch.full((2,), truth))
    # Random distributions over 7 tokens: every token's bound lies in [0, KL(old‖new)], and the largest comes
    # within 10% of it for distributions that differ in one token's mass mostly.
    g = torch.Generator().manual_seed(0)
    old = torch.log_softmax(torch.randn(64, 7, generator=g) * 2, dim=-1)
    new = torch.log_softmax(old + torch.randn(64, 7, generator=g), dim=-1)
    exact = (old.exp() * (old - new)).sum(-1, keepdim=True)
    bound = kl_to_old_bound(new, old)
    assert (bound >= 0).all() and (bound <= exact + 1e-6).all()
    assert (bound.max(-1).values / exact.squeeze(-1)).mean() > 0.3  # not trivially 0
    one = old.clone()
    one[:, 0] = torch.log(old[:, 0].exp() * 0.2)  # token 0 loses 80% of its mass to the others, uniformly
    one[:, 1:] = torch.log(old[:, 1:].exp() + old[:, :1].exp() * 0.8 / 6)
    exact_one = (old.exp() * (old - one)).sum(-1)
    assert torch.all(kl_to_old_bound(one[:, 0], old[:, 0]) >= 0.5 * exact_one)


def test_one_rare_token_rising_is_not_read_as_a_policy_jump() -> None:
    # Off the sampler's states (coupled, random masking, d1, merged trace steps) a rollout token can have an old
    # probability of e^{−10}. One such token of 600 rising to 0.99 is a 4.6-nat move of one position: k3 reads
    # e^{10}·0.99 − 1 − 9.99 ≈ 21,800 for it, a mean of 36 "nats"; the bound reads −ln(0.01) ≈ 4.6, a mean of 0.008.
    # A policy that moved everywhere (every token 0.9 → 0.3) reads large under both.
    old = torch.full((1, 600), math.log(0.9))
    old[0, 0] = -10.0
    logp = old.clone()
    logp[0, 0] = math.log(0.99)
    mask = torch.ones(1, 600, dtype=torch.bool)
    _, m = policy_loss(logp, old, torch.zeros(1), mask, row_sample=torch.tensor([0]), aggregation="token_mean")
    assert m["train/kl_to_old_k3"] > 30
    assert m["train/kl_to_old"] == pytest.approx(-math.log(0.01) / 600, rel=0.01)
    assert m["train/log_ratio_abs_max"] == pytest.approx(10 + math.log(0.99), rel=1e-5)
    moved = torch.full((1, 600), math.log(0.3))
    _, m = policy_loss(moved, torch.full((1, 600), math.log(0.9)), torch.zeros(1), mask,
                       row_sample=torch.tensor([0]), aggregation="token_mean")  # fmt: skip
    assert m["train/kl_to_old"] == pytest.approx(0.9 * math.log(3) + 0.1 * math.log(0.1 / 0.7), rel=1e-5)
    assert m["train/kl_to_old"] > 0.5


def test_kl_lookup_error_lists_kinds() -> None:
    with pytest.raises(KeyError, match=r"unknown kl estimator 'k4'; choose from \['k1', 'k2', 'k3'\]"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


# ---------------------------------------------------------------- aggregations

# 4 rows of length 4; rows 0, 1 belong to sample 10, rows 2, 3 to sample 20; row 3 has no target.
#   row 0: targets 1, 2, 3    row 1: target 4    row 2: targets 5, 7    row 3: —
# Unmasked positions hold NaN / inf, which must never matter.
AGG_VALUES = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, INF, NAN, -INF], [5.0, NAN, 7.0, NAN], [NAN, INF, NAN, NAN]])
AGG_MASK = torch.tensor(
    [[True, True, True, False], [True, False, False, False], [True, False, True, False], [False] * 4]
)
AGG_ROW_SAMPLE = torch.tensor([10, 10, 20, 20])
AGG_EXPECTED = {
    # row sums 6, 4, 12, divided by norm_len 4 → 1.5, 1, 3; mean over the 3 rows with targets = 5.5/3
    "token_sum_over_max_len": 5.5 / 3,
    # row means 2, 4, 6 → mean 4
    "row_mean": 4.0,
    # row sums 6, 4, 12 → mean over the 3 rows with targets 22/3 (the anchor's full-attention KL)
    "row_sum": 22 / 3,
    # (1 + 2 + 3 + 4 + 5 + 7) / 6 = 22/6
    "token_mean": 22 / 6,
    # sample 10: (1 + 2 + 3 + 4)/4 = 2.5; sample 20: (5 + 7)/2 = 6 → mean 4.25
    "seq_mean_token_mean": 4.25,
}


@pytest.mark.parametrize("name", sorted(AGG_EXPECTED))
def test_aggregations_by_hand(name: str) -> None:
    values = AGG_VALUES.clone().requires_grad_(True)
    out = aggregate(values, AGG_MASK, AGG_ROW_SAMPLE, name, norm_len=4)
    assert out.item() == pytest.approx(AGG_EXPECTED[name])
    out.backward()
    assert torch.isfinite(values.grad).all()
    assert (values.grad[~AGG_MASK] == 0).all()


def test_every_aggregation_has_a_hand_example() -> None:
    assert sorted(AGGREGATIONS) == sorted(AGG_EXPECTED)


def loop_aggregate(values, mask, row_sample, name: str, norm_len: int) -> float:  # noqa: ANN001
    """Plain reference over lists of target values."""
    rows = [[float(v) for v, m in zip(vr, mr, strict=True) if m] for vr, mr in zip(values, mask, strict=True)]
    rows_s = [(r, int(s)) for r, s in zip(rows, row_sample, strict=True) if r]
    if name == "token_sum_over_max_len":
        return sum(sum(r) / norm_len for r, _ in rows_s) / len(rows_s)
    if name == "row_mean":
        return sum(sum(r) / len(r) for r, _ in rows_s) / len(rows_s)
    if name == "row_sum":
        return sum(sum(r) for r, _ in rows_s) / len(rows_s)
    if name == "token_mean":
        return sum(sum(r) for r, _ in rows_s) / sum(len(r) for r, _ in rows_s)
    per_sample: dict[int, list[float]] = {}
    for r, s in rows_s:
        per_sample.setdefault(s, []).extend(r)
    return sum(sum(v) / len(v) for v in per_sample.values()) / len(per_sample)


@pytest.mark.parametrize("name", sorted(AGG_EXPECTED))
def test_aggregations_match_plain_loop(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(9, 7, generator=gen) < 0.5
    mask[4] = False
    row_sample = torch.randint(0, 4, (9,), generator=gen)
    out = aggregate(values, mask, row_sample, name, norm_len=11)
    assert out.item() == pytest.approx(loop_aggregate(values, mask, row_sample, name, 11))


def test_aggregation_errors() -> None:
    with pytest.raises(KeyError, match=r"unknown aggregation 'sum'; choose from \[.*'row_mean'.*\]"):
        aggregate(AGG_VALUES, AGG_MASK, AGG_ROW_SAMPLE, "sum")
    with pytest.raises(ValueError, match="needs norm_len"):
        aggregate(AGG_VALUES, AGG_MASK, AGG_ROW_SAMPLE, "token_sum_over_max_len", norm_len=None)


def test_aggregation_without_targets_is_zero() -> None:
    values = torch.full((2, 3), NAN, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for name in AGG_EXPECTED:
        assert aggregate(values, mask, torch.tensor([0, 1]), name, norm_len=3).item() == 0.0


# ---------------------------------------------------------------- policy loss

# One row, five target tokens (ε = 0.2, so ρ is clipped to [0.8, 1.2]):
#   token  ρ    A    ρA     clip(ρ)A   min    clipped branch active?
#   a      1.5  +1   1.5    1.2        1.2    yes (ρ above 1 + ε, A > 0)
#   b      1.1  +1   1.1    1.1        1.1    no  (inside the range)
#   c      0.5  −1  −0.5   −0.8       −0.8    yes (ρ below 1 − ε, A < 0)
#   d      0.5  +1   0.5    0.8        0.5    no  (the pessimistic branch is the unclipped one)
#   e      1.5  −1  −1.5   −1.2       −1.5    no
# token_mean of the surrogate = (1.2 + 1.1 − 0.8 + 0.5 − 1.5)/5 = 0.5/5 = 0.1 → loss −0.1; clipfrac 2/5.
# d loss/d logp_j = −(1/5)·ρ_j·A_j where unclipped, 0 where clipped: [0, −0.22, 0, −0.1, +0.3].
RATIOS = [1.5, 1.1, 0.5, 0.5, 1.5]
ADV = [1.0, 1.0, -1.0, 1.0, -1.0]


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    old = torch.log(torch.tensor([[0.2, 0.3, 0.4, 0.1, 0.25]]))
    logp = (old + torch.log(torch.tensor([RATIOS]))).requires_grad_(True)
    return logp, old, torch.tensor([ADV]), torch.ones(1, 5, dtype=torch.bool)


def test_policy_loss_clip_by_hand() -> None:
    logp, old, adv, mask = hand_case()
    loss, m = policy_loss(logp, old, adv, mask, row_sample=torch.tensor([0]), aggregation="token_mean")
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.22, 0.0, -0.1, 0.3]]))
    assert m["train/clipfrac"] == pytest.approx(0.4)
    assert m["train/ratio_mean"] == pytest.approx(5.1 / 5)  # (1.5 + 1.1 + 0.5 + 0.5 + 1.5)/5 = 1.02
    assert m["train/ratio_max"] == pytest.approx(1.5)
    assert m["train/policy_loss"] == pytest.approx(-0.1, abs=1e-6)
    # KL(old‖new) from the old policy's tokens, k3 per token = ρ − 1 − ln ρ: ρ = 1.5 → 0.094535, 1.1 → 0.004690,
    # 0.5 → 0.193147
    k3 = [r - 1 - math.log(r) for r in RATIOS]
    assert m["train/kl_to_old_k3"] == pytest.approx(sum(k3) / 5, rel=1e-5)
    # the two-outcome bound per token: p ln(p/q) + (1 − p) ln((1 − p)/(1 − q)) with q = ρ·p
    probs = [0.2, 0.3, 0.4, 0.1, 0.25]
    bern = [p * math.log(1 / r) + (1 - p) * math.log((1 - p) / (1 - r * p)) for p, r in zip(probs, RATIOS, strict=True)]
    assert m["train/kl_to_old"] == pytest.approx(sum(bern) / 5, rel=1e-5)
    assert m["train/log_ratio_abs_max"] == pytest.approx(math.log(2))  # ρ = 0.5
    assert "train/kl_to_ref" not in m and "train/entropy" not in m


def test_policy_loss_clip_higher() -> None:
    # DAPO clip-higher ε_high = 0.6: token a (ρ = 1.5 < 1.6) is no longer clipped → its min is 1.5;
    # surrogate mean = (1.5 + 1.1 − 0.8 + 0.5 − 1.5)/5 = 0.16, clipfrac 1/5 (only c).
    logp, old, adv, mask = hand_case()
    loss, m = policy_loss(logp, old, adv, mask, row_sample=torch.tensor([0]), eps_high=0.6, aggregation="token_mean")
    assert loss.item() == pytest.approx(-0.16, abs=1e-6)
    assert m["train/clipfrac"] == pytest.approx(0.2)


def test_policy_loss_with_kl_terms_by_hand() -> None:
    logp, old, adv, mask = hand_case()
    ref = old + 0.5  # Δ_ref = log ρ − 0.5
    loss, m = policy_loss(
        logp, old, adv, mask, row_sample=torch.tensor([0]), aggregation="token_mean",
        kl_to_old_coef=0.1, kl_to_old_kind="k3", ref_logp=ref, kl_to_ref_coef=0.05, kl_to_ref_kind="k2",
        entropy=torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]),
    )  # fmt: skip
    k3_old = sum(1 / r - 1 + math.log(r) for r in RATIOS) / 5  # the penalty: TraceRL's (GRPO's) orientation
    k2_ref = sum(0.5 * (math.log(r) - 0.5) ** 2 for r in RATIOS) / 5
    k3_ref = sum(math.exp(-(math.log(r) - 0.5)) - 1 + math.log(r) - 0.5 for r in RATIOS) / 5
    assert loss.item() == pytest.approx(-0.1 + 0.1 * k3_old + 0.05 * k2_ref, rel=1e-5)
    assert m["train/kl_to_ref"] == pytest.approx(k3_ref, rel=1e-5)  # logged as k3 whatever the loss uses
    assert m["train/entropy"] == pytest.approx(3.0)


def test_policy_loss_row_advantages_broadcast() -> None:
    # Two rows of one sample with per-row advantages [2, −1] equal the per-token form; token_sum_over_max_len
    # with norm_len 8: row 0 Σ = 2·(1 + 1) = 4 (ratios 1), row 1 Σ = −1·1 = −1 → (4/8 − 1/8)/2 = 0.1875.
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, False]])
    row_adv = torch.tensor([2.0, -1.0])
    loss_row, _ = policy_loss(logp, logp.detach(), row_adv, mask, row_sample=torch.tensor([0, 0]), norm_len=8)
    token_adv = row_adv.unsqueeze(1).expand(2, 3)
    loss_tok, _ = policy_loss(logp, logp.detach(), token_adv, mask, row_sample=torch.tensor([0, 0]), norm_len=8)
    assert loss_row.item() == pytest.approx(-0.1875)
    assert loss_tok.item() == pytest.approx(-0.1875)
    with pytest.raises(ValueError, match="needs norm_len"):
        policy_loss(logp, logp.detach(), row_adv, mask, row_sample=torch.tensor([0, 0]))


@pytest.mark.parametrize("name", sorted(AGG_EXPECTED))
def test_masked_garbage_does_not_leak(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 6, generator=gen) < 0.6
    clean = -torch.rand(4, 6, generator=gen) * 3
    old = clean + 0.3 * torch.randn(4, 6, generator=gen)
    ref = clean + 0.3 * torch.randn(4, 6, generator=gen)
    adv = torch.randn(4, 6, generator=gen)
    ent = torch.rand(4, 6, generator=gen)
    garbage = torch.tensor([NAN, INF, -INF]).repeat(8)[:24].view(4, 6)

    def run(fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        def dirty(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x, fill)

        logp = dirty(clean).requires_grad_(True)
        loss, m = policy_loss(
            logp, dirty(old), dirty(adv), mask, row_sample=torch.tensor([0, 0, 1, 1]), aggregation=name,
            norm_len=6, kl_to_old_coef=0.01, ref_logp=dirty(ref), kl_to_ref_coef=0.02, entropy=dirty(ent),
        )  # fmt: skip
        loss.backward()
        return loss, logp.grad, m

    loss_ref, grad_ref, m_ref = run(torch.zeros(4, 6))
    loss, grad, m = run(garbage)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(loss_ref.item())
    torch.testing.assert_close(grad, grad_ref)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    assert m == pytest.approx(m_ref)


# ---------------------------------------------------------------- value loss


def test_value_loss_by_hand() -> None:
    # ε = 0.2
    #   V     V_old  R     (V−R)²   clipped V = V_old + clip(V−V_old)   (clipped V − R)²   ½·max
    #   1.0   0.5    2.0   1.0      0.5 + 0.2 = 0.7                      1.69               0.845  (clip active)
    #   0.0   0.5    1.0   1.0      0.5 − 0.2 = 0.3                      0.49               0.5
    #   0.5   0.5    0.5   0.0      0.5                                  0.0                0.0
    # token_mean = 1.345/3 = 0.448333; clipfrac 1/3; value mean 0.5
    # d/dV: token 0 uses the clipped branch → 0; token 1: (V − R)/3 = −1/3; token 2: 0
    values = torch.tensor([[1.0, 0.0, 0.5, NAN]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, INF]])
    returns = torch.tensor([[2.0, 1.0, 0.5, NAN]])
    mask = torch.tensor([[True, True, True, False]])
    loss, m = value_loss(values, old, returns, mask, row_sample=torch.tensor([0]), aggregation="token_mean")
    assert loss.item() == pytest.approx(1.345 / 3)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1 / 3, 0.0, 0.0]]))
    assert m == pytest.approx({"train/value_loss": 1.345 / 3, "train/value_clipfrac": 1 / 3, "train/value_mean": 0.5})


# ---------------------------------------------------------------- entropy and chunked target log-probs


def test_entropy_from_logits() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -INF, -INF, 0.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    ent = entropy_from_logits(logits.to(torch.bfloat16))
    assert ent.dtype == torch.float32
    # uniform over 4 → ln 4; uniform over the 2 finite logits → ln 2
    assert ent[0].item() == pytest.approx(math.log(4))
    assert ent[1].item() == pytest.approx(math.log(2))
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0, 4.0]), -1)
    assert ent[2].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_target_logprobs_chunked_equals_full(chunk_size: int) -> None:
    torch.manual_seed(0)
    m, h, v = 7, 5, 11
    head = torch.nn.Linear(h, v)
    hidden = torch.randn(m, h, requires_grad=True)
    targets = torch.randint(0, v, (m,))
    weights = torch.randn(m)  # a non-uniform upstream gradient

    full_logp = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    full_ent = entropy_from_logits(head(hidden))
    (full_logp * weights).sum().backward()
    ref_grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None

    logp, ent = target_logprobs(head, hidden, targets, chunk_size=chunk_size, with_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == (m,)
    torch.testing.assert_close(logp, full_logp)
    torch.testing.assert_close(ent, full_ent)
    (logp * weights).sum().backward()
    for got, want in zip([hidden.grad, head.weight.grad, head.bias.grad], ref_grads, strict=True):
        torch.testing.assert_close(got, want)

    with torch.no_grad():
        torch.testing.assert_close(target_logprobs(head, hidden, targets, chunk_size=chunk_size), full_logp)


def test_policy_loss_rejects_unknown_kl_kind_even_when_unused() -> None:
    logp, old, adv, mask = hand_case()
    with pytest.raises(KeyError, match=r"unknown kl estimator 'kl'; choose from \['k1', 'k2', 'k3'\]"):
        policy_loss(logp, old, adv, mask, row_sample=torch.tensor([0]), norm_len=5, kl_to_ref_kind="kl")
