"""The console line of an RL step says what a person must know: the reward as scored, kept and flat groups."""

from __future__ import annotations

from tracerl.orchestrator.console import step_line

BASE = {
    "reward/mean": 0.5, "reward/std": 0.25, "advantage/kept_fraction": 1.0, "train/policy_loss": -0.01,
    "train/kl_to_old": 0.002, "train/clipfrac": 0.0, "rollout/response_length": 7.0, "perf/rollout_share": 0.2,
    "perf/tokens_per_s": 100.0,
}  # fmt: skip


def test_the_step_line_shows_reward_mean_and_std_as_scored_and_flat_groups():
    line = step_line(3, 10, BASE | {"advantage/flat_groups": 0.25, "advantage/no_signal": 0.0})
    assert "reward 0.500±0.25" in line and "kept 100% (25% flat)" in line and "no signal" not in line
    assert "kept 100%  loss" in step_line(3, 10, BASE | {"advantage/flat_groups": 0.0})


def test_a_step_that_trained_on_zero_advantages_says_so():
    line = step_line(3, 10, BASE | {"advantage/flat_groups": 1.0, "advantage/no_signal": 1.0})
    assert "kept 100%" in line and "all flat: no signal" in line
    skipped = step_line(3, 10, {k: v for k, v in BASE.items() if not k.startswith("train/")})
    assert "skipped: every group filtered out" in skipped
