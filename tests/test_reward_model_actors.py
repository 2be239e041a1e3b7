"""Reward models in Ray actors of their own: the same scores as in-process, a dead actor replaced and its shard
rescored, and ``tracerl train`` against a reward model with a weight-0 verifier watching."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tracerl.checks import load_config
from tracerl.orchestrator import run
from tracerl.reward_resolve import RewardSpec
from tracerl.reward_service import RewardService

from .conftest import ones_pairs

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

VERIFIERS = """
def ones(prompts, completions, **kwargs):  # the rule the reward model was trained on
    return [float(c.count("1")) for c in completions]

def spread(prompts, completions, **kwargs):  # varies on a random tiny model's outputs
    return [len(set(c)) / 8.0 for c in completions]
"""


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def wait_until_dead(actor, timeout_s: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.info.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        assert time.monotonic() < deadline, f"a killed actor still answered after {timeout_s:.0f} s"
        time.sleep(0.05)


def test_reward_model_actors_score_as_in_process_and_in_training_order(local_ray, trained_rm: Path, tmp_path) -> None:
    from tracerl.workers import RewardPool

    (tmp_path / "verifiers.py").write_text(VERIFIERS)
    specs = [RewardSpec(str(trained_rm), name="rm"), RewardSpec(f"{tmp_path / 'verifiers.py'}:ones", weight=0.0)]
    fresh = ones_pairs(30, seed=11)
    prompts = [p["prompt"] for p in fresh] * 2
    completions = [p["chosen"] for p in fresh] + [p["rejected"] for p in fresh]
    pool = RewardPool(specs, num_workers=2)
    try:
        assert list(pool.model_workers) == ["rm"] and len(pool.model_workers["rm"]) == 1 and len(pool.workers) == 2
        result = pool.score(prompts, completions)
        service = RewardService(specs)
        expected = service.score(prompts, completions)
        assert result.parts.keys() == expected.parts.keys() == {"rm", "ones"}
        assert result.parts["rm"] == pytest.approx(expected.parts["rm"], abs=1e-6)
        assert result.total == result.parts["rm"]  # the weight-0 part is logged, not optimised
        # the weight-0 verifier watches the reward model: they agree, as the training data said
        assert result.metrics["reward/corr/rm/ones"] == pytest.approx(expected.metrics["reward/corr/rm/ones"])
        assert result.metrics["reward/corr/rm/ones"] > 0.5
        scores = result.parts["rm"]
        assert sum(scores[i] > scores[i + 30] for i in range(30)) >= 27  # chosen above rejected
        infos = ray.get([a.info.remote() for a in pool.model_workers["rm"] + pool.workers])
        assert [i["torch_imported"] for i in infos] == [True, False, False]  # only the model's actor holds torch
    finally:
        pool.shutdown()


def test_a_dead_reward_model_actor_is_replaced_and_its_shard_rescored(local_ray, trained_rm: Path) -> None:
    from tracerl.config import RewardModelConfig
    from tracerl.workers import RewardPool

    spec = RewardSpec(str(trained_rm), name="rm", model=RewardModelConfig(placement="cpu", num_workers=2))
    pool = RewardPool([spec, "length"], num_workers=1)
    try:
        fresh = ones_pairs(8, seed=3)
        args = ([p["prompt"] for p in fresh], [p["chosen"] for p in fresh])
        before = pool.score(*args)
        victim = pool.model_workers["rm"][1]
        # Dead before its shard (samples 4..7) is sent. Killed after, it could finish those four before the kill
        # lands (ray.kill is asynchronous: the actor may answer calls for a while) and no call would fail.
        ray.kill(victim)
        wait_until_dead(victim)
        after = pool.score(*args)
        assert after.parts["rm"] == pytest.approx(before.parts["rm"], abs=1e-6)  # nothing lost, order kept
        assert pool.model_restarts == 1 and pool.restarts == 0 and pool.model_workers["rm"][1] is not victim
    finally:
        pool.shutdown()


def test_train_two_steps_against_a_reward_model_with_a_verifier_watching(local_ray, trained_rm: Path, tmp_path) -> None:
    (tmp_path / "verifiers.py").write_text(VERIFIERS)
    cfg = load_config(None, [
        "model.tiny.attention=block", "sampling.max_new_tokens=8", "data.source=synthetic:parity",
        "data.num_synthetic=200", "learner.lr=1e-3", f"run_dir={tmp_path / 'run'}", "train.steps=2",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.num_prompts=4", "eval.samples=2",
        "eval.k=2", "wandb.mode=disabled",
        f"reward.functions=[{{fn: {trained_rm}, name: rm}}, "
        f"{{fn: '{tmp_path / 'verifiers.py'}:spread', name: verifier, weight: 0}}]",
    ])  # fmt: skip
    last = run(cfg)
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["reward/mean"] == pytest.approx(r["reward/rm/mean"])  # the total is the reward model's score
        assert 0 <= r["reward/verifier/mean"] <= 1 and r["reward/errors/rm"] == 0
        assert "reward/corr/rm/verifier" in r and r["reward/truncated/rm"] == 0
        assert r["fault/reward_model_restarts"] == 0
    assert {"eval/greedy_reward/rm", "eval/greedy_reward/verifier", "eval/mean@2/verifier"} <= set(last)
    assert last["train/optimizer_steps"] >= 1
    assert math.isfinite(last["eval/greedy_reward/rm"])
    layout = json.loads((Path(cfg.run_dir) / "cluster.json").read_text())
    assert [w["name"] for w in layout["reward_model"]] == ["rm"] and layout["reward_model"][0]["pid"] > 0


def test_a_judge_scores_in_the_function_actors(local_ray) -> None:
    from tracerl.config import JudgeConfig
    from tracerl.workers import RewardPool

    from .test_judge import Stub

    stub = Stub()
    spec = RewardSpec(stub.url, name="judge", judge=JudgeConfig(template="ANSWER: {{ completion }}", concurrency=3))
    pool = RewardPool([spec], num_workers=2, on_error="nan")
    try:
        assert pool.model_workers == {} and len(pool.workers) == 2  # a judge is an HTTP client: no model actors
        result = pool.score(["q"] * 5, ["good 1", "good 2", "babble", "good 4", "good 5"])
        assert result.parts["judge"][:2] == [1.0, 2.0] and result.parts["judge"][3:] == [4.0, 5.0]
        assert math.isnan(result.parts["judge"][2]) and result.metrics["reward/errors/judge"] == 1.0
        assert len(stub.requests) == 5
    finally:
        pool.shutdown()
        stub.close()
