"""The value model: policy backbone + zero-initialised scalar head, for every family."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from tracerl.config import ModelConfig, SamplingConfig
from tracerl.models import ValueModel, char_tokenizer, load_policy
from tracerl.sampling import generate
from tracerl.trace import make_views

from .conftest import encode, tiny_policy


def masked_lm_policy(tmp_path):  # noqa: ANN001, ANN201
    tok = char_tokenizer("0123456789+=")
    torch.manual_seed(0)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return load_policy(ModelConfig(family="masked_lm", path=str(tmp_path)))


@pytest.fixture(params=["full", "block", "masked_lm"])
def policy(request, tmp_path):  # noqa: ANN001, ANN201
    return masked_lm_policy(tmp_path) if request.param == "masked_lm" else tiny_policy(request.param)


def views_of(policy):  # noqa: ANN001, ANN201
    rollout = generate(policy, encode(policy, ["1+2=", "12+3="]), SamplingConfig(max_new_tokens=8, block_size=4))
    return make_views(rollout, "trace", policy.mask_id)


def test_zero_head_gives_zero_values_and_learns_from_the_head_first(policy):
    views = views_of(policy)
    value = ValueModel.from_policy(policy)
    rows = torch.arange(len(views))
    values = value(views.input_ids, views.position_ids, views.visible(rows))
    assert values.shape == views.input_ids.shape and values.dtype == torch.float32
    assert (values == 0).all()

    # d(Σ w·v)/d head = Σ w·h ≠ 0, while the backbone gets exactly 0 through a zero head
    (values * torch.randn_like(values)).sum().backward()
    assert value.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or (p.grad == 0).all() for p in value.backbone.parameters())

    # once the head is non-zero, gradients reach the backbone
    value.zero_grad()
    with torch.no_grad():
        value.head.weight.fill_(0.1)
    value(views.input_ids, views.position_ids, views.visible(rows)).sum().backward()
    assert sum(p.grad.abs().sum() for p in value.backbone.parameters() if p.grad is not None) > 0


def test_state_readout_is_the_mean_of_the_token_readout_over_what_each_column_sees(policy):
    """objective.value_readout=state: each column's value is the mean, over the keys it sees in its view, of the
    head's per-column outputs (the token readout of the same weights), checked by a plain loop; on packed block
    views too."""
    from tracerl.models.attention import PackedAttention

    views = views_of(policy)
    rows = torch.arange(len(views))
    token = ValueModel.from_policy(policy)
    state = ValueModel.from_policy(policy, "state")
    state.load_state_dict(token.state_dict())
    with torch.no_grad():
        for model in (token, state):
            model.head.weight.copy_(torch.linspace(-1.0, 1.0, model.head.weight.numel()).view_as(model.head.weight))
            model.head.bias.fill_(0.3)
    visible = views.visible(rows)
    per_column = token(views.input_ids, views.position_ids, visible)
    values = state(views.input_ids, views.position_ids, visible)
    seen = visible.dense() if isinstance(visible, PackedAttention) else visible
    expected = torch.zeros_like(per_column)
    for n in range(seen.shape[0]):
        for q in range(seen.shape[1]):
            keys = seen[n, q].nonzero().squeeze(1).tolist()
            expected[n, q] = sum(per_column[n, k].item() for k in keys) / max(1, len(keys))
    assert per_column.std() > 0.01  # the columns differ, so a mean over the wrong keys would show
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(values, per_column)  # the two readouts really differ
    with pytest.raises(ValueError, match="unknown value readout 'pooled'.*'token', 'state'"):
        ValueModel.from_policy(policy, "pooled")


def test_value_backbone_is_a_copy_of_the_policy_backbone(policy):
    value = ValueModel.from_policy(policy)
    source = policy.model.base_model if policy.family == "masked_lm" else policy.backbone()
    before = copy.deepcopy(source.state_dict())
    for p_value, p_policy in zip(value.backbone.parameters(), source.parameters(), strict=True):
        assert torch.equal(p_value, p_policy) and p_value.data_ptr() != p_policy.data_ptr()
    with torch.no_grad():
        for p in value.backbone.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())  # the policy is untouched
    assert value.shift == bool(getattr(policy, "shift", False))


def test_masked_lm_policy_trains_with_a_value_model_in_the_learner(tmp_path):
    """The value model exists for every family; here a BERT-style masked LM through the real learner."""
    from tracerl.config import Config
    from tracerl.learner import Learner

    policy = masked_lm_policy(tmp_path)
    rollout = generate(policy, encode(policy, ["1+2=", "12+3="]), SamplingConfig(max_new_tokens=8, block_size=4))
    cfg = Config()
    cfg.objective.value_model = True
    cfg.learner.lr = cfg.learner.value_lr = 1e-2
    learner = Learner(cfg, policy)
    try:
        rollout.group = torch.tensor([0, 0])  # one group of two: centered rewards ±0.5
        first = learner.train_step(rollout, torch.tensor([1.0, 0.0]))
        head = learner.value_engine.module.value.head.weight
        assert head.abs().sum() > 0
        assert first["train/value_loss"] > 0 and first["train/grad_norm"] > 0
    finally:
        learner.destroy()


@pytest.mark.slow
@pytest.mark.parametrize(("attention", "readout"), [("full", "token"), ("block", "token"), ("block", "state")])
def test_value_model_learns_known_values_and_cuts_advantage_variance(attention, readout):
    """A case whose right values are known: the reward is 1 when the first response token lies in the lower half
    of the vocabulary, and the sampler decodes left to right, so every token after the first sees it. The right
    value of those states is the reward itself (returns are raw rewards, γ = λ = 1); only the first token's state
    (everything masked) cannot know it. Trained through the real learner, the explained variance of the pre-update
    values rises far above 0 and the GAE advantages vary less than the group baseline's on the same tokens."""
    from tracerl.config import Config
    from tracerl.learner import Learner

    policy = tiny_policy(attention)  # block: two blocks of 4 (the quickstart's layout), every later state shows it
    prompts = encode(policy, ["1+2=", "12+3=", "7*8=", "a"] * 4)
    width = 6 if attention == "full" else 4
    sampling = SamplingConfig(max_new_tokens=6 if attention == "full" else 8, block_size=width, remasking="sequential")
    rollout = generate(policy, prompts, sampling, seed=0, group=torch.arange(4).repeat_interleave(4))
    reward = (rollout.response_ids[:, 0] < policy.vocab_size // 2).float()
    assert 0.2 < reward.mean() < 0.8  # both outcomes occur
    cfg = Config()
    cfg.objective.value_model = True
    cfg.objective.value_target = "reward"
    cfg.objective.value_readout = readout
    cfg.objective.advantage = "group_mean"  # scale 1: GAE advantages are R − V, the baseline's R − mean_g
    cfg.learner.lr, cfg.learner.value_lr, cfg.learner.value_updates_per_step = 1e-6, 3e-3, 4
    learner = Learner(cfg, policy)
    try:
        history = [learner.train_step(rollout, reward) for _ in range(12)]
    finally:
        learner.destroy()
    first, last = history[0], history[-1]
    assert first["value/explained_var"] == 0.0 and first["value/mean"] == 0.0  # zero head: V = 0 everywhere
    tokens = rollout.response_mask.sum(1).float()
    assert first["value/return_mean"] == pytest.approx(float((reward * tokens).sum() / tokens.sum()))  # R_j = r
    curve = [round(h["value/explained_var"], 3) for h in history]
    assert last["value/explained_var"] > 0.6, curve
    assert last["value/advantage_var_ratio"] < 0.7, [round(h["value/advantage_var_ratio"], 3) for h in history]
    assert last["train/value_optimizer_steps"] == 4.0


def test_the_learner_gets_rewards_for_a_reward_made_value_target_and_advantages_otherwise():
    """stages.learner_outcome, as the loop and gpu_check call it: a value model whose target is made from the
    rewards gets the raw rewards (a truncated response scored 0 under truncated_is_wrong); otherwise the advantages."""
    from types import SimpleNamespace

    from tracerl.config import ObjectiveConfig
    from tracerl.stages import learner_outcome

    adv = torch.tensor([0.5, -0.5, 1.0])
    rewards = [1.0, 0.0, 0.75]
    rollout = SimpleNamespace(truncated=torch.tensor([False, False, True]))
    o = ObjectiveConfig(value_model=False, value_target="reward")
    assert learner_outcome(adv, rewards, rollout, o) is adv  # no value model: the advantages
    o = ObjectiveConfig(value_model=True, value_target="advantage")
    assert learner_outcome(adv, rewards, rollout, o) is adv
    for target in ("centered", "reward"):
        o = ObjectiveConfig(value_model=True, value_target=target, truncated_is_wrong=True)
        assert learner_outcome(adv, rewards, rollout, o).tolist() == [1.0, 0.0, 0.0]  # the truncated 0.75 → 0
        o = ObjectiveConfig(value_model=True, value_target=target, truncated_is_wrong=False)
        assert learner_outcome(adv, rewards, rollout, o).tolist() == [1.0, 0.0, 0.75]


@pytest.mark.parametrize("readout", ["token", "state"])
def test_values_at_the_targets_are_the_same_from_packed_and_row_views(readout):
    """The replay invariant for the value model: a token's value read in its packed block view equals the one read
    in its row view, for either readout (the state readout averages over exactly the keys the state shows)."""
    from tracerl.config import Config
    from tracerl.learner import Learner

    policy = tiny_policy("block")
    sampling = SamplingConfig(max_new_tokens=8, block_size=4)
    rollout = generate(policy, encode(policy, ["1+2=", "12+3=", "7"]), sampling, seed=2)
    read = {}
    for packed in (False, True):
        cfg = Config()
        cfg.objective.value_model = True
        cfg.objective.value_readout = readout
        cfg.learner.packed_views = packed
        learner = Learner(cfg, policy)
        try:
            with torch.no_grad():
                head = learner.value_engine.module.value.head
                head.weight.copy_(torch.linspace(-1.0, 1.0, head.weight.numel()).view_as(head.weight))
            views = learner.views_of(rollout)
            table = views.targets()
            values = learner.micro.infer(learner.value_engine, views, table, torch.arange(len(views)))[0]
            read[packed] = table.place(values, *rollout.response_ids.shape)
        finally:
            learner.destroy()
    assert read[False].abs().max() > 0.01
    torch.testing.assert_close(read[True], read[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_the_value_schedule_spans_the_same_rl_steps_as_the_policys(engine):
    """value_updates_per_step=3 against the policy's 1: the value engine takes 3 × the optimizer steps, so its
    linear decay over learner.total_steps = 4 RL steps is stretched to 12 of its steps (it reached 0 after 4 of its
    steps, i.e. in RL step 2, and learnt nothing after); train/value_lr says where it is."""
    from tracerl.config import Config
    from tracerl.learner import Learner
    from tracerl.scoring import lr_factor

    policy = tiny_policy("full")
    rollout = generate(policy, encode(policy, ["1+2=", "12+3="]), SamplingConfig(max_new_tokens=8, block_size=4))
    rollout.group = torch.tensor([0, 0])
    cfg = Config()
    cfg.objective.value_model = True
    cfg.learner.engine = engine
    cfg.learner.lr, cfg.learner.value_lr = 1e-3, 2e-3
    cfg.learner.lr_schedule, cfg.learner.total_steps, cfg.learner.warmup_steps = "linear", 4, 1
    cfg.learner.value_updates_per_step = 3
    learner = Learner(cfg, policy)
    try:
        for step in range(1, 5):
            m = learner.train_step(rollout, torch.tensor([1.0, 0.0]))
            assert m["train/value_optimizer_steps"] == 3
            # the last optimizer step of RL step `step`: the policy's step `step`, the value's step 3 · step, with
            # warmup 1 and 3 optimizer steps and schedules of 4 and 12
            assert m["train/lr"] == pytest.approx(1e-3 * lr_factor(step - 1, "linear", 1, 4))
            assert m["train/value_lr"] == pytest.approx(2e-3 * lr_factor(3 * step - 1, "linear", 3, 12))
            if step < 4:
                assert m["train/value_lr"] > 0
    finally:
        learner.destroy()


@pytest.mark.parametrize("target", ["centered", "reward", "advantage"])
def test_a_flat_step_has_no_signal_except_under_the_advantage_target(target):
    """Every group scored flat: with the value model on, its GAE advantages are 0 under the targets made from the
    rewards (the loop reports advantage/no_signal, as without a value model) and the value's own error under
    TraceRL's `advantage` target (not reported: it is trained on)."""
    from tracerl.config import Config
    from tracerl.learner import Learner
    from tracerl.stages import no_signal

    policy = tiny_policy("full")
    rollout = generate(policy, encode(policy, ["1+2=", "12+3="]), SamplingConfig(max_new_tokens=8, block_size=4))
    rollout.group = torch.tensor([0, 0])
    cfg = Config()
    cfg.objective.value_model, cfg.objective.value_target = True, target
    cfg.learner.lr = cfg.learner.value_lr = 1e-2
    learner = Learner(cfg, policy)
    try:
        varied = torch.tensor([1.0, -1.0]) if target == "advantage" else torch.tensor([1.0, 0.0])
        learner.train_step(rollout, varied)  # the value head is no longer 0
        flat = learner.train_step(rollout, torch.tensor([0.0, 0.0]) if target == "advantage" else torch.ones(2))
    finally:
        learner.destroy()
    assert flat["value/mean"] != 0.0
    zero = flat["value/advantage_var"] == 0.0 and flat["value/baseline_advantage_var"] == 0.0
    assert zero == (target != "advantage")
    assert no_signal(1.0, cfg.objective) == zero
    assert not no_signal(0.5, cfg.objective)
