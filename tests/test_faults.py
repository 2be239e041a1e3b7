"""Faults an RL run survives (DESIGN §13, §16), each injected into a real ``tracerl train`` process on CPU with a
fixed seed: the driver SIGKILLed after a checkpoint and while one is written, Ctrl-C mid-step, rollout / reward /
learner actors SIGKILLed by pid mid-step. After ``--resume auto`` (or the loop's own recovery) every step's numbers
equal those of an uninterrupted run, and ``metrics.jsonl`` has each step exactly once.

The kill moments are read off the run's own files (a metrics row, the temporary checkpoint directory,
``cluster.json``), so the loop has no test-only branches.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import wandb_history

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 4
REWARD = """
def score(prompts, completions, **kwargs):
    return [len(set(c)) / 8.0 for c in completions]
"""
CONFIG = """
seed: 3
model: {{tiny: {{attention: block, hidden_size: 128, num_layers: 4, intermediate_size: 256}}}}
sampling: {{max_new_tokens: 8, temperature: 1.0}}
data: {{source: "synthetic:parity", num_synthetic: 200}}
objective: {{group_filter: drop_all_equal}}
learner: {{lr: 1.0e-3}}
reward: {{functions: [{{fn: "{reward}:score"}}], num_workers: 1}}
rollout: {{prompts_per_step: 4, samples_per_prompt: 4, num_workers: 1}}
train: {{steps: {steps}, eval_every: 2}}
eval: {{num_prompts: 4, samples: 2, k: 2}}
checkpoint: {{save_every: 1}}
wandb: {{mode: disabled}}
"""
TRACERL = [sys.executable, "-m", "tracerl.cli"]
# what depends on the machine's speed, or counts the faults themselves; everything else must be equal
VARYING = ("time/", "perf/", "fault/", "sync/weight_s")


class Run:
    """One ``tracerl train`` process in its own session (so the test can signal it like a terminal would, and
    remove whatever it leaves behind)."""

    def __init__(
        self, tmp: Path, name: str, *args: str, env: dict[str, str] | None = None, reward: str = REWARD
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "reward.py").write_text(reward)
        self.config = tmp / "config.yaml"
        self.config.write_text(CONFIG.format(reward=tmp / "reward.py", steps=STEPS))
        self.dir = tmp / name
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.args, self.env = args, os.environ | (env or {})

    def start(self, *extra: str) -> Run:
        cmd = [*TRACERL, "train", str(self.config), f"run_dir={self.dir}", *self.args, *extra]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        return self

    def wait(self, timeout: float = 600) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.cleanup()

    def when(self, condition: Callable[[], bool], timeout: float = 600, poll: float = 0.002) -> None:
        """Wait until ``condition()`` holds (fails if the run ends first)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before the moment to inject the fault:\n{self.output}"
            assert time.monotonic() < deadline, "timed out waiting for the moment to inject the fault"
            time.sleep(poll)

    def cleanup(self) -> None:
        """SIGKILL whatever is left of the run's session (its local Ray instance, after a SIGKILLed driver)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def rows(self) -> list[dict]:
        """The rows written so far; a line the run is still writing (no newline yet) is not one."""
        path = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []

    def steps(self) -> list[int]:
        return [r["step"] for r in self.rows()]

    def has_row(self, step: int) -> bool:
        return step in self.steps()

    def complete(self, step: int) -> bool:
        return (self.dir / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()

    def layout(self) -> dict:
        return json.loads((self.dir / "cluster.json").read_text())


def numbers(rows: list[dict]) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k not in ("step", "time") and not k.startswith(VARYING)}
            for r in rows}  # fmt: skip


def assert_same_run(run: Run, reference: dict[int, dict[str, float]]) -> None:
    """Each step exactly once, and every number of every step equal to the uninterrupted run's."""
    assert run.steps() == sorted(reference), run.output
    got = numbers(run.rows())
    for step, want in reference.items():
        assert set(got[step]) == set(want), f"step {step}: metric names differ"
        for key, value in want.items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"step {step} {key}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict[str, float]]:
    run = Run(tmp_path_factory.mktemp("reference"), "run").start()
    assert run.wait() == 0, run.output
    rows = numbers(run.rows())
    assert sorted(rows) == list(range(STEPS + 1)) and "eval/greedy_reward" in rows[0]
    assert len({rows[s]["reward/mean"] for s in range(1, STEPS + 1)}) > 1  # the steps differ: a real comparison
    return rows


def test_driver_sigkilled_after_a_checkpoint_resumes_to_the_same_numbers(reference, tmp_path):
    run = Run(tmp_path, "run", "wandb.mode=offline", env={"WANDB_MODE": "offline"}).start()
    run.when(lambda: run.complete(2))
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert "resumed from" in run.output and "(step 2)" in run.output
    assert_same_run(run, reference)
    # The resumed W&B run holds every step of metrics.jsonl, once, in order, whatever the killed one had flushed.
    rows = run.rows()
    history = wandb_history(sorted((run.dir / "wandb").glob("offline-run-*"))[-1])
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == list(range(STEPS + 1))
    for h, r in zip(history, rows, strict=True):
        assert all(h[key] == r[key] for key in ("reward/mean", "eval/greedy_reward", "train/loss") if key in r)


def test_driver_sigkilled_while_writing_a_checkpoint_resumes_from_the_one_before(reference, tmp_path):
    run = Run(tmp_path, "run").start()
    tmp = run.dir / "checkpoints" / ".tmp-step-2"
    run.when(tmp.exists)
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert tmp.exists() and not run.complete(2)  # killed mid-write: step 2's checkpoint is half-written
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert "(step 1)" in run.output  # the latest complete checkpoint
    assert not tmp.exists()  # the half-written one was cleared by the next save
    assert_same_run(run, reference)


def test_ctrl_c_mid_step_finishes_the_step_checkpoints_it_and_resumes(reference, tmp_path):
    run = Run(tmp_path, "run", "wandb.mode=offline", env={"WANDB_MODE": "offline"}).start()
    run.when(lambda: run.complete(1))
    time.sleep(0.5)  # past saving step 1: a later step is under way
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    assert run.wait() == 130, run.output
    assert "resume with --resume auto" in run.output
    saved = max(int(p.name[5:]) for p in (run.dir / "checkpoints").glob("step-*"))
    assert saved >= 2 and run.complete(saved)  # the step in flight finished and was saved
    assert run.steps() == list(range(saved + 1))
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert_same_run(run, reference)
    runs = sorted((run.dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1  # the same W&B run continued


def test_rollout_and_reward_actors_killed_mid_step_are_replaced_and_the_numbers_do_not_change(reference, tmp_path):
    run = Run(tmp_path, "run").start()
    run.when(lambda: run.has_row(1), poll=0.01)
    layout = run.layout()
    os.kill(layout["rollout"][0]["pid"], signal.SIGKILL)
    os.kill(layout["reward"][0]["pid"], signal.SIGKILL)
    assert run.wait() == 0, run.output
    last = run.rows()[-1]
    assert last["fault/rollout_restarts"] == 1 and last["fault/reward_restarts"] == 1
    assert last["fault/rollout_restart_s"] > 0 and last["fault/reward_restart_s"] > 0
    assert_same_run(run, reference)


def test_a_killed_learner_rank_is_rebuilt_from_the_last_checkpoint_and_the_run_completes(reference, tmp_path):
    run = Run(tmp_path, "run").start()
    run.when(lambda: run.complete(2), poll=0.01)
    os.kill(run.layout()["learner"][0]["pid"], signal.SIGKILL)
    assert run.wait() == 0, run.output
    assert "learner rebuilt from checkpoint step" in run.output
    last = run.rows()[-1]
    assert last["fault/learner_restarts"] == 1 and last["sync/weights_version"] == STEPS
    assert any("fault/learner_recovery_s" in r for r in run.rows())
    assert_same_run(run, reference)


def test_past_fault_max_learner_restarts_the_run_stops_saying_what_died_and_resumes(reference, tmp_path):
    run = Run(tmp_path, "run", "fault.max_learner_restarts=0").start()
    run.when(lambda: run.complete(1), poll=0.01)
    pid = run.layout()["learner"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert run.wait() == 2  # the CLI's exit code for an error it explains
    message = " ".join(run.output.split())
    assert f"learner rank 0 (pid {pid}) died" in message
    assert "fault.max_learner_restarts=0" in message and "resume with --resume auto" in message
    assert "Traceback" not in run.output
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert_same_run(run, reference)


COLLAPSING = """
import os
from pathlib import Path

def score(prompts, completions, **kwargs):
    scale = 0.01 if Path(os.environ["COLLAPSE_FLAG"]).exists() else 1.0  # the groups still differ: training goes on
    return [scale * (0.5 + len(set(c)) / 100.0) for c in completions]  # about 0.5 for every held-out prompt
"""


def test_a_learner_rebuilt_before_any_checkpoint_keeps_the_step_0_evaluation(tmp_path):
    """The learner dies before the first checkpoint, so it is rebuilt from the initial weights and the run redoes
    its steps from step 1. The divergence guard must still know the step-0 held-out reward: after the rebuild, the
    step-2 evaluation (the reward has fallen 100-fold since step 0, far beyond the noise of 4 held-out prompts whose
    rewards are all about 0.5) is reported as a collapse against it. A guard rebuilt fresh would take step 2's
    evaluation for the best so far, and stay silent."""
    flag = tmp_path / "collapse"
    run = Run(tmp_path, "run", "checkpoint.save_every=0", env={"COLLAPSE_FLAG": str(flag)}, reward=COLLAPSING)
    run.start().when(lambda: run.has_row(0), poll=0.01)
    flag.touch()  # from now on every reward is 1% of what it was
    run.when(lambda: run.has_row(1), poll=0.01)
    os.kill(run.layout()["learner"][0]["pid"], signal.SIGKILL)
    assert run.wait() == 0, run.output
    out = " ".join(run.output.split())
    rebuilt = out.find("learner rebuilt from the initial weights")
    assert rebuilt > 0, run.output
    assert "divergence at RL step 2: held-out greedy reward collapsed" in out[rebuilt:], run.output
    assert run.steps() == list(range(STEPS + 1))  # each step once: the rows after step 0 were redone


def test_a_killed_rank_of_a_two_rank_learner_does_not_hang_the_survivor(tmp_path):
    run = Run(tmp_path, "run", "learner.num_ranks=2", "train.steps=3", "eval.num_prompts=0").start()
    run.when(lambda: run.complete(1), poll=0.01)
    before = run.layout()["learner"]
    os.kill(before[1]["pid"], signal.SIGKILL)  # rank 0 may be waiting for it in a collective
    assert run.wait(timeout=600) == 0, run.output
    assert "learner rank 1" in run.output and "learner rebuilt" in run.output
    rows = run.rows()
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["fault/learner_restarts"] == 1
    after = run.layout()["learner"]
    assert len(after) == 2 and not {w["pid"] for w in after} & {w["pid"] for w in before}  # a whole new group


# ------------------------------------------------------------------------------- a step that fails before its update

PROMPT_LOG = """
import json, os, time
from pathlib import Path

from tracerl.reward_service import is_trial

def score(prompts, completions, **kwargs):
    if is_trial():  # the stand-in call before the run starts: no training step's
        return [0.0] * len(completions)
    calls = Path(os.environ["PROMPT_LOG"] + ".calls")
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n >= int(os.environ.get("FAIL_AT_CALL") or 1 << 30):  # (the service then retries sample by sample)
        raise ValueError("the grader is down")
    if str(n) == os.environ.get("SLOW_AT_CALL"):
        Path(os.environ["PROMPT_LOG"] + ".slow").write_text("scoring")
        time.sleep(60)
    with open(os.environ["PROMPT_LOG"], "a") as f:
        f.write(json.dumps(sorted(set(prompts))) + "\\n")
    return [len(set(c)) / 8.0 for c in completions]
"""
# no evaluation (every reward call is a training step's), no checkpoint but the last (so a failed step's guard
# writes one)
NO_EVAL = ("eval.num_prompts=0", "checkpoint.save_every=0")


def logged(tmp: Path, name: str, *args: str, **env: str) -> Run:
    log = tmp / f"{name}.prompts"
    return Run(tmp, name, *NO_EVAL, *args, env={"PROMPT_LOG": str(log), **env}, reward=PROMPT_LOG)


def prompts_of(run: Run) -> list[list[str]]:
    path = Path(run.env["PROMPT_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[dict[int, dict[str, float]], list[list[str]]]:
    """An uninterrupted run without evaluations: its numbers, and the prompts of each step (one reward call each)."""
    run = logged(tmp_path_factory.mktemp("straight"), "run").start()
    assert run.wait() == 0, run.output
    steps = prompts_of(run)
    assert len(steps) == STEPS and len({tuple(p) for p in steps}) == STEPS  # every step its own prompts
    return numbers(run.rows()), steps


def resume_and_compare(run: Run, straight: tuple, failed_step: int, same_prompts: bool = True) -> None:
    """The failed run left a checkpoint of the step before ``failed_step`` holding the data cursor as that step
    found it: the resumed run draws the failed step's prompts again, and every step equals the uninterrupted run."""
    want_numbers, want_prompts = straight
    saved = sorted(int(p.name[5:]) for p in (run.dir / "checkpoints").glob("step-*"))
    assert saved == [failed_step - 1], run.output
    assert run.start("--resume", "auto").wait() == 0, run.output
    assert f"(step {failed_step - 1})" in run.output
    assert_same_run(run, want_numbers)
    if same_prompts:
        assert prompts_of(run) == want_prompts  # steps 1..k-1 from the failed run, then k.. from the resumed one


def test_a_raising_reward_checkpoints_the_cursor_the_failed_step_found(straight, tmp_path):
    run = logged(tmp_path, "run", FAIL_AT_CALL="3").start()
    assert run.wait() == 2, run.output
    assert "RL step 3 failed" in run.output and "the grader is down" in run.output
    run.env.pop("FAIL_AT_CALL")
    resume_and_compare(run, straight, failed_step=3)


def test_rollout_actors_dying_too_often_checkpoint_the_cursor_the_failed_step_found(straight, tmp_path):
    run = logged(tmp_path, "run", "fault.max_restarts=0").start()
    run.when(lambda: run.has_row(2), poll=0.002)
    os.kill(run.layout()["rollout"][0]["pid"], signal.SIGKILL)  # while step 3 samples
    assert run.wait() == 2, run.output
    assert "RL step 3 failed" in run.output and "fault.max_restarts=0" in run.output
    resume_and_compare(run, straight, failed_step=3)


def test_a_second_ctrl_c_checkpoints_the_cursor_the_failed_step_found(straight, tmp_path):
    run = logged(tmp_path, "run", SLOW_AT_CALL="3").start()
    slow = Path(run.env["PROMPT_LOG"] + ".slow")
    run.when(slow.exists)  # step 3 is being scored (slowly), before its update
    os.killpg(run.proc.pid, signal.SIGINT)  # finish this step and stop ...
    run.when(lambda: "stopping after this RL step" in run.output)  # (two signals before it is handled are one)
    os.killpg(run.proc.pid, signal.SIGINT)  # ... no: stop at once
    assert run.wait() == 130, run.output
    assert "interrupted at RL step 3" in run.output
    run.env.pop("SLOW_AT_CALL")
    resume_and_compare(run, straight, failed_step=3)
