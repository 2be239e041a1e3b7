"""Policy and value losses, KL estimators, loss aggregations and chunked target log-probs (DESIGN §8, §10).

dims: R rows (training views) · T row length · M target tokens · V vocab · H hidden size
- [R, T] tensors are read only where ``mask`` (the row's targets) is True; anything else, NaN and inf
  included, never reaches a loss, a metric or a gradient
- row_sample [R] long: the rollout sample each row belongs to (any ids)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from tracerl.registry import Registry

KLFn = Callable[[torch.Tensor], torch.Tensor]
WeightFn = Callable[[torch.Tensor, torch.Tensor, "int | None", "Totals"], torch.Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("kl estimator")
AGGREGATIONS: Registry[WeightFn] = Registry("aggregation")

# exp() of a log-ratio is taken on this clamped range (TraceRL's choice), so one wild token cannot overflow.
LOG_RATIO_CLAMP = 10.0


register_kl_estimator = KL_ESTIMATORS.register
register_aggregation = AGGREGATIONS.register


@register_kl_estimator("k1")
def _k1(delta: torch.Tensor) -> torch.Tensor:
    return delta


@register_kl_estimator("k2")
def _k2(delta: torch.Tensor) -> torch.Tensor:
    return 0.5 * delta**2


@register_kl_estimator("k3")
def _k3(delta: torch.Tensor) -> torch.Tensor:
    return torch.exp(-delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - 1 + delta


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(π‖ref) from tokens **sampled from π** (Schulman 2020, "Approximating KL
    divergence"), Δ = logp − ref_logp: k1 = Δ; k2 = ½Δ²; k3 = exp(−Δ) − 1 + Δ ≥ 0 (Δ clamped to [−10, 10]
    inside exp). Elementwise, any shape. The first argument must be the policy the tokens came from: see
    ``kl_to_old``.
    """
    return get_kl_estimator(kind)(logp - ref_logp)


def kl_to_old(logp: torch.Tensor, old_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_old‖π_θ) from the rollout's tokens, which π_old sampled: ``kl_estimate`` with
    the sampling policy first, i.e. with Δ = logp − old_logp, k3 = exp(Δ) − 1 − Δ. This is ``train/kl_to_old_k3``;
    it is unbiased only in states where π_old sampled the token, and heavy-tailed (e^Δ) where a token rises far,
    so ``train/kl_to_old`` is ``kl_to_old_bound``.

    GRPO's form exp(−Δ) − 1 + Δ (TraceRL's penalty, ``kl_estimate(logp, old_logp)``) assumes the tokens came from
    π_θ. On π_old's tokens its mean is χ²(π_old‖π_θ) − KL(π_old‖π_θ), not a KL: one token whose log-prob fell 10
    nats adds e¹⁰ ≈ 22,000 (9 here; its k1 is 10). As a penalty that is what TraceRL wants, a barrier that pushes
    back hard on a sampled token losing its probability; as a metric it reads one token as a policy jump.

    Example:
        >>> round(kl_to_old(torch.tensor([-10.0]), torch.tensor([0.0])).item(), 4)
        9.0
    """
    return kl_estimate(old_logp, logp, kind)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends (Mächler 2012: log(−expm1 x) near 0, log1p(−eˣ) below −ln 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_to_old_bound(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """Per-token lower bound on KL(π_old(·|s) ‖ π_θ(·|s)) at the state s the token was scored in: the KL between
    the two-outcome distributions (this token, any other), p = π_old(x|s) against q = π_θ(x|s),

        p · ln(p/q) + (1 − p) · ln((1 − p)/(1 − q)).

    Merging outcomes never increases a KL (the data-processing inequality), so this is ≤ the exact KL over the
    vocabulary at s, and it is the largest such bound that only the token's two log-probs can give. Unlike k3 it
    needs no sampling assumption: ``kl_to_old``'s k3 is unbiased only where x was sampled from π_old(·|s) itself,
    i.e. in trace views that replay the sampler's states, while coupled, random-masking and d1 views, and merged
    trace steps (``objective.shrink`` > 1), score tokens in states the sampler never saw, where a token can have an
    old probability of e⁻¹⁰. If it then rises to ~1, k3 adds e¹⁰ ≈ 22,000 for that one token; this bound adds
    −ln(1 − q): the ~10 nats the position really lost. This is ``train/kl_to_old``. Computed in float64, with
    both log-probs kept ≤ −1e-9 so that a probability that rounds to 1 stays finite (≤ 20.7 nats).

    Example:
        >>> old, new = torch.log(torch.tensor([0.9, 0.1])), torch.log(torch.tensor([0.5, 0.5]))
        >>> [round(v, 6) for v in kl_to_old_bound(new, old).tolist()]   # both tokens: KL(0.9, 0.1 ‖ 0.5, 0.5)
        [0.368064, 0.368064]
    """
    a = old_logp.double().clamp(max=-1e-9)
    b = logp.double().clamp(max=-1e-9)
    p = a.exp()
    return (p * (a - b) + (1 - p) * (log1mexp(a) - log1mexp(b))).clamp(min=0.0).to(logp.dtype)


get_kl_estimator = KL_ESTIMATORS.lookup


# ---------------------------------------------------------------- aggregations as per-target weights
#
# Every aggregation is linear in the per-target values: agg(v) = Σ_j w_j · v_j, with weights that depend only on
# which targets a minibatch holds. So a loss evaluated on part of a minibatch (a micro-batch, one rank's rows)
# with the whole minibatch's weights is exactly that part's share of the minibatch loss, and the shares add up.


@dataclass(frozen=True)
class Totals:
    """Counts over a whole minibatch, for weights of targets that are only a part of it (dims: M targets)."""

    rows: float  # rows with ≥ 1 target
    tokens: float  # target tokens
    samples: float  # samples with ≥ 1 target


def count_totals(rows: torch.Tensor, samples: torch.Tensor) -> Totals:
    """The Totals of a set of targets: ``rows`` [M] and ``samples`` [M] are each target's row and sample ids."""
    return Totals(float(rows.unique().numel()), float(rows.numel()), float(samples.unique().numel()))


def _counts(ids: torch.Tensor) -> torch.Tensor:
    """[M] how many targets share each target's id."""
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return counts[inverse].to(torch.float64)


def target_weights(
    rows: torch.Tensor,
    samples: torch.Tensor,
    name: str,
    norm_len: int | None = None,
    totals: Totals | None = None,
) -> torch.Tensor:
    """[M] float64 weights w with agg(v) = Σ_j w_j v_j for the named aggregation (see AGGREGATIONS).

    ``rows`` / ``samples`` [M]: the row and sample of each target; a row's and a sample's targets must all be
    here (their counts are taken here), while ``totals`` gives the minibatch-wide numbers of rows, tokens and
    samples (default: these targets' own).
    """
    fn = AGGREGATIONS.lookup(name)
    return fn(rows, samples, norm_len, totals if totals is not None else count_totals(rows, samples))


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    row_sample: torch.Tensor,
    name: str,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` [R, T] at the targets ``mask`` [R, T] to a scalar with the named rule
    (see AGGREGATIONS); rows and samples without targets do not count. No targets at all gives 0.
    """
    return (torch.where(mask, values, 0.0) * weight_grid(mask, row_sample, name, norm_len).to(values.dtype)).sum()


def weight_grid(
    mask: torch.Tensor, row_sample: torch.Tensor, name: str, norm_len: int | None = None, totals: Totals | None = None
) -> torch.Tensor:
    """``target_weights`` laid out like ``mask`` [R, T] (0 off the targets)."""
    rows, cols = mask.nonzero(as_tuple=True)
    w = target_weights(rows, row_sample[rows], name, norm_len, totals)
    return torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).index_put((rows, cols), w)


@register_aggregation("token_sum_over_max_len")
def _token_sum_over_max_len(rows: torch.Tensor, samples: torch.Tensor, norm_len: int | None, t: Totals) -> torch.Tensor:
    """TraceRL block layout: (1/R') Σ_rows (1/norm_len) Σ_{j∈T_r} v_j, R' = rows with ≥ 1 target,
    norm_len = the padded response length L of the RL step (a constant, Dr.-GRPO-like normaliser).
    """
    if norm_len is None or norm_len <= 0:
        raise ValueError(
            "aggregation 'token_sum_over_max_len' needs norm_len, the padded response length of the RL step"
        )
    return torch.full(rows.shape, 1.0 / (norm_len * max(t.rows, 1.0)), dtype=torch.float64, device=rows.device)


@register_aggregation("row_mean")
def _row_mean(rows: torch.Tensor, samples: torch.Tensor, norm_len: int | None, t: Totals) -> torch.Tensor:
    """TraceRL full attention: mean over each row's targets, then mean over rows with ≥ 1 target."""
    return 1.0 / (_counts(rows) * max(t.rows, 1.0))


@register_aggregation("row_sum")
def _row_sum(rows: torch.Tensor, samples: torch.Tensor, norm_len: int | None, t: Totals) -> torch.Tensor:
    """The anchor's KL reduction under full attention: sum over each row's targets, then mean over rows with ≥ 1
    target (dLLM-RL ``rl_llada.py``: β Σ_T k3 / B, while the surrogate is averaged per row)."""
    return torch.full(rows.shape, 1.0 / max(t.rows, 1.0), dtype=torch.float64, device=rows.device)


def resolve_kl_aggregation(aggregation: str, kl_aggregation: str) -> str:
    """``auto`` → ``row_sum`` when the surrogate uses ``row_mean`` (TraceRL full attention, as the anchor), else
    the surrogate's own aggregation.

    Example:
        >>> resolve_kl_aggregation("row_mean", "auto"), resolve_kl_aggregation("token_mean", "auto")
        ('row_sum', 'token_mean')
    """
    if kl_aggregation != "auto":
        return kl_aggregation
    return "row_sum" if aggregation == "row_mean" else aggregation


@register_aggregation("token_mean")
def _token_mean(rows: torch.Tensor, samples: torch.Tensor, norm_len: int | None, t: Totals) -> torch.Tensor:
    """DAPO (Yu et al. 2025): Σ over every target token of the batch / number of target tokens."""
    return torch.full(rows.shape, 1.0 / max(t.tokens, 1.0), dtype=torch.float64, device=rows.device)


@register_aggregation("seq_mean_token_mean")
def _seq_mean_token_mean(rows: torch.Tensor, samples: torch.Tensor, norm_len: int | None, t: Totals) -> torch.Tensor:
    """GRPO (Shao et al. 2024): mean over each sample's targets across all its rows, then mean over
    samples with ≥ 1 target.
    """
    return 1.0 / (_counts(samples) * max(t.samples, 1.0))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return x[mask].double().mean().item() if mask.any() else 0.0


def _clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() (not multiplication) so that NaN/inf outside the mask gives neither NaN values nor NaN grads.
    return torch.where(mask, x, 0.0)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    row_sample: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "token_sum_over_max_len",
    norm_len: int | None = None,
    kl_aggregation: str = "auto",
    kl_to_old_coef: float = 0.0,
    kl_to_old_kind: str = "k3",
    ref_logp: torch.Tensor | None = None,
    kl_to_ref_coef: float = 0.0,
    kl_to_ref_kind: str = "k3",
    entropy: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate on the target tokens of training rows (Schulman et al. 2017; TraceRL, Wang et al.
    2026): ρ = exp(clamp(logp − old_logp, ±10)), loss = −agg(min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A))
    + β_old·agg_kl(k(logp, old_logp)) + β_ref·agg_kl(k(logp, ref_logp)), where agg_kl is ``kl_aggregation``
    (``resolve_kl_aggregation``: the anchor sums KL over a row's targets under ``row_mean``). The penalties use
    GRPO's orientation; the logged ``train/kl_to_old`` is KL(π_old‖π_θ) from π_old's own tokens (``kl_to_old``).
    logp, old_logp,
    mask, ref_logp, entropy [R, T]; advantages [R] (per row) or [R, T] (per token). Only ``logp`` carries gradients;
    ``train/policy_loss`` is the returned total.

    ``weights`` / ``kl_weights`` [R, T]: the aggregations' per-target weights (``weight_grid``) when these
    targets are part of a larger minibatch; by default they are computed from ``mask`` and ``row_sample``.
    """
    for kind in (kl_to_old_kind, kl_to_ref_kind):
        get_kl_estimator(kind)  # a misspelt kind fails even while its coefficient is 0
    adv = advantages.detach()
    adv = _clean((adv.unsqueeze(1) if adv.ndim == 1 else adv).expand_as(logp), mask)
    logp = _clean(logp, mask)
    old_logp = _clean(old_logp.detach(), mask)
    kl_agg = resolve_kl_aggregation(aggregation, kl_aggregation)
    if weights is None:
        weights = weight_grid(mask, row_sample, aggregation, norm_len)
    if kl_weights is None:
        kl_weights = weights if kl_agg == aggregation else weight_grid(mask, row_sample, kl_agg, norm_len)

    def agg(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (_clean(values, mask) * _clean(w, mask).to(values.dtype)).sum()

    # 1. Clipped surrogate: the pessimistic (min) of the plain and the clipped importance-weighted advantage.
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    loss = -agg(torch.minimum(unclipped, clipped), weights)

    # 2. Optional KL penalties: to the policy that produced old_logp (TraceRL) and to a frozen reference.
    if kl_to_old_coef:  # TraceRL's penalty: GRPO's estimator form on the old policy's tokens (see kl_to_old)
        loss = loss + kl_to_old_coef * agg(kl_estimate(logp, old_logp, kl_to_old_kind), kl_weights)
    if ref_logp is not None:
        ref_logp = _clean(ref_logp.detach(), mask)
        if kl_to_ref_coef:
            loss = loss + kl_to_ref_coef * agg(kl_estimate(logp, ref_logp, kl_to_ref_kind), kl_weights)

    # 3. Metrics over target tokens, whatever KL enters the loss: kl_to_old as its two-outcome lower bound (and its
    #    k3 mean), kl_to_ref as its k3 mean. The largest |log-ratio| beside the mean KL tells one token that moved
    #    far from a policy that moved everywhere.
    with torch.no_grad():
        log_ratio = (logp - old_logp)[mask]
        metrics = {
            "train/policy_loss": loss.item(),
            "train/clipfrac": _masked_mean((clipped < unclipped).double(), mask),
            "train/ratio_mean": _masked_mean(ratio, mask),
            "train/ratio_max": ratio[mask].max().item() if mask.any() else 0.0,
            "train/kl_to_old": _masked_mean(kl_to_old_bound(logp, old_logp), mask),
            "train/kl_to_old_k3": _masked_mean(kl_to_old(logp, old_logp, "k3"), mask),
            "train/log_ratio_abs_max": log_ratio.abs().max().item() if mask.any() else 0.0,
        }
        if ref_logp is not None:
            metrics["train/kl_to_ref"] = _masked_mean(kl_estimate(logp, ref_logp, "k3"), mask)
        if entropy is not None:
            metrics["train/entropy"] = _masked_mean(_clean(entropy, mask), mask)
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    row_sample: torch.Tensor,
    eps: float = 0.2,
    aggregation: str = "token_sum_over_max_len",
    norm_len: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped value loss (as in TraceRL's value model): per token
    ½·max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²), then aggregated like the policy loss; ε = 0 is the
    plain ½(V − R)². values, old_values, returns, mask [R, T]; only ``values`` carries gradients. ``weights`` as in
    ``policy_loss``.
    """
    values = _clean(values, mask)
    old_values = _clean(old_values.detach(), mask)
    returns = _clean(returns.detach(), mask)
    plain = (values - returns) ** 2
    clipped = (old_values + (values - old_values).clamp(-eps, eps) - returns) ** 2 if eps > 0 else plain
    if weights is None:
        weights = weight_grid(mask, row_sample, aggregation, norm_len)
    per_token = _clean(0.5 * torch.maximum(plain, clipped), mask)
    loss = (per_token * _clean(weights, mask).to(per_token.dtype)).sum()
    with torch.no_grad():
        metrics = {
            "train/value_loss": loss.item(),
            "train/value_clipfrac": _masked_mean((clipped > plain).double(), mask),
            "train/value_mean": _masked_mean(values, mask),
        }
    return loss, metrics


def _entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    # Tokens with probability 0 (logit −inf) contribute 0; where() keeps their gradient 0 instead of NaN.
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = −Σ_v p_v log p_v of softmax(logits) [M, V] → [M], computed in fp32."""
    return _entropy_from_logp(torch.log_softmax(logits.float(), dim=-1))


def target_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    temperature: torch.Tensor | float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(head(hidden) / τ)[targets] in fp32, ``chunk_size`` rows at a time: hidden [M, H], targets [M]
    → logp [M] (and entropy [M] if ``with_entropy``); ``temperature`` is each row's τ, [M] fp32, or one τ for
    every row (None: 1). With grad enabled each chunk is activation-checkpointed, so only one chunk's [chunk, V]
    logits are alive in forward and backward (O(chunk·V), not O(M·V) memory).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")

    def one_chunk(
        h: torch.Tensor, t: torch.Tensor, tau: torch.Tensor | float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()
        if isinstance(tau, torch.Tensor):
            logits = logits / tau.unsqueeze(-1)
        elif tau is not None and tau != 1.0:
            logits = logits / tau
        logp_all = torch.log_softmax(logits, dim=-1)  # [chunk, V]
        logp = logp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        ent = _entropy_from_logp(logp_all) if with_entropy else logp.new_zeros(0)
        return logp, ent

    logps: list[torch.Tensor] = []
    ents: list[torch.Tensor] = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        tau = temperature[start : start + chunk_size] if isinstance(temperature, torch.Tensor) else temperature
        if torch.is_grad_enabled():
            logp, ent = checkpoint(one_chunk, h, t, tau, use_reentrant=False)
        else:
            logp, ent = one_chunk(h, t, tau)
        logps.append(logp)
        ents.append(ent)
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    if not with_entropy:
        return logp
    return logp, torch.cat(ents) if ents else hidden.new_zeros(0, dtype=torch.float32)
