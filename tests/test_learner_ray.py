"""Data-parallel learner ranks as Ray actors: two ZeRO ranks train exactly like one rank holding every row."""

from __future__ import annotations

import copy

import pytest
import torch

from tracerl.checkpoint import DriverState, export_hf, load_checkpoint, save_checkpoint
from tracerl.config import Config, SamplingConfig
from tracerl.learner import Learner
from tracerl.records import TrainShard
from tracerl.sampling import generate
from tracerl.trace import make_views

from .conftest import encode, tiny_policy

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

ADV = torch.tensor([1.0, -1.0, 0.5])


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def dp_cfg(stage: int, attention: str, budget: int) -> Config:
    cfg = Config(seed=3)
    cfg.model.tiny.attention = attention
    cfg.learner.micro_batch_tokens = budget
    # Adam's first step moves a weight by ~lr·g/(|g| + eps): with eps = 1e-8 a gradient of 1e-9, all float noise
    # (summation order), moves it by a tenth of lr either way. eps = 1e-6 keeps such updates linear in g, so the
    # weights compare the gradients, not the signs of their rounding errors.
    cfg.learner.adam_eps = 1e-6
    cfg.learner.lr = 1e-3
    cfg.learner.zero_stage = stage
    cfg.learner.zero3_persistence_threshold = 0  # partition every parameter, the case ZeRO-3 exists for
    cfg.learner.minibatches = 2
    cfg.learner.max_grad_norm = 0.2  # clipping on: the engines must clip by the norm over all ranks
    cfg.learner.logprob_chunk_tokens = 5  # several LM-head chunks, uneven across ranks
    return cfg


def views_bytes(views) -> int:  # noqa: ANN001
    return sum(t.numel() * t.element_size() for t in vars(views).values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize(("attention", "stage"), [("full", 2), ("full", 3), ("block", 2), ("block", 3)])
def test_two_ranks_give_the_weights_of_one(local_ray, tmp_path, attention, stage):
    """Full attention trains rows, block attention packed views (one sequence per sample)."""
    policy = tiny_policy(attention)
    prompts = encode(policy, ["1+2=", "12+34=", "7*8="])
    rollout = generate(policy, prompts, SamplingConfig(max_new_tokens=8, block_size=4), seed=2)
    views = make_views(rollout, "trace", policy.mask_id)
    initial = {k: v.clone() for k, v in policy.model.state_dict().items()}

    budget = 4 * views.row_tokens  # uneven shares: the ranks hold 2 and 1 samples
    single = Learner(dp_cfg(0, attention, budget), copy.deepcopy(policy))  # one plain rank with every sample
    want_metrics = single.train_step(rollout, ADV)
    _, want = single.state_dict_for_rollout()
    single.destroy()

    from tracerl.workers import LearnerGroup

    cfg = dp_cfg(stage, attention, budget)
    group = LearnerGroup(cfg, num_ranks=2, weights=initial)
    try:
        assert len(set(group.pids)) == 2
        metrics = group.train_step(rollout, ADV)
        # each rank was sent its own samples only: together exactly the rollout, never the views
        whole = TrainShard(rollout, ADV, torch.arange(3), 3, 0).nbytes()
        shares = (torch.tensor([0, 1]), torch.tensor([2]))
        want_bytes = [TrainShard(rollout.select(i), ADV[i], i, 3, 0).nbytes() for i in shares]
        assert group.shard_bytes == want_bytes and sum(want_bytes) == whole
        assert max(group.shard_bytes) < whole < views_bytes(views)
        version, got = group.get_weights()
        assert version == 1
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=2e-6, msg=name)
        for key in ("train/policy_loss", "train/grad_norm", "train/entropy", "train/tokens"):
            assert metrics[key] == pytest.approx(want_metrics[key], rel=1e-4, abs=1e-7), key
        assert metrics["train/grad_norm"] > cfg.learner.max_grad_norm  # so clipping was active

        if stage == 3 and attention == "full":  # save / export / load across the two ZeRO-3 ranks
            path = save_checkpoint(tmp_path, 1, group, DriverState(step=1))
            export_hf(group, tmp_path / "hf")
            group.train_step(rollout, ADV)
            assert not torch.equal(group.get_weights()[1]["lm_head.weight"], got["lm_head.weight"])
            load_checkpoint(path, group)
            version, back = group.get_weights()
            assert version == 1
            for name, tensor in got.items():
                assert torch.equal(back[name], tensor), name
            from transformers import AutoModelForCausalLM

            exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
            assert all(torch.equal(exported[k], got[k]) for k in exported)
    finally:
        group.shutdown()


@pytest.mark.parametrize("kl_after_step", [False, True])
def test_a_rank_without_samples_takes_part_in_the_step(local_ray, kl_after_step):
    """One kept sample, two ranks: rank 1 holds no target. Every rank still sends the same metric keys to the
    sums over ranks (a rank that sent fewer failed gloo's size check, and could hang NCCL), and the step equals
    one rank's."""
    policy = tiny_policy("block")
    rollout = generate(policy, encode(policy, ["12+34="]), SamplingConfig(max_new_tokens=8, block_size=4), seed=2)
    adv = torch.tensor([1.0])
    cfg = dp_cfg(2, "block", 10_000)
    cfg.learner.kl_after_step = kl_after_step
    single = Learner(copy.deepcopy(cfg), copy.deepcopy(policy))
    want = single.train_step(rollout, adv)
    single.destroy()

    from tracerl.workers import LearnerGroup

    group = LearnerGroup(cfg, num_ranks=2, weights=policy.model.state_dict())
    try:
        got = group.train_step(rollout, adv)
        assert group.shard_bytes[1] < group.shard_bytes[0]  # rank 1 was sent no sample
        assert set(got) == set(want)
        for key in ("train/policy_loss", "train/kl_to_old", "train/entropy", "train/tokens", "train/log_ratio_abs_max"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), key
        if kl_after_step:
            assert got["train/kl_to_old_after_step"] == pytest.approx(want["train/kl_to_old_after_step"], rel=1e-3)
    finally:
        group.shutdown()


def test_value_metrics_do_not_depend_on_the_number_of_ranks(local_ray):
    """Two ranks holding 3 and 3 of 6 samples (two groups split across them) log the value metrics of one rank
    holding all 6: explained variance and variance ratios come from sums over every rank's tokens, not averages."""
    policy = tiny_policy("block")
    prompts = encode(policy, ["12+34=", "7*8=", "1+2="] * 2)
    sampling = SamplingConfig(max_new_tokens=8, block_size=4)
    rollout = generate(policy, prompts, sampling, seed=2, group=torch.tensor([0, 1, 0, 1, 0, 1]))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.25])
    cfg = dp_cfg(2, "block", 10_000)
    cfg.objective.value_model = True
    cfg.learner.value_lr = 1e-2
    single = Learner(copy.deepcopy(cfg), copy.deepcopy(policy))
    want = [single.train_step(rollout, rewards) for _ in range(2)]  # the second step: values are no longer 0
    single.destroy()

    from tracerl.workers import LearnerGroup

    group = LearnerGroup(cfg, num_ranks=2, weights=policy.model.state_dict())
    try:
        got = [group.train_step(rollout, rewards) for _ in range(2)]
    finally:
        group.shutdown()
    assert want[1]["value/explained_var"] != 0.0
    for w, g in zip(want, got, strict=True):
        for key in ("value/explained_var", "value/mean", "value/return_mean", "value/advantage_var",
                    "value/advantage_var_ratio"):  # fmt: skip
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-7), key
