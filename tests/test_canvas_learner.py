"""The learner on renoising trajectories (DiffusionGemma): exact accumulation over units, the replay through the
engine, the learning direction, references, SFT of the renoising objective."""

from __future__ import annotations

import copy

import pytest
import torch

from tracerl import canvas_trace
from tracerl.config import CanvasSamplingConfig, Config, ModelConfig, SamplingConfig, TinyModelConfig
from tracerl.learner import Learner
from tracerl.models import load_policy
from tracerl.objectives import policy_loss
from tracerl.sampling import generate

SHAPE = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, moe_intermediate_size=32,
                        canvas_length=8)  # fmt: skip
PROMPTS = ["12+3=", "1+1=", "123+45=", "9="]
ADV = torch.tensor([1.0, -1.0, 0.5, -0.25])
SAMPLING = SamplingConfig(max_new_tokens=16, canvas=CanvasSamplingConfig(max_denoising_steps=4, entropy_bound=1.0))


def policy():  # noqa: ANN201
    p = load_policy(ModelConfig(family="diffusion_gemma", tiny=SHAPE))
    with torch.no_grad():
        p.model.model.decoder.norm.weight.mul_(10.0)  # peaked logits: steps accept several tokens
    return p


def make_cfg(**learner) -> Config:
    cfg = Config()
    cfg.model.family = "diffusion_gemma"
    cfg.learner.lr = 1e-3
    cfg.learner.max_grad_norm = 1e9
    for key, value in learner.items():
        setattr(cfg.learner, key, value)
    return cfg


def batch(pol, seed: int = 1):  # noqa: ANN001, ANN201
    prompts = [pol.tokenizer(p)["input_ids"] for p in PROMPTS]
    rollout = generate(pol, prompts, SAMPLING, seed=seed)
    return rollout, canvas_trace.make_units(rollout, pol.pad_id)


@pytest.fixture
def learners():  # noqa: ANN201
    made: list[Learner] = []

    def make(cfg: Config, pol, **kw) -> Learner:  # noqa: ANN001
        made.append(Learner(cfg, pol, **kw))
        return made[-1]

    yield make
    for learner in made:
        learner.destroy()


def test_a_step_updates_the_policy_and_the_old_log_probs_are_the_samplers(learners) -> None:
    pol = policy()
    rollout, units = batch(pol)
    learner = learners(make_cfg(), copy.deepcopy(pol))
    before = learner.state_dict_for_rollout()[1]
    metrics = learner.train_step(rollout, ADV)
    after = learner.state_dict_for_rollout()[1]
    # the replay through the engine: old log-probs of every trained action equal the sampler's
    assert metrics["rollout/logp_mismatch"] < 1e-6
    assert metrics["train/kl_to_old"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["train/tokens"] == float(units.target_mask.sum())
    trainable = {n for n, p in learner.policy.model.named_parameters() if p.requires_grad}
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert "model.decoder.self_conditioning.gate_proj.weight" in moved  # the self-conditioning MLP learns
    assert any("experts" in k for k in moved) and any("router" in k for k in moved)  # so do the MoE layers
    assert not any("vision" in k for k in moved)  # the frozen tower stays
    assert moved >= {k for k in trainable if "rotary" not in k and "vision" not in k} - {""}
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.parametrize(
    "aggregation",
    ["token_sum_over_max_len", pytest.param("token_mean", marks=pytest.mark.slow),
     pytest.param("seq_mean_token_mean", marks=pytest.mark.slow)],
)  # fmt: skip
def test_micro_batches_of_units_give_the_one_batch_gradient(learners, aggregation: str) -> None:
    """Units split into micro-batches (one unit each) give the same update as all units in one."""
    pol = policy()
    rollout, units = batch(pol)
    results = []
    for budget in (10**6, units.row_tokens):
        cfg = make_cfg(micro_batch_tokens=budget)
        cfg.objective.aggregation = aggregation
        learner = learners(cfg, copy.deepcopy(pol))
        metrics = learner.train_step(rollout, ADV)
        results.append((metrics, learner.state_dict_for_rollout()[1]))
    (one, w1), (many, w2) = results
    assert many["train/micro_batches"] == len(units) > one["train/micro_batches"] == 1
    assert one["train/policy_loss"] == pytest.approx(many["train/policy_loss"], rel=1e-5, abs=1e-7)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


def test_the_loss_is_the_clipped_surrogate_over_each_canvas_trajectory(learners) -> None:
    """The first policy loss equals the surrogate computed by hand from the replayed log-probs: every trained action
    of a unit, summed, over the canvas length C, averaged over units (token_sum_over_max_len)."""
    pol = policy()
    rollout, units = batch(pol)
    cfg = make_cfg(lr=0.0)
    cfg.objective.kl_to_old_coef = 0.0
    metrics = learners(cfg, copy.deepcopy(pol)).train_step(rollout, ADV)
    logp = canvas_trace.replay_logprobs(pol, units).flatten(1)
    mask = units.target_mask.flatten(1)
    adv = ADV[units.row_sample]
    by_hand = -(torch.where(mask, adv[:, None], 0.0)).sum() / SHAPE.canvas_length / len(units)  # ρ = 1
    loss, _ = policy_loss(logp, logp, adv, mask, row_sample=units.row_sample, norm_len=SHAPE.canvas_length)
    assert metrics["train/policy_loss"] == pytest.approx(float(by_hand), rel=1e-5)
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_advantage_sign_moves_the_trajectory_log_prob(learners, sign: float) -> None:
    pol = policy()
    rollout, units = batch(pol)
    cfg = make_cfg(lr=3e-3, updates_per_step=2, max_grad_norm=1.0)
    cfg.objective.kl_to_old_coef = 0.0
    learner = learners(cfg, pol)
    start = canvas_trace.replay_logprobs(pol, units)[units.target_mask].sum().item()
    for _ in range(3):
        learner.train_step(rollout, torch.full((len(rollout),), sign))
    end = canvas_trace.replay_logprobs(pol, units)[units.target_mask].sum().item()
    assert sign * (end - start) > 0.5


def test_a_reference_model_is_frozen_and_measured(learners) -> None:
    pol = policy()
    rollout, units = batch(pol)
    cfg = make_cfg(lr=3e-3)
    cfg.objective.kl_to_ref_coef = 0.05
    learner = learners(cfg, copy.deepcopy(pol))
    first = learner.train_step(rollout, ADV)
    second = learner.train_step(rollout, ADV)
    assert first["train/kl_to_ref"] == pytest.approx(0.0, abs=1e-6) and second["train/kl_to_ref"] > 0


def test_old_log_probs_from_the_rollout_give_ratio_one(learners) -> None:
    pol = policy()
    rollout, units = batch(pol)
    cfg = make_cfg()
    cfg.objective.old_logp_source = "rollout"
    metrics = learners(cfg, copy.deepcopy(pol)).train_step(rollout, ADV)
    # |Δ| ≤ 1e-6 (float rounding of another batch layout); k3 = e^−Δ − 1 + Δ in fp32 rounds to ~1e-8 there
    assert metrics["train/kl_to_old"] < 1e-7 and metrics["train/clipfrac"] == 0.0


def test_renoising_sft_lowers_the_denoising_loss(learners) -> None:
    """The renoising objective through the learner: the loss of fixed corrupted canvases falls."""
    pol = policy()
    tok = pol.tokenizer
    pairs = [(tok(p)["input_ids"], tok(a)["input_ids"] + [tok.eos_token_id]) for p, a in (("1+1=", "2"), ("2+2=", "4"))]
    learner = learners(make_cfg(lr=1e-2), pol)
    losses = []
    for step in range(8):
        g = torch.Generator().manual_seed(0)  # the same corruption every step
        b = canvas_trace.renoise_sft_batch(pairs, canvas_length=8, vocab_size=pol.vocab_size, pad_id=pol.pad_id,
                                           eos_id=pol.eos_id, generator=g, sc_prob=1.0)  # fmt: skip
        rows = canvas_trace.CanvasRows(b.units, sc_temperature=b.sc_temperature)
        losses.append(learner.sft_step(rows, b.weights.flatten(1))["train/loss"])
        assert step or bool((b.sc_temperature > 0).all())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("empty", [False, True])
def test_a_rank_without_units_runs_a_placeholder_unit(empty: bool) -> None:
    """What an idle rank (or an idle micro-batch slot) runs so that ranks stay in step: a unit with no target whose
    forward still puts every trainable parameter in the graph, and a chain pass over it that fills nothing."""
    pol = policy()
    _, units = batch(pol)
    mine = units.select(torch.arange(0)) if empty else units
    rows = canvas_trace.CanvasRows(mine, pad_id=pol.pad_id)
    old, rows = canvas_trace.canvas_rows(pol, rows, [None], lockstep=True)  # only the placeholder runs
    assert old.shape == (len(mine), units.steps, units.canvas_length) and not old.any()
    out = rows.dummy_inputs().call(canvas_trace.CanvasScorer(pol, 64), 3)  # lockstep: 3 LM-head chunks
    assert out.shape == (2, 0)
    (out[0].sum() * 0.0).backward()
    trainable = [p for p in pol.model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_the_kl_after_a_canvas_step_is_read_in_the_states_it_trained_on(learners) -> None:
    """learner.kl_after_step on a renoising policy: each step's self-conditioning state is the one the step trained
    with (fixed before the update), so with one minibatch the reading is the update's own movement: above 0, and
    its largest token |Δ| the largest of every target."""
    pol = policy()
    rollout, _ = batch(pol)
    cfg = make_cfg()
    cfg.learner.kl_after_step = True
    metrics = learners(cfg, copy.deepcopy(pol)).train_step(rollout, ADV)
    assert metrics["train/kl_to_old"] == pytest.approx(0.0, abs=1e-6)  # in-loss: before the only update
    assert metrics["train/kl_to_old_after_step"] > 1e-6
    assert metrics["train/log_ratio_abs_max_after_step"] > 0
