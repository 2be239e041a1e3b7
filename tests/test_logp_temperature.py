"""``objective.logp_temperature``: the sampler records, and the learner computes, log-probs of softmax(logits / τ),
τ = 1 (``model``, TraceRL's) or ``sampling.temperature`` (``sampling``, verl's and TRL's)."""

from __future__ import annotations

import copy

import pytest
import torch

from tracerl.config import Config, ConfigError, SamplingConfig, check_training, logp_temperature
from tracerl.sampling import generate
from tracerl.trace import make_views, replay_mismatch, scatter_to_response

from .conftest import encode

PROMPTS = ["1+2=", "12+34=", "7*8=", "a"]
TAU = 0.7


def replayed_at(policy, rollout, tau: float) -> torch.Tensor:  # noqa: ANN001
    """[N, L] log softmax(logits / τ) of every committed token, from the state the trace views replay (by hand:
    the model's logits at the targets, divided, normalised)."""
    views = make_views(rollout, "trace", policy.mask_id, shift=policy.shift)
    target = views.target_mask
    with torch.no_grad():
        logits = policy.logits_at(views.input_ids, views.position_ids, views.visible(torch.arange(len(views))), target)
    picked = torch.log_softmax(logits.float() / tau, dim=-1).gather(-1, views.target_ids[target].unsqueeze(-1))
    out = torch.zeros(target.shape)
    out[target] = picked.squeeze(-1)
    return scatter_to_response(views, out, len(rollout), rollout.response_ids.shape[1])


@pytest.mark.parametrize("layout", ["full", "block"])
def test_the_sampler_records_log_probs_at_the_logp_temperature(full_policy, block_policy, layout):
    policy = full_policy if layout == "full" else block_policy
    s = SamplingConfig(max_new_tokens=8, block_size=4, temperature=TAU)
    tempered = generate(policy, encode(policy, PROMPTS), s, seed=3, logp_temperature=TAU)
    plain = generate(policy, encode(policy, PROMPTS), s, seed=3)
    assert torch.equal(tempered.response_ids, plain.response_ids)  # what is recorded does not change what is drawn
    assert (tempered.sampler["logp_temperature"], plain.sampler["logp_temperature"]) == (TAU, 1.0)
    mask = tempered.response_mask
    assert mask.sum() > 8
    assert (replayed_at(policy, tempered, TAU) - tempered.rollout_logp)[mask].abs().max() < 1e-5
    assert (replayed_at(policy, plain, 1.0) - plain.rollout_logp)[mask].abs().max() < 1e-5
    assert (tempered.rollout_logp - plain.rollout_logp)[mask].abs().mean() > 0.05  # and the two differ
    assert replay_mismatch(policy, tempered) < 1e-5  # the replay check reads the temperature the rollout recorded


def rl_cfg(**objective) -> Config:
    cfg = Config()
    cfg.learner.lr = 1e-3
    cfg.sampling.temperature = TAU
    for key, value in objective.items():
        setattr(cfg.objective, key, value)
    return cfg


@pytest.fixture
def learners():  # noqa: ANN201
    from tracerl.learner import Learner

    made: list[Learner] = []

    def make(cfg: Config, policy) -> Learner:  # noqa: ANN001
        made.append(Learner(cfg, copy.deepcopy(policy)))
        return made[-1]

    yield make
    for learner in made:
        learner.destroy()


def test_the_learner_replays_the_tempered_log_probs_and_refuses_a_rollout_of_another_temperature(
    learners, block_policy
):
    s = SamplingConfig(max_new_tokens=8, block_size=4, temperature=TAU)
    rollout = generate(block_policy, encode(block_policy, PROMPTS), s, seed=3, logp_temperature=TAU)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])

    cfg = rl_cfg(logp_temperature="sampling", kl_to_ref_coef=0.05)
    assert logp_temperature(cfg) == TAU
    learner = learners(cfg, block_policy)
    assert learner.logp_temperature == TAU and learner.ref.temperature == TAU  # old, new and reference alike
    metrics = learner.train_step(rollout, advantages)
    assert metrics["rollout/logp_mismatch"] < 1e-5  # the learner's old log-probs are the sampler's, at τ
    assert metrics["train/clipfrac"] == 0.0 and metrics["train/kl_to_old"] == 0.0
    assert metrics["train/kl_to_ref"] == 0.0  # the reference is the same weights at the same τ

    model = learners(rl_cfg(), block_policy)  # τ = 1 on a rollout recorded at τ: nothing to compare with
    assert model.logp_temperature == 1.0
    assert "rollout/logp_mismatch" not in model.train_step(rollout, advantages)
    from_rollout = learners(rl_cfg(old_logp_source="rollout"), block_policy)
    with pytest.raises(ValueError, match=r"rollout's log-probs are at temperature 0.7 and the learner's at 1 \(obj"):
        from_rollout.train_step(rollout, advantages)


def test_a_tempered_objective_needs_a_sampling_temperature_and_a_family_without_its_own_schedule():
    check_training(rl_cfg(logp_temperature="sampling"))
    greedy = rl_cfg(logp_temperature="sampling", value_model=True)  # a value model allows greedy rollouts
    greedy.sampling.temperature = 0.0
    with pytest.raises(ConfigError, match="objective.logp_temperature=sampling divides the logits by sampling.temp"):
        check_training(greedy)
    canvas = rl_cfg(logp_temperature="sampling")
    canvas.model.family, canvas.sampling.temperature = "diffusion_gemma", 1.0
    with pytest.raises(ConfigError, match="model.family=diffusion_gemma samples each step at its schedule's temp"):
        check_training(canvas)
