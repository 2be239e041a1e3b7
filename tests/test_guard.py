"""The divergence guard: one warning when a run collapses, none on a healthy run."""

from __future__ import annotations

import json

import pytest

from tracerl.config import ConfigError, GuardConfig, load
from tracerl.metrics import MetricsLogger
from tracerl.orchestrator.guards import DivergenceGuard, ValueWatch, guard_line


def steps(guard: DivergenceGuard, rows: list[dict[str, float]]) -> list[list[str]]:
    return [guard.check(step, row) for step, row in enumerate(rows, start=1)]


def trained(reward: float, kl: float = 0.01, **extra: float) -> dict[str, float]:
    return {"reward/mean": reward, "train/policy_loss": 0.0, "train/kl_to_old": kl, **extra}


def test_a_healthy_run_gets_no_warning() -> None:
    rows = [trained(r) for r in (0.40, 0.45, 0.43, 0.50, 0.60, 0.55, 0.58, 0.70)]
    rows[3]["eval/greedy_reward"] = 0.5
    rows[7]["eval/greedy_reward"] = 0.7
    assert all(w == [] for w in steps(DivergenceGuard(GuardConfig()), rows))


def test_d1_like_collapse_warns_once_then_again_when_nothing_trains() -> None:
    # The d1 run of the issue: training reward 0.42 → 0 in a few steps, then every group filtered out.
    rewards = [0.42, 0.45, 0.40, 0.20, 0.05, 0.0, 0.0, 0.0, 0.0]
    rows = [trained(r) for r in rewards[:6]] + [{"reward/mean": 0.0}] * 3  # no train/* when nothing was kept
    found = steps(DivergenceGuard(GuardConfig(window=3, reward_fraction=0.5)), rows)
    # window means of steps 3..9: 0.423, 0.35, 0.217 (just above 0.5 × 0.423 = 0.212), 0.083, 0.017, 0, 0
    assert found[:5] == [[], [], [], [], []]
    assert found[5] == ["training reward collapsed: 0.08 over the last 3 steps, below 0.5 × its best (0.42)"]
    assert found[6:8] == [[], []]  # the same sign goes on: not repeated
    assert found[8] == [
        "nothing trained for 3 steps: every group was filtered out (all its rewards equal; training reward 0.00)"
    ]


def test_held_out_collapse_and_recovery() -> None:
    guard = DivergenceGuard(GuardConfig(window=3))
    assert guard.check(0, {"eval/greedy_reward": 0.42}) == []
    assert guard.check(10, trained(0.5, **{"eval/greedy_reward": 0.60})) == []
    assert guard.check(20, trained(0.5, **{"eval/greedy_reward": 0.20})) == [
        "held-out greedy reward collapsed: 0.200, below 0.5 × its best (0.600)"
    ]
    assert guard.check(21, trained(0.5)) == []  # still collapsed, no new evaluation: no repeat
    assert guard.check(30, trained(0.5, **{"eval/greedy_reward": 0.55})) == []  # recovered
    assert guard.check(40, trained(0.5, **{"eval/greedy_reward": 0.10})) == [
        "held-out greedy reward collapsed: 0.100, below 0.5 × its best (0.600)"
    ]


def test_a_reward_model_score_below_zero_collapses_against_its_start() -> None:
    # A reward model's scores: training reward from -2.0 up to +1.0, then back down. Measured from 0, "0.5 × its
    # best" would be +0.5 and a healthy -1.0 early on would already read as a collapse below it; the old rule (best
    # above 0 only) never warned while the best was negative. From its start (-2.0), half-way back is -0.5.
    guard = DivergenceGuard(GuardConfig(window=1, reward_fraction=0.5))
    found = steps(guard, [trained(r) for r in (-2.0, -1.5, -1.0, 1.0, 0.0, -0.6, -2.5)])
    assert found[:5] == [[], [], [], [], []]  # the rise, then a fall to 0.0: above -0.5
    assert found[5] == [
        "training reward collapsed: -0.60 over the last 1 steps, below -0.50, half-way back from its best (1.00) to "
        "its start (-2.00)"
    ]
    assert found[6] == []  # the same sign goes on
    held_out = DivergenceGuard(GuardConfig())
    assert held_out.check(0, {"eval/greedy_reward": -1.0}) == []
    assert held_out.check(5, trained(0.0, **{"eval/greedy_reward": -0.5})) == []  # rose; a fraction from 0 fails
    assert held_out.check(10, trained(0.0, **{"eval/greedy_reward": -0.8})) == [
        "held-out greedy reward collapsed: -0.800, below -0.750, half-way back from its best (-0.500) to its start "
        "(-1.000)"
    ]


def test_a_fall_within_the_noise_is_no_collapse() -> None:
    # A hard task whose reward starts near 0: 0.02 → 0.03 → 0.012 "lost more than half its best", but each mean
    # has a standard error of 0.012 (2% of 128 samples right), so the fall is noise. The same fall with the noise
    # unknown warns as before, and a fall far beyond the noise warns with it.
    def rows(rewards: tuple[float, ...], sem: float) -> list[dict[str, float]]:
        return [trained(r, **{"reward/sem": sem, "eval/greedy_reward": r, "eval/greedy_reward_sem": sem})
                for r in rewards]  # fmt: skip

    cfg = GuardConfig(window=1)
    assert steps(DivergenceGuard(cfg), rows((0.02, 0.03, 0.012), sem=0.012)) == [[], [], []]
    assert steps(DivergenceGuard(cfg), rows((0.02, 0.03, 0.012), sem=float("nan")))[2] == [
        "training reward collapsed: 0.01 over the last 1 steps, below 0.5 × its best (0.03)",
        "held-out greedy reward collapsed: 0.012, below 0.5 × its best (0.030)",
    ]
    assert steps(DivergenceGuard(cfg), rows((0.4, 0.6, 0.2), sem=0.04))[2] == [
        "training reward collapsed: 0.20 over the last 1 steps, below 0.5 × its best (0.60)",
        "held-out greedy reward collapsed: 0.200, below 0.5 × its best (0.600)",
    ]
    # a window of 3 steps averages 3 standard errors: √3 × 0.05 / 3 each, margin 3 × √2 × 0.0289 = 0.122
    track = DivergenceGuard(GuardConfig(window=3))
    found = steps(track, [trained(r, **{"reward/sem": 0.05}) for r in (0.3, 0.3, 0.3, 0.1, 0.1, 0.0)])
    assert found[:4] == [[], [], [], []]  # 0.3 → 0.233 → 0.167: a fall of 0.133 but not below half of 0.3
    assert found[4] == [] and found[5] == [
        "training reward collapsed: 0.07 over the last 3 steps, below 0.5 × its best (0.30)"
    ]


def test_held_out_evaluations_are_compared_prompt_by_prompt() -> None:
    # 8 held-out prompts, half easy and half hard; every prompt loses 0.1-0.5: 0.500 -> 0.200. As two independent
    # means (standard errors 0.151 and 0.076) the fall is within 3 of their difference's; prompt by prompt it is not.
    best, now = [0.9, 0.1] * 4, [0.4, 0.0] * 4
    row0 = {"eval/greedy_reward": 0.5, "eval/greedy_reward_sem": 0.151}
    row1 = trained(0.5, **{"eval/greedy_reward": 0.2, "eval/greedy_reward_sem": 0.076})
    independent = DivergenceGuard(GuardConfig())
    assert independent.check(0, row0) == [] and independent.check(10, row1) == []
    paired = DivergenceGuard(GuardConfig())
    assert paired.check(0, row0, {"": best}) == []
    expected = ["held-out greedy reward collapsed: 0.200, below 0.5 × its best (0.500)"]
    resumed = DivergenceGuard(GuardConfig())
    resumed.load_state_dict(json.loads(json.dumps(paired.state_dict(), allow_nan=False)))  # kept in the checkpoint
    assert paired.check(10, row1, {"": now}) == expected
    assert resumed.check(10, row1, {"": now}) == expected
    # a weight-0 reward's held-out evaluation too, by its own per-prompt rewards
    monitor = DivergenceGuard(GuardConfig(), monitors=("verifier",))
    part = {"eval/greedy_reward_sem/verifier": 0.151}
    monitor.check(0, {**row0, "eval/greedy_reward/verifier": 0.5, **part}, {"": best, "verifier": best})
    found = monitor.check(10, {**row1, "eval/greedy_reward/verifier": 0.2, **part}, {"": now, "verifier": now})
    assert any(w.startswith("held-out greedy reward 'verifier' (weight 0, not trained on) collapsed") for w in found)


def test_a_reward_model_score_that_only_falls_collapses_once_beyond_its_noise() -> None:
    # A reward model's score that starts below 0 and never rises has gained nothing to lose; measured against its
    # noise, a fall below its start is a collapse. Before, it never warned; and a rise within the noise (-0.87 →
    # -0.86) made any later dip below the start a collapse ("half-way back" from -0.86 to -0.87).
    def rm(reward: float) -> dict[str, float]:
        return trained(reward, **{"reward/sem": 0.05, "eval/greedy_reward": reward, "eval/greedy_reward_sem": 0.05})

    found = steps(DivergenceGuard(GuardConfig(window=1)), [rm(r) for r in (-0.87, -0.86, -0.95, -0.90, -1.5)])
    assert found[:4] == [[], [], [], []]  # within 3 × √2 × 0.05 = 0.21 of the start and the best
    assert found[4] == [
        "training reward collapsed: -1.50 over the last 1 steps, 0.63 below its start (-0.87), beyond its noise "
        "(0.21), and it never rose",
        "held-out greedy reward collapsed: -1.500, 0.630 below its start (-0.870), beyond its noise (0.212), and it "
        "never rose",
    ]
    rose = steps(DivergenceGuard(GuardConfig(window=1)), [rm(r) for r in (-0.87, 0.53, -0.3)])
    assert rose[2][0] == (  # a rise beyond the noise: half of the gain lost, as before
        "training reward collapsed: -0.30 over the last 1 steps, below -0.17, half-way back from its best (0.53) to "
        "its start (-0.87)"
    )
    monitor = DivergenceGuard(GuardConfig(window=1), monitors=("rm",))
    found = steps(monitor, [trained(0.5, **{"reward/rm/mean": r, "reward/sem/rm": 0.05}) for r in (-0.87, -1.5)])
    assert found[1] == [
        "reward 'rm' (weight 0, not trained on) collapsed: -1.50 over the last 1 steps, 0.63 below its start (-0.87), "
        "beyond its noise (0.21), and it never rose, while the training reward holds up (0.50): the policy may be "
        "gaming the reward it is trained on"
    ]


def test_a_first_reading_that_is_not_a_number_sets_no_floor() -> None:
    # every held-out sample scored None at step 0: the start is the first finite evaluation, not 0
    guard = DivergenceGuard(GuardConfig())
    found = [guard.check(s, {"eval/greedy_reward": v}) for s, v in ((0, float("nan")), (5, -1.0), (10, -0.2))]
    assert found == [[], [], []] and guard.held_out.floor == -1.0
    assert guard.check(15, {"eval/greedy_reward": -1.0}) == [
        "held-out greedy reward collapsed: -1.000, below -0.600, half-way back from its best (-0.200) to its start "
        "(-1.000)"
    ]
    json.dumps(guard.state_dict(), allow_nan=False)  # strict JSON
    training = DivergenceGuard(GuardConfig(window=1))
    assert steps(training, [trained(float("-inf")), trained(-2.0), trained(1.0), trained(-1.0)])[3] == [
        "training reward collapsed: -1.00 over the last 1 steps, below -0.50, half-way back from its best (1.00) to "
        "its start (-2.00)"
    ]
    json.dumps(training.state_dict(), allow_nan=False)


def test_a_reward_of_weight_0_that_collapses_while_the_trained_one_rises_is_named() -> None:
    # RLHF without a KL (docs/rlhf.md): the reward model's score climbs while the verifier logged beside it at
    # weight 0 falls to 0; a monitor that rises, or one the guard was not told about, says nothing
    guard = DivergenceGuard(GuardConfig(window=2), monitors=("verifier", "length"))
    scores, verifier = (0.5, 1.0, 1.5, 2.0, 2.5, 2.8), (0.5, 0.6, 0.6, 0.3, 0.05, 0.0)
    rows = [trained(rm, **{"reward/verifier/mean": v, "reward/length/mean": 0.1 * i, "reward/other/mean": 0.0})
            for i, (rm, v) in enumerate(zip(scores, verifier, strict=True))]  # fmt: skip
    found = steps(guard, rows)
    # verifier window means: 0.55, 0.6, 0.45, 0.175 (< 0.5 × 0.6 at step 5), 0.025
    assert found[:4] == [[], [], [], []] and found[5] == []
    assert found[4] == [
        "reward 'verifier' (weight 0, not trained on) collapsed: 0.17 over the last 2 steps, below 0.5 × its best "
        "(0.60), while the training reward holds up (2.50): the policy may be gaming the reward it is trained on"
    ]
    state = json.loads(json.dumps(guard.state_dict(), allow_nan=False))
    assert set(state["monitors"]) == {"verifier", "length"}
    older = {k: v for k, v in state.items() if "monitors" not in k}  # a checkpoint from before monitors were watched
    resumed = DivergenceGuard(GuardConfig(window=2), monitors=("verifier",))
    resumed.load_state_dict(older)
    assert resumed.watched["verifier"].best == float("-inf")  # its track starts afresh
    assert resumed.held_out_watched["verifier"].best == float("-inf")


def test_a_held_out_reward_of_weight_0_that_collapses_is_named_until_an_evaluation_clears_it() -> None:
    # docs/rlhf.md without a KL: the held-out greedy reward-model score climbs, the held-out verifier falls to 0
    guard = DivergenceGuard(GuardConfig(window=1), monitors=("verifier",))
    evals = {1: (-0.5, 0.41), 3: (1.2, 0.66), 5: (2.4, 0.30), 7: (3.3, 0.00), 9: (3.4, 0.70)}
    rows = [trained(1.0, **({"eval/greedy_reward": evals[s][0], "eval/greedy_reward/verifier": evals[s][1]}
                            if s in evals else {})) for s in range(1, 11)]  # fmt: skip
    found = steps(guard, rows)
    assert found[4] == [
        "held-out greedy reward 'verifier' (weight 0, not trained on) collapsed: 0.300, below 0.5 × its best "
        "(0.660), while the held-out greedy reward holds up (2.400): the policy may be gaming the reward it is "
        "trained on"
    ]
    assert [i for i, f in enumerate(found) if f] == [4]  # steps 6-8 keep the sign without repeating it; 9 clears it
    assert "eval/verifier" not in guard.active
    # the held-out total collapses too: no gaming hint, each sign in its own line
    both = DivergenceGuard(GuardConfig(window=1), monitors=("verifier",))
    steps(both, [trained(1.0, **{"eval/greedy_reward": 0.8, "eval/greedy_reward/verifier": 0.6})])
    assert both.check(2, trained(1.0, **{"eval/greedy_reward": 0.1, "eval/greedy_reward/verifier": 0.0})) == [
        "held-out greedy reward collapsed: 0.100, below 0.5 × its best (0.800)",
        "held-out greedy reward 'verifier' (weight 0, not trained on) collapsed: 0.000, below 0.5 × its best (0.600)",
    ]


def test_a_reading_that_is_not_a_number_keeps_a_reward_sign_standing() -> None:
    # every sample scored None: the training reward, a monitor and both held-out readings are NaN for one step; the
    # signs they had raised stand (not cleared, so not repeated when the reward stays low after it)
    nan = float("nan")
    guard = DivergenceGuard(GuardConfig(window=1), monitors=("verifier",))
    high = {"eval/greedy_reward": 0.8, "eval/greedy_reward/verifier": 0.8, "reward/verifier/mean": 0.8}
    low = {"eval/greedy_reward": 0.1, "eval/greedy_reward/verifier": 0.1, "reward/verifier/mean": 0.1}
    none = {"eval/greedy_reward": nan, "eval/greedy_reward/verifier": nan, "reward/verifier/mean": nan}
    found = steps(guard, [trained(0.8, **high), trained(0.1, **low), trained(nan, **none), trained(0.1, **low)])
    assert [len(f) for f in found] == [0, 4, 0, 0]
    assert guard.active == {"reward", "monitor/verifier", "eval", "eval/verifier"}
    # a monitor that collapses while the trained reward is not a number gets no "holds up (nan)" hint
    alone = DivergenceGuard(GuardConfig(window=1), monitors=("verifier",))
    steps(alone, [trained(0.8, **high)])
    row = trained(nan, **{**low, "eval/greedy_reward": nan})
    assert alone.check(2, row) == [
        "reward 'verifier' (weight 0, not trained on) collapsed: 0.10 over the last 1 steps, below 0.5 × its best "
        "(0.80)",
        "held-out greedy reward 'verifier' (weight 0, not trained on) collapsed: 0.100, below 0.5 × its best (0.800)",
    ]


def test_a_checkpoint_without_floors_measures_from_zero_as_before() -> None:
    guard = DivergenceGuard(GuardConfig(window=1))
    guard.check(1, trained(0.6, **{"eval/greedy_reward": 0.5}))
    old = {k: v for k, v in guard.state_dict().items() if not k.endswith("_floor")}
    resumed = DivergenceGuard(GuardConfig(window=1))
    resumed.load_state_dict(old)
    assert (resumed.training.floor, resumed.held_out.floor) == (0.0, 0.0)
    fresh = DivergenceGuard(GuardConfig(window=1))
    fresh.load_state_dict({k: v for k, v in DivergenceGuard(GuardConfig()).state_dict().items() if "floor" not in k})
    assert (fresh.training.floor, fresh.held_out.floor) == (None, None)  # nothing seen yet: set by the first reading
    assert resumed.check(2, trained(0.2, **{"eval/greedy_reward": 0.2})) == [
        "training reward collapsed: 0.20 over the last 1 steps, below 0.5 × its best (0.60)",
        "held-out greedy reward collapsed: 0.200, below 0.5 × its best (0.500)",
    ]


def test_kl_above_the_bound_for_window_steps() -> None:
    guard = DivergenceGuard(GuardConfig(window=2, max_kl_to_old=0.5))
    # one isolated spike is not a warning; two steps in a row are
    found = steps(guard, [trained(0.5, kl=9.0), trained(0.5), trained(0.5, kl=0.8),
                          trained(0.5, kl=0.9, **{"train/log_ratio_abs_max": 7.5})])  # fmt: skip
    assert found == [[], [], [], ["train/kl_to_old above 0.5 for 2 steps (last 0.9, largest token log-ratio 7.5)"]]


def test_a_step_that_trained_nothing_after_high_kl_does_not_crash_the_guard() -> None:
    # A collapse: KL high, then every sample scores the same and every group is dropped (no train/* keys at all).
    guard = DivergenceGuard(GuardConfig(window=2, max_kl_to_old=0.5))
    found = steps(guard, [trained(0.5, kl=0.9), trained(0.5, kl=0.8), {"reward/mean": 0.0}, {"reward/mean": 0.0}])
    assert found[1] == ["train/kl_to_old above 0.5 for 2 steps (last 0.8, largest token log-ratio nan)"]
    assert found[2] == []  # the sign stands (the last KL reading), not repeated
    assert found[3] == [
        "training reward collapsed: 0.00 over the last 2 steps, below 0.5 × its best (0.50)",
        "nothing trained for 2 steps: every group was filtered out (all its rewards equal; training reward 0.00)",
    ]
    assert guard.high_kl == 2


def test_a_kl_that_is_not_a_number_counts_as_high() -> None:
    guard = DivergenceGuard(GuardConfig(window=2, max_kl_to_old=0.5))
    found = steps(guard, [trained(0.5, kl=float("nan")), trained(0.5, kl=float("nan"))])
    assert found == [[], ["train/kl_to_old above 0.5 for 2 steps (last nan, largest token log-ratio nan)"]]


def test_the_kl_measured_after_the_step_is_judged_when_logged() -> None:
    # learner.kl_after_step: the in-loss kl_to_old (before each optimizer step) reads small, the step moved far
    guard = DivergenceGuard(GuardConfig(window=1, max_kl_to_old=0.5))
    row = trained(0.5, kl=0.01, **{"train/kl_to_old_after_step": 0.7, "train/log_ratio_abs_max_after_step": 6.0})
    assert guard.check(1, row) == [
        "train/kl_to_old_after_step above 0.5 for 1 steps (last 0.7, largest token log-ratio 6.0)"
    ]


@pytest.mark.parametrize("shift", [0.0, -2.0])  # rewards in [0, 1]; a reward model's, which start below 0
def test_a_resumed_guard_warns_where_an_uninterrupted_one_does(shift: float) -> None:
    cfg = GuardConfig(window=2, max_kl_to_old=0.5)
    rows = [trained(0.6), trained(0.6, kl=0.9), trained(0.2, kl=0.9), trained(0.1),
            {"reward/mean": 0.0}, {"reward/mean": 0.0, "eval/greedy_reward": 0.1}]  # fmt: skip
    rows[0]["eval/greedy_reward"] = 0.5
    if shift:  # up from -1.4 to -0.6 (held-out -1.9 to -1.2), then down to -2.0: the floors are the starts, not 0
        for row, reward in zip(rows, (0.6, 0.6, 1.4, 1.4, 0.0, 0.0), strict=True):
            row["reward/mean"] = reward + shift
        rows[0]["eval/greedy_reward"], rows[2]["eval/greedy_reward"], rows[5]["eval/greedy_reward"] = -1.9, -1.2, -1.9
    for row, verifier in zip(rows, (0.9, 0.9, 0.9, 0.2, 0.2, 0.2), strict=True):  # a monitor that collapses too
        row["reward/verifier/mean"] = verifier
    for i, row in enumerate(rows):  # each reading with its noise, which the state keeps too
        row |= {"reward/sem": 0.01 * (i + 1), "reward/sem/verifier": 0.02, "eval/greedy_reward_sem": 0.03}
    rows[0]["eval/greedy_reward/verifier"], rows[5]["eval/greedy_reward/verifier"] = 0.8, 0.3  # and held out
    whole = steps(DivergenceGuard(cfg, monitors=("verifier",)), rows)
    assert sum(map(len, whole)) >= 5  # the sequence does warn, the monitor included
    named = [w for ws in whole for w in ws if w.startswith("reward 'verifier'")]
    assert len(named) == 1 and "gaming" not in named[0]  # the trained reward collapsed too: no gaming hint
    held_out = [w for ws in whole for w in ws if w.startswith("held-out greedy reward 'verifier'")]
    assert len(held_out) == 1
    for cut in range(1, len(rows)):
        first = DivergenceGuard(cfg, monitors=("verifier",))
        before = [first.check(step, row) for step, row in enumerate(rows[:cut], start=1)]
        second = DivergenceGuard(cfg, monitors=("verifier",))
        second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))  # strict JSON
        tracks = [(first.training, second.training), (first.watched["verifier"], second.watched["verifier"])]
        assert all(a.state_dict() == b.state_dict() for a, b in tracks), cut  # the noise of each reading too
        assert first.held_out.best_sem == second.held_out.best_sem or first.held_out.best_sem != first.held_out.best_sem
        after = [second.check(step, row) for step, row in enumerate(rows[cut:], start=cut + 1)]
        assert before + after == whole, cut


def test_a_resumed_value_watch_reports_where_an_uninterrupted_one_does() -> None:
    cfg = GuardConfig(value_window=3)
    rows = [{"value/explained_var": ev, "value/advantage_var_ratio": 1.0} for ev in (0.2, 0.0, 0.0, -0.1, 0.3, 0.0)]
    watch = ValueWatch(cfg)
    whole = [watch.check(m) for m in rows]
    assert [w is not None for w in whole] == [False, False, False, True, False, False]
    first = ValueWatch(cfg)
    before = [first.check(m) for m in rows[:3]]
    second = ValueWatch(cfg)
    second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    assert before + [second.check(m) for m in rows[3:]] == whole


def test_disabled_guard_says_nothing() -> None:
    rows = [trained(r) for r in (0.9, 0.9, 0.9, 0.0, 0.0, 0.0)]
    assert all(w == [] for w in steps(DivergenceGuard(GuardConfig(enabled=False)), rows))


def test_guard_config_is_checked() -> None:
    assert load(None, ["guard.window=5"]).guard.window == 5
    with pytest.raises(ConfigError, match="guard.reward_fraction in"):
        load(None, ["guard.reward_fraction=1.5"])


def test_alert_goes_to_alerts_jsonl(tmp_path) -> None:  # noqa: ANN001
    logger = MetricsLogger(tmp_path)
    logger.alert("tracerl: divergence", "RL step 4: training reward collapsed", step=4)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["title"], r["text"]) for r in rows] == [
        (4, "tracerl: divergence", "RL step 4: training reward collapsed")
    ]
    assert "RL step 4" in guard_line(4, "x") and "x" in guard_line(4, "x")


def test_value_watch_reports_an_idle_value_model_once_and_again_after_it_learnt() -> None:
    watch = ValueWatch(GuardConfig(value_window=3, min_value_explained_var=0.05))
    evs = [0.0, 0.01, -0.01, 0.02, 0.3, 0.4, 0.5, 0.0, 0.0, 0.0, 0.0]
    found = [watch.check({"value/explained_var": ev, "value/advantage_var_ratio": 1.01}) for ev in evs]
    # means over 3 steps from step 3: 0.000, 0.007, 0.103, 0.233, 0.400, 0.300, 0.167, 0.000, 0.000
    assert [i + 1 for i, f in enumerate(found) if f] == [3, 10]
    assert found[2].startswith("value/explained_var +0.000 on average over the last 3 steps (below 0.05; advantage "
                               "variance 1.01 × the group baseline's)")  # fmt: skip
    assert watch.idle


def test_value_watch_is_quiet_without_a_value_model_or_while_it_learns() -> None:
    watch = ValueWatch(GuardConfig(value_window=2))
    assert [watch.check({"reward/mean": 0.5}) for _ in range(4)] == [None] * 4  # no value metrics
    assert [watch.check({"value/explained_var": ev}) for ev in (0.4, 0.5, 0.6)] == [None] * 3
    assert ValueWatch(GuardConfig(enabled=False, value_window=1)).check({"value/explained_var": 0.0}) is None


def test_value_watch_config_is_checked() -> None:
    assert load(None, ["guard.value_window=4"]).guard.value_window == 4
    with pytest.raises(ConfigError, match="guard.value_window must be ≥ 1"):
        load(None, ["guard.value_window=0"])
    with pytest.raises(ConfigError, match="guard.min_value_explained_var below 1"):
        load(None, ["guard.min_value_explained_var=1.5"])


def test_nothing_scored_excuses_counted_failures_except_where_asked() -> None:
    from tracerl.orchestrator.guards import nothing_scored
    from tracerl.reward_service import RewardResult

    nan = float("nan")
    cfg = load(None, ["eval.source=synthetic:sudoku4"])
    silent = RewardResult([nan, nan], {"judge": [nan, nan]}, {"reward/errors/judge": 0.0})
    failed = RewardResult([nan, nan], {"judge": [nan, nan]}, {"reward/errors/judge": 2.0})
    assert nothing_scored(silent, 1, cfg).startswith("every sample of RL step 1 was scored None (or NaN) by")
    assert nothing_scored(failed, 1, cfg) is None  # reward.on_error=nan: counted and logged, the run goes on
    assert nothing_scored(failed, 0, cfg, evaluation=True) is None  # the same in a run's evaluation
    message = nothing_scored(failed, 0, cfg, evaluation=True, failures_too=True)  # tracerl eval
    assert "the held-out evaluation at step 0" in message and "{'reward/errors/judge': 2.0}" in message
    assert "of eval.source 'synthetic:sudoku4'" in message and "nothing to report" in message
    assert nothing_scored(RewardResult([nan, 0.5], {"judge": [nan, 0.5]}, {}), 1, cfg) is None
