"""The DeepSpeed learner on CPU: exact accumulation, learning direction, metrics, value/reference models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tracerl.advantages import group_zscore
from tracerl.config import Config, SamplingConfig
from tracerl.learner import Learner, NonFiniteUpdate
from tracerl.models.base import DecoderPolicy
from tracerl.objectives import AGGREGATIONS, policy_loss
from tracerl.sampling import generate
from tracerl.scoring import lr_factor, rows_from_response
from tracerl.trace import make_views, view_logprobs

from .conftest import encode, tiny_policy

PROMPTS = ["1+2=", "12+34=", "7*8=", "a"]
ADV = torch.tensor([1.0, -1.0, 0.5, -0.25])


def make_cfg(**learner) -> Config:
    cfg = Config()
    cfg.learner.lr = 1e-3
    cfg.learner.max_grad_norm = 1e9  # effectively no clipping: gradients stay comparable to plain autograd
    for key, value in learner.items():
        setattr(cfg.learner, key, value)
    return cfg


def batch(policy, n_tokens: int = 8, seed: int = 1, **view_kw):  # noqa: ANN001, ANN201
    """A rollout of the tiny policy and its trace views."""
    rollout = generate(policy, encode(policy, PROMPTS), SamplingConfig(max_new_tokens=n_tokens, block_size=4), seed)
    return rollout, make_views(rollout, "trace", policy.mask_id, shift=policy.shift, **view_kw)


def capture_grads(learner: Learner) -> list[dict[str, torch.Tensor]]:
    """Record the accumulated gradients at every optimizer step, before the engine clips and steps (one rank)."""
    grads: list[dict[str, torch.Tensor]] = []
    engine = learner.engine
    step = engine.step

    def recording_step():  # noqa: ANN202
        grads.append({n: p.grad.clone() for n, p in learner.policy.model.named_parameters() if p.grad is not None})
        return step()

    engine.step = recording_step
    return grads


@pytest.fixture
def learners():  # noqa: ANN201
    """Learners created in a test, destroyed afterwards (several engines live in one process)."""
    made: list[Learner] = []

    def make(cfg: Config, policy, **kw) -> Learner:  # noqa: ANN001
        learner = Learner(cfg, policy, **kw)
        made.append(learner)
        return learner

    yield make
    for learner in made:
        learner.destroy()


# ---------------------------------------------------------------------------------------------- pure parts


def test_lr_schedules_by_hand():
    # warmup 2 of total 6: 1/2, 1, then the decay over the 4 remaining steps
    assert [lr_factor(s, "constant", 2, 6) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, "linear", 2, 6) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    cos = [lr_factor(s, "cosine", 0, 4) for s in range(5)]  # ½(1 + cos(πk/4))
    assert cos == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0])
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(3, "step", 0, 4)


def test_rows_from_response_reads_each_target_of_its_sample(full_policy):
    rollout, views = batch(full_policy)
    per_token = torch.arange(rollout.response_ids.numel(), dtype=torch.float).view(rollout.response_ids.shape)
    got = rows_from_response(views, per_token)
    rows, cols = views.target_mask.nonzero(as_tuple=True)
    want = per_token[views.row_sample[rows], views.target_pos[rows, cols]]
    assert torch.equal(got[rows, cols], want)
    assert (got[~views.target_mask] == 0).all()


# ---------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_split_micro_batches_give_the_single_batch_gradient(learners, aggregation, engine):
    """A minibatch packed one row per micro-batch gives the gradient of the whole minibatch in one micro-batch,
    and both equal plain autograd of the objective over all rows, on either engine."""
    policy = tiny_policy("full")
    rollout, views = batch(policy)
    cfg = make_cfg(engine=engine)
    cfg.objective.aggregation = aggregation
    cfg.objective.kl_to_old_coef = 0.05

    # plain autograd: every row in one forward, the objective as written in objectives.policy_loss
    plain = copy.deepcopy(policy)
    logp = view_logprobs(plain, views)
    loss, _ = policy_loss(
        logp,
        logp.detach(),
        ADV[views.row_sample],
        views.target_mask,
        row_sample=views.row_sample,
        aggregation=aggregation,
        norm_len=rollout.response_ids.shape[1],
        kl_to_old_coef=0.05,
    )
    loss.backward()
    want = {n: p.grad for n, p in plain.model.named_parameters()}

    got = []
    for budget in (views.row_tokens, 10**6):  # one row per micro-batch; every row in one micro-batch
        cfg.learner.micro_batch_tokens = budget
        learner = learners(cfg, copy.deepcopy(policy))
        grads = capture_grads(learner)
        metrics = learner.train_step(rollout, ADV)
        assert metrics["train/micro_batches"] == (len(views) if budget == views.row_tokens else 1)
        assert metrics["train/policy_loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
        got.append(grads[0])
    assert len(views) > 4
    for name, g in want.items():
        torch.testing.assert_close(got[0][name], g, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-7)


def test_minibatches_partition_the_samples_in_every_pass():
    from tracerl.learner.micro import minibatches

    mbs = minibatches(10, passes=3, splits=4, seed=5, rl_step=2, salt=0)
    assert [len(mb) for mb in mbs] == [3, 3, 2, 2] * 3
    for p in range(3):
        assert sorted(torch.cat(mbs[4 * p : 4 * p + 4]).tolist()) == list(range(10))  # each sample once a pass
    assert not torch.equal(torch.cat(mbs[:4]), torch.cat(mbs[4:8]))  # a new shuffle every pass
    again = minibatches(10, passes=3, splits=4, seed=5, rl_step=2, salt=0)
    assert all(torch.equal(a, b) for a, b in zip(mbs, again, strict=True))  # every rank draws the same
    assert [len(mb) for mb in minibatches(2, 1, 4, 0, 0, 0)] == [1, 1]  # more splits than samples: no empty ones


def test_minibatches_and_passes_count_optimizer_steps(learners, full_policy):
    """Minibatches are sets of samples (all rows of a sample together); each packs its rows two per micro-batch."""
    from tracerl.learner.micro import minibatches

    rollout, views = batch(full_policy)
    cfg = make_cfg(updates_per_step=2, minibatches=3, micro_batch_tokens=2 * views.row_tokens)
    learner = learners(cfg, copy.deepcopy(full_policy))
    grads = capture_grads(learner)
    metrics = learner.train_step(rollout, ADV)
    assert metrics["train/optimizer_steps"] == 6 == len(grads)
    rows = [int(torch.isin(views.row_sample, mb).sum()) for mb in minibatches(4, 2, 3, cfg.seed, 0, 0)]
    assert sum(rows) == 2 * len(views)
    assert metrics["train/micro_batches"] == sum(math.ceil(r / 2) for r in rows)
    assert metrics["trace/rows_per_sample"] == len(views) / 4


def test_engines_agree_on_an_rl_step_with_clipping_and_a_schedule(learners, block_policy):
    """The plain-PyTorch engine and DeepSpeed (ZeRO-0, fp32) are two implementations of one contract: the same
    RL step (two minibatches, clipping active, warmup) ends in the same weights and metrics."""
    rollout, views = batch(block_policy, n_tokens=12)
    got = {}
    for engine in ("deepspeed", "torch"):
        cfg = make_cfg(engine=engine, minibatches=2, max_grad_norm=0.05, warmup_steps=3, lr=3e-3)
        cfg.learner.micro_batch_tokens = 3 * views.row_tokens
        learner = learners(cfg, copy.deepcopy(block_policy))
        metrics = learner.train_step(rollout, ADV)
        got[engine] = (metrics, learner.state_dict_for_rollout()[1])
    (m_ds, w_ds), (m_pt, w_pt) = got["deepspeed"], got["torch"]
    assert m_ds["train/grad_norm"] > 0.05  # clipping was active
    for key in ("train/policy_loss", "train/grad_norm", "train/lr", "train/kl_to_old", "train/entropy"):
        assert m_pt[key] == pytest.approx(m_ds[key], rel=1e-5, abs=1e-8), key
    for name, tensor in w_ds.items():
        torch.testing.assert_close(w_pt[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(w_pt["lm_head.weight"], block_policy.model.state_dict()["lm_head.weight"])


@pytest.mark.parametrize(
    "extra",
    [
        {},  # μ = 2 passes × 2 minibatches, a KL to the old policy
        {"value_model": True, "kl_to_ref_coef": 0.05, "gradient_checkpointing": True},  # every scorer, checkpointed
    ],
)
def test_packed_views_train_like_the_rows(learners, block_policy, extra):
    """The same RL step on packed views and on the rows: the same metrics and weights (fp32, 1e-5), with fewer
    tokens through the model."""
    rollout, _ = batch(block_policy, n_tokens=12)
    rollout.group = torch.tensor([0, 0, 1, 1])  # the value model's centered target needs groups that vary
    got = {}
    for packed in (False, True):
        cfg = make_cfg(packed_views=packed, updates_per_step=2, minibatches=2, micro_batch_tokens=200)
        cfg.learner.gradient_checkpointing = extra.get("gradient_checkpointing", False)
        cfg.objective.kl_to_old_coef = 0.05
        cfg.objective.value_model = extra.get("value_model", False)
        cfg.objective.kl_to_ref_coef = extra.get("kl_to_ref_coef", 0.0)
        cfg.learner.value_lr = 1e-2
        learner = learners(cfg, copy.deepcopy(block_policy))
        first = learner.train_step(rollout, ADV)
        second = learner.train_step(rollout, ADV)  # after an update: kl_to_old, clipping, values all non-trivial
        got[packed] = (first, second, learner.state_dict_for_rollout()[1])
    (r1, r2, rows_w), (p1, p2, packed_w) = got[False], got[True]
    assert p1["trace/tokens_per_sample"] < r1["trace/tokens_per_sample"]
    for want, have in ((r1, p1), (r2, p2)):
        for key, value in want.items():
            if key.startswith("train/") and key != "train/micro_batches":
                assert have[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # Adam divides each gradient entry by its running RMS, so an entry whose gradient sits near rounding level
    # moves by a sizeable fraction of lr whatever its rounding: two fp32 summation orders (rows, packed) whose
    # gradients agree to ~1e-7 (the grad norms above) give weights that differ by up to ~0.5% of lr there.
    assert p1["train/grad_norm"] == pytest.approx(r1["train/grad_norm"], rel=1e-6)
    lr = 1e-3
    for name, tensor in rows_w.items():
        torch.testing.assert_close(packed_w[name], tensor, rtol=1e-5, atol=0.01 * lr, msg=name)


def test_flex_attention_is_refused_off_cuda(block_policy):
    with pytest.raises(ValueError, match="learner.packed_attention=flex .* no backward on cpu.*=auto"):
        Learner(make_cfg(engine="torch", packed_attention="flex"), copy.deepcopy(block_policy))


def test_torch_engine_refuses_zero():
    from tracerl.config import ConfigError, check

    cfg = make_cfg(engine="torch", zero_stage=2)
    with pytest.raises(ConfigError, match="learner.engine=torch .* no ZeRO.*learner.zero_stage=0"):
        check(cfg)


def test_algorithm_code_never_calls_deepspeed_methods():
    """No learner file but the DeepSpeed engine calls a DeepSpeed engine's own methods."""
    from pathlib import Path

    import tracerl.learner

    for path in Path(tracerl.learner.__file__).parent.glob("*.py"):
        if path.name != "deepspeed_engine.py":
            text = path.read_text()
            for call in ("set_gradient_accumulation_boundary", "get_global_grad_norm", "scale_wrt_gas", ".ds."):
                assert call not in text, (path.name, call)


# ---------------------------------------------------------------------------------------------- an RL step


def test_train_step_updates_parameters_with_finite_gradients_and_reports_metrics(learners, full_policy):
    rollout, views = batch(full_policy)
    cfg = make_cfg(micro_batch_tokens=3 * views.row_tokens, warmup_steps=2)
    learner = learners(cfg, copy.deepcopy(full_policy))
    before = learner.state_dict_for_rollout()[1]
    grads = capture_grads(learner)
    metrics = learner.train_step(rollout, ADV)
    version, after = learner.state_dict_for_rollout()

    assert version == 1
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(changed) == len(after)  # every tensor moved (the tiny model has no buffers in its state dict)
    g = grads[0]
    assert all(torch.isfinite(x).all() for x in g.values())
    assert sum(x.abs().sum() for x in g.values()) > 0
    keys = ("policy_loss", "clipfrac", "kl_to_old", "log_ratio_abs_max", "grad_norm", "entropy", "lr", "tokens")
    for key in (*keys, "micro_batches"):
        assert isinstance(metrics[f"train/{key}"], float), key
    assert metrics["train/lr"] == pytest.approx(1e-3 / 2)  # first warmup step
    assert metrics["train/tokens"] == float(views.target_mask.sum())
    want_norm = torch.stack([x.norm() for x in g.values()]).norm().item()
    assert metrics["train/grad_norm"] == pytest.approx(want_norm, rel=1e-5)
    assert metrics["train/kl_to_old"] == pytest.approx(0.0, abs=1e-6)  # one update: the policy is the old one
    assert 0 < metrics["train/entropy"] <= math.log(full_policy.vocab_size) + 1e-4


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_nan_loss_stops_the_step_before_the_optimizer_applies_it(learners, full_policy, engine):
    """lr=1e30 turned the loss NaN from the next step on, and every later step trained on it: the NaN weights were
    checkpointed and exported. A minibatch loss that is not finite now stops the step on every engine before the
    optimizer applies anything: the weights stay bitwise those of the last good step."""
    rollout, views = batch(full_policy)
    learner = learners(make_cfg(engine=engine, micro_batch_tokens=3 * views.row_tokens), copy.deepcopy(full_policy))
    learner.train_step(rollout, ADV)  # a good step first
    before = learner.state_dict_for_rollout()[1]
    with pytest.raises(NonFiniteUpdate, match=r"the policy loss is nan \(not a finite number\)") as err:
        learner.train_step(rollout, torch.tensor([1.0, math.nan, 0.5, -0.25]))
    message = str(err.value)
    assert "learner.lr (this step's learning rate was 0.001" in message and "learner.max_grad_norm=1e+09" in message
    assert "reward's scale" in message and "\n" not in message
    version, after = learner.state_dict_for_rollout()
    assert version == 1
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize(("engine", "stage"), [("torch", 0), ("deepspeed", 0), ("deepspeed", 2)])
def test_a_non_finite_gradient_norm_stops_the_step_before_the_optimizer_applies_it(
    learners, full_policy, engine, stage
):
    """A finite loss whose gradient is not: fp32 ZeRO-0 (torch, DeepSpeed) checks the norm before stepping;
    DeepSpeed's own overflow check skips the update at ZeRO-1-3, and the engine reports it the same way."""
    rollout, _ = batch(full_policy)
    learner = learners(make_cfg(engine=engine, zero_stage=stage), copy.deepcopy(full_policy))
    before = learner.state_dict_for_rollout()[1]
    weight = next(learner.policy.model.parameters())
    hook = weight.register_hook(lambda g: torch.full_like(g, math.inf))
    with pytest.raises(NonFiniteUpdate, match="the policy gradient norm is (inf|nan)") as err:
        learner.train_step(rollout, ADV)
    hook.remove()
    assert err.value.role == "policy" and err.value.quantity == "gradient norm"
    after = learner.state_dict_for_rollout()[1]
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_a_non_finite_value_gradient_names_the_value_model_and_its_learning_rate(learners, full_policy):
    rollout, _ = batch(full_policy)
    rollout.group = torch.tensor([0, 0, 1, 1])
    cfg = make_cfg(engine="torch", value_lr=3e-3)
    cfg.objective.value_model = True
    learner = learners(cfg, copy.deepcopy(full_policy))
    value = learner.value_engine.module
    value_before = {k: v.clone() for k, v in value.state_dict().items()}
    before = learner.state_dict_for_rollout()[1]
    value.value.head.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    with pytest.raises(NonFiniteUpdate, match="the value gradient norm is nan") as err:
        learner.train_step(rollout, ADV)
    assert "learner.value_lr (this step's learning rate was 0.003" in str(err.value)
    for name, tensor in value.state_dict().items():
        assert torch.equal(tensor, value_before[name]), name
    after = learner.state_dict_for_rollout()[1]  # the value phase comes before the policy's update
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("minibatches", [1, 2])
def test_kl_after_step_reads_what_the_whole_step_moved(learners, full_policy, minibatches):
    """The in-loss train/kl_to_old reads each minibatch before its own update (0 with one minibatch); the reading
    after the step equals the bound and the largest |Δ| computed by hand from the policy before and after it."""
    from tracerl.objectives import kl_to_old_bound

    rollout, views = batch(full_policy)
    cfg = make_cfg(lr=3e-2, minibatches=minibatches, kl_after_step=True)
    learner = learners(cfg, copy.deepcopy(full_policy))
    target = views.target_mask
    with torch.no_grad():
        old = view_logprobs(learner.policy, views)[target].double()
    metrics = learner.train_step(rollout, ADV)
    with torch.no_grad():
        new = view_logprobs(learner.policy, views)[target].double()
    assert metrics["train/kl_to_old_after_step"] == pytest.approx(kl_to_old_bound(new, old).mean().item(), rel=1e-4)
    assert metrics["train/log_ratio_abs_max_after_step"] == pytest.approx((new - old).abs().max().item(), rel=1e-4)
    assert metrics["train/kl_to_old_after_step"] > 1e-3  # the step moved the policy
    if minibatches == 1:
        assert metrics["train/kl_to_old"] == pytest.approx(0.0, abs=1e-9)  # in-loss: before the only update
    else:  # in-loss: the second minibatch sees the first update, the first sees none; the last update is unseen
        assert 0 < metrics["train/kl_to_old"] < metrics["train/kl_to_old_after_step"]


def test_old_logp_from_the_rollout_matches_the_learner(learners, full_policy):
    """The replay invariant through the learner: rollout_logp as old log-probs gives Δ ≈ 0 on the first step."""
    rollout, views = batch(full_policy)
    cfg = make_cfg()
    cfg.objective.old_logp_source = "rollout"
    learner = learners(cfg, copy.deepcopy(full_policy))
    metrics = learner.train_step(rollout, ADV)
    assert metrics["train/kl_to_old"] < 1e-9
    assert metrics["train/clipfrac"] == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_advantage_sign_moves_the_trace_log_prob(learners, sign):
    """A few optimizer steps on one fixed trace raise its log-prob with A > 0 and lower it with A < 0."""
    policy = tiny_policy("full")
    rollout = generate(policy, encode(policy, ["12+34="]), SamplingConfig(max_new_tokens=8, block_size=4), seed=3)
    views = make_views(rollout, "trace", policy.mask_id)
    cfg = make_cfg(lr=3e-3, updates_per_step=2, max_grad_norm=1.0)
    cfg.objective.kl_to_old_coef = 0.0
    learner = learners(cfg, policy)
    start = learner.logprobs(views).sum().item()
    for _ in range(3):
        learner.train_step(rollout, torch.tensor([sign]))
    end = learner.logprobs(views).sum().item()
    assert sign * (end - start) > 0.5  # nats over the 8 response tokens


@pytest.mark.parametrize("stage", [0, 2])
def test_block_layout_in_bf16(learners, block_policy, stage):
    rollout, views = batch(block_policy, n_tokens=12)
    cfg = make_cfg(zero_stage=stage, precision="bf16", micro_batch_tokens=2 * views.row_tokens)
    learner = learners(cfg, copy.deepcopy(block_policy))
    metrics = learner.train_step(rollout, ADV)
    assert all(math.isfinite(v) for v in metrics.values())
    assert learner.policy.model.dtype == torch.bfloat16
    assert metrics["train/grad_norm"] > 0


def test_bf16_takes_the_same_adamw_steps_at_every_zero_stage(learners, block_policy):
    """bf16 at ZeRO-0 runs DeepSpeed's unfused wrapper, which took a zero-gradient AdamW step when it was built: the
    first real update moved 0.74 × lr, every later bias correction was one step late, and weight decay shrank the
    fp32 master weights once, so ZeRO-0 drifted from ZeRO-1/2 from the first step on. All stages now count the same
    steps and end with the same weights (weight decay on: the masters must be copied back from the weights)."""
    rollout, views = batch(block_policy, n_tokens=12)
    weights, counts = [], []
    for stage in (0, 1, 2, 3):
        cfg = make_cfg(zero_stage=stage, precision="bf16", micro_batch_tokens=2 * views.row_tokens, weight_decay=0.1)
        cfg.learner.zero3_persistence_threshold = 0  # ZeRO-3: partition every parameter
        learner = learners(cfg, copy.deepcopy(block_policy))
        for _ in range(3):
            learner.train_step(rollout, ADV)
        weights.append(learner.state_dict_for_rollout()[1])
        adamw = learner.engine.ds.optimizer.optimizer  # torch's AdamW inside DeepSpeed's wrapper
        counts.append({int(state["step"]) for state in adamw.state.values()})
    assert counts == [{3}] * 4
    for other in weights[1:]:
        for name, tensor in weights[0].items():
            assert torch.equal(other[name], tensor), name


def test_shifted_policy_reads_the_hidden_state_one_to_the_left(learners, full_policy):
    """For an AR-initialised (Dream-style) policy the learner's log-probs equal the shifted view log-probs."""
    model = copy.deepcopy(full_policy.model)
    shifted = DecoderPolicy(
        model, full_policy.tokenizer, family="dream", mask_id=full_policy.mask_id, block_size=None, shift=True
    )
    rollout, views = batch(shifted)
    learner = learners(make_cfg(micro_batch_tokens=2 * views.row_tokens), shifted)
    with torch.no_grad():
        want = view_logprobs(shifted, views)
    got = learner.logprobs(views)  # [M], the targets row-major
    torch.testing.assert_close(got, want[views.target_mask], rtol=0, atol=1e-5)
    replayed = views.targets().place(got, len(rollout), rollout.response_ids.shape[1])
    mask = rollout.response_mask
    torch.testing.assert_close(replayed[mask], rollout.rollout_logp[mask], rtol=0, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradient(learners, full_policy):
    rollout, views = batch(full_policy)
    got = []
    for on in (False, True):
        learner = learners(make_cfg(gradient_checkpointing=on), copy.deepcopy(full_policy))
        grads = capture_grads(learner)
        learner.train_step(rollout, ADV)
        got.append(grads[0])
    for name in got[0]:
        torch.testing.assert_close(got[0][name], got[1][name], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------- value / reference


@pytest.mark.parametrize("target", ["advantage", "centered"])
def test_value_model_with_zero_head_gives_outcome_advantages_then_learns(learners, full_policy, target):
    """γ = λ = 1 and a zero-initialised value head: A_j = R − 0 = R for every token, so the first policy update
    equals the one without a value model: with TraceRL's target the learner gets the group advantages themselves;
    with ``centered`` it gets raw rewards, and (r − mean_g − 0) · scale_g is exactly the group z-score. The value
    head itself moves towards the returns."""
    rollout, views = batch(full_policy)
    rollout.group = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([1.0, 0.0, 0.75, 0.25])
    adv = group_zscore(rewards, rollout.group)  # [1, -1, 1, -1]
    plain = learners(make_cfg(), copy.deepcopy(full_policy))
    plain.train_step(rollout, adv)
    cfg = make_cfg(value_lr=3e-3)  # 1e-2 overshoots: Adam's first steps move every head weight by the full lr
    cfg.objective.value_model = True
    cfg.objective.value_target = target
    learner = learners(cfg, copy.deepcopy(full_policy))
    signal = adv if target == "advantage" else rewards
    metrics = learner.train_step(rollout, signal)
    assert metrics["value/mean"] == 0.0 and metrics["value/explained_var"] == 0.0
    assert metrics["value/advantage_var_ratio"] == pytest.approx(1.0)  # nothing learnt yet: the group baseline
    want, got = plain.state_dict_for_rollout()[1], learner.state_dict_for_rollout()[1]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    assert learner.value_engine.module.value.head.weight.abs().sum() > 0
    later = [learner.train_step(rollout, signal)["train/value_loss"] for _ in range(7)]
    assert later[-1] < metrics["train/value_loss"]  # the values move towards the returns R


def test_reference_model_is_frozen_and_measured(learners, full_policy):
    rollout, views = batch(full_policy)
    cfg = make_cfg()
    cfg.objective.kl_to_ref_coef = 0.1
    learner = learners(cfg, copy.deepcopy(full_policy))
    ref_before = {k: v.clone() for k, v in learner.ref.model.state_dict().items()}
    first = learner.train_step(rollout, ADV)
    second = learner.train_step(rollout, ADV)
    assert first["train/kl_to_ref"] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial policy
    assert second["train/kl_to_ref"] > 1e-6  # after one update the policy has moved away from it
    for k, v in learner.ref.model.state_dict().items():
        assert torch.equal(v, ref_before[k])


def test_zero3_gathers_full_weights_for_rollout(learners, full_policy):
    cfg = make_cfg(zero_stage=3, zero3_persistence_threshold=0)  # partition every parameter
    learner = learners(cfg, copy.deepcopy(full_policy))
    assert any(p.numel() == 0 for p in learner.policy.model.parameters())  # really partitioned
    version, weights = learner.state_dict_for_rollout()
    assert version == 0
    for name, tensor in full_policy.model.state_dict().items():
        assert torch.equal(weights[name], tensor), name


# ---------------------------------------------------------------------------------------------- consistency


def _dropout_bert(tmp_path, tok):  # noqa: ANN001, ANN202
    from transformers import BertConfig, BertForMaskedLM

    from tracerl.config import ModelConfig
    from tracerl.models import load_policy

    torch.manual_seed(5)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    bert = BertForMaskedLM(
        BertConfig(vocab_size=len(tok), max_position_embeddings=64, hidden_dropout_prob=0.1,
                   attention_probs_dropout_prob=0.1, **shape)
    )  # fmt: skip
    bert.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return load_policy(ModelConfig(family="masked_lm", path=str(tmp_path)))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_is_off_in_every_learner_pass(learners, tmp_path, checkpointing):
    """A masked LM with dropout 0.1: with μ = 1 and one minibatch the update starts exactly at the old policy, so
    the first (and only) pass sees ratio 1 everywhere: clipfrac and kl_to_old exactly 0."""
    from tracerl.models import char_tokenizer

    tok = char_tokenizer("0123456789+=abc ")
    policy = _dropout_bert(tmp_path, tok)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in policy.model.modules())
    rollout = generate(policy, [tok(p)["input_ids"] for p in ["1+2=", "12+3=", "a"]], SamplingConfig(max_new_tokens=8))
    cfg = make_cfg(gradient_checkpointing=checkpointing)
    learner = learners(cfg, policy)
    metrics = learner.train_step(rollout, torch.tensor([1.0, -1.0, 0.5]))
    assert metrics["train/clipfrac"] == 0.0
    assert metrics["train/kl_to_old"] == 0.0
    assert metrics["rollout/logp_mismatch"] < 1e-4  # and the learner replays what the sampler saw


def test_mismatch_metrics_by_hand():
    from tracerl.learner import mismatch_metrics

    old = torch.tensor([[-1.0, -2.0, 0.0]])
    roll = torch.tensor([[-1.5, -2.0, 9.0]])
    mask = torch.tensor([[True, True, False]])
    m = mismatch_metrics(old, roll, mask)
    assert m["rollout/logp_mismatch"] == pytest.approx(0.25)  # (|−1 + 1.5| + 0) / 2
    # k3 with Δ = roll − old: exp(−Δ) − 1 + Δ = exp(0.5) − 1.5 for the first target, 0 for the second
    assert m["rollout/kl_mismatch"] == pytest.approx((math.exp(0.5) - 1.5) / 2)


def test_full_attention_kl_sums_over_a_rows_targets_under_row_mean():
    """The anchor's full-attention loss: surrogate averaged per row, k3 summed per row, both averaged over rows."""
    logp = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -0.5, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    k3 = lambda d: math.exp(-d) - 1 + d  # noqa: E731 - Δ = logp − old
    common = dict(row_sample=torch.tensor([0, 1]), aggregation="row_mean", kl_to_old_coef=1.0)
    adv = torch.zeros(2)  # no surrogate: the loss is the KL term alone
    anchor, _ = policy_loss(logp, old, adv, mask, **common)
    assert anchor.item() == pytest.approx(((k3(0.5) + k3(-0.5)) + 0.0) / 2)  # Σ per row, mean over 2 rows
    averaged, _ = policy_loss(logp, old, adv, mask, kl_aggregation="row_mean", **common)
    assert averaged.item() == pytest.approx(((k3(0.5) + k3(-0.5)) / 2 + 0.0) / 2)


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_trains_float32_weights_under_fp32_precision(learners, full_policy, engine, dtype):
    """model.dtype=bfloat16/float16 with learner.precision=fp32: AdamW on the half-precision weights lost most
    small updates (bf16: 77k of 670k weights moved on the quickstart model) or overflowed to NaN on the first step
    (fp16). The learner trains float32 weights, so every weight moves and stays finite, as in float32."""
    rollout, views = batch(full_policy)
    cfg = make_cfg(micro_batch_tokens=3 * views.row_tokens, lr=1e-5, engine=engine)
    half = copy.deepcopy(full_policy)
    half.model.to(dtype)
    learner = learners(cfg, half)
    assert {p.dtype for p in learner.policy.model.parameters()} == {torch.float32}
    before = learner.state_dict_for_rollout()[1]
    for _ in range(3):
        metrics = learner.train_step(rollout, ADV)
    after = learner.state_dict_for_rollout()[1]
    assert math.isfinite(metrics["train/policy_loss"]) and all(torch.isfinite(t).all() for t in after.values())
    moved = sum(int((after[k] != before[k]).sum()) for k in after)
    assert moved > 0.95 * sum(t.numel() for t in after.values())
